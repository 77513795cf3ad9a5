/*
 * pyllm-kv CUDA kernels for the kv4/kv3/kv2 block formats (pkv/codec.h):
 * plain C launchers taking device pointers, byte strides and a stream, so the
 * patched ggml-cuda only maps tensors to arguments and dispatches.
 *
 * `bits` is 4, 3 or 2 (the format); every launcher returns 0 on success, a
 * negative value for arguments it does not handle (nothing is launched then),
 * or a positive cudaError_t if the launch itself failed.
 *
 * Rounding: the encoder reproduces the scalar reference pkv_encode_block
 * (block_scale.c's search for the scale and minimum, with its order of sums;
 * fp16 round-to-nearest-even; codes from the rounded values; no fused
 * multiply-add) bit for bit for finite inputs outside the
 * fp32-subnormal range (ggml-cuda builds with -use_fast_math, which flushes
 * fp32 subnormals to zero).
 */
#ifndef PKV_CUDA_H
#define PKV_CUDA_H

#include <stddef.h>
#include <stdint.h>
#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Element types of the non-pyllm-kv side of a launcher. */
#define PKV_CUDA_T_F32 0
#define PKV_CUDA_T_F16 1
/* K/V types of the flash-attention decode kernel: 4, 3, 2 = ours; 16 = f16. */
#define PKV_CUDA_KV_F16 16

/* set_rows: dst[:, idx[i01, i02 % ne11, i03 % ne12], i02, i03] = encode(src[:, i01, i02, i03]).
 * src is f32 or f16 (src_type), rows contiguous (ne00 % 64 == 0); idx is
 * int32 or int64 (idx_i64). Strides in bytes. */
int pkv_cuda_set_rows(int bits, const void * src, int src_type, const void * idx, int idx_i64, void * dst,
                      int64_t ne00, int64_t ne01, int64_t ne02, int64_t ne03,
                      size_t nb01, size_t nb02, size_t nb03,
                      int64_t ne11, int64_t ne12, size_t nb10, size_t nb11, size_t nb12,
                      size_t nb1, size_t nb2, size_t nb3, cudaStream_t stream);

/* SQuat key encoder (pkv_squat_quantize_row on the GPU): row t of src (f32,
 * n_head * head_dim values, byte stride nb01) -> dst row idx[t] (int32 or
 * int64 at byte stride nb10; dst byte stride nb1), head h encoded with its
 * factor U_h, given as the host keeps it: n_head consecutive upper triangles
 * of head_dim x head_dim in fp16, row by row (pkv_squat_pack). head_dim: one
 * of pkv_cuda_squat_supported. mu: NULL, or the keys' center row (f32,
 * n_head * head_dim, the centering side state), subtracted from every row
 * before it is encoded (what a ggml_sub before the store would do, one
 * kernel less per layer and token). */
int pkv_cuda_squat_set_rows(int bits, int head_dim, int n_head, const float * src, const void * idx, int idx_i64,
                            const uint16_t * U_packed, const float * mu, void * dst, int64_t n_tok,
                            size_t nb01, size_t nb10, size_t nb1, cudaStream_t stream);
int pkv_cuda_squat_supported(int head_dim);   /* 1 for 64, 128, 256 */

/* cpy between an f32 tensor and one of ours (same element count, row-major
 * element order of each tensor; the f32 side may be non-contiguous, ours has
 * ne[0] % 64 == 0). to_ours != 0: f32 -> ours, else ours -> f32.
 * ne_f/nb_f: the f32 tensor's 4 dims and byte strides; ne_q/nb_q: ours. */
int pkv_cuda_cpy(int bits, int to_ours, const void * src, void * dst,
                 const int64_t ne_f[4], const size_t nb_f[4],
                 const int64_t ne_q[4], const size_t nb_q[4], cudaStream_t stream);

/* get_rows: dst[:, i10, i11, i12] = decode(src[:, idx[i10, i11, i12], i11, i12]),
 * dst f32 or f16 (dst_type), idx int32. Strides in bytes. */
int pkv_cuda_get_rows(int bits, const void * src, const int32_t * idx, void * dst, int dst_type,
                      int64_t ne00, size_t nb01, size_t nb02, size_t nb03,
                      int64_t ne10, int64_t ne11, int64_t ne12, size_t nb10, size_t nb11, size_t nb12,
                      size_t nb1, size_t nb2, size_t nb3, cudaStream_t stream);

/* Decode to a contiguous f16/f32 tensor [ne00, ne01, ne02, ne03]; s01, s02,
 * s03 are the source strides in BLOCKS (ggml-cuda's to_*_nc convention). */
int pkv_cuda_to_float(int bits, const void * src, void * dst, int dst_type,
                      int64_t ne00, int64_t ne01, int64_t ne02, int64_t ne03,
                      int64_t s01, int64_t s02, int64_t s03, cudaStream_t stream);

/* Flash-attention decode (few query columns): split-K over the KV length,
 * one CTA per (KV head, chunk, group of up to 8 query rows), the rows being
 * all GQA query heads of that KV head times the query columns; partial
 * (M, S, acc) per chunk, then a combine kernel that also applies sinks. */
typedef struct {
    int k_type, v_type;            /* 4/3/2 or PKV_CUDA_KV_F16 */
    int D;                         /* head size of K and V: 64 or 128 */
    const float * q;  size_t nbq1, nbq2, nbq3;     /* Q [D, n_q, n_head, n_seq] */
    const void  * k;  size_t nbk1, nbk2, nbk3;     /* K [D, n_kv, n_head_kv, n_seq] */
    const void  * v;  size_t nbv1, nbv2, nbv3;     /* V like K */
    const void  * mask; size_t nbm1, nbm3; int64_t mask_ne3;  /* f16 [n_kv, >=n_q, 1, mask_ne3] or NULL */
    const float * sinks;           /* [n_head] or NULL */
    float * dst;                   /* [D, n_head, n_q, n_seq] contiguous */
    int n_q, n_head, n_head_kv, n_seq;
    int64_t n_kv;
    float scale, max_bias, softcap;
} pkv_cuda_fattn_params;

/* 1 if the decode kernel handles this combination (types, D, n_q*gqa rows). */
int    pkv_cuda_fattn_decode_supported(int k_type, int v_type, int D);
/* Device scratch bytes the launch needs (partial results), for the current device. */
size_t pkv_cuda_fattn_decode_workspace(const pkv_cuda_fattn_params * p);
int    pkv_cuda_fattn_decode(const pkv_cuda_fattn_params * p, void * workspace, cudaStream_t stream);

/* Side-state fits on the GPU (pkv_fit.cu; pkv/ggml_fit_op.h says when they run).
 *
 * Key center: mu[j] = median of the finite values of channel j over `rows`
 * rows of x (f32, row r at x + r * n), exactly as side_center.cpp's CPU fit
 * (the middle value, or the float mean 0.5f * (a + b) of the two middle ones;
 * 0 if none is finite; -0 returned as +0). */
int pkv_cuda_center_fit(const float * x, int64_t rows, int64_t n, float * mu, cudaStream_t stream);

/* SQuat's U of n_head heads (pkv_squat_prepare_gram's result, to rounding):
 * in = f32 Gram matrices [d, d, n_head] (in_rows == d) or query rows
 * [d, in_rows < d, n_head] (their Gram matrix is formed here), byte strides
 * nb1 (rows) and nb2 (heads); fit_rows: query rows behind a Gram matrix (the
 * rank is capped by it). The top eigenpairs come from a float32 cyclic Jacobi
 * solver in shared memory, the factor is pkv_squat_prepare_gram's
 * semiseparable recurrence in float64; out: packed fp16 rows (pkv_squat_pack's
 * layout) of head h at out + h * out_nb1 bytes. Heads whose input is not finite
 * or whose factor fails get U = I, as on the CPU. */
int pkv_cuda_squat_fit(const float * in, int64_t in_rows, size_t nb1, size_t nb2, int n_head, int d,
                       int64_t fit_rows, int rank, float lambda, int normalize, void * out, size_t out_nb1,
                       cudaStream_t stream);
int pkv_cuda_squat_fit_supported(int head_dim, int rank);   /* 1 for head_dim 64 or 128 and rank <= 64 */

#ifdef __cplusplus
}
#endif

#endif /* PKV_CUDA_H */
