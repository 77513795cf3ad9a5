#!/bin/bash
# End-to-end CUDA vs CPU parity for our cache types, in ONE device call
# (carry [".carry"], timeout_s 600; .carry holds the trimmed sdist and the Q2_0
# SmolLM2 of bench/device/prepare_carry.sh, plus .carry/corpus.txt, the first
# 120 kB of pyllm-kv's corpus):
#   1. CUDA build of llama-completion + llama-perplexity under /tmp (sm_90);
#   2. the first 32 greedy tokens, -ngl 0 (CPU) vs -ngl 99 (CUDA), per K/V pair,
#      and the scheduler's graph-split count of each CUDA context;
#   3. KL divergence against the f16 cache (CPU logits as the base) of each type
#      on CPU and on CUDA: llama-perplexity --kl-divergence, ctx 512, 10 chunks.
# squat* K needs the KV cache in host memory, so its CUDA run uses -nkvo.
# CPU runs use -dev none (no GPU at all, not even op offload of big batches).
# PARITY_MODEL overrides the model (e.g. the real SmolLM2 Q4_1, 92 MB, carried in
# two parts over two calls: the carry holds 64 MiB).
set -x
LIMIT=${PARITY_LIMIT:-580}
fits() { [ $((SECONDS + $1)) -lt "$LIMIT" ]; }
B=/tmp/b/bin
M=${PARITY_MODEL:-.carry/smollm2-small.gguf}
T=.carry/corpus.txt
SRC=/tmp/src/llama_cpp_python-0.3.36
if [ ! -x $B/llama-perplexity ]; then
  mkdir -p /tmp/src && tar xzf .carry/llama_cpp_python-0.3.36-trim.tgz -C /tmp/src
  cmake -S . -B /tmp/b -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DPYLLM_KV_LLAMA_SRC=$SRC > $OUT/cfg.log 2>&1 || { tail -30 $OUT/cfg.log; exit 1; }
  ( time ninja -C /tmp/b -j16 llama-completion llama-perplexity ) > $OUT/build.log 2>&1 || { grep -n -A5 "error" $OUT/build.log | head -60; exit 1; }
fi
tail -3 $OUT/build.log; echo "built at ${SECONDS}s"

: > $OUT/parity.txt
for pair in f16/f16 q4_0/q4_0 kv4/kv4 kv3/kv3 kv2/kv2 kv4/kv2 kv4/f16 f16/kv4 q8_0/kv4 deco4/deco4 squat4/kv4; do
  fits 40 || break
  k=${pair%/*}; v=${pair#*/}; extra=""
  [ "${k#squat}" != "$k" ] && extra="-nkvo"
  for ngl in 0 99; do
    e="-dev none"; [ $ngl = 99 ] && e=$extra
    timeout 60 $B/llama-completion -m $M -p "The capital of France is" -n 32 --temp 0 -ctk $k -ctv $v -fa on \
      -ngl $ngl $e -no-cnv -t 8 > /tmp/g_$ngl.txt 2> /tmp/g_$ngl.err
    echo "$pair ngl=$ngl rc=$? $(grep -o 'graph splits = [0-9]*' /tmp/g_$ngl.err | tail -1)" >> $OUT/parity.txt
  done
  if cmp -s /tmp/g_0.txt /tmp/g_99.txt; then echo "$pair: 32 tokens identical" >> $OUT/parity.txt
  else echo "$pair: DIFFER"; { echo "$pair: DIFFER"; echo "cpu: $(tr '\n' ' ' < /tmp/g_0.txt)"; echo "gpu: $(tr '\n' ' ' < /tmp/g_99.txt)"; grep -i "error\|abort" /tmp/g_99.err | head -3; } >> $OUT/parity.txt; fi
done
cat $OUT/parity.txt
echo "parity done at ${SECONDS}s"

P="-m $M -f $T -c 512 --chunks 10 -fa on -t 16"
timeout 120 $B/llama-perplexity $P -ngl 0 -dev none -ctk f16 -ctv f16 --kl-divergence-base /tmp/base.kld > $OUT/kld_base.log 2>&1
echo "base rc=$?"
: > $OUT/kld.txt
for t in kv4 kv3 kv2 q4_0 deco4 squat4; do
  for ngl in 0 99; do
    fits 30 || break 2
    e="-dev none"; [ $ngl = 99 ] && e=""; [ $ngl = 99 ] && [ "${t#squat}" != "$t" ] && e="-nkvo"
    timeout 90 $B/llama-perplexity $P -ngl $ngl $e -ctk $t -ctv $t --kl-divergence-base /tmp/base.kld --kl-divergence > /tmp/k.log 2>&1
    echo "$t ngl=$ngl rc=$? $(grep -E '^Mean +KLD' /tmp/k.log | head -1) | $(grep -E '^Same top p' /tmp/k.log | head -1)" >> $OUT/kld.txt
  done
done
cat $OUT/kld.txt
echo "all done at ${SECONDS}s"
