#!/bin/bash
# Decode-speed run for the CUDA kernels of our types, all in ONE device call
# (carry [".carry"], timeout_s 600; bench/device/prepare_carry.sh fills .carry):
#   1. CUDA build of llama-bench + test-backend-ops under /tmp (sm_90);
#   2. test-backend-ops on CUDA0 vs CPU: FLASH_ATTN_EXT and SET_ROWS for kv2/kv3/kv4;
#   3. Llama-8B-shaped random Q4_0 model (bench/make_shape_model.py);
#   4. llama-bench decode (-p 0 -n 64 -r 2, -fa 1, -ngl 99) at depth 0/8192/32768 for
#      f16, q4_0, kv4, kv2 (K and V the same type), then kv4 with the previous scalar
#      kernel (PKV_CUDA_FA_LEGACY=1) and kv4 without upstream's Hadamard rotation
#      (LLAMA_ATTN_ROT_DISABLE=1: 4 extra FWHT kernels per layer for quantized caches);
#   5. ncu (clocks left alone) on our decode + combine kernels at depth 32768 (with
#      -lineinfo builds: instruction mix and source counters); optional (PERF_NCU_F16=1)
#      upstream's f16 vec kernel likewise, and (PERF_DUR=1) per-kernel GPU time of one
#      decode token at depth 0. PERF_DEPTHS (default 0,8192,32768) sets the bench depths.
# Stages are skipped once the call's time would run out (elapsed $SECONDS vs LIMIT).
# First run (5bfdd88, 2026-11-23, H100 SXM): build 359 s, tests to 377 s, all done at 517 s.
# Everything lands in at most 8 files under $OUT; the last lines printed are the table.
set -x
LIMIT=${PERF_LIMIT:-575}
fits() { [ $((SECONDS + $1)) -lt "$LIMIT" ]; }
B=/tmp/b/bin
SRC=/tmp/src/llama_cpp_python-0.3.36
M=/tmp/shape8b.gguf
R=/tmp/perf; mkdir -p $R
LOG=$OUT/log.txt

{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv; nproc; } > $LOG 2>&1
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
echo "ncu: $NCU" >> $LOG

if [ ! -x $B/llama-bench ] || [ ! -x $B/test-backend-ops ] || [ "${PERF_REBUILD:-1}" = 1 ]; then
  [ -d $SRC ] || { mkdir -p /tmp/src && tar xzf .carry/llama_cpp_python-0.3.36-trim.tgz -C /tmp/src; }
  cmake -S . -B /tmp/b -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DPYLLM_KV_UPSTREAM_TESTS=ON -DPYLLM_KV_LLAMA_SRC=$SRC -DCMAKE_CUDA_FLAGS=-lineinfo > $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }
  ( time ninja -C /tmp/b -j16 llama-bench test-backend-ops ) >> $OUT/build.log 2>&1 || { grep -n -A5 "error" $OUT/build.log | head -60; exit 1; }
fi
tail -4 $OUT/build.log
echo "built at ${SECONDS}s"

# ---- correctness of our kernels against the CPU
: > $OUT/tbo.txt
for op in FLASH_ATTN_EXT SET_ROWS; do
  fits 150 || break
  timeout 120 $B/test-backend-ops -b CUDA0 -o $op -p 'kv[234]' > $R/tbo_$op.log 2>&1; rc=$?
  { echo "== $op rc=$rc"; grep -c " OK" $R/tbo_$op.log; grep -E "FAIL|passed|not supported" $R/tbo_$op.log | sort | uniq -c | sort -rn | head -12; } >> $OUT/tbo.txt
  grep -B2 -A3 "FAIL" $R/tbo_$op.log | head -40 >> $OUT/tbo.txt
done
cat $OUT/tbo.txt
echo "tests done at ${SECONDS}s"

G=$SRC/vendor/llama.cpp/gguf-py
[ -f $M ] || PYTHONPATH=$G python3 bench/make_shape_model.py --preset llama8b --out $M > $R/model.log 2>&1 || { tail $R/model.log; exit 1; }

# ---- decode speed: label, extra env, types, depths
bench() {
  local label=$1 envs=$2 t=$3 d=$4
  fits 50 || { echo "skip $label (time)"; return; }
  env $envs timeout $((LIMIT - SECONDS - 5)) $B/llama-bench -m $M -ngl 99 -fa 1 -ctk $t -ctv $t -p 0 -n 64 -r 2 -d $d -o csv \
    > $R/bench_$label.csv 2>> $R/bench_err.log
  echo "bench $label rc=$? at ${SECONDS}s"
}
DEPTHS=${PERF_DEPTHS:-0,8192,32768}
bench f16 "" f16 $DEPTHS
bench kv4 "" kv4 $DEPTHS
bench kv2 "" kv2 $DEPTHS
bench q4_0 "" q4_0 $DEPTHS

# ---- profiler: our decode + combine at depth 32768 (the warmup token at depth 0 makes
# 32 launches of each first), upstream f16 vec kernel likewise
NCUF="--clock-control none --set basic --section WarpStateStats --section MemoryWorkloadAnalysis --section SchedulerStats"
NCUK="$NCUF --section InstructionStats --section SourceCounters"
if [ -n "$NCU" ] && fits 60; then
  timeout $((LIMIT - SECONDS - 5)) $NCU $NCUK -k regex:'k_fattn_decode|k_fattn_combine' -s 80 -c 3 \
    $B/llama-bench -m $M -ngl 99 -fa 1 -ctk kv4 -ctv kv4 -p 0 -n 4 -r 1 -d 32768 > $OUT/ncu_kv4.txt 2>&1
  echo "ncu kv4 rc=$? at ${SECONDS}s"
fi
bench kv4-legacy "PKV_CUDA_FA_LEGACY=1" kv4 8192,32768
# upstream's Hadamard rotation of K/V/Q/output (attn_rot_k/v, kept for kv*, on for q4_0):
# what it costs per token, with our kernels as they are
bench kv4-norot "LLAMA_ATTN_ROT_DISABLE=1" kv4 0,8192
if [ -n "$NCU" ] && [ "${PERF_NCU_F16:-0}" = 1 ] && fits 60; then
  timeout $((LIMIT - SECONDS - 5)) $NCU $NCUF -k regex:'flash_attn_ext_vec' -s 40 -c 2 \
    $B/llama-bench -m $M -ngl 99 -fa 1 -ctk f16 -ctv f16 -p 0 -n 4 -r 1 -d 32768 > $OUT/ncu_f16.txt 2>&1
  echo "ncu f16 rc=$? at ${SECONDS}s"
fi
# per-kernel GPU time of decode at depth 0 (warmup token + 1 token, graphs or not)
: > $R/dur.csv
for t in kv4 f16; do
  if [ -n "$NCU" ] && [ "${PERF_DUR:-0}" = 1 ] && fits 40; then
    echo "== $t" >> $R/dur.csv
    timeout $((LIMIT - SECONDS - 5)) $NCU --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
      $B/llama-bench -m $M -ngl 99 -fa 1 -ctk $t -ctv $t -p 0 -n 1 -r 1 -d 0 >> $R/dur.csv 2>/dev/null
    echo "ncu dur $t rc=$? at ${SECONDS}s"
  fi
done

python3 - "$R" > $OUT/summary.txt 2>&1 <<'EOF'
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
print("decode tok/s (llama-bench -p 0 -n 64 -r 2 -fa 1 -ngl 99, K=V type), ratio to f16 at the same depth")
print("%-16s" % "type" + "".join("%24s" % ("d=%d" % d) for d in depths))
for l in labels:
    line = "%-16s" % l
    for d in depths:
        if (l, d) in rows:
            ts, sd = rows[(l, d)]
            ref = rows.get(("f16", d))
            line += "%24s" % ("%.1f±%.1f (%.2fx)" % (ts, sd, ts / ref[0] if ref else float("nan")))
        else:
            line += "%24s" % "-"
    print(line)
# per-kernel GPU time at depth 0
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
cat $R/bench_err.log 2>/dev/null | grep -i "error\|abort" | head -5 >> $OUT/summary.txt
cp $R/tbo_FLASH_ATTN_EXT.log $OUT/tbo_fa_full.log 2>/dev/null
echo "done at ${SECONDS}s"
cat $OUT/summary.txt
