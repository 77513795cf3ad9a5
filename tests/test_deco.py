"""DecoQuant cache types (deco4/deco3/deco2) end to end on SmolLM2.

What is checked here is the llama.cpp side: the per-layer side state is fitted
from the first ubatch, reused, reset with the cache, saved and restored with
the session state, and survives a K-shift. The native math (fit, S·S⁻¹) has its
own float64 tests in test_sidestate_math.py; the attention kernel in
test_fa_decode.py.
"""

from __future__ import annotations

import numpy as np
import pytest

import pyllm_kv

from logits_util import all_logits, kld_top1, kshift_kld, state_roundtrip_tokens

N_CTX = 512
DECO = ["deco4", "deco3", "deco2"]
TEXT = ("The old lighthouse keeper climbed the stairs every evening to light the lamp. "
        "Ships passing in the night relied on its beam to find the harbour, and the keeper "
        "took pride in never having missed a single night in forty years of service.")


@pytest.fixture(scope="module")
def f16_logits(load):
    m = load("f16")
    return all_logits(m, m.tokenize(TEXT))


# Upper bounds on mean KLD vs the f16 cache over this short text, measured
# with margin (see docs/quality.md for the corpus-level numbers).
KLD_BOUND = {"deco4": 0.5, "deco3": 1.5, "deco2": 4.0}


@pytest.mark.parametrize("fmt", DECO)
def test_deco_generates_and_tracks_f16(load, f16_logits, fmt):
    m = load(fmt)
    assert m.generate("The capital of France is", max_tokens=8).strip(), "empty generation"
    logits = all_logits(m, m.tokenize(TEXT))
    assert np.all(np.isfinite(logits))
    kld, top1 = kld_top1(f16_logits, logits)
    assert kld < KLD_BOUND[fmt], (fmt, kld, top1)


def test_deco4_answers_like_f16(load):
    assert "Paris" in load("deco4").generate("The capital of France is", max_tokens=12)


def test_deco_k_only_without_flash_attention(load, f16_logits):
    """K deco with V f16 works with flash attention off (quantized V needs FA in llama.cpp)."""
    m = load("deco4", "f16", flash_attn=False)
    kld, _ = kld_top1(f16_logits, all_logits(m, m.tokenize(TEXT)))
    assert kld < KLD_BOUND["deco4"]


def test_first_prefill_split_over_ubatches(load, f16_logits):
    """A prompt fed in 8-token batches: the side state comes from the first batch only."""
    m = load("deco4")
    logits = all_logits(m, m.tokenize(TEXT), step=8)
    assert np.all(np.isfinite(logits))
    kld, top1 = kld_top1(f16_logits, logits)
    assert kld < 2 * KLD_BOUND["deco4"], (kld, top1)


def test_side_state_is_refitted_per_prompt(load):
    """Same prompt twice from an empty cache: identical logits (the side state was
    reset and refitted, not left over from the other prompt in between)."""
    m = load("deco3")
    a = m.logits("A completely different prompt about cooking pasta with garlic")
    b1 = m.logits(TEXT)
    m.logits("Numbers: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20")
    b2 = m.logits(TEXT)
    np.testing.assert_array_equal(b1, b2)
    assert not np.array_equal(a, b1)


@pytest.mark.parametrize("fmt", ["deco4", "deco2"])
def test_state_save_load_continues_identically(load, model_path, fmt):
    """Save after the prompt, restore into a FRESH context (empty side state) and
    continue greedily: same tokens as the uninterrupted run. Without the side
    state in the state, the restored cells would be read with another S."""
    fresh = pyllm_kv.load(model_path, cache_k=fmt, cache_v=fmt, n_ctx=N_CTX, n_threads=1)
    try:
        want, got = state_roundtrip_tokens(load(fmt), fresh, TEXT)
        assert got == want
    finally:
        fresh.close()


def test_k_shift_keeps_deco_cache_usable(load, lib_dir):
    """Context shift: drop the first tokens and shift positions (llama.cpp re-ropes K,
    which for deco means S-decode, RoPE, S-encode). The next-token distribution
    after the shift must be as close to a fresh evaluation of the kept tokens as
    it is for the plain kv4 format (both requantize K)."""
    results = {fmt: kshift_kld(load(fmt), TEXT) for fmt in ("kv4", "deco4")}
    assert results["deco4"] < max(0.05, 3 * results["kv4"]), results
