/* Small dense float64 linear algebra for the side-state fits (sidestate.h):
 * a cyclic Jacobi symmetric eigensolver and a Cholesky factorisation.
 *
 * Sizes are tiny (g <= 128 groups for DecoQuant, head_dim <= 256 for SQuat),
 * so simplicity and accuracy beat asymptotic speed: Jacobi is backward stable,
 * yields orthogonal eigenvectors even for clustered/repeated eigenvalues, and
 * needs no LAPACK. */
#include "pkv/sidestate.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Sweeps before giving up. Cyclic Jacobi converges quadratically once the
 * off-diagonal part is small; 6-10 sweeps is typical even for n = 256. */
#define PKV_JACOBI_MAX_SWEEPS 64

static int all_finite(const double * a, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(a[i])) return 0;
    }
    return 1;
}

/* One Jacobi rotation in the (p, q) plane (p < q) that zeroes a[p][q].
 * a is the full symmetric matrix (both triangles kept up to date), vt holds
 * the accumulated rotation transposed (row i = eigenvector i) so that both
 * updates below touch contiguous rows. */
static void jacobi_rotate(int n, double * a, double * vt, int p, int q) {
    const double apq = a[(size_t) p * n + q];
    const double app = a[(size_t) p * n + p];
    const double aqq = a[(size_t) q * n + q];
    /* t = tan(phi), the smaller root of t^2 + 2 theta t - 1 = 0 (|phi| <= pi/4,
     * which is what makes cyclic Jacobi converge). For huge theta, t ~ 1/(2 theta)
     * without squaring theta (no overflow). */
    const double theta = (aqq - app) / (2.0 * apq);
    double t;
    if (fabs(theta) > 1e150) {
        t = 0.5 / theta;
    } else {
        t = 1.0 / (fabs(theta) + sqrt(theta * theta + 1.0));
        if (theta < 0.0) t = -t;
    }
    const double c = 1.0 / sqrt(t * t + 1.0);
    const double s = t * c;

    double * rp = a + (size_t) p * n;
    double * rq = a + (size_t) q * n;
    for (int k = 0; k < n; k++) {
        if (k == p || k == q) continue;
        const double akp = rp[k], akq = rq[k];
        const double np_ = c * akp - s * akq;
        const double nq_ = s * akp + c * akq;
        rp[k] = np_;
        rq[k] = nq_;
        a[(size_t) k * n + p] = np_;   /* keep the matrix symmetric */
        a[(size_t) k * n + q] = nq_;
    }
    /* The 2x2 block in closed form: more accurate than rotating it, and the
     * pivot becomes exactly zero. */
    rp[p] = app - t * apq;
    rq[q] = aqq + t * apq;
    rp[q] = 0.0;
    rq[p] = 0.0;

    double * vp = vt + (size_t) p * n;
    double * vq = vt + (size_t) q * n;
    for (int k = 0; k < n; k++) {
        const double x = vp[k], y = vq[k];
        vp[k] = c * x - s * y;
        vq[k] = s * x + c * y;
    }
}

int pkv_sym_eig(int n, const double * A, double * evals, double * evecs) {
    if (n < 1 || n > PKV_LINALG_MAX_N || !A || !evals || !evecs) return -1;
    const size_t nn = (size_t) n * n;
    if (!all_finite(A, nn)) return -1;

    double * a  = malloc(nn * sizeof(double));
    double * vt = malloc(nn * sizeof(double));
    int * order = malloc((size_t) n * sizeof(int));
    if (!a || !vt || !order) {
        free(a); free(vt); free(order);
        return -2;
    }

    double fro2 = 0.0;
    for (int i = 0; i < n; i++) {
        for (int j = 0; j < n; j++) {
            const double v = 0.5 * (A[(size_t) i * n + j] + A[(size_t) j * n + i]);
            a[(size_t) i * n + j] = v;
            fro2 += v * v;
            vt[(size_t) i * n + j] = i == j ? 1.0 : 0.0;
        }
    }

    /* Stop once the off-diagonal mass is at rounding level of ||A||_F: the
     * eigenvalues then are exact to that level (Weyl). Entries below `tiny`
     * are set to zero without a rotation: all of them together perturb A by
     * at most eps * ||A||_F / sqrt(2) in Frobenius norm, the size of the
     * rounding every rotation makes anyway, and skipping them spares the last
     * sweeps most of their work (and makes the stop test reachable: a sweep
     * that only drops entries leaves off2 <= stop2 / 2). */
    const double fro = sqrt(fro2);
    const double stop2 = (DBL_EPSILON * fro) * (DBL_EPSILON * fro);
    const double tiny = DBL_EPSILON * fro / n;
    int rc = -3;
    for (int sweep = 0; sweep < PKV_JACOBI_MAX_SWEEPS; sweep++) {
        double off2 = 0.0;
        for (int p = 0; p < n; p++) {
            for (int q = p + 1; q < n; q++) {
                const double v = a[(size_t) p * n + q];
                off2 += v * v;
            }
        }
        if (off2 <= stop2 || fro == 0.0) {
            rc = 0;
            break;
        }
        for (int p = 0; p < n - 1; p++) {
            for (int q = p + 1; q < n; q++) {
                const double apq = a[(size_t) p * n + q];
                if (fabs(apq) <= tiny) {
                    a[(size_t) p * n + q] = 0.0;
                    a[(size_t) q * n + p] = 0.0;
                    continue;
                }
                jacobi_rotate(n, a, vt, p, q);
            }
        }
    }

    if (rc == 0) {
        /* Sort descending (insertion sort on indices: n is small, and a stable
         * order keeps results reproducible for repeated eigenvalues). */
        for (int i = 0; i < n; i++) order[i] = i;
        for (int i = 1; i < n; i++) {
            const int cur = order[i];
            const double key = a[(size_t) cur * n + cur];
            int j = i - 1;
            while (j >= 0 && a[(size_t) order[j] * n + order[j]] < key) {
                order[j + 1] = order[j];
                j--;
            }
            order[j + 1] = cur;
        }
        for (int j = 0; j < n; j++) {
            const int src = order[j];
            const double * v = vt + (size_t) src * n;
            /* sign convention: largest-magnitude component positive */
            int imax = 0;
            for (int i = 1; i < n; i++) {
                if (fabs(v[i]) > fabs(v[imax])) imax = i;
            }
            const double sgn = v[imax] < 0.0 ? -1.0 : 1.0;
            evals[j] = a[(size_t) src * n + src];
            for (int i = 0; i < n; i++) evecs[(size_t) i * n + j] = sgn * v[i];
        }
    }

    free(a); free(vt); free(order);
    return rc;
}

int pkv_cholesky_upper(int n, const double * A, double * U) {
    if (n < 1 || n > PKV_LINALG_MAX_N || !A || !U) return -1;
    /* Right-looking upper Cholesky (A = U^T U) in U's rows: step i finishes row
     * i, then subtracts u_i^T u_i from the trailing rows. Every entry sees the
     * same subtractions in the same order (k = 0, 1, ...) as the textbook
     * left-looking loop, but the inner loop runs along rows (contiguous) instead
     * of down columns: 8x faster at n = 256, where U no longer fits in L1.
     * Reads A's upper triangle only, so U may alias A. */
    if (U != A) {
        for (int i = 0; i < n; i++) {
            memcpy(U + (size_t) i * n + i, A + (size_t) i * n + i, (size_t) (n - i) * sizeof(double));
        }
    }
    for (int i = 0; i < n; i++) {
        double * ui = U + (size_t) i * n;
        const double s = ui[i];
        if (!(s > 0.0) || !isfinite(s)) return -4;
        const double uii = sqrt(s);
        ui[i] = uii;
        for (int j = i + 1; j < n; j++) ui[j] /= uii;
        for (int k = i + 1; k < n; k++) {
            const double uik = ui[k];
            double * uk = U + (size_t) k * n;
            for (int j = k; j < n; j++) uk[j] -= uik * ui[j];
        }
    }
    for (int i = 1; i < n; i++) memset(U + (size_t) i * n, 0, (size_t) i * sizeof(double));
    return 0;
}
