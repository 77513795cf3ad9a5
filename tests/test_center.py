"""Centering side state (PYLLM_KV_CENTER=k|v|kv on our formats).

K: rows stored as k - mu; softmax ignores the per-query constant q.mu, so the
scores are unchanged up to quantization. V: rows stored as v - mu, mu added back
to every query head's output (the weights sum to 1). Both are checked through
the model: with the mean taken out, the quantized cache must track the f16
cache at least about as well as without it; a wrong broadcast (q centred too,
mu added to the wrong GQA heads, a missing add-back) shows up as a large KLD.
The softmax invariance itself is checked directly on the attention scores.
"""

from __future__ import annotations

import numpy as np
import pytest

import pyllm_kv
from pyllm_kv import shape_model

from logits_util import all_logits, kld_top1, kshift_kld, log_softmax
from side_state_blob import side_blobs
from test_iswa import _state

N_CTX = 512
TEXT = ("The old lighthouse keeper climbed the stairs every evening to light the lamp. "
        "Ships passing in the night relied on its beam to find the harbour, and the keeper "
        "took pride in never having missed a single night in forty years of service.")


def test_softmax_ignores_a_key_offset():
    """The identity centering rests on: scores q.(k - mu) differ from q.k by q.mu,
    one constant per query, so the attention weights are the same."""
    rng = np.random.default_rng(0)
    q, k, mu = rng.normal(size=(5, 64)), rng.normal(size=(40, 64)) + 3.0, rng.normal(size=64) * 4
    s, sc = q @ k.T, q @ (k - mu).T
    np.testing.assert_allclose(s - sc, np.repeat((q @ mu)[:, None], 40, axis=1), rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(np.exp(log_softmax(s)), np.exp(log_softmax(sc)), rtol=1e-10, atol=1e-12)


def _load(path, k, v, center, monkeypatch, **kw):
    monkeypatch.setenv("PYLLM_KV_CENTER", center)
    try:
        return pyllm_kv.load(path, cache_k=k, cache_v=v, n_ctx=N_CTX, n_threads=1, **kw)
    finally:
        monkeypatch.delenv("PYLLM_KV_CENTER")


@pytest.fixture(scope="module")
def smol_ref(lib_dir, model_path):
    m = pyllm_kv.load(model_path, cache_k="f16", cache_v="f16", n_ctx=N_CTX, n_threads=1)
    try:
        toks = m.tokenize(TEXT)
        return toks, all_logits(m, toks)
    finally:
        m.close()


# K: centering may not cost quality (1.3x + 0.01 of the plain cache's KLD). V:
# measured 2-3x worse than plain on SmolLM2 (docs/quality.md: the first token's
# "attention sink" row, whose weight dominates, moves from a small range to -mu),
# so V is only checked for gross errors (a wrong add-back or GQA mapping costs
# 10x and more).
BOUND = {"k": (1.3, 0.01), "v": (4.0, 0.02), "kv": (4.0, 0.02)}


@pytest.mark.parametrize("k,v,center", [("kv3", "f16", "k"), ("squat3", "f16", "k"), ("f16", "kv3", "v"),
                                        ("kv3", "kv3", "kv")])
def test_centering_tracks_f16(model_path, smol_ref, monkeypatch, k, v, center):
    """SmolLM2 (GQA 3): centred caches stay close to the f16 cache and differ
    from the same cache without centering."""
    toks, ref = smol_ref
    plain = _load(model_path, k, v, "none", monkeypatch)
    cen = _load(model_path, k, v, center, monkeypatch)
    try:
        a, b = all_logits(plain, toks), all_logits(cen, toks)
    finally:
        plain.close()
        cen.close()
    ka, kb = kld_top1(ref, a)[0], kld_top1(ref, b)[0]
    assert np.all(np.isfinite(b))
    assert kld_top1(a, b)[0] > 1e-6, "centering changed nothing: its side state did not run"
    ratio, slack = BOUND[center]
    assert kb < ratio * ka + slack, (ka, kb)


def test_centering_state_kshift_and_iswa(model_path, tmp_path, monkeypatch):
    """Centering's side state is saved and survives a K-shift on SmolLM2, and is
    fitted in both caches of an iSWA model (GQA 4, head size 256)."""
    m = _load(model_path, "kv4", "kv4", "kv", monkeypatch)
    plain = _load(model_path, "kv4", "kv4", "none", monkeypatch)
    try:
        shifted = kshift_kld(m, TEXT * 2)
        assert shifted < max(0.05, 2 * kshift_kld(plain, TEXT * 2)), shifted
    finally:
        m.close()
        plain.close()
    path = shape_model.write_shape_model(tmp_path / "g.gguf", shape_model.resolve_spec("tiny-gemma3"), "q8_0", seed=3)
    g = _load(path, "kv4", "kv4", "kv", monkeypatch)
    try:
        all_logits(g, list(range(300, 380)))
        g.llama.eval(list(range(300, 340)))
        blobs = side_blobs(_state(g))
        slots = [s for blob in blobs for s in blob]
        assert len(blobs) == 2 and {s["method"] for s in slots} == {"center"}
        assert sorted((s["il"], s["v"]) for s in slots) == sorted((il, v) for il in range(4) for v in (False, True))
        assert all(s["fitted"] for s in slots)
    finally:
        g.close()
