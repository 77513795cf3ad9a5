/* IEEE half <-> float conversion, round to nearest even, no dependencies.
 * ggml has its own, but native/ must build and test without ggml. */
#include "pkv/codec.h"
#include <math.h>
#include <string.h>

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

uint16_t pkv_fp32_to_fp16(float f) {
    uint32_t x = f2u(f);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    x &= 0x7fffffffu;
    if (x >= 0x7f800000u) {                 /* Inf or NaN */
        return sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u);
    }
    if (x >= 0x477ff000u) {                 /* >= 65520 rounds to Inf */
        return sign | 0x7c00u;
    }
    if (x < 0x38800000u) {                  /* below 2^-14: subnormal half */
        /* scale so one half-ulp (2^-24) is 1.0, then round to nearest even */
        const float v = u2f(x) * 16777216.0f;
        return sign | (uint16_t) lrintf(v);
    }
    /* normal: rebias exponent (127 -> 15) and round the 13 dropped bits */
    const uint32_t odd = (x >> 13) & 1u;
    return sign | (uint16_t)((x - 0x38000000u + 0xfffu + odd) >> 13);
}

float pkv_fp16_to_fp32(uint16_t h) {
    const uint32_t sign = ((uint32_t) h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1fu;
    const uint32_t m = h & 0x3ffu;
    if (e == 0) {
        const float v = (float) m * (1.0f / 16777216.0f);
        return sign ? -v : v;
    }
    if (e == 31) {
        return u2f(sign | 0x7f800000u | (m << 13));
    }
    return u2f(sign | ((e + 112u) << 23) | (m << 13));
}
