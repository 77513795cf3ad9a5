"""llama.cpp for ``pyllm-kv eval``: one model, one short-lived context per pass.

The model weights are loaded once (``llama_model_load_from_file``) and shared
by every cache format: llama.cpp allows any number of contexts on one model,
and a context is what carries the cache format. A :class:`FormatRunner` opens
its context when a pass over a chunk starts and frees it when the pass ends, so
at most one context (KV cache, compute buffer, logits buffer) exists at any
time, whatever the number of formats.

A chunk is decoded in slices of ``n_ubatch`` tokens, one ``llama_decode`` per
slice, asking for logits only on the scored positions; after each slice the
caller reduces the rows to statistics before the next slice overwrites them.
llama.cpp sizes its logits buffer by the outputs of one call, so it holds at
most ``n_ubatch`` rows instead of the ``ctx/2`` of a whole-chunk call. A
whole-chunk call runs the same ubatches in the same order (llama.cpp splits a
batch into ``n_ubatch`` pieces itself), so the logits are bit for bit the same.
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from . import _libs, formats, squat_options
from .errors import LlamaError, PyllmKvError
from .eval_positions import Scoring
from .squat_options import SquatOptions

#: Sliding-window (iSWA) models: every eval context gives the sliding layers the
#: full context, as pyllm_kv.load does by default (llama.cpp's default too); the
#: bits/value record (eval._bits_record -> model_info.kv_cost) counts the same caches.
SWA_FULL = True

#: Tokens per llama.cpp micro-batch (llama-cpp-python's default, what eval always used).
N_UBATCH = 512


_backend_ready = False


def n_ubatch_for(ctx: int, n_ubatch: Optional[int] = None) -> int:
    """Tokens per ``llama_decode`` call: ``n_ubatch`` (default :data:`N_UBATCH`), at most ctx.
    The squat*/deco* side state is fitted on the first of these slices of a chunk."""
    return min(N_UBATCH if n_ubatch is None else int(n_ubatch), int(ctx))


class SharedModel:
    """The weights of one GGUF, loaded once; contexts are made from it."""

    def __init__(self, path: Path, n_gpu_layers: int = 0, verbose: bool = False):
        self.ll = _libs.llama_cpp()
        from llama_cpp._logger import set_verbose  # noqa: PLC0415 (after _libs binds the library)

        global _backend_ready
        set_verbose(verbose)  # what llama_cpp.Llama does: llama.cpp's log only with --verbose
        if not _backend_ready:
            self.ll.llama_backend_init()
            _backend_ready = True
        self.path = Path(path)
        params = self.ll.llama_model_default_params()
        # llama.cpp's default is -1 (all layers on the GPU, when there is one); ours is the caller's.
        params.n_gpu_layers = int(n_gpu_layers)
        self.model = self.ll.llama_model_load_from_file(str(self.path).encode("utf-8"), params)
        if not self.model:
            self.model = None
            raise LlamaError(f"llama.cpp could not load {self.path} (n_gpu_layers={n_gpu_layers}). "
                             "Run again with --verbose to see llama.cpp's log.")
        self.vocab = self.ll.llama_model_get_vocab(self.model)
        self.n_vocab = int(self.ll.llama_vocab_n_tokens(self.vocab))
        self.add_bos = bool(self.ll.llama_vocab_get_add_bos(self.vocab))
        self.bos = int(self.ll.llama_vocab_bos(self.vocab))

    def close(self) -> None:
        if self.model is not None:
            self.ll.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> "SharedModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def tokenize(self, text: str, add_bos: bool) -> np.ndarray:
        """Token ids of ``text`` (no special-token parsing, as Llama.tokenize)."""
        data = text.encode("utf-8")
        n_max = len(data) + 8  # a token covers at least one byte; room for BOS/EOS
        buf = (ctypes.c_int32 * n_max)()
        n = self.ll.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_bos, False)
        if n < 0:  # too small after all: llama.cpp says how many it needs
            n_max = -n
            buf = (ctypes.c_int32 * n_max)()
            n = self.ll.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_bos, False)
            if n < 0:
                raise PyllmKvError(f"llama.cpp could not tokenize the text ({n})")
        return np.frombuffer(buf, dtype=np.int32, count=n).copy()


class FormatRunner:
    """Decodes chunks with one cache format K/V, in a context of the shared model
    that exists only while :meth:`run` is being iterated."""

    def __init__(self, shared: SharedModel, label: str, type_k: int, type_v: int, ctx: int,
                 n_threads: int, squat: Optional[SquatOptions] = None, scoring: Optional[Scoring] = None,
                 n_ubatch: Optional[int] = None):
        self.shared = shared
        self.ll = shared.ll
        self.label = label
        self.type_k, self.type_v = int(type_k), int(type_v)
        self.ctx = int(ctx)
        self.scoring = Scoring.default(self.ctx) if scoring is None else scoring
        self.n_ubatch = n_ubatch_for(self.ctx, n_ubatch)
        self.n_threads = int(n_threads)
        self.squat = squat
        self.n_ctx_allocated: Optional[int] = None  # what llama.cpp made of ctx (it rounds up)
        self.seconds = 0.0
        self.tokens_decoded = 0

    def _context_params(self) -> Any:
        ll = self.ll
        p = ll.llama_context_default_params()
        # The settings llama_cpp.Llama(n_ctx=ctx, n_batch=ctx, flash_attn=True, ...) gave
        # earlier versions of eval, so the numbers do not move.
        p.n_ctx = self.ctx
        p.n_batch = self.ctx
        p.n_ubatch = self.n_ubatch
        p.n_threads = self.n_threads
        p.n_threads_batch = self.n_threads
        p.rope_scaling_type = ll.LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED
        p.pooling_type = ll.LLAMA_POOLING_TYPE_UNSPECIFIED
        p.attention_type = ll.LLAMA_ATTENTION_TYPE_UNSPECIFIED
        p.rope_freq_base = 0.0
        p.rope_freq_scale = 0.0
        p.yarn_ext_factor = -1.0
        p.yarn_attn_factor = 1.0
        p.yarn_beta_fast = 32.0
        p.yarn_beta_slow = 1.0
        p.yarn_orig_ctx = 0
        p.embeddings = False
        p.offload_kqv = True
        p.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED
        p.swa_full = SWA_FULL
        p.type_k = self.type_k
        p.type_v = self.type_v
        p.no_perf = False
        return p

    def _open(self) -> Any:
        with squat_options.applied(self.squat):  # SQuat settings are read when the context is made
            ctx = self.ll.llama_init_from_model(self.shared.model, self._context_params())
        if not ctx:
            raise LlamaError(
                f"llama.cpp could not create a context with cache {self.label} (n_ctx={self.ctx}, "
                "flash attention on). Run again with --verbose to see llama.cpp's log.")
        self.n_ctx_allocated = int(self.ll.llama_n_ctx(ctx))
        return ctx

    def run(self, tokens: np.ndarray) -> Iterator[Tuple[int, np.ndarray]]:
        """Decode one chunk from an empty cache, ``n_ubatch`` tokens per call.

        Yields ``(row, logits)`` for every slice with scored positions: ``logits``
        is a float32 view (rows x n_vocab) of llama.cpp's buffer for scored rows
        ``row, row+1, ...`` (row r = the r-th of ``scoring.positions()``; by
        default position ctx/2 + r), valid until the next step.
        """
        ll, n = self.ll, len(tokens)
        pos = self.scoring.positions()
        scored = np.zeros(n, dtype=bool)
        scored[pos[pos < n - 1]] = True
        rank = np.cumsum(scored) - 1  # row of each scored position
        step = self.n_ubatch
        n_vocab = self.shared.n_vocab
        ctx = self._open()
        batch = ll.llama_batch_init(step, 0, 1)
        try:
            for s in range(0, n, step):
                e = min(n, s + step)
                batch.n_tokens = e - s
                for j, i in enumerate(range(s, e)):
                    batch.token[j] = int(tokens[i])
                    batch.pos[j] = i
                    batch.n_seq_id[j] = 1
                    batch.seq_id[j][0] = 0
                    batch.logits[j] = 1 if scored[i] else 0
                t0 = time.perf_counter()
                rc = ll.llama_decode(ctx, batch)
                self.seconds += time.perf_counter() - t0
                if rc != 0:
                    raise PyllmKvError(f"llama_decode failed (rc={rc}) for cache {self.label}")
                self.tokens_decoded += e - s
                k = int(scored[s:e].sum())
                if k:
                    ptr = ll.llama_get_logits(ctx)
                    rows = np.ctypeslib.as_array(ptr, shape=(k * n_vocab,)).reshape(k, n_vocab)
                    yield int(rank[s:e][scored[s:e]][0]), rows
        finally:
            ll.llama_batch_free(batch)
            ll.llama_free(ctx)


def type_ids(pairs: Sequence[Tuple[str, str, str]]) -> List[Tuple[int, int]]:
    """ggml type ids of each (label, K, V) (the caller has checked that the library has them)."""
    return [(_libs.ggml_type_id(formats.resolve(k).ggml), _libs.ggml_type_id(formats.resolve(v).ggml))
            for _, k, v in pairs]
