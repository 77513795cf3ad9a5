"""Our shared libraries in a process that already mapped libstdc++ (issue 15).

On the CUDA build, pyllm_kv.load(..., n_gpu_layers>0) died in
llama_model::print_info after gguf-py had been imported: libggml-cuda exported
~2900 std:: template instantiations and libllama's calls bound to them. The
backend libraries now export their C API only (cmake/ggml-backend-exports.map).
These tests check the export tables of whatever backends this build has, and run
the main job after a C++ extension module and libstdc++ (RTLD_GLOBAL) are loaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

BACKENDS = ("libggml-cpu.so", "libggml-cuda.so", "libggml-rpc.so")


def _defined_dynamic_symbols(path):
    out = subprocess.run(["nm", "-D", "--defined-only", str(path)], capture_output=True, text=True, check=True)
    return [line.split()[-1] for line in out.stdout.splitlines() if line.strip()]


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
def test_backend_libraries_export_only_their_c_api(lib_dir):
    checked = 0
    for name in BACKENDS:
        path = lib_dir / name
        if not path.is_file():
            continue
        checked += 1
        syms = _defined_dynamic_symbols(path)
        assert syms, f"{name}: no exported symbols at all?"
        foreign = [s for s in syms if not s.startswith(("ggml_", "gguf_")) and not s.startswith("GGML")]
        assert not foreign, f"{name} exports {len(foreign)} non-API symbols, e.g. {foreign[:5]}"
    assert checked >= 1, f"no backend library in {lib_dir}"


# Symbols that only the C++ runtime itself defines (libstdc++/libsupc++): a library of
# ours that exports one carries a static copy of the runtime and offers it to the others.
RUNTIME_MARKERS = ("__cxa_", "__dynamic_cast", "__gxx_personality", "_ZNSt6locale", "_ZSt4cout",
                   "_ZNSt8ios_base")


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
def test_no_library_exports_a_cxx_runtime(lib_dir):
    """A toolchain whose g++ links libstdc++ statically (the GPU machine's /opt/gcc)
    put a runtime copy into libggml, libggml-base and libllama and exported it (3239,
    696 and 882 symbols): they bound each other's std::locale internals and every
    pyllm_kv.load died with SIGSEGV, CPU or GPU. CMakeLists.txt links our libraries
    with --exclude-libs,ALL so a static runtime stays private to its library."""
    libs = sorted(p for p in lib_dir.glob("lib*.so") if not p.is_symlink() or p.resolve().is_file())
    assert libs, f"no shared libraries in {lib_dir}"
    leaking = {}
    for path in libs:
        runtime = [s for s in _defined_dynamic_symbols(path) if s.startswith(RUNTIME_MARKERS)]
        if runtime:
            leaking[path.name] = (len(runtime), runtime[:3])
    assert not leaking, f"libraries exporting C++ runtime symbols: {leaking}"


def test_main_job_after_cpp_extension_and_global_libstdcxx(lib_dir, model_path):
    """A user who imports a C++ extension (matplotlib's pybind11 module, or torch) and maps
    libstdc++ globally before pyllm_kv gets the same tokens as a clean process.
    On a CUDA build this runs with every layer on the GPU."""
    gpu = (lib_dir / "libggml-cuda.so").is_file()
    code = textwrap.dedent(f"""
        import ctypes, ctypes.util, sys
        ctypes.CDLL(ctypes.util.find_library("stdc++") or "libstdc++.so.6", mode=ctypes.RTLD_GLOBAL)
        import importlib
        for name in ("matplotlib._path", "torch", "numpy"):   # a C++ extension module, whichever exists
            try:
                importlib.import_module(name)
                break
            except ImportError:
                pass
        from pyllm_kv.model_info import read_model_info
        read_model_info({str(model_path)!r})   # gguf-py first, as load() does
        import pyllm_kv
        m = pyllm_kv.load({str(model_path)!r}, cache_k="kv4", cache_v="kv4", n_ctx=256, n_threads=1,
                          n_gpu_layers={-1 if gpu else 0})
        print(m.generate("The capital of France is", max_tokens=8, temperature=0))
    """)
    env = dict(os.environ, PYLLM_KV_LIB_DIR=str(lib_dir))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, f"rc={out.returncode}\n{out.stderr[-3000:]}"
    assert "Paris" in out.stdout
