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

/* Squared error of the block stored as (d, m) with the codec's rounding; the
 * codes it gets go to q (as floats: they feed the next least-squares fit). */
static float stored_error(int L, const float * x, float d, float m, float * q) {
    const float id = d > 0.0f ? 1.0f / d : 0.0f;
    float e[PKV_BLOCK];
    for (int i = 0; i < PKV_BLOCK; i++) {
        float c = floorf((x[i] - m) * id + 0.5f);
        c = c < 0.0f ? 0.0f : (c > (float) L ? (float) L : c);
        q[i] = c;
        const float t = (m + d * c) - x[i];
        e[i] = t * t;
    }
    return warp_order_sum(e);
}

/* Least-squares (d, m) of x ~ m + d q for the codes q, with y = x - mn and
 * sy = sum(y) (fewer cancelled bits than fitting x itself), rounded to fp16.
 * 0 when the fit is degenerate (one distinct code), does not fit fp16, or its
 * top level m + L d would decode beyond 65504: the CUDA flash attention turns
 * K and V into fp16 tiles, where that would be Inf. */
static int fit_fp16(int L, const float * q, const float * y, float sy, float mn, uint16_t * dh, uint16_t * mh) {
    float qq[PKV_BLOCK], qy[PKV_BLOCK];
    for (int i = 0; i < PKV_BLOCK; i++) {
        qq[i] = q[i] * q[i];
        qy[i] = q[i] * y[i];
    }
    const float sq = warp_order_sum(q), sqq = warp_order_sum(qq), sqy = warp_order_sum(qy);
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
            for (int i = 0; i < PKV_BLOCK; i++) {
                /* from the minimum (even g) or down from the maximum (odd g) */
                float c = floorf((g & 1 ? mx - x[i] : y[i]) * isc + 0.5f);
                c = c > (float) L ? (float) L : c;
                q[i] = g & 1 ? (float) L - c : c;
            }
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
