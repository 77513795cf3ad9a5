/*
 * pyllm-kv flash-attention decode kernel, warp-tiled (template; instantiated
 * per K type in pkv_fattn_k{4,3,2}.cu, chosen by pkv_fattn.cu). K and V of
 * kv4/kv3/kv2 in any mix, head size 128, head slices 8-byte aligned; other
 * cases keep the kernels of pkv_fattn.cuh / pkv_fattn_mma.cuh.
 *
 * Why (ncu on the CTA-tiled mma kernel, H100, Llama-8B shape at 32k): 30.7 us
 * per layer for 37.7 MB, ~40 warp-instructions per token and 3 CTA barriers per
 * tile, 57% of cycles with no eligible warp. This kernel cuts the instruction
 * count per token ~3x and has no CTA barrier in its main loop:
 *
 *   - CTA = NW = 4 independent warps for one KV head, one chunk of the KV length
 *     and R = 8 query rows (the GQA heads of that KV head times the query
 *     columns). The chunk's 32-token tiles go round-robin to the warps (the
 *     host plan gives every warp the same count and makes the grid at most one
 *     wave); each warp runs its own NS-stage cp.async ring (NS = 3, or 2 with a
 *     128-register bound for 4 CTAs per SM; 8-byte pieces, consecutive lanes on
 *     consecutive pieces of the same token rows, slices stored densely in shared
 *     memory), waits with cp.async.wait_group + __syncwarp, and keeps its own
 *     online-softmax state; the mask values of the next tile are loaded while
 *     the current one is computed. The warps' (M, S, O) are merged once at the
 *     end (one barrier), then written as the chunk's partial result for the
 *     combine kernel of pkv_fattn.cu, or straight into dst (with the sinks) when
 *     the plan has one chunk.
 *   - K.Q on int8 tensor cores: mma.m16n8k32 u8 x s8 -> s32, A = the K codes
 *     (16 tokens x 32 dims: every code is a byte after one AND, or a shift and
 *     an AND), B = Q quantized to int8 per 64 values (rows x dims, kept in 8
 *     registers for the whole kernel; its dims are permuted to match the order
 *     the codes come out of the words). One accumulator per 64-value block starts
 *     at 0x4B400000, so float(acc) - 1.5*2^23 is the integer dot product with
 *     no conversion instruction; the block scale/min are applied per token and
 *     row with 3 FMAs: score += d_k * (d_q*acc - d_q*1.5*2^23) + m_k * d_q*sum(q).
 *   - The score fragment (token, query row) is the layout movmatrix.trans turns
 *     into the B fragment (token pairs, query row) of the V mma: no shared-memory
 *     round trip for P. Softmax in log2 units (scale * log2 e folded into d_q);
 *     tile max over 4 lanes with 3 shuffles per row; the accumulators are
 *     rescaled only when some row's maximum grew (warp vote).
 *   - V on f16 tensor cores: O^T[dim, row] += Vcode^T[dim, tok] * (P d_v)^T,
 *     m16n8k16 f32-accumulate. A codes are f16 1024 + s*c built with one
 *     byte_perm per 2 tokens and one LOP3 each (s = 1, 4, 16 or 64: the field's
 *     position in the byte, divided out at the end; the 0x64006400 comes in as a
 *     kernel parameter, else ptxas splits (t & mask) | 0x64006400 into two LOP3s). A ones-row mma per block
 *     gives sum_t f16(P d_v), which removes the 1024 exactly; sum_t P m_v is
 *     accumulated per token pair with FMAs.
 *   Token order inside a 16-token step is free (k is summed over): m-row g of
 *   the K mma is token tau(g) = 4*(g/2) + g%2 and m-row g+8 is tau(g) + 2, so
 *   after movmatrix lane (g, c) holds P for tokens 4c..4c+3, which is what its
 *   V A-fragment reads; with dense slices these reads are bank-conflict free.
 *
 * Measured (H100 SXM, Llama-8B shape, kv4/kv4 at depth 32768, ncu, perf_run.sh,
 * 2026-11-23): 28.2 us in ncu's timing (about the old kernel's 30.7), 7.0 M
 * warp-instructions (~600 per tile in the loop, ~850 with the per-warp prologue and
 * merge), 168 registers -> 12 warps per SM, 7.85 cycles between a warp's issues
 * (long scoreboard 36%, fixed-latency waits 18%), 43% of DRAM peak: latency-bound.
 * In llama-bench the marginal cost 32k -> 64k is 2.0 TB/s; see docs/speed.md for
 * the table and what to do next.
 */
#pragma once

#include "pkv_fattn_mma.cuh"

namespace pkv {
namespace fa3 {

constexpr int NW = 4;                       /* warps per CTA */
constexpr int NT = 32 * NW;
constexpr int TT = 32;                      /* tokens per warp tile */
/* cp.async stages per warp: 3 (3 CTAs per SM by registers) or 2 (launch bounds for 4 CTAs per SM) */
constexpr int R  = 8;                       /* query rows per CTA (mma n) */
constexpr int D  = 128;
constexpr int NB = D / 64;                  /* blocks per head slice */
constexpr int QS = D + 16;                  /* bytes per int8 Q row in shared memory */
constexpr int MAGIC = 0x4B400000;           /* float 1.5 * 2^23 */
constexpr float MAGIC_F = 12582912.0f;
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2   = 0.6931471805599453f;
constexpr uint32_t FULL = 0xffffffffu;

template <int T> __host__ __device__ constexpr int sw() { return NB * kv_words_per_block<T>(); }  /* words per token slice */
template <int T> __host__ __device__ constexpr int np() { return sw<T>() / 2; }                  /* 8-byte pieces per slice */

template <int KT, int VT, int NS>
struct layout {
    static constexpr int SK = sw<KT>(), SV = sw<VT>();
    static constexpr int stage_words = TT * (SK + SV);
    static constexpr int warp_words  = NS * stage_words;
    static constexpr int pipe_words  = NW * warp_words;
    static constexpr int merge_words = NW * R * (D + 3) + 2 * R;
    static constexpr int big_words   = pipe_words > merge_words ? pipe_words : merge_words;
    static constexpr int q_words     = R * QS / 4;
    static constexpr int words = big_words + q_words + 2 * R * NB;
    static constexpr size_t bytes = 4 * (size_t) words;
};

static __device__ __forceinline__ void cp8(const uint32_t s, const void * gmem, const int n) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" :: "r"(s), "l"(gmem), "r"(n) : "memory");
}

static __device__ __forceinline__ void mma_u8s8(int (&c)[4], const uint32_t a0, const uint32_t a1, const uint32_t a2,
                                                const uint32_t a3, const int b0, const int b1) {
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

static __device__ __forceinline__ uint32_t movtrans(const uint32_t x) {
    uint32_t y;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
    return y;
}

static __device__ __forceinline__ float2 h2f2(const uint32_t w) {
    return __half22float2(*reinterpret_cast<const __half2 *>(&w));
}

static __device__ __forceinline__ uint32_t f2h2(const float lo, const float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t *>(&h);
}

/* dims (within the head) of the 4 int8 Q values that meet K fragment register
 * h (0: a0/a1, 1: a2/a3) of k-step ks of block b, for lane column c */
template <int KT>
static __device__ __forceinline__ int qdim(const int b, const int ks, const int h, const int c) {
    if constexpr (KT == 4) {
        /* block 0: pairs (q1,q2) (q3,q4) (q5,q6) for c < 3, (q7, q0) for c = 3; block 1: (q2c, q2c+1) */
        const int w = b == 0 ? (c < 3 ? 2 * c + 1 + h : (h == 0 ? 7 : 0)) : 2 * c + h;
        return 64 * b + 32 * ks + 4 * w;
    } else {
        return 64 * b + 32 * ks + 16 * h + 4 * c;
    }
}

/* K codes of block b of the two tokens at ka, kb (token slices, dense) -> 2 mma k-steps into acc;
 * returns the tokens' d|m words */
template <int KT>
static __device__ __forceinline__ void k_block(int (&acc)[4], uint32_t & dma, uint32_t & dmb,
                                               const uint32_t * ka, const uint32_t * kb, const int b, const int c,
                                               const int o1, const int (&qf)[2][2]) {
    if constexpr (KT == 4) {
        constexpr uint32_t M = 0x0F0F0F0Fu;
        const int o2 = b == 0 ? 0 : 8;
        const uint2 pa1 = *reinterpret_cast<const uint2 *>(ka + o1);
        const uint2 pa2 = *reinterpret_cast<const uint2 *>(ka + o2);
        const uint2 pb1 = *reinterpret_cast<const uint2 *>(kb + o1);
        const uint2 pb2 = *reinterpret_cast<const uint2 *>(kb + o2);
        const bool c3 = b == 0 && c == 3;
        const uint32_t wa0 = pa1.x, wb0 = pb1.x;
        const uint32_t wa1 = c3 ? pa2.y : pa1.y, wb1 = c3 ? pb2.y : pb1.y;
        dma = b == 0 ? pa2.x : pa2.y;
        dmb = b == 0 ? pb2.x : pb2.y;
        mma_u8s8(acc, wa0 & M, wb0 & M, wa1 & M, wb1 & M, qf[0][0], qf[0][1]);
        mma_u8s8(acc, (wa0 >> 4) & M, (wb0 >> 4) & M, (wa1 >> 4) & M, (wb1 >> 4) & M, qf[1][0], qf[1][1]);
    } else if constexpr (KT == 2) {
        constexpr uint32_t M = 0x03030303u;
        dma = ka[5 * b];
        dmb = kb[5 * b];
        const uint32_t wa = ka[5 * b + 1 + c], wb = kb[5 * b + 1 + c];
        mma_u8s8(acc, wa & M, wb & M, (wa >> 2) & M, (wb >> 2) & M, qf[0][0], qf[0][1]);
        mma_u8s8(acc, (wa >> 4) & M, (wb >> 4) & M, (wa >> 6) & M, (wb >> 6) & M, qf[1][0], qf[1][1]);
    } else {
        /* kv3: field s of ql word c plus the third bit: bit (c>>1) + 2s of each byte of qh word c&1 */
        constexpr uint32_t M = 0x03030303u, H = 0x04040404u;
        dma = ka[7 * b];
        dmb = kb[7 * b];
        const uint32_t la = ka[7 * b + 1 + c], lb = kb[7 * b + 1 + c];
        const uint32_t ha = ka[7 * b + 5 + (c & 1)], hb = kb[7 * b + 5 + (c & 1)];
        const int sh0 = c >> 1;
        uint32_t ca[4], cb[4];
#pragma unroll
        for (int s = 0; s < 4; s++) {
            const uint32_t xa = s == 0 ? (ha << (2 - sh0)) : (ha >> (2 * s + sh0 - 2));
            const uint32_t xb = s == 0 ? (hb << (2 - sh0)) : (hb >> (2 * s + sh0 - 2));
            ca[s] = ((la >> (2 * s)) & M) | (xa & H);
            cb[s] = ((lb >> (2 * s)) & M) | (xb & H);
        }
        mma_u8s8(acc, ca[0], cb[0], ca[1], cb[1], qf[0][0], qf[0][1]);
        mma_u8s8(acc, ca[2], cb[2], ca[3], cb[3], qf[1][0], qf[1][1]);
    }
}

/* byte_perm selector: byte i of x -> byte 0, byte i of y -> byte 2 (bytes 1, 3: copies) */
template <int I> __device__ __forceinline__ constexpr uint32_t sel2() {
    return (uint32_t) (I | (I << 4) | ((4 + I) << 8) | ((4 + I) << 12));
}

/* V block b of the 4 tokens w[0..3] (k-order 2c, 2c+1, 2c+8, 2c+9) into the 4 m-tiles acc[i],
 * B fragment (b0, b1) = f16 P d_v of those tokens */
template <int VT>
static __device__ __forceinline__ void v_block(float (&acc)[4][4], const uint32_t (&w)[4], const uint32_t (&wh)[4],
                                               const uint32_t mlo, const uint32_t mhi, const uint32_t b0, const uint32_t b1,
                                               const uint32_t K /* 0x64006400 in a register: (t & mask) | K is one LOP3 */) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
        uint32_t sel;
        switch (i) { case 0: sel = sel2<0>(); break; case 1: sel = sel2<1>(); break; case 2: sel = sel2<2>(); break; default: sel = sel2<3>(); }
        const uint32_t t01 = __byte_perm(w[0], w[1], sel);
        const uint32_t t23 = __byte_perm(w[2], w[3], sel);
        uint32_t a0, a1, a2, a3;
        if constexpr (VT == 3) {
            const uint32_t u01 = __byte_perm(wh[0], wh[1], sel);
            const uint32_t u23 = __byte_perm(wh[2], wh[3], sel);
            a0 = ((t01 & 0x00030003u) | K) | (u01 & 0x00040004u);
            a1 = ((t01 & 0x00300030u) | K) | (u01 & 0x00400040u);
            a2 = ((t23 & 0x00030003u) | K) | (u23 & 0x00040004u);
            a3 = ((t23 & 0x00300030u) | K) | (u23 & 0x00400040u);
        } else {
            a0 = (t01 & mlo) | K;
            a1 = (t01 & mhi) | K;
            a2 = (t23 & mlo) | K;
            a3 = (t23 & mhi) | K;
        }
        mma_f16_16816(acc[i], a0, a1, a2, a3, b0, b1);
    }
}

template <int KT, int VT, int NS>
__global__ void __launch_bounds__(NT, NS == 2 ? 4 : 3) k_fattn_decode3(const fa_kparams p) {
    using LY = layout<KT, VT, NS>;
    constexpr int SK = LY::SK, SV = LY::SV, NPK = np<KT>(), NPV = np<VT>();
    constexpr int WBV = kv_words_per_block<VT>();

    extern __shared__ __align__(16) uint32_t sm[];
    int8_t * qi  = reinterpret_cast<int8_t *>(sm + LY::big_words);        /* [R][QS] int8 Q */
    float  * qdd = reinterpret_cast<float *>(sm + LY::big_words + LY::q_words);   /* [R][NB] d_q */
    float  * qss = qdd + R * NB;                                          /* [R][NB] d_q * sum(q) */

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, c = lane & 3;
    const int tau = 4 * (g >> 1) + (g & 1);
    const int kvh = blockIdx.x % p.n_head_kv, row0 = (blockIdx.x / p.n_head_kv) * R;
    const int chunk = blockIdx.y, seq = blockIdx.z;
    const int t_begin = chunk * p.chunk_len;
    const int t_end   = min(p.n_kv, t_begin + p.chunk_len);
    const int ntiles  = t_end > t_begin ? (t_end - t_begin + TT - 1) / TT : 0;
    const int my_n    = ntiles > warp ? (ntiles - warp + NW - 1) / NW : 0;

    const char * kbase = p.k + seq * p.nbk3 + kvh * p.nbk2 + (size_t) t_begin * p.nbk1;
    const char * vbase = p.v + seq * p.nbv3 + kvh * p.nbv2 + (size_t) t_begin * p.nbv1;
    const size_t kstep = (size_t) (NW * TT) * p.nbk1, vstep = (size_t) (NW * TT) * p.nbv1;

    /* copy plan: piece q = lane + 32 k of a tile is 8-byte piece q % NP of token q / NP */
    uint32_t gk[NPK], gv[NPV];
#pragma unroll
    for (int k = 0; k < NPK; k++) {
        const int q = lane + 32 * k;
        gk[k] = (uint32_t) (q / NPK) * (uint32_t) p.nbk1 + 8u * (uint32_t) (q % NPK);
    }
#pragma unroll
    for (int k = 0; k < NPV; k++) {
        const int q = lane + 32 * k;
        gv[k] = (uint32_t) (q / NPV) * (uint32_t) p.nbv1 + 8u * (uint32_t) (q % NPV);
    }
    uint32_t * wsm = sm + warp * LY::warp_words;
    const uint32_t wsm_s = (uint32_t) __cvta_generic_to_shared(wsm) + 8u * (uint32_t) lane;

    pdl_wait();        /* Q and the cache rows come from the kernels just before */
    pdl_trigger();

    /* tiles of this warp are issued in order: running source pointers, stage and valid-token count */
    const char * kt = kbase + (size_t) (warp * TT) * p.nbk1;
    const char * vt = vbase + (size_t) (warp * TT) * p.nbv1;
    int nv_iss = t_end - t_begin - warp * TT;
    uint32_t s_iss = wsm_s;
    const uint32_t s_last = wsm_s + (uint32_t) ((NS - 1) * LY::stage_words * 4);
    auto issue = [&]() {
        const uint32_t sk = s_iss, sv = sk + TT * SK * 4;
        if (nv_iss >= TT) {
#pragma unroll
            for (int k = 0; k < NPK; k++) cp8(sk + 256 * k, kt + gk[k], 8);
#pragma unroll
            for (int k = 0; k < NPV; k++) cp8(sv + 256 * k, vt + gv[k], 8);
        } else {
#pragma unroll
            for (int k = 0; k < NPK; k++) {
                const bool ok = (lane + 32 * k) / NPK < nv_iss;
                cp8(sk + 256 * k, ok ? kt + gk[k] : kt, ok ? 8 : 0);
            }
#pragma unroll
            for (int k = 0; k < NPV; k++) {
                const bool ok = (lane + 32 * k) / NPV < nv_iss;
                cp8(sv + 256 * k, ok ? vt + gv[k] : vt, ok ? 8 : 0);
            }
        }
        kt += kstep;
        vt += vstep;
        nv_iss -= NW * TT;
        s_iss = s_iss == s_last ? wsm_s : s_iss + (uint32_t) (LY::stage_words * 4);
    };

#pragma unroll
    for (int s = 0; s < NS - 1; s++) {
        if (s < my_n) issue();
        cp_async_commit();
    }

    /* ---- Q: R rows, int8 per 64 values, d_q and d_q * sum(q) */
    for (int pr = warp; pr < R * NB; pr += NW) {
        const int r = pr / NB, b = pr % NB;
        const int row = row0 + r;
        float x0 = 0.0f, x1 = 0.0f;
        if (row < p.rows) {
            const int head = kvh * p.gqa + row % p.gqa;
            const float * qrow = (const float *) (p.q + seq * p.nbq3 + head * p.nbq2 + (row / p.gqa) * p.nbq1) + 64 * b;
            x0 = qrow[lane];
            x1 = qrow[lane + 32];
        }
        const float amax = warp_max(fmaxf(fabsf(x0), fabsf(x1)));
        const float d  = amax / 127.0f;
        const float id = d > 0.0f ? 1.0f / d : 0.0f;
        const int q0 = __float2int_rn(x0 * id), q1 = __float2int_rn(x1 * id);
        const int sq = __reduce_add_sync(FULL, q0 + q1);
        qi[r * QS + 64 * b + lane]      = (int8_t) q0;
        qi[r * QS + 64 * b + lane + 32] = (int8_t) q1;
        if (lane == 0) {
            qdd[r * NB + b] = d;
            qss[r * NB + b] = d * (float) sq;
        }
    }
    __syncthreads();

    /* B fragments of Q (row g) and the scale terms of my score rows 2c, 2c+1 */
    int qf[NB][2][2];
#pragma unroll
    for (int b = 0; b < NB; b++) {
#pragma unroll
        for (int ks = 0; ks < 2; ks++) {
#pragma unroll
            for (int h = 0; h < 2; h++) qf[b][ks][h] = *reinterpret_cast<const int *>(qi + g * QS + qdim<KT>(b, ks, h, c));
        }
    }
    const float qscale = p.softcap != 0.0f ? p.scale : p.scale * LOG2E;
    float dq[2][NB], dqm[2][NB], qsv[2][NB];
#pragma unroll
    for (int rr = 0; rr < 2; rr++) {
#pragma unroll
        for (int b = 0; b < NB; b++) {
            dq[rr][b]  = qdd[(2 * c + rr) * NB + b] * qscale;
            qsv[rr][b] = qss[(2 * c + rr) * NB + b] * qscale;
            dqm[rr][b] = dq[rr][b] * MAGIC_F;
        }
    }
    const float softcap2 = p.softcap * LOG2E;

    /* mask rows and ALiBi slopes (log2 units) of rows 2c, 2c+1 */
    const half * mrow[2] = {nullptr, nullptr};
    float slope[2];
#pragma unroll
    for (int rr = 0; rr < 2; rr++) {
        const int row  = min(row0 + 2 * c + rr, p.rows - 1);
        const int head = kvh * p.gqa + row % p.gqa;
        if (p.mask) {
            mrow[rr] = (const half *) (p.mask + (size_t) (seq % p.mask_ne3) * p.nbm3 + (size_t) (row / p.gqa) * p.nbm1);
        }
        float sl = 1.0f;
        if (p.max_bias > 0.0f) {
            sl = head < p.n_head_log2 ? powf(p.m0, (float) (head + 1)) : powf(p.m1, (float) (2 * (head - p.n_head_log2) + 1));
        }
        slope[rr] = sl * LOG2E;
    }

    /* per-lane constants of the K and V fragments */
    const int o1[2] = { c < 3 ? 2 + 2 * c : 8, 10 + 2 * c };          /* kv4 K: first pair of block 0 / 1 */
    int vw, vwh = 0;                                                 /* V: code word (and kv3 qh word) of block 0 */
    uint32_t mlo = 0x000F000Fu, mhi = 0x00F000F0u;
    float inv_lo = 1.0f, inv_hi = 1.0f / 16.0f;
    int sh_l = 0, sh_h = 0;                                          /* kv3: ql right shift; qh shift (<0: right) */
    if constexpr (VT == 4) {
        vw = 1 + g;
    } else if constexpr (VT == 2) {
        vw = 1 + (g & 3);
        const int h = g >> 2;
        mlo = 0x00030003u << (4 * h);
        mhi = 0x000C000Cu << (4 * h);
        inv_lo = h ? 1.0f / 16.0f : 1.0f;
        inv_hi = h ? 1.0f / 64.0f : 1.0f / 4.0f;
    } else {
        vw  = 1 + (g & 3);
        vwh = 5 + (g & 1);
        sh_l = 2 * (g >> 2);
        sh_h = 2 - (((g >> 1) & 1) + 2 * (g >> 2));
    }

    float M[2] = {-INFINITY, -INFINITY}, S[2] = {0.0f, 0.0f}, pm[2][NB], on[NB][4], acc[NB][4][4];
#pragma unroll
    for (int b = 0; b < NB; b++) {
        pm[0][b] = 0.0f; pm[1][b] = 0.0f;
#pragma unroll
        for (int e = 0; e < 4; e++) on[b][e] = 0.0f;
#pragma unroll
        for (int i = 0; i < 4; i++) {
#pragma unroll
            for (int e = 0; e < 4; e++) acc[b][i][e] = 0.0f;
        }
    }
    constexpr uint32_t ONE2 = 0x3C003C00u;

    const uint32_t f16k = p.f16k;
    const uint32_t * sK = wsm;                       /* stage of the tile being computed */
    int tb = t_begin + warp * TT;                    /* its first token */

    /* mask values (row 2c's column) of my 4 score tokens of a tile, loaded one tile ahead */
    const half * mrow0 = mrow[0];
    auto load_mask = [&](const int t0, float (&mv)[4]) {
#pragma unroll
        for (int q = 0; q < 4; q++) {
            const int tok = t0 + 16 * (q >> 1) + tau + 2 * (q & 1);
            mv[q] = mrow0 != nullptr && tok < t_end ? __half2float(mrow0[tok]) : 0.0f;
        }
    };
    float mcur[4];
    load_mask(tb, mcur);

    for (int j = 0; j < my_n; j++) {
        if (j + NS - 1 < my_n) issue();
        cp_async_commit();
        float mnxt[4];
        load_mask(tb + NW * TT, mnxt);
        cp_async_wait<NS - 1>();
        __syncwarp();

        const uint32_t * sV = sK + TT * SK;

        /* ---- scores: s[mt][e], e = (tok A, row 2c), (A, 2c+1), (B, 2c), (B, 2c+1); A = 16 mt + tau, B = A + 2 */
        float s[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; mt++) {
            const uint32_t * ka = sK + (16 * mt + tau) * SK;
            const uint32_t * kb = ka + 2 * SK;
            float x0 = 0.0f, x1 = 0.0f, x2 = 0.0f, x3 = 0.0f;
#pragma unroll
            for (int b = 0; b < NB; b++) {
                int C[4] = {MAGIC, MAGIC, MAGIC, MAGIC};
                uint32_t dma, dmb;
                k_block<KT>(C, dma, dmb, ka, kb, b, c, o1[b], qf[b]);
                const float2 fa = h2f2(dma), fb = h2f2(dmb);
                x0 = fmaf(fa.x, fmaf(dq[0][b], __int_as_float(C[0]), -dqm[0][b]), fmaf(fa.y, qsv[0][b], x0));
                x1 = fmaf(fa.x, fmaf(dq[1][b], __int_as_float(C[1]), -dqm[1][b]), fmaf(fa.y, qsv[1][b], x1));
                x2 = fmaf(fb.x, fmaf(dq[0][b], __int_as_float(C[2]), -dqm[0][b]), fmaf(fb.y, qsv[0][b], x2));
                x3 = fmaf(fb.x, fmaf(dq[1][b], __int_as_float(C[3]), -dqm[1][b]), fmaf(fb.y, qsv[1][b], x3));
            }
            s[mt][0] = x0; s[mt][1] = x1; s[mt][2] = x2; s[mt][3] = x3;
        }

        /* ---- softcap, mask, validity */
#pragma unroll
        for (int mt = 0; mt < 2; mt++) {
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int tok = tb + 16 * mt + tau + 2 * h;
                const bool valid = tok < t_end;
#pragma unroll
                for (int rr = 0; rr < 2; rr++) {
                    float x = s[mt][2 * h + rr];
                    if (p.softcap != 0.0f) x = softcap2 * tanhf(x);
                    if (mrow0 != nullptr) {
                        float mv = mcur[2 * mt + h];
                        if (rr == 1 && !p.same_col && valid) mv = __half2float(mrow[1][tok]);
                        x = fmaf(slope[rr], mv, x);
                    }
                    s[mt][2 * h + rr] = valid ? x : -INFINITY;
                }
            }
        }

        /* ---- online softmax, rows 2c, 2c+1 (the same for the 8 lanes of a column c) */
        float tm0 = fmaxf(fmaxf(s[0][0], s[0][2]), fmaxf(s[1][0], s[1][2]));
        float tm1 = fmaxf(fmaxf(s[0][1], s[0][3]), fmaxf(s[1][1], s[1][3]));
#pragma unroll
        for (int o = 4; o < 32; o <<= 1) {
            tm0 = fmaxf(tm0, __shfl_xor_sync(FULL, tm0, o));
            tm1 = fmaxf(tm1, __shfl_xor_sync(FULL, tm1, o));
        }
        if (__any_sync(FULL, tm0 > M[0] || tm1 > M[1])) {
            const float al0 = tm0 > M[0] ? exp2f(M[0] - tm0) : 1.0f;
            const float al1 = tm1 > M[1] ? exp2f(M[1] - tm1) : 1.0f;
            M[0] = fmaxf(M[0], tm0);
            M[1] = fmaxf(M[1], tm1);
            S[0] *= al0; S[1] *= al1;
#pragma unroll
            for (int b = 0; b < NB; b++) {
                pm[0][b] *= al0; pm[1][b] *= al1;
                on[b][0] *= al0; on[b][1] *= al1; on[b][2] *= al0; on[b][3] *= al1;
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    acc[b][i][0] *= al0; acc[b][i][1] *= al1;
                    acc[b][i][2] *= al0; acc[b][i][3] *= al1;
                }
            }
        }
        const float mr0 = M[0] == -INFINITY ? 0.0f : M[0];
        const float mr1 = M[1] == -INFINITY ? 0.0f : M[1];
#pragma unroll
        for (int mt = 0; mt < 2; mt++) {
            s[mt][0] = exp2f(s[mt][0] - mr0);
            s[mt][1] = exp2f(s[mt][1] - mr1);
            s[mt][2] = exp2f(s[mt][2] - mr0);
            s[mt][3] = exp2f(s[mt][3] - mr1);
            S[0] += s[mt][0] + s[mt][2];
            S[1] += s[mt][1] + s[mt][3];
        }

        /* ---- V: per 16-token step kk and block b */
#pragma unroll
        for (int kk = 0; kk < 2; kk++) {
            const uint32_t * vA = sV + (16 * kk + tau) * SV;          /* P d_v layout: tokens A, B = A + 2 */
            const uint32_t * vc = sV + (16 * kk + 4 * c) * SV;        /* A fragment: tokens 4c .. 4c+3 */
#pragma unroll
            for (int b = 0; b < NB; b++) {
                const float2 fa = h2f2(vA[b * WBV]), fb = h2f2(vA[2 * SV + b * WBV]);
                const uint32_t x0 = f2h2(s[kk][0] * fa.x, s[kk][1] * fa.x);
                const uint32_t x1 = f2h2(s[kk][2] * fb.x, s[kk][3] * fb.x);
                pm[0][b] = fmaf(s[kk][0], fa.y, fmaf(s[kk][2], fb.y, pm[0][b]));
                pm[1][b] = fmaf(s[kk][1], fa.y, fmaf(s[kk][3], fb.y, pm[1][b]));
                const uint32_t b0 = movtrans(x0), b1 = movtrans(x1);
                mma_f16_16816(on[b], ONE2, ONE2, ONE2, ONE2, b0, b1);
                uint32_t w[4], wh[4];
#pragma unroll
                for (int q = 0; q < 4; q++) {
                    w[q] = vc[q * SV + b * WBV + vw];
                    if constexpr (VT == 3) {
                        const uint32_t h = vc[q * SV + b * WBV + vwh];
                        w[q] >>= sh_l;
                        wh[q] = sh_h >= 0 ? (h << sh_h) : (h >> 1);
                    } else {
                        wh[q] = 0u;
                    }
                }
                v_block<VT>(acc[b], w, wh, mlo, mhi, b0, b1, f16k);
            }
        }
        __syncwarp();
        sK = sK == wsm + (NS - 1) * LY::stage_words ? wsm : sK + LY::stage_words;
        tb += NW * TT;
#pragma unroll
        for (int q = 0; q < 4; q++) mcur[q] = mnxt[q];
    }
    cp_async_wait<0>();

    /* ---- merge: S and P m_v over the 8 lanes of a column, then the warps */
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) {
        S[0] += __shfl_xor_sync(FULL, S[0], o);
        S[1] += __shfl_xor_sync(FULL, S[1], o);
#pragma unroll
        for (int b = 0; b < NB; b++) {
            pm[0][b] += __shfl_xor_sync(FULL, pm[0][b], o);
            pm[1][b] += __shfl_xor_sync(FULL, pm[1][b], o);
        }
    }
    __syncthreads();                     /* every warp is done with its stages */
    float * mo = reinterpret_cast<float *>(sm);      /* [NW][R][D] */
    float * mM = mo + NW * R * D;                    /* [NW][R] */
    float * mS = mM + NW * R;                        /* [NW][R] */
    const int r0 = 2 * c, r1 = 2 * c + 1;
#pragma unroll
    for (int b = 0; b < NB; b++) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int dlo, dhi;
            if constexpr (VT == 4) {
                dlo = 64 * b + 4 * g + i;  dhi = dlo + 32;
            } else if constexpr (VT == 2) {
                dlo = 64 * b + 4 * (g & 3) + i + 32 * (g >> 2);  dhi = dlo + 16;
            } else {
                dlo = 64 * b + 4 * (g & 3) + i + 16 * (g >> 2);  dhi = dlo + 32;
            }
            float * w0 = mo + (warp * R + r0) * D;
            float * w1 = mo + (warp * R + r1) * D;
            w0[dlo] = fmaf(acc[b][i][0] - 1024.0f * on[b][0], inv_lo, pm[0][b]);
            w1[dlo] = fmaf(acc[b][i][1] - 1024.0f * on[b][1], inv_lo, pm[1][b]);
            w0[dhi] = fmaf(acc[b][i][2] - 1024.0f * on[b][0], inv_hi, pm[0][b]);
            w1[dhi] = fmaf(acc[b][i][3] - 1024.0f * on[b][1], inv_hi, pm[1][b]);
        }
    }
    if (g == 0) {
        mM[warp * R + r0] = M[0]; mM[warp * R + r1] = M[1];
        mS[warp * R + r0] = S[0]; mS[warp * R + r1] = S[1];
    }
    __syncthreads();
    float * wts = mS + NW * R;                       /* [NW][R] weight of each warp's partial, then [R] max, [R] sum */
    if (tid < R) {
        float mx = -INFINITY;
#pragma unroll
        for (int w = 0; w < NW; w++) mx = fmaxf(mx, mM[w * R + tid]);
        float st = 0.0f;
#pragma unroll
        for (int w = 0; w < NW; w++) {
            const float mw = mM[w * R + tid];
            const float wt = mw == -INFINITY ? 0.0f : exp2f(mw - mx);
            wts[w * R + tid] = wt;
            st = fmaf(wt, mS[w * R + tid], st);
        }
        wts[NW * R + tid]     = mx == -INFINITY ? -INFINITY : mx * LN2;   /* natural log units */
        wts[NW * R + R + tid] = st;
    }
    __syncthreads();

    for (int e = tid; e < R * D; e += NT) {
        const int r = e / D, jd = e % D;
        const int row = row0 + r;
        if (row >= p.rows) continue;
        float o = 0.0f;
#pragma unroll
        for (int w = 0; w < NW; w++) o = fmaf(wts[w * R + r], mo[(w * R + r) * D + jd], o);
        const float mn = wts[NW * R + r];
        float st = wts[NW * R + R + r];
        if (p.direct) {
            const int head = kvh * p.gqa + row % p.gqa, iq1 = row / p.gqa;
            if (p.sinks) {
                const float sk = p.sinks[head];
                const float mz = fmaxf(mn, sk);
                const float f  = mn == -INFINITY ? 0.0f : __expf(mn - mz);
                o *= f;
                st = fmaf(st, f, __expf(sk - mz));
            }
            p.dst[((size_t) (seq * p.n_q + iq1) * p.n_head + head) * D + jd] = st > 0.0f ? o / st : 0.0f;
        } else {
            const size_t pidx = ((size_t) (seq * p.n_head_kv + kvh) * p.rows + row) * p.n_chunks + chunk;
            p.part[pidx * D + jd] = o;
            if (jd == 0) p.meta[pidx] = make_float2(mn, st);
        }
    }
}

template <int KT, int VT, int NS>
static bool set_smem_attr() {
    static bool done[PKV_MAX_DEVICES] = {};   /* per instance and device */
    return raise_smem_limit(k_fattn_decode3<KT, VT, NS>, (int) layout<KT, VT, NS>::bytes, done) == cudaSuccess;
}

template <int KT, int VT, int NS>
int occupancy() {
    static int occ[PKV_MAX_DEVICES] = {};   /* per device: hosts may mix GPU kinds */
    const int dev = current_device();
    if (dev >= 0 && occ[dev] > 0) return occ[dev];
    int n = 0;
    if (!set_smem_attr<KT, VT, NS>() ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, k_fattn_decode3<KT, VT, NS>, NT, layout<KT, VT, NS>::bytes) != cudaSuccess) {
        (void) cudaGetLastError();
        return 2;
    }
    n = n > 0 ? n : 1;
    if (dev >= 0) occ[dev] = n;
    return n;
}

template <int KT, int VT, int NS>
int launch(const fa_kparams & kp, const int n_rowgroups, const int n_seq, cudaStream_t stream) {
    if (!set_smem_attr<KT, VT, NS>()) return (int) cudaGetLastError();
    const dim3 grid((unsigned) (kp.n_head_kv * n_rowgroups), (unsigned) kp.n_chunks, (unsigned) n_seq);
    return (int) pdl_launch(k_fattn_decode3<KT, VT, NS>, grid, dim3(NT), layout<KT, VT, NS>::bytes, stream, kp);
}

/* ns: 3 or 2 stages (pkv_fattn.cu picks, PKV_CUDA_FA_NS) */
template <int KT>
int launch_v(const fa_kparams & kp, int v_type, int ns, int n_rowgroups, int n_seq, cudaStream_t stream) {
    switch (v_type * 4 + (ns == 2 ? 2 : 3)) {
        case 4 * 4 + 3: return launch<KT, 4, 3>(kp, n_rowgroups, n_seq, stream);
        case 3 * 4 + 3: return launch<KT, 3, 3>(kp, n_rowgroups, n_seq, stream);
        case 2 * 4 + 3: return launch<KT, 2, 3>(kp, n_rowgroups, n_seq, stream);
        case 4 * 4 + 2: return launch<KT, 4, 2>(kp, n_rowgroups, n_seq, stream);
        case 3 * 4 + 2: return launch<KT, 3, 2>(kp, n_rowgroups, n_seq, stream);
        case 2 * 4 + 2: return launch<KT, 2, 2>(kp, n_rowgroups, n_seq, stream);
        default: return -1;
    }
}

template <int KT>
int occupancy_v(int v_type, int ns) {
    switch (v_type * 4 + (ns == 2 ? 2 : 3)) {
        case 4 * 4 + 3: return occupancy<KT, 4, 3>();
        case 3 * 4 + 3: return occupancy<KT, 3, 3>();
        case 2 * 4 + 3: return occupancy<KT, 2, 3>();
        case 4 * 4 + 2: return occupancy<KT, 4, 2>();
        case 3 * 4 + 2: return occupancy<KT, 3, 2>();
        case 2 * 4 + 2: return occupancy<KT, 2, 2>();
        default: return 1;
    }
}

} // namespace fa3

/* defined in pkv_fattn_k{4,3,2}.cu */
int fattn3_launch_k4(const fa_kparams & kp, int v_type, int ns, int n_rowgroups, int n_seq, cudaStream_t stream);
int fattn3_launch_k3(const fa_kparams & kp, int v_type, int ns, int n_rowgroups, int n_seq, cudaStream_t stream);
int fattn3_launch_k2(const fa_kparams & kp, int v_type, int ns, int n_rowgroups, int n_seq, cudaStream_t stream);
int fattn3_occupancy_k4(int v_type, int ns);
int fattn3_occupancy_k3(int v_type, int ns);
int fattn3_occupancy_k2(int v_type, int ns);

} // namespace pkv
