"""Random-weight GGUF models of a given shape, for speed measurements.

Decode and prefill speed depend on a model's *shape* (layers, widths, heads,
vocabulary, weight type), not on what its weights say, so a Llama-8B-shaped
file with random weights measures what a real 8B model would, without
downloading one. :func:`write_shape_model` writes such a file for the llama
architecture with gguf-py; :func:`ensure_shape_model` keeps generated files in
a cache directory so ``pyllm-kv bench --shape llama8b`` writes one only once.

The file is a normal llama.cpp model: llama architecture metadata (or gemma3's,
with its sliding-window attention, for the iSWA test model), a minimal
SentencePiece-style ("llama") vocabulary of ``n_vocab`` tokens (``<unk>``,
``<s>``, ``</s>``, the 256 byte tokens when there is room, then filler tokens),
F32 norm weights of 1, and every matrix in the chosen weight type.

Weights are written as random bytes in a valid block layout rather than by
quantizing random floats (which would take minutes for 8B parameters):

* ``q4_0`` / ``q8_0``: the code bytes are random; each block's fp16 scale is
  random in ``[2^e, 2^(e+1))`` with ``e`` chosen per tensor so the weights have a
  standard deviation of about ``1/sqrt(row length)``: finite, small, and
  activations stay finite through every layer.
* ``f16``: random sign and mantissa, exponent fixed per tensor (same target).

Tensors are streamed in chunks of a few MiB, so memory stays small and the
8B Q4_0 file (about 4.3 GiB) is disk-bound.

    python -m pyllm_kv.shape_model --preset tiny --out /tmp/tiny.gguf
    python bench/make_shape_model.py --preset llama8b --out /tmp/llama8b.gguf
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import PyllmKvError

__all__ = [
    "PRESETS",
    "WEIGHT_TYPES",
    "ShapeModelError",
    "ShapeSpec",
    "default_cache_dir",
    "ensure_shape_model",
    "resolve_spec",
    "tensor_plan",
    "weights_nbytes",
    "write_shape_model",
    "add_arguments",
    "main",
]

PathLike = Union[str, "os.PathLike[str]"]

# Bumped when the generator writes different bytes for the same arguments, so
# cached files from an older generator are not reused.
GENERATOR_VERSION = 1
# Architectures written here: llama, and gemma3 (sliding-window layers + full
# layers: llama.cpp's iSWA cache; extra per-head q/k norms and post norms).
ARCHS = ("llama", "gemma3")
# Bytes written per step. A multiple of every block size used here (2, 18, 34)
# keeps chunks block-aligned.
_CHUNK = 18 * 34 * 2 * 2048 * 4  # ~9.6 MB


class ShapeModelError(PyllmKvError, ValueError):
    """Shape numbers that cannot make a valid model (or a bad preset / weight type)."""


@dataclass(frozen=True)
class ShapeSpec:
    """Architecture numbers of a llama-architecture (or gemma3) model."""

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int = 131072
    rope_freq_base: float = 500000.0
    rms_eps: float = 1e-5
    name: str = "shape-model"
    arch: str = "llama"
    # gemma3 only: sliding window (tokens) and every swa_pattern-th layer full
    n_swa: int = 0
    swa_pattern: int = 0

    @property
    def n_embd_q(self) -> int:
        return self.n_head * self.head_dim

    @property
    def n_embd_kv(self) -> int:
        return self.n_head_kv * self.head_dim

    def kv_values_per_token(self) -> int:
        """K plus V values cached per token, all layers."""
        return 2 * self.n_layer * self.n_embd_kv


PRESETS: Dict[str, ShapeSpec] = {
    # Llama-3.1-8B's shape (GQA 32/8, head_dim 128, vocab 128256).
    "llama8b": ShapeSpec(n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, head_dim=128,
                         n_ff=14336, n_vocab=128256, n_ctx_train=131072, name="llama8b-shape"),
    # Llama-3.1-70B's shape (GQA 64/8, head_dim 128): ~40 GB in Q4_0, for two GPUs
    # with --split layer (docs/multi-gpu.md).
    "llama70b": ShapeSpec(n_layer=80, n_embd=8192, n_head=64, n_head_kv=8, head_dim=128,
                          n_ff=28672, n_vocab=128256, n_ctx_train=131072, name="llama70b-shape"),
    # Small enough for a unit test on 2 cores (well under 1 MiB in Q4_0).
    "tiny": ShapeSpec(n_layer=2, n_embd=256, n_head=4, n_head_kv=2, head_dim=64,
                      n_ff=512, n_vocab=512, n_ctx_train=4096, rope_freq_base=10000.0, name="tiny-shape"),
    # Shapes of the other model families we report (speed depends on the shape,
    # so these are llama-architecture files): Gemma-3-1B (head_dim 256, one KV
    # head, GQA 4, vocab 262k) and Qwen2.5-0.5B (head_dim 64, GQA 7, vocab 152k).
    "gemma3-1b": ShapeSpec(n_layer=26, n_embd=1152, n_head=4, n_head_kv=1, head_dim=256, n_ff=6912,
                           n_vocab=262144, n_ctx_train=32768, rope_freq_base=1000000.0, rms_eps=1e-6,
                           name="gemma3-1b-shape"),
    "qwen2.5-0.5b": ShapeSpec(n_layer=24, n_embd=896, n_head=14, n_head_kv=2, head_dim=64, n_ff=4864,
                              n_vocab=151936, n_ctx_train=32768, rope_freq_base=1000000.0, rms_eps=1e-6,
                              name="qwen2.5-0.5b-shape"),
    # A tiny gemma3 (iSWA: layers 0 and 2 slide over a 32-token window, 1 and 3
    # see everything) with Gemma-3's head layout, for the side-state tests.
    "tiny-gemma3": ShapeSpec(n_layer=4, n_embd=256, n_head=4, n_head_kv=1, head_dim=256, n_ff=512,
                             n_vocab=512, n_ctx_train=4096, rope_freq_base=10000.0, rms_eps=1e-6,
                             name="tiny-gemma3-shape", arch="gemma3", n_swa=32, swa_pattern=2),
}

#: weight type -> (ggml values per block, bytes per block, gguf file type)
WEIGHT_TYPES: Dict[str, Tuple[int, int, int]] = {
    "q4_0": (32, 18, 2),  # LLAMA_FTYPE_MOSTLY_Q4_0
    "q8_0": (32, 34, 7),  # LLAMA_FTYPE_MOSTLY_Q8_0
    "f16": (1, 2, 1),  # LLAMA_FTYPE_MOSTLY_F16
}
DEFAULT_WEIGHT_TYPE = "q4_0"

_SPEC_FIELDS = ("n_layer", "n_embd", "n_head", "n_head_kv", "head_dim", "n_ff", "n_vocab", "n_ctx_train")


# ---------------------------------------------------------------------------- spec


def resolve_spec(preset: Optional[str] = "llama8b", **overrides: Optional[int]) -> ShapeSpec:
    """A preset (``llama8b``, ``tiny``) with some numbers replaced; checked.

    ``preset=None`` needs every number in ``overrides``. Overrides that are
    ``None`` are ignored (argparse defaults).
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - set(_SPEC_FIELDS) - {"rope_freq_base", "rms_eps", "name", "arch", "n_swa",
                                                       "swa_pattern"})
    if unknown:
        raise ShapeModelError(f"unknown shape field(s): {', '.join(unknown)}; known: {', '.join(_SPEC_FIELDS)}")
    if preset is None:
        missing = [f for f in _SPEC_FIELDS if f not in given and f != "n_ctx_train"]
        if missing:
            raise ShapeModelError(f"without a preset every shape number is needed; missing: {', '.join(missing)}")
        spec = ShapeSpec(**given)  # type: ignore[arg-type]
    else:
        key = str(preset).strip().lower()
        if key not in PRESETS:
            raise ShapeModelError(f"unknown shape preset {preset!r}; presets: {', '.join(PRESETS)}")
        spec = dataclasses.replace(PRESETS[key], **given)
        if given and "name" not in given:
            spec = dataclasses.replace(spec, name=f"{PRESETS[key].name}-custom")
    check_spec(spec)
    return spec


def check_spec(spec: ShapeSpec, weight_type: str = DEFAULT_WEIGHT_TYPE) -> None:
    """Raise ShapeModelError unless llama.cpp can load a model of this shape and type."""
    for f in _SPEC_FIELDS:
        v = getattr(spec, f)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ShapeModelError(f"{f} must be a positive integer, got {v!r}")
    if spec.n_head % spec.n_head_kv:
        raise ShapeModelError(f"n_head ({spec.n_head}) must be a multiple of n_head_kv ({spec.n_head_kv})")
    if spec.head_dim % 2:
        raise ShapeModelError(f"head_dim must be even (RoPE rotates pairs), got {spec.head_dim}")
    if spec.arch not in ARCHS:
        raise ShapeModelError(f"unknown architecture {spec.arch!r}; known: {', '.join(ARCHS)}")
    if spec.arch == "gemma3" and (spec.n_swa < 1 or spec.swa_pattern < 2):
        raise ShapeModelError("gemma3 needs a sliding window (n_swa >= 1) and swa_pattern >= 2")
    if spec.n_vocab < 3:
        raise ShapeModelError(f"n_vocab must be at least 3 (<unk>, <s>, </s>), got {spec.n_vocab}")
    wt = _weight_type(weight_type)
    block = WEIGHT_TYPES[wt][0]
    # Every matrix row (ggml ne0) must be whole blocks.
    for what, n in (("n_embd", spec.n_embd), ("n_head*head_dim", spec.n_embd_q), ("n_ff", spec.n_ff)):
        if n % block:
            raise ShapeModelError(f"{what} = {n} is not a multiple of {block}, the {wt} block size")


def _weight_type(name: str) -> str:
    key = str(name).strip().lower()
    if key not in WEIGHT_TYPES:
        raise ShapeModelError(f"unknown weight type {name!r}; choose one of: {', '.join(WEIGHT_TYPES)}")
    return key


# ---------------------------------------------------------------------------- tensors


@dataclass(frozen=True)
class _Tensor:
    name: str
    ne: Tuple[int, ...]  # ggml order: ne[0] = row length
    quantized: bool  # False: F32 (norms)

    @property
    def n_values(self) -> int:
        return math.prod(self.ne)


def tensor_plan(spec: ShapeSpec) -> List[_Tensor]:
    """Every tensor of the model, in file order (ggml ne order)."""
    e, q, kv, ff, d = spec.n_embd, spec.n_embd_q, spec.n_embd_kv, spec.n_ff, spec.head_dim
    gemma = spec.arch == "gemma3"
    out = [_Tensor("token_embd.weight", (e, spec.n_vocab), True)]
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        out += [
            _Tensor(p + "attn_norm.weight", (e,), False),
            _Tensor(p + "attn_q.weight", (e, q), True),
            _Tensor(p + "attn_k.weight", (e, kv), True),
            _Tensor(p + "attn_v.weight", (e, kv), True),
            _Tensor(p + "attn_output.weight", (q, e), True),
        ]
        if gemma:
            out += [_Tensor(p + "attn_q_norm.weight", (d,), False), _Tensor(p + "attn_k_norm.weight", (d,), False),
                    _Tensor(p + "post_attention_norm.weight", (e,), False)]
        out += [
            _Tensor(p + "ffn_norm.weight", (e,), False),
            _Tensor(p + "ffn_gate.weight", (e, ff), True),
            _Tensor(p + "ffn_up.weight", (e, ff), True),
            _Tensor(p + "ffn_down.weight", (ff, e), True),
        ]
        if gemma:
            out += [_Tensor(p + "post_ffw_norm.weight", (e,), False)]
    out += [_Tensor("output_norm.weight", (e,), False), _Tensor("output.weight", (e, spec.n_vocab), True)]
    return out


def _nbytes(t: _Tensor, weight_type: str) -> int:
    if not t.quantized:
        return 4 * t.n_values
    block, size, _ = WEIGHT_TYPES[weight_type]
    return t.n_values // block * size


def weights_nbytes(spec: ShapeSpec, weight_type: str = DEFAULT_WEIGHT_TYPE) -> int:
    """Bytes of tensor data (without padding and metadata)."""
    wt = _weight_type(weight_type)
    return sum(_nbytes(t, wt) for t in tensor_plan(spec))


def n_params(spec: ShapeSpec) -> int:
    return sum(t.n_values for t in tensor_plan(spec))


# ---------------------------------------------------------------------------- random data


def _scale_exponent(row_len: int, code_std: float) -> int:
    """Exponent e so that a block scale in [2^e, 2^(e+1)) (mean 1.5 * 2^e) times
    codes of standard deviation ``code_std`` gives weights of std ~ 1/sqrt(row_len)."""
    target = 1.0 / (math.sqrt(row_len) * code_std * 1.5)
    return int(round(math.log2(target)))


def _fp16_bits(exponent: int) -> int:
    """fp16 bit pattern of 2^exponent (normal numbers only)."""
    biased = exponent + 15
    if not 1 <= biased <= 30:
        raise ShapeModelError(f"weight scale 2^{exponent} is outside fp16's normal range")
    return biased << 10


def _random_words(rng: np.random.Generator, n_bytes: int) -> np.ndarray:
    """``n_bytes`` random bytes as a uint8 array (fast path: raw 64-bit words)."""
    words = rng.bit_generator.random_raw((n_bytes + 7) // 8)
    return words.view(np.uint8)[:n_bytes]


def _chunks(t: _Tensor, weight_type: str, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Bytes of tensor ``t`` in chunks of at most _CHUNK bytes."""
    total = _nbytes(t, weight_type)
    if not t.quantized:  # norm weights: F32 ones
        yield np.ones(t.n_values, dtype=np.float32).view(np.uint8)
        return
    row = t.ne[0]
    if weight_type == "f16":
        # random sign and mantissa, fixed exponent: magnitudes in [2^e, 2^(e+1))
        base = np.uint16(_fp16_bits(_scale_exponent(row, 1.0)))
        for start in range(0, total, _CHUNK):
            buf = _random_words(rng, min(_CHUNK, total - start)).view(np.uint16)
            buf &= np.uint16(0x83FF)
            buf |= base
            yield buf.view(np.uint8)
        return
    block, size, _ = WEIGHT_TYPES[weight_type]
    # q4_0: codes 0..15 mean q-8, std sqrt(255/12); q8_0: int8 codes, std sqrt((256^2-1)/12)
    code_std = math.sqrt(255 / 12) if weight_type == "q4_0" else math.sqrt((256 ** 2 - 1) / 12)
    base = np.uint16(_fp16_bits(_scale_exponent(row, code_std)))
    words_per_block = size // 2  # 9 or 17 uint16: the scale is word 0 of each block
    for start in range(0, total, _CHUNK):
        buf = _random_words(rng, min(_CHUNK, total - start))
        scales = buf.view(np.uint16).reshape(-1, words_per_block)[:, 0]
        scales &= np.uint16(0x03FF)  # positive, random mantissa
        scales |= base
        yield buf


# ---------------------------------------------------------------------------- vocabulary


def _vocab(n_vocab: int) -> Tuple[List[str], List[float], List[int]]:
    """Minimal SentencePiece-style vocabulary: <unk>, <s>, </s>, byte tokens, fillers."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [2, 3, 3]  # UNKNOWN, CONTROL, CONTROL (gguf.TokenType)
    if n_vocab >= 3 + 256:
        tokens += [f"<0x{b:02X}>" for b in range(256)]
        types += [6] * 256  # BYTE
    n_fill = n_vocab - len(tokens)
    tokens += [f"\u2581t{i}" for i in range(n_fill)]  # "▁t0", "▁t1", ...: normal pieces
    types += [1] * n_fill  # NORMAL
    scores = [0.0] * len(tokens)
    for i in range(len(tokens) - n_fill, len(tokens)):
        scores[i] = -float(i)
    return tokens, scores, types


# ---------------------------------------------------------------------------- writer


def write_shape_model(
    path: PathLike,
    spec: ShapeSpec,
    weight_type: str = DEFAULT_WEIGHT_TYPE,
    seed: int = 0,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Path:
    """Write a random-weight GGUF of shape ``spec`` to ``path``; returns the path.

    The file appears atomically (written to ``path + '.part'``, then renamed).
    ``progress(bytes_done, bytes_total)`` is called after every chunk.
    """
    import gguf  # noqa: PLC0415  (gguf-py is a dependency, but keep `import pyllm_kv` light)

    wt = _weight_type(weight_type)
    check_spec(spec, wt)
    path = Path(path).expanduser()
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    plan = tensor_plan(spec)
    qtype = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "f16": gguf.GGMLQuantizationType.F16}[wt]

    w = gguf.GGUFWriter(str(part), spec.arch)
    try:
        w.add_name(spec.name)
        w.add_description(f"random weights, shape only (pyllm_kv.shape_model v{GENERATOR_VERSION}, seed {seed})")
        w.add_context_length(spec.n_ctx_train)
        w.add_embedding_length(spec.n_embd)
        w.add_block_count(spec.n_layer)
        w.add_feed_forward_length(spec.n_ff)
        w.add_head_count(spec.n_head)
        w.add_head_count_kv(spec.n_head_kv)
        w.add_key_length(spec.head_dim)
        w.add_value_length(spec.head_dim)
        w.add_rope_dimension_count(spec.head_dim)
        w.add_rope_freq_base(float(spec.rope_freq_base))
        w.add_layer_norm_rms_eps(float(spec.rms_eps))
        if spec.arch == "gemma3":
            w.add_sliding_window(spec.n_swa)
            w.add_uint32(f"{spec.arch}.attention.sliding_window_pattern", spec.swa_pattern)
        w.add_vocab_size(spec.n_vocab)
        w.add_file_type(WEIGHT_TYPES[wt][2])
        if wt != "f16":
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        tokens, scores, types = _vocab(spec.n_vocab)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
        for t in plan:
            shape = tuple(reversed(t.ne))  # gguf-py takes numpy order and reverses it
            if t.quantized:
                w.add_tensor_info(t.name, shape, np.dtype(np.float16), _nbytes(t, wt), raw_dtype=qtype)
            else:
                w.add_tensor_info(t.name, shape, np.dtype(np.float32), _nbytes(t, wt))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()

        # Tensor data, streamed (GGUFWriter.write_tensor_data wants whole arrays).
        fout = w.fout[0]
        align = w.data_alignment
        rng = np.random.Generator(np.random.PCG64(seed))
        total, done = sum(_nbytes(t, wt) for t in plan), 0
        _pad(fout, fout.tell(), align)
        for t in plan:
            written = 0
            for chunk in _chunks(t, wt, rng):
                fout.write(memoryview(chunk))
                written += chunk.nbytes
                done += chunk.nbytes
                if progress is not None:
                    progress(done, total)
            assert written == _nbytes(t, wt), (t.name, written)
            _pad(fout, written, align)
        fout.flush()
    except BaseException:
        w.close()
        part.unlink(missing_ok=True)
        raise
    w.close()
    os.replace(part, path)
    return path


def _pad(fout, n: int, align: int) -> None:  # noqa: ANN001
    pad = (-n) % align
    if pad:
        fout.write(b"\0" * pad)


# ---------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``$PYLLM_KV_CACHE_DIR``, else ``$XDG_CACHE_HOME/pyllm-kv``, else ``~/.cache/pyllm-kv``;
    shape models go into its ``shape-models/`` folder."""
    env = os.environ.get("PYLLM_KV_CACHE_DIR")
    if env:
        base = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "pyllm-kv"
    return base / "shape-models"


def cache_name(spec: ShapeSpec, weight_type: str = DEFAULT_WEIGHT_TYPE, seed: int = 0) -> str:
    """File name that changes whenever the generated bytes would."""
    key = json.dumps([GENERATOR_VERSION, dataclasses.asdict(spec), _weight_type(weight_type), seed], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return f"{spec.name}-{_weight_type(weight_type)}-{digest}.gguf"


def ensure_shape_model(
    spec: "ShapeSpec | str",
    weight_type: str = DEFAULT_WEIGHT_TYPE,
    cache_dir: Optional[PathLike] = None,
    seed: int = 0,
    log: Optional[Callable[[str], None]] = None,
) -> Path:
    """Path of a cached shape model (preset name or spec), written first if missing."""
    if isinstance(spec, str):
        spec = resolve_spec(spec)
    wt = _weight_type(weight_type)
    check_spec(spec, wt)
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = directory / cache_name(spec, wt, seed)
    if path.is_file():
        return path
    if log is not None:
        log(f"writing shape model {path} ({weights_nbytes(spec, wt) / 2**30:.2f} GiB of random {wt} weights)")
    return write_shape_model(path, spec, wt, seed=seed)


# ---------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("out_pos", nargs="?", metavar="OUT", help="output file (same as --out)")
    parser.add_argument("--out", "-o", default=None, metavar="FILE.gguf", help="output GGUF file")
    parser.add_argument("--preset", default="llama8b", help=f"starting shape: {', '.join(PRESETS)} (default llama8b)")
    parser.add_argument("--type", dest="weight_type", default=DEFAULT_WEIGHT_TYPE,
                        help=f"weight type: {', '.join(WEIGHT_TYPES)} (default {DEFAULT_WEIGHT_TYPE})")
    for f in _SPEC_FIELDS:
        parser.add_argument("--" + f.replace("_", "-"), dest=f, type=int, default=None, metavar="N",
                            help=f"override the preset's {f}")
    parser.add_argument("--name", default=None, help="general.name of the model")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(
        prog="make_shape_model", description="Write a random-weight llama GGUF of a given shape (for speed runs)."))
    args = parser.parse_args(argv)
    out = args.out or args.out_pos
    if not out:
        parser.error("give the output file (--out FILE.gguf)")
    try:
        spec = resolve_spec(args.preset, name=args.name, **{f: getattr(args, f) for f in _SPEC_FIELDS})
        wt = _weight_type(args.weight_type)
        check_spec(spec, wt)
        total = weights_nbytes(spec, wt)
        print(f"{out}: {spec.name}, {n_params(spec) / 1e9:.3f} B params, {wt}, "
              f"{total / 2**30:.2f} GiB of weights", file=sys.stderr)
        t0 = time.perf_counter()
        last = [0.0]

        def progress(done: int, tot: int) -> None:
            now = time.perf_counter()
            if sys.stderr.isatty() and (now - last[0] > 0.5 or done == tot):
                last[0] = now
                print(f"\r{done / 2**30:6.2f} / {tot / 2**30:.2f} GiB", end="", file=sys.stderr)

        path = write_shape_model(out, spec, wt, seed=args.seed, progress=progress)
        if sys.stderr.isatty():
            print(file=sys.stderr)
        dt = time.perf_counter() - t0
        size = path.stat().st_size
        print(f"wrote {path} ({size / 2**30:.2f} GiB in {dt:.1f} s, {size / 2**20 / max(dt, 1e-9):.0f} MiB/s)",
              file=sys.stderr)
    except PyllmKvError as exc:
        print(f"make_shape_model: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # python -m pyllm_kv.shape_model
    sys.exit(main())
