"""native/ block codec (kv4/kv3/kv2) against numpy references.

The format (native/include/pkv/codec.h): per block of 64, an fp16 scale d and
minimum m, code = clamp(round((x-m)/d)), x_hat = m + d*code. The encoder picks
d and m by an error-minimising search (native/src/block_scale.c); its numpy
twins are in tests/block_scale_ref.py (float32 step by step: the bytes; float64:
what the search means).
"""
import numpy as np
import pytest

from pyllm_kv import native

import block_scale_ref as bsr

BITS = [4, 3, 2]
B = native.BLOCK


def fp16(x):
    return np.asarray(x, dtype=np.float64).astype(np.float16).astype(np.float64)


def ref_encode(x, bits):
    """float32 step-by-step reference of the encoder: (d, m, codes) per block."""
    d, m, codes = bsr.encode_f32(x, bits)
    return d.astype(np.float64), m.astype(np.float64), codes


def ref_decode(d, m, codes):
    return (m[:, None] + d[:, None] * codes).reshape(-1)


def ref_pack(codes, bits):
    """Pack codes per the documented layout (codec.h)."""
    out = []
    for c in codes:
        if bits == 4:
            payload = (c[:32] | (c[32:] << 4)).astype(np.uint8)
        elif bits == 2:
            payload = (c[0:16] | (c[16:32] << 2) | (c[32:48] << 4) | (c[48:64] << 6)).astype(np.uint8)
        else:
            lo = c & 3
            ql = (lo[0:16] | (lo[16:32] << 2) | (lo[32:48] << 4) | (lo[48:64] << 6)).astype(np.uint8)
            qh = np.zeros(8, dtype=np.uint8)
            for j in range(64):
                qh[j % 8] |= ((c[j] >> 2) & 1) << (j // 8)
            payload = np.concatenate([ql, qh])
        out.append(payload)
    return out


def split_blocks(packed, bits):
    bb = native.block_bytes(bits)
    blocks = packed.reshape(-1, bb)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float64).ravel()
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float64).ravel()
    return d, m, blocks[:, 4:]


def test_sizes_and_bits():
    assert [native.block_bytes(b) for b in BITS] == [36, 28, 20]
    assert [native.bits_per_value(b) for b in BITS] == [4.5, 3.5, 2.5]


@pytest.mark.parametrize("bits", BITS)
def test_layout_exact_codes(bits):
    """Values on an exact integer grid: codes and the packed bytes are known."""
    rng = np.random.default_rng()
    L = 2**bits - 1
    codes = rng.integers(0, L + 1, size=(4, B))
    codes[:, 0], codes[:, 1] = 0, L            # pin min=0, max=L -> m=0, d=1
    x = codes.astype(np.float32).reshape(-1)
    packed = native.quantize(bits, x)
    d, m, payload = split_blocks(packed, bits)
    assert np.all(d == 1.0) and np.all(m == 0.0)
    for got, want in zip(payload, ref_pack(codes, bits)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(native.dequantize(bits, packed, x.size), x)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0])
def test_matches_reference(bits, scale):
    """Bytes: d, m and every code as the float32 reference computes them."""
    rng = np.random.default_rng()
    x = (rng.standard_normal(64 * B) * scale + rng.standard_normal() * scale).astype(np.float32)
    x[rng.integers(0, x.size, 20)] *= 25                 # a few outliers
    packed = native.quantize(bits, x)
    d, m, payload = split_blocks(packed, bits)
    d_ref, m_ref, codes = ref_encode(x, bits)
    np.testing.assert_array_equal(d, d_ref)
    np.testing.assert_array_equal(m, m_ref)
    for got, want in zip(payload, ref_pack(codes, bits)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(native.dequantize(bits, packed, x.size), ref_decode(d_ref, m_ref, codes).astype(np.float32))


@pytest.mark.parametrize("bits", BITS)
def test_scale_search_against_float64(bits):
    """What the search is for, in float64: every block's stored squared error is
    no worse than the min/max rule's (up to float32 scoring), the total is the
    float64 search's, and well below min/max on Gaussian and Laplace blocks."""
    rng = np.random.default_rng()
    n = 3000
    x = np.concatenate([rng.standard_normal((n, B)), rng.laplace(size=(n, B)) * 3 + 2,
                        rng.standard_normal((n, B)) * 10.0 ** rng.uniform(-2, 3, (n, 1))]).astype(np.float32)
    d, m, _ = split_blocks(native.quantize(bits, x.ravel()), bits)
    err = bsr.stored_error_f64(x, d, m, bits)
    err_mm = bsr.stored_error_f64(x, *bsr.minmax_f32(x, bits), bits)
    err_64 = bsr.stored_error_f64(x, *bsr.block_scale_f64(x, bits), bits)
    amax = np.abs(x.astype(np.float64)).max(1)     # float32 scoring: ~ an ulp per residual
    assert np.all(err <= err_mm * (1 + 1e-4) + 4 * np.sqrt(B * err_mm) * amax * 2.0**-23 + 1e-30)
    assert abs(err.sum() / err_64.sum() - 1) < 1e-3
    gain = {4: 0.86, 3: 0.78, 2: 0.55}[bits]               # measured: 0.83, 0.74, 0.50
    for part in range(3):
        sl = slice(part * n, (part + 1) * n)
        assert err[sl].sum() <= gain * err_mm[sl].sum(), (part, err[sl].sum() / err_mm[sl].sum())


@pytest.mark.parametrize("bits", BITS)
def test_adversarial_rows(bits):
    rng = np.random.default_rng()
    zeros = np.zeros(B, np.float32)
    const = np.full(B, 3.25, np.float32)
    outlier = rng.standard_normal(B).astype(np.float32)
    outlier[17] = 1e4
    tiny = (rng.standard_normal(B) * 1e-40).astype(np.float32)   # denormals
    huge = np.where(rng.random(B) < 0.5, -1e30, 1e30).astype(np.float32)
    x = np.concatenate([zeros, const, outlier, tiny, huge])
    y = native.dequantize(bits, native.quantize(bits, x), x.size)
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(y[:B], 0.0)
    np.testing.assert_array_equal(y[B:2 * B], 3.25)
    # the outlier block: the outlier itself survives within half a step
    d = (1e4 - outlier[np.arange(B) != 17].min()) / (2**bits - 1)
    assert abs(y[2 * B + 17] - 1e4) <= 0.5 * d * 1.01
    assert np.all(np.abs(y[3 * B:4 * B]) < 1e-6)
    # +-65504 after the policy; the top level may sit L fp16 steps of d lower,
    # so that it never decodes beyond the fp16 range
    np.testing.assert_allclose(np.abs(y[4 * B:]), 65504.0, rtol=2e-3)
    assert np.all(np.abs(y) <= 65504.0)


@pytest.mark.parametrize("bits", BITS)
def test_simd_decode_equals_scalar(bits):
    """The decode ggml dispatches to (AVX2 where built) is bit-identical to the
    scalar reference decode."""
    rng = np.random.default_rng()
    x = (rng.standard_normal(32 * B) * 5).astype(np.float32)
    packed = native.quantize(bits, x)
    np.testing.assert_array_equal(native.dequantize_fast(bits, packed, x.size),
                                  native.dequantize(bits, packed, x.size))


@pytest.mark.parametrize("bits", BITS)
def test_vec_mad_matches_float64(bits):
    """V accumulation kernel: acc + v*decode(row) against float64."""
    rng = np.random.default_rng()
    n = 4 * B
    for _ in range(10):
        x = (rng.standard_normal(n) * 3).astype(np.float32)
        acc = rng.standard_normal(n).astype(np.float32)
        v = float(rng.uniform(0, 1))
        packed = native.quantize(bits, x)
        want = acc.astype(np.float64) + v * native.dequantize(bits, packed, n).astype(np.float64)
        for ref in (False, True):
            got = native.vec_mad(bits, acc, packed, v, reference=ref)
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("bits", BITS)
def test_nonfinite_policy(bits):
    """NaN is stored as 0, +-Inf saturates to +-65504; decode is always finite."""
    x = np.linspace(-1, 1, B).astype(np.float32)
    x[3], x[10], x[20] = np.nan, np.inf, -np.inf
    packed = native.quantize(bits, x)
    assert native.validate(bits, packed)
    y = native.dequantize(bits, packed, B)
    assert np.all(np.isfinite(y)) and np.all(np.abs(y) <= 65504.0)
    xs = np.where(np.isnan(x), 0, np.clip(x, -65504, 65504)).astype(np.float32)
    np.testing.assert_array_equal(packed, native.quantize(bits, xs))
    # the block is then encoded like any other: no worse than the min/max rule
    # (at 2 bits the search gives up one of the two extremes to keep the rest)
    err = ((y.astype(np.float64) - xs) ** 2).sum()
    assert err <= bsr.stored_error_f64(xs, *bsr.minmax_f32(xs, bits), bits)[0] * (1 + 1e-4)


@pytest.mark.parametrize("bits", BITS)
def test_vec_dot_q8_1(bits):
    rng = np.random.default_rng()
    n = 8 * B
    for _ in range(20):
        k = rng.standard_normal(n).astype(np.float32) * rng.uniform(0.1, 10)
        q = rng.standard_normal(n).astype(np.float32) * rng.uniform(0.1, 10)
        pk, pq = native.quantize(bits, k), native.quantize_q8_1(q)
        got = native.vec_dot_q8_1(bits, pk, pq, n)
        # float64 reference on the decoded operands: only fp32 summation differs
        k_hat = native.dequantize(bits, pk, n).astype(np.float64)
        qb = pq.reshape(-1, 36)
        qd = qb[:, 0:2].copy().view(np.float16).astype(np.float64)
        q_hat = (qb[:, 4:].view(np.int8).astype(np.float64) * qd).ravel()
        want = float(k_hat @ q_hat)
        scale = float(np.abs(k_hat) @ np.abs(q_hat))
        # s = d*sum(q) is stored in fp16 by q8_1 (as in ggml): 2^-11 relative
        assert abs(got - want) <= 2e-3 * scale + 1e-6
        # and close to the exact dot of the unquantized rows
        exact = float(k.astype(np.float64) @ q.astype(np.float64))
        assert abs(got - exact) <= 0.5 * np.linalg.norm(k) * np.linalg.norm(q)


@pytest.mark.parametrize("bits", BITS)
def test_validate_rejects_nonfinite_scales(bits):
    packed = native.quantize(bits, np.ones(2 * B, np.float32))
    assert native.validate(bits, packed)
    bad = packed.copy()
    bad[0:2] = np.array([np.inf], dtype=np.float16).view(np.uint8)
    assert not native.validate(bits, bad)
    assert not native.validate(bits, packed[:-1])   # truncated block


def test_fp16_conversion_matches_numpy():
    ffi, L = native.lib()
    rng = np.random.default_rng()
    xs = np.concatenate([rng.standard_normal(2000) * 10.0 ** rng.integers(-9, 6, 2000),
                         [0.0, -0.0, 65504.0, 65519.0, 65520.0, 6e-8, 3e-8, 1e-10]]).astype(np.float32)
    got = np.array([L.pkv_fp32_to_fp16(float(v)) for v in xs], dtype=np.uint16)
    with np.errstate(over="ignore"):  # 65520 -> inf is the case under test
        want = xs.astype(np.float16)
    np.testing.assert_array_equal(got, want.view(np.uint16))
    back = np.array([L.pkv_fp16_to_fp32(int(h)) for h in got], dtype=np.float32)
    np.testing.assert_array_equal(back, got.view(np.float16).astype(np.float32))
