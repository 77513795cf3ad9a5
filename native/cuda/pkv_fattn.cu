/* Host API of the flash-attention decode kernel (pkv_cuda.h) and the kernel
 * that combines the per-chunk partial results. */
#include "pkv_fattn.cuh"

using namespace pkv;

namespace {

/* dst[:, head, iq1, seq] = sum_c e^(M_c - M) acc_c / (sum_c e^(M_c - M) S_c + e^(sink - M)) */
__global__ void k_fattn_combine(const float * __restrict__ part, const float2 * __restrict__ meta,
                                const float * __restrict__ sinks, float * __restrict__ dst,
                                const int D, const int rows, const int gqa, const int n_head, const int n_q,
                                const int n_head_kv, const int n_chunks) {
    const int row = blockIdx.x, kvh = blockIdx.y, seq = blockIdx.z;
    const int head = kvh * gqa + row % gqa, iq1 = row / gqa;
    const size_t base = ((size_t) (seq * n_head_kv + kvh) * rows + row) * n_chunks;
    float Mx = -INFINITY;
    for (int c = 0; c < n_chunks; c++) Mx = fmaxf(Mx, meta[base + c].x);
    if (sinks) Mx = fmaxf(Mx, sinks[head]);
    float * out = dst + ((size_t) (seq * n_q + iq1) * n_head + head) * D;
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        float Ssum = 0.0f, o = 0.0f;
        for (int c = 0; c < n_chunks; c++) {
            const float2 mt = meta[base + c];
            if (mt.x == -INFINITY) continue;
            const float w = __expf(mt.x - Mx);
            Ssum = fmaf(w, mt.y, Ssum);
            o = fmaf(w, part[(base + c) * D + j], o);
        }
        if (sinks) Ssum += __expf(sinks[head] - Mx);
        out[j] = Ssum > 0.0f ? o / Ssum : 0.0f;
    }
}

int sm_count() {
    static int cached[64] = {0};
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 132;
    if (cached[dev] == 0) {
        int n = 0;
        if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) n = 132;
        cached[dev] = n;
    }
    return cached[dev];
}

struct plan {
    int R, n_rowgroups, rows, gqa, chunk_len, n_chunks;
};

bool make_plan(const pkv_cuda_fattn_params * p, plan & pl) {
    if (!pkv_cuda_fattn_decode_supported(p->k_type, p->v_type, p->D)) return false;
    if (p->n_head_kv <= 0 || p->n_head % p->n_head_kv != 0 || p->n_q <= 0 || p->n_seq <= 0 || p->n_kv <= 0) return false;
    if (p->n_kv > INT32_MAX / 2) return false;
    pl.gqa  = p->n_head / p->n_head_kv;
    pl.rows = pl.gqa * p->n_q;
    pl.R    = pl.rows <= 4 ? 4 : 8;
    pl.n_rowgroups = (pl.rows + pl.R - 1) / pl.R;
    const int base = p->n_head_kv * pl.n_rowgroups * p->n_seq;
    const int want = 4 * sm_count();                   /* CTAs for about one full wave */
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

    int rc;
    switch (p->k_type) {
        case 4:  rc = fattn_launch_k4 (kp, p->v_type, p->D, pl.R, pl.n_rowgroups, p->n_seq, stream); break;
        case 3:  rc = fattn_launch_k3 (kp, p->v_type, p->D, pl.R, pl.n_rowgroups, p->n_seq, stream); break;
        case 2:  rc = fattn_launch_k2 (kp, p->v_type, p->D, pl.R, pl.n_rowgroups, p->n_seq, stream); break;
        case PKV_CUDA_KV_F16: rc = fattn_launch_k16(kp, p->v_type, p->D, pl.R, pl.n_rowgroups, p->n_seq, stream); break;
        default: rc = -1;
    }
    if (rc != 0) return rc;
    const dim3 grid((unsigned) pl.rows, (unsigned) p->n_head_kv, (unsigned) p->n_seq);
    k_fattn_combine<<<grid, p->D, 0, stream>>>(kp.part, kp.meta, p->sinks, p->dst, p->D, pl.rows, pl.gqa,
                                               p->n_head, p->n_q, p->n_head_kv, pl.n_chunks);
    return (int) cudaGetLastError();
}
