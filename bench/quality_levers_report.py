"""Calibrate the simulation (bench/quality_sim.py) against real `pyllm-kv eval` KLD and
tabulate the levers, per model (docs/quality-levers.md).

  python bench/quality_levers_report.py --model smol EVAL.json SIM.json [--model qwen ...]

For each model: the formats both runs have (real label -> simulated pair: ``squatN``
-> ``sq:kvN/kvN``), their real KLD against the simulated metric ``out`` (sum over
layers of the relative squared error of the attention output), the Spearman rank
correlation and the Pearson correlation of the logs, and a log-log least-squares
line KLD ~ a * out^b through the quantized formats. That line turns each lever's
simulated metric into an *expected* KLD; it is an interpolation inside the range the
real formats span, and says nothing beyond what the attention error can see.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np


def sim_name(real: str) -> str:
    if real.startswith("squat"):
        b = real[5:]
        return f"sq:kv{b}/kv{b}"
    return real


def _rank(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x))
    r[np.argsort(x)] = np.arange(len(x))
    return r


def calibrate(eval_json: Dict, sim_json: Dict, metric: str = "out") -> Dict:
    sims = {r["pair"]: r for r in sim_json["results"]}
    pts = []
    for r in eval_json["results"]:
        if r.get("is_reference") or not r.get("n_tokens"):
            continue
        s = sims.get(sim_name(r["format"]))
        if s is None:
            continue
        pts.append((r["format"], r["kld_mean"], s[metric], r["bits_per_value"], r["ppl_delta_pct"], r["top1"]))
    real = np.array([p[1] for p in pts])
    sim = np.array([p[2] for p in pts])
    ok = (real > 0) & (sim > 0)
    lr, ls = np.log(real[ok]), np.log(sim[ok])
    b, loga = np.polyfit(ls, lr, 1) if ok.sum() >= 2 else (1.0, 0.0)
    pearson = float(np.corrcoef(ls, lr)[0, 1]) if ok.sum() >= 3 else float("nan")
    spearman = float(np.corrcoef(_rank(ls), _rank(lr))[0, 1]) if ok.sum() >= 3 else float("nan")
    return {"points": pts, "slope": float(b), "intercept": float(loga), "pearson_log": pearson,
            "spearman": spearman, "metric": metric}


def predict_fit(cal: Dict, sim_value: float) -> float:
    """The global log-log line (a summary; poor where KLD saturates)."""
    return math.exp(cal["intercept"]) * sim_value ** cal["slope"]


def predict(cal: Dict, sim_value: float, exclude=()) -> float:
    """Expected KLD: monotone interpolation in log-log between the real formats, sorted by
    their simulated metric (the running maximum of their KLD, so the map is monotone);
    outside their range, proportional to the metric from the nearest end point."""
    pts = sorted((p[2], p[1]) for p in cal["points"] if p[0] not in exclude and p[1] > 0 and p[2] > 0)
    xs = np.log([p[0] for p in pts])
    ys = np.maximum.accumulate(np.log([p[1] for p in pts]))
    x = math.log(sim_value)
    if x <= xs[0]:
        return math.exp(ys[0] + x - xs[0])
    if x >= xs[-1]:
        return math.exp(ys[-1] + x - xs[-1])
    return math.exp(float(np.interp(x, xs, ys)))


def calibration_table(cal: Dict, exclude=()) -> str:
    pts = cal["points"]
    q4 = next((p for p in pts if p[0] == "q4_0"), None)
    lines = ["| format | bits/value | real KLD | real ΔPPL | real top-1 | sim `out` | real / q4_0 | sim / q4_0 "
             "| interpolated from the others |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, real, sim, bits, dppl, top1 in sorted(pts, key=lambda p: p[1]):
        rr = f"{real / q4[1]:.2f}" if q4 else "–"
        sr = f"{sim / q4[2]:.2f}" if q4 else "–"
        # leave-one-out: what the interpolation through the *other* formats says of this one
        loo = predict(cal, sim, exclude=tuple(exclude) + (name,))
        lines.append(f"| {name} | {bits:.3g} | {real:.4g} | {dppl:+.1f}% | {100 * top1:.1f}% | {sim:.4g} | {rr} | {sr} "
                     f"| {loo:.3g} |")
    lines.append("")
    lines.append(f"Spearman {cal['spearman']:.3f}, Pearson of the logs {cal['pearson_log']:.3f} (n = {len(pts)}); "
                 f"global log-log line KLD = {math.exp(cal['intercept']):.3g} x out^{cal['slope']:.2f}")
    return "\n".join(lines)


def lever_table(sim_json: Dict, cal: Dict, q4_real: float, bits_max: float = 99.0, exclude=()) -> str:
    rows = sorted(sim_json["results"], key=lambda r: (r["bits_per_value"], r["out"]))
    lines = ["| K/V encoders | bits/value | sim `out` | out_k | out_v | expected KLD | x q4_0 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["bits_per_value"] > bits_max:
            continue
        e = predict(cal, r["out"], exclude) if r["out"] > 0 else 0.0
        lines.append(f"| {r['pair']} | {r['bits_per_value']:.3f} | {r['out']:.4g} | {r['out_k']:.3g} | "
                     f"{r['out_v']:.3g} | {e:.3g} | {e / q4_real:.2f} |")
    return "\n".join(lines)


#: The rows of the side-by-side table in docs/quality-levers.md (the full lists are per model).
CURATED = [
    "q4_0", "kv4", "kv4o", "s4b32o", "nu4b32", "c:kv4", "c:kv4o", "c:s4b32o", "c:nu4b32",
    "sq:kv4/kv4", "sq:c:kv4o", "sm:kv4", "sm:c:kv4", "sm:c:kv4o", "sm:c:s4b32o", "sm:sq:c:kv4o",
    "c:kv4o/kv4o", "sm:c:kv4o/kv4o", "sa:c:kv4o", "sa:c:kv4o/kv4o", "sa:c:s4b64o/kv4o", "c:kv4o/s4b64o",
    "sqb:kv4/kv4", "sqb:c:kv4o/kv4o", "sqb:c:kv4o/s4b64o", "c:s5b32o/c:kv3o",
    "c:s4b64o", "sm:c:s4b64o", "c:nu4b64",
    "kv4/kv3", "c:kv4o/kv3o", "c:kv4o/c:kv3o", "sm:c:kv4o/kv3o", "sq:c:kv4o/c:kv3o", "sm:sq:c:kv4o/kv3o",
    "kv3", "kv3o", "c:kv3", "c:kv3o", "c:s3b32o", "c:nu3b32", "sm:c:kv3o", "sm:c:kv3o/kv3o", "sa:c:kv3o/kv3o",
    "c:s3b64o/kv3o", "sm:c:s3b64o/kv3o",
    "sq:kv3/kv3", "sq:c:kv3o", "sqb:c:kv3o/kv3o",
    "kv4/kv2", "c:kv4o/kv2o", "c:kv4o/c:kv2o", "sm:c:kv4o/kv2o", "sa:c:kv4o/kv2o", "sm:c:s4b64o/kv2o",
    "sm:sq:c:kv4o/kv2o", "sqb:c:kv4o/kv2o", "sw:c:kv4o/kv4o", "sw:c:kv3o/kv3o", "sw:c:kv4o/kv2o",
    "sw:c:s4b64o/kv4o", "sw:c:s3b64o/kv3o",
    "kv2", "c:kv2o", "sm:c:kv2o",
]


def side_by_side(models) -> str:
    """One row per curated pair: bits, expected KLD and its ratio to q4_0's real KLD per model."""
    names = [m[0] for m in models]
    head = "| K/V | bits/value (hd 64 / 256) | " + " | ".join(
        f"{n}: sim out | {n}: exp. KLD (x q4_0)" for n in names) + " |"
    lines = [head, "|---|---:|" + "---:|---:|" * len(names)]
    for pair in CURATED:
        cells, bits = [], {}
        for name, sims, cal, q4, exclude in models:
            r = sims.get(pair)
            if r is None:
                cells += ["–", "–"]
                continue
            bits[r.get("head_dim", 64)] = r["bits_per_value"]
            e = predict(cal, r["out"], exclude)
            cells += [f"{r['out']:.3g}", f"{e:.3g} ({e / q4:.2f})"]
        b = " / ".join(f"{v:.3g}" for _, v in sorted(bits.items()))
        lines.append(f"| {pair} | {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", nargs=3, action="append", metavar=("NAME", "EVAL_JSON[+EVAL_JSON]", "SIM_JSON[+SIM_JSON]"),
                    required=True)
    ap.add_argument("--metric", default="out", choices=["out", "kl", "out_k"])
    ap.add_argument("--bits-max", type=float, default=4.7)
    ap.add_argument("--exclude", default="", help="comma-separated real formats left out of the "
                    "interpolation (formats the simulation is shown to miss), FORMAT or MODEL:FORMAT")
    a = ap.parse_args(argv)
    excl_all = [x for x in a.exclude.split(",") if x]
    combined = []
    for name, ej, *sjs in a.model:
        exclude = tuple(x.split(":", 1)[-1] for x in excl_all if ":" not in x or x.startswith(name + ":"))
        e = {"results": []}
        for one in ej.split("+"):  # several eval runs of one model (same chunks): EVAL1+EVAL2
            seen = {r["format"] for r in e["results"]}
            e["results"] += [r for r in json.loads(Path(one).read_text())["results"] if r["format"] not in seen]
        s = {"results": []}
        for sj in sjs[0].split("+"):  # several simulation runs of one model: SIM1+SIM2
            seen = {r["pair"] for r in s["results"]}
            s["results"] += [r for r in json.loads(Path(sj).read_text())["results"] if r["pair"] not in seen]
        cal = calibrate(e, s, a.metric)
        q4 = next(p[1] for p in cal["points"] if p[0] == "q4_0")
        print(f"## {name}\n\n### calibration\n\n{calibration_table(cal, exclude)}\n\n### levers (<= {a.bits_max} b)\n")
        print(lever_table(s, cal, q4, a.bits_max, exclude) + "\n")
        hd = json.loads(Path(sjs[0].split("+")[0]).read_text())["meta"]["head_dim"]
        combined.append((name, {r["pair"]: dict(r, head_dim=hd) for r in s["results"]}, cal, q4, exclude))
    if len(combined) > 1:
        print("## side by side\n\n" + side_by_side(combined) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
