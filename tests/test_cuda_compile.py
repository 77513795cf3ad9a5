"""CUDA sources of our types (native/cuda/*.cu) compile for Hopper.

CI has no GPU: this test compiles each file, and the GPU test program
native/tests/cuda_codec_test.cu, with `nvcc -std=c++17 -arch=sm_90 -O3
-use_fast_math -c` (the flags ggml-cuda uses) when nvcc is on PATH, and is
skipped otherwise. It checks compilation only; the kernels' results are checked
on a GPU by test-backend-ops against the CPU backend (patches/0006 adds our
types) and by pkv-cuda-test against the C reference (bench/device/gpu_run.sh).
The ggml-side dispatch (patches/0009, ggml-cuda/pkv.cu) needs cuBLAS headers
and is compiled by the CUDA build itself, not here.
"""
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "native" / "cuda"
SOURCES = sorted(CUDA_DIR.glob("*.cu")) + [ROOT / "native" / "tests" / "cuda_codec_test.cu"]
NVCC = shutil.which("nvcc")


def test_sources_exist():
    names = {p.name for p in SOURCES}
    assert {"pkv_codec.cu", "pkv_fattn.cu"} <= names
    assert (CUDA_DIR / "pkv_cuda.h").is_file()
    assert SOURCES[-1].is_file()


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH (CI has no CUDA toolkit): compile check skipped")
@pytest.mark.parametrize("src", SOURCES, ids=[p.name for p in SOURCES])
def test_nvcc_compiles(src, tmp_path):
    cmd = [NVCC, "-std=c++17", "-arch=sm_90", "-O3", "-use_fast_math",
           "-I", str(ROOT / "native" / "include"), "-I", str(CUDA_DIR),
           "-c", str(src), "-o", str(tmp_path / (src.stem + ".o"))]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning" not in r.stderr.lower(), r.stderr
