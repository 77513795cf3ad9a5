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
 *                (a cyclic Jacobi solver in float32, in shared memory), then
 *                squat.c's semiseparable Cholesky recurrence in float64, one
 *                CTA per head. Not bit-identical to the CPU fit (which
 *                tridiagonalises in float64): U agrees to a few fp16 steps
 *                (pkv-cuda-test checks it against the float64 CPU fit).
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

/* ---------------- SQuat: U from the queries' Gram matrix ---------------- */

constexpr int SF_THREADS = 512;
constexpr int SF_MAX_SWEEPS = 15;

static __host__ __device__ constexpr int sf_ld(const int D) { return D + 1; }   /* padded rows: column access without bank conflicts */
static __host__ __device__ constexpr size_t sf_smem_bytes(const int D) { return 2 * (size_t) D * sf_ld(D) * sizeof(float); }
/* the factor's float64 copies of the kept eigenvectors live where A was */
static __host__ __device__ constexpr int sf_max_rank(const int D) { return (int) (((size_t) D * sf_ld(D) * sizeof(float)) / ((size_t) D * sizeof(double))); }

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

/* Round r (0 .. D-2) of the circle method pairs every index once: pair 0 is
 * (D-1, r), pair k the indices r+k and r-k modulo D-1. D-1 rounds: every pair once. */
template <int D>
static __device__ __forceinline__ void jacobi_pair(const int r, const int k, int & p, int & q) {
    int a, b;
    if (k == 0) {
        a = D - 1;
        b = r;
    } else {
        a = (r + k) % (D - 1);
        b = (r - k + D - 1) % (D - 1);
    }
    p = a < b ? a : b;
    q = a < b ? b : a;
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
    constexpr int LD = sf_ld(D);
    constexpr int NP = D / 2;
    extern __shared__ __align__(16) unsigned char sf_smem[];
    float * A = (float *) sf_smem;             /* D x LD: the matrix being diagonalised */
    float * V = A + D * LD;                    /* D x LD: V[i * LD + k] = component i of eigenvector k */
    __shared__ float rot_c[NP], rot_s[NP];
    __shared__ double red[SF_THREADS / 32];
    __shared__ double lam[D], cw[sf_max_rank(D)];
    __shared__ int order[D];
    const int tid = threadIdx.x;
    const char * src = (const char *) in + (size_t) blockIdx.x * nb2;
    uint16_t * Uh = (uint16_t *) (out + (size_t) blockIdx.x * out_nb1);

    /* 1. A = the head's Gram matrix (symmetrised: the GPU matmul need not
     *    round G[i][j] and G[j][i] alike), V = I. Query rows (fewer than D)
     *    are multiplied out here, non-finite values as 0 (the CPU's rows fit). */
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
            double s = 0.0;
            for (int64_t r = 0; r < in_rows; r++) {
                const float * q = (const float *) (src + (size_t) r * nb1);
                const float qi = q[i], qj = q[j];
                s += (double) (isfinite(qi) ? qi : 0.0f) * (double) (isfinite(qj) ? qj : 0.0f);
            }
            a = (float) s;
        }
        A[i * LD + j] = a;
        V[i * LD + j] = i == j ? 1.0f : 0.0f;
    }
    finite = __syncthreads_and(finite);
    int rr = rank < D ? rank : D;
    if (fit_rows < rr) rr = (int) fit_rows;
    if (!finite || rr <= 0 || !(lambda > 0.0f)) {   /* the CPU's trivial cases: U = I (plain kv) */
        write_identity<D>(Uh);
        return;
    }

    /* 2. Cyclic Jacobi: each round rotates D/2 disjoint (p, q) pairs, first the
     *    rows of A (J^T A), then its columns and V's (A J, V J). Stops when the
     *    off-diagonal mass is at float32's floor for this size. */
    for (int sweep = 0; sweep < SF_MAX_SWEEPS; sweep++) {
        double off = 0.0, tot = 0.0;
        for (int e = tid; e < D * D; e += SF_THREADS) {
            const int i = e / D, j = e % D;
            const double v = A[i * LD + j];
            tot += v * v;
            if (i != j) off += v * v;
        }
        off = block_sum(off, red);
        tot = block_sum(tot, red);
        if (!(off > tot * (4.0 * D * D * 1.42e-14))) break;
        for (int r = 0; r < D - 1; r++) {
            if (tid < NP) {
                int p, q;
                jacobi_pair<D>(r, tid, p, q);
                const float app = A[p * LD + p], aqq = A[q * LD + q], apq = A[p * LD + q];
                float c = 1.0f, s = 0.0f;
                if (apq != 0.0f) {                 /* Golub & Van Loan's sym.schur2 */
                    const float theta = (aqq - app) / (2.0f * apq);
                    const float at = fabsf(theta);
                    float t = at > 1e15f ? 0.5f / at : 1.0f / (at + sqrtf(at * at + 1.0f));
                    if (theta < 0.0f) t = -t;
                    c = 1.0f / sqrtf(t * t + 1.0f);
                    s = t * c;
                }
                rot_c[tid] = c;
                rot_s[tid] = s;
            }
            __syncthreads();
            for (int e = tid; e < NP * D; e += SF_THREADS) {
                const int k = e / D, col = e % D;
                int p, q;
                jacobi_pair<D>(r, k, p, q);
                const float c = rot_c[k], s = rot_s[k];
                const float x = A[p * LD + col], y = A[q * LD + col];
                A[p * LD + col] = c * x - s * y;
                A[q * LD + col] = s * x + c * y;
            }
            __syncthreads();
            for (int e = tid; e < NP * D; e += SF_THREADS) {
                const int k = e / D, row = e % D;
                int p, q;
                jacobi_pair<D>(r, k, p, q);
                const float c = rot_c[k], s = rot_s[k];
                const float x = A[row * LD + p], y = A[row * LD + q];
                A[row * LD + p] = c * x - s * y;
                A[row * LD + q] = s * x + c * y;
                const float vx = V[row * LD + p], vy = V[row * LD + q];
                V[row * LD + p] = c * vx - s * vy;
                V[row * LD + q] = s * vx + c * vy;
            }
            __syncthreads();
        }
    }

    /* 3. Eigenvalues in descending order (ties: lower index first), the kept
     *    count and weights as squat_factor_from_eig computes them. */
    if (tid < D) lam[tid] = A[tid * LD + tid];
    __syncthreads();
    if (tid < D) {
        const double li = lam[tid];
        int pos = 0;
        for (int j = 0; j < D; j++) pos += (lam[j] > li || (lam[j] == li && j < tid)) ? 1 : 0;
        order[pos] = tid;
    }
    __syncthreads();
    const double lam0 = lam[order[0]];
    if (!(isfinite(lam0) && lam0 > 0.0)) {    /* all-zero queries: U = I */
        write_identity<D>(Uh);
        return;
    }
    const double scale = normalize ? 1.0 / lam0 : 1.0;
    int kk = 0;
    while (kk < rr && lam[order[kk]] > lam0 * 1e-12) kk++;
    if (tid < kk) {
        double w = (double) lambda * lam[order[tid]] * scale;
        if (w > 1e8) w = 1e8;                  /* PKV_SQUAT_MAX_WEIGHT */
        cw[tid] = w / (1.0 + w);
    }

    /* 4. squat_factor_lowrank: S_0 = -C; per row j: p = S y_j, d_j = 1 + y_j.p,
     *    U[j][j] = sqrt(d_j), U[j][i] = y_i.p / sqrt(d_j), S -= p p^T / d_j.
     *    Y (the kept eigenvectors, float64) goes where A was, S and p where V was. */
    double * Y = (double *) A;                 /* Y[i * kk + a] */
    for (int e = tid; e < D * kk; e += SF_THREADS) {
        const int i = e / kk, a = e % kk;
        Y[e] = (double) V[i * LD + order[a]];
    }
    __syncthreads();
    double * S = (double *) V;                 /* kk x kk */
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
        case 64:  return rank >= 0 && rank <= sf_max_rank(64);
        case 128: return rank >= 0 && rank <= sf_max_rank(128);
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
