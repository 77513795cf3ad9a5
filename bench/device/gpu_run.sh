#!/bin/bash
# pyllm-kv on the GPU machine (no network, at most 64 MiB carried per call, 10 min
# per call, /tmp survives while the machine stays warm: make the three calls back
# to back). Fill the carries first: bench/device/prepare_carries.sh.
#
#   bash bench/device/gpu_run.sh install   carry [".carry1"]
#       CUDA build and install with the README's command,
#       CMAKE_ARGS="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90" pip install .
#       (into a venv over the system site-packages; pip offline from the carried
#       wheels, the pinned upstream from the carried trimmed sdist, build folder
#       /tmp/b), then pkv-cuda-test (our CUDA encoders vs the C reference) and
#       `pyllm-kv formats`.
#   bash bench/device/gpu_run.sh test      carry [".carry2"]
#       test-backend-ops on CUDA0 against the CPU backend for our types
#       (SET_ROWS, GET_ROWS, CPY, FLASH_ATTN_EXT), then
#       pyllm-kv bench --shape llama8b --gpu (f16 q8_0 q4_0 kv4 kv3 kv2, depths
#       0/8k/32k/64k, pp2048 + tg64).
#   bash bench/device/gpu_run.sh parity    carry [".carry3"]
#       SmolLM2-135M-Instruct (reassembled from the three carries): the first 32
#       greedy tokens with -ngl 0 (CPU only, -dev none) vs -ngl 99 per K/V pair,
#       with the scheduler's graph-split count; KL divergence against the CPU f16
#       cache's logits (llama-perplexity, ctx 512, 10 chunks) on CPU and CUDA;
#       pyllm-kv generate on the GPU; decode speed of deco4 and squat4 on the
#       shape model.
# Everything lands under $OUT; the log ends with the tables.
set -x
STAGE=${1:?install, test or parity}
LIMIT=${GPU_RUN_LIMIT:-585}
fits() { [ $((SECONDS + $1)) -lt "$LIMIT" ]; }
REPO=$PWD
SRC=/tmp/src/llama_cpp_python-0.3.36
M=/tmp/smollm2.gguf
LOG=$OUT/log.txt
bin_dir() { (cd /tmp && python3 -c 'import pyllm_kv._libs as l; print(l.bin_dir())'); }
# a venv over the system site-packages (numpy, ...); without python3-venv, pip
# installs into the system Python instead
activate() { if [ -f /tmp/venv/bin/activate ]; then . /tmp/venv/bin/activate; else export PIP_BREAK_SYSTEM_PACKAGES=1; fi; }

if [ "$STAGE" = install ]; then
  { nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv; nproc
    python3 --version; cmake --version | head -1; echo "ninja $(ninja --version)"; } > $LOG 2>&1
  mkdir -p /tmp/src && tar xzf .carry1/llama_cpp_python-0.3.36-trim.tgz -C /tmp/src
  cp .carry1/smol.aa /tmp/
  python3 -m venv --system-site-packages /tmp/venv >> $LOG 2>&1 || rm -rf /tmp/venv
  activate
  export PIP_NO_INDEX=1 PIP_FIND_LINKS=$REPO/.carry1/wheels PYLLM_KV_LLAMA_SRC=$SRC SKBUILD_BUILD_DIR=/tmp/b \
         CMAKE_BUILD_PARALLEL_LEVEL=16
  ( time CMAKE_ARGS="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90" python3 -m pip install -v . ) > $OUT/pip.log 2>&1
  echo "pip install rc=$? at ${SECONDS}s" >> $LOG
  { grep -E "error|Error" $OUT/pip.log | grep -v "Werror\|error_\|_error\|errors\.\|-Wno" | head -20
    grep -E "Successfully installed|^real" $OUT/pip.log; } >> $LOG
  B=$(bin_dir); echo "bin: $B" >> $LOG; ls $B >> $LOG
  timeout 120 $B/pkv-cuda-test 20261203 >> $LOG 2>&1; echo "pkv-cuda-test rc=$?" >> $LOG
  (cd /tmp && pyllm-kv formats) >> $LOG 2>&1
elif [ "$STAGE" = test ]; then
  activate
  cp .carry2/smol.ab /tmp/
  B=$(bin_dir)
  for op in SET_ROWS GET_ROWS CPY FLASH_ATTN_EXT; do
    fits 200 || break
    timeout 150 $B/test-backend-ops -b CUDA0 -o $op -p 'kv[234]' > $OUT/tbo_$op.log 2>&1
    echo "test-backend-ops $op rc=$?: $(grep -c ' OK' $OUT/tbo_$op.log) OK, $(grep -c 'FAIL' $OUT/tbo_$op.log) FAIL;" \
         "$(grep -E 'tests passed' $OUT/tbo_$op.log)" >> $LOG
    grep -B1 -A3 FAIL $OUT/tbo_$op.log | head -20 >> $LOG
  done
  echo "tests done at ${SECONDS}s" >> $LOG
  (cd /tmp && timeout $((LIMIT - SECONDS - 5)) pyllm-kv bench --shape llama8b --gpu --bandwidth 4800 \
      --formats f16,q8_0,q4_0,kv4,kv3,kv2 --depths 0,8k,32k,64k --pp 2048 --tg 64 --reps 2 --no-progress \
      --json $OUT/bench_gpu.json --plot $OUT/bench_gpu.png) > $OUT/bench_gpu.md 2> $OUT/bench_gpu.err
  echo "bench rc=$? at ${SECONDS}s" >> $LOG
  tail -5 $OUT/bench_gpu.err >> $LOG
  cat $OUT/bench_gpu.md >> $LOG
elif [ "$STAGE" = parity ]; then
  activate
  cat /tmp/smol.aa /tmp/smol.ab .carry3/smol.ac > $M
  echo "model md5 $(md5sum < $M | cut -d' ' -f1) expected $(cat .carry3/smol.md5)" > $LOG
  B=$(bin_dir)
  : > $OUT/parity.txt
  for pair in f16/f16 q4_0/q4_0 kv4/kv4 kv3/kv3 kv2/kv2 kv4/kv2 kv2/kv4 kv4/f16 f16/kv4 q8_0/kv4 q4_0/kv3 \
              deco4/deco4 deco2/deco2 squat4/kv4 squat2/kv2 squat4/squat4; do
    fits 60 || break
    k=${pair%/*}; v=${pair#*/}
    for ngl in 0 99; do
      e=""; [ $ngl = 0 ] && e="-dev none"
      timeout 60 $B/llama-completion -m $M -p "The capital of France is" -n 32 --temp 0 -ctk $k -ctv $v -fa on \
        -ngl $ngl $e -no-cnv -t 8 > /tmp/g_$ngl.txt 2> /tmp/g_$ngl.err
      echo "$pair ngl=$ngl rc=$? $(grep -o 'graph splits = [0-9]*' /tmp/g_$ngl.err | tail -1)" >> $OUT/parity.txt
    done
    if cmp -s /tmp/g_0.txt /tmp/g_99.txt; then echo "$pair: 32 tokens identical" >> $OUT/parity.txt
    else { echo "$pair: DIFFER"; echo "  cpu: $(tr '\n' ' ' < /tmp/g_0.txt)"; echo "  gpu: $(tr '\n' ' ' < /tmp/g_99.txt)"
           grep -i "error\|abort" /tmp/g_99.err | head -3; } >> $OUT/parity.txt; fi
  done
  cat $OUT/parity.txt >> $LOG
  echo "greedy parity done at ${SECONDS}s" >> $LOG
  P="-m $M -f .carry3/corpus.txt -c 512 --chunks 10 -fa on -t 16"
  timeout 120 $B/llama-perplexity $P -ngl 0 -dev none -ctk f16 -ctv f16 --kl-divergence-base /tmp/base.kld > $OUT/kld_base.log 2>&1
  echo "CPU f16 base rc=$?" >> $LOG
  : > $OUT/kld.txt
  for t in f16 q8_0 q4_0 kv4 kv3 kv2 deco4 deco2 squat4 squat2; do
    for ngl in 0 99; do
      [ $t = f16 ] && [ $ngl = 0 ] && continue
      fits 100 || break 2
      e=""; [ $ngl = 0 ] && e="-dev none"
      timeout 90 $B/llama-perplexity $P -ngl $ngl $e -ctk $t -ctv $t --kl-divergence-base /tmp/base.kld --kl-divergence > /tmp/k.log 2>&1
      echo "$t ngl=$ngl rc=$? | $(grep -E '^Mean +PPL\(Q\)' /tmp/k.log | head -1) | $(grep -E '^Mean +KLD' /tmp/k.log | head -1) | $(grep -E '^Same top p' /tmp/k.log | head -1)" >> $OUT/kld.txt
    done
  done
  cat $OUT/kld.txt >> $LOG
  echo "KLD done at ${SECONDS}s" >> $LOG
  (cd /tmp && timeout 60 pyllm-kv generate --model $M --cache-k squat4 --cache-v kv4 --ngl 99 --temp 0 -n 24 \
      "The capital of France is") >> $LOG 2>&1
  echo "pyllm-kv generate (GPU, squat4/kv4) rc=$?" >> $LOG
  SM=$(ls ~/.cache/pyllm-kv/shape-models/*.gguf 2>/dev/null | head -1)
  for t in deco4 squat4; do
    [ -n "$SM" ] && fits 90 || break
    timeout $((LIMIT - SECONDS - 5)) $B/llama-bench -m $SM -ngl 99 -fa 1 -ctk $t -ctv kv4 -p 0 -n 64 -r 2 -d 0,32768 -o md \
      2>> $OUT/bench_side.err | grep "^|" >> $OUT/bench_side.md
  done
  cat $OUT/bench_side.md >> $LOG 2>/dev/null
fi
echo "done at ${SECONDS}s" >> $LOG
cat $LOG
