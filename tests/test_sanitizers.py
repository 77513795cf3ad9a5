"""The C codec under AddressSanitizer + UndefinedBehaviorSanitizer.

Compiles every native/src/*.c (a glob: new sources are included without
touching this file) with the fuzz driver native/tests/fuzz_codec.c and runs it.
The driver feeds random and adversarial rows through every public function of
pkv/codec.h (and pkv/sidestate.h when present) in exact-size, partly unaligned
heap buffers, and checks the results itself; ASan/UBSan turn any out-of-bounds
access, leak or undefined arithmetic into a nonzero exit.

Skipped only when no C compiler, or no sanitizer runtime, is available.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NATIVE = REPO / "native"
DRIVER = NATIVE / "tests" / "fuzz_codec.c"
FLAGS = ["-std=c11", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
         "-march=native"]
SAN_ENV = {"ASAN_OPTIONS": "detect_leaks=1",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}


def _compiler() -> "str | None":
    for name in filter(None, [os.environ.get("CC"), "cc", "gcc", "clang"]):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def cc(tmp_path_factory) -> str:
    """A C compiler whose sanitizer runtimes link and run (probed on a tiny program)."""
    compiler = _compiler()
    if compiler is None:
        pytest.skip("no C compiler (cc/gcc/clang, or $CC) on PATH")
    probe = tmp_path_factory.mktemp("probe")
    (probe / "p.c").write_text("int main(void) { return 0; }\n")
    build = subprocess.run([compiler, *FLAGS, "p.c", "-o", "p"], cwd=probe, capture_output=True, text=True)
    if build.returncode != 0:
        pytest.skip(f"{compiler} cannot build with -fsanitize=address,undefined "
                    f"(libasan/libubsan missing?): {build.stderr.strip()[-400:]}")
    run = subprocess.run([str(probe / "p")], capture_output=True, text=True, env={**os.environ, **SAN_ENV})
    if run.returncode != 0:
        pytest.skip(f"sanitizer runtime does not run here: {run.stderr.strip()[-400:]}")
    return compiler


def test_codec_fuzz_under_asan_ubsan(cc, tmp_path):
    sources = sorted(str(p) for p in (NATIVE / "src").glob("*.c"))
    assert sources, "no C sources in native/src"
    exe = tmp_path / "fuzz_codec"
    build = subprocess.run(
        [cc, *FLAGS, "-Wall", f"-I{NATIVE / 'include'}", f"-I{NATIVE / 'src'}", *sources, str(DRIVER),
         "-lm", "-o", str(exe)],
        capture_output=True, text=True)
    assert build.returncode == 0, f"sanitizer build failed:\n{build.stderr}"

    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, **SAN_ENV})
    report = f"stdout:\n{run.stdout[-4000:]}\nstderr:\n{run.stderr[-8000:]}"
    assert run.returncode == 0, f"fuzz_codec failed (exit {run.returncode})\n{report}"
    assert re.search(r"^fuzz_codec: 0 failure\(s\)$", run.stdout, re.M), report
    if (NATIVE / "include" / "pkv" / "sidestate.h").is_file():
        # the driver picks the header up by __has_include: make sure it did
        assert "side state (pkv/sidestate.h) checked" in run.stdout, report
    # sanitizer diagnostics without an exit code (a recoverable check) still fail the test
    assert "runtime error" not in run.stderr and "Sanitizer" not in run.stderr, report
