"""llama.cpp's own op tests, run on our types.

patches/0006 adds our cache types to llama.cpp's ``test-quantize-fns`` (error
bounds per type) and ``test-backend-ops`` (GET_ROWS, SET_ROWS, CPY, MUL_MAT and
FLASH_ATTN_EXT cases). The wheel ships both in ``pyllm_kv/bin`` (CMake option
PYLLM_KV_UPSTREAM_TESTS, on in pyproject.toml).

``test-backend-ops -b CPU`` compares the CPU backend with itself in reference
mode (``ggml_backend_cpu_set_use_ref``): flash-attention prefill runs the tiled
path (rows decoded through ``to_float``) against the one-chunk path (K dot on
q8_1, fused V accumulation), so a codec whose kernels disagree fails there.
Cases that take the same path on both sides (decode, GET_ROWS, SET_ROWS, CPY)
still catch crashes, NaN/Inf and writes past a tensor (sentinels).

Our types are read from the library: every ggml type from the first of ours
(formats.py) on, since patches append them to ``enum ggml_type``.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from pyllm_kv import _libs, formats

# Ops whose cases with our types must run (and pass) on the CPU backend.
REQUIRED_OPS = ("SET_ROWS", "GET_ROWS", "CPY", "FLASH_ATTN_EXT", "MUL_MAT")
# Flash-attention prefill: batches of at least ggml-cpu's Q tile (64 rows) take
# the tiled path in normal mode, the one-chunk path in reference mode.
FA_TILE_Q = 64

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# "  OP(k=v,...): OK" / "... FAIL" / "not supported [...]"; a failing case is
# preceded on its line by messages like "[OP] ERR = ... > ... ".
_CASE = re.compile(r"(?:^|\s)([A-Z][A-Z0-9_]*)\(([^()]*)\): (.*)$")
_TYPE_VAR = re.compile(r"\b(type\w*)=([\w.]+)")


def _binary(name: str) -> Path:
    path = _libs.bin_dir() / name
    if path.is_file() and os.access(path, os.X_OK):
        return path
    msg = (f"{name} not found in {_libs.bin_dir()}: build with -DPYLLM_KV_UPSTREAM_TESTS=ON "
           "(the wheel does, see pyproject.toml) or set PYLLM_KV_BIN_DIR to a build's bin/")
    # Our build (it ships libpyllm_kv_native) must have them; elsewhere it is optional.
    if (_libs.lib_dir() / "libpyllm_kv_native.so").is_file():
        pytest.fail(msg)
    pytest.skip(msg)


def _our_types() -> List[str]:
    types = _libs.ggml_types()
    ours = [f.ggml for f in formats.FORMATS.values() if f.is_ours and f.ggml in types]
    if not ours:
        pytest.fail(f"the library at {_libs.lib_dir()} has none of our cache types")
    first = min(types[name].id for name in ours)
    return sorted((n for n, t in types.items() if t.id >= first), key=lambda n: types[n].id)


def _run(cmd: List[str], timeout: int) -> Tuple[int, str]:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=timeout, check=False)
    return proc.returncode, _ANSI.sub("", proc.stdout.decode("utf-8", "replace"))


def _tail(text: str, n: int = 40) -> str:
    return "\n".join(text.splitlines()[-n:])


def test_quantize_fns_all_types():
    exe = _binary("test-quantize-fns")
    ours = _our_types()
    rc, out = _run([str(exe), "-v"], timeout=300)

    # "Testing <type>" opens each type's section; its lines follow.
    sections: Dict[str, List[str]] = {}
    current = None
    for line in out.splitlines():
        m = re.match(r"Testing (\S+)$", line)
        if m:
            current = m.group(1)
            sections.setdefault(current, [])
        elif current is not None:
            sections[current].append(line)

    failed = [line for line in out.splitlines() if "FAILED" in line]
    assert rc == 0 and not failed, f"test-quantize-fns failed (rc={rc}):\n" + "\n".join(failed or [_tail(out)])
    for name in ours:
        lines = sections.get(name, [])
        for check in ("absolute quantization error", "reference implementation error", "dot product error"):
            assert any(re.search(rf"{check}:\s+ok \(", l) for l in lines), (
                f"test-quantize-fns did not check {check!r} for {name}:\n" + "\n".join(lines))


def _parse_backend_ops(out: str) -> List[Tuple[str, str, str]]:
    """(op, params, status) of each case line; status OK, FAIL or NOT_SUPPORTED."""
    cases = []
    for line in out.splitlines():
        m = _CASE.search(line)
        if not m:
            continue
        op, params, rest = m.groups()
        rest = rest.strip()
        if rest.endswith("OK"):
            status = "OK"
        elif rest.endswith("FAIL"):
            status = "FAIL"
        elif rest.startswith("not supported"):
            status = "NOT_SUPPORTED"
        else:
            status = "?" + rest
        cases.append((op, params, status))
    return cases


def test_backend_ops_cpu_our_types():
    exe = _binary("test-backend-ops")
    ours = _our_types()
    # cases whose params name one of our types in any type slot (type, type_src,
    # type_dst, type_a, type_K, type_V, ...)
    alt = "|".join(re.escape(n) for n in ours)
    cmd = [str(exe), "test", "-b", "CPU", "-o", ",".join(REQUIRED_OPS),
           "-p", rf"type\w*=({alt})(,|$)"]
    rc, out = _run(cmd, timeout=900)

    cases = _parse_backend_ops(out)
    bad = [f"  {s}: {op}({params})" for op, params, s in cases if s != "OK"]
    assert rc == 0 and not bad and "tests passed" in out, (
        f"{' '.join(cmd)} failed (rc={rc}), {len(bad)} of {len(cases)} cases not OK:\n"
        + "\n".join(bad[:30]) + "\n" + _tail(out, 10))

    ran = Counter()
    for op, params, _ in cases:
        for name in {v for _, v in _TYPE_VAR.findall(params)} & set(ours):
            ran[op, name] += 1
    missing = [f"{op}/{name}" for op in REQUIRED_OPS for name in ours if ran[op, name] == 0]
    assert not missing, f"no test-backend-ops cases ran for: {', '.join(missing)}\n{_tail(out)}"

    # flash attention: every type of ours as K and as V, in decode and in
    # (tiled) prefill, and paired with f16, q8_0 and q4_0.
    fa = [dict(re.findall(r"\b(type_K|type_V|nb)=(\w+)", params))
          for op, params, _ in cases if op == "FLASH_ATTN_EXT"]
    for name in ours:
        for slot in ("type_K", "type_V"):
            nbs = [int(c["nb"]) for c in fa if c.get(slot) == name]
            assert any(nb == 1 for nb in nbs), f"no FLASH_ATTN_EXT decode case with {slot}={name}"
            assert any(nb >= FA_TILE_Q for nb in nbs), f"no FLASH_ATTN_EXT prefill case with {slot}={name}"
        partners = {c["type_V"] for c in fa if c.get("type_K") == name} | \
                   {c["type_K"] for c in fa if c.get("type_V") == name}
        for other in ("f16", "q8_0", "q4_0", name):
            assert other in partners, f"no FLASH_ATTN_EXT case pairing {name} with {other}"
