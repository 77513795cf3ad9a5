/*
 * Sanitizer fuzz driver for the block codec (pkv/codec.h).
 *
 * tests/test_sanitizers.py compiles this with every C file of native/src under
 * -fsanitize=address,undefined and runs it. ASan reports any access outside a
 * buffer: every buffer is a heap block of exactly the size the API needs, some
 * starting at unaligned addresses. UBSan reports undefined arithmetic. The
 * checks below catch wrong results: decode finite, SIMD == scalar, the
 * round-trip error bound, the non-finite input policy, pkv_validate_row.
 *
 * Deterministic: fixed seed and row count. For a longer local run:
 *   ./fuzz_codec ROWS SEED
 * Exit status 0 when every check passed, 1 otherwise.
 */
#include "pkv/codec.h"
#include "pkv_internal.h"   /* scalar dot reference, code unpacking */

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__has_include)
#  if __has_include("pkv/sidestate.h")
#    include "pkv/sidestate.h"
#    define HAVE_SIDESTATE 1
#  endif
#endif

/* ---- deterministic PRNG (splitmix64) ----------------------------------- */

static uint64_t rng_state;

static uint64_t rnd(void) {
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static double unif(void) { return (double) (rnd() >> 11) * 0x1p-53; }  /* [0, 1) */
static int below(int n) { return (int) (rnd() % (uint64_t) n); }
static double gauss(void) { return unif() + unif() + unif() + unif() - 2.0; }  /* roughly normal */
static float from_bits(uint32_t u) { float f; memcpy(&f, &u, sizeof f); return f; }

/* ---- failure reporting -------------------------------------------------- */

static long n_fail;
static char ctx[160];   /* what is being checked, printed with a failure */

#define CHECK(cond, ...)                                                      \
    do {                                                                      \
        if (!(cond)) {                                                        \
            if (n_fail++ < 20) {                                              \
                fprintf(stderr, "FAIL %s:%d [%s] ", __FILE__, __LINE__, ctx); \
                fprintf(stderr, __VA_ARGS__);                                 \
                fputc('\n', stderr);                                          \
            }                                                                 \
        }                                                                     \
    } while (0)

/* ---- exact-size heap buffers -------------------------------------------- */

/* n bytes starting `off` bytes into a fresh allocation of n + off bytes: the
 * buffer ends exactly where the allocation does, so ASan flags any access
 * past its end, and off != 0 gives an address with less alignment than
 * malloc's (the SIMD paths must use unaligned loads). */
typedef struct { unsigned char * base; void * p; } buf;

static void * buf_new(buf * b, size_t n, size_t off) {
    b->base = malloc(n + off);
    if (!b->base) { perror("malloc"); exit(2); }
    b->p = b->base + off;
    return b->p;
}
static void buf_free(buf * b) { free(b->base); }

/* Float buffers keep float alignment (ggml's rows always have it; anything
 * less is undefined behaviour for float loads) but often not 32-byte. */
static size_t float_off(void) { return 4u * (size_t) below(8); }
/* Packed blocks are read bytewise/memcpy: any address works, odd ones too.
 * q8_1 blocks are read as structs with uint16 fields: 2-byte aligned. */
static size_t byte_off(void) { return (size_t) below(4); }
static size_t q8_off(void) { return 2u * (size_t) below(2); }

/* ---- the API per bit width ---------------------------------------------- */

typedef void (*quant_fn)(const float *, void *, int64_t);
typedef void (*deq_fn)(const void *, float *, int64_t);
typedef void (*dot_fn)(int, float *, size_t, const void *, size_t, const void *, size_t, int);
typedef void (*mad_fn)(float *, const void *, float, int);

static const struct { quant_fn quant; deq_fn deq; dot_fn dot; mad_fn mad; } fixed[5] = {
    [2] = { pkv_quantize_row_kv2, pkv_dequantize_row_kv2, pkv_vec_dot_kv2_q8_1, pkv_vec_mad_kv2 },
    [3] = { pkv_quantize_row_kv3, pkv_dequantize_row_kv3, pkv_vec_dot_kv3_q8_1, pkv_vec_mad_kv3 },
    [4] = { pkv_quantize_row_kv4, pkv_dequantize_row_kv4, pkv_vec_dot_kv4_q8_1, pkv_vec_mad_kv4 },
};

/* ---- input classes ------------------------------------------------------ */

enum { C_GAUSS, C_ZERO, C_CONST, C_DENORMAL, C_HUGE, C_OUTLIER, C_NONFINITE,
       C_FP16EDGE, C_RAWBITS, C_COUNT };
static const char * const class_name[C_COUNT] = {
    "gauss", "zero", "const", "denormal", "huge", "outlier", "nonfinite", "fp16edge", "rawbits" };

static float scaled_gauss(void) {
    const double scale = pow(10.0, -6.0 + 10.0 * unif());
    const double offset = below(2) ? scale * 6.0 * (unif() - 0.5) : 0.0;
    return (float) (offset + scale * gauss());
}

static float huge_value(void) {
    static const float exact[] = { FLT_MAX, 3.4e38f, 1e38f, 65520.0f, 65519.99f, 65504.0f, 65505.0f };
    const float s = below(2) ? 1.0f : -1.0f;
    if (below(3) == 0) return s * exact[below(sizeof exact / sizeof exact[0])];
    const double v = pow(10.0, 30.0 + 8.6 * unif());   /* 1e30 .. 4e38, then clamp */
    return s * (v > FLT_MAX ? FLT_MAX : (float) v);
}

static float nonfinite_value(void) {
    switch (below(4)) {
        case 0:  return INFINITY;
        case 1:  return -INFINITY;
        case 2:  return NAN;
        default: return from_bits(0x7f800000u | (uint32_t) (rnd() & 0x807fffffu) | 1u);  /* NaN, any sign/payload */
    }
}

/* Values at the edges of fp16, where the stored scale and minimum round. */
static float fp16_edge_value(void) {
    static const float edge[] = { 65504.0f, 65519.99f, 65520.0f, 32768.0f, 6.1035156e-05f /* 2^-14 */,
                                  6.0975552e-05f, 5.9604645e-08f /* 2^-24 */, 2.9802322e-08f, 1e-30f, 0.0f };
    const float s = below(2) ? 1.0f : -1.0f;
    return s * edge[below(sizeof edge / sizeof edge[0])];
}

static void fill_block(float * x, int cls) {
    switch (cls) {
        case C_GAUSS:
            for (int j = 0; j < PKV_BLOCK; j++) x[j] = scaled_gauss();
            break;
        case C_ZERO:
            for (int j = 0; j < PKV_BLOCK; j++) x[j] = below(2) ? 0.0f : -0.0f;
            break;
        case C_CONST: {
            /* any finite float: random exponent and mantissa */
            uint32_t u;
            do { u = (uint32_t) rnd(); } while ((u & 0x7f800000u) == 0x7f800000u);
            for (int j = 0; j < PKV_BLOCK; j++) x[j] = from_bits(u);
            break;
        }
        case C_DENORMAL:   /* fp32 subnormals, sometimes next to the smallest normals */
            for (int j = 0; j < PKV_BLOCK; j++) {
                x[j] = from_bits((uint32_t) rnd() & 0x807fffffu);
                if (below(8) == 0) x[j] = below(2) ? FLT_MIN : -FLT_MIN;
            }
            break;
        case C_HUGE:
            for (int j = 0; j < PKV_BLOCK; j++) x[j] = below(4) ? huge_value() : scaled_gauss();
            break;
        case C_OUTLIER: {
            const double small = pow(10.0, -4.0 + 4.0 * unif());
            for (int j = 0; j < PKV_BLOCK; j++) x[j] = (float) (small * gauss());
            const float big = (float) pow(10.0, 1.0 + 37.0 * unif());
            x[below(PKV_BLOCK)] = below(2) ? big : -big;
            break;
        }
        case C_NONFINITE: {
            for (int j = 0; j < PKV_BLOCK; j++) x[j] = scaled_gauss();
            const int n = 1 + below(PKV_BLOCK);   /* from one to all of them */
            for (int t = 0; t < n; t++) x[below(PKV_BLOCK)] = nonfinite_value();
            break;
        }
        case C_FP16EDGE:
            for (int j = 0; j < PKV_BLOCK; j++) x[j] = below(2) ? fp16_edge_value() : scaled_gauss();
            break;
        default:   /* any bit pattern: NaNs with payloads, Infs, subnormals, ... */
            for (int j = 0; j < PKV_BLOCK; j++) x[j] = from_bits((uint32_t) rnd());
            break;
    }
}

/* ---- the format, restated for the checks -------------------------------- */

/* The non-finite input policy of codec.h: NaN -> 0, beyond +-65504 -> +-65504. */
static float policy(float v) {
    if (isnan(v)) return 0.0f;
    return v > 65504.0f ? 65504.0f : (v < -65504.0f ? -65504.0f : v);
}

static void read_dm(const unsigned char * blk, double * d, double * m) {
    uint16_t dm[2];
    memcpy(dm, blk, sizeof dm);
    *d = pkv_fp16_to_fp32(dm[0]);
    *m = pkv_fp16_to_fp32(dm[1]);
}

/* ---- checks on one row -------------------------------------------------- */

static void check_row(int bits, const float * x, int64_t k) {
    const int L = (1 << bits) - 1;
    const int64_t nb = k / PKV_BLOCK;
    const size_t bb = pkv_block_bytes(bits), nbytes = (size_t) nb * bb;
    buf b_p, b_p2, b_xs, b_ys, b_yf;
    unsigned char * packed  = buf_new(&b_p, nbytes, byte_off());
    unsigned char * packed2 = buf_new(&b_p2, nbytes, byte_off());
    float * xs = buf_new(&b_xs, (size_t) k * sizeof(float), float_off());
    float * ys = buf_new(&b_ys, (size_t) k * sizeof(float), float_off());
    float * yf = buf_new(&b_yf, (size_t) k * sizeof(float), float_off());

    /* encode: generic and fixed-width entry points write the same bytes */
    pkv_quantize_row(bits, x, packed, k);
    fixed[bits].quant(x, packed2, k);
    CHECK(memcmp(packed, packed2, nbytes) == 0, "pkv_quantize_row != pkv_quantize_row_kv%d", bits);

    /* policy: the bytes are those of the input with NaN -> 0, +-Inf/huge -> +-65504 */
    for (int64_t i = 0; i < k; i++) xs[i] = policy(x[i]);
    pkv_quantize_row(bits, xs, packed2, k);
    CHECK(memcmp(packed, packed2, nbytes) == 0, "encode(x) != encode(policy(x))");

    /* validate accepts every encoder output, refuses a partial block */
    CHECK(pkv_validate_row(bits, packed, nbytes), "validate rejected encoder output");
    if (nbytes) {
        CHECK(!pkv_validate_row(bits, packed, nbytes - 1), "validate accepted a partial block");
        /* and refuses a block whose d or m is crafted to NaN/Inf (fp16 exponent 31) */
        memcpy(packed2, packed, nbytes);
        const uint16_t bad = (uint16_t) (0x7c00u | (rnd() & 0x83ffu));
        memcpy(packed2 + (size_t) below((int) nb) * bb + 2 * (size_t) below(2), &bad, sizeof bad);
        CHECK(!pkv_validate_row(bits, packed2, nbytes), "validate accepted d/m = 0x%04x", bad);
    }

    /* decode: finite, and the SIMD path bit-identical to the scalar one
     * (d * code is exact in fp32: 11-bit d times a code of at most 4 bits) */
    pkv_dequantize_row(bits, packed, ys, k);
    fixed[bits].deq(packed, yf, k);
    CHECK(memcmp(ys, yf, (size_t) k * sizeof(float)) == 0, "SIMD decode != scalar decode");

    /* round trip per block, on the policy-mapped input: decode is finite and
     * within the block's range widened by a step, and the stored squared error
     * is no worse than the min/max rule's (m = fp16(min), d = fp16((max-m)/L),
     * the encoder's first candidate; block_scale.c scores in float32, hence
     * the relative slack). */
    for (int64_t b = 0; b < nb; b++) {
        const float * xb = xs + b * PKV_BLOCK, * yb = ys + b * PKV_BLOCK;
        float mnf = xb[0], mxf = xb[0];
        for (int j = 1; j < PKV_BLOCK; j++) { mnf = fminf(mnf, xb[j]); mxf = fmaxf(mxf, xb[j]); }
        double d, m;
        read_dm(packed + b * bb, &d, &m);
        const float m0 = pkv_fp16_to_fp32(pkv_fp32_to_fp16(mnf));
        uint16_t d0h = pkv_fp32_to_fp16((mxf - m0) / (float) L);
        if (m0 + (float) L * pkv_fp16_to_fp32(d0h) > 65504.0f) d0h--;   /* as block_scale.c's candidate 0 */
        const float d0 = pkv_fp16_to_fp32(d0h);
        const float id0 = d0 > 0.0f ? 1.0f / d0 : 0.0f;
        double err = 0.0, err0 = 0.0, xabs = 0.0;
        for (int j = 0; j < PKV_BLOCK; j++) {
            CHECK(isfinite(yb[j]), "decode[%lld] = %g from x = %g", (long long) (b * PKV_BLOCK + j), yb[j],
                  x[b * PKV_BLOCK + j]);
            /* a step, plus fp16's rounding of m (relative, and its subnormal spacing) */
            const double widen = fabs(d) * 1.01 + fmax(fabs((double) mnf), fabs((double) mxf)) * 0x1p-10 + 0x1p-24;
            CHECK(yb[j] >= (double) mnf - widen && yb[j] <= (double) mxf + widen,
                  "block %lld j %d: decoded %.9g outside [%.9g, %.9g] widened by d=%g", (long long) b, j, yb[j], mnf, mxf, d);
            float c0 = floorf((xb[j] - m0) * id0 + 0.5f);
            c0 = c0 < 0.0f ? 0.0f : (c0 > (float) L ? (float) L : c0);
            const double t0 = (double) m0 + (double) d0 * c0 - xb[j], t = (double) yb[j] - xb[j];
            err0 += t0 * t0;
            err += t * t;
            xabs = fmax(xabs, fabs((double) xb[j]));
        }
        /* float32 scoring: slack relative to the error and to the values' ulp */
        const double slack = 1e-4 * err0 + 4 * sqrt(PKV_BLOCK * err0) * xabs * 0x1p-23 + PKV_BLOCK * pow(xabs * 0x1p-22, 2) + 0x1p-140;
        CHECK(err <= err0 + slack, "block %lld: stored squared error %.9g > min/max rule's %.9g (d=%g m=%g)",
              (long long) b, err, err0, d, m);
    }

    /* V accumulation: SIMD and scalar agree to rounding (the SIMD path fuses
     * the multiply-add, the scalar one may not) and both are acc + v * decode */
    {
        buf b_a0, b_a, b_a2;
        float * acc0 = buf_new(&b_a0, (size_t) k * sizeof(float), float_off());
        float * acc  = buf_new(&b_a, (size_t) k * sizeof(float), float_off());
        float * acc2 = buf_new(&b_a2, (size_t) k * sizeof(float), float_off());
        const double amag = pow(10.0, -3.0 + 6.0 * unif());
        for (int64_t i = 0; i < k; i++) acc0[i] = acc[i] = acc2[i] = (float) (amag * gauss());
        const float v = below(4) == 0 ? (float) below(2) : (float) unif();   /* softmax weight, 0 and 1 included */
        pkv_vec_mad_row(bits, acc, packed, v, (int) k);
        fixed[bits].mad(acc2, packed, v, (int) k);
        for (int64_t i = 0; i < k; i++) {
            double d, m;
            read_dm(packed + (i / PKV_BLOCK) * bb, &d, &m);
            const double want = acc0[i] + (double) v * ys[i];
            /* a few roundings of the terms' sizes: v*d, v*m, the product, two sums */
            const double tol = 0x1p-21 * (fabs(acc0[i]) + fabs(v) * (fabs(m) + L * fabs(d))) + 0x1p-146;
            CHECK(isfinite(acc[i]) && isfinite(acc2[i]), "vec_mad not finite at %lld", (long long) i);
            CHECK(fabs(acc[i] - want) <= tol && fabs(acc2[i] - want) <= tol,
                  "vec_mad[%lld]: scalar %.9g SIMD %.9g, acc + v*decode = %.9g", (long long) i, acc[i], acc2[i], want);
        }
        buf_free(&b_a0);
        buf_free(&b_a);
        buf_free(&b_a2);
    }

    /* K scores: dot with a q8_1 query, SIMD against the scalar reference. The
     * query is ggml-style quantized (q8_1 keeps its scale and sum in fp16, as
     * ggml's does, so values stay moderate), or tiny down to fp32 subnormals
     * (where 1/d overflows), or raw random bytes with finite scales, so that
     * every int8 code, -128 included, occurs. */
    {
        buf b_q, b_q8, b_s;
        const size_t q8_bytes = (size_t) (k / PKV_Q8_1_BLOCK) * sizeof(pkv_block_q8_1);
        float * q = buf_new(&b_q, (size_t) k * sizeof(float), float_off());
        pkv_block_q8_1 * q8 = buf_new(&b_q8, q8_bytes, q8_off());
        float * s = buf_new(&b_s, sizeof(float), float_off());
        switch (below(3)) {
            case 0: {
                const double qmag = pow(10.0, -3.0 + 4.0 * unif());
                for (int64_t i = 0; i < k; i++) q[i] = (float) (qmag * gauss());
                pkv_quantize_row_q8_1_ref(q, q8, k);
                break;
            }
            case 1:
                for (int64_t i = 0; i < k; i++) {
                    q[i] = below(2) ? 0.0f : (float) (gauss() * pow(2.0, -150.0 + 140.0 * unif()));
                }
                pkv_quantize_row_q8_1_ref(q, q8, k);
                break;
            default: {
                unsigned char * raw = (unsigned char *) q8;
                for (size_t i = 0; i < q8_bytes; i++) raw[i] = (unsigned char) rnd();
                for (int64_t h = 0; h < k / PKV_Q8_1_BLOCK; h++) {
                    q8[h].d = pkv_fp32_to_fp16((float) (unif() * 0.1));
                    q8[h].s = pkv_fp32_to_fp16((float) (gauss() * 100.0));
                }
            }
        }
        const float ref = pkv_dot_row_q8_1(bits, packed, q8, (int) k);
        fixed[bits].dot((int) k, s, 0, packed, 0, q8, 0, 1);
        /* tolerance from the sum of the magnitudes of all products */
        double mag = 0.0;
        uint8_t codes[PKV_BLOCK];
        for (int64_t b = 0; b < nb; b++) {
            double d, m;
            read_dm(packed + b * bb, &d, &m);
            pkv_unpack_codes(bits, packed + b * bb + 4, codes);
            for (int h = 0; h < PKV_BLOCK / PKV_Q8_1_BLOCK; h++) {
                const pkv_block_q8_1 * y = &q8[b * (PKV_BLOCK / PKV_Q8_1_BLOCK) + h];
                double cq = 0.0;
                for (int j = 0; j < PKV_Q8_1_BLOCK; j++) cq += codes[h * PKV_Q8_1_BLOCK + j] * fabs((double) y->qs[j]);
                mag += fabs(d) * fabs((double) pkv_fp16_to_fp32(y->d)) * cq + fabs(m) * fabs((double) pkv_fp16_to_fp32(y->s));
            }
        }
        const double tol = (double) (nb + 8) * 0x1p-23 * mag + 0x1p-140;
        CHECK(isfinite(ref) && isfinite(*s), "vec_dot not finite: scalar %g SIMD %g", ref, *s);
        CHECK(fabs((double) ref - *s) <= tol, "vec_dot: scalar %.9g SIMD %.9g (tol %g)", ref, *s, tol);
        buf_free(&b_q);
        buf_free(&b_q8);
        buf_free(&b_s);
    }

    /* the q8_1 encoder on arbitrary floats (this row's NaN/Inf/huge values):
     * its output is meaningless there, but it must stay defined behaviour */
    {
        buf b_q8;
        pkv_block_q8_1 * q8 = buf_new(&b_q8, (size_t) (k / PKV_Q8_1_BLOCK) * sizeof(pkv_block_q8_1), q8_off());
        pkv_quantize_row_q8_1_ref(x, q8, k);
        buf_free(&b_q8);
    }

    buf_free(&b_p);
    buf_free(&b_p2);
    buf_free(&b_xs);
    buf_free(&b_ys);
    buf_free(&b_yf);
}

/* ---- fp16 conversion ---------------------------------------------------- */

static void check_fp16(long n_random) {
    snprintf(ctx, sizeof ctx, "fp16");
    /* every half survives fp16 -> fp32 -> fp16 (NaNs stay NaN) */
    for (uint32_t h = 0; h < 0x10000u; h++) {
        const float f = pkv_fp16_to_fp32((uint16_t) h);
        const uint16_t back = pkv_fp32_to_fp16(f);
        if ((h & 0x7c00u) == 0x7c00u && (h & 0x3ffu)) {
            CHECK(isnan(f) && (back & 0x7c00u) == 0x7c00u && (back & 0x3ffu), "NaN half 0x%04x", (unsigned) h);
        } else {
            CHECK(back == h, "half 0x%04x -> %g -> 0x%04x", (unsigned) h, f, (unsigned) back);
        }
    }
    /* every float rounds to the nearest half, ties to even; sign kept */
    for (long t = 0; t < n_random; t++) {
        const float f = below(2) ? from_bits((uint32_t) rnd()) : (float) (gauss() * pow(2.0, -26.0 + 44.0 * unif()));
        const uint16_t h = pkv_fp32_to_fp16(f);
        if (isnan(f)) {
            CHECK((h & 0x7c00u) == 0x7c00u && (h & 0x3ffu), "NaN -> 0x%04x", (unsigned) h);
            continue;
        }
        CHECK((h >> 15) == (signbit(f) ? 1u : 0u), "%g -> 0x%04x: sign", f, (unsigned) h);
        if (fabsf(f) >= 65520.0f) {   /* rounds past the largest half: Inf */
            CHECK((h & 0x7fffu) == 0x7c00u, "%g -> 0x%04x, want Inf", f, (unsigned) h);
            continue;
        }
        const uint16_t mag = h & 0x7fffu;
        const double err = fabs((double) f - pkv_fp16_to_fp32(h));
        for (int step = -1; step <= 1; step += 2) {
            if ((step < 0 && mag == 0) || (step > 0 && mag >= 0x7bffu)) continue;
            const double other = fabs((double) f - pkv_fp16_to_fp32((uint16_t) (h + step)));
            CHECK(err < other || (err == other && (h & 1u) == 0), "%.9g -> 0x%04x is not the nearest half",
                  f, (unsigned) h);
        }
    }
}

/* ---- sizes and edge cases ----------------------------------------------- */

static void check_sizes_and_empty(void) {
    snprintf(ctx, sizeof ctx, "sizes");
    static const size_t want[5] = { 0, 0, 20, 28, 36 };
    for (int bits = -1; bits <= 9; bits++) {
        const int ours = bits >= 2 && bits <= 4;
        CHECK(pkv_block_bytes(bits) == (ours ? want[bits] : 0), "block_bytes(%d)", bits);
        CHECK(pkv_bits_per_value(bits) == (ours ? bits + 0.5 : 0.0), "bits_per_value(%d)", bits);
        if (!ours) CHECK(!pkv_validate_row(bits, "", 0), "validate accepted bits=%d", bits);
    }
    CHECK(sizeof(pkv_block_q8_1) == 36, "q8_1 block is %zu bytes", sizeof(pkv_block_q8_1));
    /* k = 0: nothing may be touched (malloc(0) buffers: any access is an ASan error) */
    for (int bits = 2; bits <= 4; bits++) {
        void * p = malloc(0), * f = malloc(0);
        float s = 1.0f;
        pkv_quantize_row(bits, f, p, 0);
        fixed[bits].quant(f, p, 0);
        pkv_dequantize_row(bits, p, f, 0);
        fixed[bits].deq(p, f, 0);
        pkv_vec_mad_row(bits, f, p, 0.5f, 0);
        fixed[bits].mad(f, p, 0.5f, 0);
        fixed[bits].dot(0, &s, 0, p, 0, p, 0, 1);
        CHECK(s == 0.0f, "empty dot = %g", s);
        CHECK(pkv_validate_row(bits, p, 0), "validate rejected an empty row");
        pkv_quantize_row_q8_1_ref(f, p, 0);
        free(p);
        free(f);
    }
}

#ifdef HAVE_SIDESTATE
/* ---- side state (pkv/sidestate.h): DecoQuant / SQuat math ---------------- */

/* n values of input class cls (whole blocks of fill_block, then cut) */
static void fill_values(float * x, int64_t n, int cls) {
    float tmp[PKV_BLOCK];
    for (int64_t i = 0; i < n; i += PKV_BLOCK) {
        fill_block(tmp, cls);
        memcpy(x + i, tmp, (size_t) (n - i < PKV_BLOCK ? n - i : PKV_BLOCK) * sizeof(float));
    }
}

static int is_identity_f(const float * M, int n) {
    for (int i = 0; i < n; i++) {
        for (int j = 0; j < n; j++) {
            if (M[(size_t) i * n + j] != (i == j ? 1.0f : 0.0f)) return 0;
        }
    }
    return 1;
}

/* max |(P Q)_ij - I_ij| for n x n float matrices */
static double dist_from_identity_ff(const float * P, const float * Q, int n) {
    double worst = 0.0;
    for (int i = 0; i < n; i++) {
        for (int j = 0; j < n; j++) {
            double s = 0.0;
            for (int t = 0; t < n; t++) s += (double) P[i * n + t] * Q[t * n + j];
            worst = fmax(worst, fabs(s - (i == j)));
        }
    }
    return worst;
}

static void check_sym_eig(int iters) {
    for (int it = 0; it < iters; it++) {
        const int n = below(10) == 0 ? 17 + below(24) : 1 + below(12);
        const int kind = below(5);
        snprintf(ctx, sizeof ctx, "pkv_sym_eig iter %d n %d kind %d", it, n, kind);
        buf bA, bw, bV;
        double * A = buf_new(&bA, (size_t) n * n * sizeof(double), 8u * (size_t) below(2));
        double * w = buf_new(&bw, (size_t) n * sizeof(double), 0);
        double * V = buf_new(&bV, (size_t) n * n * sizeof(double), 8u * (size_t) below(2));
        /* kinds: random, zero, diagonal with repeats, rank one, extreme scale;
         * the lower triangle differs from the upper (A is symmetrised) */
        const double scale = kind == 4 ? pow(10.0, below(2) ? 150.0 : -150.0) : 1.0;
        const double * u = NULL;
        double ubuf[64];
        if (kind == 3) { for (int i = 0; i < n; i++) ubuf[i] = gauss(); u = ubuf; }
        for (int i = 0; i < n; i++) {
            for (int j = 0; j < n; j++) {
                double v;
                switch (kind) {
                    case 1:  v = 0.0; break;
                    case 2:  v = i == j ? (double) below(3) : 0.0; break;
                    case 3:  v = u[i] * u[j]; break;
                    default: v = scale * gauss(); break;
                }
                A[(size_t) i * n + j] = v;
            }
        }
        double amax = 0.0;
        for (int i = 0; i < n; i++) {
            for (int j = 0; j < n; j++) {
                amax = fmax(amax, fabs(0.5 * (A[(size_t) i * n + j] + A[(size_t) j * n + i])));
            }
        }
        const int rc = pkv_sym_eig(n, A, w, V);
        CHECK(rc == 0, "rc %d", rc);
        if (rc == 0) {
            double orth = 0.0, resid = 0.0;
            for (int j = 0; j < n; j++) {
                if (j) CHECK(w[j - 1] >= w[j], "eigenvalues not descending at %d", j);
                int imax = 0;
                for (int i = 1; i < n; i++) if (fabs(V[i * n + j]) > fabs(V[imax * n + j])) imax = i;
                CHECK(V[imax * n + j] > 0.0, "eigenvector %d: largest component negative", j);
                for (int l = 0; l < n; l++) {
                    double s = 0.0;
                    for (int i = 0; i < n; i++) s += V[i * n + j] * V[i * n + l];
                    orth = fmax(orth, fabs(s - (j == l)));
                }
                for (int i = 0; i < n; i++) {   /* (A_sym v_j)_i - w_j v_ij */
                    double s = 0.0;
                    for (int t = 0; t < n; t++) s += 0.5 * (A[i * n + t] + A[t * n + i]) * V[t * n + j];
                    resid = fmax(resid, fabs(s - w[j] * V[i * n + j]));
                }
            }
            CHECK(orth <= 1e-12, "V^T V - I = %g", orth);
            CHECK(resid <= 1e-12 * n * amax, "|A v - w v| = %g (max |A| %g)", resid, amax);
        }
        /* non-finite entries and bad sizes are refused, nothing read past A */
        A[below(n * n)] = below(2) ? NAN : -INFINITY;
        CHECK(pkv_sym_eig(n, A, w, V) == -1, "accepted a non-finite entry");
        CHECK(pkv_sym_eig(0, A, w, V) == -1, "accepted n = 0");
        CHECK(pkv_sym_eig(PKV_LINALG_MAX_N + 1, A, w, V) == -1, "accepted n > max");
        CHECK(pkv_sym_eig(n, NULL, w, V) == -1, "accepted A = NULL");
        buf_free(&bA);
        buf_free(&bw);
        buf_free(&bV);
    }
}

static void check_cholesky(int iters) {
    for (int it = 0; it < iters; it++) {
        const int n = 1 + below(20);
        snprintf(ctx, sizeof ctx, "pkv_cholesky_upper iter %d n %d", it, n);
        buf bB, bA, bU;
        double * B = buf_new(&bB, (size_t) n * n * sizeof(double), 0);
        double * A = buf_new(&bA, (size_t) n * n * sizeof(double), 8u * (size_t) below(2));
        double * U = buf_new(&bU, (size_t) n * n * sizeof(double), 8u * (size_t) below(2));
        for (int i = 0; i < n * n; i++) B[i] = gauss();
        /* A = B^T B + I: SPD. Its strict lower triangle is NaN: documented unread. */
        double amax = 0.0;
        for (int i = 0; i < n; i++) {
            for (int j = 0; j < n; j++) {
                double s = i == j;
                for (int t = 0; t < n; t++) s += B[t * n + i] * B[t * n + j];
                A[i * n + j] = j >= i ? s : NAN;
                if (j >= i) amax = fmax(amax, fabs(s));
            }
        }
        int rc = pkv_cholesky_upper(n, A, U);
        CHECK(rc == 0, "rc %d", rc);
        double err = 0.0;
        for (int i = 0; i < n; i++) {
            CHECK(U[i * n + i] > 0.0, "diagonal %d not positive", i);
            for (int j = 0; j < n; j++) {
                if (j < i) CHECK(U[i * n + j] == 0.0, "U[%d][%d] below the diagonal = %g", i, j, U[i * n + j]);
                if (j < i) continue;
                double s = 0.0;   /* (U^T U)_ij */
                for (int t = 0; t <= i; t++) s += U[t * n + i] * U[t * n + j];
                err = fmax(err, fabs(s - A[i * n + j]));
            }
        }
        CHECK(err <= 1e-12 * n * amax, "U^T U - A = %g", err);
        /* in place (U aliasing A) gives the same factor */
        memcpy(B, A, (size_t) n * n * sizeof(double));
        rc = pkv_cholesky_upper(n, B, B);
        CHECK(rc == 0 && memcmp(B, U, (size_t) n * n * sizeof(double)) == 0, "in-place result differs (rc %d)", rc);
        /* not positive definite: refused */
        for (int i = 0; i < n * n; i++) A[i] = 0.0;
        A[below(n) * (n + 1)] = -1.0;
        CHECK(pkv_cholesky_upper(n, A, U) == -4, "accepted a non-PD matrix");
        CHECK(pkv_cholesky_upper(0, A, U) == -1, "accepted n = 0");
        buf_free(&bB);
        buf_free(&bA);
        buf_free(&bU);
    }
}

static void check_deco_fit(int iters) {
    static const int groups[4] = { 16, 32, 64, 128 };
    for (int it = 0; it < iters; it++) {
        const int g = groups[below(8) == 0 ? 2 + below(2) : below(2)];
        const int variant = below(2) ? PKV_DECO_WHITEN : PKV_DECO_ROTATE;
        const int64_t n_rows = below(12), row_len = (int64_t) g * (1 + below(3));
        const int64_t stride = row_len + (below(2) ? 0 : 1 + below(40));
        const int cls = below(C_COUNT);
        snprintf(ctx, sizeof ctx, "pkv_deco_fit iter %d g %d variant %d rows %lld len %lld stride %lld class %s",
                 it, g, variant, (long long) n_rows, (long long) row_len, (long long) stride, class_name[cls]);
        /* exactly up to the end of the last row: the stride gap after it is not there */
        const int64_t nx = n_rows ? (n_rows - 1) * stride + row_len : 0;
        buf bx, bS, bSi;
        float * x = n_rows ? buf_new(&bx, (size_t) nx * sizeof(float), float_off()) : NULL;
        float * S = buf_new(&bS, (size_t) g * g * sizeof(float), float_off());
        float * Si = buf_new(&bSi, (size_t) g * g * sizeof(float), float_off());
        if (x) fill_values(x, nx, cls);
        const int rc = pkv_deco_fit(x, n_rows, stride, row_len, g, variant, S, Si);
        CHECK(rc == 0, "rc %d", rc);
        int finite = 1;
        for (int i = 0; i < g * g; i++) finite &= isfinite(S[i]) && isfinite(Si[i]);
        CHECK(finite, "S or Sinv not finite");
        if (finite) {
            const double e = dist_from_identity_ff(S, Si, g);
            CHECK(e <= 1e-5, "S * Sinv - I = %g", e);
            if (variant == PKV_DECO_ROTATE) {   /* S = V^T, Sinv = V: S is orthogonal */
                buf bT;
                float * St = buf_new(&bT, (size_t) g * g * sizeof(float), 0);
                for (int i = 0; i < g; i++) for (int j = 0; j < g; j++) St[j * g + i] = S[i * g + j];
                const double o = dist_from_identity_ff(S, St, g);
                CHECK(o <= 1e-5, "ROTATE: S S^T - I = %g", o);
                buf_free(&bT);
            }
        }
        if (n_rows == 0) CHECK(is_identity_f(S, g) && is_identity_f(Si, g), "no rows, but S != I");
        /* argument errors with a valid g: -1 and S = Sinv = I */
        const int bad = below(3);
        const int rc_bad = pkv_deco_fit(x, n_rows, bad == 0 ? row_len - 1 : stride,
                                        bad == 1 ? row_len + 1 : row_len, g, bad == 2 ? 7 : variant, S, Si);
        CHECK(rc_bad == -1 && is_identity_f(S, g) && is_identity_f(Si, g), "bad argument %d: rc %d", bad, rc_bad);
        if (x) buf_free(&bx);
        buf_free(&bS);
        buf_free(&bSi);
    }
}

static void check_squat(int iters) {
    for (int it = 0; it < iters; it++) {
        const int d = below(8) == 0 ? 128 : 64, bits = 2 + below(3);
        const int64_t n_q = below(6) == 0 ? 0 : 1 + below(24);
        const int r = below(8) == 0 ? 0 : 1 + below(d + 2);
        const float lambda = below(6) == 0 ? 0.0f : (below(6) == 0 ? 1e10f : (float) (100.0 * unif()));
        const int normalize = below(2), cls = below(C_COUNT);
        snprintf(ctx, sizeof ctx, "squat iter %d d %d bits %d n_q %lld r %d lambda %g norm %d class %s",
                 it, d, bits, (long long) n_q, r, lambda, normalize, class_name[cls]);
        const size_t dd = (size_t) d * d, out_bytes = (size_t) (d / PKV_BLOCK) * pkv_block_bytes(bits);
        buf bq, bU, bk, bks, bo, bo2;
        float * q = n_q ? buf_new(&bq, (size_t) n_q * d * sizeof(float), float_off()) : NULL;
        float * U = buf_new(&bU, dd * sizeof(float), float_off());
        float * k = buf_new(&bk, (size_t) d * sizeof(float), float_off());
        float * ks = buf_new(&bks, (size_t) d * sizeof(float), float_off());
        unsigned char * out = buf_new(&bo, out_bytes, byte_off());
        unsigned char * out2 = buf_new(&bo2, out_bytes, byte_off());
        if (q) fill_values(q, n_q * d, below(2) ? C_GAUSS : cls);   /* non-finite q counts as 0 */

        const int rc = pkv_squat_prepare(q, n_q, d, r, lambda, normalize, U);
        CHECK(rc == 0, "prepare rc %d", rc);
        /* U: finite, upper triangular, diagonal in (0, 1] (A >= I so A^-1 <= I) */
        int ok = 1;
        for (int i = 0; i < d; i++) {
            for (int j = 0; j < d; j++) {
                const float v = U[(size_t) i * d + j];
                ok &= isfinite(v) && (j >= i || v == 0.0f) && (j != i || (v > 0.0f && v <= 1.0f + 1e-6f));
            }
        }
        CHECK(ok, "U not finite / not upper triangular / diagonal outside (0, 1]");
        if (n_q == 0 || r == 0 || lambda == 0.0f) CHECK(is_identity_f(U, d), "trivial case but U != I");

        /* encode: validates, decodes finite; the codec's non-finite policy */
        fill_values(k, d, cls);
        pkv_squat_quantize_row(bits, k, U, d, out);
        CHECK(pkv_validate_row(bits, out, out_bytes), "validate rejected squat output");
        {
            buf by;
            float * y = buf_new(&by, (size_t) d * sizeof(float), float_off());
            pkv_dequantize_row(bits, out, y, d);
            /* policy caps at 65504; fp16 rounding of d adds at most L * 4 */
            for (int i = 0; i < d; i++) CHECK(isfinite(y[i]) && fabsf(y[i]) <= 65504.0f + 64.0f, "decode[%d] = %g", i, y[i]);
            buf_free(&by);
        }
        pkv_squat_quantize_row_ref(bits, k, U, d, out2);
        CHECK(memcmp(out, out2, out_bytes) == 0, "squat SIMD != squat scalar reference");
        for (int i = 0; i < d; i++) ks[i] = policy(k[i]);
        pkv_squat_quantize_row(bits, ks, U, d, out2);
        CHECK(memcmp(out, out2, out_bytes) == 0, "squat(k) != squat(policy(k))");
        /* with U = I it is the plain block code with the min/max rule, byte for byte */
        for (size_t i = 0; i < dd; i++) U[i] = (i % (size_t) (d + 1)) == 0 ? 1.0f : 0.0f;
        pkv_squat_quantize_row(bits, k, U, d, out);
        for (int b = 0; b < d / PKV_BLOCK; b++) {
            float xb[PKV_BLOCK];
            uint8_t cb[PKV_BLOCK];
            uint16_t dm[2];
            for (int i = 0; i < PKV_BLOCK; i++) xb[i] = policy(k[b * PKV_BLOCK + i]);
            pkv_block_scale_minmax(bits, xb, &dm[0], &dm[1]);
            const float dq = pkv_fp16_to_fp32(dm[0]), mq = pkv_fp16_to_fp32(dm[1]), id = dq > 0.0f ? 1.0f / dq : 0.0f;
            for (int i = 0; i < PKV_BLOCK; i++) {
                const float c = floorf((xb[i] - mq) * id + 0.5f);
                cb[i] = (uint8_t) (c < 0.0f ? 0 : (c > (float) ((1 << bits) - 1) ? (1 << bits) - 1 : (int) c));
            }
            uint8_t * blk = out2 + (size_t) b * pkv_block_bytes(bits);
            memcpy(blk, dm, sizeof(dm));
            pkv_pack_codes(bits, cb, blk + sizeof(dm));
        }
        CHECK(memcmp(out, out2, out_bytes) == 0, "squat with U = I != the min/max block code");
        /* bad arguments write nothing */
        memset(out, 0xa5, out_bytes);
        pkv_squat_quantize_row(5, k, U, d, out);
        pkv_squat_quantize_row(bits, k, U, d - 1, out);
        pkv_squat_quantize_row(bits, k, U, 0, out);
        int untouched = 1;
        for (size_t i = 0; i < out_bytes; i++) untouched &= out[i] == 0xa5;
        CHECK(untouched, "bad arguments wrote output");
        /* argument errors of prepare: -1, U = I */
        CHECK(pkv_squat_prepare(q, n_q, d, r, -1.0f, normalize, U) == -1 && is_identity_f(U, d), "lambda < 0");
        CHECK(pkv_squat_prepare(q, n_q, d, r, NAN, normalize, U) == -1 && is_identity_f(U, d), "lambda NaN");
        CHECK(pkv_squat_prepare(NULL, 3, d, r, 1.0f, normalize, U) == -1 && is_identity_f(U, d), "q NULL");
        CHECK(pkv_squat_prepare(q, n_q, 0, r, 1.0f, normalize, U) == -1, "d = 0");

        if (q) buf_free(&bq);
        buf_free(&bU);
        buf_free(&bk);
        buf_free(&bks);
        buf_free(&bo);
        buf_free(&bo2);
    }
}

/* pkv_squat_quantize_rows = pkv_squat_quantize_row per (row, head), contiguous */
static void check_squat_rows(int iters) {
    for (int it = 0; it < iters; it++) {
        const int d = 64, bits = 2 + below(3), n_heads = 1 + below(3);
        const int64_t n_rows = below(4);
        snprintf(ctx, sizeof ctx, "pkv_squat_quantize_rows iter %d rows %lld heads %d", it, (long long) n_rows, n_heads);
        const size_t dd = (size_t) d * d, head_bytes = (size_t) (d / PKV_BLOCK) * pkv_block_bytes(bits);
        const size_t nk = (size_t) n_rows * n_heads * d, nout = (size_t) n_rows * n_heads * head_bytes;
        buf bq, bU, bk, bo, bo2;
        float * q = buf_new(&bq, 16 * (size_t) d * sizeof(float), float_off());
        float * U = buf_new(&bU, (size_t) n_heads * dd * sizeof(float), float_off());
        float * k = buf_new(&bk, (nk ? nk : 1) * sizeof(float), float_off());
        unsigned char * out = buf_new(&bo, nout ? nout : 1, byte_off());
        unsigned char * out2 = buf_new(&bo2, nout ? nout : 1, byte_off());
        for (int h = 0; h < n_heads; h++) {
            fill_values(q, 16 * (int64_t) d, C_GAUSS);
            CHECK(pkv_squat_prepare(q, 16, d, 4, 10.0f, 1, U + h * dd) == 0, "prepare head %d", h);
        }
        fill_values(k, (int64_t) nk, below(C_COUNT));
        pkv_squat_quantize_rows(bits, k, n_rows, n_heads, U, d, out);
        for (int64_t i = 0; i < n_rows * n_heads; i++) {
            pkv_squat_quantize_row(bits, k + i * d, U + (size_t) (i % n_heads) * dd, d, out2 + (size_t) i * head_bytes);
        }
        CHECK(memcmp(out, out2, nout) == 0, "rows != row by row");
        buf_free(&bq);
        buf_free(&bU);
        buf_free(&bk);
        buf_free(&bo);
        buf_free(&bo2);
    }
}

static void check_sidestate(void) {
    check_sym_eig(150);
    check_cholesky(100);
    check_deco_fit(60);
    check_squat(40);
    check_squat_rows(20);
}
#endif

int main(int argc, char ** argv) {
    const long rows = argc > 1 ? atol(argv[1]) : 6000;
    rng_state = argc > 2 ? strtoull(argv[2], NULL, 0) : 0x5eed2026ull;

    check_sizes_and_empty();
    check_fp16(200000);
#ifdef HAVE_SIDESTATE
    check_sidestate();
#endif

    long per_class[C_COUNT] = { 0 };
    for (long r = 0; r < rows; r++) {
        const int bits = 2 + below(3);
        /* mostly short rows (many blocks of every class), now and then a long one */
        const int64_t nb = below(50) == 0 ? 64 + below(193) : 1 + below(12);
        const int64_t k = nb * PKV_BLOCK;
        buf b_x;
        float * x = buf_new(&b_x, (size_t) k * sizeof(float), float_off());
        /* one class for the whole row, or a mix per block */
        const int row_cls = below(2) ? below(C_COUNT) : -1;
        for (int64_t b = 0; b < nb; b++) {
            const int cls = row_cls >= 0 ? row_cls : below(C_COUNT);
            fill_block(x + b * PKV_BLOCK, cls);
            per_class[cls]++;
        }
        snprintf(ctx, sizeof ctx, "row %ld bits %d k %lld class %s", r, bits, (long long) k,
                 row_cls >= 0 ? class_name[row_cls] : "mixed");
        check_row(bits, x, k);
        buf_free(&b_x);
    }

    printf("fuzz_codec: %ld rows (seed 0x%llx), SIMD path %s, blocks per class:", rows,
           argc > 2 ? strtoull(argv[2], NULL, 0) : 0x5eed2026ull,
#if defined(__AVX2__)
           "AVX2"
#else
           "none (scalar only)"
#endif
    );
    for (int c = 0; c < C_COUNT; c++) printf(" %s=%ld", class_name[c], per_class[c]);
    printf("\nfuzz_codec: side state (pkv/sidestate.h) %s\n",
#ifdef HAVE_SIDESTATE
           "checked"
#else
           "not present"
#endif
    );
    printf("fuzz_codec: %ld failure(s)\n", n_fail);
    return n_fail ? 1 : 0;
}
