#!/bin/bash
# pyllm-kv on the GPU machine (no network, at most 64 MiB carried per call, 10 min
# per call, /tmp survives while the machine stays warm: make the three calls back
# to back). Fill the carries first: bench/device/prepare_carries.sh.
#
#   bash bench/device/gpu_run.sh install   carry [".carry1"]
#       CUDA build and install with the README's command,
#       CMAKE_ARGS="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90" pip install .
#       (into the machine's Python venv; pip offline from the carried
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
STAGE=${1:?install, pycheck, test or parity}
LIMIT=${GPU_RUN_LIMIT:-585}
fits() { [ $((SECONDS + $1)) -lt "$LIMIT" ]; }
REPO=$PWD
SRC=/tmp/src/llama_cpp_python-0.3.36
M=/tmp/smollm2.gguf
LOG=$OUT/log.txt
bin_dir() { (cd /tmp && python3 -c 'import pyllm_kv._libs as l; print(l.bin_dir())'); }
# the machine's python3 is already a venv (/opt/torch/.venv, with numpy): install into it
# Its cmake and ninja are pip shims that pip's isolated build env cannot import:
# put the real binaries first on PATH.
activate() {
  export PIP_BREAK_SYSTEM_PACKAGES=1
  local d
  local m d
  for m in ninja cmake; do
    d=$(python3 -c "import os, $m; print(os.path.join(os.path.dirname($m.__file__), 'data', 'bin'))" 2>/dev/null)
    [ -x "$d/$m" ] && export PATH=$d:$PATH
  done
  true
}

if [ "$STAGE" = install ]; then
  { nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv; nproc
    python3 --version; cmake --version | head -1; echo "ninja $(ninja --version)"; } > $LOG 2>&1
  mkdir -p /tmp/src && tar xzf .carry1/llama_cpp_python-0.3.36-trim.tgz -C /tmp/src
  cp .carry1/smol.aa /tmp/
  activate; which cmake ninja >> $LOG
  export PIP_NO_INDEX=1 PIP_FIND_LINKS=$REPO/.carry1/wheels PYLLM_KV_LLAMA_SRC=$SRC SKBUILD_BUILD_DIR=/tmp/b \
         CMAKE_BUILD_PARALLEL_LEVEL=16
  ( time CMAKE_ARGS="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90" python3 -m pip install -v . ) > $OUT/pip.log 2>&1
  echo "pip install rc=$? at ${SECONDS}s" >> $LOG
  { grep -E "error|Error" $OUT/pip.log | grep -v "Werror\|error_\|_error\|errors\.\|-Wno" | head -20
    grep -E "Successfully installed|^real" $OUT/pip.log; } >> $LOG
  B=$(bin_dir); echo "bin: $B" >> $LOG; ls $B >> $LOG
  timeout 120 $B/pkv-cuda-test 20261203 >> $LOG 2>&1; echo "pkv-cuda-test rc=$?" >> $LOG
  (cd /tmp && pyllm-kv formats) >> $LOG 2>&1
elif [ "$STAGE" = pyquick ]; then
  # pycheck on a fresh machine without the full install: CUDA build of libllama only,
  # the Python layer from the carried sdist, pyllm_kv from this tree
  { nvidia-smi --query-gpu=name --format=csv,noheader; } > $LOG 2>&1
  mkdir -p /tmp/src && tar xzf .carry1/llama_cpp_python-0.3.36-trim.tgz -C /tmp/src
  activate
  python3 -m pip install -q --no-index --find-links .carry1/wheels diskcache cffi gguf jinja2 tqdm typing-extensions >> $LOG 2>&1
  cmake -S . -B /tmp/b -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DPYLLM_KV_UPSTREAM_TESTS=OFF -DPYLLM_KV_LLAMA_SRC=$SRC > /tmp/cfg.log 2>&1 || { tail -20 /tmp/cfg.log >> $LOG; cat $LOG; exit 1; }
  ( time ninja -C /tmp/b -j16 llama ) > /tmp/build.log 2>&1; echo "build rc=$? at ${SECONDS}s" >> $LOG
  tail -3 /tmp/build.log >> $LOG
  cp /tmp/b/native/libpyllm_kv_native.so /tmp/b/bin/ 2>> $LOG
  export PYLLM_KV_LIB_DIR=/tmp/b/bin PYTHONPATH=$SRC:$REPO PYLLM_KV_ALLOW_GPU_PYTHON=1
  python3 bench/make_shape_model.py --preset tiny --out /tmp/tiny.gguf > /tmp/tiny.log 2>&1 || tail -3 /tmp/tiny.log >> $LOG
  (cd /tmp && timeout $((LIMIT - SECONDS - 5)) python3 $REPO/bench/device/py_gpu_check.py /tmp/tiny.gguf) >> $LOG 2>&1
elif [ "$STAGE" = pycheck ]; then
  # after install (same warm machine, or chained in one call): the Python API with
  # layers on the GPU, variant by variant, on a tiny random-weight llama
  activate
  python3 bench/make_shape_model.py --preset tiny --out /tmp/tiny.gguf > /tmp/tiny.log 2>&1 || tail -3 /tmp/tiny.log
  timeout 400 python3 bench/device/py_gpu_check.py /tmp/tiny.gguf >> $LOG 2>&1
  if command -v gdb > /dev/null && fits 60; then
    (cd /tmp && timeout 60 gdb -q -batch -ex run -ex bt --args python3 -c "from pyllm_kv import _libs
_libs.llama_cpp().Llama('/tmp/tiny.gguf', n_gpu_layers=99, verbose=True)") 2>&1 | grep -A30 "SIGSEGV" | head -40 >> $LOG
  fi
elif [ "$STAGE" = test ]; then
  activate
  cp .carry2/smol.ab /tmp/
  B=$(bin_dir)
  for op in SET_ROWS GET_ROWS CPY FLASH_ATTN_EXT; do
    [ "${GPU_RUN_TESTS:-1}" = 1 ] && fits 200 || break
    timeout 150 $B/test-backend-ops -b CUDA0 -o $op -p 'kv[234]' > $OUT/tbo_$op.log 2>&1
    echo "test-backend-ops $op rc=$?: $(grep -c ' OK' $OUT/tbo_$op.log) OK, $(grep -c 'FAIL' $OUT/tbo_$op.log) FAIL;" \
         "$(grep -E 'tests passed' $OUT/tbo_$op.log)" >> $LOG
    grep -B1 -A3 FAIL $OUT/tbo_$op.log | head -20 >> $LOG
  done
  echo "tests done at ${SECONDS}s" >> $LOG
  [ "${GPU_RUN_BENCH:-1}" = 1 ] && (cd /tmp && timeout $((LIMIT - SECONDS - 5)) pyllm-kv bench --shape llama8b --gpu --bandwidth 4800 \
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
  # the Python API on the GPU (pyllm_kv.load(..., n_gpu_layers=99) through llama-cpp-python)
  for kv in f16/f16 kv4/kv4 squat4/kv4; do
    (cd /tmp && timeout 60 python3 -X faulthandler -m pyllm_kv -v generate --model $M --cache-k ${kv%/*} --cache-v ${kv#*/} \
        --ngl 99 --temp 0 -n 24 "The capital of France is") > $OUT/py_${kv%/*}.txt 2> $OUT/py_${kv%/*}.err
    rc=$?; echo "pyllm-kv generate --ngl 99 $kv rc=$rc: $(tail -c 300 $OUT/py_${kv%/*}.txt | tr '\n' ' ')" >> $LOG
    if [ $rc != 0 ]; then
      grep -A12 "Fatal Python error\|Current thread" $OUT/py_${kv%/*}.err | head -30 >> $LOG
      command -v gdb > /dev/null && (cd /tmp && timeout 90 gdb -q -batch -ex run -ex bt --args python3 -m pyllm_kv generate \
          --model $M --cache-k ${kv%/*} --cache-v ${kv#*/} --ngl 99 --temp 0 -n 8 "The capital of France is") 2>&1 | grep -A25 "SIGSEGV" | head -40 >> $LOG
    fi
  done
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
    echo "$pair: leading words identical CPU vs CUDA: $(python3 -c 'import sys
a, b = (open(f).read().split() for f in sys.argv[1:])
n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
print("%d of %d" % (n, max(len(a), len(b))))' /tmp/g_0.txt /tmp/g_99.txt)" >> $OUT/parity.txt
    if cmp -s /tmp/g_0.txt /tmp/g_99.txt; then echo "$pair: 32 tokens identical" >> $OUT/parity.txt
    else { echo "$pair: DIFFER"; echo "  cpu: $(tr '\n' ' ' < /tmp/g_0.txt)"; echo "  gpu: $(tr '\n' ' ' < /tmp/g_99.txt)"
           grep -i "error\|abort" /tmp/g_99.err | head -3; } >> $OUT/parity.txt; fi
  done
  cat $OUT/parity.txt >> $LOG
  echo "greedy parity done at ${SECONDS}s" >> $LOG
  P="-m $M -f .carry3/corpus.txt -c 512 --chunks 10 -fa on -t 16"
  # KLD of each cache type against the f16 cache of the same backend (CPU: -ngl 0 -dev none;
  # CUDA: -ngl 99), and of CUDA f16 against CPU f16 (the backends' own difference)
  timeout 120 $B/llama-perplexity $P -ngl 0 -dev none -ctk f16 -ctv f16 --kl-divergence-base /tmp/base_0.kld > $OUT/kld_base_0.log 2>&1
  timeout 120 $B/llama-perplexity $P -ngl 99 -ctk f16 -ctv f16 --kl-divergence-base /tmp/base_99.kld > $OUT/kld_base_99.log 2>&1
  echo "f16 bases rc=$?" >> $LOG
  kld() {  # type ngl base
    local e=""; [ $2 = 0 ] && e="-dev none"
    timeout 90 $B/llama-perplexity $P -ngl $2 $e -ctk $1 -ctv $1 --kl-divergence-base /tmp/base_$3.kld --kl-divergence > /tmp/k.log 2>&1
    echo "$1 ngl=$2 vs f16 ngl=$3 rc=$? | $(grep -E '^Mean +PPL\(Q\)' /tmp/k.log | head -1) | $(grep -E '^Mean +KLD' /tmp/k.log | head -1) | $(grep -E '^Same top p' /tmp/k.log | head -1)" >> $OUT/kld.txt
  }
  : > $OUT/kld.txt
  kld f16 99 0
  for t in q8_0 q4_0 kv4 kv3 kv2 deco4 deco3 deco2 squat4 squat3 squat2; do
    fits 60 || break
    kld $t 0 0
    kld $t 99 99
  done
  cat $OUT/kld.txt >> $LOG
  echo "KLD done at ${SECONDS}s" >> $LOG
  SM=$(ls ~/.cache/pyllm-kv/shape-models/*.gguf 2>/dev/null | head -1)
  if [ -z "$SM" ] && fits 150; then
    python3 bench/make_shape_model.py --preset llama8b --out /tmp/shape8b.gguf > /tmp/shape.log 2>&1 && SM=/tmp/shape8b.gguf
  fi
  for t in deco4 squat4; do
    [ -n "$SM" ] && fits 90 || break
    timeout $((LIMIT - SECONDS - 5)) $B/llama-bench -m $SM -ngl 99 -fa 1 -ctk $t -ctv kv4 -p 0 -n 64 -r 2 -d 0,32768 -o md \
      2>> $OUT/bench_side.err | grep "^|" >> $OUT/bench_side.md
  done
  cat $OUT/bench_side.md >> $LOG 2>/dev/null
  # profiler: our kv4/kv4 decode kernel (and the combine) at depth 32k on the shape model
  NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  if [ -n "$NCU" ] && [ -n "$SM" ] && fits 120; then
    timeout $((LIMIT - SECONDS - 5)) $NCU --clock-control none --set basic --section WarpStateStats --section SchedulerStats \
      --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis -k regex:'k_fattn_decode|k_fattn_combine' -s 64 -c 2 \
      $B/llama-bench -m $SM -ngl 99 -fa 1 -ctk kv4 -ctv kv4 -p 0 -n 4 -r 1 -d 32768 > $OUT/ncu.txt 2>&1
    echo "ncu rc=$? at ${SECONDS}s" >> $LOG
  fi
fi
echo "done at ${SECONDS}s" >> $LOG
cat $LOG
