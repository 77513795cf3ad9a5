/* SQuat keys stored by a backend's set_rows (sidestate.h): ggml-cpu runs this
 * when a set_rows carries src[3] = U, which is how the KV-cache glue
 * (native/llama/side_squat.cpp) stores SQuat keys into a cache that is not in
 * host memory of the process building the graph, e.g. a cache in an
 * rpc-server. The bytes equal those of the glue's host-cache store: both run
 * pkv_squat_quantize_row on the same unpacked fp16 U. */
#include "pkv/sidestate.h"

#include <string.h>

int pkv_squat_set_rows_head_dim(int64_t n_embd, int64_t n_head, int64_t u_len) {
    if (n_embd < 1 || n_head < 1 || n_embd % n_head != 0) return 0;
    const int64_t d = n_embd / n_head;
    if (d % PKV_BLOCK != 0 || d > PKV_LINALG_MAX_N) return 0;
    return (int64_t) pkv_squat_packed_len((int) d) == u_len ? (int) d : 0;
}

size_t pkv_squat_set_rows_work(int d, int n_head) {
    return d > 0 && n_head > 0 ? (size_t) n_head * (size_t) d * (size_t) d : 0;
}

static int64_t row_index(const void * idx, int idx_i64, size_t idx_stride, int64_t t) {
    const char * p = (const char *) idx + (size_t) t * idx_stride;
    if (idx_i64) {
        int64_t v;
        memcpy(&v, p, sizeof(v));
        return v;
    }
    int32_t v;
    memcpy(&v, p, sizeof(v));
    return v;
}

int pkv_squat_set_rows(int bits, int d, int n_head, const void * k, size_t k_stride, int64_t n_rows,
                       const void * idx, int idx_i64, size_t idx_stride, const void * U, size_t u_stride,
                       void * out, size_t out_stride, int64_t n_cells, int ith, int nth, float * work) {
    const size_t bsz = pkv_block_bytes(bits);
    if (bsz == 0 || d < PKV_BLOCK || d % PKV_BLOCK != 0 || d > PKV_LINALG_MAX_N || n_head < 1 ||
        !k || !idx || !U || !out || !work || n_rows < 0 || n_cells < 0 || nth < 1 || ith < 0 || ith >= nth) {
        return -1;
    }
    /* every index of this thread first: a bad one writes nothing */
    for (int64_t t = ith; t < n_rows; t += nth) {
        const int64_t row = row_index(idx, idx_i64, idx_stride, t);
        if (row < 0 || row >= n_cells) return -1;
    }
    if (ith >= n_rows) return 0;
    for (int h = 0; h < n_head; h++) {
        pkv_squat_unpack((const uint16_t *) ((const char *) U + (size_t) h * u_stride), d,
                         work + (size_t) h * d * d);
    }
    const size_t head_bytes = (size_t) (d / PKV_BLOCK) * bsz;
    for (int64_t t = ith; t < n_rows; t += nth) {
        const float * src = (const float *) ((const char *) k + (size_t) t * k_stride);
        char * dst = (char *) out + (size_t) row_index(idx, idx_i64, idx_stride, t) * out_stride;
        for (int h = 0; h < n_head; h++) {
            pkv_squat_quantize_row(bits, src + (size_t) h * d, work + (size_t) h * d * d, d,
                                   dst + (size_t) h * head_bytes);
        }
    }
    return 0;
}
