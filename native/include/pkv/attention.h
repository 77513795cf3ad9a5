/*
 * pyllm-kv CPU flash-attention decode kernel for our block types (kv*, deco*).
 *
 * One call handles one KV head and all query heads of its GQA group, over a
 * chunk of KV rows (cells): each K row is unpacked once and dotted with every
 * query of the group (queries as q8_1, like ggml's K·q dots), each V row is
 * converted to float once and accumulated into every query's output. The
 * result is a flash-attention partial per query, in ggml-cpu's split-KV layout
 *     [M, S, acc[dv]]:  M = max score, S = sum exp(s - M), acc = sum exp(s - M) v
 * so ggml's own reduction merges the chunks that threads computed.
 *
 * ggml-cpu calls it for decode (one query row) when both K and V are ours
 * (patches/0008); everything else keeps upstream's paths.
 */
#ifndef PKV_ATTENTION_H
#define PKV_ATTENTION_H

#include "pkv/codec.h"

#ifdef __cplusplus
extern "C" {
#endif

#define PKV_FA_MAX_Q 16   /* query heads per KV head (GQA group) per call */
#define PKV_FA_MAX_D 512  /* head size */

typedef struct {
    int bits_k, bits_v;            /* 2, 3 or 4 */
    int dk, dv;                    /* head sizes: multiples of 64, <= PKV_FA_MAX_D */
    const void * k; size_t k_stride; /* row (cell) r of this KV head at k + r*k_stride bytes */
    const void * v; size_t v_stride;
    int64_t n_kv;                  /* rows in this chunk */
    const uint16_t * mask;         /* fp16 additive mask per row, or NULL; -inf skips a row */
    const float * q; size_t q_stride; /* query head i at q + i*q_stride floats */
    int n_q;                       /* 1..PKV_FA_MAX_Q */
    float scale;                   /* applied to q·k before the mask is added */
    float * partials; size_t partial_stride; /* query i: partials + i*partial_stride floats */
} pkv_fa_decode_args;

/* Returns false (and writes nothing) for arguments outside the limits above. */
PKV_API bool pkv_fa_decode_chunk(const pkv_fa_decode_args * a);
/* Scalar reference: row by row, online softmax (tests compare against it). */
PKV_API bool pkv_fa_decode_chunk_ref(const pkv_fa_decode_args * a);

/* out[0..dv) = the attention output of n chunk partials of one query (each
 * [M, S, acc[dv]], `stride` floats apart), merged in chunk order; a chunk with
 * S == 0 (all masked) contributes nothing; all masked gives 0. ggml-cpu uses it
 * for every query row, so a token's result does not depend on which other
 * tokens share its batch. */
PKV_API void pkv_fa_merge_partials(const float * partials, size_t stride, int n, int dv, float * out);

#ifdef __cplusplus
}
#endif

#endif /* PKV_ATTENTION_H */
