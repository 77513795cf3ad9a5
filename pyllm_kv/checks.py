"""Argument checks for :func:`pyllm_kv.load` and the generation methods.

Everything here runs before llama.cpp sees a value, because llama.cpp (through
ctypes) does not reject bad numbers: it wraps them (``n_ctx=2**32+256`` becomes
256), ignores them (``temperature=nan`` samples anyway), reinterprets them
(``stop="Paris"`` becomes five one-character stop strings) or crashes the
process (``n_batch=-5`` is a segfault). Each check raises one
:class:`InvalidParameter` / :class:`InvalidPrompt` naming the argument, the
value and what would work.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, List, Optional, Sequence

from .errors import InvalidParameter, InvalidPrompt

# llama.cpp keeps n_ctx, n_batch and seeds in uint32 fields; ctypes silently
# keeps the low 32 bits of anything larger.
UINT32_MAX = 2**32 - 1
# Positions are int32 in llama.cpp, so a context beyond this cannot be addressed.
N_CTX_MAX = 2**31 - 1


def _is_int(value: Any) -> bool:
    # bool is an int subclass; n_ctx=True is a mistake, not 1.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def integer(name: str, value: Any, minimum: int, maximum: int, hint: str = "") -> int:
    if not _is_int(value):
        raise InvalidParameter(f"{name} must be an integer, got {value!r} ({type(value).__name__}).{hint}")
    if not minimum <= value <= maximum:
        raise InvalidParameter(f"{name} must be between {minimum} and {maximum}, got {value}.{hint}")
    return int(value)


def real(name: str, value: Any, minimum: float, maximum: float = math.inf) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise InvalidParameter(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        raise InvalidParameter(f"{name} must be a finite number, got {value}.")
    if not minimum <= value <= maximum:
        upper = "" if maximum == math.inf else f" and <= {maximum:g}"
        raise InvalidParameter(f"{name} must be >= {minimum:g}{upper}, got {value:g}.")
    return value


def model_path(model: Any) -> None:
    if not isinstance(model, (str, os.PathLike)):
        raise InvalidParameter(
            f"model must be the path of a .gguf file (str or pathlib.Path) or None for the "
            f"default model, got {model!r} ({type(model).__name__})."
        )


def load_params(n_ctx: Any, n_batch: Any, n_threads: Any, n_gpu_layers: Any, seed: Any, flash_attn: Any) -> None:
    """The numeric and boolean arguments of load()."""
    integer("n_ctx", n_ctx, 0, N_CTX_MAX, " Use 0 for the model's trained context, or a positive size in tokens.")
    integer("n_batch", n_batch, 1, UINT32_MAX, " It is the number of prompt tokens per llama.cpp call (default 512).")
    if n_threads is not None:
        integer("n_threads", n_threads, 1, 4096, " Use None for llama.cpp's default.")
    # llama.cpp reads any negative n_gpu_layers as "all layers".
    integer("n_gpu_layers", n_gpu_layers, -1, 2**31 - 1,
            " Use 0 for CPU only, -1 for all layers (--ngl on the command line).")
    integer("seed", seed, 0, UINT32_MAX)
    if not isinstance(flash_attn, bool):
        # A string like "no" is truthy and would silently turn flash attention on.
        raise InvalidParameter(f"flash_attn must be True or False, got {flash_attn!r}.")


def tensor_split(weights: Any) -> List[float]:
    """load(tensor_split=): one non-negative finite weight per device, not all zero,
    at most 16 (llama.cpp's LLAMA_MAX_DEVICES; llama-cpp-python raises past it)."""
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise InvalidParameter(f"tensor_split must be a list of weights, one per device, got {weights!r}")
    out = [real("tensor_split entry", w, 0.0) for w in weights]
    if not out or len(out) > 16 or not any(out):
        raise InvalidParameter(
            f"tensor_split needs 1 to 16 weights with at least one above 0 (one per device: RPC servers "
            f"first, then local GPUs), got {list(weights)!r}")
    return out


def tensor_split_text(text: str) -> List[float]:
    """--tensor-split "1,1" -> [1.0, 1.0] (then checked by tensor_split)."""
    try:
        return tensor_split([float(w) for w in text.split(",")])
    except ValueError:
        raise InvalidParameter(f"--tensor-split takes comma-separated numbers (e.g. 1,1), got {text!r}") from None


#: llama.cpp's split modes (enum llama_split_mode), as llama-bench and llama-cli name them.
SPLIT_MODES = {"none": 0, "layer": 1, "row": 2}


def split_mode(mode: Any) -> int:
    """load(split_mode=) / --split: how offloaded layers spread over several GPUs:
    "layer" (whole layers and their KV cache per GPU, llama.cpp's default), "row"
    (weight rows across GPUs, KV on main_gpu) or "none" (everything on main_gpu);
    llama-cpp-python's integer constants are accepted too."""
    if isinstance(mode, str) and mode.strip().lower() in SPLIT_MODES:
        return SPLIT_MODES[mode.strip().lower()]
    if isinstance(mode, int) and not isinstance(mode, bool) and mode in SPLIT_MODES.values():
        return mode
    raise InvalidParameter(f"split_mode must be one of {', '.join(SPLIT_MODES)} (or 0, 1, 2), got {mode!r}")


def kv_fits_in_memory(kv_bytes: float, n_ctx: int, what: str) -> None:
    """Refuse a CPU KV cache larger than the machine's RAM.

    llama.cpp clears the cache buffer after allocating it; with Linux overcommit a
    too-large malloc can succeed and the clear then gets the process OOM-killed
    instead of failing with a message.
    """
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: no check
        return
    if total > 0 and kv_bytes > total:
        raise InvalidParameter(
            f"n_ctx={n_ctx} needs {kv_bytes / 2**30:.1f} GiB for the KV cache alone ({what}), "
            f"more than this machine's {total / 2**30:.1f} GiB of memory. Use a smaller n_ctx "
            "or a smaller cache format."
        )


def sampling(max_tokens: Any, temperature: Any, top_p: Any, top_k: Any, seed: Any,
             stop: Any) -> "tuple[Optional[int], float, float, int, Optional[int], List[str]]":
    """Checked sampling arguments; ``stop`` comes back as a list of strings."""
    if max_tokens is not None:
        integer("max_tokens", max_tokens, 0, N_CTX_MAX, " Use None to generate until the context is full.")
    temperature = real("temperature", temperature, 0.0)
    top_p = real("top_p", top_p, 0.0, 1.0)
    top_k = integer("top_k", top_k, 0, 2**31 - 1, " 0 disables top-k.")
    if seed is not None:
        integer("seed", seed, 0, UINT32_MAX)
    return max_tokens, temperature, top_p, top_k, seed, stop_list(stop)


def stop_list(stop: Any) -> List[str]:
    if stop is None:
        return []
    # A bare string is one stop sequence. list("Paris") would make five.
    items = [stop] if isinstance(stop, str) else stop
    try:
        items = list(items)
    except TypeError:
        raise InvalidParameter(f"stop must be a string or a list of strings, got {stop!r}.") from None
    for s in items:
        if not isinstance(s, str) or not s:
            raise InvalidParameter(f"stop must hold non-empty strings, got {s!r} in {stop!r}.")
    return items


def prompt_text(prompt: Any, what: str = "the prompt") -> str:
    """``prompt`` as a str that encodes to UTF-8 (str, or bytes that are valid UTF-8)."""
    if isinstance(prompt, (bytes, bytearray)):
        try:
            return bytes(prompt).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidPrompt(
                f"{what} is bytes that are not valid UTF-8 ({exc.reason} at byte {exc.start}: "
                f"{bytes(prompt)[exc.start:exc.start + 4]!r}). Decode it with its real encoding "
                "and pass a str."
            ) from None
    if not isinstance(prompt, str):
        raise InvalidPrompt(f"{what} must be a str, got {type(prompt).__name__}: {prompt!r:.80}.")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        # Lone surrogates, typically from bytes decoded with errors="surrogateescape".
        raise InvalidPrompt(
            f"{what} is not valid Unicode text: {prompt[exc.start:exc.end]!r} at position "
            f"{exc.start} ({exc.reason}). It probably came from bytes decoded with "
            "errors='surrogateescape'; decode them with their real encoding."
        ) from None
    return prompt


def messages(msgs: Any) -> List[dict]:
    """A chat message list: non-empty, each a dict with str role and str content."""
    if isinstance(msgs, (str, bytes)) or not isinstance(msgs, Sequence) or not msgs:
        raise InvalidPrompt(
            "messages must be a non-empty list of {'role': ..., 'content': ...} dicts, "
            f"got {msgs!r:.80}."
        )
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise InvalidPrompt(f"messages[{i}] needs a non-empty str 'role', got {m!r:.80}.")
        if not isinstance(m.get("content"), str):
            raise InvalidPrompt(f"messages[{i}] needs a str 'content', got {m!r:.80}.")
        prompt_text(m["content"], what=f"messages[{i}]['content']")
        out.append(m)
    return out

