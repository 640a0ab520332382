/* x86-64 AVX2+FMA+F16C kernels. Each function carries its own target attribute, so the library
 * is built for baseline x86-64 and this path is only entered when the CPU reports AVX2.
 *
 * Integer core: vpmaddubsw(u8 activations, s8 weights) gives 16 int16 lanes, each the sum of
 * two products of magnitude <= 255*8. Eight such results (256 inputs, one group at G=256) sum
 * to at most 16*2040 = 32640 < 32767, so a whole group accumulates in int16 and is widened
 * (vpmaddwd by ones) once per group rather than once per multiply. */
#if defined(__x86_64__)
#include <immintrin.h>
#include <math.h>
#include "kernels.h"

#define TARGET __attribute__((target("avx2,fma,f16c")))
#define INLINE TARGET __attribute__((always_inline)) static inline
#define UNROLL _Pragma("GCC unroll 8") /* tile loops must unroll for the tile to live in registers */

/* Sum of 8 floats in a fixed order (every output uses this same order). */
INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* x[K] -> q[K], any K: same float32 operations as the scalar path, 8 lanes at a time. */
TARGET static void quantize_row(const float *x, int32_t K, uint8_t *q, float *scale, int32_t *zp) {
    __m256 lo8 = _mm256_setzero_ps(), hi8 = _mm256_setzero_ps(), nan8 = _mm256_setzero_ps();
    int32_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 v = _mm256_loadu_ps(x + k);
        lo8 = _mm256_min_ps(v, lo8); /* returns lo8 on ties (and NaN), like the scalar compare */
        hi8 = _mm256_max_ps(v, hi8);
        nan8 = _mm256_or_ps(nan8, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    int nan = _mm256_movemask_ps(nan8) != 0;
    float lanes_lo[8], lanes_hi[8], lo = 0.0f, hi = 0.0f;
    _mm256_storeu_ps(lanes_lo, lo8);
    _mm256_storeu_ps(lanes_hi, hi8);
    for (int i = 0; i < 8; i++) {
        lo = lanes_lo[i] < lo ? lanes_lo[i] : lo;
        hi = lanes_hi[i] > hi ? lanes_hi[i] : hi;
    }
    for (int32_t j = k; j < K; j++) {
        lo = x[j] < lo ? x[j] : lo;
        hi = x[j] > hi ? x[j] : hi;
        nan |= x[j] != x[j];
    }
    if (pg_nonfinite_row(lo, hi, nan, K, q, scale, zp)) return;
    float s, z, inv;
    pg_quant_params(lo, hi, &s, &z, &inv);
    const __m256 vinv = _mm256_set1_ps(inv), vz = _mm256_set1_ps(z), vmax = _mm256_set1_ps(255.0f);
    for (k = 0; k + 32 <= K; k += 32) {
        __m256i i[4];
        for (int p = 0; p < 4; p++) {
            __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + k + 8 * p), vinv);
            v = _mm256_add_ps(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), vz);
            v = _mm256_min_ps(_mm256_max_ps(v, _mm256_setzero_ps()), vmax);
            i[p] = _mm256_cvtps_epi32(v);
        }
        /* packs interleave 128-bit lanes; the permute restores the order */
        __m256i w = _mm256_packus_epi16(_mm256_packus_epi32(i[0], i[1]), _mm256_packus_epi32(i[2], i[3]));
        w = _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(q + k), w);
    }
    for (; k < K; k++) q[k] = pg_quant_one(x[k], inv, z);
    *scale = s;
    *zp = (int32_t)z;
}

/* 32 packed bytes -> 64 signed weights: lo = columns 0..31 of the block, hi = 32..63. */
INLINE void unpack64(const uint8_t *p, __m256i *lo, __m256i *hi) {
    const __m256i mask = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8);
    __m256i v = _mm256_loadu_si256((const __m256i *)p);
    *lo = _mm256_sub_epi8(_mm256_and_si256(v, mask), eight);
    *hi = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(v, 4), mask), eight);
}

/* 32 packed bytes -> the 32 signed weights of one half of the block (hi: columns 32..63). */
INLINE __m256i unpack32(const uint8_t *p, int hi) {
    __m256i v = _mm256_loadu_si256((const __m256i *)p);
    if (hi) v = _mm256_srli_epi16(v, 4);
    return _mm256_sub_epi8(_mm256_and_si256(v, _mm256_set1_epi8(0x0F)), _mm256_set1_epi8(8));
}

/* R rows x T tokens of Y (R, T <= 4). Rows m + r*step of W (r < R), activation rows q[t*K],
 * outputs y[t*M + m + r*step]; G32: W has G == 32 (else G is a multiple of 64). R, T and G32
 * are constants at every call, so the accumulators (fixed-size arrays, fully unrolled loops)
 * live in registers.
 * Per output and group: int16 lanes over the group's 32-column chunks, widened to 8 int32
 * lanes, converted and multiplied by the group scale into 8 float lanes; lanes are summed at
 * the end. That sequence is the same for every R and T, so tiling never changes a result. */
INLINE void tile(const pg_qtensor *w, int32_t m, int32_t step, const uint8_t *q,
                 const float *scale, const int32_t *zp, float *y, const int R, const int T,
                 const int G32) {
    const int32_t K = w->K, G = G32 ? 32 : w->G, ngroups = K / G;
    const __m256i ones = _mm256_set1_epi16(1);
    const uint8_t *rows[4];
    __m256 facc[4][4];
    UNROLL for (int r = 0; r < R; r++) {
        rows[r] = w->qs + (int64_t)(m + r * step) * (K / 2);
        UNROLL for (int t = 0; t < T; t++) facc[r][t] = _mm256_setzero_ps();
    }
    for (int32_t g = 0; g < ngroups; g++) {
        __m256i acc[4][4];
        UNROLL for (int r = 0; r < R; r++)
            UNROLL for (int t = 0; t < T; t++) acc[r][t] = _mm256_setzero_si256();
        /* G >= 64: whole 64-column blocks. G == 32: one half (lo or hi nibbles) of a block. */
        for (int32_t c = g * G; c < (g + 1) * G; c += G32 ? 32 : 64) {
            UNROLL for (int r = 0; r < R; r++) {
                const uint8_t *p = rows[r] + (G32 ? c & ~63 : c) / 2;
                /* one token: the weight stream is the bottleneck, and rows are too short for
                 * the hardware prefetcher to ramp up; fetch 16 KB ahead */
                if (T == 1 && (c & 127) == 0) _mm_prefetch((const char *)(p + 16384), _MM_HINT_T0);
                if (G32) { /* only the half of the block this group covers */
                    __m256i wv = unpack32(p, c & 32);
                    UNROLL for (int t = 0; t < T; t++)
                        acc[r][t] = _mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i *)(q + (int64_t)t * K + c)), wv);
                } else {
                    __m256i wlo, whi;
                    unpack64(p, &wlo, &whi);
                    UNROLL for (int t = 0; t < T; t++) {
                        const uint8_t *x = q + (int64_t)t * K + c;
                        __m256i a = _mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i *)x), wlo);
                        __m256i b = _mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i *)(x + 32)), whi);
                        acc[r][t] = _mm256_add_epi16(acc[r][t], _mm256_add_epi16(a, b));
                    }
                }
            }
        }
        UNROLL for (int r = 0; r < R; r++) {
            const __m256 d = _mm256_set1_ps(_cvtsh_ss(w->scales[(int64_t)(m + r * step) * ngroups + g]));
            UNROLL for (int t = 0; t < T; t++) {
                __m256 v = _mm256_cvtepi32_ps(_mm256_madd_epi16(acc[r][t], ones));
                facc[r][t] = _mm256_fmadd_ps(v, d, facc[r][t]);
            }
        }
    }
    UNROLL for (int r = 0; r < R; r++)
        UNROLL for (int t = 0; t < T; t++)
            y[(int64_t)t * w->M + m + r * step] =
                scale[t] * (hsum(facc[r][t]) - (float)zp[t] * w->rowsum[m + r * step]);
}

/* Rows [m0, m1) of Y[N][M], by equal blocks of tokens whose activations (up to 128 KB) stay
 * in L2. Within a block, row pairs outermost: their weights (K bytes) stay in L1 while the
 * block's tokens pass, so W is read from memory once per block; 2x4 tiles fill the 16 ymm
 * registers. */
INLINE void gemm_rows_g(const pg_qtensor *w, int32_t m0, int32_t m1, const uint8_t *q,
                        const float *scale, const int32_t *zp, int32_t N, float *y, const int G32) {
    const int64_t K = w->K;
    const int32_t most = K >= (128 << 10) / 4 ? 4 : ((128 << 10) / K) & ~3, blocks = (N + most - 1) / most;
    const int32_t block = ((N + blocks - 1) / blocks + 3) & ~3;
    for (int32_t n0 = 0; n0 < N; n0 += block) {
        const int32_t n1 = N - n0 < block ? N : n0 + block;
        int32_t m = m0;
        for (; m + 2 <= m1; m += 2) {
            int32_t n = n0;
            for (; n + 4 <= n1; n += 4) tile(w, m, 1, q + n * K, scale + n, zp + n, y + n * w->M, 2, 4, G32);
            for (; n < n1; n++) tile(w, m, 1, q + n * K, scale + n, zp + n, y + n * w->M, 2, 1, G32);
        }
        for (; m < m1; m++) {
            int32_t n = n0;
            for (; n + 4 <= n1; n += 4) tile(w, m, 1, q + n * K, scale + n, zp + n, y + n * w->M, 1, 4, G32);
            for (; n < n1; n++) tile(w, m, 1, q + n * K, scale + n, zp + n, y + n * w->M, 1, 1, G32);
        }
    }
}

TARGET static void gemm_rows(const pg_qtensor *w, int32_t m0, int32_t m1, const uint8_t *q,
                             const float *scale, const int32_t *zp, int32_t N, float *y) {
    if (w->G == 32)
        gemm_rows_g(w, m0, m1, q, scale, zp, N, y, 1);
    else
        gemm_rows_g(w, m0, m1, q, scale, zp, N, y, 0);
}

/* y[m0, m1) for one activation row: rows m and m + h together (h = half the slice), two
 * independent sums for the core to overlap and two sequential weight streams for the hardware
 * prefetcher. One row at a time leaves the core short of work (K=2048 rows: ~15 GB/s per core
 * from cache, under the memory's share); rows side by side within a 4 KB page defeat the
 * prefetcher; two streams a slice apart read as fast as a plain streaming read. */
INLINE void gemv_rows_g(const pg_qtensor *w, int32_t m0, int32_t m1, const uint8_t *q,
                        float scale, int32_t zp, float *y, const int G32) {
    const int32_t h = (m1 - m0) / 2;
    for (int32_t m = m0; m < m0 + h; m++) tile(w, m, h, q, &scale, &zp, y, 2, 1, G32);
    if ((m1 - m0) & 1) tile(w, m1 - 1, 1, q, &scale, &zp, y, 1, 1, G32);
}

TARGET static void gemv_rows(const pg_qtensor *w, int32_t m0, int32_t m1, const uint8_t *q,
                             float scale, int32_t zp, float *y) {
    if (w->G == 32)
        gemv_rows_g(w, m0, m1, q, scale, zp, y, 1);
    else
        gemv_rows_g(w, m0, m1, q, scale, zp, y, 0);
}

/* out[K] = d * q for one row; products of a 4-bit integer and an fp16 scale are exact. */
TARGET static void dequant_row(const pg_qtensor *w, int32_t row, float *out) {
    const int32_t K = w->K, G = w->G;
    const uint16_t *d = w->scales + (int64_t)row * (K / G);
    for (int32_t b = 0; b < K; b += 64) {
        __m256i half[2];
        unpack64(w->qs + (int64_t)row * (K / 2) + b / 2, &half[0], &half[1]);
        for (int h = 0; h < 2; h++) {
            const int32_t c = b + 32 * h;
            const __m256 s = _mm256_set1_ps(_cvtsh_ss(d[c / G]));
            __m128i parts[2] = {_mm256_castsi256_si128(half[h]), _mm256_extracti128_si256(half[h], 1)};
            for (int p = 0; p < 4; p++) {
                __m128i bytes = p & 1 ? _mm_srli_si128(parts[p / 2], 8) : parts[p / 2];
                __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
                _mm256_storeu_ps(out + c + 8 * p, _mm256_mul_ps(v, s));
            }
        }
    }
}

/* exp(x), x <= 0, 8 lanes: pg_exp_neg's operations in the same order (same bits). */
INLINE __m256 exp_neg8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(PG_EXP_MIN)); /* a NaN lane becomes -87, as in pg_exp_neg */
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(PG_LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(PG_LN2_HI)));
    r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(PG_LN2_LO)));
    __m256 p = _mm256_set1_ps(PG_EXP_P0);
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(PG_EXP_P1));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(PG_EXP_P2));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(PG_EXP_P3));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(PG_EXP_P4));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(PG_EXP_P5));
    __m256 y = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(p, _mm256_mul_ps(r, r)), r), _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* KEYS dot products of one query head qh[hd] with consecutive keys k[KEYS][hd] (KEYS <= 8):
 * per key, lanes accumulate products in order of the 8-column chunk, then hsum (the scalar
 * dot8's order). Several keys at once give the core independent sums to overlap. */
INLINE void dots(const float *qh, const float *k, int32_t hd, float *out, const int KEYS) {
    __m256 acc[8];
    UNROLL for (int t = 0; t < KEYS; t++) acc[t] = _mm256_mul_ps(_mm256_loadu_ps(qh), _mm256_loadu_ps(k + (int64_t)t * hd));
    for (int32_t i = 8; i < hd; i += 8) {
        const __m256 qv = _mm256_loadu_ps(qh + i);
        UNROLL for (int t = 0; t < KEYS; t++)
            acc[t] = _mm256_add_ps(acc[t], _mm256_mul_ps(qv, _mm256_loadu_ps(k + (int64_t)t * hd + i)));
    }
    UNROLL for (int t = 0; t < KEYS; t++) out[t] = hsum(acc[t]);
}

/* o[8 C] = sum_j w[j] v[j][8 C] / total, j in order: C vectors of columns, each its own sum. */
INLINE void weighted_values(const float *w, const float *v, int32_t len, int32_t hd, float total, float *o, const int C) {
    __m256 acc[8];
    const __m256 w0 = _mm256_set1_ps(w[0]);
    UNROLL for (int c = 0; c < C; c++) acc[c] = _mm256_mul_ps(w0, _mm256_loadu_ps(v + 8 * c));
    for (int32_t j = 1; j < len; j++) {
        const __m256 wj = _mm256_set1_ps(w[j]);
        UNROLL for (int c = 0; c < C; c++) acc[c] = _mm256_add_ps(acc[c], _mm256_mul_ps(wj, _mm256_loadu_ps(v + (int64_t)j * hd + 8 * c)));
    }
    UNROLL for (int c = 0; c < C; c++) _mm256_storeu_ps(o + 8 * c, _mm256_div_ps(acc[c], _mm256_set1_ps(total)));
}

/* model.attention_reference for one query token and `group` heads, as pg_attend_scalar. */
TARGET static void attend(const float *q, const float *k, const float *v, int32_t len, int32_t group, int32_t hd,
                          float *scores, float *out) {
    for (int32_t g = 0; g < group; g++) {
        const float *qh = q + (int64_t)g * hd;
        float *o = out + (int64_t)g * hd;
        int32_t j = 0;
        for (; j + 8 <= len; j += 8) dots(qh, k + (int64_t)j * hd, hd, scores + j, 8);
        for (; j < len; j++) dots(qh, k + (int64_t)j * hd, hd, scores + j, 1);
        /* max and finiteness; the max is exact in any order */
        float m = scores[0];
        int bad = 0;
        for (j = 0; j < len; j++) {
            bad |= !isfinite(scores[j]);
            m = scores[j] > m ? scores[j] : m;
        }
        /* weights and their sum: lane l takes positions 8i + l (pad with zeros) */
        __m256 sum = _mm256_setzero_ps();
        const __m256 mv = _mm256_set1_ps(m);
        for (j = 0; j + 8 <= len; j += 8) {
            __m256 e = exp_neg8(_mm256_sub_ps(_mm256_loadu_ps(scores + j), mv));
            _mm256_storeu_ps(scores + j, e);
            sum = _mm256_add_ps(sum, e);
        }
        if (j < len) {
            float tail[8] = {0};
            for (int32_t t = j; t < len; t++) tail[t - j] = pg_exp_neg(scores[t] - m);
            memcpy(scores + j, tail, sizeof(float) * (size_t)(len - j));
            sum = _mm256_add_ps(sum, _mm256_loadu_ps(tail));
        }
        const float total = bad ? NAN : hsum(sum);
        /* fixed order of every sum: see model.attention_reference */
        /* weighted values, in order of position, 64 columns at a time (8 independent sums) */
        for (int32_t d = 0; d < hd; d += 64) {
            const int32_t chunks = hd - d < 64 ? (hd - d) / 8 : 8;
            if (chunks == 8)
                weighted_values(scores, v + d, len, hd, total, o + d, 8);
            else
                for (int32_t c = 0; c < chunks; c++) weighted_values(scores, v + d + 8 * c, len, hd, total, o + d + 8 * c, 1);
        }
    }
}

const pg_kernels pg_kernels_avx2 = {"avx2", quantize_row, gemm_rows, gemv_rows, dequant_row, attend};
#endif
