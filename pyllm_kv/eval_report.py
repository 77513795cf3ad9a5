"""The report of ``pyllm-kv eval``: the dict (the JSON), the Markdown table, the plot."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from . import formats, report_io
from .eval_journal import Journal
from .eval_metrics import Accumulator, ChunkStats
from .eval_positions import Scoring, bucket_edges
from .eval_positions import label as bucket_label

PathLike = Union[str, "os.PathLike[str]"]


def build_report(settings: Dict[str, Any], pairs: Sequence[Tuple[str, str, str]], bits: Dict[str, Dict[str, Any]],
                 reuse: set, journal: Journal, done: List[int], n_chunks: int, interrupted: bool, final: bool,
                 elapsed: float, scoring: Optional[Scoring] = None) -> Dict[str, Any]:
    """The report dict over the chunks every format has finished (``done``), from the
    journal's per-position numbers; ``final=False`` marks a snapshot taken mid-run.
    With a ``scoring`` other than the default (ctx/2 on) each record also has
    ``by_position``: the same summary per doubling position bucket."""
    results = []
    for label, _, _ in pairs:
        acc = Accumulator()
        for c in done:
            acc.add(journal.records[(c, label)].stats)
        rec: Dict[str, Any] = {"format": label}
        rec.update(bits[label])
        rec["is_reference"] = label in reuse
        rec.update(acc.summary())
        if scoring is not None and not scoring.is_default:
            rec["by_position"] = _by_position([journal.records[(c, label)].stats for c in done], scoring)
        own = [r for (c, lb), r in journal.records.items() if lb == label and r.tokens]
        seconds = sum(r.seconds for r in own)
        if seconds > 0:
            rec["prefill_tok_s"] = sum(r.tokens for r in own) / seconds
        results.append(rec)
    out_settings = dict(settings)
    out_settings["chunks"] = len(done)
    complete = (not interrupted) and len(done) == n_chunks
    result = {
        "tool": "pyllm-kv eval",
        "version": _version(),
        "settings": out_settings,
        "results": results,
        "complete": complete and final,
        "interrupted": interrupted,
        "elapsed_s": elapsed,
    }
    if not final:
        result["in_progress"] = True
    return result


def _by_position(chunks: List[ChunkStats], scoring: Scoring) -> List[Dict[str, Any]]:
    """Summaries of the positions in each bucket of :func:`eval_positions.bucket_edges`, over all chunks."""
    pos = scoring.positions()
    out = []
    for lo, hi in bucket_edges(scoring.ctx):
        sel = (pos >= lo) & (pos < hi)
        if not sel.any():
            continue
        acc = Accumulator()
        for st in chunks:
            acc.add(ChunkStats(*(getattr(st, f)[sel] for f in ChunkStats.FIELDS)))
        s = acc.summary()
        out.append({"from": lo, "to": hi, "bucket": bucket_label(lo, hi), "n_tokens": s["n_tokens"],
                    **{k: s.get(k) for k in ("kld_mean", "kld_mean_se", "kld_p99", "top1", "ln_ppl_ratio")}})
    return out


def format_position_table(result: Dict[str, Any]) -> str:
    """Mean KLD (and top-1) per position bucket and format, or "" for a run without buckets."""
    recs = [r for r in result["results"] if r.get("by_position")]
    if not recs:
        return ""
    buckets = [(b["from"], b["to"], b["bucket"]) for b in recs[0]["by_position"]]
    s = result["settings"]
    head = (f"KLD mean vs the {s['reference']} cache by position in the chunk (ctx {s['ctx']}, "
            f"{s['chunks']} chunk(s), scored {s['scored_positions']}); top-1 agreement in brackets")
    cols = ["format"] + [name for _, _, name in buckets]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["---:"] * len(buckets)) + "|"]
    for r in recs:
        by = {(b["from"], b["to"]): b for b in r["by_position"]}
        cells = []
        for lo, hi, _ in buckets:
            b = by.get((lo, hi))
            cells.append("–" if not b or not b.get("n_tokens") else
                         f"{_num(b['kld_mean'], '.4g')} ({100 * b['top1']:.1f}%)")
        lines.append("| " + " | ".join([r["format"] + (" (ref)" if r.get("is_reference") else "")] + cells) + " |")
    return "\n".join(lines)


def _version() -> str:
    try:
        from . import __version__  # noqa: PLC0415

        return __version__
    except Exception:  # pragma: no cover
        return "unknown"


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
    by_pos = format_position_table(result)
    return "\n".join(lines) + ("\n\n" + by_pos if by_pos else "")


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


def plot_by_position(result: Dict[str, Any], path: PathLike) -> Path:
    """Mean KLD (log scale) per position bucket, one line per format; PNG at ``path``.
    For runs with ``--score-from``: how each format's error changes with depth."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    s = result["settings"]
    recs = [r for r in result["results"] if r.get("by_position") and not r.get("is_reference")]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    names: List[str] = []
    for r in recs:
        pts = [(i, b["kld_mean"]) for i, b in enumerate(r["by_position"]) if b.get("n_tokens") and b["kld_mean"] > 0]
        if not pts:
            continue
        ours = any(formats.resolve(n).is_ours for n in (r["cache_k"], r["cache_v"]))
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="*" if ours else "o",
                ls="-" if ours else "--", label=f"{r['format']} ({r['bits_per_value']:.3g} b/v)")
        if len(r["by_position"]) > len(names):
            names = [b["bucket"] for b in r["by_position"]]
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names)
    ax.set_yscale("log")
    ax.set_xlabel("position in the chunk (tokens)")
    ax.set_ylabel(f"mean KLD vs {s['reference']} cache (nats, log scale)")
    ax.set_title(f"{Path(s['model']).name}: KLD by depth, ctx {s['ctx']}, {s['chunks']} chunk(s)", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    if names:
        ax.legend(fontsize=8, loc="best")
    return report_io.save_figure(fig, path)


def by_position_plot_path(plot_out: PathLike) -> Path:
    """Where ``--plot FILE.png`` puts the by-position figure: ``FILE-by-position.png``."""
    p = Path(plot_out)
    return p.with_name(p.stem + "-by-position" + (p.suffix or ".png"))
