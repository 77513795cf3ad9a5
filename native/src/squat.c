/* SQuat side state and key encoder (sidestate.h): keys are quantized into the
 * plain block format with GPTQ/OBS error feedback whose metric
 * A = I + lambda Q_hat^T Q_hat penalises error inside the prompt's query
 * subspace. Only encode differs from the plain codec; decode is unchanged. */
#include "pkv/sidestate.h"
#include "pkv_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PKV_SQUAT_AVX2 1
#endif

/* Cap on lambda * w_i (the weight of query direction i in A). A^-1 has
 * eigenvalue 1/(1 + lambda w_i) along that direction and we form A^-1 as
 * I - sum c_i v_i v_i^T, which loses relative accuracy in that eigenvalue as
 * it approaches DBL_EPSILON. At 1e8 it keeps ~8 correct digits (Cholesky
 * stays far from breakdown) and the direction is already weighted 1e8 times
 * more than the orthogonal error, i.e. "no error here if at all possible". */
#define PKV_SQUAT_MAX_WEIGHT 1e8

/* Same as the codec's: NaN -> 0, beyond the fp16 range saturates. */
static inline float sanitize(float v) {
    if (v != v) return 0.0f;
    if (v >  65504.0f) return  65504.0f;
    if (v < -65504.0f) return -65504.0f;
    return v;
}

static void identity_f(int d, float * U) {
    for (int i = 0; i < d; i++) {
        for (int j = 0; j < d; j++) U[(size_t) i * d + j] = i == j ? 1.0f : 0.0f;
    }
}

/* U from the eigenpairs, without forming A^-1 or running a dense Cholesky:
 * A^-1 = I - V C V^T (V: d x k orthonormal columns, C = diag(c), c in [0, 1))
 * is the identity plus a rank-k term, and the Cholesky factor of such a
 * matrix is semiseparable (the classic diagonal-plus-low-rank recurrence):
 * with S_0 = -C and y_j = row j of V,
 *   p_j = S_j y_j,  d_j = 1 + y_j . p_j,  S_{j+1} = S_j - p_j p_j^T / d_j,
 *   U[j][j] = sqrt(d_j),  U[j][i] = (y_i . p_j) / sqrt(d_j)  (i > j).
 * ~d^2 k / 2 + 2 d k^2 flops instead of ~d^3 / 3 (+ d^2 k to form A^-1): the
 * same factor to rounding (tests/test_sidestate_math.py compares it with the
 * dense Cholesky of A^-1). d_j >= 1 - max c > 0 in exact arithmetic; a
 * non-positive d_j is reported (-4) like a failed Cholesky. */
static int squat_factor_lowrank(int d, int k, int ldv, const double * V, const double * c, double * U) {
    memset(U, 0, (size_t) d * d * sizeof(double));
    if (k == 0) {
        for (int j = 0; j < d; j++) U[(size_t) j * d + j] = 1.0;
        return 0;
    }
    double * S = calloc((size_t) k * k + k, sizeof(double));
    if (!S) return -2;
    double * p = S + (size_t) k * k;
    for (int a = 0; a < k; a++) S[(size_t) a * k + a] = -c[a];
    for (int j = 0; j < d; j++) {
        const double * y = V + (size_t) j * ldv;
        double dj = 1.0;
        for (int a = 0; a < k; a++) {
            double t = 0.0;
            for (int b2 = 0; b2 < k; b2++) t += S[(size_t) a * k + b2] * y[b2];
            p[a] = t;
        }
        for (int a = 0; a < k; a++) dj += y[a] * p[a];
        if (!(dj > 0.0) || !isfinite(dj)) {
            free(S);
            return -4;
        }
        const double sj = sqrt(dj), isj = 1.0 / sj;
        double * Uj = U + (size_t) j * d;
        Uj[j] = sj;
        for (int i = j + 1; i < d; i++) {
            const double * yi = V + (size_t) i * ldv;
            double t = 0.0;
            for (int a = 0; a < k; a++) t += yi[a] * p[a];
            Uj[i] = t * isj;
        }
        const double idj = 1.0 / dj;
        for (int a = 0; a < k; a++) {
            const double pa = p[a] * idj;
            for (int b2 = 0; b2 < k; b2++) S[(size_t) a * k + b2] -= pa * p[b2];
        }
    }
    free(S);
    return 0;
}

/* The shared tail of both fits: from the top eigenpairs (lam descending, V
 * d x rr with column k the unit vector of lam[k]) of Q^T Q to U.
 * Q_hat^T Q_hat = sum_{k<r} lam_k v_k v_k^T (sigma_k^2 = lam_k), divided by
 * lam_0 when normalised. A^-1 = I - sum_k c_k v_k v_k^T with
 * c_k = lambda w_k / (1 + lambda w_k) in [0, 1), in closed form. */
static int squat_factor_from_eig(int d, int rr, const double * lam, const double * V, float lambda,
                                 int normalize, float * U) {
    if (!(isfinite(lam[0]) && lam[0] > 0.0)) return 0;   /* all-zero queries: U = I as documented */
    const double scale = normalize ? 1.0 / lam[0] : 1.0;
    double * c  = malloc((size_t) (rr > 0 ? rr : 1) * sizeof(double));
    double * Ud = malloc((size_t) d * d * sizeof(double));
    if (!c || !Ud) {
        free(c); free(Ud);
        return -2;
    }
    int kk = 0;
    for (; kk < rr; kk++) {
        /* descending: the rest are zero too (a rank-deficient Gram's
         * eigenvalues are zero to rounding, kept out) */
        if (!(lam[kk] > lam[0] * 1e-12)) break;
        double wgt = (double) lambda * lam[kk] * scale;
        if (wgt > PKV_SQUAT_MAX_WEIGHT) wgt = PKV_SQUAT_MAX_WEIGHT;
        c[kk] = wgt / (1.0 + wgt);
    }
    const int rc = squat_factor_lowrank(d, kk, rr, V, c, Ud);
    if (rc == 0) {
        for (size_t i = 0; i < (size_t) d * d; i++) U[i] = (float) Ud[i];
    }
    free(c); free(Ud);
    return rc;
}

int pkv_squat_prepare_gram(const float * C, int64_t n_q, int d, int r, float lambda,
                           int normalize, float * U) {
    if (!U || d < 1 || d > PKV_LINALG_MAX_N) return -1;
    identity_f(d, U);   /* the answer for every trivial and error case */
    if (n_q < 0 || r < 0 || !isfinite(lambda) || lambda < 0.0f || (!C && n_q > 0)) return -1;
    if (n_q == 0 || r == 0 || lambda == 0.0f) return 0;

    const size_t dd = (size_t) d * d;
    int rr = r;
    if (rr > d) rr = d;
    if ((int64_t) rr > n_q) rr = (int) n_q;
    double * G   = malloc(dd * sizeof(double));
    double * V   = malloc((size_t) d * rr * sizeof(double));
    double * lam = malloc((size_t) rr * sizeof(double));
    if (!G || !V || !lam) {
        free(G); free(V); free(lam);
        return -2;
    }
    /* non-finite Gram entries (non-finite queries upstream): this head stays plain */
    int finite = 1;
    for (size_t i = 0; i < dd; i++) {
        G[i] = (double) C[i];
        if (!isfinite(G[i])) finite = 0;
    }
    int rc = finite ? pkv_sym_eig_top(d, G, rr, lam, V) : 0;
    if (finite && rc == 0) {
        rc = squat_factor_from_eig(d, rr, lam, V, lambda, normalize, U);
    } else if (rc == -1) {
        rc = 0;   /* cannot happen (G is finite); keep U = I */
    }
    if (rc != 0) identity_f(d, U);
    free(G); free(V); free(lam);
    return rc;
}

/* Fewer query rows than head_dim (a short prompt, a decode step): Q^T Q has
 * rank <= n_q, and its eigenpairs come from the n_q x n_q matrix Q Q^T:
 * Q Q^T u = lam u gives Q^T Q (Q^T u) = lam (Q^T u), |Q^T u|^2 = lam, so
 * v = Q^T u / sqrt(lam). ~n_q^2 d + 4/3 n_q^3 flops instead of the d x d
 * problem's ~4/3 d^3 (a one-token prompt at d = 128: microseconds, not a
 * millisecond per head). */
static int squat_prepare_rows(const float * q, int n_q, int d, int rr, float lambda, int normalize, float * U) {
    const size_t nn = (size_t) n_q * n_q;
    double * Q   = malloc((size_t) n_q * d * sizeof(double));
    double * K   = malloc(nn * sizeof(double));
    double * W   = malloc((size_t) n_q * rr * sizeof(double));
    double * V   = malloc((size_t) d * rr * sizeof(double));
    double * lam = malloc((size_t) rr * sizeof(double));
    int rc = -2;
    if (Q && K && W && V && lam) {
        for (size_t i = 0; i < (size_t) n_q * d; i++) Q[i] = isfinite(q[i]) ? (double) q[i] : 0.0;
        for (int a = 0; a < n_q; a++) {
            for (int b = a; b < n_q; b++) {
                double t = 0.0;
                for (int i = 0; i < d; i++) t += Q[(size_t) a * d + i] * Q[(size_t) b * d + i];
                K[(size_t) a * n_q + b] = K[(size_t) b * n_q + a] = t;
            }
        }
        rc = pkv_sym_eig_top(n_q, K, rr, lam, W);
        if (rc == 0) {
            for (int k = 0; k < rr; k++) {
                const double s = lam[k] > 0.0 ? 1.0 / sqrt(lam[k]) : 0.0;
                for (int i = 0; i < d; i++) {
                    double t = 0.0;
                    for (int a = 0; a < n_q; a++) t += Q[(size_t) a * d + i] * W[(size_t) a * rr + k];
                    V[(size_t) i * rr + k] = t * s;
                }
            }
            rc = squat_factor_from_eig(d, rr, lam, V, lambda, normalize, U);
        }
    }
    if (rc != 0) identity_f(d, U);
    free(Q); free(K); free(W); free(V); free(lam);
    return rc;
}

int pkv_squat_prepare(const float * q, int64_t n_q, int d, int r, float lambda,
                      int normalize, float * U) {
    if (!U || d < 1 || d > PKV_LINALG_MAX_N) return -1;
    identity_f(d, U);
    if (n_q < 0 || r < 0 || !isfinite(lambda) || lambda < 0.0f || (!q && n_q > 0)) return -1;
    if (n_q == 0 || r == 0 || lambda == 0.0f) return 0;
    if (n_q < d) {
        return squat_prepare_rows(q, (int) n_q, d, r < n_q ? r : (int) n_q, lambda, normalize, U);
    }

    const size_t dd = (size_t) d * d;
    double * C   = calloc(dd, sizeof(double));
    float  * Cf  = malloc(dd * sizeof(float));
    double * row = malloc((size_t) d * sizeof(double));
    if (!C || !Cf || !row) {
        free(C); free(Cf); free(row);
        return -2;
    }
    /* C = q^T q (upper triangle, then mirrored); non-finite entries count as 0 */
    for (int64_t t = 0; t < n_q; t++) {
        const float * qt = q + t * d;
        for (int i = 0; i < d; i++) row[i] = isfinite(qt[i]) ? (double) qt[i] : 0.0;
        for (int i = 0; i < d; i++) {
            const double ri = row[i];
            if (ri == 0.0) continue;
            double * ci = C + (size_t) i * d;
            for (int j = i; j < d; j++) ci[j] += ri * row[j];
        }
    }
    for (int i = 0; i < d; i++) {
        for (int j = 0; j < i; j++) C[(size_t) i * d + j] = C[(size_t) j * d + i];
    }
    for (size_t i = 0; i < dd; i++) Cf[i] = (float) C[i];
    const int rc = pkv_squat_prepare_gram(Cf, n_q, d, r, lambda, normalize, U);
    free(C); free(Cf); free(row);
    return rc;
}

/* All three block structs are {d, m, payload}: payload starts at byte 4. */
#define PKV_PAYLOAD(blk) ((uint8_t *)(blk) + 2 * sizeof(uint16_t))

/* Work buffer on the stack for usual head sizes; malloc beyond. */
#define PKV_SQUAT_STACK_D 512

/* The OBS error feedback, w[c] -= err * u[c] for c < n: nearly all of the
 * encoder's d^2/2 flops. Both versions round once per element (fma), so the
 * AVX2 one is bit-identical to the scalar reference, and so is the CUDA
 * encoder (native/cuda/pkv_codec.cu), which runs the same float32 steps. */
static void obs_update_scalar(float * w, const float * u, float err, int n) {
    for (int c = 0; c < n; c++) w[c] = fmaf(-err, u[c], w[c]);
}

#ifdef PKV_SQUAT_AVX2
static void obs_update_avx2(float * w, const float * u, float err, int n) {
    const __m256 e = _mm256_set1_ps(err);
    int c = 0;
    for (; c + 16 <= n; c += 16) {
        _mm256_storeu_ps(w + c,     _mm256_fnmadd_ps(e, _mm256_loadu_ps(u + c),     _mm256_loadu_ps(w + c)));
        _mm256_storeu_ps(w + c + 8, _mm256_fnmadd_ps(e, _mm256_loadu_ps(u + c + 8), _mm256_loadu_ps(w + c + 8)));
    }
    obs_update_scalar(w + c, u + c, err, n - c);
}
#endif

typedef void (*obs_update_fn)(float * w, const float * u, float err, int n);

/* float32 throughout (it was float64 until 2026-12-07): U is fp16 in the side
 * state, and on the GPU the serial column chain of one key is latency-bound:
 * float ops and no conversions there took a decode step's encoder from 19.0 to
 * 14.3 us on an H100 (docs/speed.md). The KLD moved by no more than a 1e-4
 * change of lambda moves it (docs/squat.md). */
static void squat_quantize_row(int bits, const float * k, const float * U, int d, void * out,
                               obs_update_fn obs_update) {
    const size_t bsz = pkv_block_bytes(bits);
    if (bsz == 0 || !k || !U || !out || d < PKV_BLOCK || d % PKV_BLOCK != 0) return;

    float stack_w[PKV_SQUAT_STACK_D];
    float * w = d <= PKV_SQUAT_STACK_D ? stack_w : malloc((size_t) d * sizeof(float));
    if (!w) {
        /* out of memory: still write a valid (plain) encoding */
        pkv_quantize_row(bits, k, out, d);
        return;
    }
    for (int i = 0; i < d; i++) w[i] = sanitize(k[i]);

    const int L = (1 << bits) - 1;
    uint8_t codes[PKV_BLOCK];
    for (int b = 0; b < d / PKV_BLOCK; b++) {
        const int j0 = b * PKV_BLOCK;
        /* The block's scale and minimum from its current (error-updated)
         * values by the min/max rule, not the plain encoder's error-minimising
         * search: that search clips a block's extremes, and clipped errors
         * fed forward by the OBS updates below pile up. Measured at ctx 2048
         * (docs/quality.md): with the search, squat4's KLD on Qwen2.5 doubled
         * (0.092 -> 0.196, p99 0.87 -> 3.6); with a no-clip search it was
         * 0.115; on SmolLM2 the search would gain 0.043 -> 0.035. */
        uint16_t dm[2];
        float wb[PKV_BLOCK];
        for (int i = 0; i < PKV_BLOCK; i++) wb[i] = sanitize(w[j0 + i]);
        pkv_block_scale_minmax(bits, wb, &dm[0], &dm[1]);
        const float dq = pkv_fp16_to_fp32(dm[0]);
        const float m  = pkv_fp16_to_fp32(dm[1]);
        const float id = dq > 0.0f ? 1.0f / dq : 0.0f;

        for (int i = 0; i < PKV_BLOCK; i++) {
            const int j = j0 + i;
            /* the codec's rounding expression, on the updated value */
            const float x = sanitize(w[j]);
            const float qf = floorf((x - m) * id + 0.5f);
            const int code = qf < 0.0f ? 0 : (qf > (float) L ? L : (int) qf);
            codes[i] = (uint8_t) code;

            /* OBS step: spread this column's error over the later columns,
             * weighted by row j of the Cholesky factor of A^-1. The error is
             * times the rounded reciprocal of U[j][j] (0 where U[j][j] is not
             * positive and finite: nothing propagates), not a division: the
             * CUDA encoder takes the reciprocal off its serial chain this way.
             * dq * code is exact in float32 (11 x 4 bits), so the fma is the
             * codec's m + d * code with one rounding. */
            const float ujj = U[(size_t) j * d + j];
            const float rinv = (ujj > 0.0f && isfinite(ujj)) ? 1.0f / ujj : 0.0f;
            const float qv = fmaf(dq, (float) code, m);
            const float err = (w[j] - qv) * rinv;
            if (err == 0.0f) continue;
            obs_update(w + j + 1, U + (size_t) j * d + j + 1, err, d - j - 1);
        }

        uint8_t * blk = (uint8_t *) out + (size_t) b * bsz;
        memcpy(blk, dm, sizeof(dm));
        pkv_pack_codes(bits, codes, PKV_PAYLOAD(blk));
    }

    if (w != stack_w) free(w);
}

void pkv_squat_quantize_row(int bits, const float * k, const float * U, int d, void * out) {
#ifdef PKV_SQUAT_AVX2
    squat_quantize_row(bits, k, U, d, out, obs_update_avx2);
#else
    squat_quantize_row(bits, k, U, d, out, obs_update_scalar);
#endif
}

void pkv_squat_quantize_row_ref(int bits, const float * k, const float * U, int d, void * out) {
    squat_quantize_row(bits, k, U, d, out, obs_update_scalar);
}

void pkv_squat_quantize_rows(int bits, const float * k, int64_t n_rows, int n_heads,
                             const float * U_per_head, int d, void * out) {
    const size_t bsz = pkv_block_bytes(bits);
    if (bsz == 0 || !k || !U_per_head || !out || n_rows < 0 || n_heads < 1 ||
        d < PKV_BLOCK || d % PKV_BLOCK != 0) return;
    const size_t head_bytes = (size_t) (d / PKV_BLOCK) * bsz;
    for (int64_t r = 0; r < n_rows; r++) {
        for (int h = 0; h < n_heads; h++) {
            const int64_t idx = r * n_heads + h;
            pkv_squat_quantize_row(bits, k + idx * d, U_per_head + (size_t) h * d * d, d,
                                   (uint8_t *) out + (size_t) idx * head_bytes);
        }
    }
}

/* Packed storage of U: the upper triangle row by row (row j: U[j][j..d-1]) in
 * fp16. Row j starts at j*d - j*(j-1)/2. */
static size_t packed_row(int d, int j) {
    return (size_t) j * (size_t) d - (size_t) j * (size_t) (j - 1) / 2;
}

size_t pkv_squat_packed_len(int d) {
    return d > 0 ? (size_t) d * (size_t) (d + 1) / 2 : 0;
}

void pkv_squat_pack(const float * U, int d, uint16_t * Up) {
    if (!U || !Up || d < 1) return;
    for (int j = 0; j < d; j++) {
        uint16_t * row = Up + packed_row(d, j);
        for (int c = j; c < d; c++) row[c - j] = pkv_fp32_to_fp16(U[(size_t) j * d + c]);
    }
}

void pkv_squat_unpack(const uint16_t * Up, int d, float * U) {
    if (!U || !Up || d < 1) return;
    for (int j = 0; j < d; j++) {
        const uint16_t * row = Up + packed_row(d, j);
        float * u = U + (size_t) j * d;
        for (int c = 0; c < j; c++) u[c] = 0.0f;
        for (int c = j; c < d; c++) u[c] = pkv_fp16_to_fp32(row[c - j]);
    }
}
