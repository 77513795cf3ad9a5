#!/usr/bin/env bash
# tok/s of the same model with every layer on this CPU, and with N_GPU_LAYERS of
# them on two ggml-rpc-servers on 127.0.0.1 (docs/rpc.md), for each cache format.
# Loopback only: the servers share this machine's cores with the client, so the
# comparison shows the RPC overhead (graph splits, copies, round trips), not the
# gain of more machines.
#
#   bench/rpc_speed.sh [MODEL]      env: FORMATS="f16 kv4 squat4 deco4" THREADS=1
#                                        N_GPU_LAYERS=20 PP=128 TG=32 REPS=3 CPUS=
# CPUS (taskset list, e.g. 1): run the client and both servers on these cores
# only, so that on a shared machine the RPC run gets no more CPU than the local one.
# Tools from PYLLM_KV_BIN_DIR, else the installed pyllm_kv/bin. The servers are
# stopped on exit, also on failure or Ctrl-C.
set -euo pipefail
BIN=${PYLLM_KV_BIN_DIR:-$(python3 -c 'import pyllm_kv._libs as l; print(l.bin_dir())')}
MODEL=${1:-$(python3 -c 'import pyllm_kv; print(pyllm_kv.default_model_path())')}
FORMATS=${FORMATS:-f16 kv4 squat4 deco4}
THREADS=${THREADS:-1}
NGL=${N_GPU_LAYERS:-20}
PP=${PP:-128}
TG=${TG:-32}
REPS=${REPS:-3}
export CUDA_VISIBLE_DEVICES=""   # CPU against CPU, also on a CUDA build
PIN=()
[ -n "${CPUS:-}" ] && PIN=(taskset -c "$CPUS")

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM
ports=()
for i in 0 1; do
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "${PIN[@]}" "$BIN/ggml-rpc-server" -H 127.0.0.1 -p "$port" -t "$THREADS" -d CPU > "/tmp/rpc_speed_server$i.log" 2>&1 &
    pids+=($!)
    ports+=("$port")
done
for port in "${ports[@]}"; do
    for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done
done
RPC="127.0.0.1:${ports[0]},127.0.0.1:${ports[1]}"

echo "model: $MODEL; threads: $THREADS (client and each server)${CPUS:+, on cores $CPUS}; rpc: -ngl $NGL on $RPC, split 1/1"
for f in $FORMATS; do
    for where in local rpc; do
        extra=()
        [ "$where" = rpc ] && extra=(--rpc "$RPC" -ngl "$NGL" -ts 1/1)
        "${PIN[@]}" "$BIN/llama-bench" -m "$MODEL" -t "$THREADS" -fa 1 -ctk "$f" -ctv "$f" -p "$PP" -n "$TG" -r "$REPS" \
            "${extra[@]}" -o csv 2>/dev/null \
          | python3 -c '
import csv, sys
for r in csv.DictReader(sys.stdin):
    n_p, n_g = int(r["n_prompt"]), int(r["n_gen"])
    test = "pp%d" % n_p if n_p else "tg%d" % n_g
    print("%-8s %-6s %-6s %9.2f tok/s  (+- %.2f)" % (sys.argv[1], sys.argv[2], test, float(r["avg_ts"]), float(r["stddev_ts"])))
' "$f" "$where"
    done
done
