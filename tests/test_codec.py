"""native/ block codec (kv4/kv3/kv2) against a float64 numpy reference.

The reference below re-derives the format from its definition in
native/include/pkv/codec.h: per block of 64, m = fp16(min), d = fp16((max-m)/L),
code = clamp(round((x-m)/d)), x_hat = m + d*code.
"""
import numpy as np
import pytest

from pyllm_kv import native

BITS = [4, 3, 2]
B = native.BLOCK


def fp16(x):
    return np.asarray(x, dtype=np.float64).astype(np.float16).astype(np.float64)


def ref_encode(x, bits):
    """float64 reference: returns (d, m, codes) per block."""
    x = np.asarray(x, dtype=np.float64).reshape(-1, B)
    x = np.where(np.isnan(x), 0.0, np.clip(x, -65504.0, 65504.0))
    L = 2**bits - 1
    m = fp16(x.min(axis=1))
    d = fp16((x.max(axis=1) - m) / L)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(d[:, None] > 0, np.floor((x - m[:, None]) / d[:, None] + 0.5), 0)
    return d, m, np.clip(q, 0, L).astype(np.int64)


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
def test_matches_float64_reference(bits, scale):
    rng = np.random.default_rng()
    x = (rng.standard_normal(64 * B) * scale + rng.standard_normal() * scale).astype(np.float32)
    packed = native.quantize(bits, x)
    y = native.dequantize(bits, packed, x.size).astype(np.float64)
    d_ref, m_ref, codes = ref_encode(x, bits)
    y_ref = ref_decode(d_ref, m_ref, codes)
    d, m, _ = split_blocks(packed, bits)
    # scale/min: C rounds (max-m)/L computed in fp32, the reference in fp64: at
    # most one fp16 ulp apart, and almost always identical.
    np.testing.assert_array_equal(m, m_ref)
    assert np.all(np.abs(d - d_ref) <= np.abs(d_ref) * 2**-10 + 1e-12)
    step = np.repeat(d_ref, B)
    # decode agrees with the reference to within one code step everywhere
    assert np.all(np.abs(y - y_ref) <= step * 1.001 + 1e-7)
    # where the stored scale is the same, the codes are the same too (but for
    # rare ties at .5 that fp32 and fp64 arithmetic round apart)
    same = np.repeat(d == d_ref, B)
    assert same.mean() > 0.8
    assert np.mean(np.isclose(y[same], y_ref[same], rtol=1e-6, atol=1e-9)) > 0.995
    # error bound of round-to-nearest with the stored (rounded) scale and minimum
    L = 2**bits - 1
    xb = x.astype(np.float64).reshape(-1, B)
    bound = (0.5 * d[:, None] + np.abs(m - xb.min(1))[:, None] + L * d[:, None] * 2**-10
             + 1e-6 * np.abs(xb))
    assert np.all(np.abs(y.reshape(-1, B) - xb) <= bound)


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
    np.testing.assert_allclose(np.abs(y[4 * B:]), 65504.0, rtol=1e-3)


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
    assert np.all(np.isfinite(y))
    d = 2 * 65504.0 / (2**bits - 1)
    assert abs(y[10] - 65504.0) <= d and abs(y[20] + 65504.0) <= d
    assert abs(y[3]) <= d


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
