"""Model shape from GGUF metadata, and what the KV cache costs per token.

We read the file with the ``gguf`` package (no llama context needed), so the CLI
can print ``info`` instantly and :func:`pyllm_kv.load` can refuse a bad
combination (head_dim vs block size) *before* llama.cpp allocates anything.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Tuple, Union

from . import formats
from .errors import InvalidModelFile, ModelNotFound, UnsupportedHeadDim

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelInfo:
    path: str
    arch: str
    name: str
    n_layer: int
    n_head: int
    n_head_kv: int  # max over layers (most models: the same for all)
    head_dim_k: int
    head_dim_v: int
    n_ctx_train: int
    n_vocab: int
    has_chat_template: bool
    # KV heads of every layer; differs per layer in a few architectures (OpenELM...).
    n_head_kv_per_layer: List[int] = field(default_factory=list)
    # Sliding-window attention (iSWA: Gemma 2/3, Cohere2, gpt-oss, ...): the window
    # in tokens (0: none) and which layers slide (None: no SWA, or a layout this
    # module does not know; then every layer is counted as full).
    n_swa: int = 0
    swa_layers: Optional[Tuple[bool, ...]] = None

    @property
    def head_dim(self) -> int:
        """K head dim (equal to V's for almost all models)."""
        return self.head_dim_k


PathLike = Union[str, "os.PathLike[str]"]

# Which layers of an iSWA model slide, when the GGUF has no
# `<arch>.attention.sliding_window_pattern`: the defaults the pinned llama.cpp's
# loaders pass to load_swa_pattern (src/models/<arch>.cpp). (n_pattern,
# dense_first): layer il slides unless il % n == n-1 (dense_first: il % n == 0).
_SWA_DEFAULT_PATTERN = {
    "gemma2": (2, False), "gemma3": (6, False), "gemma-embedding": (6, False), "gemma3n": (5, False),
    "cohere2": (4, False), "openai-moe": (2, False), "exaone4": (4, False), "exaone-moe": (4, False),
    "olmo2": (4, False), "llama4": (4, False), "afmoe": (4, False), "plamo3": (8, False),
    "cohere2moe": (4, True), "smallthinker": (4, True), "laguna": (4, True),
}


def _swa_layers(n_layer: int, n_pattern: int, dense_first: bool) -> Tuple[bool, ...]:
    if n_pattern == 0:
        return (True,) * n_layer
    if dense_first:
        return tuple(il % n_pattern != 0 for il in range(n_layer))
    return tuple(il % n_pattern < n_pattern - 1 for il in range(n_layer))


def _check_file(path: Path) -> None:
    """Cheap checks that give a clear message before the GGUF parser runs."""
    if not path.exists():
        raise ModelNotFound(f"model file not found: {path}. Pass the path to a .gguf model file.")
    if not path.is_file():
        raise InvalidModelFile(f"{path} is not a file; pass the path to a .gguf model file.")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise InvalidModelFile(f"cannot read model file {path}: {exc.strerror}.") from exc
    if magic != GGUF_MAGIC:
        raise InvalidModelFile(
            f"{path} is not a GGUF model (starts with {magic!r}, expected {GGUF_MAGIC!r}). "
            "Convert the model with llama.cpp's convert_hf_to_gguf.py, or pass a .gguf file."
        )


def _corrupt(path: Path, why: str) -> InvalidModelFile:
    return InvalidModelFile(
        f"{path} is not a valid GGUF model ({why}); the file may be truncated or corrupt. "
        "Download or convert it again."
    )


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _as_list(value: Any, n: int) -> List[int]:
    """A per-layer hyper-parameter may be stored as one int or as an array."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"per-layer array of length {len(value)} for {n} layers")
        return [int(v) for v in value]
    return [int(value)] * n


def read_model_info(path: PathLike) -> ModelInfo:
    """Shape of the model in a GGUF file; ModelNotFound / InvalidModelFile on bad input.

    Parsing takes seconds for large vocabularies (gguf reads every token string),
    so results are cached per (path, size, mtime).
    """
    path = Path(path).expanduser().absolute()
    _check_file(path)
    st = path.stat()
    return _read_model_info(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _read_model_info(path_str: str, size: int, mtime_ns: int) -> ModelInfo:
    path = Path(path_str)
    import gguf  # noqa: PLC0415  (keep `import pyllm_kv` light)

    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as exc:  # the parser raises ValueError, IndexError, struct/numpy errors...
        raise _corrupt(path, f"the GGUF parser failed: {exc}") from exc

    # The parser maps tensor data lazily; make sure every tensor lies inside the file.
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise _corrupt(path, f"tensor data needs {end} bytes, file has {size}")

    try:
        arch = _field(reader, "general.architecture")
        if not arch:
            raise ValueError("no general.architecture")
        n_layer = int(_field(reader, f"{arch}.block_count"))
        n_embd = int(_field(reader, f"{arch}.embedding_length"))
        heads = _as_list(_field(reader, f"{arch}.attention.head_count"), n_layer)
        kv_raw = _field(reader, f"{arch}.attention.head_count_kv")
        heads_kv = heads if kv_raw is None else _as_list(kv_raw, n_layer)
        n_head = max(heads)
        head_dim_k = int(_field(reader, f"{arch}.attention.key_length", 0)) or n_embd // n_head
        head_dim_v = int(_field(reader, f"{arch}.attention.value_length", 0)) or n_embd // n_head
        n_ctx_train = int(_field(reader, f"{arch}.context_length", 0))
        vocab = _field(reader, f"{arch}.vocab_size")
        if vocab is None:
            tokens = reader.fields.get("tokenizer.ggml.tokens")
            vocab = len(tokens.data) if tokens is not None else 0
        n_swa = int(_field(reader, f"{arch}.attention.sliding_window", 0) or 0)
        swa_layers = None
        if n_swa > 0:
            pattern = _field(reader, f"{arch}.attention.sliding_window_pattern")
            if isinstance(pattern, list):
                swa_layers = tuple(bool(x) for x in pattern[:n_layer])
            elif pattern is not None:
                swa_layers = _swa_layers(n_layer, int(pattern), False)
            elif arch in _SWA_DEFAULT_PATTERN:
                swa_layers = _swa_layers(n_layer, *_SWA_DEFAULT_PATTERN[arch])
        template = _field(reader, "tokenizer.chat_template")
        name = _field(reader, "general.name", "") or path.stem
    except (TypeError, ValueError, KeyError, ZeroDivisionError) as exc:
        raise _corrupt(path, f"missing or malformed model metadata: {exc}") from exc

    return ModelInfo(
        path=str(path),
        arch=str(arch),
        name=str(name),
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=max(heads_kv),
        head_dim_k=head_dim_k,
        head_dim_v=head_dim_v,
        n_ctx_train=n_ctx_train,
        n_vocab=int(vocab),
        has_chat_template=bool(template),
        n_head_kv_per_layer=heads_kv,
        n_swa=n_swa,
        swa_layers=swa_layers,
    )


def _kv_heads(info: ModelInfo) -> int:
    """KV heads summed over all layers."""
    return sum(info.n_head_kv_per_layer) or info.n_head_kv * info.n_layer


def _kv_values_per_token(info: ModelInfo) -> "tuple[int, int]":
    """Values stored per token over all layers: (K values, V values)."""
    kv_heads = _kv_heads(info)
    return kv_heads * info.head_dim_k, kv_heads * info.head_dim_v


def side_state_bytes(info: ModelInfo, fmt_k: "str | formats.Format", fmt_v: "str | formats.Format",
                     squat_transform: str = "hadamard", center: str = "auto") -> int:
    """Per-sequence side state (transforms etc.) of the whole model: O(layers), not O(tokens).

    ``squat_transform="deco"`` (SQuat on the DecoQuant transform) adds DecoQuant's
    matrices for every squat K or V. ``center``: the centering setting
    (squat_options.CENTERS): a float32 center row per layer for each centred side."""
    k, v = formats.resolve(fmt_k), formats.resolve(fmt_v)
    total = info.n_layer * (k.side_state_bytes + v.side_state_bytes)
    if squat_transform == "deco":
        total += info.n_layer * formats.DECO_SIDE_STATE_BYTES * sum(f.side_state_kind == "squat" for f in (k, v))
    if k.side_state_kind == "squat":  # K only: SQuat as V is the plain format
        d = info.head_dim_k  # packed upper triangle of U, fp16 (pkv_squat_pack)
        total += _kv_heads(info) * (d * (d + 1) // 2) * 2
    center_k = k.is_ours and (center in ("k", "kv") or (center == "auto" and k.side_state_kind == "squat"))
    center_v = v.is_ours and center in ("v", "kv")
    total += 4 * _kv_heads(info) * (info.head_dim_k * center_k + info.head_dim_v * center_v)
    return total


def kv_layout(info: ModelInfo, n_ctx: int, n_seq: int = 1, n_ubatch: int = 512,
              swa_full: bool = True) -> List[Tuple[int, int]]:
    """(cells, layers) of every KV cache llama.cpp allocates for a context of
    n_ctx cells: one cache, or for an iSWA model the full layers' (n_ctx cells)
    and the sliding layers' (the window plus a ubatch, rounded up to 256 cells,
    unless swa_full; llama_kv_cache_iswa's rule)."""
    if not info.n_swa or info.swa_layers is None or not any(info.swa_layers):
        return [(n_ctx, info.n_layer)]
    n_sliding = sum(info.swa_layers)
    size_swa = n_ctx
    if not swa_full:
        size_swa = min(n_ctx, -(-(info.n_swa * n_seq + n_ubatch) // 256) * 256)
    out = [(n_ctx, info.n_layer - n_sliding)] if n_sliding < info.n_layer else []
    return out + [(size_swa, n_sliding)]


def kv_cost(info: ModelInfo, fmt_k: "str | formats.Format", fmt_v: "str | formats.Format", n_ctx: int,
            caches: "Optional[List[Tuple[int, int]]]" = None, squat_transform: str = "hadamard",
            center: str = "auto") -> dict:
    """What a KV cache of n_ctx cells costs, counted honestly: every cache llama.cpp
    allocates (``caches``: (cells, layers) each, default :func:`kv_layout`; an iSWA
    model's sliding layers hold the window unless swa_full), block scales, and the
    side state. ``kv_bytes_total`` is that total, ``kv_bytes_per_token`` it over
    n_ctx, ``bits_per_value`` it over the K and V values the caches hold when full."""
    k, v = formats.resolve(fmt_k), formats.resolve(fmt_v)
    side = side_state_bytes(info, k, v, squat_transform, center)
    caches = caches or kv_layout(info, n_ctx)
    cell_layers = sum(c * n for c, n in caches)
    n_k, n_v = info.n_head_kv * info.head_dim_k, info.n_head_kv * info.head_dim_v
    total = cell_layers * (k.row_bytes(n_k) + v.row_bytes(n_v)) + side
    return {
        "kv_caches": [{"cells": c, "layers": n} for c, n in caches],
        "side_state_bytes": side,
        "kv_bytes_total": total,
        "kv_bytes_per_token": total / n_ctx,
        "bits_per_value": 8.0 * total / (cell_layers * (n_k + n_v)),
        "ratio_vs_f16": cell_layers * 2 * (n_k + n_v) / total,
    }


def kv_bytes_per_token(
    info: ModelInfo,
    fmt_k: "str | formats.Format",
    fmt_v: "str | formats.Format",
    n_ctx: Optional[int] = None,
) -> float:
    """KV-cache bytes per token of context, all layers, K plus V.

    Side state does not grow with the context; when ``n_ctx`` is given it is
    spread over it (total / n_ctx) so the figure stays honest for formats that
    have it. Without ``n_ctx`` only the per-token rows are counted.
    """
    k, v = formats.resolve(fmt_k), formats.resolve(fmt_v)
    n_k, n_v = _kv_values_per_token(info)
    per_token = k.row_bytes(n_k) + v.row_bytes(n_v)
    if n_ctx:
        per_token += side_state_bytes(info, k, v) / n_ctx
    return per_token


def check_head_dim(info: ModelInfo, fmt_k: "str | formats.Format", fmt_v: "str | formats.Format") -> None:
    """Raise UnsupportedHeadDim unless K/V head dims are multiples of the formats' blocks.

    A cache row is one token's K (or V) for all KV heads of a layer; llama.cpp
    views it per head, so each head must consist of whole blocks.
    """
    for what, fmt, dim in (("K", formats.resolve(fmt_k), info.head_dim_k), ("V", formats.resolve(fmt_v), info.head_dim_v)):
        if dim % fmt.block:
            ok = [f.name for f in formats.FORMATS.values() if dim % f.block == 0]
            raise UnsupportedHeadDim(
                f"cache format {fmt.name!r} stores blocks of {fmt.block} values, but this model's "
                f"{what} head_dim is {dim} (not a multiple of {fmt.block}). "
                f"Choose a format whose block divides {dim}: {', '.join(ok)}."
            )
