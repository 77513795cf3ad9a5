"""native/src/block_scale.c has an AVX2 path and a scalar one (builds without
AVX2); both must pick the same d and m for every block, and both must be the
float32 reference's (tests/block_scale_ref.py). The library under test has one
of them compiled in; this builds the file twice with a tiny driver, with and
without AVX2, and compares the two on fresh random blocks of several shapes."""
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import block_scale_ref as bsr

NATIVE = Path(__file__).resolve().parent.parent / "native"
DRIVER = r"""
#include "pkv_internal.h"
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char ** argv) {
    const int bits = atoi(argv[1]);
    float x[PKV_BLOCK];
    while (fread(x, sizeof(float), PKV_BLOCK, stdin) == PKV_BLOCK) {
        uint16_t dm[2];
        pkv_block_scale_search(bits, x, &dm[0], &dm[1]);
        fwrite(dm, sizeof(dm), 1, stdout);
    }
    return 0;
}
"""


def _cc():
    for name in filter(None, [os.environ.get("CC"), "cc", "gcc", "clang"]):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def drivers(tmp_path_factory):
    cc = _cc()
    if cc is None:
        pytest.skip("no C compiler")
    d = tmp_path_factory.mktemp("block_scale")
    (d / "drv.c").write_text(DRIVER)
    out = {}
    for name, flags in (("scalar", ["-mno-avx", "-mno-avx2"]), ("avx2", ["-mavx2"])):
        exe = d / name
        cmd = [cc, "-std=c11", "-O2", "-ffp-contract=off", *flags, f"-I{NATIVE / 'include'}", f"-I{NATIVE / 'src'}",
               str(d / "drv.c"), str(NATIVE / "src" / "block_scale.c"), str(NATIVE / "src" / "fp16.c"), "-o", str(exe), "-lm"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            if name == "avx2":
                pytest.skip(f"cannot build with -mavx2: {r.stderr[-300:]}")
            raise AssertionError(r.stderr)
        out[name] = exe
    cpu = Path("/proc/cpuinfo")
    if cpu.exists() and " avx2" not in cpu.read_text():
        pytest.skip("this CPU has no AVX2")
    return out


def _run(exe, bits, x):
    r = subprocess.run([str(exe), str(bits)], input=np.ascontiguousarray(x, np.float32).tobytes(),
                       capture_output=True, check=True)
    dm = np.frombuffer(r.stdout, np.uint16).reshape(-1, 2)
    return dm[:, 0].view(np.float16).astype(np.float32), dm[:, 1].view(np.float16).astype(np.float32)


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_avx2_and_scalar_paths_agree_with_the_reference(drivers, bits):
    rng = np.random.default_rng()
    n = 4000
    x = np.concatenate([rng.standard_normal((n, 64)),
                        rng.laplace(size=(n, 64)) * 3 + 1,
                        rng.standard_normal((n, 64)) * 10.0 ** rng.uniform(-4, 4, (n, 1)) + rng.standard_normal((n, 1)),
                        np.where(rng.random((n, 64)) < 0.5, 0.0, rng.standard_normal((n, 64)))]).astype(np.float32)
    x[::97, 5] *= 50                              # outliers
    x = bsr.sanitize(x)                           # the function's contract: sanitized input
    d_s, m_s = _run(drivers["scalar"], bits, x)
    d_a, m_a = _run(drivers["avx2"], bits, x)
    np.testing.assert_array_equal(d_a, d_s)
    np.testing.assert_array_equal(m_a, m_s)
    d_r, m_r = bsr.block_scale_f32(x, bits)
    np.testing.assert_array_equal(d_s, d_r)
    np.testing.assert_array_equal(m_s, m_r)
