/*
 * pyllm-kv flash-attention decode kernel, tensor-core V (template; instantiated
 * per K type in pkv_fattn_k*.cu next to the scalar kernel of pkv_fattn.cuh,
 * chosen by pkv_fattn.cu). V must be kv4 or kv2; K any of kv4/kv3/kv2/f16.
 *
 * Same work split and chunk results as k_fattn_decode (one CTA of FT = 128
 * threads per KV head, chunk of the KV length and group of R query rows; per
 * chunk (M, S, acc) to the workspace, merged by the combine kernel). What
 * differs, and why (the scalar kernel spent most of its issue slots in the V
 * loop, R * D fp32 FMAs plus a code->float conversion per value and token, and
 * in 4-byte cp.async with per-piece index math):
 *   - copies: 8-byte cp.async pieces (head slices are 8-byte aligned when a
 *     slice has an even number of words, i.e. D = 128), offsets computed once
 *     per thread and reused for every tile; smem token stride S with S/2 odd so
 *     that 8-byte per-token reads are bank-conflict free;
 *   - K: thread = token as before (dp4a against int8 Q), the slice read into
 *     registers with 8-byte loads;
 *   - V: O^T[dim, row] += Vcode^T[dim, tok] * (P d_v)^T[tok, row] with
 *     mma.m16n8k16 (f16 in, f32 accumulate): A = the codes as f16 (1024 + c,
 *     built with one shift + one lop3 per two codes: 0x6400 | c is the f16 of
 *     1024 + c), B = P * d_v rounded to f16, n = 8 query rows (R = 4 uses half);
 *     the +1024 is removed exactly through the per-token term that also carries
 *     the block minimum: sum_t P m_v - 1024 * f16(P d_v).
 *   Token order inside an m16n8k16 step is free (k is summed over), so thread
 *   (g = lane / 4, c = lane % 4) takes the four consecutive tokens 4c..4c+3 of
 *   the step and word g of each V block: conflict-free with S = 18 (kv4) / 10.
 *
 * Measured (H100 SXM, Llama-8B shape, depth 32768, ncu, bench/device/perf_run.sh
 * at 5bfdd88): 30.7 us per layer for 37.7 MB = 1.23 TB/s (40% of DRAM peak; the
 * f16 vec kernel reaches 2.09 TB/s), only ~10% faster than the scalar kernel.
 * Not bandwidth-bound: 4 CTAs x 4 warps per SM (128 registers, 41.5 KB smem),
 * 0.42 issued warp-instructions per scheduler-cycle with 57% of cycles having no
 * eligible warp, ~5.1k warp-instructions per 128-token tile, 3 CTA barriers per
 * tile. The warp-tiled kernel of pkv_fattn_v3.cuh (int8 mma for K.Q, per-warp
 * tiles) now takes K and V of ours at head size 128; this kernel still serves
 * K = f16 and head size 64 with V of kv4/kv2.
 */
#pragma once

#include "pkv_fattn.cuh"

namespace pkv {

/* copy geometry of one K or V slice (one token, one head) */
template <int T, int D>
struct kv_geom {
    static constexpr int SW = slice_words<T, D>();
    static constexpr int PB = (SW % 2 == 0) ? 8 : 4;                 /* cp.async piece bytes */
    static constexpr int PW = PB / 4;                                /* words per piece */
    static constexpr int S  = PB == 8 ? (((SW / 2) % 2 == 1) ? SW : SW + 2) : (SW | 1);
    static constexpr int NP = SW / PW;                               /* pieces per token = per thread per tile */
    static constexpr bool DENSE = S == SW;
};

template <int KT, int VT, int D, int R>
struct fm_layout {
    using GK = kv_geom<KT, D>;
    using GV = kv_geom<VT, D>;
    static constexpr int NBK = scale_blocks<KT, D>();
    static constexpr int NBV = D / 64;
    static constexpr int NW  = FT / 32;
    static constexpr int PDS = FT + 16;                 /* halves per (block, row) of P*d_v: 72 words = 8 mod 32 */
    static constexpr int tiles_words = 2 * FT * (GK::S + GV::S);
    static constexpr int racc_words  = NW * R * D;
    static constexpr int big_words   = tiles_words > racc_words ? tiles_words : racc_words;
    static constexpr int pd_words    = NBV * R * PDS / 2;
    static constexpr int q_words     = R * D;
    static constexpr int red_words   = NW * R * (NBV + 1);
    static constexpr int words = big_words + pd_words + q_words + 2 * R * NBK + red_words;
    static constexpr size_t bytes = 4 * (size_t) words;
};

template <int PB>
static __device__ __forceinline__ void cp_async_n(const uint32_t s, const void * gmem, const int src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" :: "r"(s), "l"(gmem), "n"(PB), "r"(src_bytes) : "memory");
}

/* one tile of one slice type: piece k of this thread goes from gsrc + go[k] to
 * shared address sdst + PB * (tid + k * FT) (slices stored densely, S == SW) or
 * sdst + so[k] (padded f16 slices); past-the-end tokens (partial last tile) are
 * zero-filled */
template <int NP, int PB, bool DENSE>
static __device__ __forceinline__ void issue_tile(const uint32_t sdst, const char * gsrc, const uint32_t (&go)[NP],
                                                  const uint32_t (&so)[NP], const int nvalid, const int tid) {
    const bool full = nvalid >= FT;
#pragma unroll
    for (int k = 0; k < NP; k++) {
        const uint32_t sa = sdst + (DENSE ? (uint32_t) (PB * (tid + k * FT)) : so[k]);
        if (full) {
            cp_async_n<PB>(sa, gsrc + go[k], PB);
        } else {
            const bool ok = (tid + k * FT) / NP < nvalid;
            cp_async_n<PB>(sa, ok ? gsrc + go[k] : gsrc, ok ? PB : 0);
        }
    }
}

static __device__ __forceinline__ void mma_f16_16816(float (&c)[4], const uint32_t a0, const uint32_t a1,
                                                     const uint32_t a2, const uint32_t a3,
                                                     const uint32_t b0, const uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* head dims of the rows g (lo) and g + 8 (hi) of V m-tile (b, i) */
template <int VT>
static __device__ __forceinline__ int vdim_lo(const int b, const int i, const int g) {
    return VT == 4 ? 64 * b + 4 * g + i : 64 * b + 4 * (g & 3) + i + 32 * (g >> 2);
}
template <int VT> __device__ __forceinline__ constexpr int vdim_hi_off() { return VT == 4 ? 32 : 16; }

/* f16x2 (1024 + c_lo_token, 1024 + c_hi_token) of the code field at bit `sh` of both halves */
template <int VT>
static __device__ __forceinline__ uint32_t codes_h2(const uint32_t x, const int sh) {
    constexpr uint32_t m = VT == 4 ? 0x000F000Fu : 0x00030003u;
    return ((x >> sh) & m) | 0x64006400u;
}

template <int KT, int VT, int D, int R>
__global__ void __launch_bounds__(FT, R == 4 ? 4 : 3) k_fattn_decode_mma(const fa_kparams p) {
    static_assert(VT == 4 || VT == 2, "tensor-core V path: kv4 / kv2");
    using LY = fm_layout<KT, VT, D, R>;
    using GK = typename LY::GK;
    using GV = typename LY::GV;
    constexpr int NBK = LY::NBK, NBV = LY::NBV, SK = GK::S, SV = GV::S, NW = LY::NW, PDS = LY::PDS;
    constexpr int WBV = kv_words_per_block<VT>();

    extern __shared__ __align__(16) uint32_t sm[];
    uint32_t * kb  = sm;                                       /* [2][FT][SK] */
    uint32_t * vb  = kb + 2 * FT * SK;                         /* [2][FT][SV] */
    half     * pdh = (half *) (sm + LY::big_words);            /* [NBV][R][PDS]  f16(P * d_v) */
    float    * qf  = (float *) (sm + LY::big_words + LY::pd_words);   /* [R][D] floats (f16 K) or int8 */
    float    * qdq = qf + LY::q_words;                         /* [R][NBK] d_q */
    float    * qsq = qdq + R * NBK;                            /* [R][NBK] d_q * sum(q) */
    float    * red = qsq + R * NBK;                            /* [NW][R][NBV+1] */

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, c = lane & 3;                     /* mma fragment coordinates */
    const int kvh = blockIdx.x % p.n_head_kv, row0 = (blockIdx.x / p.n_head_kv) * R;
    const int chunk = blockIdx.y, seq = blockIdx.z;
    const int t_begin = chunk * p.chunk_len;
    const int t_end   = min(p.n_kv, t_begin + p.chunk_len);

    const char * kbase = p.k + seq * p.nbk3 + kvh * p.nbk2;
    const char * vbase = p.v + seq * p.nbv3 + kvh * p.nbv2;
    const int ntiles = t_end > t_begin ? (t_end - t_begin + FT - 1) / FT : 0;

    /* per-thread copy plan, the same for every tile */
    uint32_t kgo[GK::NP], kso[GK::NP], vgo[GV::NP], vso[GV::NP];
#pragma unroll
    for (int k = 0; k < GK::NP; k++) {
        const int i = tid + k * FT, t = i / GK::NP, pc = i - t * GK::NP;
        kgo[k] = (uint32_t) t * (uint32_t) p.nbk1 + pc * GK::PB;
        kso[k] = GK::DENSE ? 0u : 4 * (t * SK + pc * GK::PW);
    }
#pragma unroll
    for (int k = 0; k < GV::NP; k++) {
        const int i = tid + k * FT, t = i / GV::NP, pc = i - t * GV::NP;
        vgo[k] = (uint32_t) t * (uint32_t) p.nbv1 + pc * GV::PB;
        vso[k] = GV::DENSE ? 0u : 4 * (t * SV + pc * GV::PW);
    }
    const uint32_t kb_s = (uint32_t) __cvta_generic_to_shared(kb);
    const uint32_t vb_s = (uint32_t) __cvta_generic_to_shared(vb);

    pdl_wait();        /* Q and the cache rows come from the kernels just before */
    pdl_trigger();

    if (ntiles > 0) {
        issue_tile<GK::NP, GK::PB, GK::DENSE>(kb_s, kbase + (size_t) t_begin * p.nbk1, kgo, kso, t_end - t_begin, tid);
        issue_tile<GV::NP, GV::PB, GV::DENSE>(vb_s, vbase + (size_t) t_begin * p.nbv1, vgo, vso, t_end - t_begin, tid);
    }
    cp_async_commit();

    /* ---- Q prologue (as k_fattn_decode) */
    for (int pr = warp; pr < R * (D / 64); pr += NW) {
        const int r = pr / (D / 64), b = pr % (D / 64);
        const int row = row0 + r;
        float x0 = 0.0f, x1 = 0.0f;
        if (row < p.rows) {
            const int head = kvh * p.gqa + row % p.gqa;
            const float * qrow = (const float *) (p.q + seq * p.nbq3 + head * p.nbq2 + (row / p.gqa) * p.nbq1) + 64 * b;
            x0 = qrow[lane];
            x1 = qrow[lane + 32];
        }
        if constexpr (KT == PKV_CUDA_KV_F16) {
            qf[r * D + 64 * b + lane]      = x0;
            qf[r * D + 64 * b + lane + 32] = x1;
        } else {
            const float amax = warp_max(fmaxf(fabsf(x0), fabsf(x1)));
            const float d  = amax / 127.0f;
            const float id = d > 0.0f ? 1.0f / d : 0.0f;
            const int q0 = __float2int_rn(x0 * id), q1 = __float2int_rn(x1 * id);
            const float s = warp_sum((float) (q0 + q1));
            int8_t * qi = (int8_t *) qf;
            qi[r * D + 64 * b + lane]      = (int8_t) q0;
            qi[r * D + 64 * b + lane + 32] = (int8_t) q1;
            if (lane == 0) {
                qdq[r * NBK + b] = d;
                qsq[r * NBK + b] = d * s;
            }
        }
    }

    /* mask: rows of one query column share a mask row; offsets (in halves) per row, slopes (ALiBi) on the fly */
    const half * mbase = p.mask ? (const half *) (p.mask + (size_t) (seq % p.mask_ne3) * p.nbm3) : nullptr;
    int moff[R];
#pragma unroll
    for (int r = 0; r < R; r++) moff[r] = (int) ((size_t) (min(row0 + r, p.rows - 1) / p.gqa) * p.nbm1 / sizeof(half));

    float M[R], S[R], pm[R][NBV], acc[NBV][4][4];
#pragma unroll
    for (int r = 0; r < R; r++) {
        M[r] = -INFINITY; S[r] = 0.0f;
#pragma unroll
        for (int b = 0; b < NBV; b++) pm[r][b] = 0.0f;
    }
#pragma unroll
    for (int b = 0; b < NBV; b++) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
#pragma unroll
            for (int e = 0; e < 4; e++) acc[b][i][e] = 0.0f;
        }
    }

    for (int it = 0; it < ntiles; it++) {
        const int buf = it & 1;
        const int t0 = t_begin + it * FT;
        if (it + 1 < ntiles) {
            const int tn = t0 + FT;
            issue_tile<GK::NP, GK::PB, GK::DENSE>(kb_s + (buf ^ 1) * FT * SK * 4, kbase + (size_t) tn * p.nbk1, kgo, kso, t_end - tn, tid);
            issue_tile<GV::NP, GV::PB, GV::DENSE>(vb_s + (buf ^ 1) * FT * SV * 4, vbase + (size_t) tn * p.nbv1, vgo, vso, t_end - tn, tid);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();

        /* ---- K: thread = token */
        const int tok = t0 + tid;
        const uint32_t * kw = kb + buf * FT * SK + tid * SK;
        float s[R];
#pragma unroll
        for (int r = 0; r < R; r++) s[r] = 0.0f;
        if constexpr (KT == PKV_CUDA_KV_F16) {
#pragma unroll 4
            for (int j4 = 0; j4 < D / 4; j4++) {
                const uint2 u = *(const uint2 *) (kw + 2 * j4);
                const float2 f0 = __half22float2(*(const half2 *) &u.x);
                const float2 f1 = __half22float2(*(const half2 *) &u.y);
#pragma unroll
                for (int r = 0; r < R; r++) {
                    const float4 qv = *(const float4 *) (qf + r * D + 4 * j4);
                    s[r] = fmaf(f0.x, qv.x, fmaf(f0.y, qv.y, fmaf(f1.x, qv.z, fmaf(f1.y, qv.w, s[r]))));
                }
            }
        } else {
            constexpr int SW = GK::SW, WB = kv_words_per_block<KT>();
            uint32_t kr[SW];
            if constexpr (GK::PB == 8) {
#pragma unroll
                for (int w = 0; w < SW / 2; w++) {
                    const uint2 u = *(const uint2 *) (kw + 2 * w);
                    kr[2 * w] = u.x; kr[2 * w + 1] = u.y;
                }
            } else {
#pragma unroll
                for (int w = 0; w < SW; w++) kr[w] = kw[w];
            }
            const int * qi = (const int *) qf;
#pragma unroll
            for (int b = 0; b < NBK; b++) {
                int is[R];
#pragma unroll
                for (int r = 0; r < R; r++) is[r] = 0;
#pragma unroll
                for (int q4 = 0; q4 < 4; q4++) {
                    uint32_t cq[4];
#pragma unroll
                    for (int k = 0; k < 4; k++) cq[k] = quad<KT>(kr + b * WB, 4 * q4 + k);
#pragma unroll
                    for (int r = 0; r < R; r++) {
                        const int4 qq = *(const int4 *) (qi + r * (D / 4) + 16 * b + 4 * q4);
                        is[r] = __dp4a((int) cq[0], qq.x, is[r]);
                        is[r] = __dp4a((int) cq[1], qq.y, is[r]);
                        is[r] = __dp4a((int) cq[2], qq.z, is[r]);
                        is[r] = __dp4a((int) cq[3], qq.w, is[r]);
                    }
                }
                const float2 km = dm(kr + b * WB);
#pragma unroll
                for (int r = 0; r < R; r++) {
                    s[r] = fmaf(km.x * qdq[r * NBK + b], (float) is[r], fmaf(km.y, qsq[r * NBK + b], s[r]));
                }
            }
        }
        const bool valid = tok < t_end;
#pragma unroll
        for (int r = 0; r < R; r++) {
            float x = p.softcap != 0.0f ? p.softcap * tanhf(s[r] * p.scale) : s[r] * p.scale;
            if (mbase != nullptr && valid) {
                float slope = 1.0f;
                if (p.max_bias > 0.0f) {
                    const int head = kvh * p.gqa + min(row0 + r, p.rows - 1) % p.gqa;
                    slope = head < p.n_head_log2 ? powf(p.m0, (float) (head + 1)) : powf(p.m1, (float) (2 * (head - p.n_head_log2) + 1));
                }
                x += slope * __half2float(mbase[moff[r] + tok]);
            }
            s[r] = valid ? x : -INFINITY;
            const float wm = warp_max(s[r]);
            if (lane == 0) red[warp * R + r] = wm;
        }
        __syncthreads();

        /* ---- online softmax; f16(P d_v) per token/row/block for the V mma */
        float alpha[R], pr[R];
#pragma unroll
        for (int r = 0; r < R; r++) {
            float tm = red[r];
#pragma unroll
            for (int w = 1; w < NW; w++) tm = fmaxf(tm, red[w * R + r]);
            const float Mn = fmaxf(M[r], tm);
            alpha[r] = Mn == -INFINITY ? 1.0f : __expf(M[r] - Mn);
            M[r] = Mn;
            pr[r] = s[r] == -INFINITY ? 0.0f : __expf(s[r] - Mn);
            S[r] = fmaf(S[r], alpha[r], pr[r]);
        }
        {
            const uint32_t * vtok = vb + buf * FT * SV + tid * SV;
#pragma unroll
            for (int b = 0; b < NBV; b++) {
                const int wi = b * WBV;                 /* word of the block's d|m */
                uint32_t dmw;
                if constexpr (GV::PB == 8) {
                    const uint2 u = *(const uint2 *) (vtok + (wi & ~1));
                    dmw = (wi & 1) ? u.y : u.x;
                } else {
                    dmw = vtok[wi];
                }
                const float2 vm = dm(&dmw);
#pragma unroll
                for (int r = 0; r < R; r++) {
                    const half h = __float2half_rn(pr[r] * vm.x);
                    pdh[(b * R + r) * PDS + tid] = h;
                    const float t = valid ? fmaf(pr[r], vm.y, -1024.0f * __half2float(h)) : 0.0f;
                    pm[r][b] = fmaf(pm[r][b], alpha[r], t);
                }
            }
        }
        {
            float al0 = 1.0f, al1 = 1.0f;               /* alpha of my accumulator columns 2c, 2c+1 */
#pragma unroll
            for (int r = 0; r < R; r++) {
                if (r == 2 * c)     al0 = alpha[r];
                if (r == 2 * c + 1) al1 = alpha[r];
            }
#pragma unroll
            for (int b = 0; b < NBV; b++) {
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    acc[b][i][0] *= al0; acc[b][i][1] *= al1;
                    acc[b][i][2] *= al0; acc[b][i][3] *= al1;
                }
            }
        }
        __syncthreads();

        /* ---- V on tensor cores: warp = 32 tokens = 2 k-steps */
        const uint32_t * vt = vb + buf * FT * SV;
#pragma unroll
        for (int ks = 0; ks < 2; ks++) {
            const int T0 = 32 * warp + 16 * ks + 4 * c;
#pragma unroll
            for (int b = 0; b < NBV; b++) {
                uint32_t b0 = 0u, b1 = 0u;
                if (g < R) {
                    const uint2 u = *(const uint2 *) (pdh + (b * R + g) * PDS + T0);
                    b0 = u.x; b1 = u.y;
                }
                const int wo = b * WBV + 1 + (VT == 4 ? g : (g & 3));
                const uint32_t w0 = vt[(T0 + 0) * SV + wo];
                const uint32_t w1 = vt[(T0 + 1) * SV + wo];
                const uint32_t w2 = vt[(T0 + 2) * SV + wo];
                const uint32_t w3 = vt[(T0 + 3) * SV + wo];
                /* bytes 0,2 (xa) and 1,3 (xb) of token pairs (T0,T1) and (T2,T3), one token per half */
                uint32_t xa01 = __byte_perm(w0, w1, 0x6420), xb01 = __byte_perm(w0, w1, 0x7531);
                uint32_t xa23 = __byte_perm(w2, w3, 0x6420), xb23 = __byte_perm(w2, w3, 0x7531);
                if constexpr (VT == 2) {
                    const int sh = 4 * (g >> 2);
                    xa01 >>= sh; xb01 >>= sh; xa23 >>= sh; xb23 >>= sh;
                }
                constexpr int HS = VT == 4 ? 4 : 2;      /* shift from row g's field to row g+8's */
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const uint32_t x01 = (i & 1) ? xb01 : xa01;
                    const uint32_t x23 = (i & 1) ? xb23 : xa23;
                    const int sh = 8 * (i >> 1);
                    mma_f16_16816(acc[b][i], codes_h2<VT>(x01, sh), codes_h2<VT>(x01, sh + HS),
                                  codes_h2<VT>(x23, sh), codes_h2<VT>(x23, sh + HS), b0, b1);
                }
            }
        }
        __syncthreads();
    }
    cp_async_wait<0>();
    __syncthreads();

    /* ---- chunk result: sum the warps' accumulators, the per-thread S and P*m_v terms */
    float * racc = (float *) sm;
#pragma unroll
    for (int b = 0; b < NBV; b++) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int dlo = vdim_lo<VT>(b, i, g), dhi = dlo + vdim_hi_off<VT>();
            const int r0 = 2 * c, r1 = 2 * c + 1;
            if (r0 < R) {
                racc[(warp * R + r0) * D + dlo] = acc[b][i][0];
                racc[(warp * R + r0) * D + dhi] = acc[b][i][2];
            }
            if (r1 < R) {
                racc[(warp * R + r1) * D + dlo] = acc[b][i][1];
                racc[(warp * R + r1) * D + dhi] = acc[b][i][3];
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
        const float ws = warp_sum(S[r]);
        if (lane == 0) red[(warp * R + r) * (NBV + 1)] = ws;
#pragma unroll
        for (int b = 0; b < NBV; b++) {
            const float wp = warp_sum(pm[r][b]);
            if (lane == 0) red[(warp * R + r) * (NBV + 1) + 1 + b] = wp;
        }
    }
    __syncthreads();

    for (int e = tid; e < R * D; e += FT) {
        const int r = e / D, j = e % D;
        const int row = row0 + r;
        if (row >= p.rows) continue;
        float o = 0.0f;
#pragma unroll
        for (int w = 0; w < NW; w++) o += racc[(w * R + r) * D + j] + red[(w * R + r) * (NBV + 1) + 1 + j / 64];
        const size_t pidx = ((size_t) (seq * p.n_head_kv + kvh) * p.rows + row) * p.n_chunks + chunk;
        p.part[pidx * D + j] = o;
        if (j == 0) {
            float st = 0.0f;
#pragma unroll
            for (int w = 0; w < NW; w++) st += red[(w * R + r) * (NBV + 1)];
            p.meta[pidx] = make_float2(M[r], st);
        }
    }
}

template <int KT, int VT, int D, int R>
int fattn_mma_launch(const fa_kparams & kp, const int n_rowgroups, const int n_seq, cudaStream_t stream) {
    using LY = fm_layout<KT, VT, D, R>;
    static bool attr_set[PKV_MAX_DEVICES] = {};   /* per instance and device */
    const cudaError_t e = raise_smem_limit(k_fattn_decode_mma<KT, VT, D, R>, (int) LY::bytes, attr_set);
    if (e != cudaSuccess) return (int) e;
    const dim3 grid((unsigned) (kp.n_head_kv * n_rowgroups), (unsigned) kp.n_chunks, (unsigned) n_seq);
    return (int) pdl_launch(k_fattn_decode_mma<KT, VT, D, R>, grid, dim3(FT), LY::bytes, stream, kp);
}

/* piece size the mma kernel copies K/V slices of this type and D with (the
 * host checks pointer/stride alignment against it) */
static inline int fattn_mma_piece_bytes(const int t, const int D) {
    const int sw = t == PKV_CUDA_KV_F16 ? D / 2 : (D / 64) * (t == 4 ? 9 : t == 3 ? 7 : 5);
    return sw % 2 == 0 ? 8 : 4;
}

template <int KT, int VT>
int fattn_mma_launch_dr(const fa_kparams & kp, int D, int R, int n_rowgroups, int n_seq, cudaStream_t stream) {
    if (D == 128) {
        return R == 4 ? fattn_mma_launch<KT, VT, 128, 4>(kp, n_rowgroups, n_seq, stream)
                      : fattn_mma_launch<KT, VT, 128, 8>(kp, n_rowgroups, n_seq, stream);
    }
    if (D == 64) {
        return R == 4 ? fattn_mma_launch<KT, VT, 64, 4>(kp, n_rowgroups, n_seq, stream)
                      : fattn_mma_launch<KT, VT, 64, 8>(kp, n_rowgroups, n_seq, stream);
    }
    return -1;
}

template <int KT>
int fattn_mma_launch_v(const fa_kparams & kp, int v_type, int D, int R, int n_rowgroups, int n_seq, cudaStream_t stream) {
    switch (v_type) {
        case 4: return fattn_mma_launch_dr<KT, 4>(kp, D, R, n_rowgroups, n_seq, stream);
        case 2: return fattn_mma_launch_dr<KT, 2>(kp, D, R, n_rowgroups, n_seq, stream);
        default: return -1;
    }
}

/* defined in pkv_fattn_k{4,3,2,16}.cu */
int fattn_mma_launch_k4 (const fa_kparams & kp, int v_type, int D, int R, int n_rowgroups, int n_seq, cudaStream_t stream);
int fattn_mma_launch_k3 (const fa_kparams & kp, int v_type, int D, int R, int n_rowgroups, int n_seq, cudaStream_t stream);
int fattn_mma_launch_k2 (const fa_kparams & kp, int v_type, int D, int R, int n_rowgroups, int n_seq, cudaStream_t stream);
int fattn_mma_launch_k16(const fa_kparams & kp, int v_type, int D, int R, int n_rowgroups, int n_seq, cudaStream_t stream);

} // namespace pkv
