/* Shared internals of the codec (not part of the C ABI). */
#ifndef PKV_INTERNAL_H
#define PKV_INTERNAL_H
#include "pkv/codec.h"

/* d and m of one block of 64 sanitized values (block_scale.c): the plain
 * encoders' error-minimising search, and the min/max rule SQuat keeps */
void  pkv_block_scale_search(int bits, const float * x, uint16_t * d, uint16_t * m);
void  pkv_block_scale_minmax(int bits, const float * x, uint16_t * d, uint16_t * m);
void  pkv_encode_block(int bits, const float * x, uint16_t * d, uint16_t * m, uint8_t * codes);
void  pkv_pack_codes(int bits, const uint8_t * codes, uint8_t * payload);
void  pkv_unpack_codes(int bits, const uint8_t * payload, uint8_t * codes);
float pkv_dot_row_q8_1(int bits, const void * vx, const void * vy, int n);


#if defined(__AVX2__)
float pkv_dot_row_q8_1_avx2(int bits, const void * vx, const void * vy, int n);
void  pkv_dequantize_row_avx2(int bits, const void * x, float * y, int64_t k);
void  pkv_vec_mad_row_avx2(int bits, float * y, const void * x, float v, int n);
#endif

#endif
