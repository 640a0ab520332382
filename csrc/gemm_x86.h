/* The x86 int4 GEMM and GEMV, instantiated once per instruction set by kernels_avx2.c: included
 * with NAME(x) (a suffix for every function), XTARGET / XINLINE (target attributes), and the
 * integer core, over 256-bit vectors (default) or 512-bit ones (WIDE):
 *   256-bit: MULADD(acc, x, w)          acc += the products of 32 activation bytes x and weights w
 *            MULADD2(acc, x, w, x2, w2) the same for two 32-byte chunks
 *            WIDEN(acc)                 the group's 8 int32 lane sums
 *   WIDE:    W512 (the vector type) and one operation per 512-bit instruction used: W_ZERO(),
 *            W_LOAD(p) (64 bytes), W_SPLAT8(b), W_AND, W_SUB8, W_JOIN(lo, hi) (two 256-bit
 *            halves), W_DP(acc, x, w) (vpdpbusd: int32 lane l += the products of bytes
 *            4l..4l+3), W_ADD32, W_UNPACKLO32/HI32/LO64/HI64 (per 128-bit lane), W_SHUF128(a, b,
 *            imm) (vshufi32x4), W_LO(v) / W_HI(v) (256-bit halves), W_BCAST32(p) (4 bytes to
 *            every lane), and for floats W512F with W_ZEROF(), W_LOADF(p), W_STOREF(p, v),
 *            W_CVTF (int32 -> float), W_MULF, W_ADDF, W_SPLATF(f). Natively each is that
 *            instruction; the emulated build (PG_VNNI_EMULATION) implements each on a pair of
 *            256-bit vectors, so this same code, unpacking and folds included, runs on any x86.
 *
 * The order of the arithmetic is that of every path (csrc/kernels_scalar.c, dot_row; the numpy
 * specification quant.gemm): per output, the exact int32 sum of each group's products, then in
 * float32 acc = acc + d_g * (float)sum_g, group after group (a multiply, then an add), and
 * y = s * (acc - zp * rowsum). Integer sums do not depend on how they are split, so kernels
 * are free to order the integer work; the float work is done one output per lane.
 * - GEMM of N >= LANES tokens (8 on ymm, 16 on zmm): lanes are tokens. The activations come
 *   packed by dispatch.c (pg_gemm) as [NP / LANES][K/4][LANES][4], NP = N rounded up to LANES:
 *   a vector of tokens holds, for each 4 columns in order, its LANES tokens' 4 bytes side by
 *   side (VS = K LANES bytes a vector). A row's 4 weights, broadcast, multiply LANES
 *   tokens' 4 bytes at once and accumulate per token: each lane ends a group holding that
 *   token's exact sum, with no horizontal reduction (as an AMX or i8mm tile gives per row and
 *   token).
 * - GEMV, and GEMMs of fewer tokens: lanes are columns; at each group's end the lanes of up to
 *   8 (ymm) or 16 (zmm) outputs are summed at once (a transposing reduction), and the float
 *   work is done one output per lane.
 * No include guard: included once per instruction set. */

/* 32 packed bytes -> 64 signed weights: lo = columns 0..31 of the block, hi = 32..63. */
XINLINE void NAME(unpack64)(const uint8_t *p, __m256i *lo, __m256i *hi) {
    const __m256i mask = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8);
    __m256i v = _mm256_loadu_si256((const __m256i *)p);
    *lo = _mm256_sub_epi8(_mm256_and_si256(v, mask), eight);
    *hi = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(v, 4), mask), eight);
}

/* 32 packed bytes -> the 32 signed weights of one half of the block (hi: columns 32..63). */
XINLINE __m256i NAME(unpack32)(const uint8_t *p, int hi) {
    __m256i v = _mm256_loadu_si256((const __m256i *)p);
    if (hi) v = _mm256_srli_epi16(v, 4);
    return _mm256_sub_epi8(_mm256_and_si256(v, _mm256_set1_epi8(0x0F)), _mm256_set1_epi8(8));
}

/* GEMV: 4 rows at a time (4 weight streams); more leave the float work's lanes fuller but
 * measured slower (registers for 8-16 row pointers, streams). */
#define GEMV_R 4

/* Lane j of the result: the int32 sum of all lanes of a[j] (j < n; 0 for j >= n). */
XINLINE __m256i NAME(hsum8_i32)(const __m256i *a, const int n) {
    __m256i b[4], c[2];
    UNROLL for (int i = 0; i < 4; i++) { /* per 128-bit half: a0 lanes 0+2, a1 0+2, a0 1+3, a1 1+3 */
        const __m256i x = 2 * i < n ? a[2 * i] : _mm256_setzero_si256(), y = 2 * i + 1 < n ? a[2 * i + 1] : _mm256_setzero_si256();
        b[i] = _mm256_add_epi32(_mm256_unpacklo_epi32(x, y), _mm256_unpackhi_epi32(x, y));
    }
    UNROLL for (int i = 0; i < 2; i++) /* per 128-bit half: a[4i..4i+3]'s sums over that half */
        c[i] = _mm256_add_epi32(_mm256_unpacklo_epi64(b[2 * i], b[2 * i + 1]), _mm256_unpackhi_epi64(b[2 * i], b[2 * i + 1]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(c[0], c[1], 0x20), _mm256_permute2x128_si256(c[0], c[1], 0x31));
}

#if !WIDE
/* A 64-column block's unpacked weights (wblock); acc += its products with the block's 64
 * activation bytes x (block); a 32-column half's (hi: columns 32..63) the same (half). */
typedef __m256i NAME(acc_t);
typedef struct { __m256i lo, hi; } NAME(wblock_t);
#define GROUPS_PER_STEP(G32) 1
XINLINE NAME(acc_t) NAME(zero)(void) { return _mm256_setzero_si256(); }
XINLINE NAME(wblock_t) NAME(wblock)(const uint8_t *p) {
    NAME(wblock_t) w;
    NAME(unpack64)(p, &w.lo, &w.hi);
    return w;
}
XINLINE NAME(acc_t) NAME(block)(NAME(acc_t) acc, const uint8_t *x, NAME(wblock_t) w) {
    return MULADD2(acc, _mm256_loadu_si256((const __m256i *)x), w.lo, _mm256_loadu_si256((const __m256i *)(x + 32)), w.hi);
}
XINLINE NAME(acc_t) NAME(half)(NAME(acc_t) acc, const uint8_t *x, __m256i w) {
    return MULADD(acc, _mm256_loadu_si256((const __m256i *)x), w);
}
/* sums[0][0] lane j: the group sum of output j < n (n <= 8) */
XINLINE void NAME(group_sums)(const NAME(acc_t) *acc, const int n, const int G32, __m256i sums[2][2]) {
    __m256i a[8];
    (void)G32;
    UNROLL for (int j = 0; j < n; j++) a[j] = WIDEN(acc[j]);
    sums[0][0] = NAME(hsum8_i32)(a, n);
}
#else /* one vpdpbusd per block and output: the block's two 32-column chunks side by side */
typedef W512 NAME(acc_t);
typedef W512 NAME(wblock_t);
#define GROUPS_PER_STEP(G32) ((G32) ? 2 : 1) /* G = 32: a block's two halves are two groups */
XINLINE NAME(acc_t) NAME(zero)(void) { return W_ZERO(); }
/* 32 packed bytes -> a block's 64 signed weights: columns 0..31 (low nibbles) in the lower
 * half, 32..63 in the upper, matching 64 activation bytes loaded as one vector. */
XINLINE NAME(wblock_t) NAME(wblock)(const uint8_t *p) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)p);
    return W_SUB8(W_AND(W_JOIN(v, _mm256_srli_epi16(v, 4)), W_SPLAT8(0x0F)), W_SPLAT8(8));
}
XINLINE NAME(acc_t) NAME(block)(NAME(acc_t) acc, const uint8_t *x, NAME(wblock_t) w) { return W_DP(acc, W_LOAD(x), w); }
/* Group sums of outputs j < n (n <= 16): sums[s][h] lane i is output 8h + i's sum of group s of
 * the step (G32: s = 0 for a block's columns 0..31, 1 for 32..63; else s = 0, the whole group). */
XINLINE void NAME(group_sums)(const NAME(acc_t) *acc, const int n, const int G32, __m256i sums[2][2]) {
    W512 b[8], c[4], e[2];
    UNROLL for (int i = 0; i < 8; i++) { /* per 128-bit lane: a[2i] lanes 0+2, a[2i+1] 0+2, 1+3, 1+3 */
        const W512 x = 2 * i < n ? acc[2 * i] : W_ZERO(), y = 2 * i + 1 < n ? acc[2 * i + 1] : W_ZERO();
        b[i] = W_ADD32(W_UNPACKLO32(x, y), W_UNPACKHI32(x, y));
    }
    UNROLL for (int i = 0; i < 4; i++) /* per 128-bit lane L: outputs 4i..4i+3's sums over L */
        c[i] = W_ADD32(W_UNPACKLO64(b[2 * i], b[2 * i + 1]), W_UNPACKHI64(b[2 * i], b[2 * i + 1]));
    UNROLL for (int i = 0; i < 2; i++) /* lanes L0+L1 (columns 0..31), L2+L3 (32..63) of c[2i], of c[2i+1] */
        e[i] = W_ADD32(W_SHUF128(c[2 * i], c[2 * i + 1], 0x88), W_SHUF128(c[2 * i], c[2 * i + 1], 0xDD));
    const W512 lo = W_SHUF128(e[0], e[1], 0x88), hi = W_SHUF128(e[0], e[1], 0xDD); /* outputs 0..15 */
    if (G32) {
        sums[0][0] = W_LO(lo), sums[0][1] = W_HI(lo), sums[1][0] = W_LO(hi), sums[1][1] = W_HI(hi);
    } else {
        const W512 all = W_ADD32(lo, hi);
        sums[0][0] = W_LO(all), sums[0][1] = W_HI(all);
    }
}
#endif

/* Lane j: the float scale d[r * stride] of output o0 + j of an R x T tile (output o = r T + t;
 * lanes past the tile's outputs are 0). */
XINLINE __m256 NAME(scales8)(const uint16_t *d, int64_t stride, const int o0, const int R, const int T) {
    const int r0 = o0 / T;
#define PG_SCALE(i) (r0 + (i) < R && (i) < 8 ? d[(r0 + (i)) * stride] : 0)
    const __m256 v = _mm256_cvtph_ps(_mm_setr_epi16(PG_SCALE(0), PG_SCALE(1), PG_SCALE(2), PG_SCALE(3), PG_SCALE(4),
                                                    PG_SCALE(5), PG_SCALE(6), PG_SCALE(7)));
#undef PG_SCALE
    if (T == 1) return v;
    return _mm256_permutevar8x32_ps(v, _mm256_setr_epi32((o0 + 0) / T - r0, (o0 + 1) / T - r0, (o0 + 2) / T - r0, (o0 + 3) / T - r0,
                                                         (o0 + 4) / T - r0, (o0 + 5) / T - r0, (o0 + 6) / T - r0, (o0 + 7) / T - r0));
}

/* Columns in the lanes: R rows m + r*step of W (r < R) x T tokens q[t*K] (R T <= LANES_MAX):
 * y[t*M + m + r*step]; G32: W has G == 32 (else G is a multiple of 64). R, T and G32 are
 * constants at every call, so the accumulators (fixed-size arrays, fully unrolled loops) live
 * in registers. Per group: each output's int32 sum, then the float work one output per lane
 * (output o = r T + t; the order stated at the top). The GEMV (T = 1) and the GEMM of a few
 * tokens, where the tokens cannot fill the lanes. */
XINLINE void NAME(cols_tile)(const pg_qtensor *w, int32_t m, int32_t step, const uint8_t *q, const float *scale,
                             const int32_t *zp, float *y, const int R, const int T, const int G32) {
    const int32_t K = w->K, G = G32 ? 32 : w->G, ngroups = K / G, S = GROUPS_PER_STEP(G32);
    const uint16_t *d = w->scales + (int64_t)m * ngroups;
    const int64_t dstride = (int64_t)step * ngroups;
    const uint8_t *rows[4];
    __m256 facc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}; /* outputs 0..7, 8..15 */
    UNROLL for (int r = 0; r < R; r++) rows[r] = w->qs + (int64_t)(m + r * step) * (K / 2);
    for (int32_t g = 0; g < ngroups; g += S) {
        NAME(acc_t) acc[16];
        UNROLL for (int o = 0; o < R * T; o++) acc[o] = NAME(zero)();
        /* a 32-column half of a block (G == 32 on 256-bit vectors), else whole 64-column blocks */
        const int half = G32 && S == 1;
        for (int32_t c = g * G; c < (g + S) * G; c += half ? 32 : 64) {
            UNROLL for (int r = 0; r < R; r++) {
                const uint8_t *p = rows[r] + (c & ~63) / 2;
                /* 1 to 4 tokens: the weight stream is the bottleneck, and rows are too short for
                 * the hardware prefetcher to ramp up; fetch 16 KB ahead (2-4 tokens: 25-45% less
                 * time a token on Zen 4, docs/KERNELS.md) */
                if ((c & 127) == 0) _mm_prefetch((const char *)(p + 16384), _MM_HINT_T0);
#if !WIDE
                if (half) { /* only the half of the block this group covers */
                    const __m256i wv = NAME(unpack32)(p, c & 32);
                    UNROLL for (int t = 0; t < T; t++) acc[r * T + t] = NAME(half)(acc[r * T + t], q + (int64_t)t * K + c, wv);
                    continue;
                }
#endif
                const NAME(wblock_t) wb = NAME(wblock)(p);
                UNROLL for (int t = 0; t < T; t++) acc[r * T + t] = NAME(block)(acc[r * T + t], q + (int64_t)t * K + c, wb);
            }
        }
        __m256i sums[2][2];
        NAME(group_sums)(acc, R * T, G32, sums);
        UNROLL for (int s = 0; s < S; s++)
            UNROLL for (int h = 0; h < (R * T + 7) / 8; h++)
                facc[h] = _mm256_add_ps(facc[h], _mm256_mul_ps(_mm256_cvtepi32_ps(sums[s][h]), NAME(scales8)(d + g + s, dstride, 8 * h, R, T)));
    }
    float out[16];
    _mm256_storeu_ps(out, facc[0]);
    _mm256_storeu_ps(out + 8, facc[1]);
    UNROLL for (int r = 0; r < R; r++)
        UNROLL for (int t = 0; t < T; t++)
            y[(int64_t)t * w->M + m + r * step] = scale[t] * (out[r * T + t] - (float)zp[t] * w->rowsum[m + r * step]);
}

/* ---- GEMM: LANES tokens per vector (tv_*: the vector operations of this width) */
#if !WIDE
#define LANES 8
#define TILE_R 3 /* 3 rows x 2 token vectors: 6 partial and 6 group accumulators */
/* A token block's activations, kept in L2 while the rows pass: 128 KB, an eighth to a half of
 * an AVX2 CPU's L2 (256 KB on Haswell, 512 KB on Zen 2 and 3, 1 MB on Zen 4); on Zen 3, 64 to
 * 384 KB were level within the noise (docs/KERNELS.md) */
#define BLOCK_BYTES (128 << 10)
#define TAIL_T 2 /* tail tokens a tile: 3 rows x 2 tokens, within a reduction's 8 outputs */
#define TAIL_MAX(G) 2 /* measured on Zen 4: 5-12% faster at 1 or 2, even or slower at 3 */
typedef __m256i NAME(tvi);
typedef __m256 NAME(tvf);
XINLINE NAME(tvi) NAME(tv_zero)(void) { return _mm256_setzero_si256(); }
XINLINE NAME(tvi) NAME(tv_load)(const uint8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
XINLINE NAME(tvi) NAME(tv_bcast)(const int8_t *p) { return _mm256_set1_epi32(pg_load32(p)); }
#define TV_DOT(acc, x, w) DOT4(acc, x, w)
XINLINE NAME(tvi) NAME(tv_add)(NAME(tvi) a, NAME(tvi) b) { return _mm256_add_epi32(a, b); }
XINLINE NAME(tvf) NAME(tv_zerof)(void) { return _mm256_setzero_ps(); }
XINLINE NAME(tvf) NAME(tv_loadf)(const float *p) { return _mm256_loadu_ps(p); }
XINLINE void NAME(tv_storef)(float *p, NAME(tvf) v) { _mm256_storeu_ps(p, v); }
/* facc + d * (float)sums: a multiply, then an add */
XINLINE NAME(tvf) NAME(tv_fma)(NAME(tvf) facc, NAME(tvi) sums, float d) {
    return _mm256_add_ps(facc, _mm256_mul_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(d)));
}
#else
#define LANES 16
#define TILE_R 4 /* 4 rows x 2 token vectors: 8 group accumulators */
/* a quarter of the L2 of every CPU with AVX-512 VNNI (1 MB on Zen 4 and Skylake-SP, 2 MB on
 * Sapphire Rapids); against 128 KB, 1-25% faster by shape on Zen 4 (docs/KERNELS.md) */
#define BLOCK_BYTES (256 << 10)
#define TAIL_T 4 /* 4 rows x 4 tokens: a reduction's 16 outputs */
/* measured on Zen 4: up to 6 tokens faster than a padded vector (by 3-12% at 6), up to 2 at G
 * = 32, where every 32 columns end a group and need a reduction */
#define TAIL_MAX(G) ((G) == 32 ? 2 : 6)
typedef W512 NAME(tvi);
typedef W512F NAME(tvf);
XINLINE NAME(tvi) NAME(tv_zero)(void) { return W_ZERO(); }
XINLINE NAME(tvi) NAME(tv_load)(const uint8_t *p) { return W_LOAD(p); }
XINLINE NAME(tvi) NAME(tv_bcast)(const int8_t *p) { return W_BCAST32(p); }
#define TV_DOT(acc, x, w) W_DP(acc, x, w)
XINLINE NAME(tvi) NAME(tv_add)(NAME(tvi) a, NAME(tvi) b) { return W_ADD32(a, b); }
XINLINE NAME(tvf) NAME(tv_zerof)(void) { return W_ZEROF(); }
XINLINE NAME(tvf) NAME(tv_loadf)(const float *p) { return W_LOADF(p); }
XINLINE void NAME(tv_storef)(float *p, NAME(tvf) v) { W_STOREF(p, v); }
XINLINE NAME(tvf) NAME(tv_fma)(NAME(tvf) facc, NAME(tvi) sums, float d) { return W_ADDF(facc, W_MULF(W_CVTF(sums), W_SPLATF(d))); }
#endif
#define TILE_T 2
#define SPAN 1024        /* columns of weights unpacked at a time: TILE_R KB on the stack */
#define BLOCK_LANES 512  /* at most this many tokens per block: TILE_R x 2 KB of float sums */

/* acc[r][t] (first: =, else +=) the products of the 32 columns from c of the span's rows r < R
 * (w: SPAN bytes a row) with token vector t of qv (qv: the first vector's chunk of column c; the
 * next vector VS bytes on), per token: 8 chunks of 4 columns, unrolled. On AVX2 (PARTIAL16) the
 * products gather in int16 partial sums (8 chunks at most, then widened), else straight into the
 * int32 sums. */
XINLINE void NAME(gemm_part)(const int8_t *w, int32_t c, const uint8_t *qv, int64_t VS,
                             NAME(tvi) acc[TILE_R][TILE_T], int first, const int R, const int T) {
    NAME(tvi) part[TILE_R][TILE_T];
    UNROLL for (int r = 0; r < R; r++)
        UNROLL for (int t = 0; t < T; t++) part[r][t] = PARTIAL16 || first ? NAME(tv_zero)() : acc[r][t];
    for (int j = 0; j < 8; j++, qv += LANES * 4) { /* not unrolled: unrolled, the compiler regroups the int16 sums and spills */
        NAME(tvi) x[TILE_T];
        UNROLL for (int t = 0; t < T; t++) x[t] = NAME(tv_load)(qv + t * VS);
        UNROLL for (int r = 0; r < R; r++) {
            const NAME(tvi) wv = NAME(tv_bcast)(w + r * SPAN + c + 4 * j);
            UNROLL for (int t = 0; t < T; t++) part[r][t] = TV_DOT(part[r][t], x[t], wv);
        }
    }
    UNROLL for (int r = 0; r < R; r++)
        UNROLL for (int t = 0; t < T; t++)
            acc[r][t] = !PARTIAL16 || first ? WIDEN(part[r][t]) : NAME(tv_add)(acc[r][t], WIDEN(part[r][t]));
}

/* The float sums fsum[r][t LANES ..] (+)= rows r < R of the span's groups, for token vectors
 * [v, v + T) of qt (VS bytes a vector). w: the span's unpacked weights, SPAN bytes a
 * row, from column k0; d: their float scales, SPAN / 32 a row. T, R constant at every call. */
XINLINE void NAME(gemm_tile)(const int8_t *w, const float *d, int32_t k0, int32_t k1, int32_t G, const uint8_t *qt,
                             int64_t VS, int32_t v, int first, float (*fsum)[BLOCK_LANES], int32_t v0, const int R, const int T) {
#if WIDE /* the float sums in registers too */
    NAME(tvf) facc[TILE_R][TILE_T];
    UNROLL for (int r = 0; r < R; r++)
        UNROLL for (int t = 0; t < T; t++) facc[r][t] = first ? NAME(tv_zerof)() : NAME(tv_loadf)(fsum[r] + (v - v0 + t) * LANES);
#endif
    for (int32_t g0 = k0; g0 < k1; g0 += G) {
        NAME(tvi) acc[TILE_R][TILE_T];
        const uint8_t *qv = qt + v * VS + (int64_t)g0 * LANES; /* column g0's chunk: g0 / 4 chunks of LANES 4 bytes */
        NAME(gemm_part)(w, g0 - k0, qv, VS, acc, 1, R, T);
        for (int32_t c = g0 + 32; c < g0 + G; c += 32) NAME(gemm_part)(w, c - k0, qv + (int64_t)(c - g0) * LANES, VS, acc, 0, R, T);
        const float *dg = d + (g0 - k0) / G;
        UNROLL for (int r = 0; r < R; r++)
            UNROLL for (int t = 0; t < T; t++) {
#if WIDE
                facc[r][t] = NAME(tv_fma)(facc[r][t], acc[r][t], dg[r * (SPAN / 32)]);
#else /* the float sums wait in L1 (touched once a group): the 16 registers hold the integer sums */
                float *f = fsum[r] + (v - v0 + t) * LANES;
                NAME(tv_storef)(f, NAME(tv_fma)(first && g0 == k0 ? NAME(tv_zerof)() : NAME(tv_loadf)(f), acc[r][t], dg[r * (SPAN / 32)]));
#endif
            }
    }
#if WIDE
    UNROLL for (int r = 0; r < R; r++)
        UNROLL for (int t = 0; t < T; t++) NAME(tv_storef)(fsum[r] + (v - v0 + t) * LANES, facc[r][t]);
#endif
}

/* Rows [m, m + R) of Y for token vectors [v0, v1): the weights unpacked a SPAN of columns at a
 * time (W is read from memory once per block of tokens), then every token vector of the block
 * passes over them; the float sums wait in fsum between spans. */
XINLINE void NAME(gemm_rows_tv)(const pg_qtensor *w, int32_t m, const uint8_t *qt, int64_t VS, int32_t v0, int32_t v1,
                                const float *scale, const int32_t *zp, int32_t N, float *y, const int R) {
    const int32_t K = w->K, G = w->G, ngroups = K / G;
    int8_t wbuf[TILE_R * SPAN];
    float dbuf[TILE_R * (SPAN / 32)], fsum[TILE_R][BLOCK_LANES];
    for (int32_t k0 = 0; k0 < K; k0 += SPAN) {
        const int32_t k1 = K - k0 < SPAN ? K : k0 + SPAN;
        UNROLL for (int r = 0; r < R; r++) {
            const uint8_t *p = w->qs + (int64_t)(m + r) * (K / 2);
            for (int32_t c = k0; c < k1; c += 64) {
                __m256i lo, hi;
                NAME(unpack64)(p + c / 2, &lo, &hi);
                _mm256_storeu_si256((__m256i *)(wbuf + r * SPAN + (c - k0)), lo);
                _mm256_storeu_si256((__m256i *)(wbuf + r * SPAN + (c - k0) + 32), hi);
            }
            for (int32_t g = k0 / G; g < k1 / G; g++) dbuf[r * (SPAN / 32) + g - k0 / G] = _cvtsh_ss(w->scales[(int64_t)(m + r) * ngroups + g]);
        }
        int32_t v = v0;
        for (; v + TILE_T <= v1; v += TILE_T) NAME(gemm_tile)(wbuf, dbuf, k0, k1, G, qt, VS, v, k0 == 0, fsum, v0, R, TILE_T);
        for (; v < v1; v++) NAME(gemm_tile)(wbuf, dbuf, k0, k1, G, qt, VS, v, k0 == 0, fsum, v0, R, 1);
    }
    /* token by token: Y's rows are M floats apart (64 KB for the MLP's 16,384 outputs), and
     * the R outputs of a token share a cache line and a page (row by row, the same number of
     * pages again for each row: 20-30% slower at K = 2048 on Zen 4, docs/KERNELS.md) */
    const int32_t n1 = v1 * LANES < N ? v1 * LANES : N;
    for (int32_t n = v0 * LANES; n < n1; n++)
        UNROLL for (int r = 0; r < R; r++)
            y[(int64_t)n * w->M + m + r] = scale[n] * (fsum[r][n - v0 * LANES] - (float)zp[n] * w->rowsum[m + r]);
}

/* The tail tokens n in [n0, N) (rows q[n - n0][K]) for rows [m, m + R), columns in the lanes
 * while the R rows' weights are in cache: TAIL_T tokens a tile (R TAIL_T outputs, one
 * reduction). */
XINLINE void NAME(tail_rows)(const pg_qtensor *w, int32_t m, const uint8_t *q, int32_t n0, int32_t N,
                             const float *scale, const int32_t *zp, float *y, const int R, const int G32) {
    const int64_t K = w->K;
    for (int32_t n = n0; n < N; n += TAIL_T) {
        const uint8_t *qn = q + (n - n0) * K;
        float *yn = y + (int64_t)n * w->M;
        if (N - n >= TAIL_T) NAME(cols_tile)(w, m, 1, qn, scale + n, zp + n, yn, R, TAIL_T, G32);
        else if (N - n == 1) NAME(cols_tile)(w, m, 1, qn, scale + n, zp + n, yn, R, 1, G32);
#if TAIL_T > 2
        else if (N - n == 2) NAME(cols_tile)(w, m, 1, qn, scale + n, zp + n, yn, R, 2, G32);
        else if (N - n == 3) NAME(cols_tile)(w, m, 1, qn, scale + n, zp + n, yn, R, 3, G32);
#endif
    }
}

/* Columns in the lanes for a product of N > 1 tokens (q[N][K] as it is): tiles of COLS_R rows x
 * 4 tokens (the tails: 1 to 3 tokens, 1 row), the work following N. */
#define COLS_R (LANES / 4) /* rows of a tile: 8 outputs a reduction on ymm, 16 on zmm */
XINLINE void NAME(gemm_rows_cols_g)(const pg_qtensor *w, int32_t m0, int32_t m1, const uint8_t *q, const float *scale,
                                    const int32_t *zp, int32_t N, float *y, const int G32) {
    const int64_t K = w->K;
    int32_t m = m0;
#define PG_TOKENS(R)                                                                                       \
    {                                                                                                     \
        int32_t n = 0;                                                                                    \
        for (; n + 4 <= N; n += 4) NAME(cols_tile)(w, m, 1, q + n * K, scale + n, zp + n, y + n * w->M, R, 4, G32); \
        const uint8_t *qn = q + n * K;                                                                    \
        float *yn = y + n * w->M;                                                                         \
        if (N - n == 1) NAME(cols_tile)(w, m, 1, qn, scale + n, zp + n, yn, R, 1, G32);                   \
        if (N - n == 2) NAME(cols_tile)(w, m, 1, qn, scale + n, zp + n, yn, R, 2, G32);                   \
        if (N - n == 3) NAME(cols_tile)(w, m, 1, qn, scale + n, zp + n, yn, R, 3, G32);                   \
    }
    for (; m + COLS_R <= m1; m += COLS_R) PG_TOKENS(COLS_R)
    for (; m < m1; m++) PG_TOKENS(1)
#undef PG_TOKENS
}

/* The activations gemm_rows reads for N tokens: packed for LANES tokens a vector (returns
 * LANES: dispatch.c packs them), the last N % LANES tokens left as rows when they are at most
 * TAIL_MAX (columns in the lanes for them cost less than a vector of mostly padding); or,
 * with fewer tokens than lanes, q[N][K] as it is (0). */
XTARGET static int32_t NAME(gemm_lanes)(const pg_qtensor *w, int32_t N, int32_t *tail) {
    *tail = N >= LANES && N % LANES <= TAIL_MAX(w->G) ? N % LANES : 0;
    return N >= LANES ? LANES : 0;
}

/* Rows [m0, m1) of Y[N][M]. Packed activations (gemm_lanes): by equal blocks of token vectors
 * whose activations (up to BLOCK_BYTES) stay in L2; within a block, TILE_R rows at a time. Else
 * from q[N][K], gemm_rows_cols_g. */
XTARGET static void NAME(gemm_rows)(const pg_qtensor *w, int32_t m0, int32_t m1, const uint8_t *qt,
                             const float *scale, const int32_t *zp, int32_t N, float *y) {
    int32_t tail;
    if (!NAME(gemm_lanes)(w, N, &tail)) {
        if (w->G == 32)
            NAME(gemm_rows_cols_g)(w, m0, m1, qt, scale, zp, N, y, 1);
        else
            NAME(gemm_rows_cols_g)(w, m0, m1, qt, scale, zp, N, y, 0);
        return;
    }
    const int64_t K = w->K, NP = (N - tail + LANES - 1) / LANES * LANES;
    const int32_t vectors = (int32_t)(NP / LANES);
    const uint8_t *rest = qt + NP * K; /* the tail's rows */
    int32_t most = (int32_t)(BLOCK_BYTES / (K * LANES));
    most = most < 1 ? 1 : most > BLOCK_LANES / LANES ? BLOCK_LANES / LANES : most;
    const int32_t blocks = (vectors + most - 1) / most, per = (vectors + blocks - 1) / blocks;
    for (int32_t v0 = 0; v0 < vectors; v0 += per) {
        const int32_t v1 = vectors - v0 < per ? vectors : v0 + per;
        const int32_t t0 = v1 == vectors ? N - tail : N; /* the last block takes the tail too */
        int32_t m = m0;
        for (; m + TILE_R <= m1; m += TILE_R) {
            NAME(gemm_rows_tv)(w, m, qt, K * LANES, v0, v1, scale, zp, N, y, TILE_R);
            if (w->G == 32) NAME(tail_rows)(w, m, rest, t0, N, scale, zp, y, TILE_R, 1);
            else NAME(tail_rows)(w, m, rest, t0, N, scale, zp, y, TILE_R, 0);
        }
        for (; m < m1; m++) {
            NAME(gemm_rows_tv)(w, m, qt, K * LANES, v0, v1, scale, zp, N, y, 1);
            if (w->G == 32) NAME(tail_rows)(w, m, rest, t0, N, scale, zp, y, 1, 1);
            else NAME(tail_rows)(w, m, rest, t0, N, scale, zp, y, 1, 0);
        }
    }
}
#undef TV_DOT
#undef COLS_R
#undef LANES
#undef TILE_R
#undef TILE_T
#undef SPAN
#undef BLOCK_LANES
#undef BLOCK_BYTES
#undef TAIL_T
#undef TAIL_MAX

/* y[m0, m1) for one activation row: GEMV_R rows h apart together (h = the slice / GEMV_R): one
 * reduction serves their group sums, and the weights are read as GEMV_R sequential streams,
 * which the hardware prefetcher follows (rows side by side within a 4 KB page defeat it). */
XINLINE void NAME(gemv_rows_g)(const pg_qtensor *w, int32_t m0, int32_t m1, const uint8_t *q,
                        float scale, int32_t zp, float *y, const int G32) {
    const int32_t h = (m1 - m0) / GEMV_R;
    for (int32_t m = m0; m < m0 + h; m++) NAME(cols_tile)(w, m, h, q, &scale, &zp, y, GEMV_R, 1, G32);
    for (int32_t m = m0 + h * GEMV_R; m < m1; m++) NAME(cols_tile)(w, m, 1, q, &scale, &zp, y, 1, 1, G32);
}

XTARGET static void NAME(gemv_rows)(const pg_qtensor *w, int32_t m0, int32_t m1, const uint8_t *q,
                             float scale, int32_t zp, float *y) {
    if (w->G == 32)
        NAME(gemv_rows_g)(w, m0, m1, q, scale, zp, y, 1);
    else
        NAME(gemv_rows_g)(w, m0, m1, q, scale, zp, y, 0);
}

#undef GROUPS_PER_STEP
#undef GEMV_R
