"""SQuat settings (squat4/squat3/squat2 cache types), from Python and the CLI.

llama.cpp's patched KV cache reads them from the environment when a context is
created (``native/llama/side_state.cpp``): ``PYLLM_KV_SQUAT_RANK``,
``PYLLM_KV_SQUAT_LAMBDA``, ``PYLLM_KV_SQUAT_NORMALIZE``,
``PYLLM_KV_SQUAT_TRANSFORM``, ``PYLLM_KV_SQUAT_REFIT``. :func:`pyllm_kv.load` takes the same settings as
arguments and sets those variables only while it creates the context, so two
models in one process can use different settings.

Defaults were chosen by measurement (docs/quality.md, "SQuat"): rank 20,
lambda 100 on the query subspace normalised by its top singular value, on
upstream's Hadamard-rotated keys.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Dict, Iterator, Optional

from .errors import InvalidParameter

ENV = {
    "rank": "PYLLM_KV_SQUAT_RANK",
    "lam": "PYLLM_KV_SQUAT_LAMBDA",
    "normalize": "PYLLM_KV_SQUAT_NORMALIZE",
    "transform": "PYLLM_KV_SQUAT_TRANSFORM",
    "center": "PYLLM_KV_CENTER",
    "refit": "PYLLM_KV_SQUAT_REFIT",
}
TRANSFORMS = ("hadamard", "deco")
# Centering (native/llama/side_center.cpp): "auto" centres the keys of squat*
# (measured to help; docs/quality.md), the others apply to every format of ours.
CENTERS = ("auto", "none", "k", "v", "kv")
# When squat*'s query subspace is fitted: "first" once, from the first ubatch
# that reaches an empty cache; "ubatch" again from every ubatch of >= 32 tokens
# (each prompt's keys against its own queries; decode keeps the last one).
REFITS = ("first", "ubatch")
# Which first-ubatch fits a GPU-resident cache computes on the GPU (environment
# only, PYLLM_KV_GPU_FIT; docs/side-state.md): not a SQuat setting, checked here
# with them so that a bad value is named before llama.cpp refuses the context.
GPU_FIT_VAR = "PYLLM_KV_GPU_FIT"
GPU_FITS = ("center", "all", "none")


@dataclass(frozen=True)
class SquatOptions:
    """``None`` leaves a setting to the environment variable or the default."""

    rank: Optional[int] = None  # subspace rank r (capped by head_dim and prompt tokens)
    lam: Optional[float] = None  # lambda in A = I + lambda Q^T Q
    normalize: Optional[bool] = None  # divide Q by its top singular value
    transform: Optional[str] = None  # "hadamard" (upstream rotation) or "deco" (DecoQuant)
    center: Optional[str] = None  # one of CENTERS
    refit: Optional[str] = None  # one of REFITS

    def __post_init__(self) -> None:
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int)
                                      or not 0 <= self.rank <= 512):
            raise InvalidParameter(f"SQuat rank must be an integer in [0, 512], got {self.rank!r}")
        if self.lam is not None:
            try:
                lam = float(self.lam)
            except (TypeError, ValueError):
                lam = float("nan")
            if not math.isfinite(lam) or not 0 <= lam <= 1e12:
                raise InvalidParameter(f"SQuat lambda must be a finite number in [0, 1e12], got {self.lam!r}")
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise InvalidParameter(f"SQuat normalize must be True or False, got {self.normalize!r}")
        if self.center is not None and self.center not in CENTERS:
            raise InvalidParameter(f"centering must be one of {', '.join(CENTERS)}, got {self.center!r}")
        if self.refit is not None and self.refit not in REFITS:
            raise InvalidParameter(f"SQuat refit must be one of {', '.join(REFITS)}, got {self.refit!r}")
        if self.transform is not None and self.transform not in TRANSFORMS:
            raise InvalidParameter(
                f"SQuat transform must be one of {', '.join(TRANSFORMS)}, got {self.transform!r}")

    def env(self) -> Dict[str, str]:
        out = {}
        if self.rank is not None:
            out[ENV["rank"]] = str(self.rank)
        if self.lam is not None:
            out[ENV["lam"]] = repr(float(self.lam))
        if self.normalize is not None:
            out[ENV["normalize"]] = "1" if self.normalize else "0"
        if self.transform is not None:
            out[ENV["transform"]] = self.transform
        if self.center is not None:
            out[ENV["center"]] = self.center
        if self.refit is not None:
            out[ENV["refit"]] = self.refit
        return out


@contextlib.contextmanager
def applied(opts: Optional[SquatOptions]) -> Iterator[None]:
    """Set the options' environment variables for the duration of the block."""
    changes = opts.env() if opts else {}
    saved = {k: os.environ.get(k) for k in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for k, old in saved.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old


def add_arguments(group) -> None:
    """``--squat-rank/--squat-lambda/--squat-normalize/--squat-transform`` (argparse)."""
    group.add_argument("--squat-rank", type=int, default=None, metavar="R",
                       help="squat*: rank of the query subspace (default 20)")
    group.add_argument("--squat-lambda", type=float, default=None, metavar="L",
                       help="squat*: weight of the query subspace in the key metric (default 100)")
    group.add_argument("--squat-normalize", type=int, choices=(0, 1), default=None,
                       help="squat*: 1 = lambda relative to the top query direction (default 1)")
    group.add_argument("--squat-center", choices=CENTERS, default=None,
                       help="centering: auto (default) subtracts the prompt's center row from squat* keys; "
                            "none, k, v, kv: as named, for every format of ours")
    group.add_argument("--squat-refit", choices=REFITS, default=None,
                       help="squat*: fit the query subspace once from the first ubatch (first, default) or "
                            "again from every ubatch of >= 32 tokens (ubatch)")
    group.add_argument("--squat-transform", choices=TRANSFORMS, default=None,
                       help="squat*: encode on upstream's Hadamard-rotated keys (default) or on "
                            "the DecoQuant transform")


def from_args(args) -> Optional[SquatOptions]:
    """The options given on the command line, or None if none was."""
    vals = dict(rank=getattr(args, "squat_rank", None), lam=getattr(args, "squat_lambda", None),
                normalize=None if getattr(args, "squat_normalize", None) is None else bool(args.squat_normalize),
                transform=getattr(args, "squat_transform", None), center=getattr(args, "squat_center", None),
                refit=getattr(args, "squat_refit", None))
    return SquatOptions(**vals) if any(v is not None for v in vals.values()) else None


DEFAULTS = {"rank": 20, "lam": 100.0, "normalize": True, "transform": "hadamard", "center": "auto",
            "refit": "first"}


def _from_env(var: str, value: str) -> SquatOptions:
    if var == ENV["rank"]:
        if not value.strip().isdigit():
            raise InvalidParameter(f"SQuat rank must be an integer in [0, 512], got {value!r}")
        return SquatOptions(rank=int(value))
    if var == ENV["lam"]:
        try:
            return SquatOptions(lam=float(value))
        except ValueError:
            raise InvalidParameter(f"SQuat lambda must be a finite number in [0, 1e12], got {value!r}") from None
    if var == ENV["normalize"]:
        if value not in ("0", "1"):
            raise InvalidParameter(f"SQuat normalize must be 0 or 1, got {value!r}")
        return SquatOptions(normalize=value == "1")
    if var == ENV["center"]:
        return SquatOptions(center=value)
    if var == ENV["refit"]:
        return SquatOptions(refit=value)
    return SquatOptions(transform=value)


def from_environment() -> Dict[str, object]:
    """The settings a context created now gets (what native/llama/side_state.cpp
    reads): the PYLLM_KV_SQUAT_* variables over the defaults. Raises
    InvalidParameter naming the variable if one is malformed (llama.cpp would
    only say that it failed to create the context). Call it inside
    :func:`applied` to include a load's own options."""
    out = dict(DEFAULTS)
    gpu_fit = os.environ.get(GPU_FIT_VAR)
    if gpu_fit and gpu_fit not in GPU_FITS:
        raise InvalidParameter(f"environment variable {GPU_FIT_VAR}: must be one of {', '.join(GPU_FITS)}, "
                               f"got {gpu_fit!r}")
    for var in ENV.values():
        value = os.environ.get(var)
        if value:
            try:
                parsed = _from_env(var, value)
            except InvalidParameter as exc:
                raise InvalidParameter(f"environment variable {var}: {exc}") from None
            out.update({k: v for k, v in vars(parsed).items() if v is not None})
    out["lam"] = float(out["lam"])
    return out
