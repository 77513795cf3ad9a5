/*
 * pyllm-kv block codec: the low-bit KV-cache storage shared by all our formats.
 *
 * One row is one token's K (or V) for one layer, all KV heads. It is cut into
 * blocks of PKV_BLOCK values along the row. Each block stores an asymmetric
 * uniform code of `bits` bits per value plus an fp16 scale `d` and an fp16
 * minimum `m`:  x ~= m + d * code,  code in [0, 2^bits - 1].
 *
 *   bits per value = bits + 32 / PKV_BLOCK   (kv4: 4.5, kv3: 3.5, kv2: 2.5)
 *
 * The encoder chooses d and m by an error-minimising search (src/block_scale.c);
 * decode does not depend on how they were chosen.
 *
 * Layouts (chosen so SIMD/CUDA can unpack with shifts and masks, no branches):
 *   kv4: qs[32]           value j (j<32) = low nibble of qs[j],
 *                         value j+32     = high nibble of qs[j]
 *   kv2: qs[16]           value j + 16*s = bits [2s, 2s+1] of qs[j], s = 0..3
 *   kv3: ql[16] + qh[8]   low two bits as kv2's qs; the third bit of value j
 *                         is bit (j / 8) of qh[j % 8]
 *
 * Non-finite input policy (see docs/reliability.md): before encoding, NaN is
 * stored as 0 and +-Inf saturates to +-65504 (the fp16 range), so a block's
 * scale and minimum are always finite and decode never yields NaN/Inf.
 *
 * Plain C ABI: used by the patched ggml (type traits) and by Python via cffi.
 */
#ifndef PKV_CODEC_H
#define PKV_CODEC_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#  define PKV_API __declspec(dllexport)
#else
#  define PKV_API __attribute__((visibility("default")))
#endif

#define PKV_BLOCK 64

typedef struct { uint16_t d, m; uint8_t qs[PKV_BLOCK / 2]; }                    pkv_block_kv4;
typedef struct { uint16_t d, m; uint8_t ql[PKV_BLOCK / 4]; uint8_t qh[PKV_BLOCK / 8]; } pkv_block_kv3;
typedef struct { uint16_t d, m; uint8_t qs[PKV_BLOCK / 4]; }                    pkv_block_kv2;

/* Mirror of ggml's block_q8_1 (the query format our K dot products read):
 * d = absmax/127, s = d * sum(qs). Checked against ggml's size in the patch. */
#define PKV_Q8_1_BLOCK 32
typedef struct { uint16_t d, s; int8_t qs[PKV_Q8_1_BLOCK]; } pkv_block_q8_1;

/* Bytes of one block for 2, 3 or 4 bits; 0 for anything else. */
PKV_API size_t pkv_block_bytes(int bits);
/* Bits per stored value, scales included (bits + 32/PKV_BLOCK). */
PKV_API double pkv_bits_per_value(int bits);

/* Encode / decode k values (k a multiple of PKV_BLOCK). */
PKV_API void pkv_quantize_row_kv4(const float * x, void * y, int64_t k);
PKV_API void pkv_quantize_row_kv3(const float * x, void * y, int64_t k);
PKV_API void pkv_quantize_row_kv2(const float * x, void * y, int64_t k);
PKV_API void pkv_dequantize_row_kv4(const void * x, float * y, int64_t k);
PKV_API void pkv_dequantize_row_kv3(const void * x, float * y, int64_t k);
PKV_API void pkv_dequantize_row_kv2(const void * x, float * y, int64_t k);

/* Generic by bit width (2, 3, 4): what tests and tools call. */
PKV_API void pkv_quantize_row(int bits, const float * x, void * y, int64_t k);
PKV_API void pkv_dequantize_row(int bits, const void * x, float * y, int64_t k);

/* Dot product of n values of our block row with a q8_1 row (ggml vec_dot
 * signature: s, bs, vx, bx, vy, by, nrc; nrc must be 1). */
PKV_API void pkv_vec_dot_kv4_q8_1(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by, int nrc);
PKV_API void pkv_vec_dot_kv3_q8_1(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by, int nrc);
PKV_API void pkv_vec_dot_kv2_q8_1(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy, size_t by, int nrc);

/* y[0..n) += v * decode(x): flash attention's V accumulation without a
 * separate decode pass into a float row. */
PKV_API void pkv_vec_mad_kv4(float * y, const void * x, float v, int n);
PKV_API void pkv_vec_mad_kv3(float * y, const void * x, float v, int n);
PKV_API void pkv_vec_mad_kv2(float * y, const void * x, float v, int n);
PKV_API void pkv_vec_mad_row(int bits, float * y, const void * x, float v, int n);  /* scalar reference */

/* Reference q8_1 encoder (same rounding as ggml's), for tests of the dot. */
PKV_API void pkv_quantize_row_q8_1_ref(const float * x, void * y, int64_t k);

/* Row data check for ggml_validate_row_data: every scale/minimum finite. */
PKV_API bool pkv_validate_row(int bits, const void * data, size_t nbytes);

/* fp16 helpers, exported so tests can mirror the stored rounding. */
PKV_API uint16_t pkv_fp32_to_fp16(float f);
PKV_API float    pkv_fp16_to_fp32(uint16_t h);

#ifdef __cplusplus
}
#endif

#endif /* PKV_CODEC_H */
