/* Fixed-width entry points that ggml's type-traits tables point at. They
 * pick the SIMD path compiled into this build, else the scalar reference. */
#include "pkv/codec.h"
#include "pkv_internal.h"

#if defined(__AVX2__)
#  define PKV_DOT   pkv_dot_row_q8_1_avx2
#  define PKV_DEQ   pkv_dequantize_row_avx2
#  define PKV_MAD   pkv_vec_mad_row_avx2
#else
#  define PKV_DOT   pkv_dot_row_q8_1
#  define PKV_DEQ   pkv_dequantize_row
#  define PKV_MAD   pkv_vec_mad_row
#endif

#define PKV_DEFINE_TYPE(B)                                                              \
    void pkv_quantize_row_kv##B(const float * x, void * y, int64_t k) {                 \
        pkv_quantize_row(B, x, y, k);                                                   \
    }                                                                                   \
    void pkv_dequantize_row_kv##B(const void * x, float * y, int64_t k) {               \
        PKV_DEQ(B, x, y, k);                                                 \
    }                                                                                   \
    void pkv_vec_dot_kv##B##_q8_1(int n, float * s, size_t bs, const void * vx,         \
                                  size_t bx, const void * vy, size_t by, int nrc) {     \
        (void) bs; (void) bx; (void) by; (void) nrc;                                    \
        *s = PKV_DOT(B, vx, vy, n);                                            \
    }                                                                                   \
    void pkv_vec_mad_kv##B(float * y, const void * x, float v, int n) {                 \
        PKV_MAD(B, y, x, v, n);                                                         \
    }

PKV_DEFINE_TYPE(4)
PKV_DEFINE_TYPE(3)
PKV_DEFINE_TYPE(2)
