"""Several sequences in one context: each must get what it gets alone.

Driven through llama.cpp's low-level API (llama_batch with seq ids,
llama_memory_seq_rm), the way a server batches requests. For every cache type
(f16, q4_0 and each of our formats, taken from the registry) and both KV layouts
(one stream per sequence, and one unified buffer where sequences interleave):

* three prompts of different lengths, decoded together step by step, produce the
  same greedy tokens as each prompt run alone in its own context;
* after llama_memory_seq_rm frees one sequence mid-run, a new prompt placed in its
  cells (in the unified buffer: the holes between the others' cells) produces the
  tokens it produces alone, and the other sequences are not disturbed.

Greedy = argmax of the logits, computed here, so the comparison covers only the
cache and attention, not a sampler. Every run is teacher-forced with the solo
run's tokens and checked step by step (argmax equal to the solo token at every
step is the same as free-running greedy agreement, and says where it breaks).

One measured subtlety (docs/reliability.md): in the unified buffer, after the
removal the surviving sequences' new tokens land in the freed holes, *before*
their older cells. Attention then sums the same terms in another order; through
quantized activations and KV codes that rounding difference can grow (kv3/kv2
flipped a greedy token in 1 of ~10 steps). So there the survivors are checked
(a) to be bit-identical to a twin run whose other sequences hold different
tokens with the same layout (nothing leaks between sequences), and (b) by
numbers against the solo run. With one stream per sequence they stay exact.

Hook for formats that share side state across sequences (a transform fitted on
one sequence and used by all, say): their multi-sequence logits legitimately
differ from a solo run, so token identity is too strict. Give the registry entry
``shared_side_state = True`` (the ratio is then DEFAULT_RELAXED_RATIO), or list the
format in RELAXED (format -> ratio). Such formats are compared by numbers: with
the solo run's tokens fed to both (teacher forcing) and f16 fed the same tokens as
the reference, the multi-sequence run may be at most `ratio` times as far from
f16 as the solo run is (mean KL per step), plus RELAXED_SLACK. That accepts "the
shared transform fits this sequence a bit worse" and refuses garbage (another
prompt's logits are at KL 12-16).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest

from pyllm_kv import formats

# Format name -> allowed KL(f16 || multi) / KL(f16 || solo), for formats whose sequences
# share side state. Measured (docs/reliability.md): deco4 <= 1.6, deco2 <= 1.7, deco3 5.1
# for the sequence prefilled second (the transform is fitted on the first sequence's
# prompt; a 3-bit code pays most for the mismatch). deco3's entry accepts that
# measured cost with some room; its owner may tighten it.
RELAXED: Dict[str, float] = {"deco3": 8.0}
DEFAULT_RELAXED_RATIO = 4.0
RELAXED_SLACK = 0.1  # nats: room for formats whose solo run is almost exactly f16

CACHES = ["f16", "q4_0"] + [f.name for f in formats.FORMATS.values() if f.is_ours]
PROMPTS = ["The capital of France is", "Once upon a time, there was a little girl who",
           "def fibonacci(n):\n   "]
NEW_PROMPT = "The three primary colors are"
STEPS = 10          # greedy tokens per sequence
RM_AFTER = 4        # steps before sequence 1 is removed and NEW_PROMPT takes its id
N_CTX_SEQ = 64      # cells per sequence: prompts (< 16 tokens) + STEPS + the replacement
N_THREADS = 1       # fixed: the same thread count for solo and multi runs


def relaxed_bound(name: str) -> Optional[float]:
    if name in RELAXED:
        return RELAXED[name]
    if getattr(formats.FORMATS[name], "shared_side_state", False):
        return DEFAULT_RELAXED_RATIO
    return None


class Runner:
    """A loaded model plus helpers to decode several sequences in one context."""

    def __init__(self, llama_cpp, model_path):
        from llama_cpp import _logger  # llama_cpp's log callback prints everything by default

        _logger.set_verbose(False)
        self.L = llama_cpp
        self.L.llama_backend_init()
        params = self.L.llama_model_default_params()
        params.n_gpu_layers = 0
        self.model = self.L.llama_model_load_from_file(str(model_path).encode(), params)
        assert self.model, "could not load the model"
        self.vocab = self.L.llama_model_get_vocab(self.model)
        self.n_vocab = self.L.llama_vocab_n_tokens(self.vocab)

    def close(self):
        self.L.llama_model_free(self.model)

    def tokenize(self, text: str) -> List[int]:
        raw = text.encode()
        buf = (self.L.llama_token * 256)()
        n = self.L.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), True, False)
        assert 0 < n < len(buf)
        return list(buf[:n])

    def context(self, cache: str, n_seq: int, unified: bool):
        from pyllm_kv import _libs

        p = self.L.llama_context_default_params()
        # Non-unified: llama.cpp gives each sequence n_ctx / n_seq_max cells.
        p.n_ctx = N_CTX_SEQ * n_seq
        p.n_batch = p.n_ubatch = 64
        p.n_seq_max = n_seq
        p.kv_unified = unified
        p.type_k = p.type_v = _libs.ggml_type_id(formats.resolve(cache).ggml)
        p.flash_attn_type = 1  # quantized V needs flash attention; same for every type
        p.n_threads = p.n_threads_batch = N_THREADS
        ctx = self.L.llama_init_from_model(self.model, p)
        assert ctx, f"could not create a {cache} context"
        return ctx


class Seqs:
    """Sequences in one context: prefill each prompt on its own, then decode all
    live sequences together, one token each per llama_decode call."""

    def __init__(self, r: Runner, ctx, n_seq: int):
        self.r, self.ctx = r, ctx
        self.batch = r.L.llama_batch_init(64, 0, n_seq)
        self.pos: Dict[int, int] = {}
        self.next: Dict[int, int] = {}
        self.out: Dict[int, List[int]] = {}
        self.logits: Dict[int, List[np.ndarray]] = {}

    def close(self):
        self.r.L.llama_batch_free(self.batch)
        self.r.L.llama_free(self.ctx)

    def _row(self, i: int) -> np.ndarray:
        ptr = self.r.L.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.r.n_vocab,)).copy()

    def _fill(self, items: Sequence[Tuple[int, int, int, bool]]):
        b = self.batch
        b.n_tokens = len(items)
        for i, (tok, pos, seq, want) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
            b.seq_id[i][0] = seq
        rc = self.r.L.llama_decode(self.ctx, b)
        assert rc == 0, f"llama_decode returned {rc}"

    def start(self, seq: int, prompt: List[int], forced: Optional[List[int]] = None):
        self._fill([(t, i, seq, i == len(prompt) - 1) for i, t in enumerate(prompt)])
        self.pos[seq], self.out[seq], self.logits[seq] = len(prompt), [], []
        self._take(seq, self._row(-1), forced)

    def _take(self, seq: int, row: np.ndarray, forced: Optional[List[int]]):
        self.logits[seq].append(row)
        step = len(self.out[seq])
        self.next[seq] = forced[step] if forced is not None else int(np.argmax(row))
        self.out[seq].append(self.next[seq])

    def step(self, forced: Optional[Dict[int, List[int]]] = None):
        seqs = sorted(self.next)
        self._fill([(self.next[s], self.pos[s], s, True) for s in seqs])
        for i, s in enumerate(seqs):
            self.pos[s] += 1
            self._take(s, self._row(i), (forced or {}).get(s))

    def remove(self, seq: int):
        mem = self.r.L.llama_get_memory(self.ctx)
        assert self.r.L.llama_memory_seq_rm(mem, seq, -1, -1)
        # Its cells are free again: a later sequence may be placed there.
        assert self.r.L.llama_memory_seq_pos_max(mem, seq) == -1
        del self.next[seq]


@pytest.fixture(scope="module")
def runner(lib_dir, model_path):
    from pyllm_kv import _libs

    r = Runner(_libs.llama_cpp(), model_path)
    yield r
    r.close()


# Solo results do not depend on `unified` (one sequence): computed once per cache.
_SOLO: Dict[Tuple[str, str, int], Tuple[List[int], List[np.ndarray]]] = {}


def solo(r: Runner, cache: str, prompt: str, steps: int,
         forced: Optional[List[int]] = None) -> Tuple[List[int], List[np.ndarray]]:
    """Greedy tokens (and logits) of one prompt alone in a one-sequence context
    (teacher-forced with `forced` if given)."""
    key = (cache, prompt, steps, tuple(forced or ()))
    if key not in _SOLO:
        s = Seqs(r, r.context(cache, 1, False), 1)
        try:
            s.start(0, r.tokenize(prompt), forced)
            for _ in range(steps - 1):
                s.step({0: forced} if forced else None)
            _SOLO[key] = (s.out[0], s.logits[0])
        finally:
            s.close()
    return _SOLO[key]


def mean_kld(ref: List[np.ndarray], got: List[np.ndarray]) -> float:
    def log_softmax(x):
        x = x.astype(np.float64) - x.max()
        return x - np.log(np.exp(x).sum())

    vals = []
    for a, b in zip(ref, got):
        la, lb = log_softmax(a), log_softmax(b)
        vals.append(float((np.exp(la) * (la - lb)).sum()))
    return float(np.mean(vals))


def check_agreement(cache: str, what: str, ref: Tuple[List[int], List[np.ndarray]],
                    got_logits: List[np.ndarray], bound: Optional[float] = None,
                    f16: Optional[List[np.ndarray]] = None):
    """Exact: the greedy token of every step equals the solo run's.
    `bound`: mean KL(solo || multi) per step <= bound (reordered layout, see above).
    Relaxed format (with `f16`, the f16 logits for the same tokens): KL(f16 || multi)
    <= ratio * KL(f16 || solo) + RELAXED_SLACK."""
    assert got_logits
    n = len(got_logits)
    ratio = relaxed_bound(cache)
    if ratio is not None:
        assert f16 is not None, "relaxed formats are compared against f16"
        k_solo, k_multi = mean_kld(f16[:n], ref[1][:n]), mean_kld(f16[:n], got_logits)
        assert k_multi <= ratio * k_solo + RELAXED_SLACK, (
            f"{cache} {what}: KL to f16 {k_multi:.4f} multi vs {k_solo:.4f} solo (ratio limit {ratio})")
    elif bound is not None:
        kld = mean_kld(ref[1][:n], got_logits)
        assert kld <= bound, f"{cache} {what}: mean KLD {kld:.4f} vs the solo run > {bound}"
    else:
        got = [int(np.argmax(x)) for x in got_logits]
        assert got == ref[0][:n], f"{cache} {what}: greedy tokens differ from the solo run"


# Survivors of a removal in the unified buffer (see the module docstring): measured
# mean KLD vs solo up to 0.32 (kv3); logits of another prompt are at 12-16, so a
# sequence that read another's cells would be far above this bound.
REORDERED_KLD = 1.0
N_TOTAL = RM_AFTER + STEPS - 1  # tokens of sequences 0 and 2, which outlive sequence 1


def multi(r: Runner, cache: str, unified: bool, toks: List[List[int]], forced: List[List[int]]):
    """Sequences 0-2 from toks[0:3] together; after RM_AFTER tokens sequence 1 is removed
    and toks[3] starts in its place. Teacher-forced with `forced`. Returns the logits:
    {0, 2: all steps; 1: before removal; 'new': sequence 1's replacement}."""
    s = Seqs(r, r.context(cache, len(PROMPTS), unified), len(PROMPTS))
    try:
        feed = {i: forced[i] for i in range(3)}
        for i in range(3):
            s.start(i, toks[i], feed[i])
        for _ in range(RM_AFTER - 1):
            s.step(feed)
        before = s.logits[1]
        s.remove(1)
        feed[1] = forced[3]
        s.start(1, toks[3], feed[1])
        for _ in range(STEPS - 1):
            s.step(feed)
        return {0: s.logits[0], 1: before, 2: s.logits[2], "new": s.logits[1]}
    finally:
        s.close()


def _setup(runner, cache):
    """Solo runs of the 4 prompts, their tokens, and (relaxed formats only) the f16
    logits for the solo runs' tokens."""
    refs = [solo(runner, cache, p, N_TOTAL) for p in PROMPTS] + [solo(runner, cache, NEW_PROMPT, STEPS)]
    toks = [runner.tokenize(p) for p in PROMPTS + [NEW_PROMPT]]
    f16 = [None] * 4
    if relaxed_bound(cache) is not None:
        f16 = [solo(runner, "f16", p, len(ref[0]), forced=ref[0])[1]
               for p, ref in zip(PROMPTS + [NEW_PROMPT], refs)]
    return refs, toks, f16


@pytest.mark.parametrize("unified", [False, True], ids=["streams", "unified"])
@pytest.mark.parametrize("cache", CACHES)
def test_sequences_match_solo_runs(runner, require_format, cache, unified):
    require_format(cache)
    refs, toks, f16 = _setup(runner, cache)
    got = multi(runner, cache, unified, toks, [ref[0] for ref in refs])

    for i in range(3):
        check_agreement(cache, f"sequence {i} before the removal", refs[i], got[i][:RM_AFTER], f16=f16[i])
    check_agreement(cache, "new sequence in the freed cells", refs[3], got["new"], f16=f16[3])
    for i in (0, 2):
        after = got[i][RM_AFTER:]
        ref_after = (refs[i][0][RM_AFTER:], refs[i][1][RM_AFTER:])
        check_agreement(cache, f"sequence {i} after the removal", ref_after, after,
                        bound=REORDERED_KLD if unified else None,
                        f16=f16[i][RM_AFTER:] if f16[i] is not None else None)


@pytest.mark.parametrize("cache", CACHES)
def test_unified_buffer_leaks_nothing_between_sequences(runner, require_format, cache):
    """Same cell layout, different tokens in the other sequences: sequences 0 and 2
    must get bit-identical logits (masked cells contribute nothing, whatever they hold)."""
    require_format(cache)
    if relaxed_bound(cache) is not None:
        pytest.skip(f"{cache} shares side state across sequences by design")
    refs, toks, _ = _setup(runner, cache)
    forced = [ref[0] for ref in refs]
    a = multi(runner, cache, True, toks, forced)
    # Reversed token order: same lengths (same layout), different content.
    toks2, forced2 = list(toks), list(forced)
    for i in (1, 3):
        toks2[i], forced2[i] = toks[i][::-1], forced[i][::-1]
    b = multi(runner, cache, True, toks2, forced2)
    for i in (0, 2):
        for step, (x, y) in enumerate(zip(a[i], b[i])):
            assert np.array_equal(x, y), f"{cache}: sequence {i} step {step} depends on another sequence's tokens"
    assert not np.array_equal(a["new"][0], b["new"][0])  # the twin really differs


def test_relaxed_hook_compares_numbers(runner, require_format, monkeypatch):
    """The relaxed path (KL to f16 instead of tokens) works and can fail: a format's
    solo logits pass against themselves, another prompt's logits do not."""
    cache = next(f.name for f in formats.FORMATS.values() if f.is_ours and relaxed_bound(f.name) is None)
    require_format(cache)
    monkeypatch.setitem(RELAXED, cache, 1.5)
    ref = solo(runner, cache, PROMPTS[0], 6)
    f16 = solo(runner, "f16", PROMPTS[0], 6, forced=ref[0])[1]
    check_agreement(cache, "self", ref, ref[1], f16=f16)
    other = solo(runner, cache, PROMPTS[1], 6)
    with pytest.raises(AssertionError, match="KL to f16"):
        check_agreement(cache, "other", ref, other[1], f16=f16)
