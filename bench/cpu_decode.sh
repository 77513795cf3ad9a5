#!/usr/bin/env bash
# CPU prefill/decode at depth for docs/speed.md: llama-bench from this package,
# SmolLM2, flash attention on, 2 threads; one process per format, run back to back.
# q4_0 only to 2k: its prefill at 8k depth takes ~20 minutes on two cores.
set -euo pipefail
B=${B:-$(python -c 'import pyllm_kv._libs as l; print(l.bin_dir())')}
M=${M:-$(python -c 'import pyllm_kv; print(pyllm_kv.default_model_path())')}
for t in f16 kv4 deco4 deco2; do
    "$B/llama-bench" -m "$M" -fa 1 -t 2 -ctk $t -ctv $t -p 512 -n 32 -d 0,2048,8192 -r 2 -o md
done
"$B/llama-bench" -m "$M" -fa 1 -t 2 -ctk q4_0 -ctv q4_0 -p 512 -n 32 -d 0,2048 -r 2 -o md
