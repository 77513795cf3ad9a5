"""SQuat's refit policy (PYLLM_KV_SQUAT_REFIT / SquatOptions(refit=) / --squat-refit).

"first" fits each layer's query subspace once, from the first ubatch that
reaches an empty cache; "ubatch" fits it again from every ubatch of >= 32
tokens, so a later prompt's keys are encoded against that prompt's queries,
while single-token decode steps keep the last subspace. Checked on a tiny
random-weight llama model through the side state llama.cpp saves.
"""

from __future__ import annotations

import numpy as np
import pytest

import pyllm_kv
from pyllm_kv import shape_model
from pyllm_kv.errors import InvalidParameter

from logits_util import all_logits
from side_state_blob import side_blobs

N_CTX = 256
FIRST = list(range(200, 200 + 40))      # a first prompt of 40 tokens
LATER = list(range(400, 400 + 48))      # a second, different prompt of 48 tokens


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory, lib_dir):
    path = tmp_path_factory.mktemp("refit") / "tiny.gguf"
    return shape_model.write_shape_model(path, shape_model.resolve_spec("tiny"), "q8_0", seed=5)


def _ctx_state(m):
    import ctypes

    from pyllm_kv import _libs

    lc = _libs.llama_cpp()
    n = lc.llama_state_get_size(m.llama.ctx)
    buf = (ctypes.c_uint8 * n)()
    assert lc.llama_state_get_data(m.llama.ctx, buf, n) == n
    return bytes(buf)


def _squat_U(m):
    """Per layer, the SQuat slot's bytes (fitted flags + U) from llama.cpp's state."""
    (blob,) = side_blobs(_ctx_state(m))
    return {s["il"]: s["data"] for s in blob if s["method"] == "squat"}


@pytest.mark.parametrize("refit", ["first", "ubatch"])
def test_second_prompt_refits_only_under_ubatch(tiny_path, refit):
    m = pyllm_kv.load(tiny_path, cache_k="squat4", cache_v="kv4", n_ctx=N_CTX, n_threads=1,
                      squat=pyllm_kv.SquatOptions(refit=refit))
    try:
        m.llama.reset()
        m.llama.eval(FIRST)
        u_first = _squat_U(m)
        assert u_first and all(u_first.values())
        for t in (5, 6, 7):                       # decode steps never refit
            m.llama.eval([t])
        assert _squat_U(m) == u_first
        m.llama.eval(LATER)                       # a 48-token ubatch
        u_later = _squat_U(m)
        if refit == "first":
            assert u_later == u_first
        else:
            assert all(u_later[il] != u_first[il] for il in u_first)
    finally:
        m.close()


def test_refit_changes_later_keys_not_earlier_logits(tiny_path):
    """Under "ubatch" the first prompt's logits are those of "first" (same fit);
    after a second prompt they differ (its keys use the new subspace)."""
    a = pyllm_kv.load(tiny_path, cache_k="squat4", cache_v="kv4", n_ctx=N_CTX, n_threads=1,
                      squat=pyllm_kv.SquatOptions(refit="first"))
    b = pyllm_kv.load(tiny_path, cache_k="squat4", cache_v="kv4", n_ctx=N_CTX, n_threads=1,
                      squat=pyllm_kv.SquatOptions(refit="ubatch"))
    try:
        la = all_logits(a, FIRST + LATER, step=40)
        lb = all_logits(b, FIRST + LATER, step=40)
        np.testing.assert_array_equal(la[:40], lb[:40])
        assert np.abs(la[41:] - lb[41:]).max() > 0
    finally:
        a.close()
        b.close()


def test_bad_refit_value_is_refused(tiny_path, monkeypatch):
    with pytest.raises(InvalidParameter, match="refit"):
        pyllm_kv.SquatOptions(refit="sometimes")
    monkeypatch.setenv("PYLLM_KV_SQUAT_REFIT", "sometimes")
    with pytest.raises(InvalidParameter, match="PYLLM_KV_SQUAT_REFIT"):
        pyllm_kv.load(tiny_path, cache_k="squat4", cache_v="kv4", n_ctx=N_CTX, n_threads=1)


@pytest.mark.parametrize("value", ["center", "all", "none"])
def test_gpu_fit_values_load_on_the_cpu(tiny_path, monkeypatch, value):
    """PYLLM_KV_GPU_FIT only marks fit ops a GPU may take: on a CPU-only
    context every value loads and fits on the CPU alike."""
    monkeypatch.setenv("PYLLM_KV_GPU_FIT", value)
    m = pyllm_kv.load(tiny_path, cache_k="squat4", cache_v="kv4", n_ctx=N_CTX, n_threads=1)
    try:
        assert np.isfinite(all_logits(m, FIRST, step=40)).all()
    finally:
        m.close()


def test_bad_gpu_fit_value_is_refused(tiny_path, monkeypatch):
    monkeypatch.setenv("PYLLM_KV_GPU_FIT", "gpu")
    with pytest.raises(InvalidParameter, match="PYLLM_KV_GPU_FIT"):
        pyllm_kv.load(tiny_path, cache_k="squat4", cache_v="kv4", n_ctx=N_CTX, n_threads=1)
