/* Internal: the per-ISA kernel table and helpers shared by the implementations. */
#ifndef PYGUARD_KERNELS_H
#define PYGUARD_KERNELS_H
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "pyguard.h"

/* The converter's float32 products (pg_sgemm, dispatch.c), one register tile per ISA: the
 * tile c[mr][nr] (rows ldc floats apart) is continued by a[mr][kc] (rows lda floats apart) times
 * bp[kc][nr] (packed: nr floats a k), every element in order of k as c = fma(a[r][k], bp[k][j], c),
 * one rounding per step. Each element's chain is the same whatever the ISA, tile shape or
 * threads, so all paths give the same bits (detmath.matmul_reference states it in numpy). */
typedef struct {
    void (*tile)(const float *a, int64_t lda, const float *bp, int32_t kc, float *c, int64_t ldc);
    int32_t mr, nr; /* nr % 4 == 0, nr <= 32, mr <= 8 */
} pg_sgemm_tile;

extern const pg_sgemm_tile pg_sgemm_scalar;
#if defined(__x86_64__)
extern const pg_sgemm_tile pg_sgemm_avx2, pg_sgemm_avx512;
#endif
#if defined(__aarch64__)
extern const pg_sgemm_tile pg_sgemm_neon;
#endif

/* One ISA's kernels. Each works on a slice so that the pool can split work by output rows;
 * a row's result must not depend on the slice it falls in (bit-identical for any threads). */
typedef struct {
    const char *name;
    /* one row x[K] -> q[K], *scale, *zp (quant.quantize_acts) */
    void (*quantize_row)(const float *x, int32_t K, uint8_t *q, float *scale, int32_t *zp);
    /* rows [m0, m1) of Y[N][M] (row stride M) from q[N][K], N > 1, or from the activations packed
     * for gemm_lanes (see there) */
    void (*gemm_rows)(const pg_qtensor *w, int32_t m0, int32_t m1, const uint8_t *q,
                      const float *scale, const int32_t *zp, int32_t N, float *y);
    /* y[m0, m1) for one quantized row q[K] */
    void (*gemv_rows)(const pg_qtensor *w, int32_t m0, int32_t m1, const uint8_t *q,
                      float scale, int32_t zp, float *y);
    /* out[K] = row `row` of W dequantized */
    void (*dequant_row)(const pg_qtensor *w, int32_t row, float *out);
    /* Attention, in three pieces per query-head row, each summing in model.attention_reference's
     * fixed order, so all paths agree bit for bit whatever the tiling (dispatch.c: pg_attention).
     * hd % 8 == 0; rows of k and v are hd floats apart. */
    /* out[t] = q . k[t] for t in [0, count) (q already scaled) */
    void (*scores)(const float *q, const float *k, int32_t count, int32_t hd, float *out);
    /* s[len] -> exp(s - max) in place; returns their sum, or NaN if a score is not finite */
    float (*softmax)(float *s, int32_t len);
    /* o[hd] = w[0] v[0] + w[1] v[1] + ... in order of t (first), or o + w[0] v[0] + ... (not first) */
    void (*weigh)(const float *w, const float *v, int32_t count, int32_t hd, int first, float *o);
    /* One token's rotary embedding in place (model.apply_rope): `heads` heads of hd floats
     * (hd even), cos and sin [hd / 2] of its position; for j < hd/2, a = x[j], b = x[j + hd/2]:
     * x[j] = a cos[j] - b sin[j], x[j + hd/2] = b cos[j] + a sin[j]. */
    void (*rope_row)(float *x, int32_t heads, int32_t hd, const float *cos, const float *sin);
    /* out[len] = silu(g) * up (pg_silu_mul, model.swiglu_reference), elementwise */
    void (*swiglu_row)(const float *g, const float *up, int32_t len, float *out);
    /* y[K] = (x r) w, r = pg_rms_scale of x's sum of squares: lane l sums x[8i + l]^2 in order
     * of i, then tree8 (model.rms_norm). K % 8 == 0. */
    void (*rms_row)(const float *x, const float *w, int32_t K, float eps, float *y);
    /* The activations gemm_rows reads for N > 1 tokens: L > 0, the first N - *tail tokens
     * packed by dispatch.c's pack_task for L tokens a vector (csrc/gemm_x86.h; N - *tail
     * rounded up to L, the padding zeros), followed by the last *tail tokens' rows as they are
     * [*tail][K]; or 0, q[N][K]. NULL: always q. */
    int32_t (*gemm_lanes)(const pg_qtensor *w, int32_t N, int32_t *tail);
    /* benchmarks: iters rounds of the integer core's peak loop, returns the multiply-adds done
     * (NULL: no such figure for this path) */
    int64_t (*peak)(int64_t iters);
    const pg_sgemm_tile *sgemm;
} pg_kernels;

void pg_scores_scalar(const float *q, const float *k, int32_t count, int32_t hd, float *out);
float pg_softmax_scalar(float *s, int32_t len);
void pg_weigh_scalar(const float *w, const float *v, int32_t count, int32_t hd, int first, float *o);
void pg_rms_row_scalar(const float *x, const float *w, int32_t K, float eps, float *y);

extern const pg_kernels pg_kernels_scalar;
#if defined(__x86_64__)
extern const pg_kernels pg_kernels_avx2, pg_kernels_avxvnni, pg_kernels_avx512vnni, pg_kernels_amx;
#ifdef PG_VNNI_EMULATION /* test builds: the VNNI and AMX codes on AVX2 */
extern const pg_kernels pg_kernels_vnni_emulated, pg_kernels_avx512vnni_emulated, pg_kernels_amx_emulated;
#endif
#endif
#if defined(__aarch64__)
extern const pg_kernels pg_kernels_neon, pg_kernels_neon_dotprod, pg_kernels_neon_i8mm;
#endif

#define PG_MAX_THREADS 256

/* Run fn(ctx, i) for i in [0, n) on the pool's threads (the caller's included); returns when
 * all are done. A NULL pool runs everything on the caller. */
void pg_pool_run(pg_pool *pool, void (*fn)(void *ctx, int32_t i), void *ctx, int32_t n);

/* The scale, zero point and reciprocal of a row whose values lie in [lo, hi] (lo <= 0 <= hi),
 * in the float32 operations of quant.quantize_acts; every path uses this. */
static inline void pg_quant_params(float lo, float hi, float *s, float *z, float *inv) {
    *s = (hi - lo) / 255.0f;
    if (*s == 0.0f) *s = 1.0f;
    *z = rintf(-lo / *s);
    *z = *z >= 0.0f ? (*z <= 255.0f ? *z : 255.0f) : 0.0f;
    *inv = 1.0f / *s;
}

/* One activation code: clamp(rint(x * inv) + z, 0, 255) (a NaN would give 0: never cast). */
static inline uint8_t pg_quant_one(float x, float inv, float z) {
    float v = rintf(x * inv) + z;
    return (uint8_t)(v >= 0.0f ? (v <= 255.0f ? v : 255.0f) : 0.0f);
}

/* A row holding NaN or +-inf quantizes to q = 0, zp = 0, scale = NaN: every product it enters
 * is NaN, which the engine reports, rather than a confident answer computed from garbage.
 * Returns 1 if the row was such a row (lo, hi: its min and max with 0; nan: a NaN was seen). */
static inline int pg_nonfinite_row(float lo, float hi, int nan, int32_t K, uint8_t *q, float *scale, int32_t *zp) {
    if (!nan && isfinite(lo) && isfinite(hi)) return 0;
    memset(q, 0, (size_t)K);
    *scale = NAN;
    *zp = 0;
    return 1;
}

/* exp(x) for x <= 0 in plain float32 multiplies and adds (Cephes' expf polynomial), so that
 * the SIMD versions, written with the same operations, give the same bits (no FMA: built with
 * -ffp-contract=off). x is clamped to >= -87, where exp is ~1.6e-38: attention weights that
 * small are zero for every purpose. */
#define PG_EXP_MIN -87.0f
#define PG_LOG2E 1.44269504088896341f
#define PG_LN2_HI 0.693359375f
#define PG_LN2_LO -2.12194440e-4f
#define PG_EXP_P0 1.9875691500e-4f
#define PG_EXP_P1 1.3981999507e-3f
#define PG_EXP_P2 8.3334519073e-3f
#define PG_EXP_P3 4.1665795894e-2f
#define PG_EXP_P4 1.6666665459e-1f
#define PG_EXP_P5 5.0000001201e-1f
static inline float pg_exp_neg(float x) {
    x = x > PG_EXP_MIN ? x : PG_EXP_MIN;
    float n = rintf(x * PG_LOG2E);
    float r = x - n * PG_LN2_HI;
    r = r - n * PG_LN2_LO;
    float p = PG_EXP_P0;
    p = p * r + PG_EXP_P1;
    p = p * r + PG_EXP_P2;
    p = p * r + PG_EXP_P3;
    p = p * r + PG_EXP_P4;
    p = p * r + PG_EXP_P5;
    float y = p * (r * r);
    y = y + r;
    y = y + 1.0f;
    uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, 4);
    return y * two_n;
}

/* Rotary pair j of one head x (half = hd / 2): the scalar statement of rope_row, and the
 * SIMD paths' tail. */
static inline void pg_rope_pair(float *x, int32_t half, int32_t j, float c, float s) {
    const float a = x[j], b = x[j + half];
    x[j] = a * c - b * s;
    x[j + half] = b * c + a * s;
}

/* silu(g) * up without overflow (model.swiglu_reference): e = exp(-|g|), silu(g) = g / (1 + e)
 * for g >= 0, g e / (1 + e) for g < 0 (a NaN g fails the test and gives NaN). The SIMD paths
 * use these float32 operations in this order, and use this for their tails. */
static inline float pg_silu_mul(float g, float up) {
    const float e = pg_exp_neg(-fabsf(g));
    return (g >= 0.0f ? g : g * e) / (1.0f + e) * up;
}

/* RMSNorm's factor from the sum of squares ss of a row of K: 1 / sqrt(ss / K + eps), in
 * model.rms_norm's float32 operations (sqrtf and division are correctly rounded, like numpy's). */
static inline float pg_rms_scale(float ss, int32_t K, float eps) {
    float r = ss / (float)K;
    r = r + eps;
    r = sqrtf(r);
    return 1.0f / r;
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
