"""``pyllm-kv eval --task needle``: can the model still find a passkey hidden far back
in the context when the KV cache is compressed?

For every cache format, prompt length and depth, a few trials hide a sentence
with a 5-digit passkey in filler text from the corpus (:mod:`pyllm_kv.needle_prompt`),
ask for it at the end (through the model's chat template), and score the greedy
answer by exact match of its first number. The prompts are the same for every
format (same seed), so the f16 row is the reference.

One model is loaded per format, with a context for the longest length, and
reused for every prompt (its cache cleared before each). Only the last prompt
token's logits are requested (llama-cpp-python's ``logits_all=False``), so the
logits buffer stays one vocabulary row long at any length. The JSON (``--json``)
is rewritten after every finished cell, and ``--resume`` skips the cells it
already holds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _libs, corpus, report_io, squat_options
from . import needle_prompt as npm
from .errors import PyllmKvError
from .eval import _bits_record, _check_available, _model_path, _numerics_env, _squat_settings, parse_formats
from .eval_report import _version
from .model import validate_config
from .squat_options import SquatOptions

__all__ = [
    "DEFAULT_FORMATS",
    "DEFAULT_LENGTHS",
    "DEFAULT_DEPTHS",
    "NeedleError",
    "parse_lengths",
    "parse_depths",
    "evaluate",
    "format_table",
    "plot",
    "add_arguments",
    "run_cli",
]

DEFAULT_FORMATS = ("f16", "q4_0", "kv4", "kv3", "squat4", "squat3")
DEFAULT_LENGTHS = (1024, 2048, 4096)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: Prompt batch (= ubatch): squat*/deco* fit their side state from the first one.
N_BATCH = 512

PathLike = Union[str, "os.PathLike[str]"]


class NeedleError(PyllmKvError, ValueError):
    """Bad needle-task settings (lengths, depths, trials)."""


# ---------------------------------------------------------------------------- settings


def parse_lengths(spec: Union[str, Sequence[Any]]) -> List[int]:
    """``"1k,2k,4096"`` -> ``[1024, 2048, 4096]`` (k = 1024 tokens), sorted, unique."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = set()
    for raw in items:
        s = str(raw).strip().lower()
        if not s:
            continue
        try:
            n = int(float(s[:-1]) * 1024) if s.endswith("k") else int(s)
        except ValueError:
            raise NeedleError(f"cannot read length {raw!r}: use tokens, e.g. 1k,2k,4096") from None
        if n < 64:
            raise NeedleError(f"length {raw!r} is too short: at least 64 tokens")
        out.add(n)
    if not out:
        raise NeedleError("no length given (e.g. --lengths 1k,2k,4k)")
    return sorted(out)


def parse_depths(spec: Union[str, Sequence[Any]]) -> List[float]:
    """``"0,0.5,1"`` -> ``[0.0, 0.5, 1.0]``: fractions of the filler before the needle."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = set()
    for raw in items:
        s = str(raw).strip()
        if not s:
            continue
        try:
            d = float(s)
        except ValueError:
            raise NeedleError(f"cannot read depth {raw!r}: use fractions 0..1, e.g. 0,0.25,0.5") from None
        if not 0.0 <= d <= 1.0 or math.isnan(d):
            raise NeedleError(f"depth {raw!r} is outside 0..1 (0 = start of the text, 1 = end)")
        out.add(d)
    if not out:
        raise NeedleError("no depth given (e.g. --depths 0,0.5,1)")
    return sorted(out)


def _default_pairs() -> List[Tuple[str, str, str]]:
    pairs = parse_formats(DEFAULT_FORMATS)
    from . import formats  # noqa: PLC0415

    keep = [p for p in pairs if _libs.has_ggml_type(formats.resolve(p[1]).ggml)]
    if len(keep) < len(pairs):
        print(f"pyllm-kv eval --task needle: skipping {', '.join(p[0] for p in pairs if p not in keep)} "
              f"(not in the native library at {_libs.lib_dir()})", file=sys.stderr)
    return keep


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------------- model side


class _Runner:
    """One loaded model: renders prompts with its chat template, answers greedily."""

    def __init__(self, model: Any, max_new_tokens: int):
        self.model = model
        self.llama = model.llama
        self.ll = _libs.llama_cpp()
        self.vocab = self.ll.llama_model_get_vocab(self.llama.model)
        self.n_vocab = int(self.llama.n_vocab())
        self.max_new_tokens = max_new_tokens
        template = (self.llama.metadata or {}).get("tokenizer.chat_template")
        self.chat = bool(template)
        if template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # noqa: PLC0415

            def text_of(tok: int) -> str:
                return self.ll.llama_vocab_get_text(self.vocab, tok).decode("utf-8") if tok >= 0 else ""

            self._formatter = Jinja2ChatFormatter(
                template=template, eos_token=text_of(int(self.ll.llama_vocab_eos(self.vocab))),
                bos_token=text_of(int(self.ll.llama_vocab_bos(self.vocab))), add_generation_prompt=True)

    def render(self, user_text: str) -> str:
        """The whole prompt: the chat template's user turn and assistant header (or,
        for a model without a template, the text itself), then the answer's start."""
        if self.chat:
            head = self._formatter(messages=[{"role": "user", "content": user_text}]).prompt
            return head + npm.ANSWER_PREFIX
        return f"{user_text}\n\n{npm.ANSWER_PREFIX}"

    def tokenize(self, text: str) -> List[int]:
        # A rendered template already holds its special tokens (BOS included when the
        # template writes one), as in llama-cpp-python's chat handlers.
        return list(self.llama.tokenize(text.encode("utf-8"), add_bos=not self.chat, special=self.chat))

    def answer(self, tokens: Sequence[int]) -> Tuple[str, float, float, int]:
        """Greedy answer after ``tokens`` from an empty cache: (text, prefill s, decode s, tokens).

        Stops at an end-of-generation token, after ``max_new_tokens``, or as soon
        as a number has been written and something else follows it (the score
        only reads the first number).
        """
        ll, llama = self.ll, self.llama
        ll.llama_memory_clear(ll.llama_get_memory(llama.ctx), True)  # also resets squat/deco side state
        llama.reset()
        t0 = time.perf_counter()
        llama.eval(list(tokens))  # batches of n_batch, logits of each batch's last token only
        t1 = time.perf_counter()
        out: List[int] = []
        text = ""
        for _ in range(self.max_new_tokens):
            row = np.ctypeslib.as_array(ll.llama_get_logits_ith(llama.ctx, -1), shape=(self.n_vocab,))
            tok = int(np.argmax(row))
            if ll.llama_vocab_is_eog(self.vocab, tok):
                break
            out.append(tok)
            text = self.model.detokenize(out)
            digits = npm.extract_answer(text)
            if digits is not None and not text.rstrip().endswith(digits):
                break  # the first number is complete
            llama.eval([tok])
        return text, t1 - t0, time.perf_counter() - t1, len(out)


def _model_info(model: Optional[PathLike]) -> Any:
    """The model's shape (path, name, trained context, heads...) from its GGUF header."""
    from .model_info import read_model_info  # noqa: PLC0415

    return read_model_info(_model_path(model))


def _load(model: Optional[PathLike], k: str, v: str, n_ctx: int, ngl: int, n_threads: Optional[int],
          verbose: bool, squat: Optional[SquatOptions]) -> Any:
    from .model import load  # noqa: PLC0415 (keeps `import pyllm_kv.needle` cheap)

    return load(model, cache_k=k, cache_v=v, flash_attn=True, n_ctx=n_ctx, n_batch=N_BATCH,
                n_gpu_layers=ngl, n_threads=n_threads, verbose=verbose, squat=squat)


# ---------------------------------------------------------------------------- evaluate


def _cell_summary(length: int, depth: float, trials: List[Dict[str, Any]]) -> Dict[str, Any]:
    n_ok = sum(1 for t in trials if t["correct"])
    pre_s = sum(t["prefill_s"] for t in trials)
    pre_tok = sum(t["prompt_tokens"] for t in trials)
    return {
        "length": length,
        "depth": depth,
        "n": len(trials),
        "correct": n_ok,
        "accuracy": n_ok / len(trials) if trials else None,
        "prompt_tokens_mean": pre_tok / len(trials) if trials else None,
        "seconds": sum(t["prefill_s"] + t["decode_s"] for t in trials),
        "prefill_tok_s": pre_tok / pre_s if pre_s > 0 else None,
        "trials": trials,
    }


def _format_summary(rec: Dict[str, Any]) -> None:
    """Per-format totals from its cells (overall, per length, per depth)."""
    cells = rec["cells"]

    def acc(sel: List[Dict[str, Any]]) -> Optional[float]:
        n = sum(c["n"] for c in sel)
        return sum(c["correct"] for c in sel) / n if n else None

    rec["accuracy"] = acc(cells)
    rec["accuracy_by_length"] = {str(L): acc([c for c in cells if c["length"] == L])
                                 for L in sorted({c["length"] for c in cells})}
    rec["accuracy_by_depth"] = {f"{d:g}": acc([c for c in cells if c["depth"] == d])
                                for d in sorted({c["depth"] for c in cells})}
    pre_s = sum(t["prefill_s"] for c in cells for t in c["trials"])
    pre_tok = sum(t["prompt_tokens"] for c in cells for t in c["trials"])
    rec["prefill_tok_s"] = pre_tok / pre_s if pre_s > 0 else None


def _same_run(old: Dict[str, Any], settings: Dict[str, Any]) -> bool:
    keys = ("model", "text", "seed", "trials", "max_new_tokens", "needle", "instruction", "question",
            "answer_prefix", "n_batch", "squat", "env")
    return all(old.get("settings", {}).get(k) == settings.get(k) for k in keys)


def evaluate(
    model: Optional[PathLike] = None,
    formats: Union[str, Sequence[str], None] = None,  # noqa: A002 (same name as eval.evaluate)
    lengths: Union[str, Sequence[int]] = DEFAULT_LENGTHS,
    depths: Union[str, Sequence[float]] = DEFAULT_DEPTHS,
    trials: int = 3,
    seed: int = 0,
    text: Optional[PathLike] = None,
    ngl: int = 0,
    n_threads: Optional[int] = None,
    max_new_tokens: int = 16,
    json_out: Optional[PathLike] = None,
    resume: bool = False,
    progress: bool = True,
    verbose: bool = False,
    squat: Optional[SquatOptions] = None,
    on_cell: Optional[Callable[[Dict[str, Any]], None]] = None,
) -> Dict[str, Any]:
    """Passkey retrieval accuracy per format, length and depth; returns the report dict.

    ``formats`` as for :func:`pyllm_kv.eval.evaluate` (``None`` = :data:`DEFAULT_FORMATS`
    the library has); ``lengths`` in prompt tokens (``"1k,2k"`` or ints); ``depths``
    fractions 0..1; ``trials`` prompts per cell (passkeys and filler offsets from
    ``seed``, identical for every format). ``json_out``: rewritten after every
    cell; with ``resume`` the cells already in it (same settings) are kept and
    not run again. ``complete`` is False if the run was interrupted (Ctrl-C).
    """
    # -- everything that can fail cheaply, before any model run
    pairs = _default_pairs() if formats is None else parse_formats(formats)
    _check_available(pairs)
    lengths_l, depths_l = parse_lengths(lengths), parse_depths(depths)
    if int(trials) < 1:
        raise NeedleError(f"trials must be >= 1, got {trials}")
    if int(max_new_tokens) < 1:
        raise NeedleError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    trials, max_new_tokens = int(trials), int(max_new_tokens)
    info = _model_info(model)
    model_path, model_name, n_ctx_train = str(info.path), info.name, int(info.n_ctx_train or 0)
    for _, k, v in pairs:
        validate_config(info, k, v, True)  # head_dim vs block size, before any load
    if n_ctx_train and lengths_l[-1] + max_new_tokens > n_ctx_train:
        raise NeedleError(f"length {lengths_l[-1]} (+{max_new_tokens} answer tokens) is beyond "
                          f"{Path(model_path).name}'s trained context of {n_ctx_train} tokens")
    if text is None:
        body, text_source = corpus.load_text(), corpus.describe()
    else:
        body, text_source = corpus.read_text_file(text), {"path": str(Path(text).resolve())}
    lines = npm.filler_lines(body)
    starts = npm.paragraph_starts(lines)
    n_ctx = -(-(lengths_l[-1] + max_new_tokens) // 256) * 256
    if n_threads is None:
        n_threads = os.cpu_count() or 1
    squat_settings = _squat_settings(squat)
    bits = {label: _bits_record(info, k, v, n_ctx, squat_settings) for label, k, v in pairs}

    settings: Dict[str, Any] = {
        "model": model_path,
        "model_name": model_name,
        "n_ctx_train": n_ctx_train,
        "text": text_source,
        "lengths": lengths_l,
        "depths": depths_l,
        "trials": trials,
        "seed": int(seed),
        "needle": npm.NEEDLE,
        "instruction": npm.INSTRUCTION,
        "question": npm.QUESTION,
        "answer_prefix": npm.ANSWER_PREFIX,
        "scoring": "greedy answer; correct if its first run of digits equals the passkey",
        "max_new_tokens": max_new_tokens,
        "n_ctx": n_ctx,
        "n_batch": N_BATCH,
        "n_gpu_layers": int(ngl),
        "n_threads": n_threads,
        "flash_attn": True,
        # the SQuat settings every context gets (options over environment over defaults)
        "squat": squat_settings,
        "env": _numerics_env(),
        "lib_dir": str(_libs.lib_dir()),
        "formats": [label for label, _, _ in pairs],
    }
    old_cells: Dict[Tuple[str, int, float], Dict[str, Any]] = {}
    old_recs: Dict[str, Dict[str, Any]] = {}
    if resume and json_out and Path(json_out).is_file():
        old = json.loads(Path(json_out).read_text())
        if not _same_run(old, settings):
            raise NeedleError(f"--resume: {json_out} was written with other settings (model, seed, "
                              "trials, prompt text...); use another --json file or drop --resume")
        for r in old.get("results", []):
            old_recs[r["format"]] = r
            for c in r.get("cells", []):
                old_cells[(r["format"], c["length"], c["depth"])] = c

    t_start = time.perf_counter()
    results: List[Dict[str, Any]] = []
    result: Dict[str, Any] = {
        "tool": "pyllm-kv eval --task needle", "version": _version(), "settings": settings,
        "results": results, "complete": False, "interrupted": False,
    }

    def save() -> None:
        result["elapsed_s"] = time.perf_counter() - t_start
        result["peak_rss_mib"] = peak_rss_mib()
        if json_out:
            report_io.write_json(result, json_out)

    grid = [(L, d) for L in lengths_l for d in depths_l]
    bar = _progress(len(pairs) * len(grid) * trials, progress)
    prompts: Dict[Tuple[int, float, int], Tuple[List[int], npm.NeedlePrompt]] = {}
    interrupted = False
    try:
        for label, k, v in pairs:
            rec: Dict[str, Any] = {"format": label, "cache_k": k, "cache_v": v}
            # a resumed format keeps what its earlier run recorded (bits, load time) until reloaded
            rec.update({key: val for key, val in old_recs.get(label, {}).items() if key not in rec})
            rec["cells"] = []
            results.append(rec)
            todo = [(L, d) for L, d in grid if (label, L, d) not in old_cells]
            runner = None
            try:
                rec.update(bits[label])
                if todo:
                    bar.set_postfix_str(f"{label}: loading", refresh=True)
                    t0 = time.perf_counter()
                    runner = _Runner(_load(model, k, v, n_ctx, ngl, n_threads, verbose, squat), max_new_tokens)
                    rec["load_s"] = time.perf_counter() - t0
                    settings.setdefault("chat_template", runner.chat)
                for L, d in grid:
                    if (label, L, d) in old_cells:
                        rec["cells"].append(old_cells[(label, L, d)])
                        bar.update(trials)
                        continue
                    done = []
                    for tr in npm.make_trials(L, d, trials, seed, starts):
                        bar.set_postfix_str(f"{label} {L} tok depth {d:g}", refresh=False)
                        key = (L, d, tr.index)
                        if key not in prompts:  # the same prompt tokens for every format
                            try:
                                p = npm.build_prompt(lines, tr, runner.tokenize, runner.render)
                            except ValueError as exc:  # a length too short for the question itself
                                raise NeedleError(str(exc)) from None
                            prompts[key] = (runner.tokenize(p.text), p)
                        tokens, p = prompts[key]
                        ans, pre_s, dec_s, n_new = runner.answer(tokens)
                        done.append({
                            "trial": tr.index, "passkey": tr.passkey, "start_line": tr.start_line,
                            "prompt_tokens": len(tokens), "filler_lines": p.n_filler_lines,
                            "needle_after_line": p.needle_line, "depth_actual": round(p.depth_actual, 4),
                            "answer": ans, "extracted": npm.extract_answer(ans),
                            "correct": npm.is_correct(ans, tr.passkey),
                            "prefill_s": pre_s, "decode_s": dec_s, "new_tokens": n_new,
                        })
                        bar.update(1)
                    cell = _cell_summary(L, d, done)
                    rec["cells"].append(cell)
                    _format_summary(rec)
                    save()
                    if on_cell is not None:
                        on_cell(cell)
                _format_summary(rec)
                rec["peak_rss_mib"] = peak_rss_mib()
            finally:
                if runner is not None:
                    runner.model.close()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    for rec in results:
        _format_summary(rec)
    n_cells = sum(len(r["cells"]) for r in results)
    result["complete"] = (not interrupted) and n_cells == len(pairs) * len(grid)
    result["interrupted"] = interrupted
    save()
    return result


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm  # noqa: PLC0415

    return tqdm(total=total, desc="needle", unit="prompt", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} "
                "[{elapsed}<{remaining}, {rate_fmt}] {postfix}")


# ---------------------------------------------------------------------------- outputs


def _len_label(n: int) -> str:
    return f"{n / 1024:g}k" if n % 256 == 0 else str(n)  # 1k, 31.5k, 1000


def _acc_cell(cells: List[Dict[str, Any]]) -> str:
    n = sum(c["n"] for c in cells)
    if not n:
        return "–"
    ok = sum(c["correct"] for c in cells)
    return f"{100 * ok / n:.0f}% ({ok}/{n})"


def format_table(result: Dict[str, Any]) -> str:
    """Markdown: accuracy per format and length, then per format, depth and length."""
    s = result["settings"]
    lengths, depths = s["lengths"], s["depths"]
    head = (f"**{Path(s['model']).name}**, passkey retrieval, {s['trials']} trial(s) per cell, "
            f"seed {s['seed']}, greedy, flash attention on, n_batch {s['n_batch']}"
            + ("" if result.get("complete", True) else " — **partial results**"))
    cols = ["format", "bits/value"] + [_len_label(L) for L in lengths] + ["all"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
    for r in result["results"]:
        bpv = f"{r['bits_per_value']:.3g}" if r.get("bits_per_value") is not None else "–"
        row = [r["format"], bpv] + [_acc_cell([c for c in r["cells"] if c["length"] == L]) for L in lengths]
        lines.append("| " + " | ".join(row + [_acc_cell(r["cells"])]) + " |")
    cols = ["format", "depth"] + [_len_label(L) for L in lengths]
    lines += ["", "| " + " | ".join(cols) + " |", "|" + "|".join(["---", "---:"] + ["---:"] * len(lengths)) + "|"]
    for r in result["results"]:
        for d in depths:
            row = [r["format"], f"{d:g}"] + [_acc_cell([c for c in r["cells"] if c["length"] == L and c["depth"] == d])
                                             for L in lengths]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(result: Dict[str, Any], path: PathLike) -> Path:
    """Heatmap PNG: accuracy over depth (rows) x length (columns), one panel per format."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    s = result["settings"]
    lengths, depths, recs = s["lengths"], s["depths"], result["results"]
    n = max(len(recs), 1)
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    # one thin extra column holds the colour bar (plain grid axes suit tight_layout)
    fig = plt.figure(figsize=(max(6.0, 1.6 + 1.15 * len(lengths) * ncols), 1.0 + 0.55 * len(depths) * nrows), dpi=120)
    gs = fig.add_gridspec(nrows, ncols + 1, width_ratios=[1.0] * ncols + [0.05])
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="#dddddd")  # grey: cell not run
    im = None
    for i in range(nrows * ncols):
        ax = fig.add_subplot(gs[i // ncols, i % ncols])
        if i >= len(recs):
            ax.axis("off")
            continue
        r = recs[i]
        grid = np.full((len(depths), len(lengths)), np.nan)
        labels = [["–" for _ in lengths] for _ in depths]
        for c in r["cells"]:
            if c["length"] in lengths and c["depth"] in depths and c["n"]:
                y, x = depths.index(c["depth"]), lengths.index(c["length"])
                grid[y, x] = c["accuracy"]
                labels[y][x] = f"{c['correct']}/{c['n']}"
        im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        for y in range(len(depths)):
            for x in range(len(lengths)):
                ax.text(x, y, labels[y][x], ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [_len_label(L) for L in lengths], fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=8)
        bpv = f", {r['bits_per_value']:.3g} b/v" if r.get("bits_per_value") is not None else ""
        ax.set_title(f"{r['format']}{bpv}", fontsize=9)
        if i % ncols == 0:
            ax.set_ylabel("needle depth", fontsize=8)
        if i // ncols == nrows - 1 or i + ncols >= len(recs):
            ax.set_xlabel("prompt tokens", fontsize=8)
    fig.suptitle(f"{Path(s['model']).name}: passkey found, {s['trials']} trial(s) per cell", fontsize=10)
    if im is not None:
        cbar = fig.colorbar(im, cax=fig.add_subplot(gs[:, ncols]))
        cbar.set_label("accuracy", fontsize=8)
        cbar.ax.tick_params(labelsize=8)
    return report_io.save_figure(fig, path)


# ---------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``pyllm-kv eval --task needle``."""
    parser.add_argument("--model", "-m", default=None,
                        help="GGUF model, an instruct model with a chat template (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--formats", default=None,
                        help="comma-separated cache formats; 'X' = K and V in X, 'K/V' names them apart "
                             f"(default: {','.join(DEFAULT_FORMATS)}, those the library has)")
    parser.add_argument("--lengths", default=",".join(_len_label(L) for L in DEFAULT_LENGTHS),
                        help="prompt lengths in tokens, k = 1024 (default: %(default)s)")
    parser.add_argument("--depths", default=",".join(f"{d:g}" for d in DEFAULT_DEPTHS),
                        help="needle depths, fractions of the filler before it (default: %(default)s)")
    parser.add_argument("--trials", type=int, default=3, help="passkeys per (length, depth) cell (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of passkeys and filler offsets (default 0)")
    parser.add_argument("--text", "-f", default=None,
                        help=f"UTF-8 filler text (default: the corpus, `{corpus.INSTALL_HINT}`)")
    parser.add_argument("--ngl", type=int, default=0, help="layers on the GPU (default 0)")
    parser.add_argument("--threads", "-t", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="answer length limit (default 16)")
    parser.add_argument("--json", dest="json_out", default=None, metavar="FILE",
                        help="JSON of every trial, rewritten after each cell")
    parser.add_argument("--plot", dest="plot_out", default=None, metavar="FILE.png",
                        help="heatmap PNG (depth x length, one panel per format)")
    parser.add_argument("--markdown", dest="md_out", default=None, metavar="FILE.md",
                        help="also write the tables to FILE")
    parser.add_argument("--resume", action="store_true",
                        help="keep the cells already in --json (same settings) and run only the rest")
    parser.add_argument("--report", default=None, metavar="FILE.json",
                        help="run nothing: print the tables (and --plot, --markdown) of an earlier JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    squat_options.add_arguments(parser)
    parser.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                        help="show llama.cpp's log")
    return parser


def _write_outputs(result: Dict[str, Any], json_out: Optional[PathLike], plot_out: Optional[PathLike],
                   md_out: Optional[PathLike]) -> None:
    table = format_table(result)
    report_io.emit(result, table, json_out, plot_out, plot, "pyllm-kv eval --task needle")
    if md_out:
        p = Path(md_out)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(table + "\n")
        print(f"wrote {p}", file=sys.stderr)


def run_cli(args: argparse.Namespace) -> int:
    """Run the needle task with parsed ``args``; returns the exit code (130 if interrupted)."""
    if args.report:
        path = Path(args.report)
        if not path.is_file():
            raise NeedleError(f"--report: no such file {path}")
        _write_outputs(json.loads(path.read_text()), None, args.plot_out, args.md_out)
        return 0
    result = evaluate(
        model=args.model, formats=args.formats, lengths=args.lengths, depths=args.depths,
        trials=args.trials, seed=args.seed, text=args.text, ngl=args.ngl, n_threads=args.threads,
        max_new_tokens=args.max_new_tokens, json_out=args.json_out, resume=args.resume,
        progress=not args.no_progress, verbose=bool(getattr(args, "verbose", False)),
        squat=squat_options.from_args(args),
    )
    # the JSON was written cell by cell already; this rewrites it whole and draws the plot
    _write_outputs(result, args.json_out, args.plot_out, args.md_out)
    print(f"peak RSS {result['peak_rss_mib']:.0f} MiB, {result['elapsed_s'] / 60:.1f} min", file=sys.stderr)
    if result["interrupted"]:
        print("interrupted: the results cover the finished cells", file=sys.stderr)
        return 130
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Standalone entry: ``python -m pyllm_kv.needle ...``."""
    parser = add_arguments(argparse.ArgumentParser(prog="pyllm-kv eval --task needle",
                                                   description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    try:
        return run_cli(args)
    except PyllmKvError as exc:
        print(f"pyllm-kv eval --task needle: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
