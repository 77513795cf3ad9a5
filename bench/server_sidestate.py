"""What a stale side state costs under a server (docs/server.md).

squat*/deco* fit their side state (SQuat's query subspace, DecoQuant's 16x16
transforms) from the first ubatch that reaches an EMPTY KV cache and share it
with every sequence of that cache. Under llama-server every slot is a sequence
of one cache, so a later conversation is encoded with a side state fitted on
another conversation's prompt. This measures the price, in the layout
llama-server uses with an explicit ``-np`` (one KV stream per slot):

* ``self``: text B alone in an empty cache (B fits its own side state; this is
  what ``pyllm-kv eval`` measures);
* ``after:<A>``: A is prefilled as sequence 0 first (it fits the side state),
  then B as sequence 1, encoded with A's side state.

Reported per format and scenario: mean KL(f16 || format) of B's next-token
distributions at positions ctx/2..ctx-2 (as ``pyllm-kv eval``), its ratio to
``self``, and top-1 agreement. B runs over ``--chunks`` chunks of the corpus;
the reference is B alone in an f16 cache of the same layout. A control format
without side state (kv4) must give identical numbers in every scenario.

    python bench/server_sidestate.py --model M --formats kv4,squat4,squat3,deco4 --chunks 8
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from pyllm_kv import _libs, corpus
from pyllm_kv.eval import parse_formats
from pyllm_kv.eval_metrics import Accumulator, Reference, compare
from pyllm_kv.model import default_model_path
from pyllm_kv.model_info import read_model_info

# A first request as a chat client sends it: short. Its fit sees only these tokens.
SHORT_PROMPT = ("You are a helpful assistant.\nUser: Hi! Can you tell me what the weather "
                "is usually like in Lisbon in spring?\nAssistant:")


class Bench:
    """One model, contexts of two sequences with one KV stream each (llama-server -np 2)."""

    def __init__(self, model_path: Path, ctx: int, n_threads: int):
        self.L = _libs.llama_cpp()  # binds llama_cpp to our libraries first
        from llama_cpp import _logger  # noqa: PLC0415

        _logger.set_verbose(False)
        self.L.llama_backend_init()
        mp = self.L.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = self.L.llama_model_load_from_file(str(model_path).encode(), mp)
        if not self.model:
            raise SystemExit(f"could not load {model_path}")
        self.vocab = self.L.llama_model_get_vocab(self.model)
        self.n_vocab = int(self.L.llama_vocab_n_tokens(self.vocab))
        self.add_bos = bool(self.L.llama_vocab_get_add_bos(self.vocab))
        self.bos = int(self.L.llama_vocab_bos(self.vocab))
        self.ctx, self.n_threads = ctx, n_threads
        self.batch = self.L.llama_batch_init(ctx, 0, 2)

    def tokenize(self, text: str) -> np.ndarray:
        raw = text.encode()
        buf = (self.L.llama_token * (len(raw) + 16))()
        n = self.L.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), self.add_bos, False)
        if n < 0:
            raise SystemExit("tokenize failed")
        return np.asarray(buf[:n], dtype=np.int32)

    def context(self, k: str, v: str):
        from pyllm_kv import formats  # noqa: PLC0415

        p = self.L.llama_context_default_params()
        p.n_ctx = 2 * self.ctx          # non-unified: each sequence gets ctx cells
        p.n_batch = p.n_ubatch = self.ctx  # a whole chunk in one ubatch (the fit sees all of it)
        p.n_seq_max = 2
        p.kv_unified = False
        p.type_k = _libs.ggml_type_id(formats.resolve(k).ggml)
        p.type_v = _libs.ggml_type_id(formats.resolve(v).ggml)
        p.flash_attn_type = 1
        p.n_threads = p.n_threads_batch = self.n_threads
        c = self.L.llama_init_from_model(self.model, p)
        if not c:
            raise SystemExit(f"could not create a {k}/{v} context")
        return c

    def decode(self, c, tokens: np.ndarray, seq: int, scored: bool) -> Optional[np.ndarray]:
        b, n, first = self.batch, len(tokens), self.ctx // 2
        b.n_tokens = n
        for i in range(n):
            b.token[i], b.pos[i], b.n_seq_id[i] = int(tokens[i]), i, 1
            b.seq_id[i][0] = seq
            b.logits[i] = 1 if scored and first <= i < n - 1 else 0
        rc = self.L.llama_decode(c, b)
        if rc != 0:
            raise SystemExit(f"llama_decode returned {rc}")
        if not scored:
            return None
        n_out = n - 1 - first
        ptr = self.L.llama_get_logits(c)
        return np.ctypeslib.as_array(ptr, shape=(n_out * self.n_vocab,)).reshape(n_out, self.n_vocab).copy()

    def run_b(self, c, b_tokens: np.ndarray, a_tokens: Optional[np.ndarray]) -> np.ndarray:
        """B's scored logits: alone in an empty cache, or as sequence 1 after A as sequence 0."""
        self.L.llama_memory_clear(self.L.llama_get_memory(c), True)
        if a_tokens is None:
            return self.decode(c, b_tokens, 0, True)
        self.decode(c, a_tokens, 0, False)
        return self.decode(c, b_tokens, 1, True)


def _code_text() -> str:
    # Python source as an unrelated text: nothing like a dictionary of English prose.
    return inspect.getsource(textwrap)


SCENARIOS = ("self", "after:text", "after:code", "after:short")


def measure(model: Optional[str], fmts: str, ctx: int, chunks: int, n_threads: int,
            scenario_names=SCENARIOS, on_chunk=None) -> Dict:
    path = Path(model) if model else default_model_path()
    info = read_model_info(path)
    bench = Bench(path, ctx, n_threads)
    tokens = bench.tokenize(corpus.load_text())
    n_avail = len(tokens) // ctx
    if n_avail < 2 * chunks:
        raise SystemExit(f"the corpus has {n_avail} chunks of {ctx}; need {2 * chunks}")
    # B: chunks 0..chunks-1. "text" A for B_j: chunk j + n_avail/2 (same corpus, other entries).
    def chunk(i: int) -> np.ndarray:
        t = tokens[i * ctx:(i + 1) * ctx].copy()
        if bench.add_bos:
            t[0] = bench.bos
        return t

    code = bench.tokenize(_code_text())[:ctx]
    short = bench.tokenize(SHORT_PROMPT)
    every = {"self": None, "after:text": "text", "after:code": code, "after:short": short}
    unknown = set(scenario_names) - set(every)
    if unknown or "self" not in scenario_names:
        raise SystemExit(f"scenarios: 'self' plus any of {', '.join(SCENARIOS[1:])}; got {unknown or 'no self'}")
    scenarios = {s: every[s] for s in SCENARIOS if s in scenario_names}
    pairs = parse_formats(fmts)
    ref_ctx = bench.context("f16", "f16")
    ctxs = {label: bench.context(k, v) for label, k, v in pairs}
    acc = {(label, s): Accumulator() for label, _, _ in pairs for s in scenarios}
    meta = {"model": str(path), "model_name": info.name, "ctx": ctx,
            "scored_positions": f"{ctx // 2}..{ctx - 2}", "text": corpus.describe(),
            "a_code": "Python's textwrap.py source, first ctx tokens", "a_short_tokens": int(len(short)),
            "n_threads": n_threads, "lib_dir": str(_libs.lib_dir()),
            "squat_env": {k: v for k, v in os.environ.items() if k.startswith("PYLLM_KV_")}}
    t0 = time.perf_counter()
    for j in range(chunks):
        b = chunk(j)
        ref_logits = bench.run_b(ref_ctx, b, None)
        ref = Reference.from_logits(ref_logits, b[ctx // 2 + 1:])
        for label, _, _ in pairs:
            for s, a in scenarios.items():
                a_tok = chunk(j + n_avail // 2) if isinstance(a, str) else a
                acc[(label, s)].add(compare(ref, bench.run_b(ctxs[label], b, a_tok)))
        print(f"chunk {j + 1}/{chunks} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        if on_chunk is not None:  # a long run keeps what it has measured so far
            on_chunk({**meta, **_report(pairs, scenarios, acc, j + 1), "elapsed_s": time.perf_counter() - t0})
    for c in [ref_ctx, *ctxs.values()]:
        bench.L.llama_free(c)
    return {**meta, **_report(pairs, scenarios, acc, chunks), "elapsed_s": time.perf_counter() - t0}


def _report(pairs, scenarios, acc, chunks_done: int) -> Dict:
    rows = []
    for label, k, v in pairs:
        base = acc[(label, "self")].summary()
        for s in scenarios:
            sm = acc[(label, s)].summary()
            rows.append({"format": label, "cache_k": k, "cache_v": v, "scenario": s,
                         "kld_mean": sm["kld_mean"], "kld_se": sm.get("kld_mean_se"),
                         "kld_p99": sm.get("kld_p99"), "top1": sm.get("top1"),
                         "ratio_vs_self": (sm["kld_mean"] / base["kld_mean"]) if base["kld_mean"] else None})
    return {"tool": "bench/server_sidestate.py", "chunks": chunks_done, "rows": rows}


def table(res: Dict) -> str:
    out = [f"{res['model_name']}  ctx {res['ctx']}, {res['chunks']} chunks of B, positions {res['scored_positions']}",
           "| format | B encoded with the side state of | mean KLD | p99 KLD | top-1 | x self |",
           "|---|---|---:|---:|---:|---:|"]
    names = {"self": "B itself (empty cache)", "after:text": "another text A (other corpus chunk)",
             "after:code": "Python source A", "after:short": f"a short chat prompt ({res['a_short_tokens']} tokens)"}
    for r in res["rows"]:
        ratio = "" if r["ratio_vs_self"] is None else f"{r['ratio_vs_self']:.2f}"
        out.append(f"| {r['format']} | {names[r['scenario']]} | {r['kld_mean']:.5f} | {r['kld_p99']:.4f} | "
                   f"{100 * r['top1']:.1f}% | {ratio} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--formats", default="kv4,squat4,squat3,deco4")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help=f"which A to put before B: self plus any of {', '.join(SCENARIOS[1:])}")
    ap.add_argument("--out", default=None, help="write the JSON result here")
    ap.add_argument("--table", metavar="JSON", help="only print the table of a result file (a partial one too)")
    a = ap.parse_args(argv)
    if a.table:
        print(table(json.loads(Path(a.table).read_text())))
        return 0
    partial = None
    if a.out:
        def partial(r: Dict) -> None:
            Path(a.out).write_text(json.dumps({**r, "partial": True}, indent=1) + "\n")
    res = measure(a.model, a.formats, a.ctx, a.chunks, a.threads, a.scenarios.split(","), partial)
    print(table(res))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
