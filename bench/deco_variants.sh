#!/usr/bin/env bash
# DecoQuant variants with the real kernels: one `pyllm-kv eval` per setting of the
# PYLLM_KV_DECO_* knobs (see docs/decoquant.md), each with its own f16 baseline
# (the plain kv formats of the same bits in a first run: eval is deterministic, so
# their numbers hold for every run on the same chunks), shipped model and corpus.
# Usage: bench/deco_variants.sh [CHUNKS] [OUTDIR]   (results: OUTDIR/<variant>.json/.txt)
set -euo pipefail
CHUNKS=${1:-20}
OUT=${2:-bench/deco-variants}
mkdir -p "$OUT"
run() {  # name, formats, env...
    local name=$1 fmts=$2; shift 2
    echo "== $name ($*)"
    env "$@" python -m pyllm_kv eval --formats "$fmts" --ctx 512 \
        --chunks "$CHUNKS" --json "$OUT/$name.json" | tee "$OUT/$name.txt"
}
run plain           f16,q4_0,kv4,kv3,kv2 PYLLM_KV_DECO_VARIANT=whiten
run faithful        f16,deco4,deco3,deco2 PYLLM_KV_DECO_VARIANT=whiten PYLLM_KV_DECO_GROUP=16 PYLLM_KV_DECO_HADAMARD=0
run hadamard-whiten f16,deco4,deco3,deco2 PYLLM_KV_DECO_VARIANT=whiten PYLLM_KV_DECO_GROUP=16 PYLLM_KV_DECO_HADAMARD=1
run rotate          f16,deco4,deco3,deco2 PYLLM_KV_DECO_VARIANT=rotate PYLLM_KV_DECO_GROUP=16 PYLLM_KV_DECO_HADAMARD=0
run hadamard-rotate f16,deco4,deco3,deco2 PYLLM_KV_DECO_VARIANT=rotate PYLLM_KV_DECO_GROUP=16 PYLLM_KV_DECO_HADAMARD=1
run whiten-g64      f16,deco4,deco3,deco2 PYLLM_KV_DECO_VARIANT=whiten PYLLM_KV_DECO_GROUP=64 PYLLM_KV_DECO_HADAMARD=0
