"""A tiny random-weight DeepSeek-V2-style GGUF with MLA (multi-head latent
attention), written with gguf-py: llama.cpp stores one compressed K row per token
(kv_lora_rank + rope dims) and no V, and builds attention through its K-only
build_attn overload, which pyllm-kv does not wire side state into. Tests use it
to check that side-state formats are refused there instead of running plain."""

from __future__ import annotations

from pathlib import Path

import numpy as np

N_EMBD, N_HEAD, N_LAYER, N_FF, N_VOCAB = 128, 2, 2, 256, 512
# K cache row: kv_lora + rope = 128 values, "V" head (value_length) 64: both whole kv blocks
QK_NOPE, QK_ROPE, V_HEAD, KV_LORA = 32, 64, 32, 64


def write(path: Path, seed: int = 0) -> Path:
    import gguf

    from pyllm_kv.shape_model import _vocab

    rng = np.random.default_rng(seed)

    def w(*shape):  # numpy order (reversed ggml ne)
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    arch = "deepseek2"
    g = gguf.GGUFWriter(str(path), arch)
    g.add_name("tiny-mla")
    g.add_context_length(1024)
    g.add_embedding_length(N_EMBD)
    g.add_block_count(N_LAYER)
    g.add_feed_forward_length(N_FF)
    g.add_head_count(N_HEAD)
    g.add_head_count_kv(1)
    g.add_key_length(KV_LORA + QK_ROPE)
    g.add_value_length(KV_LORA)
    g.add_uint32(f"{arch}.attention.key_length_mla", QK_NOPE + QK_ROPE)
    g.add_uint32(f"{arch}.attention.value_length_mla", V_HEAD)
    g.add_rope_dimension_count(QK_ROPE)
    g.add_rope_freq_base(10000.0)
    g.add_layer_norm_rms_eps(1e-6)
    g.add_uint32(f"{arch}.leading_dense_block_count", N_LAYER)
    g.add_uint32(f"{arch}.attention.q_lora_rank", 0)
    g.add_uint32(f"{arch}.attention.kv_lora_rank", KV_LORA)
    g.add_uint32(f"{arch}.expert_feed_forward_length", N_FF)
    g.add_uint32(f"{arch}.expert_shared_count", 0)
    g.add_file_type(0)
    tokens, scores, types = _vocab(N_VOCAB)
    g.add_tokenizer_model("llama")
    g.add_token_list(tokens)
    g.add_token_scores(scores)
    g.add_token_types(types)
    g.add_bos_token_id(1)
    g.add_eos_token_id(2)
    g.add_unk_token_id(0)
    ones = lambda n: np.ones(n, dtype=np.float32)  # noqa: E731
    g.add_tensor("token_embd.weight", w(N_VOCAB, N_EMBD))
    for i in range(N_LAYER):
        p = f"blk.{i}."
        g.add_tensor(p + "attn_norm.weight", ones(N_EMBD))
        g.add_tensor(p + "attn_q.weight", w(N_HEAD * (QK_NOPE + QK_ROPE), N_EMBD))
        g.add_tensor(p + "attn_kv_a_mqa.weight", w(KV_LORA + QK_ROPE, N_EMBD))
        g.add_tensor(p + "attn_kv_a_norm.weight", ones(KV_LORA))
        g.add_tensor(p + "attn_k_b.weight", w(N_HEAD, KV_LORA, QK_NOPE))
        g.add_tensor(p + "attn_v_b.weight", w(N_HEAD, V_HEAD, KV_LORA))
        g.add_tensor(p + "attn_output.weight", w(N_EMBD, N_HEAD * V_HEAD))
        g.add_tensor(p + "ffn_norm.weight", ones(N_EMBD))
        g.add_tensor(p + "ffn_gate.weight", w(N_FF, N_EMBD))
        g.add_tensor(p + "ffn_up.weight", w(N_FF, N_EMBD))
        g.add_tensor(p + "ffn_down.weight", w(N_EMBD, N_FF))
    g.add_tensor("output_norm.weight", ones(N_EMBD))
    g.add_tensor("output.weight", w(N_VOCAB, N_EMBD))
    g.write_header_to_file()
    g.write_kv_data_to_file()
    g.write_tensors_to_file()
    g.close()
    return path
