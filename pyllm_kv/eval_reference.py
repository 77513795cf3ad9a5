"""The f16 reference of one chunk, kept on disk for ``pyllm-kv eval``.

Every candidate format is compared with the reference run position by
position over the whole vocabulary, so the reference's logits of every scored
position must be at hand while a candidate runs: ``(ctx/2 - 1) x n_vocab``
float32 values per chunk (4.3 GB for a 262k vocabulary at ctx 8192). Held in
memory that is what made large-vocabulary runs get OOM-killed; here it goes to
an unlinked temporary file, written once per chunk as the reference decodes and
read back a block of rows at a time (``os.preadv`` into one reused buffer, so
the process never holds more than one block of it; the data sits in the page
cache, which the kernel can drop, not in the process's resident memory). The
values are the float32 logits exactly as llama.cpp returned them, so the
statistics are the same numbers as when everything was in memory.
"""

from __future__ import annotations

import os
import tempfile
from typing import Iterator, Optional, Tuple, Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]


def store_bytes(n_rows: int, n_vocab: int) -> int:
    """Disk space one chunk's reference takes."""
    return int(n_rows) * int(n_vocab) * 4


class ReferenceStore:
    """Float32 logits rows of one chunk's reference run in a temporary file.

    ``reset()`` starts a chunk, ``append(rows)`` adds decoded rows in order,
    ``blocks(n)`` reads them back ``n`` rows at a time. The file is unlinked at
    creation, so it disappears with the process even after a crash.
    """

    def __init__(self, n_vocab: int, block_rows: int, directory: Optional[PathLike] = None):
        self.n_vocab = int(n_vocab)
        self.row_bytes = 4 * self.n_vocab
        self.block_rows = int(block_rows)
        self._file = tempfile.TemporaryFile(prefix="pyllm-kv-eval-ref-", dir=directory, buffering=0)
        self._fd = self._file.fileno()
        self._buf = np.empty((self.block_rows, self.n_vocab), dtype=np.float32)
        self.n_rows = 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "ReferenceStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reset(self) -> None:
        """Forget the previous chunk (its bytes are overwritten by the next one)."""
        self.n_rows = 0

    def append(self, rows: np.ndarray) -> None:
        """Add rows (n x n_vocab float32, C-contiguous, e.g. a view of llama.cpp's logits)."""
        if rows.ndim != 2 or rows.shape[1] != self.n_vocab or rows.dtype != np.float32:
            raise ValueError(f"expected float32 rows of {self.n_vocab} logits, got {rows.dtype} {rows.shape}")
        view = memoryview(np.ascontiguousarray(rows)).cast("B")
        offset = self.n_rows * self.row_bytes
        done = 0
        while done < len(view):  # a single write may be short (2 GiB cap per call on Linux)
            done += os.pwrite(self._fd, view[done:], offset + done)
        self.n_rows += rows.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` (at most ``block_rows``) in a buffer reused by the next call."""
        n = stop - start
        if not 0 <= start <= stop <= self.n_rows or n > self.block_rows:
            raise IndexError(f"rows {start}:{stop} of {self.n_rows} (blocks of at most {self.block_rows})")
        out = self._buf[:n]
        view = memoryview(out).cast("B")
        offset = start * self.row_bytes
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got <= 0:
                raise OSError(f"short read from the reference file at byte {offset + done}")
            done += got
        return out

    def blocks(self, start: int, stop: int) -> Iterator[Tuple[int, np.ndarray]]:
        """``(row, block)`` over rows ``start:stop``, ``block_rows`` at a time."""
        for s in range(start, stop, self.block_rows):
            e = min(stop, s + self.block_rows)
            yield s, self.read(s, e)
