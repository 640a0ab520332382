/* Internal: the per-ISA kernel table and helpers shared by the implementations. */
#ifndef PYGUARD_KERNELS_H
#define PYGUARD_KERNELS_H
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "pyguard.h"

/* One ISA's kernels. Each works on a slice so that the pool can split work by output rows;
 * a row's result must not depend on the slice it falls in (bit-identical for any threads). */
typedef struct {
    const char *name;
    /* one row x[K] -> q[K], *scale, *zp (quant.quantize_acts) */
    void (*quantize_row)(const float *x, int32_t K, uint8_t *q, float *scale, int32_t *zp);
    /* rows [m0, m1) of Y[N][M] (row stride M) from q[N][K] */
    void (*gemm_rows)(const pg_qtensor *w, int32_t m0, int32_t m1, const uint8_t *q,
                      const float *scale, const int32_t *zp, int32_t N, float *y);
    /* y[m0, m1) for one quantized row q[K] */
    void (*gemv_rows)(const pg_qtensor *w, int32_t m0, int32_t m1, const uint8_t *q,
                      float scale, int32_t zp, float *y);
    /* out[K] = row `row` of W dequantized */
    void (*dequant_row)(const pg_qtensor *w, int32_t row, float *out);
} pg_kernels;

extern const pg_kernels pg_kernels_scalar;
#if defined(__x86_64__)
extern const pg_kernels pg_kernels_avx2;
#endif
#if defined(__aarch64__)
extern const pg_kernels pg_kernels_neon, pg_kernels_neon_dotprod;
#endif

/* Run fn(ctx, i) for i in [0, n) on the pool's threads (the caller's included); returns when all are done. */
void pg_pool_run(void (*fn)(void *ctx, int32_t i), void *ctx, int32_t n);
int pg_pool_size(void);
void pg_pool_resize(int n);

/* The scale, zero point and reciprocal of a row whose values lie in [lo, hi] (lo <= 0 <= hi),
 * in the float32 operations of quant.quantize_acts; every path uses this. */
static inline void pg_quant_params(float lo, float hi, float *s, float *z, float *inv) {
    *s = (hi - lo) / 255.0f;
    if (*s == 0.0f) *s = 1.0f;
    *z = rintf(-lo / *s);
    *z = *z < 0.0f ? 0.0f : *z > 255.0f ? 255.0f : *z;
    *inv = 1.0f / *s;
}

/* One activation code: clamp(rint(x * inv) + z, 0, 255). */
static inline uint8_t pg_quant_one(float x, float inv, float z) {
    float v = rintf(x * inv) + z;
    return (uint8_t)(v < 0.0f ? 0.0f : v > 255.0f ? 255.0f : v);
}

/* IEEE half (bits) -> float, portable. */
static inline float pg_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000 | (man << 13);
    } else if (exp) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man) { /* subnormal: value = man * 2^-24, exact in float */
        float f = (float)man * (1.0f / 16777216.0f);
        memcpy(&bits, &f, 4);
        bits |= sign;
    } else {
        bits = sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#endif
