/* Flash-attention decode over our block rows: the scalar reference and the
 * entry point (AVX2 when compiled in). See pkv/attention.h. */
#include "pkv/attention.h"
#include "pkv_internal.h"

#include <math.h>
#include <string.h>

static bool args_ok(const pkv_fa_decode_args * a) {
    return a && a->n_q >= 1 && a->n_q <= PKV_FA_MAX_Q &&
           a->dk > 0 && a->dk % PKV_BLOCK == 0 && a->dk <= PKV_FA_MAX_D &&
           a->dv > 0 && a->dv % PKV_BLOCK == 0 && a->dv <= PKV_FA_MAX_D &&
           pkv_block_bytes(a->bits_k) && pkv_block_bytes(a->bits_v) && a->n_kv >= 0 &&
           a->partial_stride >= (size_t) a->dv + 2;
}

bool pkv_fa_decode_chunk_ref(const pkv_fa_decode_args * a) {
    if (!args_ok(a)) {
        return false;
    }
    pkv_block_q8_1 q8[PKV_FA_MAX_D / PKV_Q8_1_BLOCK];
    for (int i = 0; i < a->n_q; i++) {
        float * part = a->partials + i * a->partial_stride;
        float * acc  = part + 2;
        float M = -INFINITY, S = 0.0f;
        memset(acc, 0, sizeof(float) * a->dv);
        pkv_quantize_row_q8_1_ref(a->q + i * a->q_stride, q8, a->dk);
        for (int64_t r = 0; r < a->n_kv; r++) {
            const float mv = a->mask ? pkv_fp16_to_fp32(a->mask[r]) : 0.0f;
            if (mv == -INFINITY) {
                continue;
            }
            const void * kr = (const char *) a->k + r * a->k_stride;
            const void * vr = (const char *) a->v + r * a->v_stride;
            const float s = pkv_dot_row_q8_1(a->bits_k, kr, q8, a->dk) * a->scale + mv;
            float vs = 1.0f;
            if (s > M) {
                const float ms = expf(M - s);   /* 0 for the first row */
                for (int j = 0; j < a->dv; j++) {
                    acc[j] *= ms;
                }
                S *= ms;
                M = s;
            } else {
                vs = expf(s - M);
            }
            pkv_vec_mad_row(a->bits_v, acc, vr, vs, a->dv);
            S += vs;
        }
        part[0] = M;
        part[1] = S;
    }
    return true;
}

void pkv_fa_merge_partials(const float * partials, size_t stride, int n, int dv, float * out) {
    float M = -INFINITY, S = 0.0f;
    memset(out, 0, sizeof(float) * dv);
    for (int c = 0; c < n; c++) {
        const float * p = partials + c * stride;
        if (p[1] == 0.0f) {
            continue;
        }
        const float Mn = p[0] > M ? p[0] : M;
        const float so = expf(M - Mn), sn = expf(p[0] - Mn);   /* so = 0 for the first live chunk */
        for (int j = 0; j < dv; j++) {
            out[j] = out[j] * so + p[2 + j] * sn;
        }
        S = S * so + p[1] * sn;
        M = Mn;
    }
    const float inv = S == 0.0f ? 0.0f : 1.0f / S;
    for (int j = 0; j < dv; j++) {
        out[j] *= inv;
    }
}

#if !defined(__AVX2__)
bool pkv_fa_decode_chunk(const pkv_fa_decode_args * a) {
    return pkv_fa_decode_chunk_ref(a);
}
#endif
