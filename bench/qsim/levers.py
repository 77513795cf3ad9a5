"""The named K/V encoders of the study, composed from a base block codec and options.

Name grammar: ``[sq:][c:]BASE``

* ``BASE``  ``f16``; ``q8_0``, ``q4_0`` (ggml); ``kv4``/``kv3``/``kv2`` (the shipped
  codec, bit for bit); ``kv4o``.. (same layout, error-minimising d and m);
  ``s{b}b{B}`` / ``s{b}b{B}o`` (symmetric b-bit codes, fp16 scale per B values,
  q4_0's min/max rule or the error-minimising scale; ``s4b32`` is q4_0);
  ``a{b}b{B}o`` (asymmetric, other block sizes); ``nu{b}b{B}`` (non-uniform
  levels: a Lloyd-Max codebook fitted on the model's own rotated rows, fp16 scale
  per B values; a new decode, a table lookup like iq4_nl).
* ``c:``    centering: subtract the per-channel mean of the first ``fit_tokens``
  rotated rows (per layer and KV head) before encoding, add it back after decode.
  For K this is softmax-invariant (the native side can drop the add-back); for V the
  attention weights sum to 1, so the mean is added to the attention output instead.
* ``sq:``   SQuat's query-aware OBS encoder over the base block rule (K only; as V a
  squat name means its base, like the shipped squat* formats).

Bits per value: the stored codes and block scales, plus the side state spread
over the context (centering: head_dim fp16 per layer and KV head; SQuat: U's
upper triangle in fp16).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import numpy as np

from . import codecs, squat

_BASE = re.compile(r"^(?:(f16|q8_0|q4_0)|kv([234])(o?)|([sa])([2-8])b(16|32|64|128|256)(o?)|nu([2-8])b(16|32|64|128|256))$")


@dataclass
class HeadContext:
    """Per (layer, KV head) fitted state the encoders may use."""

    mu: Optional[np.ndarray] = None      # [D] mean of the first rows (rotated domain)
    U: Optional[np.ndarray] = None       # SQuat factor (fp16-rounded as stored)
    levels: Optional[np.ndarray] = None  # non-uniform codebook (normalised)


@dataclass(frozen=True)
class Lever:
    name: str
    base: str
    center: bool
    squat: bool
    storage_bits: float

    def side_bits(self, head_dim: int, ctx: int) -> float:
        """Side state per stored value of this tensor, spread over ``ctx`` tokens."""
        b = 0.0
        if self.center:
            b += 16.0 / ctx  # head_dim fp16 per (layer, KV head) over ctx rows of head_dim
        if self.squat:
            b += 8.0 * (head_dim + 1) / ctx  # head_dim*(head_dim+1)/2 fp16
        return b

    def bits(self, head_dim: int, ctx: int) -> float:
        return self.storage_bits + self.side_bits(head_dim, ctx)

    @property
    def is_quantized(self) -> bool:
        return self.base != "f16"

    @property
    def needs_levels(self) -> bool:
        return self.base.startswith("nu")

    def as_value(self) -> "Lever":
        """The V-side meaning of this name: SQuat is a key encoder, its V is the base."""
        return parse(self.name[3:]) if self.squat else self

    def encode(self, x: np.ndarray, ctx: HeadContext) -> np.ndarray:
        """Rows [N, D] (rotated domain) -> decoded rows (float64)."""
        x = np.asarray(x, np.float64)
        mu = ctx.mu if self.center else None
        y = x - mu if mu is not None else x
        if self.squat:
            if ctx.U is None:
                raise ValueError(f"{self.name}: SQuat needs the factor U")
            r = _squat_encode(self.base, y, ctx.U)
        else:
            r = _base_encode(self.base, y, ctx.levels)
        return r + mu if mu is not None else r


def _base_bits(base: str) -> float:
    m = _BASE.match(base)
    if not m:
        raise ValueError(f"unknown codec {base!r}")
    fixed, kvb, _, fam, b, blk, _, nub, nublk = m.groups()
    if fixed:
        return {"f16": 16.0, "q8_0": 8.5, "q4_0": 4.5}[fixed]
    if kvb:
        return int(kvb) + 32 / 64
    if fam == "s":
        return int(b) + 16 / int(blk)
    if fam == "a":
        return int(b) + 32 / int(blk)
    return int(nub) + 16 / int(nublk)


def _base_encode(base: str, x: np.ndarray, levels: Optional[np.ndarray]) -> np.ndarray:
    m = _BASE.match(base)
    fixed, kvb, kvo, fam, b, blk, o, nub, nublk = m.groups()
    if fixed == "f16":
        return codecs.fp16(x).astype(np.float64)
    if fixed == "q8_0":
        return codecs.q8_0(x)
    if fixed == "q4_0":
        return codecs.q4_0(x)
    if kvb:
        return codecs.kv_opt(x, int(kvb)) if kvo else codecs.kv_c(x, int(kvb))
    if fam == "s":
        return codecs.sym_opt(x, int(b), int(blk)) if o else codecs.sym_minmax(x, int(b), int(blk))
    if fam == "a":
        return codecs.kv_opt(x, int(b), int(blk))
    if levels is None:
        raise ValueError(f"{base}: non-uniform levels need a codebook")
    return codecs.nonuniform(x, levels, int(nublk))


def _squat_encode(base: str, x: np.ndarray, U: np.ndarray) -> np.ndarray:
    m = _BASE.match(base)
    fixed, kvb, kvo, fam, b, blk, o, nub, nublk = m.groups()
    if kvb and not kvo:
        return squat.encode_kv(x, U, int(kvb))
    if kvb:
        bits = int(kvb)
        return squat.encode_affine(x, U, lambda w: codecs.kv_opt_params(w, bits), 1 << bits, 64)
    if fam == "s" and o:
        bits = int(b)
        return squat.encode_affine(x, U, lambda w: codecs.sym_opt_params(w, bits), 1 << bits, int(blk))
    if fam == "a":
        bits = int(b)
        return squat.encode_affine(x, U, lambda w: codecs.kv_opt_params(w, bits), 1 << bits, int(blk))
    raise ValueError(f"SQuat over {base!r} is not modelled")


_CACHE: Dict[str, Lever] = {}


def parse(name: str) -> Lever:
    if name in _CACHE:
        return _CACHE[name]
    rest, sq, c = name, False, False
    if rest.startswith("sq:"):
        sq, rest = True, rest[3:]
    if rest.startswith("c:"):
        c, rest = True, rest[2:]
    lever = Lever(name=name, base=rest, center=c, squat=sq, storage_bits=_base_bits(rest))
    if sq and rest == "f16":
        raise ValueError("SQuat needs a quantized base")
    _CACHE[name] = lever
    return lever
