#!/bin/bash
# Device smoke test (run as: bash .carry/device_smoke.sh, carry [".carry"]): CUDA build of pyllm-kv's patched llama.cpp from the carried
# trimmed sdist, then what our types do with and without GPU offload.
set -x
mkdir -p /tmp/src && tar xzf .carry/llama_cpp_python-0.3.36-trim.tgz -C /tmp/src
nvidia-smi --query-gpu=name,memory.total --format=csv
cmake -S . -B /tmp/b -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DPYLLM_KV_LLAMA_SRC=/tmp/src/llama_cpp_python-0.3.36 > $OUT/cfg.log 2>&1 || { tail -30 $OUT/cfg.log; exit 1; }
( time ninja -C /tmp/b -j16 pyllm_kv_all ) > $OUT/build.log 2>&1 || { grep -n "error" $OUT/build.log | head -30; exit 1; }
tail -4 $OUT/build.log
cmake --install /tmp/b --component pyllm_kv --prefix /tmp/inst > /dev/null
ls /tmp/inst/pyllm_kv/lib
M=.carry/smollm2-small.gguf
B=/tmp/inst/pyllm_kv/bin
for t in f16 q4_0 kv4; do for ngl in 0 99; do
  echo "== $t ngl=$ngl"
  timeout 120 $B/llama-completion -m $M -p "The capital of France is" -n 16 --temp 0 -ctk $t -ctv $t -fa on -ngl $ngl -no-cnv > $OUT/gen_${t}_${ngl}.txt 2> $OUT/gen_${t}_${ngl}.err
  echo "rc=$?"; cat $OUT/gen_${t}_${ngl}.txt; grep -i "error\|abort\|assert\|splits\|failed" $OUT/gen_${t}_${ngl}.err | head -5
done; done
timeout 300 $B/llama-bench -m $M -ngl 99 -fa 1 -ctk f16,q4_0 -ctv f16,q4_0 -p 512 -n 64 -r 2 2>&1 | tail -8
