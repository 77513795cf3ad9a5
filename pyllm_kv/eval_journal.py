"""What ``pyllm-kv eval`` has measured so far, on disk as it goes.

With ``--json FILE``, every finished pass (one format over one chunk) is
appended to a journal next to it, ``FILE`` with ``.passes.jsonl`` for its
suffix: one JSON line per pass holding the per-position numbers (KLD, NLL of
the candidate and of the reference, top-1 agreement, Δp), so percentiles can
be recomputed exactly; floats are written with Python's shortest round-trip
repr, so a resumed run reports the same numbers as an uninterrupted one. The
first line holds the settings that decide the numbers. ``--resume`` reads the
journal back and skips every pass it holds; a journal written with other
settings is refused rather than mixed in.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from .errors import PyllmKvError
from .eval_metrics import ChunkStats

PathLike = Union[str, "os.PathLike[str]"]
SUFFIX = ".passes.jsonl"
_KIND = "pyllm-kv eval passes"


class JournalMismatch(PyllmKvError, ValueError):
    """``--resume`` found a journal written with other settings (or not a journal)."""


@dataclass
class PassRecord:
    stats: ChunkStats
    seconds: float  # decode time of the pass (0 when it reused the reference run)
    tokens: int  # tokens decoded


def journal_path(json_out: PathLike) -> Path:
    p = Path(json_out)
    return p.with_name(p.stem + SUFFIX) if p.suffix == ".json" else p.with_name(p.name + SUFFIX)


class Journal:
    """Finished passes by ``(chunk, format label)``; appended to ``path`` when it is set."""

    def __init__(self, path: Optional[PathLike], header: Dict[str, Any], resume: bool = False):
        self.path = Path(path) if path is not None else None
        self.header = header
        self.records: Dict[Tuple[int, str], PassRecord] = {}
        self.resumed = 0
        if self.path is None:
            return
        if resume and self.path.is_file():
            self._load()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"kind": _KIND, "settings": header}) + "\n")

    def _load(self) -> None:
        assert self.path is not None
        lines = self.path.read_text().splitlines()
        try:
            head = json.loads(lines[0]) if lines else {}
        except json.JSONDecodeError:
            head = {}
        if head.get("kind") != _KIND:
            raise JournalMismatch(f"{self.path} is not a pyllm-kv eval journal; move it away or drop --resume.")
        theirs = head.get("settings", {})
        diff = [f"{k}: {theirs.get(k)!r} there, {v!r} here" for k, v in self.header.items() if theirs.get(k) != v]
        if diff:
            raise JournalMismatch(
                f"--resume: {self.path} was written by a run with other settings ({'; '.join(diff)}). "
                "Run with the same settings, or drop --resume to start over (the journal is then replaced).")
        torn = False
        for i, line in enumerate(lines[1:], start=2):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines):  # the last line of a run killed while writing it
                    torn = True
                    break
                raise JournalMismatch(f"{self.path}, line {i}: not JSON; the journal is damaged "
                                      "(drop --resume to start over)") from None
            stats = ChunkStats(
                kld=np.asarray(rec["kld"], dtype=np.float64),
                nll=np.asarray(rec["nll"], dtype=np.float64),
                nll_ref=np.asarray(rec["nll_ref"], dtype=np.float64),
                same_top=np.asarray(rec["same_top"], dtype=bool),
                dp=np.asarray(rec["dp"], dtype=np.float64),
            )
            self.records[(int(rec["chunk"]), str(rec["format"]))] = PassRecord(
                stats, float(rec.get("seconds", 0.0)), int(rec.get("tokens", 0)))
        self.resumed = len(self.records)
        if torn:  # cut the torn line off before appending after it
            self.path.write_text("".join(ln + "\n" for ln in lines[:-1]))

    def has(self, chunk: int, label: str) -> bool:
        return (chunk, label) in self.records

    def add(self, chunk: int, label: str, stats: ChunkStats, seconds: float, tokens: int) -> None:
        self.records[(chunk, label)] = PassRecord(stats, seconds, tokens)
        if self.path is None:
            return
        line = {
            "chunk": chunk,
            "format": label,
            "seconds": seconds,
            "tokens": tokens,
            "kld": stats.kld.tolist(),
            "nll": stats.nll.tolist(),
            "nll_ref": stats.nll_ref.tolist(),
            "same_top": stats.same_top.astype(int).tolist(),
            "dp": stats.dp.tolist(),
        }
        with open(self.path, "a") as fh:
            fh.write(json.dumps(line) + "\n")

    def complete_chunks(self, labels: List[str], n_chunks: int) -> List[int]:
        """Chunks (below ``n_chunks``) that every format in ``labels`` has finished."""
        return [c for c in range(n_chunks) if all((c, lb) in self.records for lb in labels)]
