"""Upstream's Hadamard rotation and the attention-error metrics of the simulation.

Rotation (src/llama-kv-cache.cpp / llama-graph.cpp of the pinned tree): for a
quantized K cache, Q and K are multiplied by an orthonormal Sylvester-Walsh-
Hadamard matrix H_n (entries +-1/sqrt(n), H_n^2 = I) applied to consecutive
groups of n values of each head (``llama_mul_mat_hadamard`` reshapes to rows of
n); n is the largest power of two dividing head_dim, starting at 64
(``build_input_k_rot``: 64 for head_dim 64, 256 for 256). For a quantized V
cache, V is rotated with n = 64 always (``build_input_v_rot``) and the attention
output is rotated back with the same matrix. Each is enabled only when that
cache type is quantized and head_dim % 64 == 0 (``attn_rot_k`` / ``attn_rot_v``).

Metrics, per layer and query head (GQA: query head h reads KV head h // (H/Hkv)),
causal (and sliding-window on iSWA layers), on a subset of query positions:

* ``kl``     mean KL(p || p_hat) of the attention distribution, p from exact
             keys, p_hat from the decoded ones (V plays no part);
* ``out``    sum ||o_hat - o||^2 / sum ||o||^2, o = p V exact, o_hat = p_hat V_hat:
             relative squared error of the attention output, K and V errors together;
* ``out_k``, ``out_v``  the same with only K (p_hat V) or only V (p V_hat) decoded.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np


def hadamard(n: int) -> np.ndarray:
    """ggml_gen_hadamard(n): Sylvester construction, normalised by 1/sqrt(n), symmetric."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def k_rot_size(head_dim: int) -> int:
    """build_input_k_rot: the largest power of two (>= 64) dividing head_dim; 0 = no rotation."""
    if head_dim % 64:
        return 0
    n = 64
    while head_dim % (n * 2) == 0:
        n *= 2
    return n


def v_rot_size(head_dim: int) -> int:
    return 64 if head_dim % 64 == 0 else 0


def rotate(x: np.ndarray, n: int) -> np.ndarray:
    """Apply H_n to consecutive groups of n values of the last axis (n = 0: unchanged)."""
    if n == 0:
        return np.asarray(x, np.float64)
    shape = x.shape
    return (np.asarray(x, np.float64).reshape(-1, n) @ hadamard(n)).reshape(shape)


def causal_mask(q_pos: np.ndarray, n_keys: int, n_swa: int = 0) -> np.ndarray:
    """[len(q_pos), n_keys] True where key j is visible to the query at position i
    (j <= i; with a window, i - j < n_swa as LLAMA_SWA_TYPE_STANDARD)."""
    j = np.arange(n_keys)[None, :]
    i = np.asarray(q_pos)[:, None]
    m = j <= i
    if n_swa:
        m &= (i - j) < n_swa
    return m


def _softmax(s: np.ndarray, mask: np.ndarray) -> np.ndarray:
    s = np.where(mask, s, -np.inf)
    s = s - s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    return p / p.sum(axis=-1, keepdims=True)


def _heads(x: np.ndarray):
    """[T, Hkv, D] -> list of contiguous [T, D] per KV head."""
    return [np.ascontiguousarray(x[:, g]) for g in range(x.shape[1])]


class LayerReference:
    """Exact attention of one layer for the chosen queries: kept to score many codecs."""

    def __init__(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: Sequence[int],
                 kq_scale: float, n_swa: int = 0):
        # q: [T, H, D]; k, v: [T, Hkv, D]  (float64, any common rotation applied)
        self.q = np.asarray(q, np.float64)[np.asarray(q_pos)]
        self.k = np.asarray(k, np.float64)
        self.v = np.asarray(v, np.float64)
        self.n_head = self.q.shape[1]
        self.n_kv = self.k.shape[1]
        self.group = self.n_head // self.n_kv
        self.scale = kq_scale
        self.mask = causal_mask(q_pos, self.k.shape[0], n_swa)
        # contiguous per-head copies: numpy's matmul on strided slices is far slower
        self.qh = [np.ascontiguousarray(self.q[:, h]) for h in range(self.n_head)]
        self.vh = _heads(self.v)
        kh = _heads(self.k)
        self.p = [self._probs(self.qh[h], kh[h // self.group]) for h in range(self.n_head)]
        self.o = [self.p[h] @ self.vh[h // self.group] for h in range(self.n_head)]
        self.o2 = sum(float((o * o).sum()) for o in self.o)

    def _probs(self, qh: np.ndarray, kh: np.ndarray) -> np.ndarray:
        return _softmax(qh @ kh.T * self.scale, self.mask)

    def probs_hat(self, k_hat: np.ndarray, q_hat: Optional[np.ndarray] = None):
        """Attention distributions with decoded keys (and, if given, the query as the kernel sees it)."""
        qh = self.qh if q_hat is None else [np.ascontiguousarray(q_hat[:, h]) for h in range(self.n_head)]
        kh = _heads(k_hat)
        return [self._probs(qh[h], kh[h // self.group]) for h in range(self.n_head)]

    def kl(self, p_hat) -> float:
        tot, n = 0.0, 0
        for p, ph in zip(self.p, p_hat):
            with np.errstate(divide="ignore", invalid="ignore"):
                t = np.where(p > 0, p * (np.log(p) - np.log(np.maximum(ph, 1e-300))), 0.0)
            tot += float(t.sum())
            n += p.shape[0]
        return tot / n

    def out_err(self, p_hat=None, v_hat: Optional[np.ndarray] = None) -> float:
        err = 0.0
        vh = self.vh if v_hat is None else _heads(v_hat)
        for h in range(self.n_head):
            p = self.p[h] if p_hat is None else p_hat[h]
            v = vh[h // self.group]
            d = p @ v - self.o[h]
            err += float((d * d).sum())
        return err / self.o2

    def metrics(self, k_hat: np.ndarray, v_hat: np.ndarray, q_hat: Optional[np.ndarray] = None,
                p_hat=None) -> Dict[str, float]:
        ph = self.probs_hat(k_hat, q_hat) if p_hat is None else p_hat
        return {
            "kl": self.kl(ph),
            "out": self.out_err(ph, v_hat),
            "out_k": self.out_err(ph, None),
            "out_v": self.out_err(None, v_hat),
        }
