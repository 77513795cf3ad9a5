"""pyllm-kv: llama.cpp with low-bit KV-cache formats, driven from Python.

    import pyllm_kv
    with pyllm_kv.load(cache_k="q8_0", cache_v="kv4") as m:
        print(m.generate("The capital of France is", max_tokens=16))
        print(m.kv_report())

Importing this package is cheap: the native libraries are loaded on the first
``load()`` (see ``pyllm_kv._libs``).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version as _version

from . import formats
from .errors import (
    ContextOverflow,
    DefaultModelMissing,
    FlashAttentionRequired,
    FormatNotAvailable,
    InvalidModelFile,
    LibraryNotFound,
    LlamaError,
    ModelNotFound,
    PyllmKvError,
    RpcServerRefused,
    UnknownCacheFormat,
    UnsupportedHeadDim,
)
from .formats import FORMATS, Format, parse_pair, resolve
from .model import Model, default_model_path, format_kv_report, load, validate_config
from .model_info import ModelInfo, kv_bytes_per_token, read_model_info
from .squat_options import SquatOptions

try:
    __version__ = _version("pyllm-kv")
except PackageNotFoundError:  # running from a source checkout
    __version__ = "0+unknown"

__all__ = [
    "load", "Model", "SquatOptions", "ModelInfo", "read_model_info", "kv_bytes_per_token", "default_model_path",
    "validate_config", "format_kv_report", "formats", "FORMATS", "Format", "resolve", "parse_pair",
    "PyllmKvError", "UnknownCacheFormat", "ModelNotFound", "InvalidModelFile", "UnsupportedHeadDim",
    "ContextOverflow", "DefaultModelMissing", "FlashAttentionRequired", "FormatNotAvailable",
    "LibraryNotFound", "LlamaError", "RpcServerRefused", "__version__",
]
