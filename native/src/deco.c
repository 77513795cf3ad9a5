/* DecoQuant side state (sidestate.h): the g x g group transform fitted on the
 * prompt's own K or V rows. Conventions and regularisation are documented in
 * the header; this file only implements them. */
#include "pkv/sidestate.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static void set_identity(int g, float * S, float * Sinv) {
    for (int i = 0; i < g; i++) {
        for (int j = 0; j < g; j++) {
            S[i * g + j] = Sinv[i * g + j] = i == j ? 1.0f : 0.0f;
        }
    }
}

static int valid_group(int g) {
    return g == 16 || g == 32 || g == 64 || g == 128;
}

/* Gram matrix G = M^T M of all groups, upper triangle only (mirrored later).
 * Non-finite values count as 0 (header: a stray NaN must not poison the fit). */
static void accumulate_gram(const float * x, int64_t n_rows, int64_t row_stride, int64_t row_len,
                            int g, double * G, double * v) {
    for (int64_t r = 0; r < n_rows; r++) {
        const float * row = x + r * row_stride;
        for (int64_t off = 0; off < row_len; off += g) {
            for (int i = 0; i < g; i++) {
                const float f = row[off + i];
                v[i] = isfinite(f) ? (double) f : 0.0;
            }
            for (int i = 0; i < g; i++) {
                const double vi = v[i];
                if (vi == 0.0) continue;   /* sparse/zero groups are common in tests */
                double * gi = G + (size_t) i * g;
                for (int j = i; j < g; j++) gi[j] += vi * v[j];
            }
        }
    }
    for (int i = 0; i < g; i++) {
        for (int j = 0; j < i; j++) G[(size_t) i * g + j] = G[(size_t) j * g + i];
    }
}

/* From the group Gram matrix (g x g, float64, symmetric) of n_groups groups. */
static int fit_from_gram(double * G, int64_t n_groups, int g, int variant, float * S, float * Sinv) {
    const size_t gg = (size_t) g * g;
    double * V    = malloc(gg * sizeof(double));
    double * lam  = malloc((size_t) g * sizeof(double));
    double * work = malloc((size_t) g * sizeof(double));
    if (!V || !lam || !work) {
        free(V); free(lam); free(work);
        set_identity(g, S, Sinv);
        return -2;
    }
    int rc = 0;
    /* Fit on the per-group mean G / n_groups: same eigenvectors, and its
     * eigenvalues are the variances the WHITEN scale needs. */
    int identity = n_groups <= 0;
    for (size_t i = 0; i < gg && !identity; i++) {
        if (!isfinite(G[i])) identity = 1;    /* a Gram from non-finite rows: skip the transform */
    }
    if (!identity) {
        for (size_t i = 0; i < gg; i++) G[i] /= (double) n_groups;
        const int erc = pkv_sym_eig(g, G, lam, V);
        if (erc == -2 || erc == -3) rc = erc;   /* out of memory / no convergence */
        identity = erc != 0 || !isfinite(lam[0]) || !(lam[0] > 0.0);
    }
    if (!identity && variant == PKV_DECO_WHITEN) {
        /* float32 must hold S (entries <= rms) and Sinv (entries <= 100/rms) */
        const double rms = sqrt(lam[0]);
        identity = rms < 1e-28 || rms > 1e28;
    }

    if (identity) {
        set_identity(g, S, Sinv);
    } else if (variant == PKV_DECO_ROTATE) {
        /* S = V^T, Sinv = V */
        for (int i = 0; i < g; i++) {
            for (int j = 0; j < g; j++) {
                S[i * g + j]    = (float) V[(size_t) j * g + i];
                Sinv[i * g + j] = (float) V[(size_t) i * g + j];
            }
        }
    } else {
        /* s_i = sqrt(max(mu_i, floor * mu_max)), mu = lambda(G)/n_groups:
         * S = diag(s) V^T, Sinv = V diag(1/s) */
        const double floor_mu = PKV_DECO_EIG_FLOOR * lam[0];
        for (int i = 0; i < g; i++) {
            const double mu = lam[i] > floor_mu ? lam[i] : floor_mu;
            work[i] = sqrt(mu);
        }
        for (int i = 0; i < g; i++) {
            for (int j = 0; j < g; j++) {
                S[i * g + j]    = (float) (work[i] * V[(size_t) j * g + i]);
                Sinv[i * g + j] = (float) (V[(size_t) i * g + j] / work[j]);
            }
        }
    }
    free(V); free(lam); free(work);
    return rc;
}

int pkv_deco_fit(const float * x, int64_t n_rows, int64_t row_stride, int64_t row_len,
                 int g, int variant, float * S, float * Sinv) {
    if (!S || !Sinv || !valid_group(g)) return -1;
    if (n_rows < 0 || row_len < 1 || row_len % g != 0 || row_stride < row_len ||
        (variant != PKV_DECO_WHITEN && variant != PKV_DECO_ROTATE) || (!x && n_rows > 0)) {
        set_identity(g, S, Sinv);
        return -1;
    }
    const size_t gg = (size_t) g * g;
    double * G    = calloc(gg, sizeof(double));
    double * work = malloc((size_t) g * sizeof(double));
    if (!G || !work) {
        free(G); free(work);
        set_identity(g, S, Sinv);
        return -2;
    }
    accumulate_gram(x, n_rows, row_stride, row_len, g, G, work);
    const int rc = fit_from_gram(G, n_rows * (row_len / g), g, variant, S, Sinv);
    free(G); free(work);
    return rc;
}

int pkv_deco_fit_gram(const float * G, int64_t n_groups, int g, int variant, float * S, float * Sinv) {
    if (!S || !Sinv || !valid_group(g)) return -1;
    if (n_groups < 0 || !G || (variant != PKV_DECO_WHITEN && variant != PKV_DECO_ROTATE)) {
        set_identity(g, S, Sinv);
        return -1;
    }
    const size_t gg = (size_t) g * g;
    double * Gd = malloc(gg * sizeof(double));
    if (!Gd) {
        set_identity(g, S, Sinv);
        return -2;
    }
    for (int i = 0; i < g; i++) {
        for (int j = 0; j < g; j++) {
            Gd[(size_t) i * g + j] = 0.5 * ((double) G[(size_t) i * g + j] + (double) G[(size_t) j * g + i]);
        }
    }
    const int rc = fit_from_gram(Gd, n_groups, g, variant, S, Sinv);
    free(Gd);
    return rc;
}
