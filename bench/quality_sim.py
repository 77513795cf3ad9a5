"""Simulate K/V encoders on a model's real attention inputs and score them.

Reads a dump of bench/dump_attn_inputs.py (post-RoPE Q, K, V of every layer for
the first chunk of the eval corpus), applies upstream's Hadamard rotation as
llama.cpp does for quantized caches, encodes K and V with each named encoder of
bench/qsim/levers.py and measures, per layer, the attention error with the real
queries (causal, GQA, sliding window on iSWA layers): KL of the attention
distribution and the relative squared error of the attention output (K and V
errors together, and each alone). Everything is float64 except the shipped
codecs' own float32 arithmetic.

  PYTHONPATH=. python bench/quality_sim.py bench/attn_dumps/qwen --pairs calib --json out.json

``--pairs``: comma-separated ``K/V`` encoder names (``X`` = X for both; for V a
``sq:`` name means its base), or the preset ``calib`` (the formats the real
eval measured), ``levers`` (the study's candidates) or ``smooth`` (per-channel key
smoothing and uncentred V, the second round).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# One BLAS thread: the matrices here are small, and on a shared 2-core machine a
# spinning second OpenBLAS thread made each product ~100x slower.
for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from qsim import attention, codecs, squat  # noqa: E402
from qsim.levers import HeadContext, Lever, parse  # noqa: E402

CALIB = ["f16", "q8_0", "q4_0", "kv4", "kv3", "kv2", "q8_0/kv4", "q8_0/kv3", "kv4/kv3", "q4_0/kv3",
         "kv4/kv2", "q4_0/kv2", "sq:kv4/kv4", "sq:kv3/kv3"]

LEVERS = [
    # encoder-side only (kv* layout and decode kept): error-minimising scales, centring
    "kv4o", "kv3o", "kv2o", "c:kv4", "c:kv3", "c:kv2", "c:kv4o", "c:kv3o", "c:kv2o",
    # symmetric codes (q4_0's layout at 32 per block; 64 per block = 0.25 b less)
    "s4b32o", "s3b32o", "s4b64o", "c:s4b32o", "c:s3b32o", "c:s4b64o", "c:s3b64o",
    # asymmetric 32 per block at 3 bits (4.0 b)
    "c:a3b32o",
    # non-uniform levels (a new decode)
    "nu4b32", "c:nu4b32", "c:nu3b32", "c:nu4b64",
    # SQuat on top
    "sq:kv4o", "sq:c:kv4", "sq:c:kv4o", "sq:c:kv3o", "sq:c:kv2o",
    # K and V at different bits
    "c:kv4o/c:kv3o", "c:kv4o/c:kv2o", "c:kv3o/c:kv2o", "sq:c:kv4o/c:kv3o", "sq:c:kv4o/c:kv2o",
    "sq:c:kv3o/c:kv2o", "c:s4b32o/c:kv3o", "c:s4b32o/c:kv2o", "c:s4b64o/c:kv3o", "c:s4b64o/c:s3b64o",
    "c:kv4o/c:s3b64o", "sq:c:kv4o/c:s3b64o", "q8_0/c:kv3o", "q8_0/c:kv2o",
    # 5-bit keys (s5b32 = q5_0's rule; a5b64o would be a new 5-bit kv layout)
    "s5b32/c:kv3o", "c:s5b32o/c:kv3o", "c:a5b64o/c:kv3o", "c:a5b64o/c:kv2o", "c:s5b32o/c:kv2o",
]


# per-channel key smoothing (added after the first runs showed Qwen2.5's layer-0 keys: one
# channel's spread, not its mean, dominated every block after the rotation), and V
# without centring (centring V hurt on SmolLM2: attention-sink rows have small values)
ADAPTIVE = ["sa:c:kv4o", "sa:c:kv3o", "sa:c:s4b32o", "sa:c:kv4o/kv4o", "sa:c:kv4o/kv3o", "sa:c:kv4o/kv2o",
            "sa:c:kv3o/kv3o", "sa:c:s4b64o/kv2o", "sa:c:s4b64o/kv3o", "sa:c:s4b64o/kv4o", "sa:c:kv3o/kv2o"]

UBATCH = ["sq:c:kv4o/kv4o", "sqb:c:kv4o/kv4o", "sqb:c:kv4o/s4b64o", "sqb:c:kv4o/kv3o", "sqb:c:kv4o/kv2o",
          "sqb:c:kv3o/kv3o", "sq:c:kv3o/kv3o", "sqb:kv4/kv4", "c:kv4o/s4b64o"]

SMOOTH = [
    "kv4o/kv4o", "c:kv4o/kv4o", "c:kv4o/kv3o", "c:kv4o/kv2o",
    "sm:kv4", "sm:c:kv4", "sm:c:kv4o", "sm:c:kv3o", "sm:c:kv2o", "sm:c:s4b32o", "sm:c:s4b64o",
    "sm:c:s3b32o", "sm:sq:c:kv4o", "sm:sq:c:kv3o",
    "sm:c:kv4o/kv4o", "sm:c:kv4o/kv3o", "sm:c:kv4o/kv2o", "sm:c:kv4o/c:kv3o", "sm:c:kv4o/c:kv2o",
    "sm:c:kv3o/kv2o", "sm:c:s4b64o/kv2o", "sm:c:s4b64o/kv3o", "sm:sq:c:kv4o/kv2o", "sm:sq:c:kv4o/kv3o",
    "sm:sq:c:kv3o/kv3o", "sm:c:kv3o/kv3o", "kv4o/kv2o", "kv4o/kv3o",
]


def parse_pairs(spec: str) -> List[Tuple[str, Lever, Lever]]:
    items: List[str] = []
    for tok in spec.split(","):
        tok = tok.strip()
        if tok == "calib":
            items += CALIB
        elif tok == "levers":
            items += LEVERS
        elif tok == "smooth":
            items += SMOOTH
        elif tok == "adaptive":
            items += ADAPTIVE
        elif tok == "ubatch":
            items += UBATCH
        elif tok:
            items.append(tok)
    out, seen = [], set()
    for it in items:
        if it in seen:
            continue
        seen.add(it)
        if "/" in it:
            k, v = it.split("/")
        else:
            k = v = it
        out.append((it, parse(k), parse(v).as_value()))
    return out


def load_dump(path: Path):
    meta = json.loads((path / "meta.json").read_text())
    q = np.load(path / "q.npy", mmap_mode="r")
    k = np.load(path / "k.npy", mmap_mode="r")
    v = np.load(path / "v.npy", mmap_mode="r")
    return meta, q, k, v


def _nu_levels(k_or_v: np.ndarray, n_layer: int, rot: int, fit_tokens: int, mus, bits: int,
               block: int, center: bool) -> np.ndarray:
    """Lloyd-Max levels for x/absmax(block) pooled over layers (first fit_tokens rows)."""
    samples = []
    rng = np.random.default_rng(0)
    for il in range(n_layer):
        x = attention.rotate(np.asarray(k_or_v[il, :fit_tokens], np.float64), rot)  # [t, Hkv, D]
        if center:
            x = x - mus[il][None]
        b = x.reshape(-1, block)
        a = np.abs(b).max(1, keepdims=True)
        s = (b / np.where(a > 0, a, 1)).ravel()
        samples.append(rng.choice(s, size=min(s.size, 8000), replace=False))
    return codecs.lloyd_max(np.concatenate(samples), 1 << bits, iters=40)


def simulate(dump: Path, pairs: Sequence[Tuple[str, Lever, Lever]], n_queries: int = 128,
             fit_tokens: int = 512, ctx: int = 2048, layers: Sequence[int] = (),
             squat_rank: int = 20, squat_lambda: float = 100.0, verbose: bool = True) -> Dict:
    meta, Q, K, V = load_dump(dump)
    T, H, Hkv, D = meta["n_tokens"], meta["n_head"], meta["n_head_kv"], meta["head_dim"]
    n_layer = meta["n_layer"]
    krot, vrot = attention.k_rot_size(D), attention.v_rot_size(D)
    # queries scored: evenly spread over the second half, like eval's scored positions
    q_pos = np.unique(np.linspace(T // 2, T - 1, n_queries).round().astype(int))
    layer_ids = list(layers) or list(range(n_layer))

    k_levers = {kl.name: kl for _, kl, _ in pairs}
    v_levers = {vl.name: vl for _, _, vl in pairs}

    # centring means per layer (rotated domain), needed up front for the NU codebooks
    mus_k = [attention.rotate(np.asarray(K[il, :fit_tokens], np.float64), krot).mean(0) for il in range(n_layer)]
    mus_v = [attention.rotate(np.asarray(V[il, :fit_tokens], np.float64), vrot).mean(0) for il in range(n_layer)]
    levels: Dict[Tuple[str, str], np.ndarray] = {}
    for side, levs, arr, rot, mus in (("k", k_levers, K, krot, mus_k), ("v", v_levers, V, vrot, mus_v)):
        for lv in levs.values():
            if lv.needs_levels:
                key = (side, lv.base + ("c" if lv.center else ""))
                if key not in levels:
                    bits, block = (int(t) for t in lv.base[2:].split("b"))
                    levels[key] = _nu_levels(arr, n_layer, rot, fit_tokens, mus, bits, block, lv.center)

    res = {name: {"layers": []} for name, _, _ in pairs}
    k_only: Dict[str, List[Dict]] = {n: [] for n in k_levers}
    t0 = time.time()
    for il in layer_ids:
        swa = meta["n_swa"] if il in meta.get("swa_layers", []) else 0
        q = np.asarray(Q[il], np.float64)
        k = np.asarray(K[il], np.float64)
        v = np.asarray(V[il], np.float64)
        # the f16 reference cache stores fp16 K and V (and the f16 kernel reads fp16 Q)
        qr = attention.rotate(codecs.fp16(q).astype(np.float64), krot)
        kr = attention.rotate(codecs.fp16(k).astype(np.float64), krot)
        vr = attention.rotate(codecs.fp16(v).astype(np.float64), vrot)
        ref = attention.LayerReference(qr, kr, vr, q_pos, meta["kq_scale"], swa)
        # rows as the quantizers see them: rotated f32 K/V (exact, not fp16-rounded)
        kq = attention.rotate(k, krot)
        vq = attention.rotate(v, vrot)
        qsel = attention.rotate(q, krot)[q_pos]
        q8 = codecs.q8_query(qsel.reshape(-1, D)).reshape(qsel.shape)

        # the fitting prompt's queries (rotated), subsampled, for fit-time decisions ("sa:")
        qsel_fit = qr[:fit_tokens:4]
        ctxs_k, ctxs_v = [], []
        for g in range(Hkv):
            grp = qr[:fit_tokens, g * (H // Hkv):(g + 1) * (H // Hkv)].reshape(-1, D)
            U = Us = sm = None
            if any(lv.smooth for lv in k_levers.values()):
                # channel scales in the unrotated domain, from the first rows of K and the group's Q
                k0 = k[:fit_tokens, g]
                rk = np.sqrt(((k0 - k0.mean(0)) ** 2).mean(0)) + 1e-6
                q0 = q[:fit_tokens, g * (H // Hkv):(g + 1) * (H // Hkv)].reshape(-1, D)
                rq = np.sqrt((q0 ** 2).mean(0)) + 1e-6
                sm = np.sqrt(rk / rq)
                sm = codecs.fp16(sm / np.exp(np.log(sm).mean())).astype(np.float64)
            if any(lv.squat and not lv.smooth for lv in k_levers.values()):
                U = squat.packed_fp16(squat.prepare(grp, squat_rank, squat_lambda, True))
            if any(lv.squat and lv.smooth for lv in k_levers.values()):
                # SQuat after smoothing sees the queries as the kernel does: H (q * s)
                gq = attention.rotate(attention.rotate(grp, krot) * sm, krot)
                Us = squat.packed_fp16(squat.prepare(gq, squat_rank, squat_lambda, True))
            Ul = None
            if any(lv.squat_per_ubatch for lv in k_levers.values()):
                Ul = []
                for a in range(0, T, fit_tokens):
                    gq = qr[a:a + fit_tokens, g * (H // Hkv):(g + 1) * (H // Hkv)].reshape(-1, D)
                    Ul.append((a, min(T, a + fit_tokens),
                               squat.packed_fp16(squat.prepare(gq, squat_rank, squat_lambda, True))))
            ctxs_k.append((U, Us, sm, mus_k[il][g], Ul))
            ctxs_v.append(mus_v[il][g])

        def enc(lv: Lever, x: np.ndarray, side: str) -> np.ndarray:
            out = np.empty_like(x)
            lev = levels.get((side, lv.base + ("c" if lv.center else "")))
            for g in range(Hkv):
                if side == "k":
                    U, Us, sm, mu, Ul = ctxs_k[g]
                    grp_q = qsel_fit[:, g * (H // Hkv):(g + 1) * (H // Hkv)].reshape(-1, D)
                    hc = HeadContext(mu=mu, U=Us if lv.smooth else U, levels=lev, smooth=sm, rot=krot,
                                     fit_q=grp_q, fit_rows=fit_tokens, U_list=Ul,
                                     fit_q_pos=np.repeat(np.arange(0, fit_tokens, 4), H // Hkv),
                                     kq_scale=meta["kq_scale"])
                else:
                    hc = HeadContext(mu=ctxs_v[g], levels=lev)
                out[:, g] = lv.encode(x[:, g], hc)
            return out

        v_hat = {name: enc(lv, vq, "v") for name, lv in v_levers.items()}
        for kname, kl in k_levers.items():
            k_hat = enc(kl, kq, "k")
            q_hat = q8 if kl.is_quantized else qsel  # CPU FA converts Q to K's vec_dot type
            p_hat = ref.probs_hat(k_hat, q_hat)
            kl_val = ref.kl(p_hat)
            out_k = ref.out_err(p_hat, None)
            k_only[kname].append({"kl": kl_val, "out_k": out_k})
            for name, kk, vv in pairs:
                if kk.name != kname:
                    continue
                res[name]["layers"].append({
                    "layer": il, "swa": bool(swa), "kl": kl_val, "out_k": out_k,
                    "out_v": ref.out_err(None, v_hat[vv.name]),
                    "out": ref.out_err(p_hat, v_hat[vv.name]),
                })
            del p_hat
        if verbose:
            print(f"layer {il}: {time.time() - t0:.0f}s", file=sys.stderr, flush=True)

    results = []
    for name, kk, vv in pairs:
        ls = res[name]["layers"]
        bk, bv = kk.bits(D, ctx), vv.bits(D, ctx)
        results.append({
            "pair": name, "k": kk.name, "v": vv.name,
            "bits_k": bk, "bits_v": bv, "bits_per_value": (bk + bv) / 2,
            "out": float(sum(x["out"] for x in ls)),
            "out_k": float(sum(x["out_k"] for x in ls)),
            "out_v": float(sum(x["out_v"] for x in ls)),
            "kl": float(sum(x["kl"] for x in ls)),
            "layers": ls,
        })
    return {"dump": str(dump), "meta": {k: v for k, v in meta.items() if k != "tokens"},
            "settings": {"n_queries": len(q_pos), "fit_tokens": fit_tokens, "ctx": ctx,
                         "layers": layer_ids, "k_rot": krot, "v_rot": vrot,
                         "squat_rank": squat_rank, "squat_lambda": squat_lambda},
            "results": results, "elapsed_s": time.time() - t0}


def table(result: Dict) -> str:
    lines = ["| pair | bits/value | out (sum over layers) | out_k | out_v | attn KL (sum) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in result["results"]:
        lines.append(f"| {r['pair']} | {r['bits_per_value']:.3f} | {r['out']:.4g} | {r['out_k']:.4g} | "
                     f"{r['out_v']:.4g} | {r['kl']:.4g} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dump")
    ap.add_argument("--pairs", default="calib")
    ap.add_argument("--queries", type=int, default=128)
    ap.add_argument("--fit-tokens", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=2048, help="context the side state is spread over")
    ap.add_argument("--layers", default="", help="comma-separated layer ids (default all)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    layers = [int(x) for x in a.layers.split(",") if x.strip()]
    r = simulate(Path(a.dump), parse_pairs(a.pairs), a.queries, a.fit_tokens, a.ctx, layers)
    print(table(r))
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
