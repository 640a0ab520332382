/* The x86 int4 GEMM and GEMV, instantiated once per instruction set by kernels_avx2.c: included
 * with NAME(x) (a suffix for every function), XTARGET / XINLINE (target attributes), and the
 * integer core, over 256-bit vectors (default) or 512-bit ones (WIDE):
 *   256-bit: MULADD(acc, x, w)          acc += the products of 32 activation bytes x and weights w
 *            MULADD2(acc, x, w, x2, w2) the same for two 32-byte chunks
 *            WIDEN(acc)                 the group's 8 int32 lane sums
 *   WIDE:    W512 (the vector type), W_ZERO(), W_LOAD(p) (64 bytes), W_UNPACK(p) (a block's 64
 *            weights from its 32 packed bytes), W_DP(acc, x, w) (int32 lane l += the products of
 *            bytes 4l..4l+3), W_ZEXT(v) (a 256-bit vector, upper half 0), W_FOLD(acc) (lanes
 *            0..7 + lanes 8..15: a 64-column block's two 32-column chunks summed)
 * Whatever the instruction set, int32 lane l of a group holds the products of bytes 4l..4l+3
 * of each 32-column chunk, summed exactly: the integers, and so every float operation after
 * them, are the same on every x86 path (bit-identical results). No include guard: included
 * once per instruction set. */

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

/* A 64-column block's unpacked weights (wblock), acc += its products with the block's 64
 * activation bytes x (block); a 32-column half's (hi: columns 32..63) the same (half); the
 * group's 8 int32 lane sums (lanes). */
#if !WIDE
typedef __m256i NAME(acc_t);
typedef struct { __m256i lo, hi; } NAME(wblock_t);
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
XINLINE __m256i NAME(lanes)(NAME(acc_t) acc) { return WIDEN(acc); }
#else /* one vpdpbusd per block: its two 32-column chunks side by side, folded per group */
typedef W512 NAME(acc_t);
typedef W512 NAME(wblock_t);
XINLINE NAME(acc_t) NAME(zero)(void) { return W_ZERO(); }
XINLINE NAME(wblock_t) NAME(wblock)(const uint8_t *p) { return W_UNPACK(p); }
XINLINE NAME(acc_t) NAME(block)(NAME(acc_t) acc, const uint8_t *x, NAME(wblock_t) w) { return W_DP(acc, W_LOAD(x), w); }
XINLINE NAME(acc_t) NAME(half)(NAME(acc_t) acc, const uint8_t *x, __m256i w) {
    return W_DP(acc, W_ZEXT(_mm256_loadu_si256((const __m256i *)x)), W_ZEXT(w));
}
XINLINE __m256i NAME(lanes)(NAME(acc_t) acc) { return W_FOLD(acc); }
#endif

/* R rows x T tokens of Y (R, T <= 4). Rows m + r*step of W (r < R), activation rows q[t*K],
 * outputs y[t*M + m + r*step]; G32: W has G == 32 (else G is a multiple of 64). R, T and G32
 * are constants at every call, so the accumulators (fixed-size arrays, fully unrolled loops)
 * live in registers.
 * Per output and group: int16 lanes over the group's 32-column chunks, widened to 8 int32
 * lanes, converted and multiplied by the group scale into 8 float lanes; lanes are summed at
 * the end. That sequence is the same for every R and T, so tiling never changes a result. */
XINLINE void NAME(tile)(const pg_qtensor *w, int32_t m, int32_t step, const uint8_t *q,
                 const float *scale, const int32_t *zp, float *y, const int R, const int T,
                 const int G32) {
    const int32_t K = w->K, G = G32 ? 32 : w->G, ngroups = K / G;
    const uint8_t *rows[4];
    __m256 facc[4][4];
    UNROLL for (int r = 0; r < R; r++) {
        rows[r] = w->qs + (int64_t)(m + r * step) * (K / 2);
        UNROLL for (int t = 0; t < T; t++) facc[r][t] = _mm256_setzero_ps();
    }
    for (int32_t g = 0; g < ngroups; g++) {
        NAME(acc_t) acc[4][4];
        UNROLL for (int r = 0; r < R; r++)
            UNROLL for (int t = 0; t < T; t++) acc[r][t] = NAME(zero)();
        /* G >= 64: whole 64-column blocks. G == 32: one half (lo or hi nibbles) of a block. */
        for (int32_t c = g * G; c < (g + 1) * G; c += G32 ? 32 : 64) {
            UNROLL for (int r = 0; r < R; r++) {
                const uint8_t *p = rows[r] + (G32 ? c & ~63 : c) / 2;
                /* one token: the weight stream is the bottleneck, and rows are too short for
                 * the hardware prefetcher to ramp up; fetch 16 KB ahead */
                if (T == 1 && (c & 127) == 0) _mm_prefetch((const char *)(p + 16384), _MM_HINT_T0);
                if (G32) { /* only the half of the block this group covers */
                    const __m256i wv = NAME(unpack32)(p, c & 32);
                    UNROLL for (int t = 0; t < T; t++) acc[r][t] = NAME(half)(acc[r][t], q + (int64_t)t * K + c, wv);
                } else {
                    const NAME(wblock_t) wb = NAME(wblock)(p);
                    UNROLL for (int t = 0; t < T; t++) acc[r][t] = NAME(block)(acc[r][t], q + (int64_t)t * K + c, wb);
                }
            }
        }
        UNROLL for (int r = 0; r < R; r++) {
            const __m256 d = _mm256_set1_ps(_cvtsh_ss(w->scales[(int64_t)(m + r * step) * ngroups + g]));
            UNROLL for (int t = 0; t < T; t++) {
                __m256 v = _mm256_cvtepi32_ps(NAME(lanes)(acc[r][t]));
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
XINLINE void NAME(gemm_rows_g)(const pg_qtensor *w, int32_t m0, int32_t m1, const uint8_t *q,
                        const float *scale, const int32_t *zp, int32_t N, float *y, const int G32) {
    const int64_t K = w->K;
    const int32_t most = K >= (128 << 10) / 4 ? 4 : ((128 << 10) / K) & ~3, blocks = (N + most - 1) / most;
    const int32_t block = ((N + blocks - 1) / blocks + 3) & ~3;
    for (int32_t n0 = 0; n0 < N; n0 += block) {
        const int32_t n1 = N - n0 < block ? N : n0 + block;
        int32_t m = m0;
        for (; m + 2 <= m1; m += 2) {
            int32_t n = n0;
            for (; n + 4 <= n1; n += 4) NAME(tile)(w, m, 1, q + n * K, scale + n, zp + n, y + n * w->M, 2, 4, G32);
            for (; n < n1; n++) NAME(tile)(w, m, 1, q + n * K, scale + n, zp + n, y + n * w->M, 2, 1, G32);
        }
        for (; m < m1; m++) {
            int32_t n = n0;
            for (; n + 4 <= n1; n += 4) NAME(tile)(w, m, 1, q + n * K, scale + n, zp + n, y + n * w->M, 1, 4, G32);
            for (; n < n1; n++) NAME(tile)(w, m, 1, q + n * K, scale + n, zp + n, y + n * w->M, 1, 1, G32);
        }
    }
}

XTARGET static void NAME(gemm_rows)(const pg_qtensor *w, int32_t m0, int32_t m1, const uint8_t *q,
                             const float *scale, const int32_t *zp, int32_t N, float *y) {
    if (w->G == 32)
        NAME(gemm_rows_g)(w, m0, m1, q, scale, zp, N, y, 1);
    else
        NAME(gemm_rows_g)(w, m0, m1, q, scale, zp, N, y, 0);
}

/* y[m0, m1) for one activation row: rows m and m + h together (h = half the slice), two
 * independent sums for the core to overlap and two sequential weight streams for the hardware
 * prefetcher. One row at a time leaves the core short of work (K=2048 rows: ~15 GB/s per core
 * from cache, under the memory's share); rows side by side within a 4 KB page defeat the
 * prefetcher; two streams a slice apart read as fast as a plain streaming read. */
XINLINE void NAME(gemv_rows_g)(const pg_qtensor *w, int32_t m0, int32_t m1, const uint8_t *q,
                        float scale, int32_t zp, float *y, const int G32) {
    const int32_t h = (m1 - m0) / 2;
    for (int32_t m = m0; m < m0 + h; m++) NAME(tile)(w, m, h, q, &scale, &zp, y, 2, 1, G32);
    if ((m1 - m0) & 1) NAME(tile)(w, m1 - 1, 1, q, &scale, &zp, y, 1, 1, G32);
}

XTARGET static void NAME(gemv_rows)(const pg_qtensor *w, int32_t m0, int32_t m1, const uint8_t *q,
                             float scale, int32_t zp, float *y) {
    if (w->G == 32)
        NAME(gemv_rows_g)(w, m0, m1, q, scale, zp, y, 1);
    else
        NAME(gemv_rows_g)(w, m0, m1, q, scale, zp, y, 0);
}

#if WIDE /* each 512-bit instantiation sets these anew */
#undef W512
#undef W_ZERO
#undef W_LOAD
#undef W_UNPACK
#undef W_DP
#undef W_ZEXT
#undef W_FOLD
#endif
