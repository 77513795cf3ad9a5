/* pyllm-kv CUDA codec launchers: set_rows / cpy (encode), get_rows and
 * conversion to f16/f32 (decode). Formats: pkv/codec.h; helpers: pkv_cuda.cuh. */
#include "pkv_cuda.h"
#include "pkv_cuda.cuh"
#include "pkv/sidestate.h"

#include <climits>
#include <type_traits>

using namespace pkv;

namespace {

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<half>(half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ half from_f<half>(float v) { return __float2half_rn(v); }

constexpr int NT = 128;

/* Block scale and minimum of 64 values (lane l of every warp: values l and
 * l + 32): the error-minimising search of native/src/block_scale.c, candidate
 * for candidate and rounding for rounding (that file says why and what it
 * tries), spread over the CTA: warp g runs starting grid g and its three
 * rounds, warp 0 also the min/max candidate; the winner is the lowest squared
 * error, ties to the lowest candidate index, which is the reference's
 * sequential "strictly better" rule. One warp running all 8 grids made a
 * decode step's kv4 store 9.7 us instead of 4.3 (H100, pkv-cuda-test): the
 * search is a chain of warp reductions, and a decode store has only a few
 * blocks, so it is latency, not work, that counts. Every sum is the butterfly
 * whose order block_scale.c's warp_order_sum copies. Inputs must be sanitized. */
struct block_params { __half dh, mh; float d, m, id; };

constexpr unsigned FULL = 0xffffffffu;
constexpr int SCALE_GRIDS = 8;     /* starting grids of block_scale.c: one warp each */
constexpr int SCALE_ROUNDS = 3;    /* fit-and-recode rounds per grid */
constexpr int SEARCH_THREADS = 32 * SCALE_GRIDS;

template <typename T, int N>
static __device__ __forceinline__ void warp_sums(T (&v)[N]) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
        for (int k = 0; k < N; k++) {
            if constexpr (std::is_same<T, float>::value) {   /* the reference's float adds, unfused */
                v[k] = __fadd_rn(v[k], __shfl_xor_sync(FULL, v[k], o));
            } else {
                v[k] += __shfl_xor_sync(FULL, v[k], o);
            }
        }
    }
}

/* sum(q) and sum(q^2) of a grid's codes are integers below 2^10 and 2^14: one
 * int carries both through the butterfly (exact, as the float sums of the
 * reference are: integers below 2^24 add exactly in any order) */
static __device__ __forceinline__ uint32_t pack_q_sums(const float c0, const float c1) {
    const uint32_t a = (uint32_t) c0, b = (uint32_t) c1;
    return (a + b) | ((a * a + b * b) << 10);
}

/* code of x against (d, m) with 1/d = id, as the reference rounds it, as a float */
template <int B>
static __device__ __forceinline__ float code_f(const float x, const float m, const float id) {
    constexpr float L = (float) ((1 << B) - 1);
    const float c = floorf(__fadd_rn(__fmul_rn(__fsub_rn(x, m), id), 0.5f));
    return c < 0.0f ? 0.0f : (c > L ? L : c);
}

/* this lane's part of the squared error of (d, m) over its two values; codes to c0, c1 */
template <int B>
static __device__ __forceinline__ float err_part(const float x0, const float x1, const float d, const float m,
                                                 float & c0, float & c1) {
    const float id = d > 0.0f ? __frcp_rn(d) : 0.0f;
    c0 = code_f<B>(x0, m, id);
    c1 = code_f<B>(x1, m, id);
    const float t0 = __fsub_rn(__fadd_rn(m, __fmul_rn(d, c0)), x0);
    const float t1 = __fsub_rn(__fadd_rn(m, __fmul_rn(d, c1)), x1);
    return __fadd_rn(__fmul_rn(t0, t0), __fmul_rn(t1, t1));
}

/* block_scale.c's fit_fp16 from the warp's sums: false if the fit is
 * degenerate or its top level would decode beyond the fp16 range */
template <int B>
static __device__ __forceinline__ bool fit_fp16(const float sq, const float sqq, const float sqy, const float sy,
                                                const float mn, __half & dh, __half & mh) {
    const float det = __fsub_rn(__fmul_rn(64.0f, sqq), __fmul_rn(sq, sq));
    if (!(det > 0.0f)) return false;
    const float d = __fdiv_rn(__fsub_rn(__fmul_rn(64.0f, sqy), __fmul_rn(sq, sy)), det);
    const float m = __fadd_rn(mn, __fmul_rn(__fsub_rn(sy, __fmul_rn(d, sq)), 1.0f / 64.0f));
    if (!(d > 0.0f) || !(d <= 65504.0f) || !(m >= -65504.0f && m <= 65504.0f)) return false;
    dh = __float2half_rn(d);
    mh = __float2half_rn(m);
    const float dq = __half2float(dh);
    return dq > 0.0f && __fadd_rn(__half2float(mh), __fmul_rn((float) ((1 << B) - 1), dq)) <= 65504.0f;
}

/* min and max of the warp's 64 values; ties keep the lowest index, i.e. the
 * reference's first occurrence (matters only for +-0) */
static __device__ __forceinline__ void minmax_warp(const float x0, const float x1, const int lane, float & mn, float & mx) {
    mn = x0;
    mx = x0;
    int imn = lane, imx = lane;
    if (x1 < mn) { mn = x1; imn = lane + 32; }
    if (x1 > mx) { mx = x1; imx = lane + 32; }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float omn = __shfl_xor_sync(FULL, mn, o);
        const int   oin = __shfl_xor_sync(FULL, imn, o);
        const float omx = __shfl_xor_sync(FULL, mx, o);
        const int   oix = __shfl_xor_sync(FULL, imx, o);
        if (omn < mn || (omn == mn && oin < imn)) { mn = omn; imn = oin; }
        if (omx > mx || (omx == mx && oix < imx)) { mx = omx; imx = oix; }
    }
}

/* block_scale.c's min/max rule (the search's candidate 0, SQuat's block rule):
 * m = fp16(min), d = fp16((max - m) / L), d a step smaller if the top level
 * would pass 65504 */
template <int B>
static __device__ __forceinline__ void minmax_rule(const float mn, const float mx, __half & dh, __half & mh) {
    constexpr int L = (1 << B) - 1;
    mh = __float2half_rn(mn);
    dh = __float2half_rn(__fdiv_rn(__fsub_rn(mx, __half2float(mh)), (float) L));
    if (__fadd_rn(__half2float(mh), __fmul_rn((float) L, __half2float(dh))) > 65504.0f) {
        dh = __ushort_as_half((unsigned short) (__half_as_ushort(dh) - 1));
    }
}

static __device__ __forceinline__ block_params params_of(const __half dh, const __half mh) {
    block_params p;
    p.dh = dh;
    p.mh = mh;
    p.m  = __half2float(mh);
    p.d  = __half2float(dh);
    p.id = p.d > 0.0f ? __frcp_rn(p.d) : 0.0f;
    return p;
}

/* SQuat's block rule on one warp (no search: see squat.c) */
template <int B>
static __device__ __forceinline__ block_params block_params_minmax_warp(const float x0, const float x1, const int lane) {
    float mn, mx;
    minmax_warp(x0, x1, lane, mn, mx);
    __half dh, mh;
    minmax_rule<B>(mn, mx, dh, mh);
    return params_of(dh, mh);
}

/* Every thread of the CTA (SEARCH_THREADS) must call this, with the same
 * block in every warp; each gets the same parameters. Two barriers inside. */
template <int B>
static __device__ __forceinline__ block_params block_params_cta(const float x0, const float x1, const int lane,
                                                                const int warp) {
    constexpr int L = (1 << B) - 1;
    struct candidate { float err; int idx; unsigned short dh, mh; };
    __shared__ candidate best_of_warp[SCALE_GRIDS];
    float mn, mx;
    minmax_warp(x0, x1, lane, mn, mx);
    __half bdh, bmh;
    minmax_rule<B>(mn, mx, bdh, bmh);
    const float range = __fsub_rn(mx, mn);
    const bool search = range > 0.0f && isfinite(__fdiv_rn((float) L, range));
    const float y0 = __fsub_rn(x0, mn), y1 = __fsub_rn(x1, mn);

    /* this warp's starting grid: codes from the minimum (even g) or down from the maximum */
    const int g = warp;
    float c0, c1;
    {
        const float isc = __fdiv_rn(__fadd_rn((float) L - 0.5f, (float) (g >> 1)), range);
        const float v0 = (g & 1) ? __fsub_rn(mx, x0) : y0;
        const float v1 = (g & 1) ? __fsub_rn(mx, x1) : y1;
        c0 = fminf(floorf(__fadd_rn(__fmul_rn(v0, isc), 0.5f)), (float) L);
        c1 = fminf(floorf(__fadd_rn(__fmul_rn(v1, isc), 0.5f)), (float) L);
        c0 = search ? ((g & 1) ? (float) L - c0 : c0) : 0.0f;   /* no search: no NaN into the int casts */
        c1 = search ? ((g & 1) ? (float) L - c1 : c1) : 0.0f;
    }
    /* sum(y), the min/max candidate's error, sum(q * y); sum(q) and sum(q^2) packed */
    float s[3];
    {
        float t0, t1;
        s[0] = __fadd_rn(y0, y1);
        s[1] = err_part<B>(x0, x1, __half2float(bdh), __half2float(bmh), t0, t1);
        s[2] = __fadd_rn(__fmul_rn(c0, y0), __fmul_rn(c1, y1));
    }
    uint32_t sq[1] = { pack_q_sums(c0, c1) };
    warp_sums(s);
    warp_sums(sq);
    const float sy = s[0];
    float best = warp == 0 ? s[1] : INFINITY;
    int best_i = warp == 0 ? 0 : INT_MAX;
    bool alive = search;
#pragma unroll
    for (int r = 0; r < SCALE_ROUNDS; r++) {
        __half dh, mh;
        alive = alive && fit_fp16<B>((float) (sq[0] & 1023u), (float) (sq[0] >> 10), s[2], sy, mn, dh, mh);
        c0 = c1 = 0.0f;
        float e[2];
        e[0] = alive ? err_part<B>(x0, x1, __half2float(dh), __half2float(mh), c0, c1) : 0.0f;
        if (r < SCALE_ROUNDS - 1) {               /* the last round's candidates are scored, not refitted */
            e[1] = __fadd_rn(__fmul_rn(c0, y0), __fmul_rn(c1, y1));
            sq[0] = pack_q_sums(c0, c1);
            warp_sums(e);
            warp_sums(sq);
            s[2] = e[1];
        } else {
            float el[1] = { e[0] };
            warp_sums(el);
            e[0] = el[0];
        }
        if (alive && e[0] < best) {               /* candidate index 1 + 3 g + r grows with r */
            best = e[0];
            best_i = 1 + SCALE_ROUNDS * g + r;
            bdh = dh;
            bmh = mh;
        }
    }
    if (lane == 0) best_of_warp[warp] = { best, best_i, __half_as_ushort(bdh), __half_as_ushort(bmh) };
    __syncthreads();
    candidate w = best_of_warp[0];
#pragma unroll
    for (int k = 1; k < SCALE_GRIDS; k++) {
        const candidate c = best_of_warp[k];
        if (c.err < w.err || (c.err == w.err && c.idx < w.idx)) w = c;
    }
    __syncthreads();                              /* best_of_warp is free for the next call */
    return params_of(__ushort_as_half(w.dh), __ushort_as_half(w.mh));
}

/* The reference's code of one value: round((x - m) / d) clamped to [0, L],
 * without fused multiply-add (code_f's expression). */
template <int B>
static __device__ __forceinline__ uint32_t code_of(const float x, const block_params & p) {
    return (uint32_t) code_f<B>(x, p.m, p.id);
}

/* Write one block from the warp's codes (lane l: codes of values l and l + 32). */
template <int B>
static __device__ __forceinline__ void pack_block_warp(const uint32_t c0, const uint32_t c1, const block_params & p,
                                                       uint8_t * out, const int lane) {
    if (lane == 0) {
        *(uint32_t *) out = (uint32_t) __half_as_ushort(p.dh) | ((uint32_t) __half_as_ushort(p.mh) << 16);
    }
    if constexpr (B == 4) {
        out[4 + lane] = (uint8_t) (c0 | (c1 << 4));            /* qs[j] = c[j] | c[j+32] << 4 */
    } else {
        /* ql/qs byte j (j < 16) = c[j] | c[j+16] << 2 | c[j+32] << 4 | c[j+48] << 6 */
        const uint32_t v = (c0 & 3u) | ((c1 & 3u) << 4);
        const uint32_t u = __shfl_down_sync(0xffffffffu, v, 16);
        if (lane < 16) out[4 + lane] = (uint8_t) (v | (u << 2));
        if constexpr (B == 3) {
            /* third bit of value j: bit j / 8 of qh[j % 8] */
            const uint32_t h0 = __ballot_sync(0xffffffffu, (c0 >> 2) & 1u);   /* values 0..31 */
            const uint32_t h1 = __ballot_sync(0xffffffffu, (c1 >> 2) & 1u);   /* values 32..63 */
            if (lane < 8) {
                uint32_t h = 0;
#pragma unroll
                for (int s2 = 0; s2 < 4; s2++) {
                    h |= ((h0 >> (lane + 8 * s2)) & 1u) << s2;
                    h |= ((h1 >> (lane + 8 * s2)) & 1u) << (s2 + 4);
                }
                out[4 + 16 + lane] = (uint8_t) h;
            }
        }
    }
}

/* One CTA of SEARCH_THREADS per destination block (lane l of each warp holds
 * values l and l + 32; the warps share the scale search), warp 0 writes the
 * block. Same arithmetic per value as the C reference (kvblock.c, block_scale.c). */
template <int B>
static __device__ __forceinline__ void encode_block_cta(float x0, float x1, uint8_t * out, const int lane, const int warp) {
    x0 = sanitize(x0);
    x1 = sanitize(x1);
    const block_params p = block_params_cta<B>(x0, x1, lane, warp);
    if (warp == 0) pack_block_warp<B>(code_of<B>(x0, p), code_of<B>(x1, p), p, out, lane);
}

/* ---- The same search for many blocks (a prefill ubatch): a group of
 * SCALE_GRIDS threads per block, thread g running starting grid g (thread 0
 * also the min/max candidate), each holding all 64 values in registers. Every
 * sum is block_scale.c's warp_order_sum spelled as a tree in registers (the
 * warp butterfly's pairs, so the same float adds in the same order) and the
 * winner goes round the group by three shuffles: the same bytes as the CTA
 * search and the C reference. The CTA search spends a prefill store in
 * shuffles and barriers (H100: 71 us for 512 tokens x 8 heads x d 128, which
 * took a 2048-token prefill from 0.97 to 0.90 of f16); here the work is plain
 * float math on many threads. Decode (a few blocks) keeps the CTA search,
 * whose latency is lower. */
constexpr int GROUP_BLOCKS = 32;                       /* blocks per CTA: 256 threads */
#ifndef PKV_GROUP_MIN_CTAS
#define PKV_GROUP_MIN_CTAS 1   /* CTAs per SM the register budget must allow (2: 128 registers, with spills) */
#endif
/* from how many blocks set_rows takes the group search (a decode step of a
 * Llama-8B layer has 16 blocks, which the CTA search stores in 3.7 us);
 * PKV_CUDA_GROUP_MIN_BLOCKS overrides it (tests, A/B). H100, pkv-cuda-test,
 * 512 tokens x 8 heads x d 128: CTA search 71 us, group search 31 us (41 us
 * when capped at 128 registers for two CTAs per SM, with spills), the min/max
 * rule of before the search 5 us; bytes identical to the C reference. */
static int group_min_blocks() {
    static const int v = [] {
        const char * e = getenv("PKV_CUDA_GROUP_MIN_BLOCKS");
        return e ? atoi(e) : 64;
    }();
    return v;
}
#define GROUP_MIN_BLOCKS group_min_blocks()

/* Sum of leaf(l) over the 32 lanes in the warp butterfly's order, depth first
 * (T(r, m) = T(r, 2m) + T(r + m, 2m), the lanes l = r mod m; T(r, 32) = leaf(r)):
 * the same adds as warp_order_sum with 5 partial sums live instead of 32. */
template <int R, int M, typename F>
static __device__ __forceinline__ float tree_sum(F && leaf) {
    if constexpr (M == 32) {
        return leaf(R);
    } else {
        const float a = tree_sum<R, 2 * M>(leaf);
        return __fadd_rn(a, tree_sum<R + M, 2 * M>(leaf));
    }
}

/* block_scale.c's stored_error: the squared error of the block stored as (d, m) */
template <int B>
static __device__ __forceinline__ float stored_error_regs(const float (&x)[PKV_BLOCK], const float d, const float m) {
    const float id = d > 0.0f ? __frcp_rn(d) : 0.0f;
    return tree_sum<0, 1>([&](const int l) {
        const float c0 = code_f<B>(x[l], m, id), c1 = code_f<B>(x[l + 32], m, id);
        const float t0 = __fsub_rn(__fadd_rn(m, __fmul_rn(d, c0)), x[l]);
        const float t1 = __fsub_rn(__fadd_rn(m, __fmul_rn(d, c1)), x[l + 32]);
        return __fadd_rn(__fmul_rn(t0, t0), __fmul_rn(t1, t1));
    });
}

/* Every thread of an aligned group of SCALE_GRIDS lanes calls this for the same
 * block (sanitized values), g = its index in the group; all get the winner. */
template <int B>
static __device__ __forceinline__ block_params block_params_group(const float (&x)[PKV_BLOCK], const int g) {
    constexpr int L = (1 << B) - 1;
    float mn = x[0], mx = x[0];
#pragma unroll
    for (int i = 1; i < PKV_BLOCK; i++) {
        mn = x[i] < mn ? x[i] : mn;        /* block_minmax: ties keep the first */
        mx = x[i] > mx ? x[i] : mx;
    }
    __half bdh, bmh;
    minmax_rule<B>(mn, mx, bdh, bmh);
    float best = INFINITY;
    int best_i = INT_MAX;
    if (g == 0) {
        best = stored_error_regs<B>(x, __half2float(bdh), __half2float(bmh));
        best_i = 0;
    }
    const float range = __fsub_rn(mx, mn);
    if (range > 0.0f && isfinite(__fdiv_rn((float) L, range))) {
        const float sy = tree_sum<0, 1>([&](const int l) { return __fadd_rn(__fsub_rn(x[l], mn), __fsub_rn(x[l + 32], mn)); });
        const float isc = __fdiv_rn(__fadd_rn((float) L - 0.5f, (float) (g >> 1)), range);
        float pm = 0.0f, pid = 0.0f;       /* the previous round's (m, 1/d): its codes feed this round's fit */
#pragma unroll 1
        for (int r = 0; r < SCALE_ROUNDS; r++) {
            float sq = 0.0f, sqq = 0.0f;   /* integers below 2^24: exact in any order */
            const float sqy = tree_sum<0, 1>([&](const int l) {
                float q[2];
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const float xv = x[l + 32 * h];
                    if (r == 0) {          /* the starting grid, from the minimum or down from the maximum */
                        const float v = (g & 1) ? __fsub_rn(mx, xv) : __fsub_rn(xv, mn);
                        const float c = fminf(floorf(__fadd_rn(__fmul_rn(v, isc), 0.5f)), (float) L);
                        q[h] = (g & 1) ? (float) L - c : c;
                    } else {
                        q[h] = code_f<B>(xv, pm, pid);
                    }
                }
                sq = __fadd_rn(sq, __fadd_rn(q[0], q[1]));
                sqq = __fadd_rn(sqq, __fadd_rn(__fmul_rn(q[0], q[0]), __fmul_rn(q[1], q[1])));
                return __fadd_rn(__fmul_rn(q[0], __fsub_rn(x[l], mn)), __fmul_rn(q[1], __fsub_rn(x[l + 32], mn)));
            });
            __half dh, mh;
            if (!fit_fp16<B>(sq, sqq, sqy, sy, mn, dh, mh)) break;
            const float d = __half2float(dh), m = __half2float(mh);
            const float e = stored_error_regs<B>(x, d, m);
            if (e < best) {                /* candidate 1 + 3 g + r: later rounds have higher indices */
                best = e;
                best_i = 1 + SCALE_ROUNDS * g + r;
                bdh = dh;
                bmh = mh;
            }
            pm = m;
            pid = d > 0.0f ? __frcp_rn(d) : 0.0f;
        }
    }
    unsigned short bd = __half_as_ushort(bdh), bm = __half_as_ushort(bmh);
#pragma unroll
    for (int o = 1; o < SCALE_GRIDS; o <<= 1) {   /* least error, ties to the lowest candidate */
        const float oe = __shfl_xor_sync(FULL, best, o);
        const int oi = __shfl_xor_sync(FULL, best_i, o);
        const unsigned short od = (unsigned short) __shfl_xor_sync(FULL, (int) bd, o);
        const unsigned short om = (unsigned short) __shfl_xor_sync(FULL, (int) bm, o);
        if (oe < best || (oe == best && oi < best_i)) {
            best = oe;
            best_i = oi;
            bd = od;
            bm = om;
        }
    }
    return params_of(__ushort_as_half(bd), __ushort_as_half(bm));
}

/* Thread g of the group writes its share of the block: the header (g = 0) and
 * the code bytes whose values it is given by compile-time index. */
template <int B>
static __device__ __forceinline__ void pack_block_group(const float (&x)[PKV_BLOCK], const block_params & p,
                                                        uint8_t * out, const int g) {
    if (g == 0) *(uint32_t *) out = (uint32_t) __half_as_ushort(p.dh) | ((uint32_t) __half_as_ushort(p.mh) << 16);
    if constexpr (B == 4) {                /* qs[j] = c[j] | c[j+32] << 4: bytes 4g .. 4g+3 */
#pragma unroll
        for (int k = 0; k < SCALE_GRIDS; k++) {
            if (k != g) continue;
            uint32_t w = 0;
#pragma unroll
            for (int b = 0; b < 4; b++) {
                const int j = 4 * k + b;
                w |= (code_of<B>(x[j], p) | (code_of<B>(x[j + 32], p) << 4)) << (8 * b);
            }
            *(uint32_t *) (out + 4 + 4 * k) = w;
        }
    } else {                               /* ql[j] = c[j] | c[j+16] << 2 | c[j+32] << 4 | c[j+48] << 6 (low 2 bits) */
#pragma unroll
        for (int k = 0; k < SCALE_GRIDS; k++) {
            if (k != g) continue;
            uint32_t w = 0;
#pragma unroll
            for (int b = 0; b < 2; b++) {
                const int j = 2 * k + b;
                const uint32_t v = (code_of<B>(x[j], p) & 3u) | ((code_of<B>(x[j + 16], p) & 3u) << 2) |
                                   ((code_of<B>(x[j + 32], p) & 3u) << 4) | ((code_of<B>(x[j + 48], p) & 3u) << 6);
                w |= v << (8 * b);
            }
            *(uint16_t *) (out + 4 + 2 * k) = (uint16_t) w;
            if constexpr (B == 3) {        /* qh[j], j = g: bit s of value j + 8 s, bit s + 4 of value 32 + j + 8 s */
                uint32_t h = 0;
#pragma unroll
                for (int s2 = 0; s2 < 4; s2++) {
                    h |= ((code_of<B>(x[k + 8 * s2], p) >> 2) & 1u) << s2;
                    h |= ((code_of<B>(x[32 + k + 8 * s2], p) >> 2) & 1u) << (s2 + 4);
                }
                out[4 + 16 + k] = (uint8_t) h;
            }
        }
    }
}

template <int B, typename src_t, typename idx_t>
__global__ void __launch_bounds__(GROUP_BLOCKS * SCALE_GRIDS, PKV_GROUP_MIN_CTAS) k_set_rows_group(const char * src, const char * idx,
        char * dst, const int64_t nblk_row, const int64_t ne01, const int64_t ne02, const int64_t nblocks,
        const size_t nb01, const size_t nb02, const size_t nb03,
        const int64_t ne11, const int64_t ne12, const size_t nb10, const size_t nb11, const size_t nb12,
        const size_t nb1, const size_t nb2, const size_t nb3) {
    const int64_t i_raw = (int64_t) blockIdx.x * GROUP_BLOCKS + threadIdx.x / SCALE_GRIDS;
    const int g = threadIdx.x % SCALE_GRIDS;
    const int64_t i = i_raw < nblocks ? i_raw : nblocks - 1;   /* the group shuffles need every lane */
    pdl_wait();
    pdl_trigger();
    const int64_t ib  = i % nblk_row;
    int64_t r = i / nblk_row;
    const int64_t i01 = r % ne01; r /= ne01;
    const int64_t i02 = r % ne02;
    const int64_t i03 = r / ne02;
    const src_t * xs = (const src_t *) (src + i01 * nb01 + i02 * nb02 + i03 * nb03) + ib * PKV_BLOCK;
    float x[PKV_BLOCK];
#pragma unroll
    for (int k = 0; k < PKV_BLOCK; k++) x[k] = sanitize(to_f<src_t>(xs[k]));
    const block_params p = block_params_group<B>(x, g);
    if (i_raw >= nblocks) return;
    const int64_t row = (int64_t) *(const idx_t *) (idx + i01 * nb10 + (i02 % ne11) * nb11 + (i03 % ne12) * nb12);
    pack_block_group<B>(x, p, (uint8_t *) (dst + row * nb1 + i02 * nb2 + i03 * nb3 + ib * fmt<B>::bytes), g);
}

template <int B, typename src_t, typename idx_t>
__global__ void k_set_rows(const char * src, const char * idx, char * dst,     /* no __restrict__: PDL, see pdl_wait */
                           const int64_t nblk_row, const int64_t ne01, const int64_t ne02, const int64_t nblocks,
                           const size_t nb01, const size_t nb02, const size_t nb03,
                           const int64_t ne11, const int64_t ne12, const size_t nb10, const size_t nb11, const size_t nb12,
                           const size_t nb1, const size_t nb2, const size_t nb3) {
    const int64_t i = blockIdx.x;         /* one CTA per destination block */
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    pdl_wait();                           /* the rows come from the kernel just before */
    pdl_trigger();
    if (i >= nblocks) return;             /* whole CTAs */
    const int64_t ib  = i % nblk_row;
    int64_t r = i / nblk_row;
    const int64_t i01 = r % ne01; r /= ne01;
    const int64_t i02 = r % ne02;
    const int64_t i03 = r / ne02;
    const int64_t row = (int64_t) *(const idx_t *) (idx + i01 * nb10 + (i02 % ne11) * nb11 + (i03 % ne12) * nb12);
    const src_t * x = (const src_t *) (src + i01 * nb01 + i02 * nb02 + i03 * nb03) + ib * PKV_BLOCK;
    uint8_t * out = (uint8_t *) (dst + row * nb1 + i02 * nb2 + i03 * nb3 + ib * fmt<B>::bytes);
    encode_block_cta<B>(to_f<src_t>(x[lane]), to_f<src_t>(x[lane + 32]), out, lane, warp);
}

/* SQuat key encoder (the CUDA twin of pkv_squat_quantize_row_ref, squat.c):
 * per block, the scale and minimum from the current error-updated values (the
 * min/max rule, not the plain encoder's search: see squat.c), then
 * value by value the code, its error times 1/U[j][j], and the OBS update
 * w[c] -= err * U[j][c] of every later value of the head, all in float32 with
 * the reference's roundings (fma where it fuses, nothing else fused). The
 * update chain is serial in j, so one warp encodes one (token, head) row with
 * the values in registers (lane l: values 64 b + l and 64 b + 32 + l of block
 * b). One CTA per head and group of SQ_NW tokens: the head's U (upper
 * triangle, fp16, as the host side state keeps it: pkv_squat_pack) and the
 * reciprocals of its diagonal are staged in shared memory once. */
constexpr int SQ_NW = 4;

static __host__ __device__ constexpr int squat_packed_len(int D) { return D * (D + 1) / 2; }

/* shared memory of one CTA: U's packed triangle (fp16), then 1/U[j][j] (float) */
static __host__ __device__ constexpr size_t squat_smem_bytes(int D) {
    return ((size_t) squat_packed_len(D) * sizeof(__half) + 15) / 16 * 16 + (size_t) D * sizeof(float);
}

template <int B, int D, typename idx_t>
__global__ void __launch_bounds__(SQ_NW * 32) k_squat_set_rows(const char * src, const char * idx, char * dst,
        const uint16_t * Up, const float * mu, const int64_t n_tok, const size_t nb01, const size_t nb10, const size_t nb1) {
    constexpr int NB = D / PKV_BLOCK;               /* blocks per head row */
    constexpr int PL = squat_packed_len(D);
    extern __shared__ __align__(16) unsigned char sq_smem[];
    __half * su = (__half *) sq_smem;               /* PL values */
    float * rinv = (float *) (sq_smem + (PL * sizeof(__half) + 15) / 16 * 16);   /* D values */
    const int h = blockIdx.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const __half * uh = (const __half *) Up + (size_t) h * PL;
    /* Staged in 16-byte pieces, eight in flight per thread: element by element,
     * one load after another, this copy was most of a decode launch (ncu, cold
     * L2: 54 us at D = 128, of which the 128 OBS steps are a fraction). */
    static_assert(PL % 8 == 0, "U's packed triangle is whole 16-byte pieces for D = 64, 128, 256");
    if ((((uintptr_t) uh) & 15) == 0) {
        const uint4 * u4 = (const uint4 *) uh;
        uint4 * s4 = (uint4 *) su;
#pragma unroll 8
        for (int i = threadIdx.x; i < PL / 8; i += SQ_NW * 32) s4[i] = u4[i];
    } else {
        for (int i = threadIdx.x; i < PL; i += SQ_NW * 32) su[i] = uh[i];
    }
    __syncthreads();
    /* 1/U[j][j] (correctly rounded, as the reference's 1.0f / ujj; 0: no error
     * propagated), off the serial chain below */
    for (int j = threadIdx.x; j < D; j += SQ_NW * 32) {
        const float ujj = __half2float(su[j * D - j * (j - 1) / 2]);
        rinv[j] = (ujj > 0.0f && isfinite(ujj)) ? __frcp_rn(ujj) : 0.0f;
    }
    pdl_wait();                                     /* the rows come from the kernel just before */
    pdl_trigger();
    __syncthreads();
    const int64_t t = (int64_t) blockIdx.x * SQ_NW + warp;
    if (t >= n_tok) return;                         /* whole warps, after the only barriers */

    const float * x = (const float *) (src + t * nb01) + (size_t) h * D;
    /* the key's center row (centering side state, side_center.cpp) subtracted
     * here instead of by a graph op: the float subtraction ggml_sub does */
    const float * muh = mu ? mu + (size_t) h * D : nullptr;
    float w[2 * NB];
#pragma unroll
    for (int k = 0; k < 2 * NB; k++) {
        const float xv = x[32 * k + lane];
        w[k] = sanitize(muh ? __fsub_rn(xv, muh[32 * k + lane]) : xv);
    }
    const int64_t row = (int64_t) *(const idx_t *) (idx + t * nb10);
    uint8_t * out = (uint8_t *) (dst + row * nb1) + (size_t) h * NB * fmt<B>::bytes;

    /* The serial chain of step j is only: value j -> its code -> its error ->
     * value j+1 (one fma), a dozen float ops. Every lane runs it redundantly on
     * `wj`, the current value of column j, so no shuffle sits on it: value j+1
     * before this step's update is fetched from its owner lane while the code
     * is computed, and updated with the same fma the owner applies to its own
     * copy (bit-identical to the owner's value, hence to the reference). Off
     * the chain, each lane updates the later values it owns (a select: err == 0
     * leaves w as the reference's skip does); U[j][.] is read before the error
     * is known. */
#pragma unroll
    for (int b = 0; b < NB; b++) {
        const block_params p = block_params_minmax_warp<B>(sanitize(w[2 * b]), sanitize(w[2 * b + 1]), lane);
        uint32_t c[2] = { 0, 0 };
#pragma unroll
        for (int hh = 0; hh < 2; hh++) {
            const int slot = 2 * b + hh;
            float wj = __shfl_sync(FULL, w[slot], 0);   /* column 32 slot, fully updated */
            /* Not fully unrolled: 128 unrolled steps (D = 128) are ~80 KB of straight
             * code that one warp runs once, so every step missed the instruction
             * cache (ncu, which flushes the caches: 72 us per launch; back to back:
             * 30 us). Rolled by 4 the loop body stays cached; w[] is still indexed
             * by compile-time slots only. */
#pragma unroll 4
            for (int o = 0; o < 32; o++) {              /* value j of the head, owned by lane o */
                const int j = PKV_BLOCK * b + 32 * hh + o;
                const __half * urow = su + (j * D - j * (j - 1) / 2) - j;   /* urow[c] = U[j][c], c >= j */
                float u[2 * NB];
#pragma unroll
                for (int k = slot; k < 2 * NB; k++) {
                    const int cidx = 32 * k + lane;
                    u[k] = cidx > j ? __half2float(urow[cidx]) : 0.0f;
                }
                const float ynext = __shfl_sync(FULL, w[slot], (o + 1) & 31);   /* column j+1 (o < 31) */
                const float unext = o < 31 ? __half2float(urow[j + 1]) : 0.0f;
                const uint32_t code = code_of<B>(sanitize(wj), p);
                const float qv = __fmaf_rn(p.d, (float) code, p.m);
                const float err = __fmul_rn(__fsub_rn(wj, qv), rinv[j]);
                c[hh] = lane == o ? code : c[hh];
                wj = err != 0.0f ? __fmaf_rn(-err, unext, ynext) : ynext;
#pragma unroll
                for (int k = slot; k < 2 * NB; k++) {   /* earlier slots hold only values < j */
                    const int cidx = 32 * k + lane;
                    w[k] = (err != 0.0f && cidx > j) ? __fmaf_rn(-err, u[k], w[k]) : w[k];
                }
            }
        }
        pack_block_warp<B>(c[0], c[1], p, out + b * fmt<B>::bytes, lane);
    }
}

template <int B, int D>
int squat_set_rows_d(const void * src, const void * idx, int idx_i64, const void * Up, const float * mu, int n_head,
                     void * dst, int64_t n_tok, size_t nb01, size_t nb10, size_t nb1, cudaStream_t stream) {
    const size_t smem = squat_smem_bytes(D);
    const dim3 grid((unsigned) ((n_tok + SQ_NW - 1) / SQ_NW), (unsigned) n_head);
    auto kern = idx_i64 ? k_squat_set_rows<B, D, int64_t> : k_squat_set_rows<B, D, int32_t>;
    if (smem > 48 * 1024) {
        static bool raised[2][PKV_MAX_DEVICES] = {};   /* per idx type and device */
        const cudaError_t e = raise_smem_limit(kern, (int) smem, raised[idx_i64 ? 1 : 0]);
        if (e != cudaSuccess) return (int) e;
    }
    return (int) pdl_launch(kern, grid, dim3(SQ_NW * 32), smem, stream, (const char *) src, (const char *) idx,
                            (char *) dst, (const uint16_t *) Up, mu, n_tok, nb01, nb10, nb1);
}

template <int B>
int squat_set_rows_b(int D, const void * src, const void * idx, int idx_i64, const void * Up, const float * mu, int n_head,
                     void * dst, int64_t n_tok, size_t nb01, size_t nb10, size_t nb1, cudaStream_t stream) {
    switch (D) {
        case  64: return squat_set_rows_d<B,  64>(src, idx, idx_i64, Up, mu, n_head, dst, n_tok, nb01, nb10, nb1, stream);
        case 128: return squat_set_rows_d<B, 128>(src, idx, idx_i64, Up, mu, n_head, dst, n_tok, nb01, nb10, nb1, stream);
        case 256: return squat_set_rows_d<B, 256>(src, idx, idx_i64, Up, mu, n_head, dst, n_tok, nb01, nb10, nb1, stream);
        default:  return -1;
    }
}

template <int B, typename src_t>
int set_rows_t(const void * src, const void * idx, int idx_i64, void * dst,
               int64_t ne00, int64_t ne01, int64_t ne02, int64_t ne03, size_t nb01, size_t nb02, size_t nb03,
               int64_t ne11, int64_t ne12, size_t nb10, size_t nb11, size_t nb12,
               size_t nb1, size_t nb2, size_t nb3, cudaStream_t stream) {
    const int64_t nblk_row = ne00 / PKV_BLOCK;
    const int64_t nblocks  = nblk_row * ne01 * ne02 * ne03;
    if (nblocks == 0) return 0;
    if (nblocks >= GROUP_MIN_BLOCKS) {   /* many blocks: a thread group per block */
        const dim3 gg((unsigned) ((nblocks + GROUP_BLOCKS - 1) / GROUP_BLOCKS));
        auto kern = idx_i64 ? k_set_rows_group<B, src_t, int64_t> : k_set_rows_group<B, src_t, int32_t>;
        return (int) pdl_launch(kern, gg, dim3(GROUP_BLOCKS * SCALE_GRIDS), 0, stream, (const char *) src,
            (const char *) idx, (char *) dst, nblk_row, ne01, ne02, nblocks, nb01, nb02, nb03, ne11, ne12, nb10, nb11,
            nb12, nb1, nb2, nb3);
    }
    const dim3 grid((unsigned) nblocks);  /* a CTA per block */
    if (idx_i64) {
        return (int) pdl_launch(k_set_rows<B, src_t, int64_t>, grid, dim3(SEARCH_THREADS), 0, stream, (const char *) src, (const char *) idx,
            (char *) dst, nblk_row, ne01, ne02, nblocks, nb01, nb02, nb03, ne11, ne12, nb10, nb11, nb12, nb1, nb2, nb3);
    }
    return (int) pdl_launch(k_set_rows<B, src_t, int32_t>, grid, dim3(SEARCH_THREADS), 0, stream, (const char *) src, (const char *) idx,
        (char *) dst, nblk_row, ne01, ne02, nblocks, nb01, nb02, nb03, ne11, ne12, nb10, nb11, nb12, nb1, nb2, nb3);
}

struct dims4 { int64_t ne[4]; size_t nb[4]; };

static __device__ __forceinline__ size_t offs_of(const dims4 & t, int64_t e) {
    const int64_t i0 = e % t.ne[0]; e /= t.ne[0];
    const int64_t i1 = e % t.ne[1]; e /= t.ne[1];
    const int64_t i2 = e % t.ne[2];
    const int64_t i3 = e / t.ne[2];
    return i0 * t.nb[0] + i1 * t.nb[1] + i2 * t.nb[2] + i3 * t.nb[3];
}

/* element e of a tensor's row-major order -> our block's byte offset */
template <int B>
static __device__ __forceinline__ size_t our_block_offs(const dims4 & q, const int64_t e0) {
    int64_t r = e0;
    const int64_t i0 = r % q.ne[0]; r /= q.ne[0];
    const int64_t i1 = r % q.ne[1]; r /= q.ne[1];
    const int64_t i2 = r % q.ne[2];
    const int64_t i3 = r / q.ne[2];
    return (i0 / PKV_BLOCK) * fmt<B>::bytes + i1 * q.nb[1] + i2 * q.nb[2] + i3 * q.nb[3];
}

/* f32 -> ours: one CTA per block of ours (the set_rows encoder);
 * element order = row-major order of each tensor */
template <int B>
__global__ void k_cpy_to_ours(const char * __restrict__ src, char * __restrict__ dst, const dims4 f, const dims4 q,
                              const int64_t nblocks) {
    const int64_t i = blockIdx.x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (i >= nblocks) return;                   /* whole CTAs */
    const int64_t e0 = i * PKV_BLOCK;           /* first element, also in ours: ne[0] % 64 == 0 */
    encode_block_cta<B>(*(const float *) (src + offs_of(f, e0 + lane)), *(const float *) (src + offs_of(f, e0 + lane + 32)),
                        (uint8_t *) dst + our_block_offs<B>(q, e0), lane, warp);
}

/* ours -> f32: one thread per block of ours */
template <int B>
__global__ void k_cpy_from_ours(const char * __restrict__ src, char * __restrict__ dst, const dims4 f, const dims4 q,
                                const int64_t nblocks) {
    const int64_t i = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= nblocks) return;
    const int64_t e0 = i * PKV_BLOCK;
    const uint32_t * w = (const uint32_t *) (src + our_block_offs<B>(q, e0));
#pragma unroll
    for (int qd = 0; qd < 16; qd++) {
        float y[4];
        decode_quad<B>(w, qd, y);
#pragma unroll
        for (int k = 0; k < 4; k++) *(float *) (dst + offs_of(f, e0 + 4 * qd + k)) = y[k];
    }
}

/* one thread per quad (4 values); rows of dst contiguous */
template <int B, typename dst_t>
__global__ void k_get_rows(const char * __restrict__ src, const int32_t * __restrict__ idx, dst_t * __restrict__ dst,
                           const int64_t nq_row, const int64_t ne10, const int64_t ne11, const int64_t nquads,
                           const size_t nb01, const size_t nb02, const size_t nb03,
                           const size_t nb10, const size_t nb11, const size_t nb12,
                           const size_t nb1, const size_t nb2, const size_t nb3) {
    const int64_t i = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= nquads) return;
    const int64_t iq = i % nq_row;
    int64_t r = i / nq_row;
    const int64_t i10 = r % ne10; r /= ne10;
    const int64_t i11 = r % ne11;
    const int64_t i12 = r / ne11;
    const int64_t row = idx[(i10 * nb10 + i11 * nb11 + i12 * nb12) / sizeof(int32_t)];
    const uint32_t * w = (const uint32_t *) (src + row * nb01 + i11 * nb02 + i12 * nb03 + (iq / 16) * fmt<B>::bytes);
    float y[4];
    decode_quad<B>(w, (int) (iq % 16), y);
    dst_t * o = (dst_t *) ((char *) dst + i10 * nb1 + i11 * nb2 + i12 * nb3) + iq * 4;
#pragma unroll
    for (int k = 0; k < 4; k++) o[k] = from_f<dst_t>(y[k]);
}

/* one thread per quad, writing 4 consecutive outputs */
template <int B, typename dst_t>
__global__ void k_to_float(const char * __restrict__ src, dst_t * __restrict__ dst,
                           const int64_t nq_row, const int64_t ne01, const int64_t ne02, const int64_t nquads,
                           const int64_t s01, const int64_t s02, const int64_t s03) {
    const int64_t i = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= nquads) return;
    const int64_t iq = i % nq_row;
    int64_t r = i / nq_row;
    const int64_t i01 = r % ne01; r /= ne01;
    const int64_t i02 = r % ne02;
    const int64_t i03 = r / ne02;
    const int64_t blk = i01 * s01 + i02 * s02 + i03 * s03 + iq / 16;
    const uint32_t * w = (const uint32_t *) (src + blk * fmt<B>::bytes);
    float y[4];
    decode_quad<B>(w, (int) (iq % 16), y);
    dst_t * o = dst + i * 4;
    if constexpr (sizeof(dst_t) == 2) {
        const half2 a = __floats2half2_rn(y[0], y[1]), b = __floats2half2_rn(y[2], y[3]);
        uint2 u;
        u.x = *(const uint32_t *) &a;
        u.y = *(const uint32_t *) &b;
        *(uint2 *) o = u;
    } else {
        *(float4 *) o = make_float4(y[0], y[1], y[2], y[3]);
    }
}

} // namespace

#define PKV_BITS_SWITCH(bits, F, ...)                     \
    switch (bits) {                                       \
        case 4: return F<4>(__VA_ARGS__);                 \
        case 3: return F<3>(__VA_ARGS__);                 \
        case 2: return F<2>(__VA_ARGS__);                 \
        default: return -1;                               \
    }

namespace {
template <int B>
int set_rows_b(const void * src, int src_type, const void * idx, int idx_i64, void * dst,
               int64_t ne00, int64_t ne01, int64_t ne02, int64_t ne03, size_t nb01, size_t nb02, size_t nb03,
               int64_t ne11, int64_t ne12, size_t nb10, size_t nb11, size_t nb12,
               size_t nb1, size_t nb2, size_t nb3, cudaStream_t stream) {
    if (src_type == PKV_CUDA_T_F32) {
        return set_rows_t<B, float>(src, idx, idx_i64, dst, ne00, ne01, ne02, ne03, nb01, nb02, nb03,
                                    ne11, ne12, nb10, nb11, nb12, nb1, nb2, nb3, stream);
    }
    if (src_type == PKV_CUDA_T_F16) {
        return set_rows_t<B, half>(src, idx, idx_i64, dst, ne00, ne01, ne02, ne03, nb01, nb02, nb03,
                                   ne11, ne12, nb10, nb11, nb12, nb1, nb2, nb3, stream);
    }
    return -1;
}

template <int B>
int cpy_b(int to_ours, const void * src, void * dst, const dims4 & f, const dims4 & q, int64_t nblocks, cudaStream_t stream) {
    if (to_ours) {
        k_cpy_to_ours<B><<<dim3((unsigned) nblocks), SEARCH_THREADS, 0, stream>>>((const char *) src, (char *) dst, f, q, nblocks);
    } else {
        const dim3 grid((unsigned) ((nblocks + NT - 1) / NT));
        k_cpy_from_ours<B><<<grid, NT, 0, stream>>>((const char *) src, (char *) dst, f, q, nblocks);
    }
    return (int) cudaGetLastError();
}

template <int B>
int get_rows_b(const void * src, const int32_t * idx, void * dst, int dst_type, int64_t ne00,
               size_t nb01, size_t nb02, size_t nb03, int64_t ne10, int64_t ne11, int64_t ne12,
               size_t nb10, size_t nb11, size_t nb12, size_t nb1, size_t nb2, size_t nb3, cudaStream_t stream) {
    const int64_t nq_row = ne00 / 4;
    const int64_t nquads = nq_row * ne10 * ne11 * ne12;
    const dim3 grid((unsigned) ((nquads + NT - 1) / NT));
    if (dst_type == PKV_CUDA_T_F32) {
        k_get_rows<B, float><<<grid, NT, 0, stream>>>((const char *) src, idx, (float *) dst, nq_row, ne10, ne11, nquads,
            nb01, nb02, nb03, nb10, nb11, nb12, nb1, nb2, nb3);
    } else if (dst_type == PKV_CUDA_T_F16) {
        k_get_rows<B, half><<<grid, NT, 0, stream>>>((const char *) src, idx, (half *) dst, nq_row, ne10, ne11, nquads,
            nb01, nb02, nb03, nb10, nb11, nb12, nb1, nb2, nb3);
    } else {
        return -1;
    }
    return (int) cudaGetLastError();
}

template <int B>
int to_float_b(const void * src, void * dst, int dst_type, int64_t ne00, int64_t ne01, int64_t ne02, int64_t ne03,
               int64_t s01, int64_t s02, int64_t s03, cudaStream_t stream) {
    const int64_t nq_row = ne00 / 4;
    const int64_t nquads = nq_row * ne01 * ne02 * ne03;
    const dim3 grid((unsigned) ((nquads + NT - 1) / NT));
    if (dst_type == PKV_CUDA_T_F32) {
        k_to_float<B, float><<<grid, NT, 0, stream>>>((const char *) src, (float *) dst, nq_row, ne01, ne02, nquads, s01, s02, s03);
    } else if (dst_type == PKV_CUDA_T_F16) {
        k_to_float<B, half><<<grid, NT, 0, stream>>>((const char *) src, (half *) dst, nq_row, ne01, ne02, nquads, s01, s02, s03);
    } else {
        return -1;
    }
    return (int) cudaGetLastError();
}
} // namespace

extern "C" int pkv_cuda_set_rows(int bits, const void * src, int src_type, const void * idx, int idx_i64, void * dst,
                                 int64_t ne00, int64_t ne01, int64_t ne02, int64_t ne03,
                                 size_t nb01, size_t nb02, size_t nb03,
                                 int64_t ne11, int64_t ne12, size_t nb10, size_t nb11, size_t nb12,
                                 size_t nb1, size_t nb2, size_t nb3, cudaStream_t stream) {
    if (ne00 % PKV_BLOCK != 0 || ne11 <= 0 || ne12 <= 0) return -1;
    PKV_BITS_SWITCH(bits, set_rows_b, src, src_type, idx, idx_i64, dst, ne00, ne01, ne02, ne03, nb01, nb02, nb03,
                    ne11, ne12, nb10, nb11, nb12, nb1, nb2, nb3, stream)
}

extern "C" int pkv_cuda_cpy(int bits, int to_ours, const void * src, void * dst,
                            const int64_t ne_f[4], const size_t nb_f[4],
                            const int64_t ne_q[4], const size_t nb_q[4], cudaStream_t stream) {
    dims4 f, q;
    int64_t nf = 1, nq = 1;
    for (int i = 0; i < 4; i++) {
        f.ne[i] = ne_f[i]; f.nb[i] = nb_f[i]; nf *= ne_f[i];
        q.ne[i] = ne_q[i]; q.nb[i] = nb_q[i]; nq *= ne_q[i];
    }
    if (nf != nq || q.ne[0] % PKV_BLOCK != 0) return -1;
    if (nq == 0) return 0;
    PKV_BITS_SWITCH(bits, cpy_b, to_ours, src, dst, f, q, nq / PKV_BLOCK, stream)
}

extern "C" int pkv_cuda_get_rows(int bits, const void * src, const int32_t * idx, void * dst, int dst_type,
                                 int64_t ne00, size_t nb01, size_t nb02, size_t nb03,
                                 int64_t ne10, int64_t ne11, int64_t ne12, size_t nb10, size_t nb11, size_t nb12,
                                 size_t nb1, size_t nb2, size_t nb3, cudaStream_t stream) {
    if (ne00 % PKV_BLOCK != 0) return -1;
    if (ne00 * ne10 * ne11 * ne12 == 0) return 0;
    PKV_BITS_SWITCH(bits, get_rows_b, src, idx, dst, dst_type, ne00, nb01, nb02, nb03, ne10, ne11, ne12,
                    nb10, nb11, nb12, nb1, nb2, nb3, stream)
}

extern "C" int pkv_cuda_to_float(int bits, const void * src, void * dst, int dst_type,
                                 int64_t ne00, int64_t ne01, int64_t ne02, int64_t ne03,
                                 int64_t s01, int64_t s02, int64_t s03, cudaStream_t stream) {
    if (ne00 % PKV_BLOCK != 0) return -1;
    if (ne00 * ne01 * ne02 * ne03 == 0) return 0;
    PKV_BITS_SWITCH(bits, to_float_b, src, dst, dst_type, ne00, ne01, ne02, ne03, s01, s02, s03, stream)
}

extern "C" int pkv_cuda_squat_set_rows(int bits, int head_dim, int n_head, const float * src, const void * idx, int idx_i64,
                                       const uint16_t * U_packed, const float * mu, void * dst, int64_t n_tok,
                                       size_t nb01, size_t nb10, size_t nb1, cudaStream_t stream) {
    if (n_head < 1 || n_tok < 0 || !pkv_cuda_squat_supported(head_dim)) return -1;
    if (n_tok == 0) return 0;
    PKV_BITS_SWITCH(bits, squat_set_rows_b, head_dim, src, idx, idx_i64, U_packed, mu, n_head, dst, n_tok, nb01, nb10, nb1, stream)
}

extern "C" int pkv_cuda_squat_supported(int head_dim) {
    return PKV_SQUAT_GPU_HEAD_DIM_OK(head_dim) ? 1 : 0;
}
