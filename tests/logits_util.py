"""Helpers shared by the end-to-end quality tests (test_deco.py, test_squat.py):
per-position logits through llama_decode, and KLD/top-1 against a reference."""

from __future__ import annotations

import numpy as np

from pyllm_kv import _libs


def all_logits(m, tokens, step=None):
    """Logits after every token, from an empty cache, the prompt fed to llama_decode
    in pieces of `step` tokens (default: all at once)."""
    lc = _libs.llama_cpp()
    ctx = m.llama.ctx
    lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
    step = step or len(tokens)
    n_vocab = m.llama.n_vocab()
    batch = lc.llama_batch_init(step, 0, 1)
    out = []
    try:
        for p0 in range(0, len(tokens), step):
            piece = tokens[p0:p0 + step]
            batch.n_tokens = len(piece)
            for i, t in enumerate(piece):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, p0 + i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1
            assert lc.llama_decode(ctx, batch) == 0
            ptr = lc.llama_get_logits(ctx)
            out.append(np.ctypeslib.as_array(ptr, shape=(len(piece) * n_vocab,)).reshape(len(piece), n_vocab).copy())
    finally:
        lc.llama_batch_free(batch)
    m.llama.reset()  # llama-cpp-python's own bookkeeping: nothing cached that it knows of
    return np.concatenate(out).astype(np.float64)


def log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kld_top1(ref, other):
    """Mean KL(ref || other) over positions and the top-1 agreement."""
    lp, lq = log_softmax(ref), log_softmax(other)
    kld = float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))
    top1 = float(np.mean(ref.argmax(-1) == other.argmax(-1)))
    return kld, top1


def last_logits(ll):
    """Logits of the last token a llama_cpp.Llama evaluated, straight from llama.cpp.
    (Llama.scores is only filled with logits_all=True: llama-cpp-python 0.3.36
    leaves it untouched otherwise, so reading it would compare stale zeros.)"""
    ptr = _libs.llama_cpp().llama_get_logits_ith(ll.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(ll.n_vocab(),)).astype(np.float64)


def greedy(ll, n=12):
    """Continue a llama_cpp.Llama greedily from its last evaluated token."""
    out = []
    for _ in range(n):
        t = int(np.argmax(last_logits(ll)))
        out.append(t)
        ll.eval([t])
    return out


def kshift_kld(m, text, n_drop=16):
    """Context shift on a loaded model: evaluate `text`, drop `n_drop` tokens after
    BOS and shift the rest down (llama.cpp re-ropes K), then evaluate a probe.
    Returns KL(fresh || shifted) of the probe's next-token distribution, where
    `fresh` evaluates the kept tokens plus the probe from an empty cache."""
    lc = _libs.llama_cpp()
    llama = m.llama
    tokens = m.tokenize(text)
    llama.reset()
    llama.eval(tokens)
    mem = lc.llama_get_memory(llama.ctx)
    lc.llama_memory_seq_rm(mem, 0, 1, 1 + n_drop)                      # keep BOS
    lc.llama_memory_seq_add(mem, 0, 1 + n_drop, -1, -n_drop)
    kept = [tokens[0]] + tokens[1 + n_drop:]
    llama.n_tokens = len(kept)
    llama.input_ids[: len(kept)] = kept
    probe = m.tokenize(" and", add_bos=False)
    llama.eval(probe)
    shifted = last_logits(llama)
    lc.llama_memory_clear(mem, True)
    llama.reset()
    llama.eval(kept + probe)
    fresh = last_logits(llama)
    assert np.all(np.isfinite(shifted))
    return kld_top1(fresh[None], shifted[None])[0]


def state_roundtrip_tokens(m, fresh, text, n=12):
    """Evaluate `text` but its last token on `m`, save llama.cpp's state, then
    evaluate the last token and continue greedily; restore the state into `fresh`
    (a context that has first seen another prompt, so its own side state differs),
    evaluate the same last token there and continue. Returns (tokens on m, tokens
    on fresh). The last token is evaluated after the restore because what is
    under test is the cache (cells and side state), not the saved logits."""
    llama = m.llama
    tokens = m.tokenize(text)
    llama.reset()
    llama.eval(tokens[:-1])
    state = llama.save_state()
    llama.eval(tokens[-1:])
    want = greedy(llama, n)
    fresh.logits("Some other text first, so the fresh context has a side state of its own.")
    fresh.llama.load_state(state)
    fresh.llama.eval(tokens[-1:])
    return want, greedy(fresh.llama, n)
