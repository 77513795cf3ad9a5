"""Block codecs of the KV-cache quality simulation, in numpy.

Every codec maps rows ``x`` (shape ``[N, D]``, D a multiple of its block) to
their reconstruction (float64, same shape): what attention would read back.
Storage rounding is modelled where it matters: block scales and minimums are
stored as fp16 and the codes are computed against the stored values, exactly
like the C codec (``native/src/kvblock.c``) and ggml's reference quantizers.

Three families:

* ``kv_c``      the shipped kv2/kv3/kv4 encoder, bit for bit (float32 arithmetic,
                fp16 scale and min from the block's min/max);
* ``q4_0/q8_0`` ggml's reference encoders (what llama.cpp's CPU set_rows runs);
* levers       encoder-side changes that keep a block layout (error-minimising
                scales for asymmetric and symmetric codes, other block sizes),
                and non-uniform levels (a new decode: a codebook lookup).
"""

from __future__ import annotations

import numpy as np

F32 = np.float32


def fp16(x) -> np.ndarray:
    """Round to IEEE half (nearest even, like pkv_fp32_to_fp16 and ggml), back as float32."""
    return np.asarray(x, dtype=F32).astype(np.float16).astype(F32)


def _blocks(x: np.ndarray, block: int, dtype=F32) -> np.ndarray:
    n, d = x.shape
    if d % block:
        raise ValueError(f"row length {d} is not a multiple of the block {block}")
    return np.ascontiguousarray(x, dtype=dtype).reshape(n, d // block, block)


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C roundf: halves away from zero (numpy's round is half to even)."""
    return np.sign(v) * np.floor(np.abs(v) + F32(0.5))


# --------------------------------------------------------------------------- shipped codecs


def kv_c(x: np.ndarray, bits: int, block: int = 64) -> np.ndarray:
    """The min/max block code + decode: asymmetric, fp16 d and m, float32 arithmetic
    (the kv encoders' rule until 2026-12-07, SQuat's block rule since; the kv
    encoders now search, as :func:`kv_opt` simulates)."""
    b = _blocks(x, block)
    L = F32((1 << bits) - 1)
    mn = b.min(axis=2, keepdims=True)
    mx = b.max(axis=2, keepdims=True)
    m = fp16(mn)
    d = fp16((mx - m) / L)
    with np.errstate(divide="ignore"):
        idv = np.where(d > 0, F32(1.0) / d, F32(0.0)).astype(F32)
    q = np.floor((b - m) * idv + F32(0.5))
    q = np.clip(q, 0, L)
    return (m + d * q).astype(np.float64).reshape(x.shape)


def q4_0(x: np.ndarray) -> np.ndarray:
    """ggml quantize_row_q4_0_ref + dequantize: 32 values, d = signed absmax / -8, fp16 d."""
    return _sym_ggml(x, bits=4, block=32)


def _sym_ggml(x: np.ndarray, bits: int, block: int) -> np.ndarray:
    """q4_0's rule for any width: d = (value of largest |x|) / -2^(b-1), codes -2^(b-1)..2^(b-1)-1."""
    b = _blocks(x, block)
    half = 1 << (bits - 1)
    idx = np.argmax(np.abs(b), axis=2)[..., None]  # first of equal |x|, like ggml's strict <
    mx = np.take_along_axis(b, idx, axis=2)
    d = (mx / F32(-half)).astype(F32)
    with np.errstate(divide="ignore"):
        idv = np.where(d != 0, F32(1.0) / d, F32(0.0)).astype(F32)
    # (int8_t)(x*id + half + 0.5) truncates toward zero; the argument is >= 0.5 here
    qi = np.minimum(F32(2 * half - 1), np.trunc(b * idv + F32(half + 0.5)))
    return ((qi - half) * fp16(d)).astype(np.float64).reshape(x.shape)


def q8_0(x: np.ndarray) -> np.ndarray:
    """ggml quantize_row_q8_0_ref + dequantize: 32 values, d = absmax/127, roundf, fp16 d."""
    b = _blocks(x, 32)
    amax = np.abs(b).max(axis=2, keepdims=True)
    d = (amax / F32(127)).astype(F32)
    with np.errstate(divide="ignore"):
        idv = np.where(d != 0, F32(1.0) / d, F32(0.0)).astype(F32)
    q = _round_half_away(b * idv)
    return (q * fp16(d)).astype(np.float64).reshape(x.shape)


# --------------------------------------------------------------------------- levers: scales


def _lsq_affine(b: np.ndarray, q: np.ndarray):
    """Least-squares (d, m) of b ~ m + d q per block (float64); falls back to d=0, m=mean."""
    n = b.shape[-1]
    sq, sx = q.sum(-1), b.sum(-1)
    sqq, sqx = (q * q).sum(-1), (q * b).sum(-1)
    det = n * sqq - sq * sq
    ok = det > 0
    safe = np.where(ok, det, 1.0)
    d = np.where(ok, (n * sqx - sq * sx) / safe, 0.0)
    m = np.where(ok, (sqq * sx - sq * sqx) / safe, sx / n)
    return d, m


def kv_opt_params(b: np.ndarray, bits: int, nstep: int = 24, rmin: float = -1.0,
                  rdelta: float = 0.25, iters: int = 3):
    """Error-minimising (d, m) of asymmetric blocks ``b`` ([..., block]), fp16-rounded.

    Candidate code grids (make_qkx2_quants' idea): iscale = (L + rmin + rdelta*i)/(max-min)
    for i = 0..nstep (from one level coarser to ~1.4x finer than min/max at 4 bits), codes
    rounded from the min or from the max; for each, the least-squares (d, m) of the
    block given its codes; a few Lloyd steps (re-assign codes, refit); keep the lowest
    squared error. Then d and m are rounded to fp16 (the codes are computed against the
    stored values with the C codec's expression by :func:`apply_affine`), so decode is
    kv*'s, unchanged.
    """
    L = (1 << bits) - 1
    mn = b.min(-1)
    mx = b.max(-1)
    rng = np.maximum(mx - mn, 1e-30)
    best_err = np.full(mn.shape, np.inf)
    best_d = rng / L
    best_m = mn.copy()
    for i in range(-1, 2 * (nstep + 1)):
        if i < 0:
            d, m = rng / L, mn  # plain min/max
        else:
            # code grids a little coarser or finer than min/max, anchored at either end
            isc = (L + rmin + rdelta * (i // 2)) / rng
            if i % 2 == 0:
                q = np.clip(np.rint((b - mn[..., None]) * isc[..., None]), 0, L)
            else:
                q = np.clip(L - np.rint((mx[..., None] - b) * isc[..., None]), 0, L)
            d, m = _lsq_affine(b, q)
        for _ in range(iters + 1):
            dd = np.where(np.abs(d) > 0, d, 1.0)
            q = np.clip(np.rint((b - m[..., None]) / dd[..., None]), 0, L)
            q = np.where(np.abs(d)[..., None] > 0, q, 0)
            err = ((m[..., None] + d[..., None] * q - b) ** 2).sum(-1)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_d = np.where(better, d, best_d)
            best_m = np.where(better, m, best_m)
            d, m = _lsq_affine(b, q)
    # stored as the codec does: fp16 d and m
    return np.abs(fp16(best_d)).astype(np.float64), fp16(best_m).astype(np.float64)


def apply_affine(x: np.ndarray, d: np.ndarray, m: np.ndarray, n_codes: int, block: int) -> np.ndarray:
    """Codes against stored (d, m) per block with the C rounding expression; reconstruction."""
    b = _blocks(x, block, np.float64)
    d, m = d[..., None], m[..., None]
    inv = np.where(d != 0, 1.0 / np.where(d != 0, d, 1.0), 0.0)
    q = np.clip(np.floor((b - m) * inv + 0.5), 0, n_codes - 1)
    return (m + d * q).reshape(x.shape)


def kv_opt(x: np.ndarray, bits: int, block: int = 64, **kw) -> np.ndarray:
    """Asymmetric block (kv*'s layout and decode) with the error-minimising d and m of
    :func:`kv_opt_params`."""
    d, m = kv_opt_params(_blocks(x, block, np.float64), bits, **kw)
    return apply_affine(x, d, m, 1 << bits, block)


def sym_opt(x: np.ndarray, bits: int, block: int = 32, ntry: int = 9) -> np.ndarray:
    """Symmetric block (q4_0's layout: fp16 d, codes -2^(b-1)..2^(b-1)-1) with an
    error-minimising scale (make_qx_quants' idea): iscale = -(nmax + 0.1 i)/max for
    |i| <= ntry, the least-squares d for each code assignment, keep the best; codes then
    recomputed against fp16(d). ``ntry=0`` with the final refit still beats q4_0's rule."""
    d, m = sym_opt_params(_blocks(x, block, np.float64), bits, ntry)
    return apply_affine(x, d, m, 1 << bits, block)


def sym_opt_params(b: np.ndarray, bits: int, ntry: int = 9):
    """(d, m = -2^(b-1) d) of :func:`sym_opt` for blocks ``b``, d fp16-rounded: the symmetric
    code written as an affine one, x ~ m + d c with c in 0..2^b-1."""
    half = 1 << (bits - 1)
    idx = np.argmax(np.abs(b), axis=-1)[..., None]
    mx = np.take_along_axis(b, idx, axis=-1)[..., 0]
    mxs = np.where(mx != 0, mx, 1.0)
    best_err = np.full(mx.shape, np.inf)
    best_d = mx / -half
    for i in range(-ntry, ntry + 1):
        isc = -(half + 0.1 * i) / mxs
        q = np.clip(np.rint(b * isc[..., None]), -half, half - 1)
        qq = (q * q).sum(-1)
        d = np.where(qq > 0, (q * b).sum(-1) / np.where(qq > 0, qq, 1.0), 0.0)
        err = ((d[..., None] * q - b) ** 2).sum(-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_d = np.where(better, d, best_d)
    d16 = fp16(best_d).astype(np.float64)
    return d16, -half * d16


def sym_minmax(x: np.ndarray, bits: int, block: int = 32) -> np.ndarray:
    """q4_0's rule at any width and block (``sym_minmax(x, 4, 32)`` = ``q4_0(x)``)."""
    return _sym_ggml(x, bits, block)


# --------------------------------------------------------------------------- levers: levels


def lloyd_max(samples: np.ndarray, n_levels: int, iters: int = 60, symmetric: bool = True) -> np.ndarray:
    """1-D Lloyd-Max quantizer levels for the empirical distribution of ``samples``
    (sorted, float64). ``symmetric`` fits on |x| mirrored (levels come in +- pairs)."""
    s = np.asarray(samples, np.float64).ravel()
    if symmetric:
        s = np.concatenate([s, -s])
    levels = np.quantile(s, (np.arange(n_levels) + 0.5) / n_levels)
    for _ in range(iters):
        edges = (levels[1:] + levels[:-1]) / 2
        idx = np.searchsorted(edges, s)
        sums = np.bincount(idx, weights=s, minlength=n_levels)
        cnt = np.bincount(idx, minlength=n_levels)
        levels = np.where(cnt > 0, sums / np.maximum(cnt, 1), levels)
        levels.sort()
    if symmetric:
        levels = (levels - levels[::-1]) / 2
    return levels


def nonuniform(x: np.ndarray, levels: np.ndarray, block: int = 32, ntry: int = 7) -> np.ndarray:
    """Symmetric non-uniform code (iq4_nl's layout: fp16 scale + b-bit index per value):
    x ~ d * levels[code]. ``levels`` are normalised so that max |level| = 1; the scale
    starts at the block's absmax and a few shrink factors are tried (lowest error wins)."""
    lv = np.asarray(levels, np.float64)
    lv = lv / np.abs(lv).max()
    edges = (lv[1:] + lv[:-1]) / 2
    b = _blocks(x, block, np.float64)
    amax = np.abs(b).max(-1)
    best_err = np.full(amax.shape, np.inf)
    best = np.zeros_like(b)
    for i in range(ntry + 1):
        d = fp16(amax * (1.0 - 0.04 * i)).astype(np.float64)
        ds = np.where(d > 0, d, 1.0)
        code = np.searchsorted(edges, b / ds[..., None])
        r = d[..., None] * lv[code]
        err = ((r - b) ** 2).sum(-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better[..., None], r, best)
    return best.reshape(x.shape)


# --------------------------------------------------------------------------- query side


def q8_query(x: np.ndarray) -> np.ndarray:
    """What the CPU flash-attention kernel does to Q for a quantized K: q8_0/q8_1 blocks of 32
    (absmax/127, fp16 d). Applied to the (rotated) query before the K dot products."""
    return q8_0(x)
