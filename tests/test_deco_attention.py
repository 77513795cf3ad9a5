"""DecoQuant attention, composed from the native pieces, against exact float64
attention on fresh random Q/K/V with outlier channels (the case the method is for).

The composition is the one the patched llama.cpp graph performs: S fitted from
the prompt's rows (pkv_deco_fit), rows stored as u = x S^-1 per 16-group in our
block format (pkv_quantize_row), scores from q S^T against the decoded u, the
attention output multiplied by S. No K or V row is rebuilt in full precision.
"""

from __future__ import annotations

import numpy as np
import pytest

from pyllm_kv import native

G = 16
# Mean relative error ||o - o_exact|| / ||o_exact|| over 20 draws (T=256 rows of
# one 64-wide head, 4 outlier channels x8, q ~ N(0, 0.3^2)). Measured means:
# 4 bits 0.13, 3 bits 0.27, 2 bits 0.78 (plain block format without the
# transform: 0.21 / 0.46 / 1.45). Bounds with ~1.5x margin:
BOUND = {4: 0.2, 3: 0.4, 2: 1.2}


def _rows(rng, T, D):
    X = rng.normal(size=(T, D)).astype(np.float32)
    X[:, rng.choice(D, 4, replace=False)] *= 8.0
    return X


def _per_group(X, M):
    T, D = X.shape
    return (X.reshape(T, D // G, G) @ M).reshape(T, D)


def _stored(bits, X):
    return np.stack([native.dequantize(bits, native.quantize(bits, r), len(r)) for r in X]).astype(np.float64)


def _attention(q, K, V):
    s = K @ q / np.sqrt(len(q))
    p = np.exp(s - s.max())
    return (p / p.sum()) @ V


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_deco_attention_close_to_exact_and_better_than_plain(lib_dir, bits):
    rng = np.random.default_rng()
    deco_err, plain_err = [], []
    for _ in range(20):
        K, V = _rows(rng, 256, 64), _rows(rng, 256, 64)
        q = rng.normal(size=64) * 0.3
        exact = _attention(q, K.astype(np.float64), V.astype(np.float64))

        Sk, Sk_inv = native.deco_fit(K, G, native.DECO_WHITEN)
        Sv, Sv_inv = native.deco_fit(V, G, native.DECO_WHITEN)
        Uk = _stored(bits, _per_group(K, Sk_inv))
        Uv = _stored(bits, _per_group(V, Sv_inv))
        q_t = _per_group(q[None], Sk.T.astype(np.float64))[0]           # q S^T, once per head
        out = _per_group(_attention(q_t, Uk, Uv)[None], Sv.astype(np.float64))[0]  # (sum p u) S

        deco_err.append(np.linalg.norm(out - exact) / np.linalg.norm(exact))
        plain = _attention(q, _stored(bits, K), _stored(bits, V))
        plain_err.append(np.linalg.norm(plain - exact) / np.linalg.norm(exact))
    assert np.mean(deco_err) < BOUND[bits], (np.mean(deco_err), np.mean(plain_err))
    assert np.mean(deco_err) < np.mean(plain_err), (np.mean(deco_err), np.mean(plain_err))


def test_transform_is_exact_without_quantization(lib_dir):
    """q S^T . (k S^-1) == q . k and (p U) S == p V up to float32 rounding."""
    rng = np.random.default_rng()
    K = _rows(rng, 100, 128)
    S, S_inv = native.deco_fit(K, G, native.DECO_WHITEN)
    q = rng.normal(size=128)
    U = _per_group(K.astype(np.float64), S_inv.astype(np.float64))
    q_t = _per_group(q[None], S.T.astype(np.float64))[0]
    np.testing.assert_allclose(U @ q_t, K @ q, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(_per_group(U, S.astype(np.float64)), K, rtol=1e-4, atol=1e-4)
