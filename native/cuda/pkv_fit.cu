/* Side-state fits on the GPU (pkv_cuda.h; when they run: pkv/ggml_fit_op.h).
 *
 * With the KV cache on a GPU, the first ubatch of an empty cache used to send
 * every layer's fit inputs to the CPU and the results back (a graph split per
 * layer, ~130 on a Llama-8B shape): squat4's depth-0 prefill ran at ~0.55x
 * kv4's and its first decode step carried the round trips (docs/speed.md).
 * These kernels compute the same fits where the data is:
 *
 *   key center   per channel, the median of the ubatch's finite values: an
 *                exact radix select (the CPU fit's nth_element result, bit for
 *                bit), one CTA per channel;
 *   SQuat U      per KV head, the top eigenpairs of the queries' Gram matrix
 *                (Lanczos with full reorthogonalisation, then a small float64
 *                Jacobi), then squat.c's semiseparable Cholesky recurrence in
 *                float64, one CTA per head. Not bit-identical to the CPU fit
 *                (which tridiagonalises in float64): U agrees to a few fp16
 *                steps (pkv-cuda-test checks it against the float64 CPU fit).
 */
#include "pkv_cuda.h"
#include "pkv_cuda.cuh"

#include <cuda_fp16.h>

using namespace pkv;

namespace {

constexpr unsigned FULL_MASK = 0xffffffffu;

/* ---------------- key center: per-channel median ---------------- */

constexpr int CF_THREADS = 256;

/* float -> uint32 with the same order (negatives reversed); -0 sorts below +0 */
static __device__ __forceinline__ uint32_t order_key(const float v) {
    const uint32_t u = __float_as_uint(v);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
static __device__ __forceinline__ float from_order_key(const uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

/* The value of rank `want` (0-based, ascending) among the finite values of
 * channel j: most significant byte first, a 256-bin histogram of the values
 * that share the prefix found so far, four passes over the column. */
static __device__ float select_rank(const float * x, const int64_t rows, const int64_t n, const int64_t j,
                                    uint32_t want, uint32_t * hist, uint32_t * state) {
    uint32_t prefix = 0, mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
        __syncthreads();
        for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
            const float v = x[r * n + j];
            if (!isfinite(v)) continue;
            const uint32_t k = order_key(v);
            if ((k & mask) == prefix) atomicAdd(&hist[(k >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            uint32_t cum = 0;
            int b = 0;
            for (; b < 255; b++) {
                if (cum + hist[b] > want) break;
                cum += hist[b];
            }
            state[0] = prefix | ((uint32_t) b << shift);
            state[1] = want - cum;
        }
        __syncthreads();
        prefix = state[0];
        want = state[1];
        mask |= 255u << shift;
        __syncthreads();                       /* state and hist are rewritten by the next pass */
    }
    return from_order_key(prefix);
}

__global__ void __launch_bounds__(CF_THREADS) k_center_fit(const float * x, const int64_t rows, const int64_t n,
                                                           float * mu) {
    __shared__ uint32_t hist[256];
    __shared__ uint32_t state[2];
    __shared__ uint32_t count;
    const int64_t j = blockIdx.x;
    if (threadIdx.x == 0) count = 0;
    __syncthreads();
    uint32_t c = 0;
    for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) c += isfinite(x[r * n + j]) ? 1u : 0u;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) c += __shfl_xor_sync(FULL_MASK, c, o);
    if ((threadIdx.x & 31) == 0) atomicAdd(&count, c);
    __syncthreads();
    const uint32_t k = count;
    float m = 0.0f;
    if (k > 0) {
        const uint32_t h = k / 2;
        m = select_rank(x, rows, n, j, h, hist, state);
        if (k % 2 == 0) {                      /* the CPU's 0.5f * (c[h] + max of the lower half) */
            m = __fmul_rn(0.5f, __fadd_rn(m, select_rank(x, rows, n, j, h - 1, hist, state)));
        }
    }
    if (threadIdx.x == 0) mu[j] = m == 0.0f ? 0.0f : m;   /* -0 as +0, as the CPU fit stores it */
}

/* ---------------- SQuat: U from the queries' Gram matrix ----------------
 *
 * Per head (one CTA): G (d x d, float in shared memory) -> K = 64 steps of
 * Lanczos with full reorthogonalisation (float64 basis Q, each step one G q
 * product and two Gram-Schmidt passes) -> the K x K projected matrix Q^T G Q,
 * diagonalised by cyclic Jacobi in float64 -> Ritz pairs (the top eigenpairs
 * of G: a decaying query spectrum converges in far fewer than 64 steps) ->
 * squat.c's semiseparable factor in float64. A full Jacobi on G took 4.5 ms
 * per Llama-8B layer (d^3 work per sweep on one SM), slower than the CPU fit. */

constexpr int SF_THREADS = 512;
constexpr int SF_K = 64;                   /* Krylov dimension (d = 64: all of it) */
constexpr int SF_MAX_RANK = 32;            /* eigenpairs a fit may keep on the GPU (default rank: 20) */
constexpr int SF_MAX_SWEEPS = 20;

static __host__ __device__ constexpr int sf_ldg(const int D) { return D + 1; }
/* shared memory: G (float, D x (D+1)), Q (double, K x (D+1)), H and its eigenvectors (double, K x (K+1) each);
 * the padded rows keep a warp's column walks free of bank conflicts */
static __host__ __device__ constexpr size_t sf_smem_bytes(const int D) {
    return (size_t) D * sf_ldg(D) * sizeof(float) + (size_t) SF_K * (D + 1) * sizeof(double) +
           2 * (size_t) SF_K * (SF_K + 1) * sizeof(double);
}

static __device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

static __device__ double block_sum(double v, double * red) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    __syncthreads();                           /* red reused between calls */
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    double s = 0.0;
    for (int w = 0; w < (int) (blockDim.x >> 5); w++) s += red[w];
    return s;
}

/* Round r (0 .. N-2) of the circle method pairs every index once: pair 0 is
 * (N-1, r), pair k the indices r+k and r-k modulo N-1; N-1 rounds: every pair once. */
template <int N>
static __device__ __forceinline__ void jacobi_pair(const int r, const int k, int & p, int & q) {
    int a, b;
    if (k == 0) {
        a = N - 1;
        b = r;
    } else {
        a = (r + k) % (N - 1);
        b = (r - k + N - 1) % (N - 1);
    }
    p = a < b ? a : b;
    q = a < b ? b : a;
}

/* f(k, i, p, q) for every pair k of round r and every index i in 0 .. N-1, spread over the CTA */
template <int N, typename F>
static __device__ __forceinline__ void each_pair_and_index(const int r, F && f) {
    for (int e = threadIdx.x; e < (N / 2) * N; e += blockDim.x) {
        int p, q;
        jacobi_pair<N>(r, e / N, p, q);
        f(e / N, e % N, p, q);
    }
}

/* (x, y) <- (c x - s y, s x + c y): one rotated pair of entries (a row of J^T A, a column of A J or V J) */
static __device__ __forceinline__ void rotate(double & x, double & y, const double c, const double s) {
    const double x0 = x, y0 = y;
    x = c * x0 - s * y0;
    y = s * x0 + c * y0;
}

/* Cyclic Jacobi on the symmetric N x N A (row stride N + 1, float64): A ends
 * diagonal (the eigenvalues), V (same layout, set to I here) holds the
 * eigenvectors in its columns. Each round rotates N/2 disjoint pairs: rows of
 * A (J^T A), then columns of A and V (A J, V J). Golub & Van Loan's sym.schur2. */
template <int N>
static __device__ void jacobi_eig(double * A, double * V, double * rot, double * red) {
    constexpr int LD = N + 1, NP = N / 2;
    for (int e = threadIdx.x; e < N * N; e += blockDim.x) V[(e / N) * LD + e % N] = (e / N == e % N) ? 1.0 : 0.0;
    __syncthreads();
    for (int sweep = 0; sweep < SF_MAX_SWEEPS; sweep++) {
        double off = 0.0, tot = 0.0;
        for (int e = threadIdx.x; e < N * N; e += blockDim.x) {
            const double v = A[(e / N) * LD + e % N];
            tot += v * v;
            if (e / N != e % N) off += v * v;
        }
        off = block_sum(off, red);
        tot = block_sum(tot, red);
        /* float64's floor for a 64 x 64 problem is ~(64 eps)^2 ~ 2e-28 of the
         * total: a tighter stop ran all SF_MAX_SWEEPS sweeps; off-diagonal mass
         * 1e-24 of the total leaves the eigenvalues at ~1e-12 relative */
        if (!(off > tot * 1e-24)) break;
        for (int r = 0; r < N - 1; r++) {
            if (threadIdx.x < NP) {
                int p, q;
                jacobi_pair<N>(r, threadIdx.x, p, q);
                const double app = A[p * LD + p], aqq = A[q * LD + q], apq = A[p * LD + q];
                double c = 1.0, sn = 0.0;
                if (apq != 0.0) {
                    const double theta = (aqq - app) / (2.0 * apq);
                    const double at = fabs(theta);
                    double t = at > 1e150 ? 0.5 / at : 1.0 / (at + sqrt(at * at + 1.0));
                    if (theta < 0.0) t = -t;
                    c = 1.0 / sqrt(t * t + 1.0);
                    sn = t * c;
                }
                rot[threadIdx.x] = c;
                rot[NP + threadIdx.x] = sn;
            }
            __syncthreads();
            each_pair_and_index<N>(r, [&](const int k, const int col, const int p, const int q) {
                rotate(A[p * LD + col], A[q * LD + col], rot[k], rot[NP + k]);       /* rows p, q: J^T A */
            });
            __syncthreads();
            each_pair_and_index<N>(r, [&](const int k, const int row, const int p, const int q) {
                rotate(A[row * LD + p], A[row * LD + q], rot[k], rot[NP + k]);       /* columns p, q: A J */
                rotate(V[row * LD + p], V[row * LD + q], rot[k], rot[NP + k]);       /* V J */
            });
            __syncthreads();
        }
    }
}

static __device__ __forceinline__ size_t packed_row(const int D, const int j) {
    return (size_t) j * D - (size_t) j * (j - 1) / 2;
}

template <int D>
static __device__ void write_identity(uint16_t * Uh) {
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        const size_t row = packed_row(D, j);
        Uh[row] = __half_as_ushort(__float2half_rn(1.0f));
        for (int i = 1; i < D - j; i++) Uh[row + i] = 0;
    }
}

template <int D>
__global__ void __launch_bounds__(SF_THREADS) k_squat_fit(const float * in, const int64_t in_rows, const size_t nb1,
        const size_t nb2, const int64_t fit_rows, const int rank, const float lambda, const int normalize,
        char * out, const size_t out_nb1) {
    constexpr int LG = sf_ldg(D);
    constexpr int K = SF_K, LH = K + 1, LQ = D + 1;
    static_assert(D >= K, "the Krylov basis has K vectors of length D");
    extern __shared__ __align__(16) unsigned char sf_smem[];
    float  * G  = (float *) sf_smem;                                  /* D x LG */
    double * Q  = (double *) (sf_smem + (size_t) D * LG * sizeof(float));   /* K x LQ: basis vector j at Q + j LQ */
    double * H  = Q + (size_t) K * LQ;                                /* K x LH: Q^T G Q */
    double * Hv = H + (size_t) K * LH;                                /* K x LH: its eigenvectors */
    __shared__ double red[SF_THREADS / 32], w[D], h[K], rot[K], lam[K], cw[SF_MAX_RANK];
    __shared__ int order[K];
    __shared__ int k_used;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const char * src = (const char *) in + (size_t) blockIdx.x * nb2;
    uint16_t * Uh = (uint16_t *) (out + (size_t) blockIdx.x * out_nb1);

    /* 1. G = the head's Gram matrix (symmetrised: the GPU matmul need not round
     *    G[i][j] and G[j][i] alike); query rows (fewer than D) are multiplied
     *    out here, non-finite values as 0 (the CPU's rows fit). */
    int finite = 1;
    for (int e = tid; e < D * D; e += SF_THREADS) {
        const int i = e / D, j = e % D;
        float a;
        if (in_rows >= D) {
            const float gij = ((const float *) (src + (size_t) i * nb1))[j];
            const float gji = ((const float *) (src + (size_t) j * nb1))[i];
            finite &= isfinite(gij) && isfinite(gji);
            a = 0.5f * (gij + gji);
        } else {
            double sacc = 0.0;
            for (int64_t r = 0; r < in_rows; r++) {
                const float * q = (const float *) (src + (size_t) r * nb1);
                const float qi = q[i], qj = q[j];
                sacc += (double) (isfinite(qi) ? qi : 0.0f) * (double) (isfinite(qj) ? qj : 0.0f);
            }
            a = (float) sacc;
        }
        G[i * LG + j] = a;
    }
    for (int e = tid; e < K * LH; e += SF_THREADS) H[e] = 0.0;
    finite = __syncthreads_and(finite);
    int rr = rank < D ? rank : D;
    if (fit_rows < rr) rr = (int) fit_rows;
    if (!finite || rr <= 0 || !(lambda > 0.0f)) {   /* the CPU's trivial cases: U = I (plain kv) */
        write_identity<D>(Uh);
        return;
    }
    double gn = 0.0;                           /* |G|_F: the breakdown threshold's scale */
    for (int e = tid; e < D * D; e += SF_THREADS) gn += (double) G[(e / D) * LG + e % D] * G[(e / D) * LG + e % D];
    gn = sqrt(block_sum(gn, red));
    if (!(gn > 0.0)) {                         /* all-zero queries: U = I */
        write_identity<D>(Uh);
        return;
    }

    /* 2. Lanczos with full reorthogonalisation from a fixed pseudo-random start */
    double s0 = 0.0;
    if (tid < D) {
        const uint32_t u = (uint32_t) tid * 2654435761u + 12345u;
        w[tid] = (double) ((u >> 8) & 0xffffu) / 65536.0 - 0.5;
        s0 = w[tid] * w[tid];
    }
    s0 = sqrt(block_sum(s0, red));
    if (tid < D) Q[tid] = w[tid] / s0;
    if (tid == 0) k_used = K;
    __syncthreads();
    for (int j = 0; j < K; j++) {
        const double * qj = Q + (size_t) j * LQ;
        /* The dot products of a step go to whole warps (a lane per 32nd entry,
         * then a butterfly): one thread per dot made each step ~D dependent
         * float64 fmas long, the bulk of a 1.6 ms fit per layer (H100). */
        for (int i = warp; i < D; i += SF_THREADS / 32) {     /* w = G q_j */
            double t = 0.0;
            for (int l = lane; l < D; l += 32) t += (double) G[i * LG + l] * qj[l];
            t = warp_sum_d(t);
            if (lane == 0) w[i] = t;
        }
        __syncthreads();
        for (int pass = 0; pass < 2; pass++) { /* w -= Q_j (Q_j^T w), twice */
            for (int a = warp; a <= j; a += SF_THREADS / 32) {
                const double * qa = Q + (size_t) a * LQ;
                double t = 0.0;
                for (int i = lane; i < D; i += 32) t += qa[i] * w[i];
                t = warp_sum_d(t);
                if (lane == 0) {
                    h[a] = t;
                    H[a * LH + j] += t;        /* column j of Q^T G Q */
                }
            }
            __syncthreads();
            if (tid < D) {                     /* four independent chains over a */
                double t0 = 0.0, t1 = 0.0, t2 = 0.0, t3 = 0.0;
                int a = 0;
                for (; a + 3 <= j; a += 4) {
                    t0 += Q[(size_t) a * LQ + tid] * h[a];
                    t1 += Q[(size_t) (a + 1) * LQ + tid] * h[a + 1];
                    t2 += Q[(size_t) (a + 2) * LQ + tid] * h[a + 2];
                    t3 += Q[(size_t) (a + 3) * LQ + tid] * h[a + 3];
                }
                for (; a <= j; a++) t0 += Q[(size_t) a * LQ + tid] * h[a];
                w[tid] -= (t0 + t1) + (t2 + t3);
            }
            __syncthreads();
        }
        if (j + 1 == K) break;
        const double beta = sqrt(block_sum(tid < D ? w[tid] * w[tid] : 0.0, red));
        if (!(beta > 1e-10 * gn)) {            /* the Krylov space is exhausted (G of low rank) */
            if (tid == 0) k_used = j + 1;
            break;
        }
        if (tid < D) Q[(size_t) (j + 1) * LQ + tid] = w[tid] / beta;
        __syncthreads();
    }
    __syncthreads();
    const int kn = k_used;
    for (int e = tid; e < K * K; e += SF_THREADS) {   /* symmetric, zero beyond the basis used */
        const int a = e / K, b = e % K;
        if (a > b) H[a * LH + b] = (a < kn && b < kn) ? H[b * LH + a] : 0.0;
        else if (a >= kn || b >= kn) H[a * LH + b] = 0.0;
    }
    __syncthreads();

    /* 3. eigenpairs of Q^T G Q; eigenvalues descending (ties: lower index) */
    jacobi_eig<K>(H, Hv, rot, red);
    if (tid < K) lam[tid] = H[tid * LH + tid];
    __syncthreads();
    if (tid < K) {
        const double li = lam[tid];
        int pos = 0;
        for (int j = 0; j < K; j++) pos += (lam[j] > li || (lam[j] == li && j < tid)) ? 1 : 0;
        order[pos] = tid;
    }
    __syncthreads();
    const double lam0 = lam[order[0]];
    if (!(isfinite(lam0) && lam0 > 0.0)) {
        write_identity<D>(Uh);
        return;
    }
    const double scale = normalize ? 1.0 / lam0 : 1.0;
    int kk = 0;                                /* squat_factor_from_eig's kept count and weights */
    while (kk < rr && kk < SF_MAX_RANK && lam[order[kk]] > lam0 * 1e-12) kk++;
    if (tid < kk) {
        double wgt = (double) lambda * lam[order[tid]] * scale;
        if (wgt > 1e8) wgt = 1e8;              /* PKV_SQUAT_MAX_WEIGHT */
        cw[tid] = wgt / (1.0 + wgt);
    }

    /* 4. Ritz vectors Y = Q S (float64, where G was), then squat_factor_lowrank:
     *    S_0 = -C; per row j: p = S y_j, d_j = 1 + y_j.p, U[j][j] = sqrt(d_j),
     *    U[j][i] = y_i.p / sqrt(d_j), S -= p p^T / d_j (S and p where H was). */
    __syncthreads();
    double * Y = (double *) G;                 /* Y[i * kk + a] */
    for (int e = tid; e < D * kk; e += SF_THREADS) {
        const int i = e / kk, a = e % kk;
        const int c = order[a];
        double t = 0.0;
        for (int b = 0; b < kn; b++) t += Q[(size_t) b * LQ + i] * Hv[b * LH + c];
        Y[e] = t;
    }
    __syncthreads();
    double * S = H;                            /* kk x kk */
    double * P = S + kk * kk;                  /* kk */
    for (int e = tid; e < kk * kk; e += SF_THREADS) S[e] = (e / kk == e % kk) ? -cw[e / kk] : 0.0;
    __syncthreads();
    bool failed = false;
    for (int j = 0; j < D; j++) {
        const double * y = Y + (size_t) j * kk;
        if (tid < kk) {
            double t = 0.0;
            for (int b = 0; b < kk; b++) t += S[tid * kk + b] * y[b];
            P[tid] = t;
        }
        __syncthreads();
        double dj = 1.0;
        for (int a = 0; a < kk; a++) dj += y[a] * P[a];
        if (!(dj > 0.0) || !isfinite(dj)) {    /* the same on every thread: a uniform exit */
            failed = true;
            break;
        }
        const double sj = sqrt(dj), isj = 1.0 / sj, idj = 1.0 / dj;
        const size_t row = packed_row(D, j);
        for (int i = j + tid; i < D; i += SF_THREADS) {
            double t = sj;
            if (i > j) {
                t = 0.0;
                const double * yi = Y + (size_t) i * kk;
                for (int a = 0; a < kk; a++) t += yi[a] * P[a];
                t *= isj;
            }
            Uh[row + (i - j)] = __half_as_ushort(__float2half_rn((float) t));
        }
        for (int e = tid; e < kk * kk; e += SF_THREADS) S[e] -= (P[e / kk] * idj) * P[e % kk];
        __syncthreads();
    }
    if (failed) {
        __syncthreads();
        write_identity<D>(Uh);
    }
}

template <int D>
int squat_fit_d(const float * in, int64_t in_rows, size_t nb1, size_t nb2, int n_head, int64_t fit_rows, int rank,
                float lambda, int normalize, void * out, size_t out_nb1, cudaStream_t stream) {
    static bool raised[PKV_MAX_DEVICES] = {};
    const size_t smem = sf_smem_bytes(D);
    if (smem > 48 * 1024) {
        const cudaError_t e = raise_smem_limit(k_squat_fit<D>, (int) smem, raised);
        if (e != cudaSuccess) return (int) e;
    }
    k_squat_fit<D><<<n_head, SF_THREADS, smem, stream>>>(in, in_rows, nb1, nb2, fit_rows, rank, lambda, normalize,
                                                         (char *) out, out_nb1);
    return (int) cudaGetLastError();
}

} // namespace

extern "C" int pkv_cuda_center_fit(const float * x, int64_t rows, int64_t n, float * mu, cudaStream_t stream) {
    if (!x || !mu || rows < 0 || n < 1 || n > 0x7fffffff) return -1;
    k_center_fit<<<(unsigned) n, CF_THREADS, 0, stream>>>(x, rows, n, mu);
    return (int) cudaGetLastError();
}

extern "C" int pkv_cuda_squat_fit_supported(int head_dim, int rank) {
    switch (head_dim) {
        case 64:
        case 128: return rank >= 0 && rank <= SF_MAX_RANK;
        default:  return 0;
    }
}

extern "C" int pkv_cuda_squat_fit(const float * in, int64_t in_rows, size_t nb1, size_t nb2, int n_head, int d,
                                  int64_t fit_rows, int rank, float lambda, int normalize, void * out,
                                  size_t out_nb1, cudaStream_t stream) {
    if (!in || !out || n_head < 1 || in_rows < 0 || in_rows > d || fit_rows < 0 ||
        !pkv_cuda_squat_fit_supported(d, rank)) {
        return -1;
    }
    switch (d) {
        case 64:  return squat_fit_d<64>(in, in_rows, nb1, nb2, n_head, fit_rows, rank, lambda, normalize, out, out_nb1, stream);
        case 128: return squat_fit_d<128>(in, in_rows, nb1, nb2, n_head, fit_rows, rank, lambda, normalize, out, out_nb1, stream);
        default:  return -1;
    }
}
