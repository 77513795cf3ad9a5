"""The CPU flash-attention decode kernel (native/src/fa_decode.c, AVX2 in
kvblock_avx2.c) against a float64 reference on fresh random inputs.

The kernel reads K and V in our block format and the query as q8_1 (as ggml's
K·q dots do), so the reference attends with exactly those decoded values in
float64: what remains is float32 accumulation error, bounded tightly here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from cffi import FFI

from pyllm_kv import native

_CDEF = """
typedef struct {
    int bits_k, bits_v;
    int dk, dv;
    const void * k; size_t k_stride;
    const void * v; size_t v_stride;
    int64_t n_kv;
    const uint16_t * mask;
    const float * q; size_t q_stride;
    int n_q;
    float scale;
    float * partials; size_t partial_stride;
} pkv_fa_decode_args;
bool pkv_fa_decode_chunk(const pkv_fa_decode_args * a);
bool pkv_fa_decode_chunk_ref(const pkv_fa_decode_args * a);
"""


@pytest.fixture(scope="module")
def fa(lib_dir):
    ffi = FFI()
    ffi.cdef(_CDEF)
    return ffi, ffi.dlopen(str(lib_dir / "libpyllm_kv_native.so"))


def _q8_1(x: np.ndarray):
    """The query as the kernel sees it: ggml's q8_1 (our reference encoder): the
    values d*qs and, per 32 values, the stored fp16 sum s that the dot uses for
    the asymmetric minimum."""
    blocks = native.quantize_q8_1(x).reshape(-1, native.Q8_1_BYTES)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float64)[:, 0]
    s = blocks[:, 2:4].copy().view(np.float16).astype(np.float64)[:, 0]
    qs = blocks[:, 4:].view(np.int8).astype(np.float64)
    return (qs * d[:, None]).reshape(-1), s


def _k_dot(bits, k_row, q):
    """k·q exactly as the block-vs-q8_1 dot defines it: sum_b d_b*sum(code*q) + m_b*s_q."""
    packed = native.quantize(bits, k_row)
    kd = native.dequantize(bits, packed, len(k_row)).astype(np.float64)
    qv, qsum16 = _q8_1(q)
    per = native.block_bytes(bits)
    m = np.array([packed[i * per + 2:i * per + 4].view(np.float16)[0] for i in range(len(k_row) // native.BLOCK)],
                 dtype=np.float64)
    exact_min = (qv.reshape(-1, native.BLOCK).sum(axis=1))
    stored_min = qsum16.reshape(-1, 2).sum(axis=1)
    return float(kd @ qv + m @ (stored_min - exact_min))


def _rows(bits, X):
    """Rows encoded one after the other, as in a cache tensor (never empty: cffi needs a buffer)."""
    if len(X) == 0:
        return np.zeros(1, dtype=np.uint8)
    return np.concatenate([native.quantize(bits, r) for r in X])


def _run(fa, which, bits_k, bits_v, K, V, Q, scale, mask=None):
    ffi, lib = fa
    n_kv, dk = K.shape
    dv = V.shape[1]
    n_q = Q.shape[0]
    kb = _rows(bits_k, K)
    vb = _rows(bits_v, V)
    q = np.ascontiguousarray(Q, dtype=np.float32)
    stride = dv + 2 + 3  # a little slack: the kernel must respect partial_stride
    part = np.full((n_q, stride), np.nan, dtype=np.float32)
    m16 = None if mask is None else np.ascontiguousarray(mask.astype(np.float16)).view(np.uint16)
    a = ffi.new("pkv_fa_decode_args *")
    a.bits_k, a.bits_v, a.dk, a.dv = bits_k, bits_v, dk, dv
    a.k = ffi.from_buffer(kb)
    a.k_stride = native.block_bytes(bits_k) * dk // native.BLOCK
    a.v = ffi.from_buffer(vb)
    a.v_stride = native.block_bytes(bits_v) * dv // native.BLOCK
    a.n_kv = n_kv
    a.mask = ffi.NULL if m16 is None else ffi.cast("uint16_t *", ffi.from_buffer(m16))
    a.q = ffi.cast("float *", ffi.from_buffer(q))
    a.q_stride = dk
    a.n_q = n_q
    a.scale = scale
    a.partials = ffi.cast("float *", ffi.from_buffer(part))
    a.partial_stride = stride
    ok = getattr(lib, which)(a)
    return bool(ok), part


def _reference(bits_k, bits_v, K, V, Q, scale, mask=None):
    """float64 softmax attention over the decoded rows, per query: (M, S, acc)."""
    Vd = np.stack([native.dequantize(bits_v, native.quantize(bits_v, r), len(r)) for r in V]).astype(np.float64)
    out = []
    for q in Q:
        s = np.array([_k_dot(bits_k, k, q) for k in K]) * scale
        if mask is not None:
            s = s + mask.astype(np.float16).astype(np.float64)
        live = np.isfinite(s)
        if not live.any():
            out.append((-math.inf, 0.0, np.zeros(V.shape[1])))
            continue
        M = s[live].max()
        p = np.where(live, np.exp(s - M), 0.0)
        out.append((M, p.sum(), p @ Vd))
    return out


def _case(rng, n_kv, dk, dv, n_q, outlier=False):
    K = rng.normal(size=(n_kv, dk)).astype(np.float32)
    V = rng.normal(size=(n_kv, dv)).astype(np.float32)
    if outlier:
        K[:, 3] *= 20.0
        V[:, 5] *= 20.0
    Q = rng.normal(size=(n_q, dk)).astype(np.float32)
    return K, V, Q


@pytest.mark.parametrize("which", ["pkv_fa_decode_chunk", "pkv_fa_decode_chunk_ref"])
@pytest.mark.parametrize("bits_k,bits_v", [(4, 4), (3, 3), (2, 2), (4, 2), (2, 4)])
@pytest.mark.parametrize("dk,dv,n_q", [(64, 64, 3), (128, 128, 4), (64, 128, 1)])
def test_decode_matches_float64(fa, which, bits_k, bits_v, dk, dv, n_q):
    rng = np.random.default_rng()
    n_kv = int(rng.integers(70, 300))           # several tiles plus a ragged one
    K, V, Q = _case(rng, n_kv, dk, dv, n_q, outlier=bool(rng.integers(0, 2)))
    mask = np.zeros(n_kv, dtype=np.float32)
    mask[rng.choice(n_kv, n_kv // 5, replace=False)] = -np.inf   # holes, like padding
    mask[:5] = -np.inf
    scale = 1.0 / math.sqrt(dk)
    ok, part = _run(fa, which, bits_k, bits_v, K, V, Q, scale, mask)
    assert ok
    for i, (M, S, acc) in enumerate(_reference(bits_k, bits_v, K, V, Q, scale, mask)):
        assert part[i, 0] == pytest.approx(M, rel=1e-4, abs=1e-4)
        assert part[i, 1] == pytest.approx(S, rel=1e-4)
        out = part[i, 2:2 + dv].astype(np.float64) / part[i, 1]
        ref = acc / S
        # float32 accumulation of <= 300 rows: relative error far below 1e-4 of the output scale
        assert np.max(np.abs(out - ref)) <= 1e-4 * max(1.0, np.max(np.abs(ref)))
        assert np.all(np.isnan(part[i, 2 + dv:])), "wrote past dv"


def test_simd_equals_reference_kernel(fa):
    rng = np.random.default_rng()
    K, V, Q = _case(rng, 257, 128, 128, 8)
    scale = 0.1
    _, fast = _run(fa, "pkv_fa_decode_chunk", 3, 2, K, V, Q, scale)
    _, ref = _run(fa, "pkv_fa_decode_chunk_ref", 3, 2, K, V, Q, scale)
    np.testing.assert_allclose(fast[:, 0], ref[:, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fast[:, 2:130] / fast[:, 1:2], ref[:, 2:130] / ref[:, 1:2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("which", ["pkv_fa_decode_chunk", "pkv_fa_decode_chunk_ref"])
def test_empty_and_fully_masked_chunks_are_neutral(fa, which):
    """What ggml's reduction skips: M = -inf, S = 0, acc = 0 (no NaN from exp(-inf - -inf))."""
    rng = np.random.default_rng()
    K, V, Q = _case(rng, 40, 64, 64, 2)
    ok, part = _run(fa, which, 4, 4, K, V, Q, 0.125, np.full(40, -np.inf, dtype=np.float32))
    assert ok
    assert np.all(part[:, 0] == -np.inf) and np.all(part[:, 1] == 0) and np.all(part[:, 2:66] == 0)
    ok, part = _run(fa, which, 4, 4, K[:0], V[:0], Q, 0.125)
    assert ok
    assert np.all(part[:, 0] == -np.inf) and np.all(part[:, 1] == 0)


@pytest.mark.parametrize("which", ["pkv_fa_decode_chunk", "pkv_fa_decode_chunk_ref"])
@pytest.mark.parametrize("field,value", [("n_q", 0), ("n_q", 17), ("dk", 96), ("dv", 1024),
                                         ("bits_k", 5), ("bits_v", 1), ("partial_stride", 10)])
def test_bad_arguments_are_refused(fa, which, field, value):
    ffi, lib = fa
    a = ffi.new("pkv_fa_decode_args *")
    a.bits_k = a.bits_v = 4
    a.dk = a.dv = 64
    a.n_q = 1
    a.partial_stride = 66
    setattr(a, field, value)
    assert not getattr(lib, which)(a)
