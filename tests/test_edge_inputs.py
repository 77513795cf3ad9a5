"""Long and edge inputs: a context filled exactly, one token too many, empty and
one-token prompts, n_ctx rounding, and a 16k-token run with one of our formats.

pyllm-kv has no context shift: generation stops when the cache is full, and a
prompt that leaves no room for one generated token is a ContextOverflow.
"""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

import pyllm_kv
from pyllm_kv import _libs, formats
from pyllm_kv.errors import ContextOverflow, InvalidPrompt

N_CTX = 256  # llama.cpp's smallest context (it rounds up to a multiple of 256)
OURS = next(f.name for f in formats.FORMATS.values() if f.is_ours)  # kv4 today


@pytest.fixture(scope="module")
def model(lib_dir, model_path, require_format):
    require_format(OURS)
    with pyllm_kv.load(model_path, cache_k=OURS, cache_v=OURS, n_ctx=N_CTX, n_threads=1) as m:
        yield m


def words(m, n):
    """A text of exactly n tokens (" word" is one token in SmolLM2's vocabulary)."""
    text = "word" + " word" * (n - 1)
    assert len(m.tokenize(text)) == n, "tokenizer changed: pick another filler"
    return text


def counting(n_numbers):
    return ", ".join(str(i) for i in range(1, n_numbers + 1)) + ","


# ---- a full context ----------------------------------------------------------------


def test_generation_fills_the_context_exactly(model):
    """prompt + generated = n_ctx: with no limit, generate() runs to the last cell."""
    prompt = counting(50)
    n_prompt = len(model.tokenize(prompt))
    assert n_prompt < N_CTX - 20
    model.generate(prompt, max_tokens=None)
    # llama-cpp-python evaluates every token but the last one it returns.
    n_generated = model.llama.n_tokens + 1 - n_prompt
    assert n_prompt + n_generated == N_CTX, "counting should not stop early; did it emit an end token?"
    assert list(model.llama.input_ids[:n_prompt]) == model.tokenize(prompt)


def test_max_tokens_beyond_the_context_stops_at_the_last_cell(model):
    model.generate(words(model, N_CTX - 5), max_tokens=10_000)
    assert model.llama.n_tokens == N_CTX - 1  # 5 generated, the last one not evaluated


def test_prompt_of_n_ctx_minus_one_tokens_gets_one_token(model):
    text = model.generate(words(model, N_CTX - 1), max_tokens=50)
    assert text  # one token of room: one token generated
    assert model.llama.n_tokens == N_CTX - 1


def test_prompt_that_fills_the_context_is_an_overflow(model):
    for n in (N_CTX, N_CTX + 1, 4 * N_CTX):
        with pytest.raises(ContextOverflow, match=rf"prompt is {n} tokens but the context holds {N_CTX}"):
            model.generate(words(model, n))
        with pytest.raises(ContextOverflow):
            model.logits(words(model, n))
        with pytest.raises(ContextOverflow):
            model.prefill(words(model, n))
    assert "Paris" in model.generate("The capital of France is", max_tokens=6)  # still fine


def test_requested_n_ctx_is_rounded_up_and_fully_usable(lib_dir, model_path):
    """n_ctx=100 gets 256 cells; a 200-token prompt must work and be recorded whole
    (llama-cpp-python used to keep only the first 100 tokens of its record)."""
    with pyllm_kv.load(model_path, n_ctx=100, n_threads=1) as m:
        assert m.n_ctx == 256
        prompt = words(m, 200)
        assert m.generate(prompt, max_tokens=3)
        assert list(m.llama.input_ids[:200]) == m.tokenize(prompt)


# ---- tiny prompts --------------------------------------------------------------------


def test_empty_prompt_is_refused_clearly(model):
    for call in (model.generate, model.logits, model.prefill, lambda p: list(model.stream(p))):
        with pytest.raises(InvalidPrompt, match="the prompt is empty"):
            call("")
    # A chat turn with empty content is fine: the template adds tokens around it.
    assert isinstance(model.chat([{"role": "user", "content": ""}], max_tokens=4), str)


@pytest.mark.parametrize("prompt", ["Hi", "a", " ", "\n"])
def test_one_token_prompt(model, prompt):
    assert len(model.tokenize(prompt)) == 1
    logits = model.logits(prompt)
    assert np.isfinite(logits).all()
    text = model.generate(prompt, max_tokens=4)
    assert isinstance(text, str) and text
    assert model.prefill(prompt) == 1 and model.resume(max_tokens=4) == text


# ---- 16k tokens ------------------------------------------------------------------------

N_LONG = 16384
WORDS = ("the of and to in is was that for it with as his on be at by had from this not but "
         "are or an were which all their one so said there her been if has more when will who "
         "would no out up into could them time only its about two may than first other new "
         "some these very after where most made over did many before must through years down "
         "city water river market winter letter garden number question answer reason people").split()


def long_tokens(m, n):
    """n tokens of pseudo-English (deterministic), as a token list."""
    rng = random.Random(16384)
    parts, toks = [], []
    while len(toks) < n:
        for _ in range(2000):
            w = rng.choice(WORDS)
            parts.append(w.capitalize() + " " if rng.random() < 0.05 else w + rng.choice([" "] * 12 + [", ", ". ", ".\n"]))
        toks = m.tokenize("".join(parts))
    return toks[:n]


@pytest.mark.slow
def test_16k_context_with_our_format_has_finite_logits(lib_dir, model_path, require_format):
    """n_ctx 16384, K and V in our first format, flash attention on, 2 threads: the
    logits after every 512-token chunk of the prefill and after 8 decode steps at
    depth 16k are all finite. (SmolLM2 was trained at 8k: past that its answers are
    poor, but the cache and attention must stay numerically sound.)"""
    require_format(OURS)
    t0 = time.perf_counter()
    with pyllm_kv.load(model_path, cache_k=OURS, cache_v=OURS, n_ctx=N_LONG, n_batch=512,
                       n_threads=2) as m:
        assert m.n_ctx == N_LONG
        llama, lcpp = m.llama, _libs.llama_cpp()
        n_vocab = llama.n_vocab()

        def last_logits():
            ptr = lcpp.llama_get_logits_ith(llama.ctx, -1)
            return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()

        n_decode = 8
        toks = long_tokens(m, N_LONG - n_decode - 1)
        llama.reset()
        bad = []
        for i in range(0, len(toks), 512):
            llama.eval(toks[i:i + 512])
            if not np.isfinite(last_logits()).all():
                bad.append(llama.n_tokens)
        t_prefill = time.perf_counter() - t0
        for _ in range(n_decode):
            row = last_logits()
            if not np.isfinite(row).all():
                bad.append(llama.n_tokens)
            llama.eval([int(np.argmax(row))])
        assert np.isfinite(last_logits()).all()
        assert llama.n_tokens == N_LONG - 1
    elapsed = time.perf_counter() - t0
    print(f"\n16k run ({OURS}/{OURS}, FA on, 2 threads): prefill {t_prefill:.0f} s, total {elapsed:.0f} s")
    assert not bad, f"NaN/Inf in the logits at depths {bad}"
