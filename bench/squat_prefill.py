"""Prefill cost of the SQuat key encoder on CPU: squatN K vs kvN K (V kvN in both),
interleaved in one process so that machine noise hits every format alike.

  depth 0   : 512-token prompt into an empty cache (includes the subspace fit)
  depth 1024: the next 512 tokens after a 1024-token prefix (encoder only)

Usage: python bench/squat_prefill.py [--reps 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import pyllm_kv
from pyllm_kv import _libs, corpus


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    lc = _libs.llama_cpp()
    pairs = [("kv4", "kv4"), ("squat4", "kv4"), ("kv3", "kv3"), ("squat3", "kv3"), ("kv2", "kv2"), ("squat2", "kv2")]
    models = {k: pyllm_kv.load(cache_k=k, cache_v=v, n_ctx=2048, n_batch=512, n_threads=args.threads)
              for k, v in pairs}
    toks = models["kv4"].tokenize(corpus.load_text()[:40000])[:1536]
    times = {(k, d): [] for k in models for d in (0, 1024)}
    for _ in range(args.reps):
        for k, m in models.items():
            for depth in (0, 1024):
                m.llama.reset()
                lc.llama_memory_clear(lc.llama_get_memory(m.llama.ctx), True)
                if depth:
                    m.llama.eval(toks[:depth])
                t = time.perf_counter()
                m.llama.eval(toks[depth:depth + 512])
                times[(k, depth)].append(time.perf_counter() - t)
    print(f"| K cache | pp512 @ d0 tok/s | vs kv | pp512 @ d1024 tok/s | vs kv |")
    print("|---|---:|---:|---:|---:|")
    for k in models:
        row = [k]
        for depth in (0, 1024):
            tps = 512 / np.median(times[(k, depth)][1:])  # first rep warms up
            base = 512 / np.median(times[("kv" + k[-1], depth)][1:])
            row += [f"{tps:.1f}", f"{tps / base:.2f}"]
        print("| " + " | ".join(row) + " |")
    for m in models.values():
        m.close()


if __name__ == "__main__":
    main()
