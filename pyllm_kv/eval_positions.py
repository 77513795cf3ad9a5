"""Which positions of a chunk ``pyllm-kv eval`` scores, and the depth buckets it reports.

By default (llama-perplexity's rule) only the second half of a chunk is scored:
positions ``ctx/2 .. ctx-2``, each predicting the next token. For long
contexts the question is how a cache format ages with depth, so a run can score
from any position on (``--score-from 0``: every position) and, to keep the
f16 reference file and the statistics small at 16k-32k tokens, only every
``stride``-th position (``--score-stride``). The report then splits the numbers
by position into doubling buckets, ``[0, 512)``, ``[512, 1k)``, ``[1k, 2k)`` ...
so a format whose error grows with depth (a side state fitted on the first
ubatch that no longer fits later tokens, say) shows it directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import numpy as np

#: The first bucket's end; every later bucket is twice as long as the one before.
FIRST_BUCKET = 512


@dataclass(frozen=True)
class Scoring:
    """Scored positions ``first, first + stride, ...`` below ``ctx - 1`` of a chunk of ``ctx`` tokens."""

    ctx: int
    first: int
    stride: int = 1

    @classmethod
    def default(cls, ctx: int) -> "Scoring":
        return cls(int(ctx), int(ctx) // 2, 1)

    def __post_init__(self) -> None:
        if not 0 <= self.first <= self.ctx - 2:
            raise ValueError(f"the first scored position must be in 0..ctx-2 ({self.ctx - 2}), got {self.first}")
        if self.stride < 1:
            raise ValueError(f"the scoring stride must be >= 1, got {self.stride}")

    def positions(self) -> np.ndarray:
        """The scored positions, ascending (position p predicts token p + 1)."""
        return np.arange(self.first, self.ctx - 1, self.stride, dtype=np.int64)

    def __len__(self) -> int:
        return len(range(self.first, self.ctx - 1, self.stride))

    @property
    def is_default(self) -> bool:
        return self == Scoring.default(self.ctx)

    def describe(self) -> str:
        last = int(self.positions()[-1])
        every = "" if self.stride == 1 else f", every {self.stride}-th"
        return f"{self.first}..{last}{every} (predicting the token after each)"


def bucket_edges(ctx: int) -> List[Tuple[int, int]]:
    """Doubling position buckets ``[0, 512), [512, 1024), [1024, 2048) ...`` covering the
    scorable positions ``0 .. ctx-2`` (the last may reach past them: ``[4k, 8k)`` at ctx 8192)."""
    out: List[Tuple[int, int]] = []
    lo, hi = 0, FIRST_BUCKET
    while lo < ctx - 1:
        out.append((lo, hi))
        lo, hi = hi, 2 * hi
    return out


def label(lo: int, hi: int) -> str:
    """``[2k, 4k)`` style name of a bucket."""
    def k(n: int) -> str:
        return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)
    return f"[{k(lo)}, {k(hi)})"
