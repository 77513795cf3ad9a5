/*
 * pyllm-kv <-> ggml glue: the table rows and switch cases that the patched
 * ggml sources expand. Keeping them here means patches/ only names these
 * macros, and adding a cache type touches native/ (plus one enum line).
 *
 * Include only from ggml's own sources, after ggml's type tables are declared.
 */
#ifndef PKV_GGML_HOOKS_H
#define PKV_GGML_HOOKS_H

#include "pkv/codec.h"

/* ggml.c: type_traits[] rows (name as the user types it in -ctk/-ctv). */
#define PKV_TYPE_ROW(T, NAME, B)                                            \
    [T] = {                                                                 \
        .type_name      = NAME,                                             \
        .blck_size      = PKV_BLOCK,                                        \
        .type_size      = sizeof(pkv_block_kv##B),                          \
        .is_quantized   = true,   /* upstream then applies its Hadamard */  \
        .to_float       = (ggml_to_float_t)   pkv_dequantize_row_kv##B,     \
        .from_float_ref = (ggml_from_float_t) pkv_quantize_row_kv##B,       \
    },

/* deco*: DecoQuant. The same block storage as kv*; what differs is that llama.cpp
 * transforms rows with the cache's side state before storing them (and q and
 * the attention output accordingly), see pkv/llama_side_state.h.
 * squat*: SQuat. Again kv* storage; K rows are written by the SQuat encoder
 * (pkv_side_cpy_k) instead of from_float, which stays the plain encoder (used
 * for V, K-shift and any generic conversion). */
#define PKV_GGML_TYPE_TRAITS                    \
    PKV_TYPE_ROW(GGML_TYPE_KV4, "kv4", 4)       \
    PKV_TYPE_ROW(GGML_TYPE_KV3, "kv3", 3)       \
    PKV_TYPE_ROW(GGML_TYPE_KV2, "kv2", 2)       \
    PKV_TYPE_ROW(GGML_TYPE_DECO4, "deco4", 4)   \
    PKV_TYPE_ROW(GGML_TYPE_DECO3, "deco3", 3)   \
    PKV_TYPE_ROW(GGML_TYPE_DECO2, "deco2", 2)   \
    PKV_TYPE_ROW(GGML_TYPE_SQUAT4, "squat4", 4) \
    PKV_TYPE_ROW(GGML_TYPE_SQUAT3, "squat3", 3) \
    PKV_TYPE_ROW(GGML_TYPE_SQUAT2, "squat2", 2)

/* ggml-cpu.c: type_traits_cpu[] rows. K scores read the query as q8_1, whose
 * per-block sum lets the asymmetric minimum be applied once per block. */
#define PKV_CPU_ROW(T, B)                                                   \
    [T] = {                                                                 \
        .from_float   = (ggml_from_float_t) pkv_quantize_row_kv##B,         \
        .vec_dot      = (ggml_vec_dot_t)    pkv_vec_dot_kv##B##_q8_1,       \
        .vec_dot_type = GGML_TYPE_Q8_1,                                     \
        .nrows        = 1,                                                  \
    },

#define PKV_GGML_CPU_TYPE_TRAITS                \
    PKV_CPU_ROW(GGML_TYPE_KV4, 4)               \
    PKV_CPU_ROW(GGML_TYPE_KV3, 3)               \
    PKV_CPU_ROW(GGML_TYPE_KV2, 2)               \
    PKV_CPU_ROW(GGML_TYPE_DECO4, 4)             \
    PKV_CPU_ROW(GGML_TYPE_DECO3, 3)             \
    PKV_CPU_ROW(GGML_TYPE_DECO2, 2)             \
    PKV_CPU_ROW(GGML_TYPE_SQUAT4, 4)            \
    PKV_CPU_ROW(GGML_TYPE_SQUAT3, 3)            \
    PKV_CPU_ROW(GGML_TYPE_SQUAT2, 2)

/* All our types, for tools that list cache types (-ctk/-ctv). */
#define PKV_GGML_TYPE_LIST GGML_TYPE_KV4, GGML_TYPE_KV3, GGML_TYPE_KV2, \
                           GGML_TYPE_DECO4, GGML_TYPE_DECO3, GGML_TYPE_DECO2, \
                           GGML_TYPE_SQUAT4, GGML_TYPE_SQUAT3, GGML_TYPE_SQUAT2

/* Bits per code of our block storage (4, 3, 2), 0 for any other type. Every
 * type of ours with the same width shares one block storage, so kernels (CPU
 * decode, CUDA in patches/0009) key on this. */
#define PKV_GGML_BITS(t)                                                        \
    (((t) == GGML_TYPE_KV4 || (t) == GGML_TYPE_DECO4 || (t) == GGML_TYPE_SQUAT4) ? 4 : \
     ((t) == GGML_TYPE_KV3 || (t) == GGML_TYPE_DECO3 || (t) == GGML_TYPE_SQUAT3) ? 3 : \
     ((t) == GGML_TYPE_KV2 || (t) == GGML_TYPE_DECO2 || (t) == GGML_TYPE_SQUAT2) ? 2 : 0)

/* True for our types: ggml-cpu's tiled flash-attention prefill decodes their
 * rows per tile (through to_float) instead of per query row. */
#define PKV_GGML_IS_OURS(t) (PKV_GGML_BITS(t) != 0)

/* DecoQuant types: llama.cpp keeps a per-layer side state for them. */
#define PKV_GGML_IS_DECO(t) ((t) == GGML_TYPE_DECO4 || (t) == GGML_TYPE_DECO3 || (t) == GGML_TYPE_DECO2)

/* SQuat types: K rows need the per-(layer, KV head) query-subspace factor. */
#define PKV_GGML_IS_SQUAT(t) ((t) == GGML_TYPE_SQUAT4 || (t) == GGML_TYPE_SQUAT3 || (t) == GGML_TYPE_SQUAT2)

/* V accumulation in ggml-cpu's per-row flash attention (decode): VKQ += vs*V
 * straight from the blocks. Evaluates to false for other types. */
#define PKV_GGML_VEC_MAD(t, y, x, v, n)                                        \
    (PKV_GGML_BITS(t) == 4 ? (pkv_vec_mad_kv4((y), (x), (v), (n)), true) :     \
     PKV_GGML_BITS(t) == 3 ? (pkv_vec_mad_kv3((y), (x), (v), (n)), true) :     \
     PKV_GGML_BITS(t) == 2 ? (pkv_vec_mad_kv2((y), (x), (v), (n)), true) : false)

/* `case` labels for switches that dispatch all block-quantized types
 * generically through the traits (get_rows, ...). */
#define PKV_GGML_TYPE_CASES                     \
    case GGML_TYPE_KV4:                         \
    case GGML_TYPE_KV3:                         \
    case GGML_TYPE_KV2:                         \
    case GGML_TYPE_DECO4:                       \
    case GGML_TYPE_DECO3:                       \
    case GGML_TYPE_DECO2:                       \
    case GGML_TYPE_SQUAT4:                      \
    case GGML_TYPE_SQUAT3:                      \
    case GGML_TYPE_SQUAT2

/* ggml-quants.c: ggml_validate_row_data() cases. */
#define PKV_GGML_VALIDATE_CASES(data, nbytes)                               \
    PKV_GGML_TYPE_CASES: if (!pkv_validate_row(PKV_GGML_BITS(type), data, nbytes)) return false; break;

/* Our q8_1 mirror must match ggml's block_q8_1 byte for byte. */
#define PKV_GGML_STATIC_CHECKS \
    _Static_assert(sizeof(pkv_block_q8_1) == sizeof(block_q8_1), "pkv q8_1 mirror out of sync with ggml");

#endif /* PKV_GGML_HOOKS_H */
