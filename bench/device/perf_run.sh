#!/bin/bash
# Decode-speed run for the CUDA kernels of our types, all in ONE device call
# (carry [".carry1"], timeout_s 600; bench/device/prepare_carries.sh fills .carry1):
#   1. CUDA build of llama-bench + test-backend-ops under /tmp (sm_90, -lineinfo);
#   2. test-backend-ops on CUDA0 vs CPU: FLASH_ATTN_EXT and SET_ROWS for kv2/kv3/kv4,
#      then FLASH_ATTN_EXT at head size 128 again with PKV_CUDA_FA_TPC=1000 (the
#      warp-tiled kernel with one chunk: direct write, several tiles per warp),
#      PKV_CUDA_FA_TPC=5 (uneven chunks) and PKV_CUDA_FA_NS=2 (2-stage variant);
#   3. Llama-8B-shaped random Q4_0 model (bench/make_shape_model.py);
#   4. llama-bench decode (-p 0 -n 64 -r 2, -fa 1, -ngl 99, K and V the same type):
#      PERF_PLAN = ';'-separated "label|ENV=VAL ...|type|depths" entries (default:
#      f16, q4_0, kv4, kv3, kv2 at PERF_DEPTHS (0,8192,32768), and kv4 with
#      PKV_CUDA_FA_V3=0, the previous kernels, at 32768 for A/B); PERF_PLAN2: more
#      entries, run after the profiles of step 5;
#   5. ncu (clocks left alone, stall details) on our decode + combine kernels at
#      depth PERF_NCU_DEPTH (default 32768; the warmup token at depth 0 makes 32
#      launches of the decode kernel first) and the SASS of the warp-tiled kv4/kv4
#      kernel; optional (PERF_NCU_F16=1) upstream's f16 vec kernel likewise, and
#      (PERF_DUR=1) per-kernel GPU time of one decode token at depth 0.
# Stages are skipped once the call's time would run out (elapsed $SECONDS vs PERF_LIMIT).
# Runs (H100 SXM, 2026-11-23): 5bfdd88 full build 352 s, all done at 517 s; the
# warp-tiled kernel's first run built in 249 s, tests to 285 s, 7 benches + ncu at 336 s.
# (Archiving /tmp/b for the next call was tried: 86 MB of xz, over the 64 MiB a call returns.)
# Everything lands in at most 8 files under $OUT; the last lines printed are the table.
set -x
LIMIT=${PERF_LIMIT:-575}
fits() { [ $((SECONDS + $1)) -lt "$LIMIT" ]; }
B=/tmp/b/bin
SRC=/tmp/src/llama_cpp_python-0.3.36
M=/tmp/shape8b.gguf
R=/tmp/perf; mkdir -p $R
LOG=$OUT/log.txt
TGZ=.carry1/llama_cpp_python-0.3.36-trim.tgz

{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv; nproc; } > $LOG 2>&1
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
CUOBJDUMP=$(command -v cuobjdump || ls /usr/local/cuda/bin/cuobjdump 2>/dev/null | head -1)
echo "ncu: $NCU tgz: $TGZ pwd: $(pwd)" >> $LOG

[ -d $SRC ] || { mkdir -p /tmp/src && tar xzf "$TGZ" -C /tmp/src; }
if [ ! -x $B/llama-bench ] || [ ! -x $B/test-backend-ops ] || [ "${PERF_REBUILD:-1}" = 1 ]; then
  cfg() { cmake -S . -B /tmp/b -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DPYLLM_KV_UPSTREAM_TESTS=ON -DPYLLM_KV_LLAMA_SRC=$SRC -DCMAKE_CUDA_FLAGS=-lineinfo > $R/cfg.log 2>&1; }
  cfg || { tail -30 $R/cfg.log; exit 1; }
  ( time ninja -C /tmp/b -j16 llama-bench test-backend-ops ) > $R/build.log 2>&1 || { grep -n -A5 "error" $R/build.log | head -60; exit 1; }
fi
{ grep -c "Building" $R/build.log; tail -4 $R/build.log; echo "built at ${SECONDS}s"; } | tee -a $LOG

# ---- correctness of our kernels against the CPU
tbo() {  # label, env, op, filter
  fits 100 || return
  env $2 timeout 120 $B/test-backend-ops -b CUDA0 -o $3 -p "$4" > $R/tbo_$1.log 2>&1; local rc=$?
  { echo "== $1 ($2 $3 $4) rc=$rc: $(grep -c 'OK' $R/tbo_$1.log) OK, $(grep -c 'FAIL' $R/tbo_$1.log) FAIL"
    grep -E "tests passed|backends passed" $R/tbo_$1.log
    grep -B1 -A2 "FAIL" $R/tbo_$1.log | head -24; } >> $LOG
}
tbo fa "" FLASH_ATTN_EXT 'kv[234]'
tbo setrows "" SET_ROWS 'kv[234]'
tbo fa_direct "PKV_CUDA_FA_TPC=1000" FLASH_ATTN_EXT 'hsk=128.*kv[234]'
tbo fa_tpc5 "PKV_CUDA_FA_TPC=5" FLASH_ATTN_EXT 'hsk=128.*kv[234]'
tbo fa_ns2 "PKV_CUDA_FA_NS=2" FLASH_ATTN_EXT 'hsk=128.*kv[234]'
echo "tests done at ${SECONDS}s" >> $LOG

# ---- SASS of the warp-tiled kernel (kv4/kv4) and every instance's resources
O=$(find /tmp/b -name 'pkv_fattn_k4.cu.o' | head -1)
if [ -n "$CUOBJDUMP" ] && [ -n "$O" ]; then
  { $CUOBJDUMP -res-usage "$O" 2>&1 | grep -A1 "decode3"
    $CUOBJDUMP -sass -fun '_ZN3pkv3fa315k_fattn_decode3ILi4ELi4ELi3EEEvNS_10fa_kparamsE' "$O"; } > $OUT/sass.txt 2>&1
fi

G=$SRC/vendor/llama.cpp/gguf-py
[ -f $M ] || PYTHONPATH=$G python3 bench/make_shape_model.py --preset llama8b --out $M > $R/model.log 2>&1 || { tail $R/model.log; exit 1; }

# ---- decode speed
bench() {  # label, envs, type, depths
  fits 45 || { echo "skip $1 (time)" >> $LOG; return; }
  env $2 timeout $((LIMIT - SECONDS - 5)) $B/llama-bench -m $M -ngl 99 -fa 1 -ctk $3 -ctv $3 -p 0 -n 64 -r 2 -d $4 -o csv \
    > $R/bench_$1.csv 2>> $R/bench_err.log
  echo "bench $1 rc=$? at ${SECONDS}s" >> $LOG
}
D=${PERF_DEPTHS:-0,8192,32768}
PLAN=${PERF_PLAN:-"f16||f16|$D;kv4||kv4|$D;kv2||kv2|$D;kv3||kv3|$D;q4_0||q4_0|$D;kv4-v2|PKV_CUDA_FA_V3=0|kv4|32768"}
NCUD=${PERF_NCU_DEPTH:-32768}
run_plan() {
  local e lab envs typ deps
  IFS=';' read -ra ENTRIES <<< "$1"
  for e in "${ENTRIES[@]}"; do
    IFS='|' read -r lab envs typ deps <<< "$e"
    bench "$lab" "$envs" "$typ" "$deps"
  done
}
run_plan "$PLAN"

# ---- profiler: our decode + combine at depth NCUD, upstream f16 vec kernel likewise
NCUF="--clock-control none --set basic --section WarpStateStats --section MemoryWorkloadAnalysis --section SchedulerStats"
NCUK="$NCUF --section InstructionStats --section SourceCounters --section LaunchStats --section Occupancy"
if [ -n "$NCU" ] && [ "${PERF_NCU:-1}" = 1 ] && fits 50; then
  # -s 64: the warmup token at depth 0 makes 32 direct-write launches (no combine), then
  # decode + combine alternate at depth NCUD
  ncu_run() { timeout $((LIMIT - SECONDS - 5)) $NCU $NCUK "$@" -k regex:'k_fattn_decode|k_fattn_combine' -s 64 -c 2 \
    $B/llama-bench -m $M -ngl 99 -fa 1 -ctk ${PERF_NCU_TYPE:-kv4} -ctv ${PERF_NCU_TYPE:-kv4} -p 0 -n 4 -r 1 -d $NCUD > $OUT/ncu.txt 2>&1; }
  ncu_run --print-details all || ncu_run
  echo "ncu rc=$? at ${SECONDS}s" >> $LOG
fi
if [ -n "$NCU" ] && [ "${PERF_NCU_F16:-0}" = 1 ] && fits 50; then
  timeout $((LIMIT - SECONDS - 5)) $NCU $NCUF -k regex:'flash_attn_ext_vec|flash_attn_combine' -s 40 -c 2 \
    $B/llama-bench -m $M -ngl 99 -fa 1 -ctk f16 -ctv f16 -p 0 -n 4 -r 1 -d $NCUD >> $OUT/ncu.txt 2>&1
  echo "ncu f16 rc=$? at ${SECONDS}s" >> $LOG
fi
# PERF_PLAN2: more benches, after the profiles
[ -n "$PERF_PLAN2" ] && run_plan "$PERF_PLAN2"
# per-kernel GPU time of decode at depth 0 (warmup token + 1 token)
: > $R/dur.csv
for t in kv4 f16; do
  if [ -n "$NCU" ] && [ "${PERF_DUR:-0}" = 1 ] && fits 40; then
    echo "== $t" >> $R/dur.csv
    timeout $((LIMIT - SECONDS - 5)) $NCU --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
      $B/llama-bench -m $M -ngl 99 -fa 1 -ctk $t -ctv $t -p 0 -n 1 -r 1 -d 0 >> $R/dur.csv 2>/dev/null
    echo "ncu dur $t rc=$? at ${SECONDS}s" >> $LOG
  fi
done

python3 - "$R" > $R/summary.txt 2>&1 <<'EOF'
import csv, glob, io, os, sys, collections
R = sys.argv[1]
rows = {}
for f in sorted(glob.glob(os.path.join(R, "bench_*.csv"))):
    label = os.path.basename(f)[6:-4]
    for r in csv.DictReader(open(f)):
        try:
            rows[(label, int(r["n_depth"]))] = (float(r["avg_ts"]), float(r["stddev_ts"]))
        except (KeyError, ValueError):
            pass
labels = sorted({l for l, _ in rows}, key=lambda l: (l.split("-")[0] != "f16", l))
depths = sorted({d for _, d in rows})
print("decode tok/s (llama-bench -p 0 -n 64 -r 2 -fa 1 -ngl 99, K=V type), ratio to f16 / to q4_0 at the same depth")
print("%-12s" % "type" + "".join("%30s" % ("d=%d" % d) for d in depths))
for l in labels:
    line = "%-12s" % l
    for d in depths:
        if (l, d) in rows:
            ts, sd = rows[(l, d)]
            ref, q4 = rows.get(("f16", d)), rows.get(("q4_0", d))
            line += "%30s" % ("%.1f±%.1f (%.2fx, %.2fx)" % (ts, sd, ts / ref[0] if ref else float("nan"),
                                                         ts / q4[0] if q4 else float("nan")))
        else:
            line += "%30s" % "-"
    print(line)
try:
    txt = open(os.path.join(R, "dur.csv")).read()
except OSError:
    txt = ""
for part in txt.split("== ")[1:]:
    name, _, body = part.partition("\n")
    lines = [l for l in body.splitlines() if l.startswith('"')]
    if not lines:
        continue
    agg = collections.OrderedDict()
    for r in csv.DictReader(io.StringIO("\n".join(lines))):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        k = r["Kernel Name"].split("(")[0][:70]
        c, s = agg.get(k, (0, 0.0))
        agg[k] = (c + 1, s + float(r["Metric Value"].replace(",", "")))
    tot = sum(s for _, s in agg.values())
    print("\n== %s: per-kernel GPU time, warmup token + 1 decode token at depth 0 (ns): total %.0f" % (name, tot))
    for k, (c, s) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:25]:
        print("%8d x %-70s %10.0f ns  (%.0f ns each)" % (c, k, s, s / c))
EOF
grep -i "error\|abort" $R/bench_err.log 2>/dev/null | head -5 >> $R/summary.txt
cat $R/summary.txt >> $LOG
cp $R/tbo_fa.log $OUT/tbo_fa_full.log 2>/dev/null
echo "done at ${SECONDS}s" >> $LOG
cat $LOG
