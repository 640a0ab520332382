/* Portable scalar kernels: the C statement of pyguard/formats/quant.py and of model.py's
 * attention_reference, apply_rope, swiglu_reference and rms_norm, and the fallback path. */
#include <math.h>
#include "kernels.h"

/* x[K] float32 -> q[K] uint8 with per-row scale and zero point; any K >= 1. */
static void quantize_row(const float *x, int32_t K, uint8_t *q, float *scale, int32_t *zp) {
    float lo = 0.0f, hi = 0.0f;
    int nan = 0;
    for (int32_t k = 0; k < K; k++) {
        lo = x[k] < lo ? x[k] : lo;
        hi = x[k] > hi ? x[k] : hi;
        nan |= x[k] != x[k];
    }
    if (pg_nonfinite_row(lo, hi, nan, K, q, scale, zp)) return;
    float s, z, inv;
    pg_quant_params(lo, hi, &s, &z, &inv);
    for (int32_t k = 0; k < K; k++) q[k] = pg_quant_one(x[k], inv, z);
    *scale = s;
    *zp = (int32_t)z;
}

/* Weight k of a packed row (values -8..7): byte (k / 64) * 32 + k % 32, low nibble for the
 * first 32 columns of the 64-column block, high nibble for the second. */
static inline int32_t weight(const uint8_t *row, int32_t k) {
    uint8_t b = row[(k / 64) * 32 + k % 32];
    return (int32_t)((k % 64 < 32 ? b & 0x0F : b >> 4)) - 8;
}

/* One output: s * (sum_g d_g * dot_g - zp * rowsum), groups summed in order. */
static float dot_row(const pg_qtensor *w, int32_t row, const uint8_t *q, float scale, int32_t zp) {
    const uint8_t *qs = w->qs + (int64_t)row * (w->K / 2);
    const uint16_t *d = w->scales + (int64_t)row * (w->K / w->G);
    float acc = 0.0f;
    for (int32_t g = 0; g < w->K / w->G; g++) {
        int32_t isum = 0;
        for (int32_t k = g * w->G; k < (g + 1) * w->G; k++) isum += (int32_t)q[k] * weight(qs, k);
        acc += pg_f16_to_f32(d[g]) * (float)isum;
    }
    return scale * (acc - (float)zp * w->rowsum[row]);
}

static void gemm_rows(const pg_qtensor *w, int32_t m0, int32_t m1, const uint8_t *q,
                      const float *scale, const int32_t *zp, int32_t N, float *y) {
    for (int32_t m = m0; m < m1; m++)
        for (int32_t n = 0; n < N; n++)
            y[(int64_t)n * w->M + m] = dot_row(w, m, q + (int64_t)n * w->K, scale[n], zp[n]);
}

static void gemv_rows(const pg_qtensor *w, int32_t m0, int32_t m1, const uint8_t *q, float scale,
                      int32_t zp, float *y) {
    gemm_rows(w, m0, m1, q, &scale, &zp, 1, y);
}

static void dequant_row(const pg_qtensor *w, int32_t row, float *out) {
    const uint8_t *qs = w->qs + (int64_t)row * (w->K / 2);
    const uint16_t *d = w->scales + (int64_t)row * (w->K / w->G);
    for (int32_t k = 0; k < w->K; k++) out[k] = pg_f16_to_f32(d[k / w->G]) * (float)weight(qs, k);
}

/* Sum of 8 lanes in the fixed tree ((0+4, 1+5, 2+6, 3+7), then (0+2, 1+3), then 0+1): the
 * order of the AVX2 path's horizontal sum. */
static float tree8(const float *a) {
    float b[4];
    for (int l = 0; l < 4; l++) b[l] = a[l] + a[l + 4];
    return (b[0] + b[2]) + (b[1] + b[3]);
}

/* x . y over hd (a multiple of 8): lane l sums x[8i + l] * y[8i + l] in order of i, then tree8. */
static float dot8(const float *x, const float *y, int32_t hd) {
    float acc[8];
    for (int l = 0; l < 8; l++) acc[l] = x[l] * y[l];
    for (int32_t i = 8; i < hd; i += 8)
        for (int l = 0; l < 8; l++) acc[l] = acc[l] + x[i + l] * y[i + l];
    return tree8(acc);
}

void pg_scores_scalar(const float *q, const float *k, int32_t count, int32_t hd, float *out) {
    for (int32_t t = 0; t < count; t++) out[t] = dot8(q, k + (int64_t)t * hd, hd);
}

/* Lane l of the sum takes positions 8i + l in order of i, then tree8. */
float pg_softmax_scalar(float *s, int32_t len) {
    float m = s[0], acc[8] = {0};
    int bad = 0;
    for (int32_t j = 0; j < len; j++) {
        bad |= !isfinite(s[j]);
        m = s[j] > m ? s[j] : m;
    }
    if (bad) return NAN;
    for (int32_t j = 0; j < len; j++) {
        s[j] = pg_exp_neg(s[j] - m);
        acc[j % 8] = acc[j % 8] + s[j];
    }
    return tree8(acc);
}

void pg_weigh_scalar(const float *w, const float *v, int32_t count, int32_t hd, int first, float *o) {
    if (first)
        for (int32_t d = 0; d < hd; d++) o[d] = w[0] * v[d];
    for (int32_t t = first ? 1 : 0; t < count; t++)
        for (int32_t d = 0; d < hd; d++) o[d] = o[d] + w[t] * v[(int64_t)t * hd + d];
}

static void rope_row(float *x, int32_t heads, int32_t hd, const float *cos, const float *sin) {
    for (int32_t h = 0; h < heads; h++)
        for (int32_t j = 0; j < hd / 2; j++) pg_rope_pair(x + (int64_t)h * hd, hd / 2, j, cos[j], sin[j]);
}

static void swiglu_row(const float *g, const float *up, int32_t len, float *out) {
    for (int32_t j = 0; j < len; j++) out[j] = pg_silu_mul(g[j], up[j]);
}

void pg_rms_row_scalar(const float *x, const float *w, int32_t K, float eps, float *y) {
    float acc[8] = {0};
    for (int32_t i = 0; i < K; i += 8)
        for (int l = 0; l < 8; l++) acc[l] = acc[l] + x[i + l] * x[i + l];
    const float r = pg_rms_scale(tree8(acc), K, eps);
    for (int32_t k = 0; k < K; k++) y[k] = (x[k] * r) * w[k];
}

/* The float tile's statement (pg_sgemm_tile): fmaf rounds once, like the SIMD FMAs. 4 x 4. */
static void sgemm_tile(const float *a, int64_t lda, const float *bp, int32_t kc, float *c, int64_t ldc) {
    for (int r = 0; r < 4; r++)
        for (int j = 0; j < 4; j++) {
            float acc = c[r * ldc + j];
            for (int32_t k = 0; k < kc; k++) acc = fmaf(a[r * lda + k], bp[4 * k + j], acc);
            c[r * ldc + j] = acc;
        }
}

const pg_sgemm_tile pg_sgemm_scalar = {sgemm_tile, 4, 4};

const pg_kernels pg_kernels_scalar = {"scalar", quantize_row, gemm_rows, gemv_rows, dequant_row, pg_scores_scalar, pg_softmax_scalar, pg_weigh_scalar,
                                      rope_row, swiglu_row, pg_rms_row_scalar, NULL, NULL, &pg_sgemm_scalar};
