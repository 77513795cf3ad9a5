"""SQuat cache types (squat4/squat3/squat2) end to end on SmolLM2.

The llama.cpp side: per layer and KV head, the query subspace of the first
ubatch is turned into the encoder's factor before that ubatch's keys are
stored; keys go through the SQuat encoder (values and K-shift through the
plain one); the side state is reset with the cache and travels with the
session state. The encoder and its promise (error out of the query subspace)
are tested against float64 references in test_sidestate_math.py.
"""

from __future__ import annotations

import numpy as np
import pytest

import pyllm_kv
from pyllm_kv import SquatOptions, formats
from pyllm_kv.errors import InvalidParameter

from logits_util import all_logits, kld_top1, kshift_kld, state_roundtrip_tokens

N_CTX = 512
SQUAT = ["squat4", "squat3", "squat2"]
TEXT = ("The old lighthouse keeper climbed the stairs every evening to light the lamp. "
        "Ships passing in the night relied on its beam to find the harbour, and the keeper "
        "took pride in never having missed a single night in forty years of service. "
        "When the storm of that winter came, the harbour master sent word that the lamp "
        "would be replaced by an electric one, and the keeper wrote a long letter in reply.")


@pytest.fixture(scope="module")
def f16_logits(load):
    m = load("f16")
    return all_logits(m, m.tokenize(TEXT))


def _kld(load, f16_logits, k, v=None, **kw):
    m = load(k, v, **kw)
    logits = all_logits(m, m.tokenize(TEXT))
    assert np.all(np.isfinite(logits))
    return kld_top1(f16_logits, logits)[0]


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_squat_keys_beat_plain_keys(load, f16_logits, bits):
    """Same storage, same V: only the key encoder differs. On this text the SQuat
    keys must track f16 better than plain kvN keys (V kept f16 to isolate K).
    Measured with K only quantized: see the docstring's table in docs/squat.md."""
    plain = _kld(load, f16_logits, f"kv{bits}", "f16")
    sq = _kld(load, f16_logits, f"squat{bits}", "f16")
    assert sq < 0.9 * plain, (bits, sq, plain)


@pytest.mark.parametrize("fmt", SQUAT)
def test_squat_generates(load, fmt):
    m = load(fmt)
    assert m.generate("The capital of France is", max_tokens=8).strip(), "empty generation"


def test_squat4_answers_like_f16(load):
    assert "Paris" in load("squat4").generate("The capital of France is", max_tokens=12)


def test_lambda_zero_is_plain_kv(load):
    """lambda = 0 makes the metric the identity: the encoder then writes the plain
    block code with no error feedback, whatever the query subspace, so the rank
    no longer matters (logits equal bit for bit), while lambda > 0 reaches the
    encoder. Not kv3's bytes: SQuat's blocks keep the min/max rule and kv3's
    encoder searches its scales (docs/quality.md); the byte-level identity with
    the min/max code is test_sidestate_math's test_squat_identity_is_plain_codec.
    Centering off (by default squat* keys are centred)."""
    a = load("squat3", "kv3", squat=SquatOptions(lam=0.0, center="none"))
    toks = a.tokenize(TEXT)
    la = all_logits(a, toks)
    b = load("squat3", "kv3", squat=SquatOptions(lam=0.0, center="none", rank=4))
    np.testing.assert_array_equal(la, all_logits(b, toks))
    c = load("squat3", "kv3", squat=SquatOptions(lam=1.0, center="none"))
    assert not np.array_equal(la, all_logits(c, toks))      # lambda > 0 reaches the encoder


def test_settings_change_the_result(load):
    """rank and lambda reach the encoder: a different setting, different logits."""
    a = load("squat3")
    b = load("squat3", squat=SquatOptions(rank=4, lam=10.0))
    assert not np.array_equal(all_logits(a, a.tokenize(TEXT)), all_logits(b, b.tokenize(TEXT)))


def test_squat_k_without_flash_attention(load, f16_logits):
    """K squat with V f16 works with flash attention off (quantized V needs FA)."""
    kld = _kld(load, f16_logits, "squat4", "f16", flash_attn=False)
    kld_fa = _kld(load, f16_logits, "squat4", "f16")
    assert abs(kld - kld_fa) < 0.02 + 0.2 * kld_fa, (kld, kld_fa)


def test_first_prefill_split_over_ubatches(load, f16_logits):
    """The prompt in 16-token batches: the subspace comes from the first batch only
    (fewer queries), still far better than unusable."""
    m = load("squat4")
    logits = all_logits(m, m.tokenize(TEXT), step=16)
    assert np.all(np.isfinite(logits))
    kld, _ = kld_top1(f16_logits, logits)
    assert kld < 2 * _kld(load, f16_logits, "kv4"), kld


def test_side_state_is_refitted_per_prompt(load):
    m = load("squat3")
    a = m.logits("A completely different prompt about cooking pasta with garlic")
    b1 = m.logits(TEXT)
    m.logits("Numbers: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20")
    b2 = m.logits(TEXT)
    np.testing.assert_array_equal(b1, b2)
    assert not np.array_equal(a, b1)


@pytest.mark.parametrize("fmt", ["squat4", "squat2"])
def test_state_save_load_continues_identically(load, model_path, fmt):
    """Save after the prompt, restore into a FRESH context whose own subspace came
    from another prompt, continue greedily: the same tokens as the uninterrupted
    run, so the subspace travelled with the state (decode keys are encoded with it)."""
    fresh = pyllm_kv.load(model_path, cache_k=fmt, cache_v=fmt, n_ctx=N_CTX, n_threads=1)
    try:
        want, got = state_roundtrip_tokens(load(fmt), fresh, TEXT)
        assert got == want
    finally:
        fresh.close()


def test_state_with_other_settings_is_refused(load, model_path):
    m = load("squat3")
    m.llama.reset()
    m.llama.eval(m.tokenize(TEXT))
    state = m.llama.save_state()
    other = pyllm_kv.load(model_path, cache_k="squat3", cache_v="squat3", n_ctx=N_CTX, n_threads=1,
                          squat=SquatOptions(rank=8))
    try:
        with pytest.raises(Exception) as exc:
            other.llama.load_state(state)
        assert not isinstance(exc.value, AssertionError)
    finally:
        other.close()


def test_state_file_names_other_settings(load, model_path, tmp_path):
    """pyllm_kv's state file records the SQuat settings: loading into a context made
    with others is a StateMismatch that says how to load it, before llama.cpp runs."""
    from pyllm_kv.errors import StateMismatch

    m = load("squat3")
    m.prefill(TEXT[:80])
    path = tmp_path / "s.state"
    m.save_state(path)
    other = pyllm_kv.load(model_path, cache_k="squat3", cache_v="squat3", n_ctx=N_CTX, n_threads=1,
                          squat=SquatOptions(lam=10.0))
    try:
        with pytest.raises(StateMismatch) as exc:
            other.load_state(path)
        assert "SquatOptions(rank=20, lam=100.0, normalize=True, transform='hadamard', center='auto')" in str(exc.value)
    finally:
        other.close()
    assert m.squat_settings == {"rank": 20, "lam": 100.0, "normalize": True, "transform": "hadamard", "center": "auto",
                                "refit": "first"}


def test_k_shift_keeps_squat_cache_usable(load):
    """Context shift re-ropes K (decode, RoPE, plain re-encode). The distribution
    after the shift must be as close to a fresh evaluation as kv4's."""
    results = {fmt: kshift_kld(load(fmt), TEXT) for fmt in ("kv4", "squat4")}
    assert results["squat4"] < max(0.05, 3 * results["kv4"]), results


@pytest.mark.parametrize("bad", [dict(rank=-1), dict(rank=1.5), dict(lam=-1.0), dict(lam=float("nan")),
                                 dict(lam="x"), dict(normalize=1), dict(transform="none")])
def test_bad_options_are_named(bad):
    with pytest.raises(InvalidParameter) as exc:
        SquatOptions(**bad)
    assert "SQuat" in str(exc.value)


@pytest.mark.parametrize("var,val", [("PYLLM_KV_SQUAT_RANK", "many"), ("PYLLM_KV_SQUAT_LAMBDA", "-3"),
                                     ("PYLLM_KV_SQUAT_NORMALIZE", "yes"), ("PYLLM_KV_SQUAT_TRANSFORM", "x")])
def test_bad_environment_is_named(lib_dir, model_path, require_format, monkeypatch, var, val):
    require_format("squat4")
    monkeypatch.setenv(var, val)
    with pytest.raises(InvalidParameter) as exc:
        pyllm_kv.load(model_path, cache_k="squat4", cache_v="kv4", n_ctx=256, n_threads=1)
    assert var in str(exc.value)


def test_squat_on_deco_transform(load, f16_logits):
    """Beyond the paper: SQuat keys on the DecoQuant transform (K and the squat V get
    deco's per-layer S instead of the Hadamard rotation). Runs, tracks f16 about as
    well as deco4 does (docs/quality.md), and its report counts deco's matrices too."""
    m = load("squat4", squat=SquatOptions(transform="deco"))
    kld = kld_top1(f16_logits, all_logits(m, m.tokenize(TEXT)))[0]
    assert kld < 0.5, kld
    info = m.info
    d = info.head_dim_k
    want = (info.n_layer * info.n_head_kv * d * (d + 1) + 2 * info.n_layer * formats.DECO_SIDE_STATE_BYTES
            + 4 * info.n_layer * info.n_head_kv * d)  # + the keys' center row (float32), centering "auto"
    assert m.kv_report()["side_state_bytes"] == want
    assert m.squat_settings["transform"] == "deco"


def test_side_state_is_reported(load):
    rep = load("squat4").kv_report()
    info = load("squat4").info
    d = info.head_dim_k
    # fp16 upper triangles of U, and the keys' float32 center row (centering "auto")
    assert rep["side_state_bytes"] == info.n_layer * info.n_head_kv * (d * (d + 1) + 4 * d)
    assert formats.resolve("squat4").bits == formats.resolve("kv4").bits == 4.5


def test_fit_trace_prints_one_line_per_fitted_head():
    """PYLLM_KV_FIT_TRACE=1 (docs/squat.md "Fit cost"): each KV head of each layer
    is fitted once, on the first prompt, and not again while decoding."""
    import os
    import re
    import subprocess
    import sys

    child = ("import pyllm_kv, sys\n"
             "m = pyllm_kv.load(cache_k='squat4', cache_v='kv4', n_ctx=256)\n"
             "print(m.info.n_layer, m.info.n_head_kv)\n"
             "m.prefill('The lighthouse keeper climbed the stairs every evening.')\n"
             "sys.stderr.write('PROMPT-DONE\\n'); sys.stderr.flush()\n"
             "m.resume(max_tokens=3)\n")
    env = dict(os.environ, PYLLM_KV_FIT_TRACE="1")
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    n_layer, n_head_kv = map(int, out.stdout.split()[:2])
    before, marker, after = out.stderr.partition("PROMPT-DONE")
    assert marker
    fits = re.findall(r"pyllm-kv fit: SQuat layer (\d+) head (\d+) \(thread \d+ of \d+, (\d+) rows\): ([0-9.]+) ms",
                      before)
    assert sorted((int(l), int(h)) for l, h, _, _ in fits) == \
        [(l, h) for l in range(n_layer) for h in range(n_head_kv)]
    assert all(int(rows) > 0 and float(ms) >= 0.0 for _, _, rows, ms in fits)
    assert "pyllm-kv fit" not in after
