/* Portable scalar kernels: the C statement of pyguard/quant.py, and the fallback path. */
#include <math.h>
#include "kernels.h"

/* x[K] float32 -> q[K] uint8 with per-row scale and zero point; any K >= 1. */
static void quantize_row(const float *x, int32_t K, uint8_t *q, float *scale, int32_t *zp) {
    float lo = 0.0f, hi = 0.0f;
    for (int32_t k = 0; k < K; k++) {
        lo = x[k] < lo ? x[k] : lo;
        hi = x[k] > hi ? x[k] : hi;
    }
    float s, z, inv;
    pg_quant_params(lo, hi, &s, &z, &inv);
    for (int32_t k = 0; k < K; k++) q[k] = pg_quant_one(x[k], inv, z);
    *scale = s;
    *zp = (int32_t)z;
}

/* Row `row` of W unpacked to int8 wq[K] (values -8..7). */
static void unpack_row(const pg_qtensor *w, int32_t row, int8_t *wq) {
    const uint8_t *qs = w->qs + (int64_t)row * (w->K / 2);
    for (int32_t b = 0; b < w->K / 64; b++) {
        for (int32_t i = 0; i < 32; i++) {
            wq[64 * b + i] = (int8_t)((qs[32 * b + i] & 0x0F) - 8);
            wq[64 * b + 32 + i] = (int8_t)((qs[32 * b + i] >> 4) - 8);
        }
    }
}

/* One output: s * (sum_g d_g * dot_g - zp * rowsum), groups summed in order. */
static float dot_row(const pg_qtensor *w, int32_t row, const int8_t *wq, const uint8_t *q,
                     float scale, int32_t zp) {
    const uint16_t *d = w->scales + (int64_t)row * (w->K / w->G);
    float acc = 0.0f;
    for (int32_t g = 0; g < w->K / w->G; g++) {
        int32_t isum = 0;
        for (int32_t k = g * w->G; k < (g + 1) * w->G; k++) isum += (int32_t)q[k] * wq[k];
        acc += pg_f16_to_f32(d[g]) * (float)isum;
    }
    return scale * (acc - (float)zp * w->rowsum[row]);
}

static void gemm_rows(const pg_qtensor *w, int32_t m0, int32_t m1, const uint8_t *q,
                      const float *scale, const int32_t *zp, int32_t N, float *y) {
    int8_t wq[w->K];
    for (int32_t m = m0; m < m1; m++) {
        unpack_row(w, m, wq);
        for (int32_t n = 0; n < N; n++)
            y[(int64_t)n * w->M + m] = dot_row(w, m, wq, q + (int64_t)n * w->K, scale[n], zp[n]);
    }
}

static void gemv_rows(const pg_qtensor *w, int32_t m0, int32_t m1, const uint8_t *q, float scale,
                      int32_t zp, float *y) {
    gemm_rows(w, m0, m1, q, &scale, &zp, 1, y);
}

static void dequant_row(const pg_qtensor *w, int32_t row, float *out) {
    int8_t wq[w->K];
    const uint16_t *d = w->scales + (int64_t)row * (w->K / w->G);
    unpack_row(w, row, wq);
    for (int32_t k = 0; k < w->K; k++) out[k] = pg_f16_to_f32(d[k / w->G]) * (float)wq[k];
}

const pg_kernels pg_kernels_scalar = {"scalar", quantize_row, gemm_rows, gemv_rows, dequant_row};
