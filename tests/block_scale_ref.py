"""numpy references of the kv* block encoder's scale search (native/src/block_scale.c).

Two of them, for two different checks:

* :func:`block_scale_f32` repeats the C search operation by operation in
  float32 (numpy's float32 ops round like C's without contraction; sums in the
  warp butterfly's order), vectorised over blocks: the C library and the CUDA
  encoder must return exactly its (d, m).
* :func:`block_scale_f64` is the same rule in float64, with no attention to
  rounding order: what the search *means*. Tests compare the stored error of
  the library's blocks against it and against the min/max rule.
"""
import numpy as np

B = 64
F = np.float32
GRIDS = 8
ROUNDS = 3


def sanitize(x):
    x = np.asarray(x, F)
    return np.where(np.isnan(x), F(0), np.clip(x, F(-65504), F(65504))).astype(F)


def fp16_f32(x):
    """float32 -> fp16 (round to nearest even) -> float32."""
    return np.asarray(x, F).astype(np.float16).astype(F)


def warp_order_sum(v):
    """Sum over the last axis (64) in the order of a warp's xor butterfly."""
    p = v[..., :32] + v[..., 32:]
    o = 16
    while o:
        p = p[..., :o] + p[..., o:2 * o]
        o //= 2
    return p[..., 0]


def _codes(x, d, m, L):
    with np.errstate(divide="ignore"):
        idv = np.where(d > 0, F(1) / np.where(d > 0, d, F(1)), F(0)).astype(F)
    c = np.floor((x - m[:, None]) * idv[:, None] + F(0.5))
    return np.clip(c, F(0), F(L)).astype(F)


def _stored_error(x, d, m, L):
    c = _codes(x, d, m, L)
    t = (m[:, None] + d[:, None] * c) - x
    return warp_order_sum(t * t), c


def minmax_f32(x, bits):
    """The search's candidate 0 and SQuat's block rule, float32: m = fp16(min), d = fp16((max - m) / L),
    d one fp16 step smaller where m + L d would pass 65504."""
    L = (1 << bits) - 1
    x = sanitize(x).reshape(-1, B)
    m = fp16_f32(x.min(1))
    d = fp16_f32((x.max(1) - m) / F(L))
    over = (m + F(L) * d) > F(65504)
    dbits = d.astype(np.float16).view(np.uint16)
    d = np.where(over, (dbits - np.uint16(1)).view(np.float16).astype(F), d)
    return d.astype(F), m.astype(F)


def block_scale_f32(x, bits):
    """(d, m) as float32 per block of 64 sanitized values, x shape (n, 64)."""
    L = (1 << bits) - 1
    x = sanitize(x).reshape(-1, B)
    mn, mx = x.min(1), x.max(1)
    bd, bm = minmax_f32(x, bits)
    best, _ = _stored_error(x, bd, bm, L)
    rng = (mx - mn).astype(F)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        search = (rng > 0) & np.isfinite(F(L) / np.where(rng > 0, rng, F(1)))
    safe_rng = np.where(search, rng, F(1)).astype(F)
    y = (x - mn[:, None]).astype(F)
    sy = warp_order_sum(y)
    for g in range(GRIDS):
        isc = ((F(L) - F(0.5) + F(g >> 1)) / safe_rng).astype(F)
        v = (mx[:, None] - x) if g & 1 else y
        c = np.minimum(np.floor(v * isc[:, None] + F(0.5)), F(L)).astype(F)
        q = (F(L) - c) if g & 1 else c
        alive = search.copy()
        for _ in range(ROUNDS):
            sq, sqq, sqy = warp_order_sum(q), warp_order_sum(q * q), warp_order_sum(q * y)
            det = F(B) * sqq - sq * sq
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                d = (F(B) * sqy - sq * sy) / np.where(det > 0, det, F(1))
                m = mn + (sy - d * sq) * F(1.0 / B)
                ok = (det > 0) & (d > 0) & (d <= 65504) & (m >= -65504) & (m <= 65504)
                dh = fp16_f32(np.where(ok, d, F(1)))
                mh = fp16_f32(np.where(ok, m, F(0)))
            alive &= ok & (dh > 0) & (mh + F(L) * dh <= F(65504))
            e, q = _stored_error(x, np.where(alive, dh, F(1)), np.where(alive, mh, F(0)), L)
            better = alive & (e < best)
            best = np.where(better, e, best)
            bd = np.where(better, dh, bd)
            bm = np.where(better, mh, bm)
    return bd.astype(F), bm.astype(F)


def encode_f32(x, bits):
    """(d, m, codes) of every block, as the C encoder writes them."""
    L = (1 << bits) - 1
    x = sanitize(x).reshape(-1, B)
    d, m = block_scale_f32(x, bits)
    return d, m, _codes(x, d, m, L).astype(np.int64)


def _f16(x):
    return np.asarray(x, np.float64).astype(np.float16).astype(np.float64)


def stored_error_f64(x, d, m, bits):
    """Squared error per block of x stored as (d, m) with round-to-nearest codes, float64."""
    L = (1 << bits) - 1
    x = np.asarray(x, np.float64).reshape(-1, B)
    d = np.asarray(d, np.float64)
    m = np.asarray(m, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.where(d[:, None] > 0, np.floor((x - m[:, None]) / np.where(d > 0, d, 1)[:, None] + 0.5), 0)
    c = np.clip(c, 0, L)
    return ((m[:, None] + d[:, None] * c - x) ** 2).sum(1)


def minmax_f64(x, bits):
    """The old rule, float64: m = fp16(min), d = fp16((max - m) / L)."""
    L = (1 << bits) - 1
    x = np.asarray(x, np.float64).reshape(-1, B)
    m = _f16(x.min(1))
    return _f16((x.max(1) - m) / L), m


def block_scale_f64(x, bits):
    """The search's rule in float64: the same candidates, least squares in
    float64, each scored with its fp16 (d, m); returns (d, m) per block."""
    L = (1 << bits) - 1
    x = np.asarray(x, np.float64).reshape(-1, B)
    bd, bm = minmax_f64(x, bits)
    best = stored_error_f64(x, bd, bm, bits)
    mn, mx = x.min(1), x.max(1)
    rng = np.where(mx > mn, mx - mn, 1.0)
    search = mx > mn
    for g in range(GRIDS):
        isc = (L - 0.5 + (g >> 1)) / rng
        v = (mx[:, None] - x) if g & 1 else (x - mn[:, None])
        c = np.minimum(np.floor(v * isc[:, None] + 0.5), L)
        q = (L - c) if g & 1 else c
        alive = search.copy()
        for _ in range(ROUNDS):
            sq, sqq, sqx, sx = q.sum(1), (q * q).sum(1), (q * x).sum(1), x.sum(1)
            det = B * sqq - sq * sq
            with np.errstate(divide="ignore", invalid="ignore"):
                d = (B * sqx - sq * sx) / np.where(det > 0, det, 1)
                m = (sx - d * sq) / B
            ok = (det > 0) & (d > 0) & (d <= 65504) & (np.abs(m) <= 65504)
            dh, mh = _f16(np.where(ok, d, 1)), _f16(np.where(ok, m, 0))
            alive &= ok & (dh > 0) & (mh + L * dh <= 65504)
            e = stored_error_f64(x, np.where(alive, dh, 1), np.where(alive, mh, 0), bits)
            with np.errstate(divide="ignore", invalid="ignore"):
                q = np.clip(np.floor((x - mh[:, None]) / np.where(dh > 0, dh, 1)[:, None] + 0.5), 0, L)
            better = alive & (e < best)
            best = np.where(better, e, best)
            bd = np.where(better, dh, bd)
            bm = np.where(better, mh, bm)
    return bd, bm
