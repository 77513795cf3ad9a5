"""Save a session to a file, load it in a new process, continue: same tokens.

And every kind of wrong file is refused with a StateFileError / StateMismatch that
names the problem, before llama.cpp reads it (or, for a forged header, because
llama.cpp refuses it), leaving the model usable.

The round trip runs once for all formats: one child process loads every state
file and continues it (a process start and model loads cost seconds on 2 cores).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

import pyllm_kv
from pyllm_kv import _libs, formats, state
from pyllm_kv.errors import ContextOverflow, PyllmKvError, StateFileError, StateMismatch

CACHES = ["f16"] + [f.name for f in formats.FORMATS.values() if f.is_ours]
PROMPT = "The capital of France is"
N_CTX = 128
TOTAL = 12  # tokens generated without interruption
SPLIT = 5   # tokens generated before the state is saved

CHILD = r"""
import json, sys
import pyllm_kv
jobs = json.loads(sys.argv[1])
out = {}
for job in jobs:
    m = pyllm_kv.load(job["model"], cache_k=job["cache"], cache_v=job["cache"], n_ctx=job["n_ctx"], n_threads=1)
    n = m.load_state(job["file"])
    text = m.resume(max_tokens=job["max_tokens"])
    out[job["file"]] = {"loaded": n, "text": text, "tokens": pyllm_kv.state.tokens(m)}
    m.close()
print(json.dumps(out))
"""


def _load(model_path, cache, n_ctx=N_CTX, flash_attn=True, path=None):
    return pyllm_kv.load(path or model_path, cache_k=cache, cache_v=cache, n_ctx=n_ctx,
                         flash_attn=flash_attn, n_threads=1)


@pytest.fixture(scope="module")
def models(lib_dir, model_path):
    """models(cache, n_ctx=N_CTX, flash_attn=True) -> Model, loaded once per module."""
    cache = {}

    def get(name, n_ctx=N_CTX, flash_attn=True):
        key = (name, n_ctx, flash_attn)
        if key not in cache:
            cache[key] = _load(model_path, name, n_ctx, flash_attn)
        return cache[key]

    yield get
    for m in cache.values():
        m.close()


@pytest.fixture(scope="module")
def roundtrip(models, model_path, tmp_path_factory):
    """For each available cache: the uninterrupted session, and what a new process
    makes of the states saved mid-generation and right after the prefill."""
    d = tmp_path_factory.mktemp("states")
    ref, jobs = {}, []
    for cache in CACHES:
        if not _libs.has_ggml_type(formats.resolve(cache).ggml):
            continue  # the test itself skips/fails through require_format
        m = models(cache)
        m.prefill(PROMPT)
        whole = m.resume(max_tokens=TOTAL)
        ref[cache] = {"tokens": state.tokens(m), "text": whole}
        assert len(ref[cache]["tokens"]) == len(m.tokenize(PROMPT)) + TOTAL, \
            f"{cache}: generation stopped early; pick a prompt that runs {TOTAL} tokens"

        pre, mid = d / f"{cache}-prefill.pkvs", d / f"{cache}-mid.pkvs"
        m.prefill(PROMPT)
        m.save_state(pre)
        ref[cache]["first"] = m.resume(max_tokens=SPLIT)
        m.save_state(mid)
        for f, n in ((mid, TOTAL - SPLIT), (pre, TOTAL)):
            jobs.append({"model": str(model_path), "cache": cache, "n_ctx": N_CTX, "file": str(f), "max_tokens": n})

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(pyllm_kv.__file__).parent.parent)] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(jobs)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, f"child process failed:\n{proc.stderr[-3000:]}"
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    return ref, {Path(k).name: v for k, v in got.items()}


@pytest.mark.parametrize("cache", CACHES)
def test_resume_mid_generation_in_new_process(roundtrip, require_format, cache):
    require_format(cache)
    ref, got = roundtrip
    child = got[f"{cache}-mid.pkvs"]
    assert child["loaded"] == len(ref[cache]["tokens"]) - (TOTAL - SPLIT)
    assert child["tokens"] == ref[cache]["tokens"], f"{cache}: resumed tokens differ from the uninterrupted run"
    assert ref[cache]["first"] + child["text"] == ref[cache]["text"]


@pytest.mark.parametrize("cache", CACHES)
def test_resume_after_prefill_in_new_process(roundtrip, require_format, cache):
    require_format(cache)
    ref, got = roundtrip
    child = got[f"{cache}-prefill.pkvs"]
    assert child["tokens"] == ref[cache]["tokens"]
    assert child["text"] == ref[cache]["text"]


# ---- files that must be refused --------------------------------------------------


@pytest.fixture(scope="module")
def saved(models, require_format, tmp_path_factory):
    """A state of our first format (kv4 today), saved mid-generation."""
    cache = next(f.name for f in formats.FORMATS.values() if f.is_ours)
    require_format(cache)
    m = models(cache)
    m.prefill(PROMPT)
    m.resume(max_tokens=4)
    path = tmp_path_factory.mktemp("bad") / "good.pkvs"
    m.save_state(path)
    return cache, path


def _expect_refused(m, path, cls, match):
    """Loading `path` fails with `cls`; the model's previous session survives."""
    m.prefill(PROMPT)
    before = state.tokens(m)
    with pytest.raises(cls, match=match):
        m.load_state(path)
    assert state.tokens(m) == before, "a refused state file changed the cache"


@pytest.mark.parametrize("i", range(len(CACHES)))
def test_state_from_another_cache_type(models, require_format, tmp_path, i):
    saved_as, loaded_as = CACHES[i], CACHES[(i + 1) % len(CACHES)]
    require_format(saved_as)
    require_format(loaded_as)
    m = models(saved_as)
    m.prefill(PROMPT)
    path = tmp_path / "s.pkvs"
    m.save_state(path)
    _expect_refused(models(loaded_as), path, StateMismatch,
                    rf"holds a K={saved_as} V={saved_as} cache.*K={loaded_as} V={loaded_as}")


def _cut_points(path):
    data = path.read_bytes()
    hlen = struct.unpack("<I", data[12:16])[0]
    start = 16 + hlen
    return {
        "empty": (0, "is empty"),
        "in magic": (5, "truncated"),
        "in fixed header": (12, "truncated"),
        "in json header": (16 + hlen // 2, "truncated"),
        "in tokens": (start + 2, "truncated"),
        "in kv cache": ((start + len(data)) // 2, "truncated"),
        "last byte": (len(data) - 1, "truncated"),
    }


@pytest.mark.parametrize("where", ["empty", "in magic", "in fixed header", "in json header", "in tokens",
                                   "in kv cache", "last byte"])
def test_truncated_state_file(models, saved, tmp_path, where):
    cache, path = saved
    keep, message = _cut_points(path)[where]
    bad = tmp_path / "cut.pkvs"
    bad.write_bytes(path.read_bytes()[:keep])
    _expect_refused(models(cache), bad, StateFileError, message)


@pytest.mark.parametrize("where", ["header", "tokens", "kv cache", "checksum"])
def test_flipped_byte_fails_the_crc(models, saved, tmp_path, where):
    """One bit anywhere: in a name inside the JSON header (still valid JSON), the tokens,
    the KV cache or the checksum itself."""
    cache, path = saved
    data = bytearray(path.read_bytes())
    hlen = struct.unpack("<I", data[12:16])[0]
    pos = {"header": data.index(b'"name": "') + 10, "tokens": 16 + hlen + 1,
           "kv cache": (16 + hlen + len(data)) // 2, "checksum": len(data) - 2}[where]
    data[pos] ^= 0x04
    bad = tmp_path / "flip.pkvs"
    bad.write_bytes(bytes(data))
    _expect_refused(models(cache), bad, StateFileError, "CRC-32")


def test_appended_bytes(models, saved, tmp_path):
    cache, path = saved
    bad = tmp_path / "long.pkvs"
    bad.write_bytes(path.read_bytes() + b"\0")
    _expect_refused(models(cache), bad, StateFileError, "data after the end")


def test_unknown_layout_version(models, saved, tmp_path):
    cache, path = saved
    data = bytearray(path.read_bytes())
    data[8:12] = struct.pack("<I", 99)
    bad = tmp_path / "v99.pkvs"
    bad.write_bytes(bytes(data))
    _expect_refused(models(cache), bad, StateFileError, "layout version 99")


def test_garbage_header(models, saved, tmp_path):
    cache, path = saved
    data = bytearray(path.read_bytes())
    data[16] = ord("[")  # the JSON object becomes unparsable
    bad = tmp_path / "json.pkvs"
    bad.write_bytes(bytes(data))
    _expect_refused(models(cache), bad, StateFileError, "unreadable header")


@pytest.mark.parametrize("kind", ["missing", "directory", "text", "random", "gguf model"])
def test_not_a_state_file(models, saved, tmp_path, model_path, kind):
    cache, _ = saved
    target = {"missing": tmp_path / "nope.pkvs", "directory": tmp_path, "gguf model": model_path}.get(kind)
    if kind == "text":
        target = tmp_path / "t.pkvs"
        target.write_text("hello\n")
    elif kind == "random":
        target = tmp_path / "r.pkvs"
        target.write_bytes(os.urandom(4096))
    match = {"missing": "not found", "directory": "is a directory"}.get(kind, "not a pyllm-kv state file")
    _expect_refused(models(cache), target, StateFileError, match)


def test_llama_cpp_session_file_is_named(models, saved, tmp_path):
    """A file from llama.cpp's own llama_state_save_file: recognised and refused."""
    cache, _ = saved
    m = models(cache)
    m.prefill(PROMPT)
    raw = tmp_path / "raw.session"
    toks = state.tokens(m)
    arr = (_libs.llama_cpp().llama_token * len(toks))(*toks)
    assert _libs.llama_cpp().llama_state_save_file(m.llama.ctx, str(raw).encode(), arr, len(toks))
    _expect_refused(m, raw, StateFileError, "llama.cpp session file")


def test_forged_header_is_refused_by_llama_cpp(models, saved, tmp_path):
    """Header rewritten to claim an f16 cache: our checks pass, llama.cpp's type check
    refuses the data, and the model is left empty but usable (never garbage)."""
    cache, path = saved

    def claim_f16(header):
        header["cache_k"] = header["cache_v"] = "f16"
        header["ggml_k"] = header["ggml_v"] = state._ggml_layout("f16")

    bad = _rewrite_header(path, tmp_path / "forged.pkvs", claim_f16)
    m = models("f16")
    with pytest.raises(StateFileError, match="llama.cpp rejected"):
        m.load_state(bad)
    with pytest.raises(PyllmKvError, match="no session"):
        state.tokens(m)
    assert "Paris" in m.generate(PROMPT, max_tokens=6)


def _rewrite_header(path, out, change):
    """Edit the JSON header and write a consistent file (new length, new CRC): what a
    forger, or another build's writer, would produce."""
    data = path.read_bytes()
    hlen = struct.unpack("<I", data[12:16])[0]
    header = json.loads(data[16:16 + hlen])
    change(header)
    raw = json.dumps(header).encode()
    body = data[:12] + struct.pack("<I", len(raw)) + raw + data[16 + hlen:-4]
    out.write_bytes(body + struct.pack("<I", zlib.crc32(body)))
    return out


def test_state_from_another_native_build(models, saved, tmp_path):
    """Same format name, another type id (a build that added types before it): the raw
    state would not match this build's table, so the header check names the cause."""
    cache, path = saved
    bad = _rewrite_header(path, tmp_path / "build.pkvs", lambda h: h["ggml_k"].update(id=h["ggml_k"]["id"] + 1))
    _expect_refused(models(cache), bad, StateMismatch, f"native build whose '{cache}' type differs")


def test_state_from_another_model(models, saved, tmp_path, model_path):
    """Same architecture and shapes, one weight byte changed near the end: llama.cpp
    alone would accept the state; the fingerprint in our header does not."""
    cache, path = saved
    other = tmp_path / "other.gguf"
    shutil.copyfile(model_path, other)
    with open(other, "r+b") as fh:
        fh.seek(-100, os.SEEK_END)
        b = fh.read(1)
        fh.seek(-100, os.SEEK_END)
        fh.write(bytes([b[0] ^ 1]))
    with _load(model_path, cache, path=other) as m:
        _expect_refused(m, path, StateMismatch, "saved with another model")


def test_flash_attention_setting_must_match(models, tmp_path):
    m = models("f16")
    m.prefill(PROMPT)
    path = tmp_path / "fa.pkvs"
    m.save_state(path)
    _expect_refused(models("f16", flash_attn=False), path, StateMismatch, "flash_attn=True")


def test_state_larger_than_the_context(models, tmp_path):
    big = models("f16", n_ctx=512)
    big.prefill("word " * 300)
    path = tmp_path / "big.pkvs"
    big.save_state(path)
    small = models("f16")  # n_ctx 128, allocated as 256
    _expect_refused(small, path, StateMismatch, r"more than this context's n_ctx=256")
    # The other direction works: a small state fits a larger context.
    small.prefill(PROMPT)
    small.save_state(path)
    assert big.load_state(path) == len(big.tokenize(PROMPT))


def test_save_needs_a_session(lib_dir, model_path, models, tmp_path):
    with _load(model_path, "f16") as fresh:
        with pytest.raises(PyllmKvError, match="no session"):
            fresh.save_state(tmp_path / "x.pkvs")
    m = models("f16")
    m.prefill(PROMPT)
    m.generate(PROMPT, max_tokens=2)  # generate() empties the cache: the session is over
    with pytest.raises(PyllmKvError, match="no session"):
        m.resume()
    m.prefill(PROMPT)
    with pytest.raises(StateFileError, match="cannot write"):
        m.save_state(tmp_path / "no-such-dir" / "x.pkvs")
    assert not list(tmp_path.glob("**/.*.tmp"))


def test_one_token_session_holds_no_stale_cells(models, tmp_path):
    """prefill() of a 1-token prompt decodes nothing; the previous session's cells must
    not end up in the file (llama-cpp-python's reset() alone leaves them in the cache)."""
    m = models("f16")
    m.prefill("word " * 100)
    m.resume(max_tokens=2)
    assert m.prefill("Hi") == 1
    path = tmp_path / "one.pkvs"
    m.save_state(path)
    assert path.stat().st_size < 4096, "cells of the previous session were saved"
    assert m.load_state(path) == 1 and m.resume(max_tokens=3)


def test_resume_until_the_context_is_full(models):
    """max_tokens=None runs until every cell is used; the next resume says so."""
    m = models("f16")
    # A long counting prompt: few decode steps left to fill the 256 cells, and no
    # end-of-generation token in sight.
    n = m.prefill(", ".join(str(i) for i in range(1, 50)) + ",")
    assert n > 150
    m.resume(max_tokens=None)
    toks = state.tokens(m)
    if len(toks) < m.n_ctx + 1:  # an end-of-generation token stopped it first
        pytest.skip(f"generation ended after {len(toks) - n} tokens, before the context was full")
    assert m.llama.n_tokens == m.n_ctx  # every cell holds a token; one more is pending
    with pytest.raises(ContextOverflow, match="context is full"):
        m.resume(max_tokens=1)
