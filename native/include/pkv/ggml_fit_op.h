/*
 * pyllm-kv side-state fits that a GPU backend may compute itself.
 *
 * The fits of the side state (native/llama: the key center's per-channel
 * median, SQuat's U from the queries' Gram matrix) are ggml custom ops: a CPU
 * function the scheduler runs on the CPU backend. With the KV cache on a GPU
 * that costs a GPU -> CPU -> GPU round trip per layer (a graph split) on the
 * first ubatch of an empty cache. A fit op that a backend can compute carries
 * these parameters in its op_params, after ggml's own custom-op parameters
 * (ggml_custom_op_params: function, n_tasks, userdata); patches/0009 lets the
 * CUDA backend take such an op (native/cuda/pkv_fit.cu) and, once launched,
 * calls the op's function with ith = PKV_FIT_ON_DEVICE so that the side state
 * marks itself fitted (its host copy is fetched from the cache's tensor when
 * a state save needs it). Without the magic the op is an ordinary CPU op.
 */
#ifndef PKV_GGML_FIT_OP_H
#define PKV_GGML_FIT_OP_H

#include <stdint.h>

#define PKV_FIT_OP_MAGIC 0x666b7670u      /* "pvkf" */
#define PKV_FIT_OP_PARAMS_OFFSET 32       /* bytes into op_params: after ggml_custom_op_params (24 on LP64) */
#define PKV_FIT_ON_DEVICE (-1)            /* ith of the notification call */

enum pkv_fit_kind {
    PKV_FIT_CENTER = 1,   /* src[0]: rows f32 [n, rows] contiguous; dst f32 [n]: per-channel median of finite values */
    PKV_FIT_SQUAT  = 2,   /* src[0]: f32 Gram [d, d, n_head] or rows [d, rows < d, n_head]; dst f16 [d(d+1)/2, n_head] */
};

struct pkv_fit_op_params {
    uint32_t magic;       /* PKV_FIT_OP_MAGIC */
    int32_t  kind;        /* enum pkv_fit_kind */
    int32_t  rank;        /* SQuat: eigenpairs kept */
    float    lambda;      /* SQuat: weight of the query subspace */
    int32_t  normalize;   /* SQuat: eigenvalues divided by the largest */
    int32_t  reserved;
    int64_t  fit_rows;    /* SQuat: query rows behind a Gram matrix (caps the rank) */
};

#ifdef __cplusplus
static_assert(PKV_FIT_OP_PARAMS_OFFSET + sizeof(pkv_fit_op_params) <= 64, "fits GGML_MAX_OP_PARAMS");
#endif

#endif
