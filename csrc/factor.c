/* The converter's inverse Hessian factors (pg_upper_inverse): calibrate.upper_inverse_factor's
 * elementwise numpy operations in the same order, so the same bits on every CPU. Plain C: each
 * inner loop runs over independent elements (a compiler may vectorize it without changing a
 * bit: every element sees the same multiply, then the same subtraction; -ffp-contract=off). */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "pyguard.h"

int pg_upper_inverse(const float *h, int32_t n, float *u) {
    double *a = malloc(sizeof(double) * ((size_t)n * (size_t)n * 2 + (size_t)n));
    if (!a) return -1;
    double *inv = a + (size_t)n * n, *col = inv + (size_t)n * n; /* col: column j of L, contiguous */
    /* a = J h J (J the reversal), lower triangle; right-looking Cholesky in place: column j of a
     * becomes column j of L once every earlier column's outer product has been subtracted */
    for (int64_t i = 0; i < n; i++)
        for (int64_t k = 0; k <= i; k++) a[i * n + k] = h[(n - 1 - i) * n + (n - 1 - k)];
    for (int64_t j = 0; j < n; j++) {
        const double d = a[j * n + j];
        if (!(d > 0)) { /* also NaN */
            free(a);
            return 1;
        }
        const double s = sqrt(d);
        for (int64_t i = j; i < n; i++) col[i] = a[i * n + j] = a[i * n + j] / s;
        for (int64_t i = j + 1; i < n; i++) {
            const double ci = col[i];
            for (int64_t k = j + 1; k <= i; k++) a[i * n + k] = a[i * n + k] - ci * col[k];
        }
    }
    /* inv = L^-1 by forward substitution, row j final once divided, then subtracted below */
    memset(inv, 0, sizeof(double) * (size_t)n * n);
    for (int64_t j = 0; j < n; j++) inv[j * n + j] = 1.0;
    for (int64_t j = 0; j < n; j++) {
        const double d = a[j * n + j];
        for (int64_t c = 0; c <= j; c++) inv[j * n + c] = inv[j * n + c] / d;
        for (int64_t i = j + 1; i < n; i++) {
            const double l = a[i * n + j];
            for (int64_t c = 0; c <= j; c++) inv[i * n + c] = inv[i * n + c] - l * inv[j * n + c];
        }
    }
    for (int64_t i = 0; i < n; i++) /* U = J inv J, upper triangular */
        for (int64_t k = 0; k < n; k++) u[i * n + k] = (float)inv[(n - 1 - i) * n + (n - 1 - k)];
    free(a);
    return 0;
}
