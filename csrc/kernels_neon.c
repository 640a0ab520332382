/* aarch64 NEON kernels: plain ASIMD (any ARMv8-A core), a dotprod variant (vdotq_s32,
 * ARMv8.2+) and an i8mm variant of the prefill GEMM (vusmmlaq_s32, Armv8.6), the latter two
 * compiled with their own target attributes so that the library itself is built for baseline
 * armv8-a and runs everywhere.
 *
 * All compute each group's integer dot product exactly, reduce it to one int32 and then do
 * the float work in the scalar path's order (acc += d * (float)dot, group after group), so
 * their results are bit-identical to kernels_scalar.c for any tiling and thread count. */
#if defined(__aarch64__)
#include <arm_neon.h>
#include <math.h>
#include "kernels.h"

#define DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))
#define UNROLL _Pragma("GCC unroll 8")

/* x[K] -> q[K], any K: the scalar path's float32 operations, four lanes at a time. */
static void quantize_row(const float *x, int32_t K, uint8_t *q, float *scale, int32_t *zp) {
    float32x4_t lo4 = vdupq_n_f32(0.0f), hi4 = vdupq_n_f32(0.0f);
    int32_t k = 0;
    for (; k + 4 <= K; k += 4) {
        float32x4_t v = vld1q_f32(x + k);
        lo4 = vminq_f32(lo4, v);
        hi4 = vmaxq_f32(hi4, v);
    }
    float lo = vminvq_f32(lo4), hi = vmaxvq_f32(hi4); /* NaN if a lane saw one (FMIN/FMAX propagate it) */
    int nan = 0;
    for (; k < K; k++) {
        lo = x[k] < lo ? x[k] : lo;
        hi = x[k] > hi ? x[k] : hi;
        nan |= x[k] != x[k];
    }
    if (pg_nonfinite_row(lo, hi, nan, K, q, scale, zp)) return;
    float s, z, inv;
    pg_quant_params(lo, hi, &s, &z, &inv);
    const float32x4_t vinv = vdupq_n_f32(inv), vz = vdupq_n_f32(z), vmax = vdupq_n_f32(255.0f), vzero = vdupq_n_f32(0.0f);
    for (k = 0; k + 8 <= K; k += 8) {
        uint32x4_t u[2];
        for (int p = 0; p < 2; p++) {
            float32x4_t v = vaddq_f32(vrndnq_f32(vmulq_f32(vld1q_f32(x + k + 4 * p), vinv)), vz);
            u[p] = vcvtq_u32_f32(vminq_f32(vmaxq_f32(v, vzero), vmax));
        }
        vst1_u8(q + k, vmovn_u16(vcombine_u16(vmovn_u32(u[0]), vmovn_u32(u[1]))));
    }
    for (; k < K; k++) q[k] = pg_quant_one(x[k], inv, z);
    *scale = s;
    *zp = (int32_t)z;
}

/* 32 weights of row `p` (packed row start) for columns c..c+31, c a multiple of 32: the low
 * nibbles of the block's 32 bytes for its first half, the high nibbles for its second. */
static inline void weights32(const uint8_t *p, int32_t c, int8x16_t w[2]) {
    const uint8_t *b = p + (c & ~63) / 2;
    uint8x16_t v0 = vld1q_u8(b), v1 = vld1q_u8(b + 16);
    if (c & 32) {
        v0 = vshrq_n_u8(v0, 4);
        v1 = vshrq_n_u8(v1, 4);
    } else {
        v0 = vandq_u8(v0, vdupq_n_u8(0x0F));
        v1 = vandq_u8(v1, vdupq_n_u8(0x0F));
    }
    w[0] = vsubq_s8(vreinterpretq_s8_u8(v0), vdupq_n_s8(8));
    w[1] = vsubq_s8(vreinterpretq_s8_u8(v1), vdupq_n_s8(8));
}

/* Plain NEON: 16 products of |u8 x s4| <= 2040 per 32 columns and lane pair fit int16; each
 * 32 columns are then added pairwise into int32. */
static inline int32x4_t dot32_neon(int32x4_t acc, const uint8_t *x, const int8x16_t w[2]) {
    int16x8_t a = vdupq_n_s16(0);
    UNROLL for (int h = 0; h < 2; h++) {
        uint8x16_t xv = vld1q_u8(x + 16 * h);
        a = vmlaq_s16(a, vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(xv))), vmovl_s8(vget_low_s8(w[h])));
        a = vmlaq_s16(a, vreinterpretq_s16_u16(vmovl_u8(vget_high_u8(xv))), vmovl_s8(vget_high_s8(w[h])));
    }
    return vpadalq_s16(acc, a);
}

/* dotprod: vdotq_s32 multiplies signed bytes, so activations enter as x - 128 (a flip of the
 * top bit) and 128 * sum(w) is added back per group (sum(w) from the same instruction). */
DOTPROD static inline int32x4_t dot32_dotprod(int32x4_t acc, const uint8_t *x, const int8x16_t w[2]) {
    UNROLL for (int h = 0; h < 2; h++) {
        int8x16_t xs = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(x + 16 * h), vdupq_n_u8(0x80)));
        acc = vdotq_s32(acc, xs, w[h]);
    }
    return acc;
}

DOTPROD static inline int32x4_t wsum32_dotprod(int32x4_t acc, const int8x16_t w[2]) {
    acc = vdotq_s32(acc, vdupq_n_s8(1), w[0]);
    return vdotq_s32(acc, vdupq_n_s8(1), w[1]);
}

/* R rows x T tokens of Y (rows m.., activation rows q[t*K], outputs y[t*M + m + r]): per group,
 * exact int32 dots, then acc += d * dot in group order, as the scalar path does. */
#define TILE(NAME, ATTR, DOTPROD_PATH)                                                              \
    ATTR static inline __attribute__((always_inline)) void NAME(                                   \
        const pg_qtensor *w, int32_t m, const uint8_t *q, const float *scale, const int32_t *zp,   \
        float *y, const int R, const int T) {                                                      \
        const int32_t K = w->K, G = w->G, ngroups = K / G;                                         \
        float acc[R][T];                                                                           \
        UNROLL for (int r = 0; r < R; r++) UNROLL for (int t = 0; t < T; t++) acc[r][t] = 0.0f;    \
        for (int32_t g = 0; g < ngroups; g++) {                                                    \
            int32x4_t dots[R][T], wsum[R];                                                         \
            UNROLL for (int r = 0; r < R; r++) {                                                   \
                wsum[r] = vdupq_n_s32(0);                                                          \
                UNROLL for (int t = 0; t < T; t++) dots[r][t] = vdupq_n_s32(0);                    \
            }                                                                                      \
            for (int32_t c = g * G; c < (g + 1) * G; c += 32) {                                    \
                UNROLL for (int r = 0; r < R; r++) {                                               \
                    int8x16_t wv[2];                                                               \
                    weights32(w->qs + (int64_t)(m + r) * (K / 2), c, wv);                          \
                    if (DOTPROD_PATH) wsum[r] = wsum32_dotprod(wsum[r], wv);                       \
                    UNROLL for (int t = 0; t < T; t++) {                                           \
                        const uint8_t *x = q + (int64_t)t * K + c;                                 \
                        dots[r][t] = DOTPROD_PATH ? dot32_dotprod(dots[r][t], x, wv)               \
                                                  : dot32_neon(dots[r][t], x, wv);                 \
                    }                                                                              \
                }                                                                                  \
            }                                                                                      \
            UNROLL for (int r = 0; r < R; r++) {                                                   \
                const float d = pg_f16_to_f32(w->scales[(int64_t)(m + r) * ngroups + g]);          \
                const int32_t fix = DOTPROD_PATH ? 128 * vaddvq_s32(wsum[r]) : 0;                  \
                UNROLL for (int t = 0; t < T; t++) acc[r][t] += d * (float)(vaddvq_s32(dots[r][t]) + fix); \
            }                                                                                      \
        }                                                                                          \
        UNROLL for (int r = 0; r < R; r++) UNROLL for (int t = 0; t < T; t++)                      \
            y[(int64_t)t * w->M + m + r] = scale[t] * (acc[r][t] - (float)zp[t] * w->rowsum[m + r]); \
    }

/* Rows [m0, m1) of Y[N][M]: row pairs outermost so their weights stay in L1 while all N
 * tokens pass (W read from memory once); gemv: four rows per step, four weight streams. */
#define ROWS(SUFFIX, ATTR, TILEFN)                                                                 \
    ATTR static void gemm_rows_##SUFFIX(const pg_qtensor *w, int32_t m0, int32_t m1, const uint8_t *q, \
                                        const float *scale, const int32_t *zp, int32_t N, float *y) { \
        const int64_t K = w->K;                                                                    \
        int32_t m = m0;                                                                            \
        for (; m + 2 <= m1; m += 2) {                                                              \
            int32_t n = 0;                                                                         \
            for (; n + 4 <= N; n += 4) TILEFN(w, m, q + n * K, scale + n, zp + n, y + n * w->M, 2, 4); \
            for (; n < N; n++) TILEFN(w, m, q + n * K, scale + n, zp + n, y + n * w->M, 2, 1);     \
        }                                                                                          \
        for (; m < m1; m++)                                                                        \
            for (int32_t n = 0; n < N; n++) TILEFN(w, m, q + n * K, scale + n, zp + n, y + n * w->M, 1, 1); \
    }                                                                                              \
    ATTR static void gemv_rows_##SUFFIX(const pg_qtensor *w, int32_t m0, int32_t m1, const uint8_t *q, \
                                        float scale, int32_t zp, float *y) {                       \
        int32_t m = m0;                                                                            \
        for (; m + 4 <= m1; m += 4) TILEFN(w, m, q, &scale, &zp, y, 4, 1);                         \
        for (; m < m1; m++) TILEFN(w, m, q, &scale, &zp, y, 1, 1);                                 \
    }

TILE(tile_neon, , 0)
TILE(tile_dotprod, DOTPROD, 1)
ROWS(neon, , tile_neon)
ROWS(dotprod, DOTPROD, tile_dotprod)

/* i8mm (Armv8.6 FEAT_I8MM), prefill GEMM only: vusmmlaq_s32 (USMMLA) multiplies a 2x8 block of
 * uint8 activations (two tokens, 8 columns each) by an 8x2 block of int8 weights (two rows, 8
 * columns each) into a 2x2 int32 block: lanes {t0.r0, t0.r1, t1.r0, t1.r1}, exact, unsigned
 * times signed as the data is (no offset fix). A tile is 8 weight rows (4 pairs) x 4 tokens (2
 * pairs): 8 int32x4 group sums and 8 float32x4 accumulators in registers. The weights of the
 * tile's rows are unpacked a span of up to I8_SPAN columns at a time into a stack buffer, rows
 * interleaved pairwise by 8 columns and the 4 pairs' 16 bytes side by side (one LD1 of 4
 * registers per 8 columns), with their scales as float32x4 {d_r0, d_r1, d_r0, d_r1}; every
 * token of a block passes over them. Activations are read from q[N][K] as they are: 16 columns
 * of each token of a pair and two ZIPs make the pair's two 2x8 blocks. Per group, in the scalar
 * order: acc = acc + d * (float)sum, lane by lane. Partial accumulators wait in y between
 * spans (exact float32). Rows past m1 and tokens past N are clamped to the last one: their
 * duplicates compute the very same bits for the same place of y. */
#define I8MM __attribute__((target("arch=armv8.2-a+dotprod+i8mm")))
#define I8_SPAN 2048 /* columns unpacked at a time: 16 KB of weights, 4 KB of scales */
#define I8_BLOCK 131072 /* bytes of activations (tokens x span) a block of tokens may read */

/* The tile's 8 rows `rows` (clamped), columns [c0, c0 + len): wb[(c - c0) / 8][p][16] holds
 * columns c..c+7 of rows[2p] then of rows[2p + 1]; db[g][p] {d_2p, d_2p+1, d_2p, d_2p+1} for
 * the span's groups g. */
I8MM static void i8_unpack(const pg_qtensor *w, const int32_t rows[8], int32_t c0, int32_t len, int8_t *wb, float *db) {
    const int32_t K = w->K, G = w->G, ngroups = K / G;
    for (int p = 0; p < 4; p++) {
        const uint8_t *ra = w->qs + (int64_t)rows[2 * p] * (K / 2) + c0 / 2, *rb = w->qs + (int64_t)rows[2 * p + 1] * (K / 2) + c0 / 2;
        int8_t *o = wb + 16 * p;
        for (int32_t c = 0; c < len; c += 64, ra += 32, rb += 32, o += 512) {
            int8x16_t va[4], vb[4];
            weights32(ra, 0, va);
            weights32(ra, 32, va + 2);
            weights32(rb, 0, vb);
            weights32(rb, 32, vb + 2);
            UNROLL for (int h = 0; h < 4; h++) { /* columns c + 16h .. c + 16h + 15 */
                const int64x2_t a = vreinterpretq_s64_s8(va[h]), b = vreinterpretq_s64_s8(vb[h]);
                vst1q_s8(o + 128 * h, vreinterpretq_s8_s64(vzip1q_s64(a, b)));
                vst1q_s8(o + 128 * h + 64, vreinterpretq_s8_s64(vzip2q_s64(a, b)));
            }
        }
        for (int32_t g = 0; g < len / G; g++) {
            const float da = pg_f16_to_f32(w->scales[(int64_t)rows[2 * p] * ngroups + c0 / G + g]);
            const float dr = pg_f16_to_f32(w->scales[(int64_t)rows[2 * p + 1] * ngroups + c0 / G + g]);
            float *d = db + (g * 4 + p) * 4;
            d[0] = da, d[1] = dr, d[2] = da, d[3] = dr;
        }
    }
}

/* The two outputs of lane pair {t.r0, t.r1} at y + t * M: adjacent rows, or a clamped one. */
static inline __attribute__((always_inline)) float32x2_t i8_load2(const float *y, int32_t r0, int32_t r1) {
    return r1 == r0 + 1 ? vld1_f32(y + r0) : vset_lane_f32(y[r1], vdup_n_f32(y[r0]), 1);
}
static inline __attribute__((always_inline)) void i8_store2(float *y, int32_t r0, int32_t r1, float32x2_t v) {
    if (r1 == r0 + 1) {
        vst1_f32(y + r0, v);
    } else { /* r1 == r0 (clamped): both lanes hold the same bits */
        vst1_lane_f32(y + r1, v, 1);
        vst1_lane_f32(y + r0, v, 0);
    }
}

/* The tile of 8 rows x T (2 or 4) tokens `tok` (clamped) over the span [c0, c0 + len). */
I8MM static inline __attribute__((always_inline)) void i8_tile(const pg_qtensor *w, const int32_t rows[8], const int32_t *tok,
                                                               const int T, int32_t c0, int32_t len, const int8_t *wb, const float *db,
                                                               const uint8_t *q, const float *scale, const int32_t *zp, float *y) {
    const int32_t K = w->K, G = w->G, M = w->M;
    const uint8_t *x[4];
    float32x4_t acc[4][2];
    UNROLL for (int t = 0; t < T; t++) x[t] = q + (int64_t)tok[t] * K + c0;
    UNROLL for (int p = 0; p < 4; p++) UNROLL for (int u = 0; u < T / 2; u++) {
        if (c0 == 0) {
            acc[p][u] = vdupq_n_f32(0.0f);
        } else {
            const float *y0 = y + (int64_t)tok[2 * u] * M, *y1 = y + (int64_t)tok[2 * u + 1] * M;
            acc[p][u] = vcombine_f32(i8_load2(y0, rows[2 * p], rows[2 * p + 1]), i8_load2(y1, rows[2 * p], rows[2 * p + 1]));
        }
    }
    for (int32_t g = 0; g < len / G; g++) {
        int32x4_t sum[4][2];
        UNROLL for (int p = 0; p < 4; p++) UNROLL for (int u = 0; u < T / 2; u++) sum[p][u] = vdupq_n_s32(0);
        const int8_t *wp = wb + (int64_t)g * G * 8;
        for (int32_t c = g * G; c < (g + 1) * G; c += 16, wp += 128) {
            uint8x16_t a[2][2];
            UNROLL for (int u = 0; u < T / 2; u++) {
                const uint64x2_t x0 = vreinterpretq_u64_u8(vld1q_u8(x[2 * u] + c)), x1 = vreinterpretq_u64_u8(vld1q_u8(x[2 * u + 1] + c));
                a[u][0] = vreinterpretq_u8_u64(vzip1q_u64(x0, x1));
                a[u][1] = vreinterpretq_u8_u64(vzip2q_u64(x0, x1));
            }
            UNROLL for (int h = 0; h < 2; h++) {
                const int8x16x4_t wv = vld1q_s8_x4(wp + 64 * h);
                UNROLL for (int p = 0; p < 4; p++) UNROLL for (int u = 0; u < T / 2; u++)
                    sum[p][u] = vusmmlaq_s32(sum[p][u], a[u][h], wv.val[p]);
            }
        }
        UNROLL for (int p = 0; p < 4; p++) {
            const float32x4_t d = vld1q_f32(db + (g * 4 + p) * 4);
            UNROLL for (int u = 0; u < T / 2; u++) acc[p][u] = vaddq_f32(acc[p][u], vmulq_f32(d, vcvtq_f32_s32(sum[p][u])));
        }
    }
    const int last = c0 + len == K;
    UNROLL for (int u = 0; u < T / 2; u++) {
        const int32_t t0 = tok[2 * u], t1 = tok[2 * u + 1];
        const float32x4_t s = vcombine_f32(vdup_n_f32(scale[t0]), vdup_n_f32(scale[t1]));
        const float32x4_t z = vcombine_f32(vdup_n_f32((float)zp[t0]), vdup_n_f32((float)zp[t1]));
        UNROLL for (int p = 0; p < 4; p++) {
            const int32_t r0 = rows[2 * p], r1 = rows[2 * p + 1];
            float32x4_t v = acc[p][u];
            if (last) {
                const float32x2_t rs = vset_lane_f32(w->rowsum[r1], vdup_n_f32(w->rowsum[r0]), 1);
                v = vmulq_f32(s, vsubq_f32(v, vmulq_f32(z, vcombine_f32(rs, rs))));
            }
            i8_store2(y + (int64_t)t0 * M, r0, r1, vget_low_f32(v));
            i8_store2(y + (int64_t)t1 * M, r0, r1, vget_high_f32(v));
        }
    }
}

I8MM static void i8_tile4(const pg_qtensor *w, const int32_t rows[8], const int32_t *tok, int32_t c0, int32_t len, const int8_t *wb,
                          const float *db, const uint8_t *q, const float *scale, const int32_t *zp, float *y) {
    i8_tile(w, rows, tok, 4, c0, len, wb, db, q, scale, zp, y);
}
I8MM static void i8_tile2(const pg_qtensor *w, const int32_t rows[8], const int32_t *tok, int32_t c0, int32_t len, const int8_t *wb,
                          const float *db, const uint8_t *q, const float *scale, const int32_t *zp, float *y) {
    i8_tile(w, rows, tok, 2, c0, len, wb, db, q, scale, zp, y);
}

/* Rows [m0, m1) of Y[N][M]: tokens in blocks whose span of activations fits I8_BLOCK bytes;
 * per block, 8 rows at a time, a span of their weights unpacked once for every token of the
 * block (W read from memory once per block). */
I8MM static void gemm_rows_i8mm(const pg_qtensor *w, int32_t m0, int32_t m1, const uint8_t *q, const float *scale,
                                const int32_t *zp, int32_t N, float *y) {
    int8_t wb[I8_SPAN * 8] __attribute__((aligned(64)));
    float db[I8_SPAN / 32 * 16] __attribute__((aligned(16)));
    const int32_t K = w->K, span = K < I8_SPAN ? K : I8_SPAN;
    int32_t block = (I8_BLOCK / span) & ~3;
    block = block > 4 ? block : 4;
    for (int32_t n0 = 0; n0 < N; n0 += block) {
        const int32_t n1 = n0 + block < N ? n0 + block : N;
        for (int32_t m = m0; m < m1; m += 8) {
            int32_t rows[8];
            for (int r = 0; r < 8; r++) rows[r] = m + r < m1 ? m + r : m1 - 1;
            for (int32_t c0 = 0; c0 < K; c0 += I8_SPAN) {
                const int32_t len = K - c0 < I8_SPAN ? K - c0 : I8_SPAN;
                i8_unpack(w, rows, c0, len, wb, db);
                int32_t n = n0;
                for (; n + 4 <= n1; n += 4) {
                    const int32_t tok[4] = {n, n + 1, n + 2, n + 3};
                    i8_tile4(w, rows, tok, c0, len, wb, db, q, scale, zp, y);
                }
                for (; n < n1; n += 2) {
                    const int32_t tok[2] = {n, n + 1 < n1 ? n + 1 : n};
                    i8_tile2(w, rows, tok, c0, len, wb, db, q, scale, zp, y);
                }
            }
        }
    }
}

/* out[K] = d * q for one row; products of a 4-bit integer and an fp16 scale are exact. */
static void dequant_row(const pg_qtensor *w, int32_t row, float *out) {
    const int32_t K = w->K, G = w->G;
    const uint8_t *p = w->qs + (int64_t)row * (K / 2);
    const uint16_t *d = w->scales + (int64_t)row * (K / G);
    for (int32_t c = 0; c < K; c += 32) {
        int8x16_t wv[2];
        weights32(p, c, wv);
        const float32x4_t s = vdupq_n_f32(pg_f16_to_f32(d[c / G]));
        for (int h = 0; h < 2; h++) {
            int16x8_t lo = vmovl_s8(vget_low_s8(wv[h])), hi = vmovl_s8(vget_high_s8(wv[h]));
            float *o = out + c + 16 * h;
            vst1q_f32(o, vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))), s));
            vst1q_f32(o + 4, vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_high_s16(lo))), s));
            vst1q_f32(o + 8, vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))), s));
            vst1q_f32(o + 12, vmulq_f32(vcvtq_f32_s32(vmovl_s16(vget_high_s16(hi))), s));
        }
    }
}

/* pg_exp_neg, 4 lanes: its operations in its order (same bits; vmulq and vaddq stay apart,
 * -ffp-contract=off). */
static inline float32x4_t exp_neg4(float32x4_t x) {
    const float32x4_t lo = vdupq_n_f32(PG_EXP_MIN);
    x = vbslq_f32(vcgtq_f32(x, lo), x, lo); /* a NaN lane becomes -87, as in pg_exp_neg */
    const float32x4_t n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(PG_LOG2E)));
    float32x4_t r = vsubq_f32(x, vmulq_f32(n, vdupq_n_f32(PG_LN2_HI)));
    r = vsubq_f32(r, vmulq_f32(n, vdupq_n_f32(PG_LN2_LO)));
    float32x4_t p = vdupq_n_f32(PG_EXP_P0);
    p = vaddq_f32(vmulq_f32(p, r), vdupq_n_f32(PG_EXP_P1));
    p = vaddq_f32(vmulq_f32(p, r), vdupq_n_f32(PG_EXP_P2));
    p = vaddq_f32(vmulq_f32(p, r), vdupq_n_f32(PG_EXP_P3));
    p = vaddq_f32(vmulq_f32(p, r), vdupq_n_f32(PG_EXP_P4));
    p = vaddq_f32(vmulq_f32(p, r), vdupq_n_f32(PG_EXP_P5));
    const float32x4_t y = vaddq_f32(vaddq_f32(vmulq_f32(p, vmulq_f32(r, r)), r), vdupq_n_f32(1.0f));
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vmulq_f32(y, vreinterpretq_f32_s32(e));
}

/* rope_row, 4 pairs at a time in the scalar pair's operations, the rest pair by pair. */
static void rope_row(float *x, int32_t heads, int32_t hd, const float *cos, const float *sin) {
    const int32_t half = hd / 2;
    for (int32_t h = 0; h < heads; h++, x += hd) {
        int32_t j = 0;
        for (; j + 4 <= half; j += 4) {
            const float32x4_t a = vld1q_f32(x + j), b = vld1q_f32(x + j + half), c = vld1q_f32(cos + j), s = vld1q_f32(sin + j);
            vst1q_f32(x + j, vsubq_f32(vmulq_f32(a, c), vmulq_f32(b, s)));
            vst1q_f32(x + j + half, vaddq_f32(vmulq_f32(b, c), vmulq_f32(a, s)));
        }
        for (; j < half; j++) pg_rope_pair(x, half, j, cos[j], sin[j]);
    }
}

/* pg_silu_mul, 4 lanes at a time (the tail one by one). */
static void swiglu_row(const float *g, const float *up, int32_t len, float *out) {
    int32_t j = 0;
    for (; j + 4 <= len; j += 4) {
        const float32x4_t gv = vld1q_f32(g + j), e = exp_neg4(vnegq_f32(vabsq_f32(gv)));
        const float32x4_t num = vbslq_f32(vcgeq_f32(gv, vdupq_n_f32(0.0f)), gv, vmulq_f32(gv, e)); /* NaN: g e */
        vst1q_f32(out + j, vmulq_f32(vdivq_f32(num, vaddq_f32(vdupq_n_f32(1.0f), e)), vld1q_f32(up + j)));
    }
    for (; j < len; j++) out[j] = pg_silu_mul(g[j], up[j]);
}

/* model.tree8 of the 8 lanes lo (0..3) and hi (4..7): (0+4, 1+5, 2+6, 3+7), (0+2, 1+3), 0+1. */
static inline float tree8(float32x4_t lo, float32x4_t hi) {
    const float32x4_t b = vaddq_f32(lo, hi);
    const float32x2_t c = vadd_f32(vget_low_f32(b), vget_high_f32(b));
    return vget_lane_f32(c, 0) + vget_lane_f32(c, 1);
}

/* q . k[t] for KEYS keys: each key's lanes l (lo) and l + 4 (hi) sum columns 8i + l in order
 * of i, then tree8 (pg_scores_scalar); the keys' sums side by side share each load of q. */
static inline __attribute__((always_inline)) void dots(const float *q, const float *k, int32_t hd, float *out, const int KEYS) {
    float32x4_t lo[4], hi[4];
    UNROLL for (int t = 0; t < KEYS; t++) {
        lo[t] = vmulq_f32(vld1q_f32(q), vld1q_f32(k + (int64_t)t * hd));
        hi[t] = vmulq_f32(vld1q_f32(q + 4), vld1q_f32(k + (int64_t)t * hd + 4));
    }
    for (int32_t i = 8; i < hd; i += 8) {
        const float32x4_t qlo = vld1q_f32(q + i), qhi = vld1q_f32(q + i + 4);
        UNROLL for (int t = 0; t < KEYS; t++) {
            lo[t] = vaddq_f32(lo[t], vmulq_f32(qlo, vld1q_f32(k + (int64_t)t * hd + i)));
            hi[t] = vaddq_f32(hi[t], vmulq_f32(qhi, vld1q_f32(k + (int64_t)t * hd + i + 4)));
        }
    }
    UNROLL for (int t = 0; t < KEYS; t++) out[t] = tree8(lo[t], hi[t]);
}

static void scores(const float *q, const float *k, int32_t count, int32_t hd, float *out) {
    int32_t t = 0;
    for (; t + 4 <= count; t += 4) dots(q, k + (int64_t)t * hd, hd, out + t, 4);
    for (; t < count; t++) dots(q, k + (int64_t)t * hd, hd, out + t, 1);
}

/* pg_softmax_scalar's result, 8 positions at a time: the sum's lanes l (lo) and l + 4 (hi)
 * take positions 8i + l, zeros past the end. */
static float softmax(float *s, int32_t len) {
    float32x4_t m4 = vdupq_n_f32(s[0]);
    uint32x4_t ok4 = vdupq_n_u32(~0u);
    int32_t j = 0;
    for (; j + 4 <= len; j += 4) { /* the max is exact in any order; x - x != 0 for inf and NaN */
        const float32x4_t v = vld1q_f32(s + j);
        m4 = vmaxq_f32(m4, v);
        ok4 = vandq_u32(ok4, vceqq_f32(vsubq_f32(v, v), vdupq_n_f32(0.0f)));
    }
    float m = vmaxvq_f32(m4);
    int bad = vminvq_u32(ok4) == 0;
    for (; j < len; j++) {
        bad |= !isfinite(s[j]);
        m = s[j] > m ? s[j] : m;
    }
    if (bad) return NAN;
    const float32x4_t mv = vdupq_n_f32(m);
    float32x4_t lo = vdupq_n_f32(0.0f), hi = vdupq_n_f32(0.0f);
    for (j = 0; j + 8 <= len; j += 8) {
        const float32x4_t e0 = exp_neg4(vsubq_f32(vld1q_f32(s + j), mv)), e1 = exp_neg4(vsubq_f32(vld1q_f32(s + j + 4), mv));
        vst1q_f32(s + j, e0);
        vst1q_f32(s + j + 4, e1);
        lo = vaddq_f32(lo, e0);
        hi = vaddq_f32(hi, e1);
    }
    if (j < len) {
        float tail[8] = {0};
        for (int32_t t = j; t < len; t++) s[t] = tail[t - j] = pg_exp_neg(s[t] - m);
        lo = vaddq_f32(lo, vld1q_f32(tail));
        hi = vaddq_f32(hi, vld1q_f32(tail + 4));
    }
    return tree8(lo, hi);
}

/* o[4 C] (+)= sum_t w[t] v[t][4 C], t in order (pg_weigh_scalar): C vectors of columns. */
static inline __attribute__((always_inline)) void weigh_cols(const float *w, const float *v, int32_t count, int32_t hd, int first,
                                                             float *o, const int C) {
    float32x4_t acc[16];
    int32_t t = 0;
    if (first) {
        UNROLL for (int c = 0; c < C; c++) acc[c] = vmulq_n_f32(vld1q_f32(v + 4 * c), w[0]);
        t = 1;
    } else {
        UNROLL for (int c = 0; c < C; c++) acc[c] = vld1q_f32(o + 4 * c);
    }
    for (; t < count; t++)
        UNROLL for (int c = 0; c < C; c++) acc[c] = vaddq_f32(acc[c], vmulq_n_f32(vld1q_f32(v + (int64_t)t * hd + 4 * c), w[t]));
    UNROLL for (int c = 0; c < C; c++) vst1q_f32(o + 4 * c, acc[c]);
}

/* 64 columns at a time (16 independent sums of the 32 registers), then 4 at a time. */
static void weigh(const float *w, const float *v, int32_t count, int32_t hd, int first, float *o) {
    int32_t d = 0;
    for (; d + 64 <= hd; d += 64) weigh_cols(w, v + d, count, hd, first, o + d, 16);
    for (; d < hd; d += 4) weigh_cols(w, v + d, count, hd, first, o + d, 1);
}

/* pg_rms_row_scalar 8 lanes at a time (lo: the scalar's acc[0..3], hi: acc[4..7]). */
static void rms_row(const float *x, const float *w, int32_t K, float eps, float *y) {
    float32x4_t lo = vdupq_n_f32(0.0f), hi = vdupq_n_f32(0.0f);
    for (int32_t k = 0; k < K; k += 8) {
        const float32x4_t a = vld1q_f32(x + k), b = vld1q_f32(x + k + 4);
        lo = vaddq_f32(lo, vmulq_f32(a, a));
        hi = vaddq_f32(hi, vmulq_f32(b, b));
    }
    const float r = pg_rms_scale(tree8(lo, hi), K, eps);
    for (int32_t k = 0; k < K; k += 4) vst1q_f32(y + k, vmulq_f32(vmulq_n_f32(vld1q_f32(x + k), r), vld1q_f32(w + k)));
}

/* The converter's float tile (pg_sgemm_tile): 8 x 8, FMLA by a broadcast element (fused). */
static void sgemm_tile_neon(const float *a, int64_t lda, const float *bp, int32_t kc, float *c, int64_t ldc) {
    float32x4_t acc[8][2];
    UNROLL for (int r = 0; r < 8; r++) UNROLL for (int v = 0; v < 2; v++) acc[r][v] = vld1q_f32(c + r * ldc + 4 * v);
    for (int32_t k = 0; k < kc; k++) {
        const float32x4_t b0 = vld1q_f32(bp + 8 * (int64_t)k), b1 = vld1q_f32(bp + 8 * (int64_t)k + 4);
        UNROLL for (int r = 0; r < 8; r++) {
            const float x = a[r * lda + k];
            acc[r][0] = vfmaq_n_f32(acc[r][0], b0, x);
            acc[r][1] = vfmaq_n_f32(acc[r][1], b1, x);
        }
    }
    UNROLL for (int r = 0; r < 8; r++) UNROLL for (int v = 0; v < 2; v++) vst1q_f32(c + r * ldc + 4 * v, acc[r][v]);
}

const pg_sgemm_tile pg_sgemm_neon = {sgemm_tile_neon, 8, 8};

const pg_kernels pg_kernels_neon = {"neon", quantize_row, gemm_rows_neon, gemv_rows_neon, dequant_row, scores, softmax, weigh, rope_row, swiglu_row, rms_row, NULL, NULL, &pg_sgemm_neon};
const pg_kernels pg_kernels_neon_dotprod = {"neon-dotprod", quantize_row, gemm_rows_dotprod, gemv_rows_dotprod, dequant_row, scores, softmax, weigh, rope_row, swiglu_row, rms_row, NULL, NULL, &pg_sgemm_neon};
/* i8mm: the prefill GEMM on USMMLA; the GEMV (one token would fill half of each 2x2 block) is
 * neon-dotprod's. */
const pg_kernels pg_kernels_neon_i8mm = {"neon-i8mm", quantize_row, gemm_rows_i8mm, gemv_rows_dotprod, dequant_row, scores, softmax, weigh, rope_row, swiglu_row, rms_row, NULL, NULL, &pg_sgemm_neon};
#endif
