/*
 * pyllm-kv <-> ggml-cpu glue: a set_rows with src[3] = U stores SQuat keys.
 *
 * The KV-cache glue (native/llama/side_squat.cpp) stores SQuat keys into a
 * cache in the graph builder's host memory with a CPU op of its own; for any
 * other cache (GPU memory, or a cache held by an rpc-server) it builds
 * ggml_set_rows(cache, k, idx) with src[3] = U, fp16 [d(d+1)/2, n_head]. The
 * backend holding the cache encodes: CUDA in patches/0009, ggml-cpu (e.g. an
 * rpc-server without a GPU) through these macros and pkv_squat_set_rows
 * (native/src/squat_set_rows.c), which writes the bytes of the host-cache
 * store. A set_rows that would drop src[3] and store plain kv blocks is never
 * accepted: ggml-cpu's supports_op answers PKV_GGML_SQUAT_SET_ROWS_OK.
 *
 * Include only from ggml-cpu's sources.
 */
#ifndef PKV_GGML_SQUAT_SET_ROWS_H
#define PKV_GGML_SQUAT_SET_ROWS_H

#include "pkv/ggml_hooks.h"
#include "pkv/sidestate.h"

#define PKV_GGML_SQUAT_SET_ROWS_HEAD_DIM(op) \
    pkv_squat_set_rows_head_dim((op)->src[0]->ne[0], (op)->src[3]->ne[1], (op)->src[3]->ne[0])

/* the shapes the encoder takes (what llama.cpp's K store builds) */
#define PKV_GGML_SQUAT_SET_ROWS_OK(op)                                                       \
    (PKV_GGML_IS_SQUAT((op)->type) && (op)->ne[0] == (op)->src[0]->ne[0] &&                   \
     (op)->ne[2] == 1 && (op)->ne[3] == 1 &&                                                  \
     (op)->src[0]->type == GGML_TYPE_F32 && (op)->src[0]->nb[0] == sizeof(float) &&           \
     (op)->src[0]->ne[2] == 1 && (op)->src[0]->ne[3] == 1 &&                                  \
     ((op)->src[1]->type == GGML_TYPE_I32 || (op)->src[1]->type == GGML_TYPE_I64) &&          \
     (op)->src[1]->ne[0] == (op)->src[0]->ne[1] && (op)->src[1]->ne[1] == 1 &&                 \
     (op)->src[1]->ne[2] == 1 && (op)->src[1]->ne[3] == 1 &&                                  \
     (op)->src[3]->type == GGML_TYPE_F16 && (op)->src[3]->nb[0] == 2 &&                       \
     (op)->src[3]->ne[2] == 1 && (op)->src[3]->ne[3] == 1 && PKV_GGML_SQUAT_SET_ROWS_HEAD_DIM(op) > 0 && \
     (op)->src[4] == NULL)   /* a folded key center row is the CUDA encoder's (side_method.h) */

/* scratch floats of one thread (the dense U of every head) plus a cache line */
#define PKV_GGML_SQUAT_SET_ROWS_WORK(op) \
    (pkv_squat_set_rows_work(PKV_GGML_SQUAT_SET_ROWS_HEAD_DIM(op), (int) (op)->src[3]->ne[1]) + 16)

/* thread ith of nth; wdata: the graph's work buffer (n_threads times the above); 0 on success */
#define PKV_GGML_SQUAT_SET_ROWS(op, wdata, ith, nth)                                                    \
    pkv_squat_set_rows(PKV_GGML_BITS((op)->type), PKV_GGML_SQUAT_SET_ROWS_HEAD_DIM(op),                 \
                       (int) (op)->src[3]->ne[1], (op)->src[0]->data, (op)->src[0]->nb[1],              \
                       (op)->src[0]->ne[1], (op)->src[1]->data, (op)->src[1]->type == GGML_TYPE_I64,    \
                       (op)->src[1]->nb[0], (op)->src[3]->data, (op)->src[3]->nb[1], (op)->data,        \
                       (op)->nb[1], (op)->ne[1], (ith), (nth),                                          \
                       (float *) (wdata) + PKV_GGML_SQUAT_SET_ROWS_WORK(op) * (size_t) (ith))

#endif /* PKV_GGML_SQUAT_SET_ROWS_H */
