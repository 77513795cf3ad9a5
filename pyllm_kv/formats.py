"""Registry of KV-cache formats, as users type them (``--cache-k q8_0``).

One row per format: what it costs (bits per value, counted honestly: block
scales and minimums included, per-layer side state reported separately) and
where it runs. The numbers here are *documentation and arithmetic*; the actual
type ids come from the loaded library at run time (``_libs.ggml_type_id``), so a
format listed here may still be missing from an old/unpatched build.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

from .errors import UnknownCacheFormat

# CUDA status of our own formats, set in one place: set_rows (SQuat's key
# encoder included), get_rows, conversion and the flash-attention decode kernel
# run on the GPU (native/cuda, patches/0009; docs/speed.md).
OURS_CUDA = "yes"
# Our block size (values per block). DESIGN.md 2.1 allows 32 or 64; 64 was chosen
# (one block = one 64-wide head for most models, half the scale overhead of 32).
OURS_BLOCK = 64


@dataclass(frozen=True)
class Format:
    name: str  # what the user types
    bits: float  # bits per stored value, block scales/minimums included
    block: int  # values per block; head_dim must be a multiple of it
    cpu: str  # "yes" / "planned" / "partial"
    cuda: str
    description: str
    is_ours: bool = False
    # Bytes of per-sequence side state this format keeps *per layer* for K (or V)
    # (transform matrices, query subspaces). It does not grow with the context, so
    # it is reported as a total and spread over n_ctx in bytes-per-token figures.
    side_state_bytes: int = 0
    ggml_name: str = ""  # name in ggml's type table; defaults to `name`
    # True when the side state belongs to the whole cache (all sequences of a
    # context share it: DecoQuant fits S from the first prefill that reaches an
    # empty cache), so a sequence decoded beside others may differ slightly from
    # a solo run. tests/test_multiseq.py bounds that difference by numbers.
    shared_side_state: bool = False
    # Side state that scales with the model's KV heads instead of a fixed size per
    # layer: "squat" = per KV head the upper triangle of a head_dim x head_dim
    # factor in fp16 (head_dim*(head_dim+1) bytes), K only
    # (see model_info.side_state_bytes). Empty for everything else.
    side_state_kind: str = ""

    @property
    def ggml(self) -> str:
        return self.ggml_name or self.name

    @property
    def is_quantized(self) -> bool:
        """Block formats (block > 1). llama.cpp needs flash attention to quantize V."""
        return self.block > 1

    def row_bytes(self, n_values: int) -> float:
        """Bytes to store ``n_values`` values (one K or V row) in this format."""
        return n_values * self.bits / 8


# DecoQuant side state per layer, for K (or V): three float32 16x16 matrices
# (S for the query, S^-1 for encoding, S^T for the output/K-shift), see
# native/include/pkv/llama_side_state.h. O(layers), not O(tokens).
DECO_GROUP = 16
DECO_SIDE_STATE_BYTES = 3 * DECO_GROUP * DECO_GROUP * 4


def _ours(bits: int, description: str, family: str = "kv", side_state_bytes: int = 0,
          side_state_kind: str = "") -> Format:
    shared = side_state_bytes > 0 or bool(side_state_kind)
    # b-bit codes + one fp16 scale + one fp16 minimum per block: b + 32/B bits per value.
    return Format(
        name=f"{family}{bits}",
        bits=bits + 32 / OURS_BLOCK,
        block=OURS_BLOCK,
        cpu="yes",
        cuda=OURS_CUDA,
        description=description,
        is_ours=True,
        side_state_bytes=side_state_bytes,
        shared_side_state=shared,
        side_state_kind=side_state_kind,
    )


_ALL = [
    Format("f32", 32.0, 1, "yes", "partial", "32-bit float (reference; no CUDA flash-attention kernel)"),
    Format("f16", 16.0, 1, "yes", "yes", "16-bit float, llama.cpp's default cache"),
    Format("bf16", 16.0, 1, "yes", "yes", "bfloat16"),
    Format("q8_0", 8.5, 32, "yes", "yes", "8-bit symmetric, fp16 scale per 32 values"),
    Format("q5_1", 6.0, 32, "yes", "yes", "5-bit asymmetric, fp16 scale+min per 32 values"),
    Format("q5_0", 5.5, 32, "yes", "yes", "5-bit symmetric, fp16 scale per 32 values"),
    Format("q4_1", 5.0, 32, "yes", "yes", "4-bit asymmetric, fp16 scale+min per 32 values"),
    Format("q4_0", 4.5, 32, "yes", "yes", "4-bit symmetric, fp16 scale per 32 values"),
    Format("iq4_nl", 4.5, 32, "yes", "partial", "4-bit non-linear codebook (no CUDA flash-attention kernel)"),
    _ours(4, "ours: 4-bit asymmetric, fp16 scale+min per 64 values"),
    _ours(3, "ours: 3-bit asymmetric, fp16 scale+min per 64 values"),
    _ours(2, "ours: 2-bit asymmetric, fp16 scale+min per 64 values"),
    _ours(4, "ours: DecoQuant, rows whitened by a per-layer 16x16 S from the prompt, then kv4",
          "deco", DECO_SIDE_STATE_BYTES),
    _ours(3, "ours: DecoQuant, rows whitened by a per-layer 16x16 S from the prompt, then kv3",
          "deco", DECO_SIDE_STATE_BYTES),
    _ours(2, "ours: DecoQuant, rows whitened by a per-layer 16x16 S from the prompt, then kv2",
          "deco", DECO_SIDE_STATE_BYTES),
    # SQuat: K (this type as K) encoded against the prompt's query subspace; as V
    # the plain block format of the same bits. CPU only: the encoder is a CPU op.
    *(_ours(b, f"ours: SQuat, keys {b}-bit with the error pushed out of the prompt's query "
               f"subspace (per layer and KV head); values plain kv{b}", "squat",
            side_state_kind="squat") for b in (4, 3, 2)),
]

FORMATS: Dict[str, Format] = {f.name: f for f in _ALL}


def names() -> Tuple[str, ...]:
    """All format names, in display order (upstream first, then ours)."""
    return tuple(FORMATS)


def resolve(name: "str | Format") -> Format:
    """The :class:`Format` for a user-typed name (case-insensitive)."""
    if isinstance(name, Format):
        return name
    key = str(name).strip().lower()
    try:
        return FORMATS[key]
    except KeyError:
        raise UnknownCacheFormat(
            f"unknown cache format {name!r}; valid formats: {', '.join(names())} "
            "(see `pyllm-kv formats`)"
        ) from None


def parse_pair(spec: str) -> Tuple[str, str]:
    """``"q8_0/kv2"`` -> ``("q8_0", "kv2")``; ``"kv4"`` -> ``("kv4", "kv4")``.

    Names are validated and normalised (lower case).
    """
    parts = str(spec).split("/")
    if len(parts) == 1:
        f = resolve(parts[0])
        return f.name, f.name
    if len(parts) == 2:
        return resolve(parts[0]).name, resolve(parts[1]).name
    raise UnknownCacheFormat(
        f"cannot parse cache spec {spec!r}: use one format name (both K and V) or 'K/V', "
        f"e.g. 'q8_0/kv2'; valid formats: {', '.join(names())}"
    )
