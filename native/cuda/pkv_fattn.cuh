/*
 * pyllm-kv flash-attention decode kernel (template; instantiated per K type in
 * pkv_fattn_k*.cu, host API in pkv_fattn.cu).
 *
 * One CTA of FT = 128 threads handles one KV head, one chunk of the KV length
 * and R (4 or 8) query rows: the GQA query heads of that KV head times the
 * query columns. Per tile of 128 tokens:
 *   - K and V slices of the tile are copied global -> shared with cp.async
 *     (coalesced 4-byte pieces, double buffered, zero-filled past the end);
 *   - scores: thread t takes token t; Q was quantized to int8 per 64 values in
 *     the prologue, so each quad of K codes meets Q through one dp4a per row,
 *     and the block's scale/min are applied once per block (score = d_k *
 *     d_q * isum + m_k * d_q * sum(q));
 *   - online softmax per row (tile max over the CTA), P*d_v of each token and
 *     V block kept in shared memory, sum_t P*m_v kept per thread;
 *   - V: lane = quad of the head (4 values), warp = token group: acc[r][4] +=
 *     (P d_v) * code, codes turned into floats with one byte_perm + one add.
 * The chunk's (M, S, acc) go to a workspace; pkv_fattn_combine merges the
 * chunks (and the attention sinks) into dst.
 */
#pragma once

#include "pkv_cuda.h"
#include "pkv_cuda.cuh"
#include <math.h>

namespace pkv {

constexpr int FT = 128;

struct fa_kparams {
    const char * q; size_t nbq1, nbq2, nbq3;
    const char * k; size_t nbk1, nbk2, nbk3;
    const char * v; size_t nbv1, nbv2, nbv3;
    const char * mask; size_t nbm1, nbm3; int mask_ne3;
    float  * part;
    float2 * meta;
    int n_q, n_head, n_head_kv, gqa, rows;
    int n_kv, chunk_len, n_chunks;
    float scale, softcap, max_bias, m0, m1; int n_head_log2;
    /* warp-tiled kernel (pkv_fattn_v3.cuh) only: with one chunk (direct) it
     * writes dst itself, sinks applied; same_col: query rows 2i and 2i+1 of a
     * row group always share a mask row */
    float * dst; const float * sinks; int direct, same_col;
    uint32_t f16k;   /* 0x64006400, passed at run time so the compiler keeps it in a register */
};

template <int T> __host__ __device__ constexpr int kv_words_per_block() { return T == 4 ? 9 : T == 3 ? 7 : 5; }
/* 32-bit words of one token's head slice, and its padded (odd) shared-memory stride */
template <int T, int D> __host__ __device__ constexpr int slice_words() { return T == PKV_CUDA_KV_F16 ? D / 2 : (D / 64) * kv_words_per_block<T>(); }
template <int T, int D> __host__ __device__ constexpr int smem_stride() { return slice_words<T, D>() | 1; }
template <int T, int D> __host__ __device__ constexpr int scale_blocks() { return T == PKV_CUDA_KV_F16 ? 1 : D / 64; }

template <int KT, int VT, int D, int R>
struct fa_layout {
    static constexpr int NBK = scale_blocks<KT, D>();
    static constexpr int NBV = scale_blocks<VT, D>();
    static constexpr int SKW = smem_stride<KT, D>();
    static constexpr int SVW = smem_stride<VT, D>();
    static constexpr int QPT = D / 4;              /* quads per token */
    static constexpr int TPW = 32 / QPT;           /* tokens per warp step in the V phase */
    static constexpr int NG  = (FT / 32) * TPW;    /* token groups in the V phase */
    static constexpr int tiles_words = 2 * FT * (SKW + SVW);
    static constexpr int racc_words  = NG * R * D;
    static constexpr int big_words   = tiles_words > racc_words ? tiles_words : racc_words;
    static constexpr int pd_words    = FT * NBV * R;
    static constexpr int q_words     = R * D;
    static constexpr int red_words   = (FT / 32) * R * (NBV + 1);
    static constexpr int words = big_words + pd_words + q_words + 2 * R * NBK + red_words;
    static constexpr size_t bytes = 4 * (size_t) words;
};

static __device__ __forceinline__ void cp_async4(void * smem, const void * gmem, int src_bytes) {
    const unsigned s = (unsigned) __cvta_generic_to_shared(smem);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" :: "r"(s), "l"(gmem), "r"(src_bytes) : "memory");
}
static __device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> static __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory"); }

static __device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}
static __device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

template <int T, int D>
static __device__ __forceinline__ void load_slice_tile(uint32_t * dst, const char * base, const size_t nb1,
                                                       const int t0, const int t_end, const int tid) {
    constexpr int SW = slice_words<T, D>();
    constexpr int ST = smem_stride<T, D>();
#pragma unroll 4
    for (int i = tid; i < FT * SW; i += FT) {
        const int t = i / SW, w = i - t * SW;
        const int tok = t0 + t;
        const bool ok = tok < t_end;
        const char * src = base + (size_t) (ok ? tok : t0) * nb1 + 4 * w;
        cp_async4(dst + t * ST + w, src, ok ? 4 : 0);
    }
}

template <int KT, int VT, int D, int R>
__global__ void __launch_bounds__(FT) k_fattn_decode(const fa_kparams p) {
    using LY = fa_layout<KT, VT, D, R>;
    constexpr int NBK = LY::NBK, NBV = LY::NBV, SKW = LY::SKW, SVW = LY::SVW;
    constexpr int QPT = LY::QPT, TPW = LY::TPW, NG = LY::NG;

    extern __shared__ uint32_t sm[];
    uint32_t * kb  = sm;                                  /* [2][FT][SKW] */
    uint32_t * vb  = kb + 2 * FT * SKW;                   /* [2][FT][SVW] */
    float    * pdv = (float *) (sm + LY::big_words);      /* [FT][NBV][R]  P * d_v */
    float    * qf  = pdv + LY::pd_words;                  /* [R][D] floats (f16 K) or int8 */
    float    * qdq = qf + LY::q_words;                    /* [R][NBK] d_q */
    float    * qsq = qdq + R * NBK;                       /* [R][NBK] d_q * sum(q) */
    float    * red = qsq + R * NBK;                       /* [warps][R][NBV+1] */

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int kvh = blockIdx.x % p.n_head_kv, row0 = (blockIdx.x / p.n_head_kv) * R;
    const int chunk = blockIdx.y, seq = blockIdx.z;
    const int t_begin = chunk * p.chunk_len;
    const int t_end   = min(p.n_kv, t_begin + p.chunk_len);

    const char * kbase = p.k + seq * p.nbk3 + kvh * p.nbk2;
    const char * vbase = p.v + seq * p.nbv3 + kvh * p.nbv2;
    const int ntiles = t_end > t_begin ? (t_end - t_begin + FT - 1) / FT : 0;

    if (ntiles > 0) {
        load_slice_tile<KT, D>(kb, kbase, p.nbk1, t_begin, t_end, tid);
        load_slice_tile<VT, D>(vb, vbase, p.nbv1, t_begin, t_end, tid);
    }
    cp_async_commit();

    /* ---- Q prologue: R rows, per 64 values: int8 codes + d_q + d_q*sum (ours), or floats (f16) */
    for (int pr = warp; pr < R * (D / 64); pr += FT / 32) {
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

    /* per-row constants */
    const half * mrow[R];
    float slope[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        const int row = min(row0 + r, p.rows - 1);
        const int head = kvh * p.gqa + row % p.gqa;
        mrow[r] = p.mask ? (const half *) (p.mask + (size_t) (seq % p.mask_ne3) * p.nbm3 + (size_t) (row / p.gqa) * p.nbm1) : nullptr;
        slope[r] = 1.0f;
        if (p.max_bias > 0.0f) {
            slope[r] = head < p.n_head_log2 ? powf(p.m0, (float) (head + 1)) : powf(p.m1, (float) (2 * (head - p.n_head_log2) + 1));
        }
    }

    float M[R], S[R], acc[R][4], pm[R][NBV];
#pragma unroll
    for (int r = 0; r < R; r++) {
        M[r] = -INFINITY; S[r] = 0.0f;
#pragma unroll
        for (int i = 0; i < 4; i++) acc[r][i] = 0.0f;
#pragma unroll
        for (int b = 0; b < NBV; b++) pm[r][b] = 0.0f;
    }

    const int qd = lane % QPT;                  /* V phase: my quad of the head */
    const int tg = warp * TPW + lane / QPT;     /* V phase: my token group */
    const int vblk = VT == PKV_CUDA_KV_F16 ? 0 : qd / 16;

    for (int it = 0; it < ntiles; it++) {
        const int buf = it & 1;
        const int t0 = t_begin + it * FT;
        if (it + 1 < ntiles) {
            load_slice_tile<KT, D>(kb + (buf ^ 1) * FT * SKW, kbase, p.nbk1, t0 + FT, t_end, tid);
            load_slice_tile<VT, D>(vb + (buf ^ 1) * FT * SVW, vbase, p.nbv1, t0 + FT, t_end, tid);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();

        /* ---- scores of token t0 + tid */
        const int tok = t0 + tid;
        float s[R];
        const uint32_t * kw = kb + buf * FT * SKW + tid * SKW;
        if constexpr (KT == PKV_CUDA_KV_F16) {
#pragma unroll
            for (int r = 0; r < R; r++) s[r] = 0.0f;
#pragma unroll 8
            for (int j2 = 0; j2 < D / 2; j2++) {
                const uint32_t u = kw[j2];
                const float2 f = __half22float2(*(const half2 *) &u);
#pragma unroll
                for (int r = 0; r < R; r++) {
                    const float2 qv = *(const float2 *) (qf + r * D + 2 * j2);
                    s[r] = fmaf(f.x, qv.x, fmaf(f.y, qv.y, s[r]));
                }
            }
        } else {
            const int * qi = (const int *) qf;
#pragma unroll
            for (int r = 0; r < R; r++) s[r] = 0.0f;
#pragma unroll
            for (int b = 0; b < NBK; b++) {
                const uint32_t * bw = kw + b * kv_words_per_block<KT>();
                int is[R];
#pragma unroll
                for (int r = 0; r < R; r++) is[r] = 0;
#pragma unroll
                for (int q4 = 0; q4 < 4; q4++) {
                    uint32_t c[4];
#pragma unroll
                    for (int k = 0; k < 4; k++) c[k] = quad<KT>(bw, 4 * q4 + k);
#pragma unroll
                    for (int r = 0; r < R; r++) {
                        const int4 qq = *(const int4 *) (qi + r * (D / 4) + 16 * b + 4 * q4);
                        is[r] = __dp4a((int) c[0], qq.x, is[r]);
                        is[r] = __dp4a((int) c[1], qq.y, is[r]);
                        is[r] = __dp4a((int) c[2], qq.z, is[r]);
                        is[r] = __dp4a((int) c[3], qq.w, is[r]);
                    }
                }
                const float2 km = dm(bw);
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
            if (mrow[r] != nullptr && valid) x += slope[r] * __half2float(mrow[r][tok]);
            s[r] = valid ? x : -INFINITY;
            const float wm = warp_max(s[r]);
            if (lane == 0) red[warp * R + r] = wm;
        }
        __syncthreads();

        float alpha[R], pr[R];
#pragma unroll
        for (int r = 0; r < R; r++) {
            float tm = red[r];
#pragma unroll
            for (int w = 1; w < FT / 32; w++) tm = fmaxf(tm, red[w * R + r]);
            const float Mn = fmaxf(M[r], tm);
            alpha[r] = Mn == -INFINITY ? 1.0f : __expf(M[r] - Mn);
            M[r] = Mn;
            pr[r] = s[r] == -INFINITY ? 0.0f : __expf(s[r] - Mn);
            S[r] = fmaf(S[r], alpha[r], pr[r]);
        }
        const uint32_t * vtok = vb + buf * FT * SVW + tid * SVW;
        if constexpr (VT == PKV_CUDA_KV_F16) {
#pragma unroll
            for (int r = 0; r < R; r++) pdv[tid * R + r] = pr[r];
        } else {
#pragma unroll
            for (int b = 0; b < NBV; b++) {
                const float2 vm = dm(vtok + b * kv_words_per_block<VT>());
#pragma unroll
                for (int r = 0; r < R; r++) {
                    pdv[(tid * NBV + b) * R + r] = pr[r] * vm.x;
                    pm[r][b] = fmaf(pm[r][b], alpha[r], pr[r] * vm.y);
                }
            }
        }
        __syncthreads();

        /* ---- V: acc[r][i] += (P d_v)[t] * code[t][4 qd + i] */
#pragma unroll
        for (int r = 0; r < R; r++) {
#pragma unroll
            for (int i = 0; i < 4; i++) acc[r][i] *= alpha[r];
        }
        const uint32_t * vt = vb + buf * FT * SVW;
#pragma unroll 4
        for (int t = tg; t < FT; t += NG) {
            const uint32_t * vw = vt + t * SVW;
            float y[4];
            if constexpr (VT == PKV_CUDA_KV_F16) {
                const uint32_t a = vw[2 * qd], b2 = vw[2 * qd + 1];
                const float2 fa = __half22float2(*(const half2 *) &a);
                const float2 fb = __half22float2(*(const half2 *) &b2);
                y[0] = fa.x; y[1] = fa.y; y[2] = fb.x; y[3] = fb.y;
            } else {
                const uint32_t c = quad<VT>(vw + vblk * kv_words_per_block<VT>(), qd % 16);
#pragma unroll
                for (int i = 0; i < 4; i++) y[i] = byte_f(c, i);
            }
            const float * pp = pdv + (t * NBV + vblk) * R;
#pragma unroll
            for (int r = 0; r < R; r++) {
                const float w = pp[r];
#pragma unroll
                for (int i = 0; i < 4; i++) acc[r][i] = fmaf(w, y[i], acc[r][i]);
            }
        }
        __syncthreads();
    }
    cp_async_wait<0>();
    __syncthreads();

    /* ---- chunk result: sum the token groups' acc, the per-thread S and P*m_v */
    float * racc = (float *) sm;
#pragma unroll
    for (int r = 0; r < R; r++) {
#pragma unroll
        for (int i = 0; i < 4; i++) racc[(tg * R + r) * D + 4 * qd + i] = acc[r][i];
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
        for (int g = 0; g < NG; g++) o += racc[(g * R + r) * D + j];
        if constexpr (VT != PKV_CUDA_KV_F16) {
#pragma unroll
            for (int w = 0; w < FT / 32; w++) o += red[(w * R + r) * (NBV + 1) + 1 + j / 64];
        }
        const size_t pidx = ((size_t) (seq * p.n_head_kv + kvh) * p.rows + row) * p.n_chunks + chunk;
        p.part[pidx * D + j] = o;
        if (j == 0) {
            float st = 0.0f;
#pragma unroll
            for (int w = 0; w < FT / 32; w++) st += red[(w * R + r) * (NBV + 1)];
            p.meta[pidx] = make_float2(M[r], st);
        }
    }
}

/* Launch one instance (the host API picked the types, D and R). */
template <int KT, int VT, int D, int R>
int fattn_launch(const fa_kparams & kp, const int n_rowgroups, const int n_seq, cudaStream_t stream) {
    using LY = fa_layout<KT, VT, D, R>;
    static bool attr_set[PKV_MAX_DEVICES] = {};   /* per instance and device */
    const cudaError_t e = raise_smem_limit(k_fattn_decode<KT, VT, D, R>, (int) LY::bytes, attr_set);
    if (e != cudaSuccess) return (int) e;
    const dim3 grid((unsigned) (kp.n_head_kv * n_rowgroups), (unsigned) kp.n_chunks, (unsigned) n_seq);
    k_fattn_decode<KT, VT, D, R><<<grid, FT, LY::bytes, stream>>>(kp);
    return (int) cudaGetLastError();
}

template <int KT, int VT>
int fattn_launch_dr(const fa_kparams & kp, int D, int R, int n_rowgroups, int n_seq, cudaStream_t stream) {
    if (D == 128) {
        return R == 4 ? fattn_launch<KT, VT, 128, 4>(kp, n_rowgroups, n_seq, stream)
                      : fattn_launch<KT, VT, 128, 8>(kp, n_rowgroups, n_seq, stream);
    }
    if (D == 64) {
        return R == 4 ? fattn_launch<KT, VT, 64, 4>(kp, n_rowgroups, n_seq, stream)
                      : fattn_launch<KT, VT, 64, 8>(kp, n_rowgroups, n_seq, stream);
    }
    return -1;
}

template <int KT>
int fattn_launch_v(const fa_kparams & kp, int v_type, int D, int R, int n_rowgroups, int n_seq, cudaStream_t stream) {
    switch (v_type) {
        case 4: return fattn_launch_dr<KT, 4>(kp, D, R, n_rowgroups, n_seq, stream);
        case 3: return fattn_launch_dr<KT, 3>(kp, D, R, n_rowgroups, n_seq, stream);
        case 2: return fattn_launch_dr<KT, 2>(kp, D, R, n_rowgroups, n_seq, stream);
        case PKV_CUDA_KV_F16:
            if constexpr (KT == PKV_CUDA_KV_F16) return -1;
            else return fattn_launch_dr<KT, PKV_CUDA_KV_F16>(kp, D, R, n_rowgroups, n_seq, stream);
        default: return -1;
    }
}

/* defined in pkv_fattn_k{4,3,2,16}.cu */
int fattn_launch_k4 (const fa_kparams & kp, int v_type, int D, int R, int n_rowgroups, int n_seq, cudaStream_t stream);
int fattn_launch_k3 (const fa_kparams & kp, int v_type, int D, int R, int n_rowgroups, int n_seq, cudaStream_t stream);
int fattn_launch_k2 (const fa_kparams & kp, int v_type, int D, int R, int n_rowgroups, int n_seq, cudaStream_t stream);
int fattn_launch_k16(const fa_kparams & kp, int v_type, int D, int R, int n_rowgroups, int n_seq, cudaStream_t stream);

} // namespace pkv
