/* The r largest eigenpairs of a real symmetric matrix (sidestate.h,
 * pkv_sym_eig_top), for SQuat's fit: it needs the top-r query directions of a
 * head_dim x head_dim Gram matrix, once per layer and KV head at the first
 * prompt, on the critical path of that prompt. Cyclic Jacobi (linalg.c) gets
 * all n pairs for ~50 n^3 flops (15 ms at n = 128); this gets r of them for
 * ~4/3 n^3 + O(n^2 r) (under 1 ms):
 *
 *   1. Householder reduction A = Q T Q^T, T tridiagonal (the reflectors are
 *      kept, Q is never formed);
 *   2. eigenvalues of T by bisection on Sturm counts (only the r largest);
 *   3. eigenvectors of T by inverse iteration, re-orthogonalised against the
 *      earlier vectors of the same cluster of close eigenvalues (as LAPACK's
 *      dstein does, so repeated eigenvalues still give an orthonormal basis);
 *   4. back to A's basis through the reflectors.
 * All in float64; residuals and orthogonality are at rounding level
 * (tests/test_sidestate_math.py compares with numpy.linalg.eigh). */
#include "pkv/sidestate.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PKV_EIG_AVX2 1
#endif

/* The two passes over one row of the trailing block (most of the fit's time,
 * AVX2 where the build has it; the row starts at any offset, so unaligned).
 *   sym_row_product: returns sum_{j<len} b[j] x[j] and adds b[j] xi to p[j]
 *     for j >= 1 (row i's entries right of the diagonal stand in for column i);
 *   rank2_row: b[j] -= xi q[j] + qi x[j]. */
static double sym_row_product(int len, const double * b, const double * x, double xi, double * p) {
    double s = b[0] * x[0];
    int j = 1;
#ifdef PKV_EIG_AVX2
    __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
    const __m256d vxi = _mm256_set1_pd(xi);
    for (; j + 8 <= len; j += 8) {
        const __m256d b0 = _mm256_loadu_pd(b + j), b1 = _mm256_loadu_pd(b + j + 4);
        acc0 = _mm256_fmadd_pd(b0, _mm256_loadu_pd(x + j), acc0);
        acc1 = _mm256_fmadd_pd(b1, _mm256_loadu_pd(x + j + 4), acc1);
        _mm256_storeu_pd(p + j,     _mm256_fmadd_pd(b0, vxi, _mm256_loadu_pd(p + j)));
        _mm256_storeu_pd(p + j + 4, _mm256_fmadd_pd(b1, vxi, _mm256_loadu_pd(p + j + 4)));
    }
    acc0 = _mm256_add_pd(acc0, acc1);
    const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(acc0), _mm256_extractf128_pd(acc0, 1));
    s += _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
#endif
    double t = 0.0;
    for (; j < len; j++) {
        t += b[j] * x[j];
        p[j] += b[j] * xi;
    }
    return s + t;
}

static void rank2_row(int len, double * b, const double * x, const double * q, double xi, double qi) {
    int j = 0;
#ifdef PKV_EIG_AVX2
    const __m256d vxi = _mm256_set1_pd(xi), vqi = _mm256_set1_pd(qi);
    for (; j + 4 <= len; j += 4) {
        __m256d v = _mm256_loadu_pd(b + j);
        v = _mm256_fnmadd_pd(vxi, _mm256_loadu_pd(q + j), v);
        v = _mm256_fnmadd_pd(vqi, _mm256_loadu_pd(x + j), v);
        _mm256_storeu_pd(b + j, v);
    }
#endif
    for (; j < len; j++) b[j] -= xi * q[j] + qi * x[j];
}

/* Householder tridiagonalisation of the symmetric n x n a (full storage in, only
 * the upper triangle kept current: the trailing block is symmetric, so its
 * product with v and its rank-2 update need one triangle, half the flops and
 * memory traffic of the full matrix). Step k maps row k's a[k, k+1..] to
 * (alpha, 0, ...): H_k = I - beta_k v_k v_k^T with v_k stored where it came
 * from, row k right of the diagonal (no later step touches row k; contiguous
 * for the back-transformation), and beta_k in beta[k]. Output: diag[n], off[n-1]. */
static void tridiagonalise(int n, double * a, double * diag, double * off, double * beta,
                           double * p) {
    for (int k = 0; k < n - 2; k++) {
        const int m = n - k - 1;                   /* length of the reflected part */
        double * x = p + n;                        /* scratch: row k right of the diagonal */
        const double * ak = a + (size_t) k * n + (k + 1);
        double scale = 0.0;
        for (int i = 0; i < m; i++) {
            x[i] = ak[i];
            scale = fmax(scale, fabs(x[i]));
        }
        diag[k] = a[(size_t) k * n + k];
        if (scale == 0.0) {                        /* already reduced */
            off[k] = 0.0;
            beta[k] = 0.0;
            continue;
        }
        double ss = 0.0;
        for (int i = 0; i < m; i++) {
            x[i] /= scale;
            ss += x[i] * x[i];
        }
        const double norm = sqrt(ss);
        const double alpha = x[0] > 0.0 ? -norm : norm;  /* no cancellation in v[0] */
        x[0] -= alpha;
        double vnorm2 = 0.0;
        for (int i = 0; i < m; i++) vnorm2 += x[i] * x[i];
        const double b = 2.0 / vnorm2;
        off[k] = alpha * scale;
        beta[k] = b;
        for (int i = 0; i < m; i++) a[(size_t) k * n + k + 1 + i] = x[i];

        /* trailing block B (rows/cols k+1.., upper triangle): B := H B H
         *   p = b B v, K = b/2 v^T p, q = p - K v, B -= v q^T + q v^T
         * B v from the upper triangle: row i gives its own entry (i, j >= i)
         * and, by symmetry, row j's entry for every j > i. */
        for (int i = 0; i < m; i++) p[i] = 0.0;
        for (int i = 0; i < m; i++) {
            const double * bi = a + (size_t) (k + 1 + i) * n + (k + 1);
            p[i] += sym_row_product(m - i, bi + i, x + i, x[i], p + i);
        }
        double vp = 0.0;
        for (int i = 0; i < m; i++) {
            p[i] *= b;
            vp += x[i] * p[i];
        }
        const double K = 0.5 * b * vp;
        for (int i = 0; i < m; i++) p[i] -= K * x[i];
        for (int i = 0; i < m; i++) {
            double * bi = a + (size_t) (k + 1 + i) * n + (k + 1);
            rank2_row(m - i, bi + i, x + i, p + i, x[i], p[i]);
        }
    }
    if (n >= 2) {
        diag[n - 2] = a[(size_t) (n - 2) * n + (n - 2)];
        off[n - 2]  = a[(size_t) (n - 2) * n + (n - 1)];
        beta[n - 2] = 0.0;
    }
    diag[n - 1] = a[(size_t) (n - 1) * n + (n - 1)];
}

/* Number of eigenvalues of T below x[g] (Sturm count of the LDL^T pivots), at
 * four points at once: four independent recurrences. */
static void count_below4(int n, const double * diag, const double * off2, const double * x, double pivmin,
                         int * c) {
    double q[4];
    for (int g = 0; g < 4; g++) {
        q[g] = diag[0] - x[g];
        if (fabs(q[g]) < pivmin) q[g] = -pivmin;
        c[g] = q[g] < 0.0;
    }
    for (int i = 1; i < n; i++) {
        for (int g = 0; g < 4; g++) {
            q[g] = diag[i] - x[g] - off2[i - 1] / q[g];
            if (fabs(q[g]) < pivmin) q[g] = -pivmin;
            c[g] += q[g] < 0.0;
        }
    }
}

/* Solve (T - lambda I) y = b in place by Gaussian elimination with partial
 * pivoting on the tridiagonal (a tiny pivot is replaced by pert: the matrix
 * is singular to working precision at an eigenvalue, which is the point of
 * inverse iteration). w: 4n scratch. */
static void tridiag_solve(int n, const double * diag, const double * off, double lambda, double pert,
                          double * y, double * w) {
    double * dd = w;            /* U's diagonal */
    double * u1 = w + n;        /* first superdiagonal */
    double * u2 = w + 2 * n;    /* second superdiagonal (fill-in from pivoting) */
    double * l  = w + 3 * n;    /* multipliers */
    char swapped[PKV_LINALG_MAX_N];
    double cur_d = diag[0] - lambda;
    double cur_u = n > 1 ? off[0] : 0.0;
    for (int i = 0; i < n - 1; i++) {
        const double sub = off[i];                 /* T[i+1][i] */
        const double nd  = diag[i + 1] - lambda;    /* T[i+1][i+1] */
        const double nu  = i + 2 < n ? off[i + 1] : 0.0;
        if (fabs(cur_d) >= fabs(sub)) {             /* no swap */
            if (cur_d == 0.0) cur_d = pert;
            const double m = sub / cur_d;
            dd[i] = cur_d; u1[i] = cur_u; u2[i] = 0.0; l[i] = m; swapped[i] = 0;
            cur_d = nd - m * cur_u;
            cur_u = nu;
        } else {                                    /* swap rows i and i+1 */
            const double m = cur_d / sub;
            dd[i] = sub; u1[i] = nd; u2[i] = nu; l[i] = m; swapped[i] = 1;
            cur_d = cur_u - m * nd;
            cur_u = -m * nu;
        }
    }
    if (cur_d == 0.0) cur_d = pert;
    dd[n - 1] = cur_d;
    /* forward: apply the row swaps and multipliers to y */
    for (int i = 0; i < n - 1; i++) {
        if (swapped[i]) {
            const double t = y[i];
            y[i] = y[i + 1];
            y[i + 1] = t - l[i] * y[i];
        } else {
            y[i + 1] -= l[i] * y[i];
        }
    }
    /* back substitution with U (three diagonals) */
    for (int i = n - 1; i >= 0; i--) {
        double s = y[i];
        if (i + 1 < n) s -= u1[i] * y[i + 1];
        if (i + 2 < n) s -= u2[i] * y[i + 2];
        y[i] = s / dd[i];
    }
}

static double dot(int n, const double * a, const double * b) {
    double s = 0.0;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static void normalise(int n, double * y) {
    double mx = 0.0;
    for (int i = 0; i < n; i++) mx = fmax(mx, fabs(y[i]));
    if (mx == 0.0) return;
    for (int i = 0; i < n; i++) y[i] /= mx;
    const double s = 1.0 / sqrt(dot(n, y, y));
    for (int i = 0; i < n; i++) y[i] *= s;
}

int pkv_sym_eig_top(int n, const double * A, int r, double * evals, double * evecs) {
    if (n < 1 || n > PKV_LINALG_MAX_N || r < 0 || r > n || !A || (r > 0 && (!evals || !evecs))) return -1;
    const size_t nn = (size_t) n * n;
    for (size_t i = 0; i < nn; i++) {
        if (!isfinite(A[i])) return -1;
    }
    if (r == 0) return 0;

    double * a    = malloc(nn * sizeof(double));
    double * ty   = malloc((size_t) n * r * sizeof(double));      /* T's eigenvectors, row k = vector k */
    double * work = malloc((size_t) 10 * n * sizeof(double));
    if (!a || !ty || !work) {
        free(a); free(ty); free(work);
        return -2;
    }
    double * diag = work, * off = work + n, * beta = work + 2 * n, * off2 = work + 3 * n;
    double * scratch = work + 4 * n;                               /* 6n */
    double anorm = 0.0;
    for (int i = 0; i < n; i++) {
        for (int j = 0; j < n; j++) {
            a[(size_t) i * n + j] = 0.5 * (A[(size_t) i * n + j] + A[(size_t) j * n + i]);
        }
    }
    tridiagonalise(n, a, diag, off, beta, scratch);

    /* Gershgorin interval of T, and the Sturm pivot floor */
    double lo = diag[0], hi = diag[0];
    for (int i = 0; i < n; i++) {
        const double rad = (i > 0 ? fabs(off[i - 1]) : 0.0) + (i < n - 1 ? fabs(off[i]) : 0.0);
        lo = fmin(lo, diag[i] - rad);
        hi = fmax(hi, diag[i] + rad);
        if (i < n - 1) off2[i] = off[i] * off[i];
    }
    anorm = fmax(fabs(lo), fabs(hi));
    const double pivmin = fmax(DBL_MIN, anorm * DBL_EPSILON * DBL_EPSILON);
    const double tol = 2.0 * DBL_EPSILON * anorm + pivmin;
    lo -= tol;
    hi += tol;

    /* eigenvalue k (descending) = the (n-1-k)-th smallest: bisect on counts.
     * Every Sturm count narrows the bracket of every wanted eigenvalue (a count
     * c at x puts eigenvalue k above x when c <= n-1-k, else below), and four
     * brackets are bisected at once: a count is a chain of dependent divisions,
     * four independent chains keep the divider busy. */
    double * blo = scratch, * bhi = scratch + n;   /* r <= n brackets (scratch: 6n) */
    for (int k = 0; k < r; k++) {
        blo[k] = lo;
        bhi[k] = hi;
    }
    for (int k0 = 0; k0 < r; k0 += 4) {
        const int kn = r - k0 < 4 ? r - k0 : 4;
        for (int it = 0; it < 200; it++) {
            double mid[4];
            int open = 0;
            for (int g = 0; g < 4; g++) {
                const int k = k0 + (g < kn ? g : kn - 1);
                const double x = blo[k], y = bhi[k];
                if (g < kn && y - x > tol + 2.0 * DBL_EPSILON * fmax(fabs(x), fabs(y))) open = 1;
                mid[g] = 0.5 * (x + y);
            }
            if (!open) break;
            int cnt[4];
            count_below4(n, diag, off2, mid, pivmin, cnt);
            for (int g = 0; g < kn; g++) {
                for (int k = k0; k < r; k++) {
                    if (cnt[g] <= n - 1 - k) {
                        if (mid[g] > blo[k]) blo[k] = mid[g];
                    } else if (mid[g] < bhi[k]) {
                        bhi[k] = mid[g];
                    }
                }
            }
        }
        for (int g = 0; g < kn; g++) evals[k0 + g] = 0.5 * (blo[k0 + g] + bhi[k0 + g]);
    }

    if (anorm == 0.0) {                               /* T = 0: any orthonormal basis */
        for (int k = 0; k < r; k++) {
            evals[k] = 0.0;
            for (int i = 0; i < n; i++) evecs[(size_t) i * r + k] = i == k ? 1.0 : 0.0;
        }
        free(a); free(ty); free(work);
        return 0;
    }

    /* inverse iteration; a cluster = consecutive eigenvalues closer than 1e-3 |T| */
    const double cluster_gap = 1e-3 * anorm;
    const double pert = fmax(DBL_EPSILON * anorm, pivmin);
    int cluster_start = 0;
    unsigned seed = 12345u;
    for (int k = 0; k < r; k++) {
        if (k > 0 && evals[k - 1] - evals[k] > cluster_gap) cluster_start = k;
        double * y = ty + (size_t) k * n;
        for (int i = 0; i < n; i++) {                 /* fixed pseudo-random start: deterministic */
            seed = seed * 1664525u + 1013904223u;
            y[i] = ((double) (seed >> 8) / (double) (1u << 24)) - 0.5;
        }
        /* a shift separated from the cluster's earlier ones so that the solves
         * do not all return the same vector */
        const double shift = evals[k] + (double) (k - cluster_start) * pert * 10.0;
        for (int it = 0; it < 5; it++) {
            normalise(n, y);
            tridiag_solve(n, diag, off, shift, pert, y, scratch);
            for (int j = cluster_start; j < k; j++) {
                const double * yj = ty + (size_t) j * n;
                const double c = dot(n, y, yj);
                for (int i = 0; i < n; i++) y[i] -= c * yj[i];
            }
        }
        normalise(n, y);
    }

    /* back to A's basis: v = H_0 H_1 ... H_{n-3} y; then the sign rule */
    for (int k = 0; k < r; k++) {
        double * y = ty + (size_t) k * n;
        for (int j = n - 3; j >= 0; j--) {
            if (beta[j] == 0.0) continue;
            const int m = n - j - 1;
            double s = 0.0;
            const double * v = a + (size_t) j * n + j + 1;   /* reflector j (tridiagonalise) */
            for (int i = 0; i < m; i++) s += v[i] * y[j + 1 + i];
            s *= beta[j];
            for (int i = 0; i < m; i++) y[j + 1 + i] -= s * v[i];
        }
        int imax = 0;
        for (int i = 1; i < n; i++) {
            if (fabs(y[i]) > fabs(y[imax])) imax = i;
        }
        const double sgn = y[imax] < 0.0 ? -1.0 : 1.0;
        for (int i = 0; i < n; i++) evecs[(size_t) i * r + k] = sgn * y[i];
    }

    free(a); free(ty); free(work);
    return 0;
}
