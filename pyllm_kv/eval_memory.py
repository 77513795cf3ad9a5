"""How much memory ``pyllm-kv eval`` will need, checked before anything is loaded.

Peak resident memory of one run, in bytes (V = vocabulary size, U = n_ubatch =
min(512, ctx), n = llama.cpp's context size, ctx rounded up to a multiple of 256,
R = rows per statistics block, ``eval_metrics.rows_per_block``):

=====================  ==========================================================
model weights          GGUF file size (memory-mapped; every page is read) + 10 %
                       for tensors llama.cpp repacks into its own buffers
KV cache               max over the formats (f16 reference included) of
                       ``kv_bytes_per_token x n`` + side state: one context at a time
compute buffer         ``U x (4 V + 8 n_head x head_dim) + 4 U n`` (the output
                       layer's U x V logits dominate; then activations and the
                       attention mask). 0-5 % above llama.cpp's "compute buffer
                       size" for SmolLM2, Qwen2.5 and Gemma-3 at ctx 256-8192
logits buffer          ``4 U V``: llama.cpp's copy of the requested logits of one
                       ``llama_decode`` call (eval asks for at most U rows per call)
statistics             ``R V (8 x 8 + 4)``: float64 temporaries of one block and the
                       block of reference logits read back from disk
per-position results   40 B per scored position, format and chunk (5 numbers each)
this process           what Python, numpy and the libraries hold now, + 64 MiB
=====================  ==========================================================

Nothing grows with the number of formats except the per-position results.
The f16 reference of a chunk, ``(ctx/2 - 1) x V x 4`` bytes (scored positions
x V x 4 with ``--score-from``/``--score-stride``), goes to a
temporary file (``eval_reference``): it counts against disk space, or against
memory when the temporary directory is a tmpfs. At ctx 8192 with a 262k
vocabulary that is 4.3 GB of disk, while the process needs about 1.9 GB.

With ``--ngl`` other than 0 the weights, KV cache and compute buffer of the
offloaded layers live on the GPU: only the host-side parts are counted.

Available memory is ``MemAvailable`` from ``/proc/meminfo``, or less when a
cgroup (v2) memory limit leaves less room.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

from .errors import PyllmKvError
from .eval_metrics import BLOCK_TEMPORARIES, rows_per_block

PathLike = Union[str, "os.PathLike[str]"]
GiB = float(2**30)
_MARGIN = 64 * 2**20
_RAM_FILESYSTEMS = ("tmpfs", "ramfs")


class NotEnoughMemory(PyllmKvError, MemoryError):
    """The run would not fit in the memory (or the disk space) the machine has."""


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about the model and the formats."""

    model_bytes: int  # GGUF file size
    n_vocab: int
    attn_width: int  # n_head x head_dim: width of the attention activations
    kv_bytes_per_token: float  # largest over the formats
    side_state_bytes: int  # largest over the formats
    n_formats: int
    n_gpu_layers: int = 0


@dataclass
class Estimate:
    ctx: int
    parts: Dict[str, int] = field(default_factory=dict)  # resident memory, by what it is
    disk_bytes: int = 0  # the reference file of one chunk

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()))

    def describe(self) -> str:
        return ", ".join(f"{name} {_gib(b)}" for name, b in self.parts.items() if b >= 0.005 * GiB)


def _gib(b: float) -> str:
    return f"{b / GiB:.2f} GiB" if b < 10 * GiB else f"{b / GiB:.1f} GiB"


def n_ctx_allocated(ctx: int) -> int:
    """llama.cpp rounds the context size up to a multiple of 256."""
    return -(-int(ctx) // 256) * 256


def scored_positions(ctx: int, score_from: Optional[int] = None, score_stride: int = 1) -> int:
    """Positions scored per chunk (``eval_positions.Scoring``): from ctx/2 by default,
    from ``score_from`` (at most ctx-2) otherwise, every ``score_stride``-th."""
    first = int(ctx) // 2 if score_from is None else min(int(score_from), int(ctx) - 2)
    return len(range(first, int(ctx) - 1, max(1, int(score_stride))))


def estimate(shape: ModelShape, ctx: int, n_chunks: int, process_bytes: int,
             reference_in_memory: bool = False, score_from: Optional[int] = None, score_stride: int = 1,
             n_ubatch: int = 512) -> Estimate:
    """Peak resident memory of an eval run at chunk size ``ctx`` (see the module docstring)."""
    V = shape.n_vocab
    U = min(int(n_ubatch), int(ctx))
    n = n_ctx_allocated(ctx)
    scored = scored_positions(ctx, score_from, score_stride)
    R = rows_per_block(V)
    on_cpu = shape.n_gpu_layers == 0
    est = Estimate(ctx=int(ctx))
    est.parts["model weights"] = int(shape.model_bytes * 1.1) if on_cpu else 0
    est.parts["KV cache"] = int(shape.kv_bytes_per_token * n + shape.side_state_bytes) if on_cpu else 0
    est.parts["compute buffer"] = (U * (4 * V + 8 * shape.attn_width) + 4 * U * n) if on_cpu else 0
    est.parts["logits buffer"] = 4 * U * V
    est.parts["statistics"] = R * V * (8 * BLOCK_TEMPORARIES + 4)
    est.parts["per-position results"] = 40 * scored * max(1, shape.n_formats) * max(1, int(n_chunks))
    est.parts["this process + margin"] = int(process_bytes) + _MARGIN
    est.disk_bytes = 4 * scored * V
    if reference_in_memory:
        est.parts["reference (tmpfs)"] = est.disk_bytes
    return est


# ---------------------------------------------------------------------------- the machine


def _meminfo_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room() -> Optional[int]:
    """Memory left under this process's cgroup v2 limit, if it has one."""
    try:
        with open("/proc/self/cgroup") as fh:
            rel = next((ln.strip().split("::", 1)[1] for ln in fh if ln.startswith("0::")), None)
        if rel is None:
            return None
        base = Path("/sys/fs/cgroup") / rel.lstrip("/")
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((base / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def available_memory() -> Optional[Tuple[int, str]]:
    """``(bytes, where the number comes from)``, or None where it cannot be read."""
    avail = _meminfo_available()
    room = _cgroup_room()
    if avail is None and room is None:
        return None
    if room is not None and (avail is None or room < avail):
        return room, "the cgroup's memory.max minus memory.current"
    return avail, "MemAvailable in /proc/meminfo"


def process_rss() -> int:
    """Resident memory of this process now (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def filesystem_type(path: PathLike) -> str:
    """Type of the filesystem holding ``path`` (longest matching mount point), '' if unknown."""
    target = os.path.realpath(path)
    best, kind = "", ""
    try:
        with open("/proc/self/mounts") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        return ""
    return kind


def reference_dir(tmp_dir: Optional[PathLike]) -> Path:
    return Path(tmp_dir) if tmp_dir is not None else Path(tempfile.gettempdir())


# ---------------------------------------------------------------------------- the check


def largest_fitting_ctx(fits: Callable[[int], bool], ctx: int) -> Optional[int]:
    """Largest chunk size below ``ctx`` for which ``fits`` holds: a multiple of 256
    when one fits, else an even number >= 8; None if not even ctx=8 fits."""
    if not fits(8):
        return None
    lo, hi = 1, (int(ctx) - 1) // 256  # multiples of 256: k * 256, k in [lo, hi]
    if hi >= 1 and fits(256):
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid * 256) else (lo, mid - 1)
        return lo * 256
    lo, hi = 4, min(int(ctx) - 1, 255) // 2  # even numbers 2k
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(2 * mid) else (lo, mid - 1)
    return 2 * lo


def check(shape: ModelShape, ctx: int, n_chunks: int, tmp_dir: Optional[PathLike] = None,
          score_from: Optional[int] = None, score_stride: int = 1, n_ubatch: int = 512) -> Estimate:
    """Estimate the run; raise NotEnoughMemory, naming a --ctx that fits, when the
    machine lacks the memory or the disk space. Returns the estimate."""
    directory = reference_dir(tmp_dir)
    in_ram = filesystem_type(directory) in _RAM_FILESYSTEMS
    rss = process_rss()

    def est(c: int) -> Estimate:
        return estimate(shape, c, n_chunks, rss, reference_in_memory=in_ram, score_from=score_from,
                        score_stride=score_stride, n_ubatch=n_ubatch)

    result = est(ctx)
    got = available_memory()
    if got is not None:
        avail, source = got
        # The process's present memory is already out of `avail`; the rest is what it still takes.
        if result.total - rss > avail:
            ok = largest_fitting_ctx(lambda c: est(c).total - rss <= avail, ctx)
            hint = (f"--ctx {ok} would fit (about {_gib(est(ok).total)})" if ok else
                    "not even the smallest --ctx fits: free memory or use a smaller model")
            raise NotEnoughMemory(
                f"pyllm-kv eval would need about {_gib(result.total)} of memory at --ctx {ctx} "
                f"({result.describe()}), but only {_gib(avail + rss)} is available ({source}: "
                f"{_gib(avail)}, plus the {_gib(rss)} this process holds). {hint}; the number of formats "
                "does not change the memory needed.")
    if not in_ram:
        try:
            free = shutil.disk_usage(directory).free
        except OSError:
            free = None
        if free is not None and result.disk_bytes > free:
            ok = largest_fitting_ctx(lambda c: est(c).disk_bytes <= free, ctx)
            raise NotEnoughMemory(
                f"the f16 reference of one chunk takes {_gib(result.disk_bytes)} on disk at --ctx {ctx} "
                f"(scored positions x vocabulary x 4 B), but {directory} has {_gib(free)} free. "
                f"Point --tmp-dir at a disk with more room"
                + (f", or use --ctx {ok}." if ok else "."))
    return result
