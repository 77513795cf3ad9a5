/*
 * pyllm-kv side state: small per-layer matrices that belong to llama.cpp's KV
 * cache (not to the model) for cache types that need more than the row itself
 * to store it: DecoQuant (deco4/deco3/deco2, a per-layer transform, see
 * docs/decoquant.md) and SQuat (squat4/squat3/squat2, per layer and KV head
 * the factor of the query-subspace metric the key encoder uses, see
 * docs/squat.md). This is the hook table the patched llama.cpp calls
 * (patches/0007); the mechanism is native/llama/side_state.cpp, each method
 * one file next to it (side_deco.cpp, side_squat.cpp), and which methods a
 * cache type gets is one table there.
 *
 * Life cycle (the rule llama.cpp's patched KV cache follows):
 *   - empty after the cache is created, cleared (llama_memory_clear) or emptied
 *     (llama_memory_seq_rm leaving no cell in use);
 *   - fitted, per layer and for K and V separately (SQuat: per KV head, from
 *     the queries of its GQA group), from the rows of the FIRST ubatch that
 *     reaches that layer's attention after that (the first prefill batch; if
 *     the prompt is split into several ubatches, the first one decides and
 *     later ones reuse it), inside the graph, before those rows are stored;
 *     an iSWA model's two caches (sliding-window and full layers) fit from the
 *     same ubatch;
 *   - kept in the KV cache's own backend buffer (on the layer's device, like K
 *     and V), with a host copy for state save/restore: graphs after the fit
 *     read it there, with no host round trip;
 *   - reused unchanged by every later token (prefill or decode) and by K-shift;
 *   - saved and restored with llama_state_* (a whole-context restore replaces
 *     it; a sequence restore adopts it into an empty side state and refuses a
 *     conflicting one).
 *
 * Every graph path that stores K/V of a side-state type into a llama_kv_cache
 * must run pkv_side_attn_in first; the store hooks throw otherwise, so an
 * unwired path (MLA, ...) fails at context creation with a message naming the
 * cache type instead of silently storing plain rows.
 */
#pragma once

#include "ggml.h"

#include <cstddef>
#include <cstdint>

struct pkv_side_state;

/* Tensors the side state may add to the KV cache's ggml context per layer
 * (the cache sizes its context with this). */
#define PKV_SIDE_MAX_TENSORS_PER_LAYER 8

/* nullptr when neither cache type needs side state. n_layer: the model's layer
 * count (layers are indexed by model layer id). Throws std::runtime_error with
 * a message naming the problem for bad settings (PYLLM_KV_* environment). */
pkv_side_state * pkv_side_create(ggml_type type_k, ggml_type type_v, int n_layer);
void pkv_side_free(pkv_side_state * s);
struct pkv_side_deleter { void operator()(pkv_side_state * s) const { pkv_side_free(s); } };

/* The cache holds layer il: create its side-state tensors in ctx (the context
 * of that layer's K/V buffer type, so they live on the layer's device). has_v:
 * the cache stores V rows for this layer (not MLA). Throws std::runtime_error
 * naming the cache type for a layer it cannot serve (head size, no V). */
void pkv_side_add_layer(pkv_side_state * s, ggml_context * ctx, int il, int64_t head_dim_k,
                        int64_t head_dim_v, int64_t n_head_kv, bool has_v);

/* Refusals for cache configurations the side state does not serve; each throws
 * std::runtime_error naming the cache type. s may be nullptr (no-op). */
void pkv_side_refuse(const pkv_side_state * s, const char * what);

/* One line for the log: types, group size, variant. */
const char * pkv_side_describe(const pkv_side_state * s);

/* Should upstream's Hadamard rotation stay on for this cache's K (or V)? Yes
 * unless the side state transforms those rows itself (deco*, or squat* on the
 * deco transform), unless the environment asks for both
 * (PYLLM_KV_DECO_HADAMARD=1, a measured variant). s may be nullptr. */
bool pkv_side_keep_hadamard(const pkv_side_state * s, bool is_v);

/* Forget everything: the next ubatch fits anew. s may be nullptr. */
void pkv_side_reset(pkv_side_state * s);

/* Process-wide counter moved by every fit, reset and restore. A graph built at
 * one value holds either fit ops or fitted tensors: llama.cpp reuses a graph
 * only while the counter is unchanged. */
uint64_t pkv_side_epoch(void);

/* Graph pieces for build_attn, on the rows of layer il before they are stored
 * (after upstream's Hadamard rotation): fit-or-reuse, then transform q/k/v in
 * place (k or v may be nullptr: nothing to store for it). s may be nullptr. */
void pkv_side_attn_in(ggml_context * ctx, pkv_side_state * s, int il,
                      ggml_tensor ** q, ggml_tensor ** k, ggml_tensor ** v);
/* On the attention output (before upstream's inverse V rotation). */
ggml_tensor * pkv_side_attn_out(ggml_context * ctx, pkv_side_state * s, int il, ggml_tensor * cur);

/* llama_kv_cache::cpy_k: store a ubatch's K rows when the side state has its
 * own encoder (SQuat), else nullptr (the caller stores as usual). Throws if
 * this layer's K needs side state and pkv_side_attn_in did not run for it.
 * k_cache: the cache as n_embd_gqa x cells, k_cur: n_embd_gqa x n_tokens,
 * k_idxs: the cell of each token. */
ggml_tensor * pkv_side_cpy_k(ggml_context * ctx, pkv_side_state * s, int il,
                             ggml_tensor * k_cache, ggml_tensor * k_cur, ggml_tensor * k_idxs);
/* llama_kv_cache::cpy_v: throws if this layer's V needs side state and
 * pkv_side_attn_in did not run for it. */
void pkv_side_check_cpy_v(pkv_side_state * s, int il);

/* K-shift: rows decoded to f32 -> (undo transform) ... (redo transform). */
ggml_tensor * pkv_side_kshift_undo(ggml_context * ctx, pkv_side_state * s, int il, ggml_tensor * k_f32);
ggml_tensor * pkv_side_kshift_redo(ggml_context * ctx, pkv_side_state * s, int il, ggml_tensor * k_f32);

/* Session state: a self-describing blob (magic, version, settings, slots). */
size_t pkv_side_state_size(const pkv_side_state * s);
void   pkv_side_state_get(const pkv_side_state * s, uint8_t * dst);
/* replace: whole-context restore. Otherwise (one sequence): adopt into empty
 * slots, accept identical ones, refuse conflicting ones. Returns nullptr on
 * success, else a message naming the problem (the state is then unchanged). */
const char * pkv_side_state_set(pkv_side_state * s, const uint8_t * src, size_t n, bool replace);
