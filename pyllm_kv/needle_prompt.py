"""Prompts and scoring of the needle-in-a-haystack (passkey) task, without a model.

A trial hides one sentence, the *needle* ("The secret passkey is 58213. ..."),
at a given depth of filler text cut from the corpus, and asks for the passkey
at the end. Everything here works on a ``tokenize(text) -> token list``
callable and a ``render(user_text) -> prompt`` callable, so the tests can use a
whitespace tokenizer and a plain template while :mod:`pyllm_kv.needle` passes
the model's tokenizer and chat template.

Units of filler are corpus *lines*: short (a dictionary line is at most ~25
tokens), so both the prompt length and the needle's depth land close to what
was asked. The needle becomes a line of its own between two corpus lines.

Depth is the share of the filler's tokens that come before the needle: 0 puts
it first (right after the instructions), 1 last (right before the question).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

__all__ = [
    "NEEDLE",
    "INSTRUCTION",
    "QUESTION",
    "ANSWER_PREFIX",
    "Trial",
    "NeedlePrompt",
    "filler_lines",
    "paragraph_starts",
    "make_trials",
    "build_prompt",
    "extract_answer",
    "is_correct",
]

#: The sentence hidden in the filler; ``{key}`` is the passkey (5 digits).
NEEDLE = "The secret passkey is {key}. Remember it: {key} is the secret passkey."
#: Before the filler.
INSTRUCTION = ("Below is a long text. Somewhere inside it there is a secret passkey. "
               "Read the text and remember the passkey; you will be asked for it.")
#: After the filler.
QUESTION = "What is the secret passkey hidden in the text above? Answer with the number only."
#: Start of the model's answer, appended after the chat template's assistant header.
#: Small models then answer with the number instead of a preamble; the same for
#: every format, so it does not favour one.
ANSWER_PREFIX = "The secret passkey is"

PASSKEY_DIGITS = 5

Tokenize = Callable[[str], Sequence[int]]
Render = Callable[[str], str]


def filler_lines(text: str) -> List[str]:
    """The corpus as lines (each with its ``"\\n"``); blank lines kept, so joined
    spans read like the book."""
    return text.splitlines(keepends=True)


def paragraph_starts(lines: Sequence[str]) -> List[int]:
    """Indices of lines that open a paragraph (first line, or after a blank one):
    where filler starts, so it never begins in the middle of an entry."""
    return [i for i, ln in enumerate(lines) if ln.strip() and (i == 0 or not lines[i - 1].strip())]


@dataclass(frozen=True)
class Trial:
    """One prompt to build: which passkey, where the filler starts."""
    length: int  # target prompt length in tokens
    depth: float  # 0..1
    index: int  # trial number within the (length, depth) cell
    passkey: str
    start_line: int


def make_trials(length: int, depth: float, n: int, seed: int, starts: Sequence[int]) -> List[Trial]:
    """``n`` trials of a (length, depth) cell, the same for every cache format.

    Each trial's passkey and filler start come from a generator seeded with
    (seed, length, depth, trial), so a cell does not change when other lengths or
    depths are added to the grid.
    """
    if not starts:
        raise ValueError("no filler text: the corpus has no non-blank line")
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, int(length), int(round(depth * 10_000)), i])
        key = str(int(rng.integers(10 ** (PASSKEY_DIGITS - 1), 10 ** PASSKEY_DIGITS)))
        out.append(Trial(int(length), float(depth), i, key, int(starts[int(rng.integers(len(starts)))])))
    return out


@dataclass
class NeedlePrompt:
    """A built prompt and where its needle ended up."""
    text: str
    n_tokens: int  # tokens of ``text``
    filler_tokens: int  # tokens of the filler (needle excluded), measured alone
    needle_line: int  # the needle follows this many filler lines
    n_filler_lines: int
    depth_actual: float  # filler tokens before the needle / all filler tokens (line counts)


class _LineCounts:
    """Token counts of corpus lines, each measured alone and cached (the sums
    estimate a span's count; the built prompt is then measured whole)."""

    def __init__(self, lines: Sequence[str], tokenize: Tokenize):
        self.lines, self.tokenize = lines, tokenize
        self.cache: Dict[int, int] = {}

    def __call__(self, i: int) -> int:
        i %= len(self.lines)
        c = self.cache.get(i)
        if c is None:
            c = self.cache[i] = len(self.tokenize(self.lines[i]))
        return c


def _compose(lines: Sequence[str], start: int, n: int, needle: str, depth: float, count: _LineCounts):
    """Filler of ``n`` lines from ``start`` (wrapping around the corpus) with the
    needle inserted at ``depth``; returns (text, needle_line, depth_actual)."""
    span = [lines[(start + j) % len(lines)] for j in range(n)]
    counts = [count(start + j) for j in range(n)]
    total = sum(counts)
    # the cut k (needle after k lines) whose share of tokens before it is closest to depth
    goal, before, k, best = depth * total, 0, 0, abs(depth * total)
    for j, c in enumerate(counts):
        before += c
        if abs(before - goal) < best:
            k, best = j + 1, abs(before - goal)
    if span and not span[-1].endswith("\n"):
        span[-1] += "\n"  # the corpus's last line: keep the needle on a line of its own
    text = "".join(span[:k]) + needle + "\n" + "".join(span[k:])
    actual = (sum(counts[:k]) / total) if total else depth
    return text, k, actual


def build_prompt(lines: Sequence[str], trial: Trial, tokenize: Tokenize, render: Render,
                 count: Optional[_LineCounts] = None) -> NeedlePrompt:
    """The longest prompt of whole filler lines that fits in ``trial.length``
    tokens (``len(tokenize(render(user_text)))``), needle at ``trial.depth``.

    Raises ValueError if not even the instructions, needle and question fit.
    """
    if count is None:
        count = _LineCounts(lines, tokenize)
    needle = NEEDLE.format(key=trial.passkey)

    def user_text(filler: str) -> str:
        return f"{INSTRUCTION}\n\n{filler}\n{QUESTION}"

    measured: Dict[int, tuple] = {}

    def measure(n: int) -> tuple:
        if n not in measured:
            filler, k, actual = _compose(lines, trial.start_line, n, needle, trial.depth, count)
            text = render(user_text(filler))
            measured[n] = (len(tokenize(text)), text, k, actual)
        return measured[n]

    def fits(n: int) -> bool:
        return measure(n)[0] <= trial.length

    if not fits(0):
        raise ValueError(f"a prompt of {trial.length} tokens cannot hold the instructions, needle and "
                         f"question ({measure(0)[0]} tokens): use a longer length")
    # Estimate the line count from per-line counts, then find the largest n that fits by
    # bisection (the count grows with n; lines measured alone slightly overestimate it).
    # Lines that tokenize to nothing (blank lines under a whitespace tokenizer) must not
    # loop forever: at most `cap` lines, i.e. the corpus 64 times over.
    cap = 64 * max(len(lines), 1)
    budget, n_est, acc = trial.length - measure(0)[0], 0, 0
    while n_est < cap and acc + count(trial.start_line + n_est) <= budget:
        acc += count(trial.start_line + n_est)
        n_est += 1
    lo, hi = 0, max(n_est, 1)  # invariant: n=lo fits, n=hi does not
    if fits(hi):
        lo, hi = hi, hi + max(8, hi // 10)
        while fits(hi):  # rare: lines measured alone underestimated the span
            if hi >= cap:
                raise ValueError(f"the filler text is too short to reach {trial.length} tokens")
            lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    n = lo
    n_tok, text, k, actual = measure(n)
    filler_tok = sum(count(trial.start_line + j) for j in range(n))
    return NeedlePrompt(text=text, n_tokens=n_tok, filler_tokens=filler_tok, needle_line=k,
                        n_filler_lines=n, depth_actual=actual)


_DIGITS = re.compile(r"\d+")


def extract_answer(answer: str) -> Optional[str]:
    """The first run of digits in the model's answer (``None`` if it has none).

    A number written with separators ("58,213") is two runs, so it fails: the
    task asks for the number as given.
    """
    m = _DIGITS.search(answer)
    return m.group(0) if m else None


def is_correct(answer: str, passkey: str) -> bool:
    """Exact match: the first number in the answer is the passkey, digit for digit
    (a prefix, a longer number or another number fails)."""
    return extract_answer(answer) == passkey
