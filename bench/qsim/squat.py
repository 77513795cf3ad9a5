"""SQuat in numpy: the query-subspace factor and the OBS key encoder (native/src/squat.c).

``prepare`` builds U (A^-1 = U^T U, A = I + lambda Q_hat^T Q_hat) in float64 from
the subspace of the first queries; ``encode_kv`` is the shipped encoder over kv
blocks (float32 code arithmetic as in C, vectorised over rows: the column loop is
sequential, rows are independent); ``encode_affine`` is the same error feedback
over any affine block rule (for SQuat on top of other levers).
"""

from __future__ import annotations

from typing import Callable, Tuple

import numpy as np

from .codecs import F32, fp16

MAX_WEIGHT = 1e8  # PKV_SQUAT_MAX_WEIGHT


def prepare(q: np.ndarray, rank: int = 20, lam: float = 100.0, normalize: bool = True) -> np.ndarray:
    """U (d x d float32, upper triangular) from query rows q (n x d), as pkv_squat_prepare."""
    q = np.asarray(q, np.float64)
    n, d = q.shape
    if n == 0 or rank == 0 or lam == 0:
        return np.eye(d, dtype=F32)
    C = q.T @ q
    w, V = np.linalg.eigh(C)
    order = np.argsort(w)[::-1]
    w, V = w[order], V[:, order]
    if not w[0] > 0:
        return np.eye(d, dtype=F32)
    r = min(rank, d, n)
    scale = 1.0 / w[0] if normalize else 1.0
    Ainv = np.eye(d)
    for k in range(r):
        if not w[k] > 0:
            break
        wgt = min(lam * w[k] * scale, MAX_WEIGHT)
        c = wgt / (1.0 + wgt)
        Ainv -= c * np.outer(V[:, k], V[:, k])
    # upper Cholesky factor: A^-1 = U^T U  <=>  U = L^T with A^-1 = L L^T
    U = np.linalg.cholesky(Ainv).T
    return U.astype(F32)


def packed_fp16(U: np.ndarray) -> np.ndarray:
    """U as the side state stores it (upper triangle in fp16) and the encoder reads it."""
    return np.triu(fp16(U))


def encode_kv(k: np.ndarray, U: np.ndarray, bits: int, block: int = 64) -> np.ndarray:
    """pkv_squat_quantize_row_ref on every row of k (N x d): reconstructions (float64)."""
    k = np.asarray(k, F32)
    n, d = k.shape
    L = F32((1 << bits) - 1)
    w = k.astype(np.float64)
    out = np.empty((n, d))
    Ud = U.astype(np.float64)
    for b0 in range(0, d, block):
        wf = w[:, b0:b0 + block].astype(F32)
        mn, mx = wf.min(1), wf.max(1)
        m = fp16(mn)
        dq = fp16((mx - m) / L)
        with np.errstate(divide="ignore"):
            idv = np.where(dq > 0, F32(1.0) / dq, F32(0.0)).astype(F32)
        for j in range(b0, b0 + block):
            x = w[:, j].astype(F32)
            code = np.clip(np.floor((x - m) * idv + F32(0.5)), 0, L)
            qv = m.astype(np.float64) + dq.astype(np.float64) * code.astype(np.float64)
            out[:, j] = (m + dq * code).astype(np.float64)  # what decode returns (float32 math)
            ujj = Ud[j, j]
            if ujj > 0 and j + 1 < d:
                err = (w[:, j] - qv) / ujj
                w[:, j + 1:] -= err[:, None] * Ud[j, j + 1:][None, :]
    return out


def encode_affine(k: np.ndarray, U: np.ndarray, params: Callable[[np.ndarray], Tuple[np.ndarray, np.ndarray]],
                  n_codes: int, block: int) -> np.ndarray:
    """OBS error feedback over any affine block code x ~ m + d*c, c in 0..n_codes-1.

    ``params(wblock) -> (d, m)`` chooses the stored (fp16-rounded) scale and offset of
    each block from its current, error-updated values, as the shipped encoder does."""
    w = np.asarray(k, np.float64).copy()
    n, d = w.shape
    out = np.empty((n, d))
    Ud = U.astype(np.float64)
    for b0 in range(0, d, block):
        dd, m = params(w[:, b0:b0 + block])
        inv = np.where(dd != 0, 1.0 / np.where(dd != 0, dd, 1.0), 0.0)
        for j in range(b0, b0 + block):
            c = np.clip(np.floor((w[:, j] - m) * inv + 0.5), 0, n_codes - 1)
            qv = m + dd * c
            out[:, j] = qv
            ujj = Ud[j, j]
            if ujj > 0 and j + 1 < d:
                err = (w[:, j] - qv) / ujj
                w[:, j + 1:] -= err[:, None] * Ud[j, j + 1:][None, :]
    return out
