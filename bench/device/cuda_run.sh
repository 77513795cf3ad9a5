#!/bin/bash
# Device run for the CUDA kernels of our types (patches/0009, native/cuda).
# Call 1: bash bench/device/cuda_run.sh build   (carry [".carry"]): CUDA build under /tmp,
#         test-backend-ops on CUDA0 for our types, greedy completion GPU vs CPU, small-model bench.
# Call 2: bash bench/device/cuda_run.sh shape   (same warm machine): Llama-8B-shaped random
#         Q4_0 model (bench/make_shape_model.py, gguf-py from the carried tree), then
#         `pyllm-kv bench --gpu` (python -m pyllm_kv.bench) at depth 0/8k/32k/64k.
set -x
STAGE=${1:-build}
B=/tmp/b/bin
M=.carry/smollm2-small.gguf
if [ "$STAGE" = build ]; then
  mkdir -p /tmp/src && tar xzf .carry/llama_cpp_python-0.3.36-trim.tgz -C /tmp/src
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
  cmake -S . -B /tmp/b -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DPYLLM_KV_UPSTREAM_TESTS=ON -DPYLLM_KV_LLAMA_SRC=/tmp/src/llama_cpp_python-0.3.36 > $OUT/cfg.log 2>&1 || { tail -30 $OUT/cfg.log; exit 1; }
  grep -n "pyllm-kv: applied" $OUT/cfg.log
  ( time ninja -C /tmp/b -j16 llama-bench llama-completion test-backend-ops ) > $OUT/build.log 2>&1 || { grep -n -A5 "error" $OUT/build.log | head -60; exit 1; }
  tail -4 $OUT/build.log
  for op in SET_ROWS GET_ROWS CPY FLASH_ATTN_EXT; do
    timeout 240 $B/test-backend-ops -b CUDA0 -o $op -p 'kv[234]' > $OUT/tbo_$op.log 2>&1; echo "tbo $op rc=$?"
    grep -c "OK" $OUT/tbo_$op.log; grep -E "FAIL|not supported|passed" $OUT/tbo_$op.log | sort | uniq -c | sort -rn | head -8
  done
  for ngl in 0 99; do
    timeout 120 $B/llama-completion -m $M -p "The capital of France is" -n 32 --temp 0 -ctk kv4 -ctv kv4 -fa on -ngl $ngl -no-cnv > $OUT/gen_kv4_$ngl.txt 2> $OUT/gen_kv4_$ngl.err
    echo "gen ngl=$ngl rc=$?"; cat $OUT/gen_kv4_$ngl.txt; echo; grep -i "error\|abort\|assert\|fallback\|splits" $OUT/gen_kv4_$ngl.err | head -5
  done
  cmp $OUT/gen_kv4_0.txt $OUT/gen_kv4_99.txt && echo "GPU == CPU text"
  for t in f16 q4_0 kv4 kv2; do
    timeout 120 $B/llama-bench -m $M -ngl 99 -fa 1 -ctk $t -ctv $t -p 512 -n 64 -d 0,8192 -r 2 -o md 2>/dev/null | grep -E "^\|" | tee -a $OUT/bench_small.md
  done
else
  [ -f bench/make_shape_model.py ] || { echo "bench/make_shape_model.py is not written yet"; exit 1; }
  G=/tmp/src/llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py
  [ -f /tmp/shape8b.gguf ] || PYTHONPATH=$G python3 bench/make_shape_model.py --preset llama8b --out /tmp/shape8b.gguf || exit 1
  PYTHONPATH=.:$G python3 -m pyllm_kv.bench --model /tmp/shape8b.gguf --gpu --formats f16,q4_0,kv4,kv2 \
    --pp 512 --tg 64 --reps 2 --timeout 150 --llama-bench $B/llama-bench \
    --json $OUT/bench_shape.json --plot $OUT/bench_shape.png | tee $OUT/bench_shape.md
fi
