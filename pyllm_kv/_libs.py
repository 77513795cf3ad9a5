"""Where the native pieces live, and how to talk to them.

pyllm_kv drives a *patched* llama.cpp. The shared libraries (libllama, libggml*)
and tools (llama-bench, llama-perplexity, ...) ship inside the wheel under
``pyllm_kv/lib`` and ``pyllm_kv/bin``. Developers point at a build tree instead
with ``PYLLM_KV_LIB_DIR`` / ``PYLLM_KV_BIN_DIR``.

Two things here are deliberately lazy and cached:

* :func:`llama_cpp` imports llama-cpp-python's Python layer. That module loads
  ``libllama.so`` *at import time* from ``LLAMA_CPP_LIB_PATH``, so the variable
  must be set before the first import, and it cannot be changed afterwards.
* :func:`ggml_type_id` asks the loaded libggml-base for its type table. Our
  cache types are appended to ``enum ggml_type`` by patches, so their numbers
  depend on the build; we never hard-code them.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Dict, NamedTuple

from .errors import LibraryNotFound

_PKG_DIR = Path(__file__).resolve().parent

# How far we look for the end of enum ggml_type. Upstream has 43 entries; patches
# append a handful. 512 is generous and the probe is cheap.
_MAX_GGML_TYPES = 512


def _installed_dir(sub: str) -> Path:
    """``pyllm_kv/<sub>`` next to this module, else in the installed distribution.

    The second case matters when Python imports pyllm_kv from a source checkout
    (e.g. pytest run from the repo root) while the built libraries live in the
    installed wheel.
    """
    here = _PKG_DIR / sub
    if here.is_dir():
        return here
    try:
        from importlib import metadata

        dist = metadata.distribution("pyllm-kv")
        installed = Path(str(dist.locate_file(f"pyllm_kv/{sub}")))
        if installed.is_dir():
            return installed.resolve()
    except Exception:  # not installed: fall through to the in-package path
        pass
    return here


def lib_dir() -> Path:
    """Directory holding libllama.so and libggml*.so.

    ``$PYLLM_KV_LIB_DIR`` wins (development against a build tree); otherwise the
    copy bundled in the wheel.
    """
    env = os.environ.get("PYLLM_KV_LIB_DIR")
    return Path(env).expanduser().resolve() if env else _installed_dir("lib")


def bin_dir() -> Path:
    """Directory holding the llama.cpp tools (llama-bench, llama-perplexity, ...)."""
    env = os.environ.get("PYLLM_KV_BIN_DIR")
    return Path(env).expanduser().resolve() if env else _installed_dir("bin")


def _shared_lib(stem: str) -> Path:
    """Path of ``lib<stem>.so`` in :func:`lib_dir`, or a LibraryNotFound that says how to fix it."""
    path = lib_dir() / f"lib{stem}.so"
    if not path.is_file():
        raise LibraryNotFound(
            f"native library {path.name} not found in {lib_dir()}. "
            "Reinstall the pyllm-kv wheel, or set PYLLM_KV_LIB_DIR to a llama.cpp "
            "build directory that contains libllama.so and libggml*.so."
        )
    return path


def tool(name: str) -> Path:
    """Path to a bundled llama.cpp tool such as ``llama-bench``."""
    path = bin_dir() / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise LibraryNotFound(
            f"llama.cpp tool {name!r} not found (or not executable) in {bin_dir()}. "
            "Reinstall the pyllm-kv wheel, or set PYLLM_KV_BIN_DIR to the build's bin/ directory."
        )
    return path


@functools.lru_cache(maxsize=None)
def llama_cpp() -> ModuleType:
    """Import and return llama-cpp-python's ``llama_cpp`` module, bound to our libllama.

    The module reads ``LLAMA_CPP_LIB_PATH`` once, at import, to find libllama.so.
    If something imported it earlier with another path we cannot rebind it, so we
    refuse rather than silently run an unpatched library.
    """
    directory = str(_shared_lib("llama").parent)
    already = sys.modules.get("llama_cpp")
    if already is not None:
        bound = os.environ.get("LLAMA_CPP_LIB_PATH")
        if bound is not None and Path(bound).resolve() != Path(directory):
            raise LibraryNotFound(
                f"llama_cpp was already imported with LLAMA_CPP_LIB_PATH={bound}, "
                f"but pyllm_kv needs {directory}. Import pyllm_kv (or set the variable) "
                "before anything imports llama_cpp."
            )
    os.environ["LLAMA_CPP_LIB_PATH"] = directory
    import llama_cpp as module  # noqa: PLC0415  (import must follow the env var)

    return module


class GgmlType(NamedTuple):
    id: int
    name: str
    block_size: int  # values per block (1 for f16/f32)
    type_size: int  # bytes per block


@functools.lru_cache(maxsize=None)
def _ggml_types(directory: str) -> Dict[str, GgmlType]:
    lib = ctypes.CDLL(str(Path(directory) / "libggml-base.so"))
    lib.ggml_type_name.argtypes = [ctypes.c_int]
    lib.ggml_type_name.restype = ctypes.c_char_p
    lib.ggml_blck_size.argtypes = [ctypes.c_int]
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_type_size.argtypes = [ctypes.c_int]
    lib.ggml_type_size.restype = ctypes.c_size_t
    lib.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    lib.ggml_validate_row_data.restype = ctypes.c_bool

    count = _ggml_type_count(lib)
    types: Dict[str, GgmlType] = {}
    for type_id in range(count):
        raw = lib.ggml_type_name(type_id)
        if raw is None:  # an unset slot in a patched table
            continue
        block = lib.ggml_blck_size(type_id)
        if block <= 0:  # removed ids ("DEPRECATED", "... REMOVED") keep a row with block 0
            continue
        name = raw.decode("ascii", "replace")
        types[name] = GgmlType(type_id, name, int(block), int(lib.ggml_type_size(type_id)))
    return types


def _ggml_type_count(lib: ctypes.CDLL) -> int:
    """Find GGML_TYPE_COUNT of the loaded library.

    ggml_type_name() indexes a static array with only an assert() as bounds check,
    and asserts are compiled out in release builds, so walking ids until a NULL
    name reads past the array (garbage or a segfault). ggml_validate_row_data() is
    the one public function with a real range check: for an id >= GGML_TYPE_COUNT it
    returns false *before* touching the table. For in-range ids it divides by the
    type size, which is 0 for removed ids, so we probe from the top down and stop at
    the first in-range id: GGML_TYPE_COUNT - 1, always a live type (new types are
    appended at the end). Its "invalid type" complaints go to fd 2; we mute them.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        for type_id in range(_MAX_GGML_TYPES - 1, -1, -1):
            if lib.ggml_validate_row_data(type_id, None, 0):
                return type_id + 1
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    raise LibraryNotFound(f"could not read the ggml type table from {lib._name}")


def ggml_types() -> Dict[str, GgmlType]:
    """All live ggml types of the library in :func:`lib_dir`, by ggml name."""
    return dict(_ggml_types(str(_shared_lib("ggml-base").parent)))


def ggml_type_id(name: str) -> int:
    """The ``enum ggml_type`` value for a ggml type name (``"q8_0"``, ``"kv4"``, ...).

    Raises KeyError if this build does not have the type (e.g. our types on an
    unpatched upstream build).
    """
    types = ggml_types()
    if name not in types:
        raise KeyError(
            f"ggml type {name!r} is not in the library at {lib_dir()} "
            f"(it knows: {', '.join(sorted(types))})"
        )
    return types[name].id


def has_ggml_type(name: str) -> bool:
    """True if the library in :func:`lib_dir` provides the ggml type ``name``."""
    return name in ggml_types()
