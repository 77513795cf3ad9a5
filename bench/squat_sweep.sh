#!/usr/bin/env bash
# SQuat settings with the real kernels: one `pyllm-kv eval` per setting of rank r,
# lambda and the normalisation of the query subspace (see docs/squat.md), plus the
# beyond-the-paper variants (SQuat on the DecoQuant transform, mixed K/V bits).
# Shipped model and corpus, ctx 512. The plain kv formats come from a first run
# (eval is deterministic, so their numbers hold for every run on the same chunks).
# Usage: bench/squat_sweep.sh [CHUNKS] [OUTDIR]   (results: OUTDIR/<name>.json/.txt)
set -euo pipefail
CHUNKS=${1:-6}
OUT=${2:-bench/squat-sweep}
PY=${PYTHON:-python}
mkdir -p "$OUT"
run() {  # name, formats, pyllm-kv eval options...
    local name=$1 fmts=$2; shift 2
    echo "== $name ($*)"
    "$PY" -m pyllm_kv eval --formats "$fmts" --ctx 512 --chunks "$CHUNKS" --no-progress \
        --json "$OUT/$name.json" "$@" | tee "$OUT/$name.txt"
}
run plain        f16,q4_0,kv4,kv3,kv2,kv4/kv3,kv4/kv2,kv3/kv2
run default      f16,squat4,squat3,squat2,squat4/kv3,squat4/kv2,squat3/kv2
# sensitivity (3-bit keys, where the method matters most)
for r in 4 8 32 64; do
    run "r$r"    f16,squat3 --squat-rank "$r"
done
for l in 1 10 1000 10000; do
    run "lambda$l" f16,squat3 --squat-lambda "$l"
done
# the reference implementation's default: lambda 0.001 on the unnormalised subspace
run reference-default f16,squat3 --squat-lambda 0.001 --squat-normalize 0
# beyond the paper: SQuat keys on the DecoQuant transform instead of the Hadamard rotation
run on-deco      f16,squat4,squat3,squat2 --squat-transform deco
