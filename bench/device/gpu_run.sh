#!/bin/bash
# pyllm-kv on the GPU machine (no network, at most 64 MiB carried per call, 10 min
# per call, /tmp survives only while the machine stays warm: make the calls back to
# back). Fill the carries first: bench/device/prepare_carries.sh.
#
#   bash bench/device/gpu_run.sh build     carry [".carry1"]
#       CUDA build of the libraries and tools (cmake + ninja -j16 into /tmp/b, the
#       pinned upstream from the carried trimmed sdist), the Python layer and
#       wheels for the machine's Python; then the export table of libggml-cuda,
#       pkv-cuda-test (CUDA encoders vs the C reference) and test-backend-ops on
#       CUDA0 vs the CPU for our types (SET_ROWS, GET_ROWS, CPY; FLASH_ATTN_EXT at
#       head size 256 and a sample of the rest).
#   (or carry [".carry9"]: the same from a build made here, bench/device/pack_prebuilt.sh;
#    then `gpu_run.sh smol1` with carry [".carry1"] before `py`)
#   bash bench/device/gpu_run.sh enc       carry [".carry7"]   (no build: pkv-cuda-test A/B of encoders)
#   bash bench/device/gpu_run.sh py        carry [".carry2"]
#       SmolLM2 reassembled; pytest tests/test_gpu.py, test_rpc.py (layers on a CUDA
#       ggml-rpc-server vs the local GPU) and the rest (Python API with every layer
#       on the GPU: generate/chat/state, KLD GPU vs CPU, iSWA side state) and
#       tests/test_exports.py; the CUDA-vs-CPU KLD experiment with and without
#       upstream's Hadamard rotation (llama-perplexity, LLAMA_ATTN_ROT_DISABLE).
#   bash bench/device/gpu_run.sh gemma     carry [".carry3"] .. [".carry6"], [".carry8"], one per call (warm)
#       Gemma-3-270M reassembled in /tmp, then pyllm-kv eval on the GPU (ctx 512, 2048).
#   bash bench/device/gpu_run.sh fit       (no carry; after build)
#       squat4's depth-0 prefill: pp2048 of kv4 and squat4 with every SQuat head fit timed.
#   bash bench/device/gpu_run.sh prof      (no carry; after build)
#       decode tg32 at one depth with CUDA graphs on/off, nsys kernel/API sums.
#   bash bench/device/gpu_run.sh bench     (no carry)
#       llama-bench, Llama-8B shape (random Q4_0 weights), FA on:
#       tg64 and pp2048 at depths $DEPTHS for f16, q4_0 and $FORMATS (K/V pairs),
#       with the graph-split count of each pair (GGML_SCHED debug).
# Everything lands under $OUT; log.txt ends with the tables.
set -x
STAGE=${1:?build, py or bench}
LIMIT=${GPU_RUN_LIMIT:-585}
REPO=$PWD
M=/tmp/smollm2.gguf
LOG=$OUT/log.txt
. "$REPO/bench/device/device_env.sh"   # B, SRC and the library paths
# the machine's cmake and ninja may be pip shims: put the real binaries first on PATH
for m in ninja cmake; do
  d=$(python3 -c "import os, $m; print(os.path.join(os.path.dirname($m.__file__), 'data', 'bin'))" 2>/dev/null)
  [ -x "$d/$m" ] && export PATH=$d:$PATH
done

if [ "$STAGE" = build ]; then
  { nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv; nproc; python3 --version; } > $LOG 2>&1
  if [ -f .carry9/cuda-prebuilt.tar.gz ]; then
    # built on the dev machine (bench/device/pack_prebuilt.sh): no device minute spent compiling
    mkdir -p $B /tmp/src && tar xzf .carry9/cuda-prebuilt.tar.gz -C $B && tar xzf .carry9/llama_cpp_py.tgz -C /tmp/src
    python3 -m pip install -q --no-index --find-links .carry9/wheels diskcache cffi gguf jinja2 tqdm \
        typing-extensions pytest >> $LOG 2>&1
    ldd $B/bin/libggml-cuda.so | grep -E "not found|cublas|cudart" >> $LOG
    read -r built_commit built_hash < .carry9/BUILD_INFO
    now_hash=$(bash bench/device/sources_hash.sh)
    echo "prebuilt build of $built_commit; sources $([ "$built_hash" = "$now_hash" ] && echo same || echo "CHANGED since (rebuild it)")" >> $LOG
  else
    mkdir -p /tmp/src && tar xzf .carry1/llama_cpp_python-0.3.36-trim.tgz -C /tmp/src
    cp .carry1/smol.aa /tmp/
    python3 -m pip install -q --no-index --find-links .carry1/wheels diskcache cffi gguf jinja2 tqdm \
        typing-extensions pytest >> $LOG 2>&1
    cmake -S . -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
      -DPYLLM_KV_UPSTREAM_TESTS=ON -DPYLLM_KV_LLAMA_SRC=$SRC > /tmp/cfg.log 2>&1 || { tail -20 /tmp/cfg.log >> $LOG; exit 1; }
    ( time ninja -C $B -j16 llama pyllm_kv_native llama-bench llama-perplexity llama-completion test-backend-ops pkv-cuda-test ggml-rpc-server ) > /tmp/build.log 2>&1
    echo "build rc=$? at ${SECONDS}s" >> $LOG; tail -4 /tmp/build.log >> $LOG
    grep -E "error" /tmp/build.log | head -10 >> $LOG
    cp $B/native/libpyllm_kv_native.so $B/bin/ 2>> $LOG
  fi
  echo "libggml-cuda exports: $(nm -D --defined-only $B/bin/libggml-cuda.so | wc -l) symbols," \
       "$(nm -D --defined-only $B/bin/libggml-cuda.so | grep -v ' ggml_\| gguf_' | wc -l) outside ggml_/gguf_" >> $LOG
  timeout 120 $B/bin/pkv-cuda-test 20261207 > $OUT/pkv_cuda_test.log 2>&1
  echo "pkv-cuda-test rc=$?: $(tail -1 $OUT/pkv_cuda_test.log)" >> $LOG
  grep -E "^timing|FAIL" $OUT/pkv_cuda_test.log >> $LOG
  # the Python API on the GPU on random-weight models (no real model here yet)
  export PYLLM_KV_CORPUS=/nonexistent
  [ -n "$SKIP_SMOKE" ] || (timeout 150 python3 bench/device/gpu_smoke.py) > $OUT/gpu_smoke.log 2>&1
  echo "gpu_smoke rc=$? at ${SECONDS}s" >> $LOG; grep -E "gguf|FAILED|Error" $OUT/gpu_smoke.log | head -20 >> $LOG
  ours='(kv[234]|squat[234]|deco[234])'
  # TBO_OPS: which of these to run (default all; a speed round may keep SET_ROWS GET_ROWS)
  for spec in "SET_ROWS|type=$ours" "GET_ROWS|type=$ours" "CPY|$ours" "FLASH_ATTN_EXT|hsk=256,.*$ours" \
              "FLASH_ATTN_EXT|hsk=128,.*nb=1,.*type_K=$ours"; do
    case " ${TBO_OPS:-SET_ROWS GET_ROWS CPY FLASH_ATTN_EXT} " in *" ${spec%%|*} "*) ;; *) continue ;; esac
    op=${spec%%|*}; pat=${spec#*|}
    [ $((SECONDS + 40)) -lt "$LIMIT" ] || break
    timeout $((LIMIT - SECONDS - 10)) $B/bin/test-backend-ops -b CUDA0 -o $op -p "$pat" > /tmp/tbo.log 2>&1
    echo "test-backend-ops $op /$pat/ rc=$?: $(grep -c ' OK' /tmp/tbo.log) OK, $(grep -c 'FAIL' /tmp/tbo.log) FAIL;" \
         "$(grep -E 'tests passed' /tmp/tbo.log)" >> $LOG
    grep -B1 -A3 FAIL /tmp/tbo.log | head -20 >> $LOG
  done
  # then as much of the bench as fits (the py stage runs the rest)
  [ $((SECONDS + 90)) -lt "$LIMIT" ] && FORMATS=${FORMATS:-f16/f16 kv4/kv4 squat4/kv4 deco4/kv4 q4_0/q4_0} \
      GPU_RUN_LIMIT=$((LIMIT - SECONDS)) bash bench/device/gpu_run.sh bench-only
elif [ "$STAGE" = enc ]; then
  # CUDA encoder A/B with no build at all: carry [".carry7"] (pkv-cuda-test binaries built here with
  # nvcc, e.g. one per branch, and the libpyllm_kv_native.so they link): correctness vs the C
  # reference and us per launch, twice each. Building one here (~30 s):
  #   cp build/*/native/libpyllm_kv_native.so .carry7/ && nvcc -std=c++17 -arch=sm_90 -O3 -use_fast_math \
  #     -Inative/include -Inative/cuda native/tests/cuda_codec_test.cu native/cuda/pkv_codec.cu native/cuda/pkv_fit.cu \
  #     -L.carry7 -lpyllm_kv_native -Xlinker -rpath='$ORIGIN' -o .carry7/pkv-cuda-test-NAME
  nvidia-smi --query-gpu=name --format=csv,noheader > $LOG
  for b in .carry7/pkv-cuda-test*; do
    for r in 1 2; do
      echo "== $b run $r" >> $LOG
      LD_LIBRARY_PATH=$PWD/.carry7:$LD_LIBRARY_PATH timeout 60 $b 20261207 2>&1 | grep -E "timing|passed|FAIL" >> $LOG
    done
  done
  cat $LOG
elif [ "$STAGE" = smol1 ]; then
  # after a prebuilt build (.carry9): the model's first part, carry [".carry1"]
  cp .carry1/smol.aa /tmp/ && echo "smol.aa in /tmp" > $LOG
elif [ "$STAGE" = py ]; then
  # the second part travels gzipped (the working tree plus it must stay under 64 MiB)
  { cat /tmp/smol.aa; if [ -f .carry2/smol.ab.gz ]; then zcat .carry2/smol.ab.gz; else cat .carry2/smol.ab; fi; } > $M
  echo "model md5 $(md5sum < $M | cut -d' ' -f1) expected $(cat .carry2/smol.md5)" > $LOG
  cp .carry2/devil.dict.dz /tmp/
  export PYLLM_KV_TEST_MODEL=$M PYLLM_KV_CORPUS=/tmp/devil.dict.dz
  python3 -c "import pyllm_kv.corpus as c, sys; sys.stdout.write(c.load_text()[:120000])" > /tmp/corpus.txt
  (timeout 330 python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py tests/test_exports.py tests/test_rpc.py tests/test_squat_set_rows.py -s) > $OUT/pytest_gpu.log 2>&1
  echo "pytest rc=$? at ${SECONDS}s" >> $LOG; grep -E "KLD|passed|failed|FAILED|Error" $OUT/pytest_gpu.log | tail -25 >> $LOG
  # CUDA-vs-CPU KLD of quantized caches: upstream's Hadamard rotation on or off
  P=$B/bin/llama-perplexity
  for dev in cpu gpu; do
    ngl=0; [ $dev = gpu ] && ngl=99
    timeout 60 $P -m $M -f /tmp/corpus.txt -c 512 --chunks 10 -fa on -ngl $ngl -ctk f16 -ctv f16 \
        --kl-divergence-base /tmp/base_$dev.kld > /dev/null 2>&1
    for rot in 0 1; do
      for t in q4_0 kv4; do
        [ $((SECONDS + 40)) -lt "$LIMIT" ] || break
        r=$(LLAMA_ATTN_ROT_DISABLE=$rot timeout 60 $P -m $M -f /tmp/corpus.txt -c 512 --chunks 10 -fa on -ngl $ngl \
            -ctk $t -ctv $t --kl-divergence-base /tmp/base_$dev.kld --kl-divergence 2>&1 | grep -E "^Mean +KLD" | head -1)
        echo "KLD $dev rot_disable=$rot $t: $r" >> $LOG
      done
    done
  done
  [ $((SECONDS + 90)) -lt "$LIMIT" ] && GPU_RUN_LIMIT=$((LIMIT - SECONDS)) bash bench/device/gpu_run.sh bench-only
elif [ "$STAGE" = gemma ]; then
  # Gemma-3-270M (iSWA, head_dim 256) arrives in five 52 MiB carries (.carry3-6, .carry8,
  # one per call while the machine stays warm: the working tree travels too and the
  # limit is 64 MiB); once all are in /tmp, the GPU eval.
  for c in .carry3 .carry4 .carry5 .carry6 .carry8; do [ -d $c ] && cp $c/gemma.* /tmp/; done
  ls /tmp/gemma.part* > $LOG 2>&1
  if [ -f /tmp/gemma.part4 ] && [ -f /tmp/gemma.md5 ]; then
    cat /tmp/gemma.part0 /tmp/gemma.part1 /tmp/gemma.part2 /tmp/gemma.part3 /tmp/gemma.part4 > /tmp/gemma.gguf
    echo "gemma md5 $(md5sum < /tmp/gemma.gguf | cut -d' ' -f1) expected $(cat /tmp/gemma.md5)" >> $LOG
    [ -f /tmp/devil.dict.dz ] && export PYLLM_KV_CORPUS=/tmp/devil.dict.dz
    for ctx in 512 2048; do
      [ $((SECONDS + 60)) -lt "$LIMIT" ] || break
      (timeout $((LIMIT - SECONDS - 20)) python3 -m pyllm_kv.cli eval -m /tmp/gemma.gguf --ngl -1 --ctx $ctx --chunks 3 \
          --formats ${GEMMA_FORMATS:-f16,q4_0,kv4,squat4,deco4,kv3,squat3} --no-progress \
          --json $OUT/gemma_gpu_ctx$ctx.json) > $OUT/gemma_gpu_ctx$ctx.txt 2>&1
      echo "gemma GPU eval ctx $ctx rc=$? at ${SECONDS}s" >> $LOG; tail -14 $OUT/gemma_gpu_ctx$ctx.txt >> $LOG
    done
  fi
  cat $LOG
elif [ "$STAGE" = fit ]; then
  # Where squat4's depth-0 prefill goes (no carry; after build): pp2048 of kv4 and
  # squat4 with every SQuat head fit timed (PYLLM_KV_FIT_TRACE=1, one line per head):
  # the fits' arithmetic against the prefill's extra time over kv4.
  [ -f /tmp/shape.gguf ] || python3 bench/make_shape_model.py --preset ${SHAPE:-llama8b} --out /tmp/shape.gguf > /tmp/shape.log 2>&1
  for kv in kv4/kv4 squat4/kv4; do
    k=${kv%/*}; v=${kv#*/}
    PYLLM_KV_FIT_TRACE=1 timeout 120 $B/bin/llama-bench -m /tmp/shape.gguf -ngl 99 -fa 1 -ctk $k -ctv $v \
        -p 2048 -n 0 -r 3 -o md > /tmp/fit_$k.md 2> /tmp/fit_$k.err
    echo "== $kv: $(grep pp2048 /tmp/fit_$k.md)" >> $LOG
    grep "pyllm-kv fit" /tmp/fit_$k.err > $OUT/fit_trace_$k.txt
    awk '{n++; s+=$(NF-1); if ($(NF-1) > mx) mx = $(NF-1)} END {if (n) printf "   %d head fits (warm-up + 3 reps), %.1f ms in all, max %.3f ms\n", n, s, mx}' \
        $OUT/fit_trace_$k.txt >> $LOG
  done
  cat $LOG
elif [ "$STAGE" = prof ]; then
  # Where decode time goes, per K/V pair at depth $PROF_DEPTH: tg32 with CUDA
  # graphs on and off (a pair that cannot use graphs shows no difference), then
  # nsys's per-kernel and per-API sums (or ncu's per-kernel summary without nsys).
  [ -f /tmp/shape.gguf ] || python3 bench/make_shape_model.py --preset ${SHAPE:-llama8b} --out /tmp/shape.gguf > /tmp/shape.log 2>&1
  NSYS=$(command -v nsys || ls /opt/nvidia/nsight-systems/*/bin/nsys /usr/local/cuda/bin/nsys 2>/dev/null | head -1)
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
  echo "nsys=$NSYS ncu=$NCU" >> $LOG
  for kv in ${PROF_FORMATS:-kv4/kv4 squat4/kv4}; do
    k=${kv%/*}; v=${kv#*/}
    [ $((SECONDS + 60)) -lt "$LIMIT" ] || break
    for g in 0 1; do
      r=$(GGML_CUDA_DISABLE_GRAPHS=$g timeout 90 $B/bin/llama-bench -m /tmp/shape.gguf -ngl 99 -fa 1 -ctk $k -ctv $v \
          -p 0 -n 32 -d ${PROF_DEPTH:-8192} -r 1 -o csv 2>/dev/null | tail -1 | awk -F, '{print $(NF-1)}')
      echo "prof $kv graphs_disabled=$g tg32@${PROF_DEPTH:-8192}: $r tok/s" >> $LOG
    done
    if [ -n "$NSYS" ]; then
      timeout 120 $NSYS profile -t cuda -o /tmp/prof_${k}_${v} --force-overwrite true $B/bin/llama-bench -m /tmp/shape.gguf \
          -ngl 99 -fa 1 -ctk $k -ctv $v -p 0 -n 32 -d ${PROF_DEPTH:-8192} -r 1 > /dev/null 2>&1
      timeout 60 $NSYS stats -q --report cuda_gpu_kern_sum,cuda_api_sum --format csv -o /tmp/stats_${k}_${v} \
          /tmp/prof_${k}_${v}.nsys-rep > /dev/null 2>&1
      cp /tmp/stats_${k}_${v}*.csv $OUT/ 2>/dev/null
      for f in /tmp/stats_${k}_${v}*kern_sum*.csv; do echo "-- $kv top kernels:"; head -12 "$f" | cut -c1-220; done >> $LOG
      for f in /tmp/stats_${k}_${v}*api_sum*.csv; do echo "-- $kv top API:"; head -8 "$f" | cut -c1-160; done >> $LOG
    elif [ -n "$NCU" ]; then
      timeout 150 $NCU --kernel-name regex:"set_rows|fattn|squat" -c 40 --print-summary per-kernel $B/bin/llama-bench \
          -m /tmp/shape.gguf -ngl 99 -fa 1 -ctk $k -ctv $v -p 0 -n 4 -d 512 -r 1 > $OUT/ncu_${k}_${v}.txt 2>&1
      grep -E "set_rows|squat|Duration" $OUT/ncu_${k}_${v}.txt | head -20 >> $LOG
    fi
  done
  cat $LOG
elif [ "$STAGE" = bench ] || [ "$STAGE" = bench-only ]; then
  FORMATS=${FORMATS:-f16/f16 q4_0/q4_0 kv4/kv4 squat4/kv4 deco4/kv4}
  DEPTHS=${DEPTHS:-0,8192,32768}
  [ "$STAGE" = bench ] && nvidia-smi --query-gpu=name --format=csv,noheader > $LOG
  [ -f /tmp/shape.gguf ] || python3 bench/make_shape_model.py --preset ${SHAPE:-llama8b} --out /tmp/shape.gguf \
      > /tmp/shape.log 2>&1 || tail -3 /tmp/shape.log >> $LOG
  for kv in $FORMATS; do
    k=${kv%/*}; v=${kv#*/}
    [ $((SECONDS + 60)) -lt "$LIMIT" ] || { echo "out of time before $kv" >> $LOG; break; }
    mkdir -p /tmp/bench; [ -f /tmp/bench/${k}_${v}.done ] && continue
    splits=$(timeout 60 $B/bin/llama-bench -v -m /tmp/shape.gguf -ngl 99 -fa 1 -ctk $k -ctv $v -p 0 -n 1 -r 1 2>&1 \
             | grep -m1 -oE "graph[^:]*: nodes = [^,]*, splits = [^,]*")
    timeout 200 $B/bin/llama-bench -m /tmp/shape.gguf -ngl 99 -fa 1 -ctk $k -ctv $v -p ${PP:-2048} -n 64 -d $DEPTHS \
        -r ${REPS:-2} -o md > /tmp/bench/${k}_${v}.md 2> /tmp/bench/${k}_${v}.err
    rc=$?; echo "== $k/$v rc=$rc ($splits) at ${SECONDS}s" >> $LOG
    [ $rc = 0 ] && touch /tmp/bench/${k}_${v}.done
    grep -E "^\|" /tmp/bench/${k}_${v}.md | tail -n +3 >> $LOG
  done
fi
mkdir -p $OUT/bench && cp /tmp/bench/*.md $OUT/bench/ 2>/dev/null
[ "$STAGE" = bench-only ] || cat $LOG
