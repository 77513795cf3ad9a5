/*
 * pyllm-kv side state: small per-layer matrices that belong to llama.cpp's KV
 * cache (not to the model) for cache types that need more than the row itself
 * to store it: DecoQuant (deco4/deco3/deco2, a per-layer transform, see
 * docs/decoquant.md) and SQuat (squat4/squat3/squat2, per layer and KV head
 * the factor of the query-subspace metric the key encoder uses, see
 * docs/squat.md).
 *
 * Life cycle (the rule llama.cpp's patched KV cache follows):
 *   - empty after the cache is created, cleared (llama_memory_clear) or emptied
 *     (llama_memory_seq_rm leaving no cell in use);
 *   - fitted, per layer and for K and V separately (SQuat: per KV head, from
 *     the queries of its GQA group), from the rows of the FIRST
 *     ubatch that reaches that layer's attention after that (the first prefill
 *     batch; if the prompt is split into several ubatches, the first one decides
 *     and later ones reuse it), inside the graph, before those rows are stored;
 *   - reused unchanged by every later token (prefill or decode) and by K-shift;
 *   - saved and restored with llama_state_* (a whole-context restore replaces
 *     it; a sequence restore adopts it into an empty side state and refuses a
 *     conflicting one).
 *
 * The attention never rebuilds K or V: with rows stored as u = x S^-1 per
 * group of g channels, scores use q S^T (one small matmul per token and head)
 * and the attention output is multiplied by S once. These are the places
 * where upstream applies its Hadamard rotation (build_attn), so the graph
 * pieces below plug in there.
 *
 * C++ and ggml.h: compiled into libllama (patches/ add it to the target); the
 * numerics (Gram matrix, eigen-decomposition, regularisation) are the plain C
 * functions of pkv/sidestate.h in libpyllm_kv_native.
 */
#pragma once

#include "ggml.h"

#include <cstddef>
#include <cstdint>

struct pkv_side_state;

/* Which matrix pkv_side_apply multiplies with (row-vector view, per group):
 *   QUERY : q -> q S^T      (K side: scores against stored u)
 *   ENCODE: x -> x S^-1     (before storing K or V rows)
 *   DECODE: u -> u S        (V side: attention output; K side: K-shift) */
enum pkv_side_which { PKV_SIDE_QUERY = 0, PKV_SIDE_ENCODE = 1, PKV_SIDE_DECODE = 2 };

/* nullptr when neither cache type needs side state. n_layer: the model's layer
 * count (slots are indexed by model layer id). Throws std::runtime_error with a
 * message naming the problem for unsupported head sizes or bad settings. */
pkv_side_state * pkv_side_create(ggml_type type_k, ggml_type type_v, int n_layer,
                                 int64_t head_dim_k, int64_t head_dim_v);
void pkv_side_free(pkv_side_state * s);
struct pkv_side_deleter { void operator()(pkv_side_state * s) const { pkv_side_free(s); } };

/* One line for the log: types, group size, variant. */
const char * pkv_side_describe(const pkv_side_state * s);

/* Should upstream's Hadamard rotation stay on for a cache of this type? Yes for
 * every type except deco* (the faithful DecoQuant replaces it), unless the
 * environment asks for both (PYLLM_KV_DECO_HADAMARD=1, a measured variant). */
bool pkv_side_keep_hadamard(ggml_type type);

/* Forget everything: the next ubatch fits anew. s may be nullptr. */
void pkv_side_reset(pkv_side_state * s);

/* Graph pieces for build_attn: fit-or-reuse the layer's matrices from the
 * current rows, then transform q/k/v. Returns the V matrices for
 * pkv_side_attn_out (nullptr if V has no side state). s may be nullptr. */
ggml_tensor * pkv_side_attn_in(ggml_context * ctx, pkv_side_state * s, int il,
                               ggml_tensor ** q, ggml_tensor ** k, ggml_tensor ** v);
ggml_tensor * pkv_side_attn_out(ggml_context * ctx, ggml_tensor * v_mats, ggml_tensor * cur);

/* SQuat: store a ubatch's K rows into the cache with the SQuat encoder
 * (replaces upstream's set_rows in llama_kv_cache::cpy_k). k_cache: the cache
 * as n_embd_gqa x cells, k_cur: n_embd_gqa x n_tokens, k_idxs: the cell of
 * each token. Returns nullptr when this layer's K is not SQuat (the caller
 * then stores as usual). A cache in host memory is written by a ggml custom op
 * on the CPU; one in device memory by GGML_OP_SET_ROWS with src[3] = the
 * layer's U (packed fp16 per KV head), which the CUDA backend encodes on the
 * GPU. The fit itself (once per sequence) stays on the CPU. */
ggml_tensor * pkv_side_cpy_k(ggml_context * ctx, pkv_side_state * s, int il,
                             ggml_tensor * k_cache, ggml_tensor * k_cur, ggml_tensor * k_idxs);

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
