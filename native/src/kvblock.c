/* Scalar reference codec for the kv2/kv3/kv4 block formats (layout in
 * pkv/codec.h). Everything here is the definition the SIMD and CUDA paths
 * must match bit for bit on encode and to rounding on dot products. */
#include "pkv/codec.h"
#include "pkv_internal.h"

#include <math.h>
#include <string.h>

size_t pkv_block_bytes(int bits) {
    switch (bits) {
        case 4: return sizeof(pkv_block_kv4);
        case 3: return sizeof(pkv_block_kv3);
        case 2: return sizeof(pkv_block_kv2);
        default: return 0;
    }
}

double pkv_bits_per_value(int bits) {
    const size_t b = pkv_block_bytes(bits);
    return b ? 8.0 * (double) b / PKV_BLOCK : 0.0;
}

/* NaN -> 0, +-Inf and anything beyond the fp16 range -> +-65504, so that the
 * block's range, scale and minimum stay finite in fp16. */
static inline float sanitize(float v) {
    if (v != v) return 0.0f;
    if (v >  65504.0f) return  65504.0f;
    if (v < -65504.0f) return -65504.0f;
    return v;
}

/* The block's fp16 scale and minimum (block_scale.c: an error-minimising
 * search) and its codes, computed against the fp16 d and m decode reads. */
void pkv_encode_block(int bits, const float * xin, uint16_t * d_out, uint16_t * m_out, uint8_t * codes) {
    const int L = (1 << bits) - 1;
    float x[PKV_BLOCK];
    for (int i = 0; i < PKV_BLOCK; i++) x[i] = sanitize(xin[i]);
    uint16_t dh, mh;
    pkv_block_scale_search(bits, x, &dh, &mh);
    const float m = pkv_fp16_to_fp32(mh);
    const float d = pkv_fp16_to_fp32(dh);
    const float id = d > 0.0f ? 1.0f / d : 0.0f;
    for (int i = 0; i < PKV_BLOCK; i++) {
        const float q = floorf((x[i] - m) * id + 0.5f);
        codes[i] = (uint8_t)(q < 0.0f ? 0 : (q > (float) L ? L : (int) q));
    }
    *d_out = dh;
    *m_out = mh;
}

void pkv_pack_codes(int bits, const uint8_t * codes, uint8_t * qs) {
    switch (bits) {
        case 4:
            for (int j = 0; j < PKV_BLOCK / 2; j++) {
                qs[j] = (uint8_t)(codes[j] | (codes[j + PKV_BLOCK / 2] << 4));
            }
            break;
        case 3: {
            uint8_t * ql = qs, * qh = qs + PKV_BLOCK / 4;
            memset(qh, 0, PKV_BLOCK / 8);
            for (int j = 0; j < PKV_BLOCK / 4; j++) {
                ql[j] = (uint8_t)((codes[j] & 3) | ((codes[j + 16] & 3) << 2) |
                                  ((codes[j + 32] & 3) << 4) | ((codes[j + 48] & 3) << 6));
            }
            for (int j = 0; j < PKV_BLOCK; j++) {
                qh[j % 8] |= (uint8_t)(((codes[j] >> 2) & 1) << (j / 8));
            }
            break;
        }
        case 2:
            for (int j = 0; j < PKV_BLOCK / 4; j++) {
                qs[j] = (uint8_t)(codes[j] | (codes[j + 16] << 2) | (codes[j + 32] << 4) | (codes[j + 48] << 6));
            }
            break;
    }
}

void pkv_unpack_codes(int bits, const uint8_t * qs, uint8_t * codes) {
    switch (bits) {
        case 4:
            for (int j = 0; j < PKV_BLOCK / 2; j++) {
                codes[j]                 = qs[j] & 15;
                codes[j + PKV_BLOCK / 2] = qs[j] >> 4;
            }
            break;
        case 3: {
            const uint8_t * ql = qs, * qh = qs + PKV_BLOCK / 4;
            for (int j = 0; j < PKV_BLOCK; j++) {
                const int lo = (ql[j % 16] >> (2 * (j / 16))) & 3;
                const int hi = (qh[j % 8] >> (j / 8)) & 1;
                codes[j] = (uint8_t)(lo | (hi << 2));
            }
            break;
        }
        case 2:
            for (int j = 0; j < PKV_BLOCK; j++) {
                codes[j] = (qs[j % 16] >> (2 * (j / 16))) & 3;
            }
            break;
    }
}

/* All three block structs are {d, m, payload}: payload starts at byte 4. */
#define PKV_PAYLOAD(blk) ((uint8_t *)(blk) + 2 * sizeof(uint16_t))

void pkv_quantize_row(int bits, const float * x, void * y, int64_t k) {
    const size_t bsz = pkv_block_bytes(bits);
    uint8_t codes[PKV_BLOCK];
    for (int64_t i = 0; i < k / PKV_BLOCK; i++) {
        uint8_t * blk = (uint8_t *) y + i * bsz;
        uint16_t dm[2];
        pkv_encode_block(bits, x + i * PKV_BLOCK, &dm[0], &dm[1], codes);
        memcpy(blk, dm, sizeof(dm));
        pkv_pack_codes(bits, codes, PKV_PAYLOAD(blk));
    }
}

/* y = v * decode(x), or y += v * decode(x) when accumulate (scalar reference
 * for both decode, v = 1, and flash attention's V accumulation). */
static void affine_row(int bits, const void * x, float * y, int64_t k, float v, int accumulate) {
    const size_t bsz = pkv_block_bytes(bits);
    uint8_t codes[PKV_BLOCK];
    for (int64_t i = 0; i < k / PKV_BLOCK; i++) {
        const uint8_t * blk = (const uint8_t *) x + i * bsz;
        uint16_t dm[2];
        memcpy(dm, blk, sizeof(dm));
        const float d = v * pkv_fp16_to_fp32(dm[0]), m = v * pkv_fp16_to_fp32(dm[1]);
        pkv_unpack_codes(bits, PKV_PAYLOAD(blk), codes);
        for (int j = 0; j < PKV_BLOCK; j++) {
            const float r = m + d * (float) codes[j];
            y[i * PKV_BLOCK + j] = accumulate ? y[i * PKV_BLOCK + j] + r : r;
        }
    }
}

void pkv_dequantize_row(int bits, const void * x, float * y, int64_t k) {
    affine_row(bits, x, y, k, 1.0f, 0);
}

/* sum_j x_j y_j over one row: per block, d_x * sum_h d_yh * <codes, q_h>
 * plus m_x * sum_h s_yh, where s = d_y * sum(q) is stored by q8_1. */
float pkv_dot_row_q8_1(int bits, const void * vx, const void * vy, int n) {
    const size_t bsz = pkv_block_bytes(bits);
    const pkv_block_q8_1 * yb = (const pkv_block_q8_1 *) vy;
    uint8_t codes[PKV_BLOCK];
    float acc = 0.0f;
    for (int i = 0; i < n / PKV_BLOCK; i++) {
        const uint8_t * blk = (const uint8_t *) vx + i * bsz;
        uint16_t dm[2];
        memcpy(dm, blk, sizeof(dm));
        pkv_unpack_codes(bits, PKV_PAYLOAD(blk), codes);
        float part = 0.0f, msum = 0.0f;
        for (int h = 0; h < PKV_BLOCK / PKV_Q8_1_BLOCK; h++) {
            const pkv_block_q8_1 * y = &yb[i * (PKV_BLOCK / PKV_Q8_1_BLOCK) + h];
            int32_t isum = 0;
            for (int j = 0; j < PKV_Q8_1_BLOCK; j++) {
                isum += (int32_t) codes[h * PKV_Q8_1_BLOCK + j] * y->qs[j];
            }
            part += pkv_fp16_to_fp32(y->d) * (float) isum;
            msum += pkv_fp16_to_fp32(y->s);
        }
        acc += pkv_fp16_to_fp32(dm[0]) * part + pkv_fp16_to_fp32(dm[1]) * msum;
    }
    return acc;
}

void pkv_vec_mad_row(int bits, float * y, const void * x, float v, int n) {
    affine_row(bits, x, y, n, v, 1);
}

void pkv_quantize_row_q8_1_ref(const float * x, void * vy, int64_t k) {
    pkv_block_q8_1 * y = (pkv_block_q8_1 *) vy;
    for (int64_t i = 0; i < k / PKV_Q8_1_BLOCK; i++) {
        float amax = 0.0f;
        for (int j = 0; j < PKV_Q8_1_BLOCK; j++) {
            const float a = fabsf(x[i * PKV_Q8_1_BLOCK + j]);
            amax = a > amax ? a : amax;
        }
        const float d = amax / 127.0f, id = d ? 1.0f / d : 0.0f;
        int sum = 0;
        for (int j = 0; j < PKV_Q8_1_BLOCK; j++) {
            const float r = roundf(x[i * PKV_Q8_1_BLOCK + j] * id);
            /* |r| <= 127 for any finite block whose 1/d is finite. Otherwise
             * (an absmax below ~3.7e-37, e.g. fp32 subnormals, makes 1/d
             * overflow to Inf; NaN/Inf input) r is +-Inf or NaN and (int) r
             * is undefined behaviour (UBSan found it, then the sum
             * overflowed): store 0 instead. For a tiny absmax fp16(d) is 0,
             * so the block reads as 0 either way. */
            const int q = (r >= -127.0f && r <= 127.0f) ? (int) r : 0;
            y[i].qs[j] = (int8_t) q;
            sum += q;
        }
        y[i].d = pkv_fp32_to_fp16(d);
        y[i].s = pkv_fp32_to_fp16((float) sum * d);
    }
}

bool pkv_validate_row(int bits, const void * data, size_t nbytes) {
    const size_t bsz = pkv_block_bytes(bits);
    if (bsz == 0 || nbytes % bsz != 0) return false;
    for (size_t i = 0; i < nbytes / bsz; i++) {
        uint16_t dm[2];
        memcpy(dm, (const uint8_t *) data + i * bsz, sizeof(dm));
        /* exponent all ones = Inf/NaN: never written by our encoder */
        if ((dm[0] & 0x7c00u) == 0x7c00u || (dm[1] & 0x7c00u) == 0x7c00u) return false;
    }
    return true;
}
