"""Property tests (hypothesis) of the kv2/kv3/kv4 block codec through
pyllm_kv.native, on random and adversarial rows.

Rows are 1-8 blocks of 64 values; each block is drawn from one input class:
gaussian at scales 1e-6..1e4, zeros (+-0), constants (any finite float32),
fp32 subnormals, +-huge (up to +-3.4e38), one outlier among small values,
NaN/+-Inf sprinkled into normal values, or arbitrary float32 (hypothesis'
own float strategy: NaN, Inf, subnormals, extremes). The same classes, plus
unaligned exact-size buffers under ASan/UBSan, are fuzzed in C by
native/tests/fuzz_codec.c (tests/test_sanitizers.py).

What is checked per block follows from the format (pkv/codec.h) and the
encoder's scale search (native/src/block_scale.c): the stored fp16 d and m are
exactly those of the float32 reference (tests/block_scale_ref.py), decode is
m + d * code, decoded values stay within the block's range widened by one step
(plus fp16's rounding of m), and the stored squared error is no worse than the
min/max rule's (the search's first candidate), up to float32 scoring.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pyllm_kv import native

import block_scale_ref as bsr

BITS = [2, 3, 4]
B = native.BLOCK
F16_MAX = 65504.0
F32_MAX = float(np.finfo(np.float32).max)   # 3.4028235e38
F32_TINY = float(np.finfo(np.float32).tiny)  # smallest normal; below it: subnormal

# about 12 s of CPU for the whole file on the 2-core dev machine
FUZZ = settings(deadline=None, max_examples=120, suppress_health_check=[HealthCheck.too_slow])


# ---- input classes -------------------------------------------------------------------

@st.composite
def blocks(draw, kinds=("gauss", "zeros", "const", "denormal", "huge", "outlier", "nonfinite",
                        "floats")):
    """One block of 64 float32 values from one input class."""
    kind = draw(st.sampled_from(kinds))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "gauss":
        x = draw(st.floats(-1e4, 1e4)) + 10.0 ** draw(st.integers(-6, 4)) * rng.standard_normal(B)
    elif kind == "zeros":
        x = np.zeros(B) * draw(st.sampled_from([1.0, -1.0]))
    elif kind == "const":
        x = np.full(B, draw(st.floats(width=32, allow_nan=False, allow_infinity=False)))
    elif kind == "denormal":
        x = rng.uniform(-1, 1, B) * F32_TINY
        x[draw(st.integers(0, B - 1))] = draw(st.floats(-F32_TINY, F32_TINY, width=32))
    elif kind == "huge":
        x = rng.choice([-1.0, 1.0], B) * np.minimum(10.0 ** rng.uniform(30, 38.6, B), F32_MAX)
        x[draw(st.integers(0, B - 1))] = draw(st.sampled_from([F32_MAX, -F32_MAX, 65504.0, 65520.0]))
    elif kind == "outlier":
        x = 10.0 ** draw(st.integers(-4, 0)) * rng.standard_normal(B)
        big = draw(st.floats(1.0, F32_MAX, width=32)) * draw(st.sampled_from([1.0, -1.0]))
        x[draw(st.integers(0, B - 1))] = big
    elif kind == "nonfinite":
        x = 10.0 ** draw(st.integers(-3, 3)) * rng.standard_normal(B)
        where = draw(st.lists(st.integers(0, B - 1), min_size=1, max_size=B))
        x[where] = draw(st.lists(st.sampled_from([np.nan, np.inf, -np.inf]), min_size=len(where),
                                 max_size=len(where)))
    else:
        x = np.array(draw(st.lists(st.floats(width=32), min_size=B, max_size=B)))
    return x.astype(np.float32)


def rows(**kw):
    return st.lists(blocks(**kw), min_size=1, max_size=8).map(np.concatenate)


# ---- the format, restated ------------------------------------------------------------

def policy(x):
    """codec.h's non-finite input policy: NaN -> 0, +-Inf and beyond -> +-65504."""
    x = np.asarray(x, dtype=np.float32)
    return np.clip(np.where(np.isnan(x), np.float32(0), x), -F16_MAX, F16_MAX).astype(np.float32)


def split(bits, packed):
    """(d, m, codes) per block, decoded from the bytes by codec.h's layout."""
    blk = packed.reshape(-1, native.block_bytes(bits))
    d = blk[:, 0:2].copy().view(np.float16).astype(np.float64).ravel()
    m = blk[:, 2:4].copy().view(np.float16).astype(np.float64).ravel()
    p = blk[:, 4:].astype(np.int64)
    if bits == 4:
        codes = np.concatenate([p & 15, p >> 4], axis=1)
    else:
        ql = p[:, :16]
        codes = np.concatenate([(ql >> (2 * s)) & 3 for s in range(4)], axis=1)
        if bits == 3:
            j = np.arange(B)
            codes |= ((p[:, 16 + j % 8] >> (j // 8)) & 1) << 2
    return d, m, codes


def check_blocks(bits, xs, d, m, y):
    """Per block of the policy-mapped input xs with its stored d, m and decode
    y: y within [min, max] widened by a step and fp16's rounding of m, and the
    squared error no worse than the min/max rule's (float32 scoring slack)."""
    xb = xs.astype(np.float64).reshape(-1, B)
    yb = y.astype(np.float64).reshape(-1, B)
    d0, m0 = bsr.minmax_f32(xs, bits)
    err0 = bsr.stored_error_f64(xb, d0, m0, bits)
    err = ((yb - xb) ** 2).sum(1)
    amax = np.abs(xb).max(1)
    # float32 scoring: each residual is off by ~ an ulp of the block's largest value
    slack = 1e-4 * err0 + 4 * np.sqrt(B * err0) * amax * 2.0**-23 + B * (amax * 2.0**-22) ** 2 + 2.0**-140
    bad = np.flatnonzero(err > err0 + slack)
    assert bad.size == 0, f"block {bad[0]}: squared error {err[bad[0]]} > min/max rule's {err0[bad[0]]}"
    widen = (np.abs(d) * 1.01 + amax * 2.0**-10 + 2.0**-24)[:, None]
    assert np.all(yb >= xb.min(1)[:, None] - widen) and np.all(yb <= xb.max(1)[:, None] + widen)


# ---- properties ----------------------------------------------------------------------

@pytest.mark.parametrize("bits", BITS)
@FUZZ
@given(x=rows())
def test_round_trip(bits, x):
    """Decode is finite; d and m are the float32 reference search's, decode
    is m + d * code, each block within its range and no worse than the min/max
    rule (check_blocks); the encoder's output always validates."""
    packed = native.quantize(bits, x)
    assert packed.size == x.size // B * native.block_bytes(bits)
    assert native.validate(bits, packed)
    y = native.dequantize(bits, packed, x.size)
    assert np.all(np.isfinite(y))

    xs = policy(x)
    d, m, codes = split(bits, packed)
    xb = xs.reshape(-1, B)
    mn, mx = xb.min(1), xb.max(1)
    d_want, m_want = bsr.block_scale_f32(xs, bits)
    np.testing.assert_array_equal(d, d_want)
    np.testing.assert_array_equal(m, m_want)
    # decode is m + d * code (d * code is exact in float32: 11 bits times 4)
    np.testing.assert_array_equal(
        y, (m[:, None].astype(np.float32) + (d[:, None] * codes).astype(np.float32)).ravel())
    check_blocks(bits, xs, d, m, y)
    # a constant block (after the policy) decodes to one value, repeated
    yc = y.reshape(-1, B)[mn == mx]
    np.testing.assert_array_equal(yc, np.repeat(yc[:, :1], B, axis=1))


@pytest.mark.parametrize("bits", BITS)
@FUZZ
@given(x=rows(kinds=("nonfinite", "huge", "floats", "gauss")), v=st.floats(0, 1, width=32))
def test_nonfinite_policy(bits, x, v):
    """NaN is stored as 0 and +-Inf (and anything beyond +-65504) as +-65504:
    the bytes equal those of the substituted row. Attention then reads finite
    values: decode (K rows in tiled prefill, V rows), the V accumulation and
    the K dot product all stay finite, at the substituted values."""
    packed = native.quantize(bits, x)
    np.testing.assert_array_equal(packed, native.quantize(bits, policy(x)))
    y = native.dequantize(bits, packed, x.size)
    d, m, _ = split(bits, packed)
    check_blocks(bits, policy(x), d, m, y)
    assert np.all(np.isfinite(y)) and np.all(np.abs(y) <= F16_MAX)

    acc = native.vec_mad(bits, np.zeros(x.size, np.float32), packed, v)
    assert np.all(np.isfinite(acc))
    q = np.random.default_rng(x.size).standard_normal(x.size).astype(np.float32)
    assert np.isfinite(native.vec_dot_q8_1(bits, packed, native.quantize_q8_1(q), x.size))


@pytest.mark.parametrize("bits", BITS)
@FUZZ
@given(x=rows(), v=st.one_of(st.just(0.0), st.just(1.0), st.floats(0, 1, width=32)),
       seed=st.integers(0, 2**32 - 1), qscale=st.integers(-3, 1))
def test_simd_equals_scalar(bits, x, v, seed, qscale):
    """The kernels ggml calls (AVX2 where built) against the scalar reference:
    decode bit for bit (also from an odd address), V accumulation and the K
    dot product to float32 rounding."""
    n, L = x.size, 2**bits - 1
    packed = native.quantize(bits, x)
    y = native.dequantize(bits, packed, n)
    np.testing.assert_array_equal(native.dequantize_fast(bits, packed, n).view(np.uint32), y.view(np.uint32))
    odd = np.zeros(packed.size + 1, np.uint8)[1:]
    odd[:] = packed
    np.testing.assert_array_equal(native.dequantize_fast(bits, odd, n).view(np.uint32), y.view(np.uint32))

    d, m, codes = split(bits, packed)
    rng = np.random.default_rng(seed)
    acc = (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32)
    want = acc.astype(np.float64) + v * y.astype(np.float64)
    tol = 2.0**-21 * (np.abs(acc) + v * np.repeat(np.abs(m) + L * np.abs(d), B)) + 2.0**-146
    for reference in (True, False):
        got = native.vec_mad(bits, acc, packed, v, reference=reference)
        assert np.all(np.abs(got - want) <= tol), f"vec_mad (reference={reference})"

    # K dot q8_1: the same sum in float64 from the stored operands (q8_1 keeps
    # its per-32 scale d and sum s = d * sum(q) in fp16, as ggml's does)
    q = (rng.standard_normal(n) * 10.0**qscale).astype(np.float32)
    q8 = native.quantize_q8_1(q).reshape(-1, native.Q8_1_BYTES)
    qd = q8[:, 0:2].copy().view(np.float16).astype(np.float64).reshape(-1, 2)
    qs = q8[:, 2:4].copy().view(np.float16).astype(np.float64).reshape(-1, 2)
    qq = q8[:, 4:].view(np.int8).astype(np.float64).reshape(-1, 2, native.Q8_1_BLOCK)
    cq = codes.reshape(-1, 2, native.Q8_1_BLOCK)
    ref = np.sum(d * np.sum(qd * np.sum(cq * qq, axis=2), axis=1) + m * qs.sum(1))
    mag = np.sum(np.abs(d) * np.sum(np.abs(qd) * np.sum(cq * np.abs(qq), axis=2), axis=1)
                 + np.abs(m) * np.abs(qs).sum(1))
    got = native.vec_dot_q8_1(bits, packed, q8.ravel(), n)
    assert np.isfinite(got)
    assert abs(got - ref) <= (d.size + 8) * 2.0**-23 * mag + 1e-38, (got, ref, mag)


@pytest.mark.parametrize("bits", BITS)
@FUZZ
@given(x=rows(), data=st.data())
def test_validate(bits, x, data):
    """pkv_validate_row accepts every encoder output and any finite d/m, and
    rejects a row whose d or m in any block is NaN/Inf (fp16 exponent 31),
    or whose length is not whole blocks."""
    packed = native.quantize(bits, x)
    bb = native.block_bytes(bits)
    assert native.validate(bits, packed)
    blk = data.draw(st.integers(0, packed.size // bb - 1), label="block")
    field = data.draw(st.sampled_from([0, 2]), label="byte offset: 0 = d, 2 = m")
    sign = data.draw(st.sampled_from([0, 0x8000]), label="sign")

    finite = packed.copy()
    h = sign | data.draw(st.integers(0, 0x7bff), label="finite half")
    finite[blk * bb + field: blk * bb + field + 2] = np.array([h], np.uint16).view(np.uint8)
    assert native.validate(bits, finite)

    bad = packed.copy()
    h = sign | 0x7c00 | data.draw(st.integers(0, 0x3ff), label="mantissa (0 = Inf, else NaN)")
    bad[blk * bb + field: blk * bb + field + 2] = np.array([h], np.uint16).view(np.uint8)
    assert not native.validate(bits, bad)

    cut = data.draw(st.integers(1, bb - 1), label="bytes cut off")
    assert not native.validate(bits, packed[:-cut])
