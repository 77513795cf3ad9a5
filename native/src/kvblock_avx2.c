/* AVX2 paths for the block codec: the K dot product against q8_1 and the row
 * decode that flash attention uses for V. Compiled in when the build targets
 * AVX2 (GGML_NATIVE / -march=native on such a CPU), as ggml selects its own
 * kernels; the scalar code in kvblock.c stays the reference. */
#include "pkv_internal.h"
#include "pkv/attention.h"

#if defined(__AVX2__)
#include <immintrin.h>
#include <math.h>
#include <string.h>

/* The 64 codes of one block as two vectors: values 0..31 and 32..63, one byte
 * each. The layouts in codec.h were chosen so this is shifts and masks only. */
static inline void unpack64(int bits, const uint8_t * p, __m256i * c0, __m256i * c1) {
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    const __m128i m2 = _mm_set1_epi8(0x03);
    if (bits == 4) {
        const __m256i q = _mm256_loadu_si256((const __m256i *) p);
        *c0 = _mm256_and_si256(q, m4);
        *c1 = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
        return;
    }
    /* 2-bit plane: value j + 16*s lives in bits 2s..2s+1 of byte j */
    const __m128i q = _mm_loadu_si128((const __m128i *) p);
    const __m128i s0 = _mm_and_si128(q, m2);
    const __m128i s1 = _mm_and_si128(_mm_srli_epi16(q, 2), m2);
    const __m128i s2 = _mm_and_si128(_mm_srli_epi16(q, 4), m2);
    const __m128i s3 = _mm_and_si128(_mm_srli_epi16(q, 6), m2);
    *c0 = _mm256_set_m128i(s1, s0);
    *c1 = _mm256_set_m128i(s3, s2);
    if (bits == 3) {
        /* third bit of value j: bit j/8 of qh[j%8]. Byte j of the broadcast
         * holds qh[j%8]; test it against the bit for j/8, map hits to 4. */
        int64_t qh;
        memcpy(&qh, p + 16, 8);
        const __m256i h = _mm256_set1_epi64x(qh);
        const __m256i b0 = _mm256_setr_epi64x(0x0101010101010101LL, 0x0202020202020202LL,
                                              0x0404040404040404LL, 0x0808080808080808LL);
        const __m256i b1 = _mm256_slli_epi64(b0, 4);
        const __m256i four = _mm256_set1_epi8(4);
        *c0 = _mm256_or_si256(*c0, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, b0), b0), four));
        *c1 = _mm256_or_si256(*c1, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, b1), b1), four));
    }
}

/* The 64 unpacked codes as eight vectors of 8 floats (values 8p .. 8p+7). */
static inline void codes_to_f32(__m256i c0, __m256i c1, __m256 cf[8]) {
    const __m128i parts[4] = { _mm256_castsi256_si128(c0), _mm256_extracti128_si256(c0, 1),
                               _mm256_castsi256_si128(c1), _mm256_extracti128_si256(c1, 1) };
    for (int p = 0; p < 8; p++) {
        const __m128i c8 = (p & 1) ? _mm_srli_si128(parts[p / 2], 8) : parts[p / 2];
        cf[p] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c8));
    }
}

static inline __m256 dot32_u8_i8(__m256i codes, const int8_t * y) {
    const __m256i yv = _mm256_loadu_si256((const __m256i *) y);
    const __m256i p16 = _mm256_maddubs_epi16(codes, yv);       /* |sum| <= 2*15*127 */
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

float pkv_dot_row_q8_1_avx2(int bits, const void * vx, const void * vy, int n) {
    const size_t bsz = pkv_block_bytes(bits);
    const pkv_block_q8_1 * y = (const pkv_block_q8_1 *) vy;
    __m256 acc = _mm256_setzero_ps();
    float macc = 0.0f;
    for (int i = 0; i < n / PKV_BLOCK; i++, y += 2) {
        const uint8_t * blk = (const uint8_t *) vx + i * bsz;
        uint16_t dm[2];
        memcpy(dm, blk, sizeof(dm));
        __m256i c0, c1;
        unpack64(bits, blk + 4, &c0, &c1);
        const float dx = pkv_fp16_to_fp32(dm[0]);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(dx * pkv_fp16_to_fp32(y[0].d)), dot32_u8_i8(c0, y[0].qs), acc);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(dx * pkv_fp16_to_fp32(y[1].d)), dot32_u8_i8(c1, y[1].qs), acc);
        macc += pkv_fp16_to_fp32(dm[1]) * (pkv_fp16_to_fp32(y[0].s) + pkv_fp16_to_fp32(y[1].s));
    }
    return hsum(acc) + macc;
}

/* out[0..k) = v * decode(x), or out += v * decode(x) when accumulate: decode
 * (v = 1) and flash attention's V accumulation share the unpacking. The weight
 * is folded into the block's scale and minimum; with v = 1 that is exact. */
static inline void affine_row(int bits, const void * x, float * out, int64_t k, float v, int accumulate) {
    const size_t bsz = pkv_block_bytes(bits);
    for (int64_t i = 0; i < k / PKV_BLOCK; i++, out += PKV_BLOCK) {
        const uint8_t * blk = (const uint8_t *) x + i * bsz;
        uint16_t dm[2];
        memcpy(dm, blk, sizeof(dm));
        const __m256 d = _mm256_set1_ps(v * pkv_fp16_to_fp32(dm[0]));
        const __m256 m = _mm256_set1_ps(v * pkv_fp16_to_fp32(dm[1]));
        __m256i c0, c1;
        unpack64(bits, blk + 4, &c0, &c1);
        __m256 cf[8];
        codes_to_f32(c0, c1, cf);
        for (int p = 0; p < 8; p++) {
            __m256 r = _mm256_fmadd_ps(cf[p], d, m);
            if (accumulate) {
                r = _mm256_add_ps(_mm256_loadu_ps(out + 8 * p), r);
            }
            _mm256_storeu_ps(out + 8 * p, r);
        }
    }
}

void pkv_dequantize_row_avx2(int bits, const void * x, float * out, int64_t k) {
    affine_row(bits, x, out, k, 1.0f, 0);
}

void pkv_vec_mad_row_avx2(int bits, float * y, const void * x, float v, int n) {
    affine_row(bits, x, y, n, v, 1);
}

/* ---- flash-attention decode (pkv/attention.h) -------------------------------------- */

/* fp16 -> fp32 inline: the conversions sit in the innermost loops here. */
static inline float h2f(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    return pkv_fp16_to_fp32(h);
#endif
}

#define PKV_FA_TILE 32

bool pkv_fa_decode_chunk(const pkv_fa_decode_args * a) {
    if (!a || a->n_q < 1 || a->n_q > PKV_FA_MAX_Q || a->dk <= 0 || a->dk % PKV_BLOCK || a->dk > PKV_FA_MAX_D ||
        a->dv <= 0 || a->dv % PKV_BLOCK || a->dv > PKV_FA_MAX_D || !pkv_block_bytes(a->bits_k) ||
        !pkv_block_bytes(a->bits_v) || a->n_kv < 0 || a->partial_stride < (size_t) a->dv + 2) {
        return false;
    }
    const int nq = a->n_q;
    const int nbk = a->dk / PKV_BLOCK, nbv = a->dv / PKV_BLOCK;
    const size_t bk = pkv_block_bytes(a->bits_k), bv = pkv_block_bytes(a->bits_v);

    /* queries as q8_1, with their scales and sums as floats */
    pkv_block_q8_1 q8[PKV_FA_MAX_Q][PKV_FA_MAX_D / PKV_Q8_1_BLOCK];
    float qd[PKV_FA_MAX_Q][PKV_FA_MAX_D / PKV_Q8_1_BLOCK];
    float qsum[PKV_FA_MAX_Q][PKV_FA_MAX_D / PKV_BLOCK];
    for (int i = 0; i < nq; i++) {
        pkv_quantize_row_q8_1_ref(a->q + i * a->q_stride, q8[i], a->dk);
        for (int b = 0; b < 2 * nbk; b++) {
            qd[i][b] = h2f(q8[i][b].d);
        }
        for (int b = 0; b < nbk; b++) {
            qsum[i][b] = h2f(q8[i][2 * b].s) + h2f(q8[i][2 * b + 1].s);
        }
    }

    float M[PKV_FA_MAX_Q], S[PKV_FA_MAX_Q];
    float * acc[PKV_FA_MAX_Q];
    /* V minimums: sum_r p_r * m_r per block, added to acc at the end (kept
     * apart so each row costs one FMA per 8 values, not two) */
    float macc[PKV_FA_MAX_Q][PKV_FA_MAX_D / PKV_BLOCK];
    for (int i = 0; i < nq; i++) {
        M[i] = -INFINITY;
        S[i] = 0.0f;
        acc[i] = a->partials + i * a->partial_stride + 2;
        memset(acc[i], 0, sizeof(float) * a->dv);
        memset(macc[i], 0, sizeof(macc[i]));
    }

    float sc[PKV_FA_MAX_Q][PKV_FA_TILE];
    uint8_t live[PKV_FA_TILE];
    const __m256i ones = _mm256_set1_epi16(1);

    for (int64_t t0 = 0; t0 < a->n_kv; t0 += PKV_FA_TILE) {
        const int nt = (int) (a->n_kv - t0 < PKV_FA_TILE ? a->n_kv - t0 : PKV_FA_TILE);
        int n_live = 0;

        /* 1. scores of the tile: each K row unpacked once for all queries */
        for (int r = 0; r < nt; r++) {
            const float mv = a->mask ? h2f(a->mask[t0 + r]) : 0.0f;
            live[r] = mv != -INFINITY;
            if (!live[r]) {
                continue;
            }
            n_live++;
            const uint8_t * kr = (const uint8_t *) a->k + (t0 + r) * a->k_stride;
            float sum[PKV_FA_MAX_Q] = { 0 };
            for (int b = 0; b < nbk; b++) {
                const uint8_t * blk = kr + b * bk;
                uint16_t dm[2];
                memcpy(dm, blk, sizeof(dm));
                const float dk = h2f(dm[0]), mk = h2f(dm[1]);
                __m256i c0, c1;
                unpack64(a->bits_k, blk + 4, &c0, &c1);
                for (int i = 0; i < nq; i++) {
                    const __m256i y0 = _mm256_loadu_si256((const __m256i *) q8[i][2 * b].qs);
                    const __m256i y1 = _mm256_loadu_si256((const __m256i *) q8[i][2 * b + 1].qs);
                    const __m256 f0 = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(c0, y0), ones));
                    const __m256 f1 = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(c1, y1), ones));
                    const __m256 f = _mm256_fmadd_ps(_mm256_set1_ps(qd[i][2 * b]), f0,
                                                     _mm256_mul_ps(_mm256_set1_ps(qd[i][2 * b + 1]), f1));
                    sum[i] += dk * hsum(f) + mk * qsum[i][b];
                }
            }
            for (int i = 0; i < nq; i++) {
                sc[i][r] = sum[i] * a->scale + mv;
            }
        }
        if (n_live == 0) {
            continue;
        }

        /* 2. online softmax, once per tile: rescale only when the max grows */
        for (int i = 0; i < nq; i++) {
            float tmax = -INFINITY;
            for (int r = 0; r < nt; r++) {
                if (live[r] && sc[i][r] > tmax) {
                    tmax = sc[i][r];
                }
            }
            if (tmax > M[i]) {
                const float ms = expf(M[i] - tmax);   /* 0 on the first live tile */
                const __m256 vms = _mm256_set1_ps(ms);
                for (int j = 0; j < a->dv; j += 8) {
                    _mm256_storeu_ps(acc[i] + j, _mm256_mul_ps(vms, _mm256_loadu_ps(acc[i] + j)));
                }
                for (int b = 0; b < nbv; b++) {
                    macc[i][b] *= ms;
                }
                S[i] *= ms;
                M[i] = tmax;
            }
            float ssum = 0.0f;
            for (int r = 0; r < nt; r++) {
                const float p = live[r] ? expf(sc[i][r] - M[i]) : 0.0f;
                sc[i][r] = p;
                ssum += p;
            }
            S[i] += ssum;
        }

        /* 3. V: each row's codes converted to float once for all queries */
        for (int r = 0; r < nt; r++) {
            if (!live[r]) {
                continue;
            }
            const uint8_t * vr = (const uint8_t *) a->v + (t0 + r) * a->v_stride;
            for (int b = 0; b < nbv; b++) {
                const uint8_t * blk = vr + b * bv;
                uint16_t dm[2];
                memcpy(dm, blk, sizeof(dm));
                const float dvs = h2f(dm[0]), mvs = h2f(dm[1]);
                __m256i c0, c1;
                unpack64(a->bits_v, blk + 4, &c0, &c1);
                __m256 cf[8];
                codes_to_f32(c0, c1, cf);
                for (int i = 0; i < nq; i++) {
                    const float w = sc[i][r];
                    const __m256 wd = _mm256_set1_ps(w * dvs);
                    float * ap = acc[i] + b * PKV_BLOCK;
                    for (int p = 0; p < 8; p++) {
                        _mm256_storeu_ps(ap + 8 * p, _mm256_fmadd_ps(wd, cf[p], _mm256_loadu_ps(ap + 8 * p)));
                    }
                    macc[i][b] += w * mvs;
                }
            }
        }
    }

    for (int i = 0; i < nq; i++) {
        for (int b = 0; b < nbv; b++) {
            const __m256 m = _mm256_set1_ps(macc[i][b]);
            float * ap = acc[i] + b * PKV_BLOCK;
            for (int p = 0; p < 8; p++) {
                _mm256_storeu_ps(ap + 8 * p, _mm256_add_ps(m, _mm256_loadu_ps(ap + 8 * p)));
            }
        }
        float * part = a->partials + i * a->partial_stride;
        part[0] = M[i];
        part[1] = S[i];
    }
    return true;
}
#endif
