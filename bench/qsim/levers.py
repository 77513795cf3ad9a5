"""The named K/V encoders of the study, composed from a base block codec and options.

Name grammar: ``[sm:|sa:|sw:][sq:|sqb:][c:]BASE``

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
* ``sm:``   per-channel key smoothing: keys stored as k / s and queries read as q * s
  (before upstream's rotation; scores unchanged), s = sqrt(rms_k / rms_q) per channel
  from the first ``fit_tokens`` rows (geometric mean 1): flattens K channels whose
  variance the rotation would otherwise spread over every block. Side state: head_dim
  fp16 per layer and KV head; costs a multiply of Q (not of the cached keys) at decode.
* ``sa:``   adaptive smoothing: per layer and KV head, ``sm:`` or not, whichever gives the
  smaller q.k error on the fitting prompt (its queries against its keys): a fit-time test
  the native side can run on the first ubatch (same side state; s = 1 where it loses).
* ``sw:``   adaptive smoothing decided by the score error's variance under the fitting
  prompt's own attention weights (what softmax sees), per layer and KV head.
* ``sqb:``  SQuat with U refitted from each ubatch's own queries (512 rows) for that
  ubatch's keys, instead of the first ubatch's U for every key.
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
    smooth: Optional[np.ndarray] = None  # [D] per-channel key scale s (unrotated domain)
    rot: int = 0                         # Hadamard size of this tensor (to undo/redo it)
    fit_q: Optional[np.ndarray] = None   # [n, D] the GQA group's first queries (rotated), for "sa:"
    fit_rows: int = 0                    # the first fit_rows rows of x are the fitting prompt
    U_list: Optional[list] = None        # per-ubatch SQuat factors [(row0, row1, U)]
    fit_q_pos: Optional[np.ndarray] = None  # positions of the fit_q rows (for "sw:")
    kq_scale: float = 1.0


@dataclass(frozen=True)
class Lever:
    name: str
    base: str
    center: bool
    squat: bool
    storage_bits: float
    smooth: str = ""  # "" or the smoothing prefix ("sm": s = sqrt(rms_k / rms_q) per channel)
    squat_per_ubatch: bool = False  # "sqb:": U refitted from each ubatch's own queries

    def side_bits(self, head_dim: int, ctx: int) -> float:
        """Side state per stored value of this tensor, spread over ``ctx`` tokens."""
        b = 0.0
        if self.smooth:
            b += 16.0 / ctx  # head_dim fp16 scales per (layer, KV head)
        if self.center:
            b += 16.0 / ctx  # head_dim fp16 per (layer, KV head) over ctx rows of head_dim
        if self.squat:
            # head_dim*(head_dim+1)/2 fp16 (only the encoder reads it; per-ubatch refits keep
            # one at a time, counted once)
            b += 8.0 * (head_dim + 1) / ctx
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
        """The V-side meaning of this name: SQuat and smoothing are key-only; V is the rest."""
        if self.smooth:
            return parse(self.name[len(self.smooth) + 1:]).as_value()
        if self.squat:
            return parse(self.name[4:] if self.squat_per_ubatch else self.name[3:])
        return self

    def encode(self, x: np.ndarray, ctx: HeadContext) -> np.ndarray:
        """Rows [N, D] (rotated domain) -> decoded rows (float64)."""
        x = np.asarray(x, np.float64)
        if self.smooth == "sw":
            # adaptive, attention-weighted: per layer and KV head, smoothing or not by the
            # variance of the score error under the fitting prompt's own (causal) attention
            # weights: what softmax sees, unlike the plain q.k error of "sa:"
            inner = parse(self.name[3:])
            with_s = parse("sm:" + self.name[3:])
            n = ctx.fit_rows
            qf, pos = ctx.fit_q, ctx.fit_q_pos
            s_ref = qf @ x[:n].T * ctx.kq_scale
            mask = np.arange(n)[None, :] <= pos[:, None]
            s_ref = np.where(mask, s_ref, -np.inf)
            p = np.exp(s_ref - s_ref.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)

            def werr(dec):
                e = qf @ (dec - x[:n]).T * ctx.kq_scale
                m = (p * e).sum(1, keepdims=True)
                return float((p * (e - m) ** 2).sum())

            use = werr(with_s.encode(x[:n], ctx)) < werr(inner.encode(x[:n], ctx))
            return with_s.encode(x, ctx) if use else inner.encode(x, ctx)
        if self.smooth == "sa":
            # adaptive: smoothing only where it lowers the score error on the fitting prompt
            # (its own queries against its own keys), decided per layer and KV head at fit time
            inner = parse(self.name[3:])
            with_s = parse("sm:" + self.name[3:])
            n = ctx.fit_rows
            a = with_s.encode(x[:n], ctx)
            b = inner.encode(x[:n], ctx)
            qf = ctx.fit_q
            ea = float(((qf @ (a - x[:n]).T) ** 2).sum())
            eb = float(((qf @ (b - x[:n]).T) ** 2).sum())
            return with_s.encode(x, ctx) if ea < eb else inner.encode(x, ctx)
        if self.smooth:
            # per-channel scaling before the rotation: store H (k / s), the query becomes
            # H (q * s); scores are unchanged. Modelled as: undo H, divide, redo H, encode,
            # then map the decoded rows back (H, times s, H) to compare in the same domain.
            if ctx.smooth is None:
                raise ValueError(f"{self.name}: smoothing needs the channel scales")
            from .attention import rotate  # noqa: PLC0415
            s = ctx.smooth
            inner = parse(self.name[len(self.smooth) + 1:])
            mu = None if ctx.mu is None else rotate(rotate(ctx.mu[None], ctx.rot)[0] / s, ctx.rot)
            sub = HeadContext(mu=mu, U=ctx.U, levels=ctx.levels)
            y = inner.encode(rotate(rotate(x, ctx.rot) / s, ctx.rot), sub)
            return rotate(rotate(y, ctx.rot) * s, ctx.rot)
        mu = ctx.mu if self.center else None
        y = x - mu if mu is not None else x
        if self.squat and self.squat_per_ubatch:
            # U_list: [(first row, last row, U)] per ubatch; each ubatch's keys use its own U
            if ctx.U_list is None:
                raise ValueError(f"{self.name}: per-ubatch SQuat needs one U per ubatch")
            r = np.empty_like(y)
            for a, b, Ub in ctx.U_list:
                r[a:b] = _squat_encode(self.base, y[a:b], Ub)
        elif self.squat:
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
    rest, sq, c, sm = name, False, False, ""
    if rest.startswith(("sm:", "sa:", "sw:")):
        inner = parse(rest[3:])
        lever = Lever(name=name, base=inner.base, center=inner.center, squat=inner.squat,
                      storage_bits=inner.storage_bits, smooth=rest[:2])
        _CACHE[name] = lever
        return lever
    per_ub = False
    if rest.startswith("sqb:"):
        sq, per_ub, rest = True, True, rest[4:]
    elif rest.startswith("sq:"):
        sq, rest = True, rest[3:]
    if rest.startswith("c:"):
        c, rest = True, rest[2:]
    lever = Lever(name=name, base=rest, center=c, squat=sq, storage_bits=_base_bits(rest),
                  squat_per_ubatch=per_ub)
    if sq and rest == "f16":
        raise ValueError("SQuat needs a quantized base")
    _CACHE[name] = lever
    return lever
