"""Side-state formats on a sliding-window (iSWA) model (issue 14).

A tiny random-weight gemma3 GGUF (pyllm_kv.shape_model preset "tiny-gemma3":
4 layers, 0 and 2 slide over a 32-token window, 1 and 3 see everything; one KV
head of 256, like Gemma-3) goes through llama.cpp's iSWA cache: two
llama_kv_cache objects, each with its own side state. squat*/deco* used to run
there as plain kv* (the hooks sat on the other build_attn overload only).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import pyllm_kv
from pyllm_kv import shape_model

from logits_util import all_logits, greedy, kld_top1
from side_state_blob import side_blobs

N_CTX = 256
# longer than the 32-token window: the sliding layers drop cells while it runs
PROMPT_TOKENS = list(range(300, 300 + 90))


@pytest.fixture(scope="module")
def gemma_path(tmp_path_factory, lib_dir):
    path = tmp_path_factory.mktemp("iswa") / "tiny-gemma3.gguf"
    return shape_model.write_shape_model(path, shape_model.resolve_spec("tiny-gemma3"), "q8_0", seed=3)


@pytest.fixture(scope="module")
def gload(gemma_path):
    cache = {}

    def get(k, v=None, **kw):
        key = (k, v or k, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = pyllm_kv.load(gemma_path, cache_k=k, cache_v=v or k, n_ctx=N_CTX, n_threads=1, **kw)
        return cache[key]

    yield get
    for m in cache.values():
        m.close()


def _ctx_state(lc, ctx):
    """llama.cpp's whole-context state (cells of both caches, their side state)."""
    import ctypes

    n = lc.llama_state_get_size(ctx)
    buf = (ctypes.c_uint8 * n)()
    assert lc.llama_state_get_data(ctx, buf, n) == n
    return bytes(buf)


def _libs_llama():
    from pyllm_kv import _libs

    return _libs.llama_cpp()


def _state(m):
    return _ctx_state(_libs_llama(), m.llama.ctx)


def test_model_is_iswa(gload):
    m = gload("kv4")
    assert m.info.n_swa == 32 and m.info.swa_layers == (True, False, True, False)
    # llama.cpp made two caches (full layers, sliding layers); kv_report counts both
    assert sorted(n for _, n in m.kv_caches) == [2, 2]
    assert [c["layers"] for c in m.kv_report()["kv_caches"]] == [n for _, n in m.kv_caches]


@pytest.mark.parametrize("ours,plain", [("squat4", "kv4"), ("squat3", "kv3"), ("deco4", "kv4")])
def test_side_state_formats_differ_from_plain(gload, ours, plain, monkeypatch):
    """The side state changes what is stored: logits differ from the plain format
    of the same bits (and, for deco, from plain without upstream's rotation, which
    deco replaces)."""
    a = all_logits(gload(ours, plain if ours.startswith("squat") else ours), PROMPT_TOKENS)
    b = all_logits(gload(plain), PROMPT_TOKENS)
    assert np.all(np.isfinite(a))
    kld, _ = kld_top1(b, a)
    assert kld > 1e-4, f"{ours} gave the logits of {plain} (KLD {kld:g}): its side state did not run"
    if ours.startswith("deco"):
        monkeypatch.setenv("LLAMA_ATTN_ROT_DISABLE", "1")
        norot = pyllm_kv.load(gload(plain).path, cache_k=plain, cache_v=plain, n_ctx=N_CTX, n_threads=1)
        try:
            c = all_logits(norot, PROMPT_TOKENS)
        finally:
            norot.close()
        assert kld_top1(c, a)[0] > 1e-4


@pytest.mark.parametrize("fmt", ["squat4", "deco4"])
def test_every_layer_of_both_caches_fitted(gload, fmt):
    m = gload(fmt, "kv4" if fmt.startswith("squat") else fmt)
    all_logits(m, PROMPT_TOKENS)
    m.llama.eval(PROMPT_TOKENS[:40])
    blobs = side_blobs(_state(m))
    assert len(blobs) == 2, "one side state per cache of the iSWA pair"
    assert sorted({s["il"] for blob in blobs for s in blob if not s["v"]}) == [0, 1, 2, 3]
    want = {"squat4": {"center", "squat"}, "deco4": {"deco"}}[fmt]   # squat keys are centred (auto)
    assert {s["method"] for blob in blobs for s in blob if not s["v"]} == want
    assert {s["il"] for s in blobs[1]} <= {0, 2} or {s["il"] for s in blobs[0]} <= {0, 2}
    for blob in blobs:
        assert blob and all(s["fitted"] for s in blob), blob
    if fmt.startswith("deco"):
        assert sorted(s["il"] for blob in blobs for s in blob if s["v"]) == [0, 1, 2, 3]


def test_cleared_cache_fits_anew(gload):
    m = gload("squat4", "kv4")
    a1 = all_logits(m, PROMPT_TOKENS)
    all_logits(m, list(range(100, 160)))          # another prompt: refit after the clear
    a2 = all_logits(m, PROMPT_TOKENS)
    np.testing.assert_array_equal(a1, a2)


def test_prompt_split_in_batches(gload):
    """The first ubatch fits both caches; later ones reuse it. Feeding the prompt
    in 16-token pieces stays close to one batch (the fit sees fewer rows)."""
    m = gload("squat4", "kv4")
    whole = all_logits(m, PROMPT_TOKENS)
    pieces = all_logits(m, PROMPT_TOKENS, step=16)
    assert np.all(np.isfinite(pieces))
    assert kld_top1(whole, pieces)[0] < 0.5


@pytest.mark.parametrize("unified", [True, False])
def test_two_sequences(gemma_path, unified):
    """Two sequences (one cache for both, or a stream each) decode side by side on
    the shared side state; removing one keeps the other's (the cache is not empty)."""
    from pyllm_kv import _libs
    from test_multiseq import Runner, Seqs

    r = Runner(_libs.llama_cpp(), gemma_path)
    ctx = r.context("squat4", n_seq=2, unified=unified)
    seqs = Seqs(r, ctx, 2)
    try:
        seqs.start(0, PROMPT_TOKENS[:40])
        seqs.start(1, PROMPT_TOKENS[20:50])
        for _ in range(4):
            seqs.step()
        blobs = side_blobs(_ctx_state(r.L, ctx))
        assert len(blobs) == 2 and all(s["fitted"] for blob in blobs for s in blob)
        seqs.remove(1)
        seqs.step()
        assert all(s["fitted"] for blob in side_blobs(_ctx_state(r.L, ctx)) for s in blob)
        assert all(np.all(np.isfinite(x)) for rows in seqs.logits.values() for x in rows)
    finally:
        seqs.close()
        r.close()


CHILD = r"""
import ctypes, json, sys
import numpy as np
import pyllm_kv
job = json.loads(sys.argv[1])
m = pyllm_kv.load(job["model"], cache_k=job["k"], cache_v=job["v"], n_ctx=job["n_ctx"], n_threads=1)
lc = pyllm_kv._libs.llama_cpp()
data = open(job["file"], "rb").read()
buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
assert lc.llama_state_set_data(m.llama.ctx, buf, len(data)) == len(data)
ll, ids = m.llama, job["ids"]
ll.n_tokens = len(ids)
ll.input_ids[:len(ids)] = ids
def last():
    ptr = lc.llama_get_logits_ith(ll.ctx, -1)
    return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(ll.n_vocab(),))))
ll.eval([job["last"]])
out = [last()]
for _ in range(job["n"] - 1):
    ll.eval([out[-1]])
    out.append(last())
print(json.dumps(out))
"""


@pytest.mark.parametrize("fmt", ["squat4", "deco4"])
def test_state_restored_in_a_new_process(gload, gemma_path, tmp_path, fmt):
    """Cells and both caches' side state saved, restored in a fresh process: the
    same greedy tokens follow."""
    k, v = fmt, ("kv4" if fmt.startswith("squat") else fmt)
    m = gload(k, v)
    ll = m.llama
    lc = _libs_llama()
    lc.llama_memory_clear(lc.llama_get_memory(ll.ctx), True)
    ll.reset()
    ids = PROMPT_TOKENS[:60]
    ll.eval(ids[:-1])
    (tmp_path / "s.bin").write_bytes(_state(m))
    ll.eval(ids[-1:])
    want = greedy(ll, 8)
    job = {"model": str(gemma_path), "k": k, "v": v, "n_ctx": N_CTX, "file": str(tmp_path / "s.bin"),
           "ids": ids[:-1], "last": ids[-1], "n": 8}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(job)], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == want


# ---- an attention path without the hooks: refused, never plain --------------------


@pytest.fixture(scope="module")
def mla_path(tmp_path_factory, lib_dir):
    import tiny_mla_model

    return tiny_mla_model.write(tmp_path_factory.mktemp("mla") / "tiny-mla.gguf")


def test_mla_model_runs_with_plain_formats(mla_path):
    m = pyllm_kv.load(mla_path, cache_k="kv4", cache_v="kv4", n_ctx=128, n_threads=1)
    try:
        assert np.all(np.isfinite(m.logits("hello world")))
    finally:
        m.close()


@pytest.mark.parametrize("fmt", ["squat4", "deco4"])
def test_side_state_format_on_unwired_path_is_refused(mla_path, fmt):
    """MLA builds attention through llama.cpp's K-only build_attn overload, which
    runs no side-state hook: creating the context fails, naming the format."""
    from pyllm_kv.errors import LlamaError

    # MLA needs K and V of one type; deco's V is refused first (the cache has no V rows)
    why = "needs its side-state hooks" if fmt.startswith("squat") else "for V needs V rows"
    with pytest.raises(LlamaError, match=f"pyllm-kv: cache type {fmt} {why}"):
        pyllm_kv.load(mla_path, cache_k=fmt, cache_v=fmt, n_ctx=128, n_threads=1)
