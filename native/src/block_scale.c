/* The scale d and minimum m of one kv* block: an error-minimising search
 * (issue 16, lever 1 of docs/quality-levers.md).
 *
 * The min/max rule (m = min, d = (max - min) / L) spends two levels on the
 * block's two extremes, wherever the other 62 values sit; on post-rotation K
 * and V it leaves 15-50% of the squared error a better grid removes (more at
 * 3 and 2 bits). So the encoder tries a few code grids and keeps the (d, m)
 * with the least squared error of the values it will actually store:
 *
 *   0.    the min/max rule (the old encoder): the result is never worse
 *         (but for a block reaching +65504, where d is rounded down so that
 *         the top level still fits fp16);
 *   1-24. 8 starting grids, iscale = (L - 0.5 + i) / (max - min), i = 0..3,
 *         codes rounded from the minimum or from the maximum; for each, three
 *         rounds of "least-squares (d, m) for these codes, rounded to fp16,
 *         codes again against the rounded pair" (a Lloyd iteration), each
 *         round a candidate.
 *
 * Every candidate is scored with the fp16 (d, m) that decode reads and the
 * codec's own rounding expression, so the score is the stored block's error.
 * Ties keep the earliest candidate. Measured on Gaussian and Laplace blocks
 * this keeps all but ~1.5% (4 bits) to 2% (2 bits) of what a 51-grid search
 * with 4 Lloyd rounds gains (bench/qsim kv_opt_params).
 *
 * Decode is unchanged (same layout, same m + d * code): only encoders change.
 * The CUDA encoder (block_params_warp, native/cuda/pkv_codec.cu) runs the same
 * candidates on a warp, so every float operation here is spelled to match it:
 * this file is compiled without fp contraction, and every sum over the 64
 * values is taken in a warp butterfly's order (warp_order_sum). */
#include "pkv_internal.h"

#include <math.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

/* Sum of 64 floats in the order a warp adds them when lane l holds values l
 * and l + 32 and reduces with xor shuffles 16, 8, 4, 2, 1 (float addition is
 * commutative, so every lane ends with this same value). */
static float warp_order_sum(const float * v) {
    float p[32];
    for (int l = 0; l < 32; l++) p[l] = v[l] + v[l + 32];
    for (int o = 16; o > 0; o >>= 1) {
        for (int l = 0; l < o; l++) p[l] = p[l] + p[l + o];
    }
    return p[0];
}

#if defined(__AVX2__)
/* The same sum from eight vectors (v[k] = values 8k..8k+7), the same adds in
 * the same order: the encoder is the whole cost of a CPU set_rows, and the
 * scalar loops made it ~10 us per block. */
static inline float warp_order_sum8(const __m256 v[8]) {
    const __m256 a0 = _mm256_add_ps(v[0], v[4]), a1 = _mm256_add_ps(v[1], v[5]);    /* l, l + 32 */
    const __m256 a2 = _mm256_add_ps(v[2], v[6]), a3 = _mm256_add_ps(v[3], v[7]);
    const __m256 b0 = _mm256_add_ps(a0, a2), b1 = _mm256_add_ps(a1, a3);            /* l, l + 16 */
    const __m256 c = _mm256_add_ps(b0, b1);                                          /* l, l + 8 */
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(c), _mm256_extractf128_ps(c, 1));  /* l, l + 4 */
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));                                          /* l, l + 2 */
    t = _mm_add_ss(t, _mm_shuffle_ps(t, t, 1));                                      /* 0, 1 */
    return _mm_cvtss_f32(t);
}

/* the codec's code of each value: floor((x - m) * id + 0.5) clamped to [0, L]
 * exactly as the scalar ternaries do it (so -0 stays -0) */
static inline __m256 codes8(__m256 xv, __m256 m, __m256 id, __m256 Lv) {
    const __m256 zero = _mm256_setzero_ps();
    __m256 c = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(xv, m), id), _mm256_set1_ps(0.5f)));
    c = _mm256_blendv_ps(c, Lv, _mm256_cmp_ps(c, Lv, _CMP_GT_OQ));
    return _mm256_blendv_ps(c, zero, _mm256_cmp_ps(c, zero, _CMP_LT_OQ));
}
#endif

/* Squared error of the block stored as (d, m) with the codec's rounding; the
 * codes it gets go to q (as floats: they feed the next least-squares fit). */
static float stored_error(int L, const float * x, float d, float m, float * q) {
    const float id = d > 0.0f ? 1.0f / d : 0.0f;
#if defined(__AVX2__)
    const __m256 mv = _mm256_set1_ps(m), dv = _mm256_set1_ps(d), idv = _mm256_set1_ps(id), Lv = _mm256_set1_ps((float) L);
    __m256 e[8];
    for (int k = 0; k < 8; k++) {
        const __m256 xv = _mm256_loadu_ps(x + 8 * k);
        const __m256 c = codes8(xv, mv, idv, Lv);
        _mm256_storeu_ps(q + 8 * k, c);
        const __m256 t = _mm256_sub_ps(_mm256_add_ps(mv, _mm256_mul_ps(dv, c)), xv);
        e[k] = _mm256_mul_ps(t, t);
    }
    return warp_order_sum8(e);
#else
    float e[PKV_BLOCK];
    for (int i = 0; i < PKV_BLOCK; i++) {
        float c = floorf((x[i] - m) * id + 0.5f);
        c = c < 0.0f ? 0.0f : (c > (float) L ? (float) L : c);
        q[i] = c;
        const float t = (m + d * c) - x[i];
        e[i] = t * t;
    }
    return warp_order_sum(e);
#endif
}

/* sum(q), sum(q^2), sum(q y) in the warp's order */
static void fit_sums(const float * q, const float * y, float * sq, float * sqq, float * sqy) {
#if defined(__AVX2__)
    __m256 a[8], b[8], c[8];
    for (int k = 0; k < 8; k++) {
        const __m256 qv = _mm256_loadu_ps(q + 8 * k);
        a[k] = qv;
        b[k] = _mm256_mul_ps(qv, qv);
        c[k] = _mm256_mul_ps(qv, _mm256_loadu_ps(y + 8 * k));
    }
    *sq = warp_order_sum8(a);
    *sqq = warp_order_sum8(b);
    *sqy = warp_order_sum8(c);
#else
    float qq[PKV_BLOCK], qy[PKV_BLOCK];
    for (int i = 0; i < PKV_BLOCK; i++) {
        qq[i] = q[i] * q[i];
        qy[i] = q[i] * y[i];
    }
    *sq = warp_order_sum(q);
    *sqq = warp_order_sum(qq);
    *sqy = warp_order_sum(qy);
#endif
}

/* Least-squares (d, m) of x ~ m + d q for the codes q, with y = x - mn and
 * sy = sum(y) (fewer cancelled bits than fitting x itself), rounded to fp16.
 * 0 when the fit is degenerate (one distinct code), does not fit fp16, or its
 * top level m + L d would decode beyond 65504: the CUDA flash attention turns
 * K and V into fp16 tiles, where that would be Inf. */
static int fit_fp16(int L, const float * q, const float * y, float sy, float mn, uint16_t * dh, uint16_t * mh) {
    float sq, sqq, sqy;
    fit_sums(q, y, &sq, &sqq, &sqy);
    const float det = (float) PKV_BLOCK * sqq - sq * sq;       /* exact: integers below 2^24 */
    if (!(det > 0.0f)) return 0;
    const float d = ((float) PKV_BLOCK * sqy - sq * sy) / det;
    const float m = mn + (sy - d * sq) * (1.0f / (float) PKV_BLOCK);
    if (!(d > 0.0f) || !(d <= 65504.0f) || !(m >= -65504.0f && m <= 65504.0f)) return 0;
    *dh = pkv_fp32_to_fp16(d);
    *mh = pkv_fp32_to_fp16(m);
    const float dq = pkv_fp16_to_fp32(*dh);
    return dq > 0.0f && pkv_fp16_to_fp32(*mh) + (float) L * dq <= 65504.0f;
}

static void block_minmax(const float * x, float * mn, float * mx) {
    float lo = x[0], hi = x[0];
    for (int i = 1; i < PKV_BLOCK; i++) {
        lo = x[i] < lo ? x[i] : lo;     /* ties keep the first (matters only for +-0) */
        hi = x[i] > hi ? x[i] : hi;
    }
    *mn = lo;
    *mx = hi;
}

/* The min/max rule: m = fp16(min), d = fp16((max - m) / L), d one fp16 step
 * smaller where rounding it up would put the top level beyond 65504 (Inf in
 * an fp16 tile). */
static void minmax_rule(int L, float mn, float mx, uint16_t * dh, uint16_t * mh) {
    *mh = pkv_fp32_to_fp16(mn);
    *dh = pkv_fp32_to_fp16((mx - pkv_fp16_to_fp32(*mh)) / (float) L);
    if (pkv_fp16_to_fp32(*mh) + (float) L * pkv_fp16_to_fp32(*dh) > 65504.0f) (*dh)--;
}

void pkv_block_scale_minmax(int bits, const float * x, uint16_t * d_out, uint16_t * m_out) {
    float mn, mx;
    block_minmax(x, &mn, &mx);
    minmax_rule((1 << bits) - 1, mn, mx, d_out, m_out);
}

/* x: 64 sanitized values (finite, within the fp16 range). */
void pkv_block_scale_search(int bits, const float * x, uint16_t * d_out, uint16_t * m_out) {
    const int L = (1 << bits) - 1;
    float mn, mx;
    block_minmax(x, &mn, &mx);
    /* candidate 0: the min/max rule */
    uint16_t bd, bm;
    minmax_rule(L, mn, mx, &bd, &bm);
    float q[PKV_BLOCK];
    float best = stored_error(L, x, pkv_fp16_to_fp32(bd), pkv_fp16_to_fp32(bm), q);

    const float range = mx - mn;
    if (range > 0.0f && isfinite((float) L / range)) {
        float y[PKV_BLOCK];
        for (int i = 0; i < PKV_BLOCK; i++) y[i] = x[i] - mn;
        const float sy = warp_order_sum(y);
        for (int g = 0; g < 8; g++) {
            const float isc = ((float) L - 0.5f + (float) (g >> 1)) / range;
#if defined(__AVX2__)
            const __m256 iv = _mm256_set1_ps(isc), Lv = _mm256_set1_ps((float) L), mxv = _mm256_set1_ps(mx);
            for (int k = 0; k < 8; k++) {
                const __m256 v = g & 1 ? _mm256_sub_ps(mxv, _mm256_loadu_ps(x + 8 * k)) : _mm256_loadu_ps(y + 8 * k);
                __m256 c = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(v, iv), _mm256_set1_ps(0.5f)));
                c = _mm256_blendv_ps(c, Lv, _mm256_cmp_ps(c, Lv, _CMP_GT_OQ));
                _mm256_storeu_ps(q + 8 * k, g & 1 ? _mm256_sub_ps(Lv, c) : c);
            }
#else
            for (int i = 0; i < PKV_BLOCK; i++) {
                /* from the minimum (even g) or down from the maximum (odd g) */
                float c = floorf((g & 1 ? mx - x[i] : y[i]) * isc + 0.5f);
                c = c > (float) L ? (float) L : c;
                q[i] = g & 1 ? (float) L - c : c;
            }
#endif
            for (int r = 0; r < 3; r++) {
                uint16_t dh, mh;
                if (!fit_fp16(L, q, y, sy, mn, &dh, &mh)) break;
                const float e = stored_error(L, x, pkv_fp16_to_fp32(dh), pkv_fp16_to_fp32(mh), q);
                if (e < best) {
                    best = e;
                    bd = dh;
                    bm = mh;
                }
            }
        }
    }
    *d_out = bd;
    *m_out = bm;
}
