"""Save what a model's context holds to a file, and continue from it later,
in the same or another process.

    m = pyllm_kv.load(cache_k="kv4", cache_v="kv4", n_ctx=1024)
    m.prefill("A long document ... Question: ...")
    first = m.resume(max_tokens=32)
    m.save_state("doc.pkvs")
    # later, anywhere, with the same model file, cache formats and flash_attn:
    m2 = pyllm_kv.load(cache_k="kv4", cache_v="kv4", n_ctx=1024)
    m2.load_state("doc.pkvs")
    more = m2.resume(max_tokens=32)    # = what m.resume(max_tokens=64) would have added

A *session* is a token sequence whose last token is *pending*: the KV cache holds
the rows of every token but the last, and :func:`resume` first decodes the pending
token alone (a batch of one), then samples. llama.cpp's state does not store
logits; with a pending token none are needed, and a resumed run does the same
computation as an uninterrupted one, since every token after the prompt is decoded
alone in both. (The prompt's last token is decoded alone too, so ``prefill`` +
``resume`` can differ in the last float bits from :meth:`Model.generate`, which
decodes the whole prompt in one batch.)

File layout (integers little-endian)::

    8 bytes     magic b"PKVSTATE"
    u32         layout version (1)
    u32         header length H
    H bytes     header: UTF-8 JSON (model fingerprint, cache formats and their ggml
                layout, flash_attn, n_ctx, token count, state size)
    4*n bytes   the session's tokens (int32)
    S bytes     llama.cpp's state (llama_state_get_data: model arch + KV cache)
    u32         CRC-32 of everything before it

The sizes and the CRC are verified, then every header field is checked, before
llama.cpp reads a byte of its state: llama.cpp itself checks little (type ids and row sizes, not
the model's weights), so a state from another model would load and continue as
garbage.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import struct
import zlib
from array import array
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Union

from . import _libs, checks, formats
from .errors import ContextOverflow, PyllmKvError, StateFileError, StateMismatch

if TYPE_CHECKING:
    from .model import Model

MAGIC = b"PKVSTATE"
VERSION = 1
# A header is a few hundred bytes; anything above this is not one of ours.
MAX_HEADER = 1 << 20
# llama.cpp's own session files (llama_state_save_file) start with 'ggsn' as a u32.
LLAMA_SESSION_MAGIC = struct.pack("<I", 0x6767736E)
# Bytes hashed at each end of the model file for its fingerprint (see _fingerprint).
FINGERPRINT_SPAN = 4 << 20

PathLike = Union[str, "os.PathLike[str]"]


# ---- the session -------------------------------------------------------------------


def _session(model: "Model") -> List[int]:
    """The model's session tokens, if the context still holds them.

    generate()/stream()/chat()/logits() start from an empty cache and leave other
    tokens in it; we notice that from llama-cpp-python's own bookkeeping.
    """
    llama = model._open()
    tokens: Optional[List[int]] = getattr(model, "_session", None)
    if tokens:
        n = len(tokens) - 1
        if llama.n_tokens == n and list(llama.input_ids[:n]) == tokens[:-1]:
            return tokens
    raise PyllmKvError(
        "this model has no session to continue or save: call model.prefill(prompt) or "
        "model.load_state(path) first (generate(), stream(), chat() and logits() start "
        "from an empty cache and end any session)."
    )


def tokens(model: "Model") -> List[int]:
    """The tokens of the model's current session (the last one is not yet decoded)."""
    return list(_session(model))


def prefill(model: "Model", prompt: str) -> int:
    """Empty the cache and start a session with ``prompt``; returns its token count."""
    toks = model._check_prompt(prompt)  # InvalidPrompt (empty), ContextOverflow
    llama = model._open()
    model._session = None
    llama.reset()  # only rewinds llama-cpp-python's counter; the cells stay until the next eval
    lcpp = _libs.llama_cpp()
    lcpp.llama_memory_clear(lcpp.llama_get_memory(llama.ctx), True)
    if len(toks) > 1:
        llama.eval(toks[:-1])
    model._session = toks
    return len(toks)


def resume(model: "Model", max_tokens: Optional[int] = 64, temperature: float = 0.0, top_p: float = 0.95,
           top_k: int = 40, seed: Optional[int] = None) -> str:
    """Generate after the session's tokens; the new tokens join the session.

    Stops at an end-of-generation token (kept in the session, not in the text), after
    ``max_tokens`` (None: no limit) or when the cache is full.
    """
    llama = model._open()
    max_tokens, temperature, top_p, top_k, seed, _ = checks.sampling(
        max_tokens, temperature, top_p, top_k, seed, None)
    toks = _session(model)
    # Each new token needs a free cell for the token before it (the pending one first).
    room = llama.n_ctx() - (len(toks) - 1)
    if room <= 0:
        raise ContextOverflow(
            f"the context is full: the session holds {len(toks)} tokens and the context holds "
            f"{llama.n_ctx()}. Load the model with a larger n_ctx and prefill again."
        )
    limit = room if max_tokens is None else min(max_tokens, room)
    if limit == 0:
        return ""
    lcpp = _libs.llama_cpp()
    vocab = llama._model.vocab
    llama.set_seed(model.seed if seed is None else seed)
    new: List[int] = []
    model._session = None  # until the cache and the token list agree again
    gen = llama.generate([toks[-1]], reset=False, temp=temperature, top_k=top_k, top_p=top_p,
                         repeat_penalty=1.0)
    try:
        for tok in gen:
            new.append(int(tok))
            if lcpp.llama_vocab_is_eog(vocab, tok) or len(new) >= limit:
                break
    finally:
        gen.close()  # the last token stays pending: not decoded
    model._session = toks + new
    if new and lcpp.llama_vocab_is_eog(vocab, new[-1]):
        new = new[:-1]
    return llama.detokenize(new, prev_tokens=toks).decode("utf-8", errors="replace")


# ---- the file ------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _fingerprint_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(FINGERPRINT_SPAN))
        if size > 2 * FINGERPRINT_SPAN:
            fh.seek(size - FINGERPRINT_SPAN)
        h.update(fh.read(FINGERPRINT_SPAN))
    return h.hexdigest()


def _fingerprint(path: str) -> str:
    """SHA-256 of the model file's size, first and last 4 MiB.

    The GGUF header (architecture, shapes, tokenizer) and the last tensors: enough to
    tell two models apart, and cheap for a multi-GB file. It does not detect a
    bit flip in the middle of the weights.
    """
    st = os.stat(path)
    return _fingerprint_cached(path, st.st_size, st.st_mtime_ns)


def _ggml_layout(fmt_name: str) -> Dict[str, Any]:
    """How this build stores a format: its type id and bytes per block (the raw state
    records type ids and row sizes, which shift when a build adds or changes types)."""
    t = _libs.ggml_types()[formats.resolve(fmt_name).ggml]
    return {"name": t.name, "id": t.id, "block": t.block_size, "type_size": t.type_size}


def _header_for(model: "Model", n_tokens: int, state_bytes: int) -> Dict[str, Any]:
    from . import __version__  # noqa: PLC0415

    info = model.info
    return {
        "pyllm_kv_state": VERSION,
        "pyllm_kv_version": __version__,
        "model": {"name": info.name, "path": info.path, "size": os.path.getsize(info.path),
                  "fingerprint": _fingerprint(info.path)},
        "arch": info.arch,
        "cache_k": model.cache_k.name,
        "cache_v": model.cache_v.name,
        "ggml_k": _ggml_layout(model.cache_k.name),
        "ggml_v": _ggml_layout(model.cache_v.name),
        "flash_attn": bool(model.flash_attn),
        "squat": getattr(model, "squat_settings", None),
        "n_ctx": model.n_ctx,
        "n_tokens": n_tokens,
        "state_bytes": state_bytes,
    }


def save_state(model: "Model", path: PathLike) -> None:
    """Write the model's session (tokens + KV cache) to ``path``.

    The file is written next to ``path`` and renamed into place, so a crash never
    leaves a half-written state under the final name.
    """
    llama = model._open()
    toks = _session(model)
    lcpp = _libs.llama_cpp()
    size = lcpp.llama_state_get_size(llama.ctx)
    buf = (ctypes.c_uint8 * size)()
    n = lcpp.llama_state_get_data(llama.ctx, buf, size)
    if n == 0 or n > size:
        raise PyllmKvError(f"llama.cpp could not copy its state ({n} of {size} bytes).")
    token_bytes = array("i", toks).tobytes()
    state = memoryview(buf)[:n]
    header = json.dumps(_header_for(model, len(toks), n), sort_keys=True).encode("utf-8")
    start = MAGIC + struct.pack("<II", VERSION, len(header)) + header
    crc = zlib.crc32(state, zlib.crc32(token_bytes, zlib.crc32(start)))

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(start)
            fh.write(token_bytes)
            fh.write(state)
            fh.write(struct.pack("<I", crc))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StateFileError(f"cannot write state file {path}: {exc.strerror or exc}.") from exc


def read_header(path: PathLike) -> Dict[str, Any]:
    """The header of a state file (StateFileError if it is not one)."""
    with _open(Path(path)) as fh:
        return _read_header(fh, Path(path))[0]


def _open(path: Path) -> Any:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise StateFileError(f"state file not found: {path}.") from None
    except IsADirectoryError:
        raise StateFileError(f"{path} is a directory, not a state file.") from None
    except OSError as exc:
        raise StateFileError(f"cannot read state file {path}: {exc.strerror or exc}.") from exc


def _read_header(fh: Any, path: Path) -> "tuple[Dict[str, Any], bytes]":
    """The parsed header, and the raw bytes read so far (for the CRC)."""
    start = fh.read(len(MAGIC) + 8)
    if not start:
        raise StateFileError(f"{path} is empty, not a pyllm-kv state file.")
    if start[:4] == LLAMA_SESSION_MAGIC:
        raise StateFileError(
            f"{path} is a llama.cpp session file (llama_state_save_file), not a pyllm-kv state "
            "file: it records neither the cache formats nor the model, so pyllm-kv does not "
            "load it. Save states with Model.save_state()."
        )
    if len(start) < len(MAGIC) and MAGIC.startswith(start):
        raise StateFileError(f"{path} is truncated: it ends inside the magic ({len(start)} bytes).")
    if start[:len(MAGIC)] != MAGIC:
        raise StateFileError(
            f"{path} is not a pyllm-kv state file (starts with {start[:8]!r}, expected {MAGIC!r})."
        )
    if len(start) < len(MAGIC) + 8:
        raise StateFileError(f"{path} is truncated: it ends inside the file header ({len(start)} bytes).")
    version, hlen = struct.unpack("<II", start[len(MAGIC):])
    if version != VERSION:
        raise StateFileError(
            f"{path} uses state layout version {version}; this pyllm-kv reads version {VERSION}. "
            "Save the state again with this version."
        )
    if hlen > MAX_HEADER:
        raise StateFileError(f"{path} is corrupt: header length {hlen} is implausible.")
    raw = fh.read(hlen)
    if len(raw) < hlen:
        raise StateFileError(f"{path} is truncated: it ends inside the header ({len(raw)} of {hlen} bytes).")
    try:
        header = json.loads(raw.decode("utf-8"))
        int(header["n_tokens"]), int(header["state_bytes"])
        header["model"]["fingerprint"], header["cache_k"], header["cache_v"]
    except (ValueError, KeyError, TypeError) as exc:
        raise StateFileError(f"{path} is corrupt: unreadable header ({exc}).") from None
    return header, start + raw


def _check_compatible(model: "Model", header: Dict[str, Any], path: Path) -> None:
    """StateMismatch unless the state was saved with this model, formats and layout."""
    saved = header["model"]
    if saved.get("fingerprint") != _fingerprint(model.info.path):
        raise StateMismatch(
            f"{path} was saved with another model ({saved.get('name')!r}, {saved.get('path')}, "
            f"{saved.get('size')} bytes); this model is {model.info.name!r} ({model.info.path}). "
            "Load the model the state was saved with."
        )
    have = (model.cache_k.name, model.cache_v.name)
    want = (header["cache_k"], header["cache_v"])
    if have != want:
        raise StateMismatch(
            f"{path} holds a K={want[0]} V={want[1]} cache, but this model was loaded with "
            f"K={have[0]} V={have[1]}. Load it with cache_k={want[0]!r}, cache_v={want[1]!r}."
        )
    for key, name in (("ggml_k", have[0]), ("ggml_v", have[1])):
        if header.get(key) != _ggml_layout(name):
            raise StateMismatch(
                f"{path} was saved by a native build whose {name!r} type differs from this one's "
                f"(saved {header.get(key)}, here {_ggml_layout(name)}). A state file loads only "
                "into a build with the same type table; save it again with this build."
            )
    if bool(header.get("flash_attn")) != bool(model.flash_attn):
        raise StateMismatch(
            f"{path} was saved with flash_attn={header.get('flash_attn')}, this model has "
            f"flash_attn={model.flash_attn} (the V cache layout differs). Load it with "
            f"flash_attn={header.get('flash_attn')}."
        )
    have_sq, want_sq = getattr(model, "squat_settings", None), header.get("squat")
    if have_sq != want_sq:
        raise StateMismatch(
            f"{path} was saved with SQuat settings {want_sq}, this model has {have_sq} (the "
            "query-subspace side state differs). Load it with pyllm_kv.SquatOptions("
            + ", ".join(f"{k}={want_sq[k]!r}" for k in ("rank", "lam", "normalize", "transform", "center")
                        if want_sq and k in want_sq) + ")."
        )
    cells = int(header["n_tokens"]) - 1
    if cells > model.n_ctx:
        raise StateMismatch(
            f"{path} holds {cells} cached tokens (saved with n_ctx={header.get('n_ctx')}), more than "
            f"this context's n_ctx={model.n_ctx}. Load the model with n_ctx >= {cells}."
        )


def load_state(model: "Model", path: PathLike) -> int:
    """Replace the model's cache with the state in ``path``; returns the session's token count.

    Raises StateFileError (not a state file, truncated, corrupt) or StateMismatch
    (another model, cache format, flash_attn, build, or a context too small), with
    the model's cache unchanged; if llama.cpp still refuses the state, the cache is
    left empty.
    """
    llama = model._open()
    path = Path(path)
    with _open(path) as fh:
        header, head = _read_header(fh, path)
        n_tokens, n_state = int(header["n_tokens"]), int(header["state_bytes"])
        if n_tokens < 1 or n_state < 1:
            raise StateFileError(f"{path} is corrupt: {n_tokens} tokens, {n_state} state bytes.")
        want = 4 * n_tokens + n_state + 4
        body = fh.read(want + 1)
    if len(body) < want:
        raise StateFileError(
            f"{path} is truncated: the header promises {want} bytes of tokens, cache and checksum, "
            f"the file has {len(body)}. Save the state again."
        )
    if len(body) > want:
        raise StateFileError(f"{path} is corrupt: data after the end of the state.")
    (crc,) = struct.unpack("<I", body[-4:])
    if zlib.crc32(body[:-4], zlib.crc32(head)) != crc:
        raise StateFileError(f"{path} is corrupt: its CRC-32 does not match the contents.")
    _check_compatible(model, header, path)
    token_bytes, state = body[:4 * n_tokens], body[4 * n_tokens:-4]
    toks = array("i")
    toks.frombytes(token_bytes)
    n_vocab = llama.n_vocab()
    if any(t < 0 or t >= n_vocab for t in toks):
        raise StateFileError(f"{path} is corrupt: token ids outside the vocabulary (0..{n_vocab - 1}).")

    lcpp = _libs.llama_cpp()
    model._session = None
    llama.reset()
    src = (ctypes.c_uint8 * n_state).from_buffer_copy(state)
    if lcpp.llama_state_set_data(llama.ctx, src, n_state) != n_state:
        # llama.cpp empties the cache when it rejects a state; so do we.
        lcpp.llama_memory_clear(lcpp.llama_get_memory(llama.ctx), True)
        raise StateFileError(
            f"llama.cpp rejected the KV cache in {path} (run with verbose=True to see why); "
            "the model's cache is now empty."
        )
    session = toks.tolist()
    llama.input_ids[: n_tokens - 1] = session[:-1]
    llama.n_tokens = n_tokens - 1
    model._session = session
    return n_tokens
