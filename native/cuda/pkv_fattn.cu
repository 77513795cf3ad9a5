/* Host API of the flash-attention decode kernels (pkv_cuda.h) and the kernel
 * that combines the per-chunk partial results. Kernel choice: the warp-tiled
 * kernel (pkv_fattn_v3.cuh) for K and V both of ours at head size 128, else the
 * tensor-core V kernel (pkv_fattn_mma.cuh) for V of kv4/kv2, else the scalar one
 * (pkv_fattn.cuh). Environment, for A/B timing and tests:
 *   PKV_CUDA_FA_LEGACY=1  always the scalar kernel;
 *   PKV_CUDA_FA_V3=0      not the warp-tiled kernel (the previous choice);
 *   PKV_CUDA_FA_TPC=n     warp-tiled kernel: n 32-token tiles per chunk (a plan
 *                         with one chunk writes dst directly, no combine);
 *   PKV_CUDA_FA_NS=2|3    warp-tiled kernel: cp.async stages per warp (3: 3 CTAs
 *                         per SM; 2: register bound for 4 CTAs per SM). */
#include "pkv_fattn_v3.cuh"

#include <stdlib.h>

using namespace pkv;

namespace {

/* dst[:, head, iq1, seq] = sum_c e^(M_c - M) acc_c / (sum_c e^(M_c - M) S_c + e^(sink - M)).
 * One CTA of CT threads per (row, KV head, seq): the chunk weights are computed
 * in parallel into shared memory, then CT / D threads per output value sum
 * interleaved chunk subsets (independent loads in flight) and are added up.
 * (CT = 512: with ~45 chunks each thread has ~11 loads, all in flight at once.) */
constexpr int CT = 512;

static __device__ __forceinline__ float block_reduce(float x, float * sred, const bool is_max) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float y = __shfl_xor_sync(0xffffffffu, x, o);
        x = is_max ? fmaxf(x, y) : x + y;
    }
    __syncthreads();                       /* sred reused between calls */
    if (lane == 0) sred[warp] = x;
    __syncthreads();
    x = sred[0];
    for (int w = 1; w < CT / 32; w++) x = is_max ? fmaxf(x, sred[w]) : x + sred[w];
    return x;
}

/* no __restrict__: with PDL, read-only (non-coherent) loads could be hoisted above pdl_wait() */
__global__ void __launch_bounds__(CT) k_fattn_combine(const float * part, const float2 * meta,
                                const float * sinks, float * dst,
                                const int D, const int rows, const int gqa, const int n_head, const int n_q,
                                const int n_head_kv, const int n_chunks) {
    extern __shared__ float cw[];          /* [n_chunks] chunk weights, then [CT] partial sums */
    __shared__ float sred[CT / 32];
    const int tid = threadIdx.x;
    const int row = blockIdx.x, kvh = blockIdx.y, seq = blockIdx.z;
    const int head = kvh * gqa + row % gqa, iq1 = row / gqa;
    const size_t base = ((size_t) (seq * n_head_kv + kvh) * rows + row) * n_chunks;
    pdl_wait();        /* the chunk results of the decode kernel */
    pdl_trigger();

    float mx = -INFINITY;
    for (int c = tid; c < n_chunks; c += CT) mx = fmaxf(mx, meta[base + c].x);
    mx = block_reduce(mx, sred, true);
    if (sinks) mx = fmaxf(mx, sinks[head]);
    float ss = 0.0f;
    for (int c = tid; c < n_chunks; c += CT) {
        const float2 mt = meta[base + c];
        const float w = mt.x == -INFINITY ? 0.0f : __expf(mt.x - mx);
        cw[c] = w;
        ss = fmaf(w, mt.y, ss);
    }
    ss = block_reduce(ss, sred, false);    /* its barriers also publish cw */
    if (sinks && mx != -INFINITY) ss += __expf(sinks[head] - mx);

    const int nsplit = CT / D, j = tid % D, sp = tid / D;
    float o = 0.0f;
    if (sp < nsplit) {
        const float * pp = part + base * D + j;
#pragma unroll 8
        for (int c = sp; c < n_chunks; c += nsplit) o = fmaf(cw[c], pp[(size_t) c * D], o);
    }
    float * osum = cw + n_chunks;
    osum[tid] = o;
    __syncthreads();
    if (tid < D) {
        for (int s2 = 1; s2 < nsplit; s2++) o += osum[s2 * D + tid];
        float * out = dst + ((size_t) (seq * n_q + iq1) * n_head + head) * D;
        out[tid] = ss > 0.0f ? o / ss : 0.0f;
    }
}

/* PKV_CUDA_FA_LEGACY=1: always the scalar kernel (A/B timing, fallback) */
bool use_legacy() {
    static int v = -1;
    if (v < 0) {
        const char * e = getenv("PKV_CUDA_FA_LEGACY");
        v = (e != nullptr && atoi(e) != 0) ? 1 : 0;
    }
    return v == 1;
}

/* the tensor-core kernel takes V of kv4/kv2 whose slices it can copy in its piece size */
bool mma_applies(const pkv_cuda_fattn_params * p) {
    if (use_legacy() || (p->v_type != 4 && p->v_type != 2)) return false;
    const size_t pk = (size_t) fattn_mma_piece_bytes(p->k_type, p->D);
    const size_t pv = (size_t) fattn_mma_piece_bytes(p->v_type, p->D);
    if (((uintptr_t) p->k | p->nbk1 | p->nbk2 | p->nbk3) % pk != 0) return false;
    if (((uintptr_t) p->v | p->nbv1 | p->nbv2 | p->nbv3) % pv != 0) return false;
    /* per-thread copy offsets are 32-bit: a tile spans FT rows */
    return p->nbk1 < (size_t) 1 << 23 && p->nbv1 < (size_t) 1 << 23;
}

int sm_count() {
    static int cached[PKV_MAX_DEVICES] = {0};
    const int dev = current_device();
    if (dev < 0) return 132;
    if (cached[dev] == 0) {
        int n = 0;
        if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) n = 132;
        cached[dev] = n;
    }
    return cached[dev];
}

struct plan {
    int R, n_rowgroups, rows, gqa, chunk_len, n_chunks;
    bool v3;
};

int env_int(const char * name, const int def) {
    const char * e = getenv(name);
    return e != nullptr && *e != '\0' ? atoi(e) : def;
}

/* the warp-tiled kernel: K and V of ours, D = 128, every head slice 8-byte aligned */
bool v3_applies(const pkv_cuda_fattn_params * p) {
    static const int on = env_int("PKV_CUDA_FA_V3", 1);
    if (use_legacy() || on == 0 || p->D != 128) return false;
    const auto ours = [](int t) { return t == 4 || t == 3 || t == 2; };
    if (!ours(p->k_type) || !ours(p->v_type)) return false;
    if (((uintptr_t) p->k | p->nbk1 | p->nbk2 | p->nbk3) % 8 != 0) return false;
    if (((uintptr_t) p->v | p->nbv1 | p->nbv2 | p->nbv3) % 8 != 0) return false;
    return p->nbk1 < (size_t) 1 << 26 && p->nbv1 < (size_t) 1 << 26;   /* 32-bit copy offsets within a tile */
}

int fattn3_ns() {
    static const int ns = env_int("PKV_CUDA_FA_NS", 3) == 2 ? 2 : 3;
    return ns;
}

int fattn3_occupancy(const int k_type, const int v_type) {
    switch (k_type) {
        case 4: return fattn3_occupancy_k4(v_type, fattn3_ns());
        case 3: return fattn3_occupancy_k3(v_type, fattn3_ns());
        case 2: return fattn3_occupancy_k2(v_type, fattn3_ns());
        default: return 1;
    }
}

bool make_plan(const pkv_cuda_fattn_params * p, plan & pl) {
    if (!pkv_cuda_fattn_decode_supported(p->k_type, p->v_type, p->D)) return false;
    if (p->n_head_kv <= 0 || p->n_head % p->n_head_kv != 0 || p->n_q <= 0 || p->n_seq <= 0 || p->n_kv <= 0) return false;
    if (p->n_kv > INT32_MAX / 2) return false;
    pl.gqa  = p->n_head / p->n_head_kv;
    pl.rows = pl.gqa * p->n_q;
    pl.v3   = v3_applies(p);
    if (pl.v3) {
        /* at most one wave of CTAs (occupancy x SMs); chunks of whole 32-token tiles, the
         * same number per warp; a plan of <= 2 chunks becomes one (direct write, no combine) */
        pl.R = fa3::R;
        pl.n_rowgroups = (pl.rows + pl.R - 1) / pl.R;
        const int64_t base  = (int64_t) p->n_head_kv * pl.n_rowgroups * p->n_seq;
        const int64_t tiles = (p->n_kv + fa3::TT - 1) / fa3::TT;
        const int64_t slots = (int64_t) fattn3_occupancy(p->k_type, p->v_type) * sm_count();
        static const int tpc_env = env_int("PKV_CUDA_FA_TPC", 0);
        int64_t tpc = tpc_env;
        if (tpc <= 0) {
            const int64_t max_nc = slots / base > 1 ? slots / base : 1;
            const int64_t per_warp = (tiles + max_nc * fa3::NW - 1) / (max_nc * fa3::NW);
            tpc = per_warp * fa3::NW;
        }
        if (tpc > tiles) tpc = tiles;
        int64_t nc = (tiles + tpc - 1) / tpc;
        if (nc <= 2 && tpc_env <= 0) {
            nc = 1;
            tpc = tiles;
        }
        pl.chunk_len = (int) (tpc * fa3::TT);
        pl.n_chunks  = (int) nc;
        return true;
    }
    pl.R    = pl.rows <= 4 ? 4 : 8;
    pl.n_rowgroups = (pl.rows + pl.R - 1) / pl.R;
    const int base = p->n_head_kv * pl.n_rowgroups * p->n_seq;
    const int want = (pl.R == 4 ? 4 : 3) * sm_count(); /* CTAs for about one full wave (mma kernel: 4 resp. 3 per SM) */
    const int64_t max_chunks = (p->n_kv + FT - 1) / FT;
    int64_t nc = (want + base - 1) / base;
    if (nc > max_chunks) nc = max_chunks;
    if (nc < 1) nc = 1;
    const int64_t tiles = (max_chunks + nc - 1) / nc; /* tiles per chunk */
    pl.chunk_len = (int) (tiles * FT);
    pl.n_chunks  = (int) ((p->n_kv + pl.chunk_len - 1) / pl.chunk_len);
    return true;
}

size_t workspace_bytes(const pkv_cuda_fattn_params * p, const plan & pl) {
    const size_t n = (size_t) p->n_seq * p->n_head_kv * pl.rows * pl.n_chunks;
    return n * p->D * sizeof(float) + n * sizeof(float2) + 256;
}

} // namespace

extern "C" int pkv_cuda_fattn_decode_supported(int k_type, int v_type, int D) {
    const auto ok = [](int t) { return t == 4 || t == 3 || t == 2 || t == PKV_CUDA_KV_F16; };
    if (!ok(k_type) || !ok(v_type)) return 0;
    if (k_type == PKV_CUDA_KV_F16 && v_type == PKV_CUDA_KV_F16) return 0;
    return D == 64 || D == 128;
}

extern "C" size_t pkv_cuda_fattn_decode_workspace(const pkv_cuda_fattn_params * p) {
    plan pl;
    if (!make_plan(p, pl)) return 0;
    return workspace_bytes(p, pl);
}

extern "C" int pkv_cuda_fattn_decode(const pkv_cuda_fattn_params * p, void * workspace, cudaStream_t stream) {
    plan pl;
    if (!make_plan(p, pl) || workspace == nullptr) return -1;

    fa_kparams kp;
    kp.q = (const char *) p->q; kp.nbq1 = p->nbq1; kp.nbq2 = p->nbq2; kp.nbq3 = p->nbq3;
    kp.k = (const char *) p->k; kp.nbk1 = p->nbk1; kp.nbk2 = p->nbk2; kp.nbk3 = p->nbk3;
    kp.v = (const char *) p->v; kp.nbv1 = p->nbv1; kp.nbv2 = p->nbv2; kp.nbv3 = p->nbv3;
    kp.mask = (const char *) p->mask; kp.nbm1 = p->nbm1; kp.nbm3 = p->nbm3;
    kp.mask_ne3 = p->mask_ne3 > 0 ? (int) p->mask_ne3 : 1;
    const size_t n = (size_t) p->n_seq * p->n_head_kv * pl.rows * pl.n_chunks;
    kp.part = (float *) workspace;
    kp.meta = (float2 *) (((uintptr_t) (kp.part + n * p->D) + 15) & ~(uintptr_t) 15);
    kp.n_q = p->n_q; kp.n_head = p->n_head; kp.n_head_kv = p->n_head_kv; kp.gqa = pl.gqa; kp.rows = pl.rows;
    kp.n_kv = (int) p->n_kv; kp.chunk_len = pl.chunk_len; kp.n_chunks = pl.n_chunks;
    kp.softcap = p->softcap;
    kp.scale = p->softcap != 0.0f ? p->scale / p->softcap : p->scale;
    kp.max_bias = p->max_bias;
    kp.n_head_log2 = p->n_head > 0 ? 1 << (int) floorf(log2f((float) p->n_head)) : 1;
    kp.m0 = powf(2.0f, -(p->max_bias)        / kp.n_head_log2);
    kp.m1 = powf(2.0f, -(p->max_bias / 2.0f) / kp.n_head_log2);

    kp.dst = p->dst; kp.sinks = p->sinks;
    kp.direct = 0;
    kp.same_col = (p->n_q == 1 || pl.gqa % 2 == 0) ? 1 : 0;
    kp.f16k = 0x64006400u;

    int rc;
    if (pl.v3) {
        kp.direct = pl.n_chunks == 1 ? 1 : 0;
        switch (p->k_type) {
            case 4:  rc = fattn3_launch_k4(kp, p->v_type, fattn3_ns(), pl.n_rowgroups, p->n_seq, stream); break;
            case 3:  rc = fattn3_launch_k3(kp, p->v_type, fattn3_ns(), pl.n_rowgroups, p->n_seq, stream); break;
            case 2:  rc = fattn3_launch_k2(kp, p->v_type, fattn3_ns(), pl.n_rowgroups, p->n_seq, stream); break;
            default: rc = -1;
        }
        if (rc != 0 || kp.direct) return rc;
    } else if (mma_applies(p)) {
        switch (p->k_type) {
            case 4:  rc = fattn_mma_launch_k4 (kp, p->v_type, p->D, pl.R, pl.n_rowgroups, p->n_seq, stream); break;
            case 3:  rc = fattn_mma_launch_k3 (kp, p->v_type, p->D, pl.R, pl.n_rowgroups, p->n_seq, stream); break;
            case 2:  rc = fattn_mma_launch_k2 (kp, p->v_type, p->D, pl.R, pl.n_rowgroups, p->n_seq, stream); break;
            case PKV_CUDA_KV_F16: rc = fattn_mma_launch_k16(kp, p->v_type, p->D, pl.R, pl.n_rowgroups, p->n_seq, stream); break;
            default: rc = -1;
        }
    } else {
        switch (p->k_type) {
            case 4:  rc = fattn_launch_k4 (kp, p->v_type, p->D, pl.R, pl.n_rowgroups, p->n_seq, stream); break;
            case 3:  rc = fattn_launch_k3 (kp, p->v_type, p->D, pl.R, pl.n_rowgroups, p->n_seq, stream); break;
            case 2:  rc = fattn_launch_k2 (kp, p->v_type, p->D, pl.R, pl.n_rowgroups, p->n_seq, stream); break;
            case PKV_CUDA_KV_F16: rc = fattn_launch_k16(kp, p->v_type, p->D, pl.R, pl.n_rowgroups, p->n_seq, stream); break;
            default: rc = -1;
        }
    }
    if (rc != 0) return rc;
    const dim3 grid((unsigned) pl.rows, (unsigned) p->n_head_kv, (unsigned) p->n_seq);
    const size_t csm = sizeof(float) * ((size_t) pl.n_chunks + CT);
    return (int) pdl_launch(k_fattn_combine, grid, dim3(CT), csm, stream, (const float *) kp.part, (const float2 *) kp.meta,
                            p->sinks, p->dst, p->D, pl.rows, pl.gqa, p->n_head, p->n_q, p->n_head_kv, pl.n_chunks);
}
