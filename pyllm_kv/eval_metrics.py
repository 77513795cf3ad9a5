"""Numerics of ``pyllm-kv eval``: log-softmax, KL divergence, top-1, perplexity.

Everything is computed in float64 with numpy from the float32 logits llama.cpp
returns. Nothing here knows about llama.cpp, so it is tested on hand-made
distributions (``tests/test_eval_metrics.py``).

Definitions (per scored position i, reference distribution P = softmax of the
f16-cache logits, candidate Q = softmax of the candidate cache's logits):

* ``KL(P||Q) = sum_v P_v (log P_v - log Q_v)`` in nats, over the full vocabulary
  (llama-perplexity drops terms with P_v < e^-16; we do not);
* top-1 agreement: ``argmax P == argmax Q`` (first index on ties, as numpy);
* NLL of the text's next token under Q; perplexity = exp(mean NLL);
* ``dp``: Q's probability of the actual next token minus P's (llama-perplexity's "Δp").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

__all__ = [
    "log_softmax",
    "kl_divergence",
    "Reference",
    "ChunkStats",
    "compare",
    "block_stats",
    "rows_per_block",
    "Accumulator",
]

# Rows processed at once: bounds float64 temporaries to ~ROWS * n_vocab * 8 bytes each.
_ROWS = 64
# For block_stats: at most this many float64 values per temporary (16 MiB), so a
# 262k vocabulary gets 8-row blocks and a 49k one 42-row blocks.
_BLOCK_VALUES = 1 << 21
#: float64 temporaries of the size of one block alive at once in block_stats (upper bound).
BLOCK_TEMPORARIES = 8


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (max-shifted, so large logits are safe)."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(P||Q) per row, in nats, for P = softmax(p_logits), Q = softmax(q_logits)."""
    lp = log_softmax(p_logits)
    lq = log_softmax(q_logits)
    return _kld_rows(lp, np.exp(lp), lq)


def _kld_rows(logp: np.ndarray, p: np.ndarray, logq: np.ndarray) -> np.ndarray:
    # Terms with P_v == 0 (underflow) contribute 0; logq is finite because it comes from
    # finite logits, so 0 * finite stays 0.
    d = np.einsum("ij,ij->i", p, logp - logq)
    return np.maximum(d, 0.0)  # tiny negative values are rounding (KL >= 0)


@dataclass
class Reference:
    """The reference run's view of one chunk, kept only while that chunk is compared."""

    logp: np.ndarray  # (n, n_vocab) float64 log-probabilities
    p: np.ndarray  # (n, n_vocab) float64 probabilities
    top: np.ndarray  # (n,) argmax
    targets: np.ndarray  # (n,) next-token ids

    @classmethod
    def from_logits(cls, logits: np.ndarray, targets: np.ndarray) -> "Reference":
        logits = np.asarray(logits)
        targets = np.asarray(targets, dtype=np.int64)
        if logits.ndim != 2 or logits.shape[0] != targets.shape[0]:
            raise ValueError(f"logits {logits.shape} and targets {targets.shape} do not match")
        logp = np.empty(logits.shape, dtype=np.float64)
        for s in range(0, logits.shape[0], _ROWS):
            logp[s:s + _ROWS] = log_softmax(logits[s:s + _ROWS])
        return cls(logp=logp, p=np.exp(logp), top=np.argmax(logits, axis=1), targets=targets)


@dataclass
class ChunkStats:
    kld: np.ndarray  # (n,) KL(P||Q) per position, nats
    nll: np.ndarray  # (n,) -log Q(next token)
    nll_ref: np.ndarray  # (n,) -log P(next token)
    same_top: np.ndarray  # (n,) bool
    dp: np.ndarray  # (n,) Q(next) - P(next)

    FIELDS = ("kld", "nll", "nll_ref", "same_top", "dp")

    @classmethod
    def concat(cls, parts: List["ChunkStats"]) -> "ChunkStats":
        """The positions of ``parts``, in order, as one record."""
        if not parts:
            return cls(*(np.empty(0, dtype=bool if f == "same_top" else np.float64) for f in cls.FIELDS))
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in cls.FIELDS))

    def __len__(self) -> int:
        return int(self.kld.shape[0])


def rows_per_block(n_vocab: int) -> int:
    """Rows :func:`block_stats` should get at once to keep its temporaries small."""
    return max(1, min(_ROWS, _BLOCK_VALUES // max(1, int(n_vocab))))


def block_stats(ref_logits: np.ndarray, logits: Optional[np.ndarray], targets: np.ndarray) -> ChunkStats:
    """Statistics of a few positions straight from float32 logits (rows x n_vocab).

    The same numbers as ``compare(Reference.from_logits(ref_logits, targets), logits)``
    (row by row the same operations), without keeping a whole chunk of float64
    log-probabilities: ``pyllm-kv eval`` feeds it blocks of :func:`rows_per_block`
    rows. ``logits=None`` compares the reference with itself (KLD exactly 0).
    """
    ref_logits = np.asarray(ref_logits)
    targets = np.asarray(targets, dtype=np.int64)
    if ref_logits.ndim != 2 or ref_logits.shape[0] != targets.shape[0]:
        raise ValueError(f"logits {ref_logits.shape} and targets {targets.shape} do not match")
    rows = np.arange(targets.shape[0])
    logp = log_softmax(ref_logits)
    nll_ref = -logp[rows, targets]
    top_ref = np.argmax(ref_logits, axis=1)
    if logits is None:
        kld = _kld_rows(logp, np.exp(logp), logp)
        nll, same_top = nll_ref.copy(), np.ones(targets.shape[0], dtype=bool)
    else:
        logits = np.asarray(logits)
        if logits.shape != ref_logits.shape:
            raise ValueError(f"candidate logits {logits.shape} vs reference {ref_logits.shape}")
        logq = log_softmax(logits)
        kld = _kld_rows(logp, np.exp(logp), logq)
        nll = -logq[rows, targets]
        same_top = np.argmax(logits, axis=1) == top_ref
    dp = np.exp(-nll) - np.exp(-nll_ref)
    return ChunkStats(kld=kld, nll=nll, nll_ref=nll_ref, same_top=same_top, dp=dp)


def compare(ref: Reference, logits: np.ndarray) -> ChunkStats:
    """Compare a candidate run's logits for one chunk with the reference."""
    logits = np.asarray(logits)
    n = ref.targets.shape[0]
    if logits.shape != ref.logp.shape:
        raise ValueError(f"candidate logits {logits.shape} vs reference {ref.logp.shape}")
    kld = np.empty(n)
    nll = np.empty(n)
    rows = np.arange(n)
    for s in range(0, n, _ROWS):
        e = min(n, s + _ROWS)
        logq = log_softmax(logits[s:e])
        kld[s:e] = _kld_rows(ref.logp[s:e], ref.p[s:e], logq)
        nll[s:e] = -logq[rows[: e - s], ref.targets[s:e]]
    nll_ref = -ref.logp[rows, ref.targets]
    same_top = np.argmax(logits, axis=1) == ref.top
    dp = np.exp(-nll) - np.exp(-nll_ref)
    return ChunkStats(kld=kld, nll=nll, nll_ref=nll_ref, same_top=same_top, dp=dp)


def _mean_se(x: np.ndarray) -> "tuple[float, float]":
    n = x.size
    if n == 0:
        return float("nan"), float("nan")
    m = float(x.mean())
    se = float(x.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
    return m, se


@dataclass
class Accumulator:
    """Per-format running totals over chunks (per-position values are kept: a few
    thousand floats per chunk, needed for percentiles)."""

    parts: List[ChunkStats] = field(default_factory=list)

    def add(self, stats: ChunkStats) -> None:
        self.parts.append(stats)

    @property
    def n_chunks(self) -> int:
        return len(self.parts)

    def _cat(self, name: str) -> np.ndarray:
        if not self.parts:
            return np.empty(0)
        return np.concatenate([getattr(p, name) for p in self.parts])

    def summary(self) -> Dict[str, Optional[float]]:
        """Aggregate numbers for the report (all plain floats, JSON-ready)."""
        kld = self._cat("kld")
        nll = self._cat("nll")
        nll_ref = self._cat("nll_ref")
        same = self._cat("same_top").astype(bool)
        dp = self._cat("dp")
        n = int(kld.size)
        if n == 0:
            return {"n_tokens": 0}
        mean_nll, se_nll = _mean_se(nll)
        mean_nll_ref, _ = _mean_se(nll_ref)
        ppl = float(np.exp(mean_nll))
        ppl_ref = float(np.exp(mean_nll_ref))
        # standard error of ln(PPL/PPL_ref) from the paired per-token differences
        _, se_ln_ratio = _mean_se(nll - nll_ref)
        kld_mean, kld_se = _mean_se(kld)
        top1 = float(same.mean())
        return {
            "n_tokens": n,
            "ppl": ppl,
            "ppl_se": ppl * se_nll,
            "ppl_ref": ppl_ref,
            "ppl_delta": ppl - ppl_ref,
            "ppl_delta_pct": 100.0 * (ppl / ppl_ref - 1.0),
            "ln_ppl_ratio": mean_nll - mean_nll_ref,
            "ln_ppl_ratio_se": se_ln_ratio,
            "kld_mean": kld_mean,
            "kld_mean_se": kld_se,
            "kld_median": float(np.percentile(kld, 50)),
            "kld_p99": float(np.percentile(kld, 99)),
            "kld_max": float(kld.max()),
            "top1": top1,
            "top1_se": float(np.sqrt(top1 * (1 - top1) / (n - 1))) if n > 1 else 0.0,
            "dp_rms": float(np.sqrt(np.mean(dp * dp))),
        }
