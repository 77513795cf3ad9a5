"""The three-model quality table of docs/quality.md, from `pyllm-kv eval --json` files.

  python bench/quality3_table.py bench/results/quality3/*.json

Files of the same model, ctx and chunks are merged (later files win per format).

One row per (run, format): model, ctx, chunks, bits/value (model_info.kv_cost:
allocated caches, block scales, side state), KLD mean +- its standard error, KLD p99,
top-1 agreement, PPL change vs the f16 cache. Then, per run, how each format stands
against q4_0: lower KLD at equal-or-fewer bits/value, or not. And issue 16's targets:
the best measured entry at <= 4.5 and <= 3.5 bits/value against 0.5x and 1x q4_0's KLD.
Nothing here is typed in: every number comes from the JSON files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List


def load(path: Path) -> Dict:
    data = json.loads(path.read_text())
    if not data.get("complete"):
        print(f"warning: {path} is not complete (interrupted or in progress)", file=sys.stderr)
    return data


def run_name(data: Dict) -> str:
    s = data["settings"]
    return f"{s['model_name']} | {s['ctx']} | {s['chunks']}"


def rows(data: Dict) -> List[str]:
    out = []
    for r in data["results"]:
        if "kld_mean" not in r:
            continue
        kld = "0 (ref)" if r.get("is_reference") else f"{r['kld_mean']:.4f} ± {r['kld_mean_se']:.4f}"
        out.append(f"| {run_name(data)} | {r['format']} | {r['bits_per_value']:.3f} | {kld} | "
                   f"{r['kld_p99']:.3f} | {100 * r['top1']:.2f}% | {r['ppl_delta_pct']:+.2f}% |")
    return out


def versus_q4_0(data: Dict) -> List[str]:
    by = {r["format"]: r for r in data["results"] if "kld_mean" in r}
    q4 = by.get("q4_0")
    if q4 is None:
        return []
    better, worse = [], []
    for name, r in by.items():
        if name in ("f16", "q8_0", "q4_0"):
            continue
        tag = f"{name} ({r['bits_per_value']:.2f} b/v, KLD {r['kld_mean'] / q4['kld_mean']:.2f}x q4_0)"
        if r["bits_per_value"] <= q4["bits_per_value"] + 1e-9 and r["kld_mean"] < q4["kld_mean"]:
            better.append(tag)
        else:
            worse.append(tag)
    lines = [f"- **{data['settings']['model_name']}, ctx {data['settings']['ctx']}** "
             f"(q4_0: {q4['bits_per_value']:.2f} b/v, KLD {q4['kld_mean']:.4f})",
             f"  - lower KLD than q4_0 at <= its bits/value: {', '.join(better) or 'none'}",
             f"  - not: {', '.join(worse) or 'none'}"]
    for budget, factor in ((4.5, 0.5), (3.5, 1.0)):
        fit = [(r["kld_mean"], n, r["bits_per_value"]) for n, r in by.items()
               if n not in ("f16",) and r["bits_per_value"] <= budget + 1e-9]
        if not fit:
            lines.append(f"  - target <= {budget} b/v, KLD <= {factor}x q4_0: no measured entry fits the budget")
            continue
        k, n, b = min(fit)
        held = "held" if k <= factor * q4["kld_mean"] else "NOT held"
        lines.append(f"  - target <= {budget} b/v, KLD <= {factor}x q4_0 ({factor * q4['kld_mean']:.4f}): "
                     f"best {n} ({b:.2f} b/v, KLD {k:.4f}): {held}")
    return lines


def merge(runs: List[Dict]) -> List[Dict]:
    """Runs of the same model, ctx and chunks become one (a format measured in
    two files: the later file's row), so formats measured in separate passes
    (e.g. after a change to one encoder) are compared with the same q4_0."""
    merged: Dict[str, Dict] = {}
    for d in runs:
        key = run_name(d)
        if key not in merged:
            merged[key] = {**d, "results": list(d["results"])}
            continue
        by = {r["format"]: r for r in merged[key]["results"]}
        by.update({r["format"]: r for r in d["results"]})
        merged[key]["results"] = list(by.values())
    return list(merged.values())


def main(argv: List[str]) -> int:
    runs = merge([load(Path(p)) for p in argv])
    print("| model | ctx | chunks | format (K/V) | bits/value | KLD mean ± se | KLD p99 | top-1 | ΔPPL vs f16 |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for d in runs:
        for line in rows(d):
            print(line)
    print()
    for d in runs:
        for line in versus_q4_0(d):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
