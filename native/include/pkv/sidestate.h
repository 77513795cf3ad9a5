/*
 * pyllm-kv side state: the small per-prompt linear algebra behind two KV-cache
 * methods that keep a little extra state next to the block codec of codec.h.
 *
 *   DecoQuant (arXiv 2405.12591): every group of g consecutive values of a
 *     K/V row is mapped through a small g x g matrix fitted on the prompt's
 *     own rows (data-free, no calibration set) before block quantization.
 *   SQuat (arXiv 2503.24358): keys are block-quantized column by column with
 *     GPTQ/OBS error feedback so that the quantization error lands (mostly)
 *     orthogonal to the subspace spanned by the prompt's queries.
 *
 * Conventions for every function here:
 *   - matrices are row-major: element (i, j) of an n x m matrix is M[i*m + j];
 *   - storage is float (or double where stated), all internal arithmetic is
 *     float64;
 *   - non-finite input data (NaN, +-Inf) in the fitting inputs x and q is
 *     treated as 0: a stray NaN must not poison a per-prompt transform. (The
 *     codec itself, and pkv_squat_quantize_row, follow codec.h's policy for
 *     the values being stored: NaN -> 0, +-Inf -> +-65504.)
 *   - return value 0 means success, nonzero an error (documented per function).
 *
 * Plain C ABI: used by the patched llama.cpp and by Python via cffi.
 */
#ifndef PKV_SIDESTATE_H
#define PKV_SIDESTATE_H

#include "pkv/codec.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------ */
/* Dense linear algebra (float64, small n, no LAPACK)                        */
/* ------------------------------------------------------------------------ */

/* Largest n accepted by pkv_sym_eig / pkv_cholesky_upper. */
#define PKV_LINALG_MAX_N 1024

/* Eigen-decomposition of a real symmetric n x n matrix A by cyclic Jacobi
 * rotations: A = V diag(evals) V^T.
 *   evals: n eigenvalues, in descending order;
 *   evecs: n x n row-major, COLUMN j is the unit eigenvector of evals[j]
 *          (evecs[i*n + j]); V is orthogonal to ~1e-15.
 * A is read in full and symmetrised as (A + A^T)/2. Each eigenvector's sign is
 * fixed so that its component of largest magnitude (first one on ties) is
 * positive, so results are deterministic. evals and evecs may not alias A.
 * Returns 0 on success; -1 on bad arguments (n < 1 or > PKV_LINALG_MAX_N, NULL
 * pointers, non-finite entries in A); -2 if out of memory; -3 if the sweeps
 * did not converge (not observed in practice: Jacobi converges quadratically).
 * Cost about 6 n^3 flops per sweep, 8-10 sweeps for distinct eigenvalues (up
 * to ~20 for big clusters of equal ones); on one core about 2 ms at n = 64,
 * 30 ms at n = 128, 0.2-0.5 s at n = 256. */
PKV_API int pkv_sym_eig(int n, const double * A, double * evals, double * evecs);

/* The r largest eigenpairs of a real symmetric n x n matrix A (0 <= r <= n):
 * Householder tridiagonalisation, bisection, inverse iteration (eig_top.c);
 * ~4/3 n^3 flops instead of Jacobi's ~50 n^3, for fits on a prompt's
 * critical path. evals: r values, descending; evecs: n x r row-major, column
 * k (evecs[i*r + k]) the unit eigenvector of evals[k], orthonormal to
 * rounding also within clusters of equal eigenvalues; sign rule as
 * pkv_sym_eig. A is read in full and symmetrised. Returns 0; -1 on bad
 * arguments or non-finite A; -2 out of memory. */
PKV_API int pkv_sym_eig_top(int n, const double * A, int r, double * evals, double * evecs);

/* Upper Cholesky factor of a symmetric positive definite n x n matrix:
 * A = U^T U, U upper triangular with positive diagonal (strictly lower part
 * written as 0). Only the upper triangle of A is read. U may alias A.
 * Returns 0 on success, -1 on bad arguments, -4 if A is not (numerically)
 * positive definite. */
PKV_API int pkv_cholesky_upper(int n, const double * A, double * U);

/* ------------------------------------------------------------------------ */
/* DecoQuant: per-prompt g x g group transform                                */
/* ------------------------------------------------------------------------ */

#define PKV_DECO_WHITEN 0   /* faithful: S = diag(sigma) V^T / sqrt(n_groups)  */
#define PKV_DECO_ROTATE 1   /* orthonormal basis without sigma: S = V^T         */

/* Relative floor on the eigenvalues of the group Gram matrix (WHITEN only):
 * lambda_i := max(lambda_i, PKV_DECO_EIG_FLOOR * lambda_max).
 * Why 1e-4: it caps cond(S) = sqrt(1/1e-4) = 100. That bounds (a) how much a
 * later token's energy in a direction the prompt did not populate is
 * amplified in u (at most 100x the prompt's RMS, far inside fp16 range), (b)
 * how much the u-domain quantization error is amplified back through S, and
 * (c) the float32 storage error of S and Sinv (it scales with cond(S)), so
 * that S * Sinv = I to <= 2e-6 elementwise even for rank-deficient prompts
 * (measured; ~5e-8 on well-conditioned ones). */
#define PKV_DECO_EIG_FLOOR 1e-4

/* Fit the DecoQuant transform from the prompt's own rows.
 *
 * x holds n_rows rows of row_len floats; row r starts at x + r*row_stride
 * (stride in floats, row_stride >= row_len, so a per-head slice of a wider
 * row works). Each row is cut into row_len/g consecutive groups of g values;
 * all groups of all rows are the rows of M (n_groups x g,
 * n_groups = n_rows * row_len / g). G = M^T M (float64) = V Lambda V^T,
 * sigma_i = sqrt(lambda_i), eigenvalues descending.
 *
 * Output: S and Sinv, g x g row-major float, with the ROW-VECTOR convention:
 *   encode  u   = x_g * Sinv   (x_g one group, a 1 x g row)
 *   decode  x_g = u * S        (S * Sinv = I)
 * i.e. u[j] = sum_i x_g[i] * Sinv[i*g + j], x_g[j] = sum_i u[i] * S[i*g + j].
 *
 *   PKV_DECO_WHITEN: S = diag(sigma) V^T / sqrt(n_groups),
 *                    Sinv = V diag(sqrt(n_groups) / sigma).
 *     Dividing by sqrt(n_groups) makes the columns of U = M * Sinv orthogonal
 *     with unit RMS over the prompt (U^T U = n_groups * I before the floor),
 *     so the encoded values are O(1) whatever the model's K/V magnitudes: far
 *     inside fp16 range, and the block codec sees comparable columns.
 *   PKV_DECO_ROTATE: S = V^T, Sinv = V (orthogonal; no floor needed).
 * Row i of S is eigen-direction i (largest variance first); signs follow
 * pkv_sym_eig (largest component of each eigenvector positive).
 *
 * Regularisation (rank-deficient prompts: 1 token, constant rows, zeros):
 *   - WHITEN floors every eigenvalue at PKV_DECO_EIG_FLOOR * lambda_max
 *     (see above); directions the prompt never used get the floor's scale.
 *   - If lambda_max is 0 (all groups zero, or n_rows == 0), or is not finite,
 *     or (WHITEN) the data's RMS is outside [1e-28, 1e28] so that float32
 *     could not hold S and Sinv, S = Sinv = I (the transform is skipped).
 *   - Non-finite values in x count as 0.
 * In all successful cases S and Sinv are finite and S * Sinv = I to ~1e-6.
 *
 * Returns 0 on success (including the identity fallback); -1 on invalid
 * arguments: NULL pointers (x may be NULL only if n_rows == 0), n_rows < 0,
 * row_len < 1, row_len % g != 0, row_stride < row_len, g not in
 * {16, 32, 64, 128}, unknown variant. -2: out of memory; -3: the eigensolver
 * did not converge (not expected). On every error with a valid g, S and Sinv
 * are set to the identity, so a caller that ignores the code stays lossless. */
PKV_API int pkv_deco_fit(const float * x, int64_t n_rows, int64_t row_stride, int64_t row_len,
                         int g, int variant, float * S, float * Sinv);

/* pkv_deco_fit from the group Gram matrix G = M^T M (g x g row-major float,
 * symmetrised) of n_groups groups, as the graph computes it by a matmul on
 * the backend that holds the rows. A non-finite G (non-finite rows) or
 * n_groups == 0 gives S = Sinv = I. Returns as pkv_deco_fit. */
PKV_API int pkv_deco_fit_gram(const float * G, int64_t n_groups, int g, int variant, float * S, float * Sinv);

/* ------------------------------------------------------------------------ */
/* SQuat: key quantization with error orthogonal to the query subspace        */
/* ------------------------------------------------------------------------ */

/* Prepare the per-(layer, KV head) factor U for pkv_squat_quantize_row.
 *
 * q: n_q contiguous rows of d floats: the prompt's post-RoPE queries of all
 *    query heads of one GQA group, rotated exactly like the keys will be.
 * Q_hat (r x d) = the top-r right singular vectors of q scaled by their
 *    singular values (from the eigen-decomposition of q^T q, or of the
 *    smaller n_q x n_q matrix q q^T when n_q < d), with
 *    r := min(r, d, n_q); directions with a zero singular value are dropped.
 *    If normalize != 0, Q_hat is divided by its top singular value, so lambda
 *    is relative to the strongest query direction (scale-free).
 * A = I + lambda * Q_hat^T Q_hat (d x d, SPD, eigenvalues >= 1).
 * U (d x d row-major float, upper triangular, lower part 0) is the upper
 *    Cholesky factor of A^-1, i.e. A^-1 = U^T U (the GPTQ "Hinv" trick).
 *    A^-1 = I - sum c_i v_i v_i^T in closed form from the eigenvectors, and
 *    its factor by the diagonal-plus-low-rank recurrence (O(d^2 r), no dense
 *    Cholesky; squat.c).
 *
 * Minimising (k_hat - k)^T A (k_hat - k) = |k_hat - k|^2 + lambda |Q_hat(k_hat - k)|^2
 * is what pkv_squat_quantize_row approximates greedily.
 *
 * No regularisation is needed (A >= I). If n_q == 0, r == 0, lambda == 0 or
 * q is all zero (after non-finite -> 0), U = I, and the encoder then is the
 * plain block code with the min/max scale rule (below).
 * Returns 0 on success; -1 on bad arguments (d < 1 or > PKV_LINALG_MAX_N,
 * n_q < 0, r < 0, lambda negative or not finite, NULL U, NULL q with n_q > 0);
 * -2 out of memory; -3/-4 numerical failure (not expected). On any error
 * with a valid d, U is set to the identity. */
PKV_API int pkv_squat_prepare(const float * q, int64_t n_q, int d, int r, float lambda,
                              int normalize, float * U);

/* pkv_squat_prepare from the Gram matrix C = q^T q (d x d row-major float,
 * symmetric; n_q = the number of query rows it sums, for the rank cap), as
 * the graph computes it on the backend that holds the queries (a GPU's
 * matmul): the same U to rounding. A non-finite C leaves U = I. The top-r
 * eigenpairs come from pkv_sym_eig_top. */
PKV_API int pkv_squat_prepare_gram(const float * C, int64_t n_q, int d, int r, float lambda,
                                   int normalize, float * U);

/* Encode one key head vector k (d values, d a multiple of PKV_BLOCK) into
 * d/64 blocks of the plain block format of codec.h (pkv_block_kv4/kv3/kv2 for
 * bits 4/3/2, the layout pkv_quantize_row writes), so the existing
 * decode / dot / vec_mad kernels read it unchanged: decode costs nothing
 * extra; all SQuat work happens here, at encode time.
 *
 * Algorithm (GPTQ/OBS, column by column), w = k in float32 (the CUDA encoder
 * runs the same float32 steps, byte for byte):
 *   for each block b (64 columns):
 *     d, m = the min/max rule on the block's CURRENT (error-updated) w values
 *            (float32 of w, codec.h's NaN/Inf policy, m = fp16(min),
 *            d = fp16((max - m) / L), a step smaller if m + L d > 65504);
 *            not the plain encoder's error-minimising search, which clips
 *            extremes whose errors the OBS updates would then pile up;
 *     for each column j of the block, in order:
 *       code_j = clamp(round((w_j - m) / d)) (same float rounding as the codec)
 *       err    = (w_j - (m + d * code_j)) * (1 / U[j][j])   (each op rounded;
 *                m + d * code_j is one fma: d * code_j is exact)
 *       w_c   -= err * U[j][c]   for every later column c > j (any block),
 *                                 one fused multiply-add (fma) per element
 * With U = I no error is propagated: the plain block code with the min/max
 * rule. Non-finite k: NaN -> 0, +-Inf -> +-65504 (codec policy).
 * A column whose U[j][j] is not positive and finite propagates no error.
 * Bad arguments (bits not 2/3/4, d not a positive multiple of 64, NULL
 * pointers) write nothing. Cost about d^2 flops per vector. */
PKV_API void pkv_squat_quantize_row(int bits, const float * k, const float * U, int d, void * out);
/* The same with the scalar error feedback (pkv_squat_quantize_row uses AVX2 +
 * FMA where the library was built for it; both round identically, so the
 * bytes are equal: tests compare them). */
PKV_API void pkv_squat_quantize_row_ref(int bits, const float * k, const float * U, int d, void * out);

/* Compact storage of U for the KV cache's side state: the upper triangle, row
 * by row (row j holds U[j][j..d-1]), in fp16: d(d+1)/2 values, a quarter of
 * the dense float32 matrix. U's entries lie in [-1, 1] (A^-1 <= I), so fp16
 * keeps them to ~1e-3 relative, plenty for error-feedback weights; the encoder
 * runs on the unpacked (fp16-rounded) matrix. unpack writes zeros below the
 * diagonal. NULL pointers or d < 1: nothing is written. */
PKV_API size_t pkv_squat_packed_len(int d);
PKV_API void   pkv_squat_pack(const float * U, int d, uint16_t * Up);
PKV_API void   pkv_squat_unpack(const uint16_t * Up, int d, float * U);

/* Head sizes the CUDA SQuat key encoder takes (pkv_cuda_squat_set_rows: one
 * template instance each, U of a head staged in shared memory). Used by the
 * launcher and by the KV-cache glue, which refuses other sizes for a K cache in
 * GPU memory up front. */
#define PKV_SQUAT_GPU_HEAD_DIM_OK(d) ((d) == 64 || (d) == 128 || (d) == 256)

/* n_rows rows of n_heads*d values (contiguous); head h of every row is
 * encoded with U_per_head + h*d*d. out receives n_rows rows of
 * n_heads*d/64 blocks each, contiguous (the layout pkv_quantize_row writes
 * for the whole row). */
PKV_API void pkv_squat_quantize_rows(int bits, const float * k, int64_t n_rows, int n_heads,
                                     const float * U_per_head, int d, void * out);

/* SQuat keys as a ggml set_rows with src[3] = U (native/src/squat_set_rows.c):
 * what ggml-cpu runs for a K cache it holds for another process (rpc-server).
 *
 * pkv_squat_set_rows_head_dim: the head size d when rows of n_embd values,
 * n_head heads and packed factors of u_len values fit together (n_embd =
 * n_head * d, u_len = d(d+1)/2) and d is one the encoder takes (a multiple of
 * PKV_BLOCK, at most PKV_LINALG_MAX_N); else 0.
 * pkv_squat_set_rows_work: floats of scratch one thread needs (dense U of
 * every head).
 * pkv_squat_set_rows: k holds n_rows rows of n_head*d floats, row t at
 * k + t*k_stride bytes; idx the cache row of each (int32, or int64 when
 * idx_i64), idx_stride bytes apart; U the packed fp16 factor of head h at
 * U + h*u_stride bytes; out the cache, n_cells rows of out_stride bytes.
 * Thread ith of nth encodes rows ith, ith+nth, ... with pkv_squat_quantize_row
 * (the bytes of the host-cache store of native/llama/side_squat.cpp), using
 * its own work. Returns 0; -1 on bad arguments or a row index of this thread
 * outside [0, n_cells), and then writes nothing. */
PKV_API int    pkv_squat_set_rows_head_dim(int64_t n_embd, int64_t n_head, int64_t u_len);
PKV_API size_t pkv_squat_set_rows_work(int d, int n_head);
PKV_API int    pkv_squat_set_rows(int bits, int d, int n_head, const void * k, size_t k_stride, int64_t n_rows,
                                  const void * idx, int idx_i64, size_t idx_stride, const void * U,
                                  size_t u_stride, void * out, size_t out_stride, int64_t n_cells,
                                  int ith, int nth, float * work);

#ifdef __cplusplus
}
#endif

#endif /* PKV_SIDESTATE_H */
