/* The AMX-INT8 GEMM (N > 1; the GEMV stays on the AVX-512 VNNI path), included by
 * kernels_avx2.c right after the 512-bit gemm_x86.h, whose W_* operations and wblock (named by
 * ZNAME) it uses, with NAME, XTARGET, XINLINE and the tile operations:
 *   T_CONFIG(cfg)      ldtilecfg       T_ZERO(t)            tilezero
 *   T_LOAD(t, p, s)    tileloadd       T_STORE(t, p, s)     tilestored
 *   T_DPBSUD(c, a, b)  tdpbsud         T_RELEASE()          tilerelease
 * (tile numbers are literals: the native intrinsics paste them into the instruction). Natively
 * each is that instruction; the emulated build implements each in C by its definition
 * (kernels_avx2.c), so this code, layout, edges and all, runs and is compared on any x86.
 *
 * TDPBSUD multiplies A (16 rows of signed bytes) by B (K/4 rows of 16 x 4 unsigned bytes) into
 * C[16][16] int32. A is 16 weight rows as they are unpacked (64 columns in order: the zmm code's
 * wblock, no transpose); B is 16 tokens' activations in the packing the zmm GEMM already reads
 * (dispatch.c pack_tokens, [NP / 16][K/4][16][4]: B row j, columns 4j..4j+3 of 16 tokens, is 64
 * bytes, and a B tile 1 KB in one piece). C[row][token] is the exact sum per (row, token) and
 * group that every path has (gemm_x86.h states the order); its float work is then the zmm GEMM's,
 * one weight row's d times 16 tokens a vector.
 *
 * Tiles: C 0..3 = (row tile a, token tile b) at 2a + b, A 4..5, B 6..7: a 32 x 32 block, each
 * tile load serving two products and four independent accumulations in flight (one C tile
 * would chain every product on the previous one). G = 32 takes 32-column A tiles and 8-row B tiles
 * (one product per group); other groups sum their 64-column products in C. */

#define AMX_SPAN 512    /* columns of weights unpacked at a time: 32 rows, 16 KB on the stack */
#define AMX_TOKENS 128  /* tokens per block (a multiple of 32): their float sums, 16 KB */

/* The 64-byte tile configuration (palette 1): C 16 rows of 64 bytes, A 16 rows of cols bytes,
 * B cols / 4 rows of 64 bytes (cols: the columns of one product). */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} NAME(tilecfg);

XINLINE void NAME(config)(NAME(tilecfg) *cfg, int cols) {
    memset(cfg, 0, sizeof *cfg);
    cfg->palette = 1;
    for (int t = 0; t < 4; t++) cfg->rows[t] = 16, cfg->colsb[t] = 64;
    for (int t = 4; t < 6; t++) cfg->rows[t] = 16, cfg->colsb[t] = (uint16_t)cols;
    for (int t = 6; t < 8; t++) cfg->rows[t] = (uint8_t)(cols / 4), cfg->colsb[t] = 64;
}

/* The A tiles' source for columns [k0, k1) of rows p0 .. p0 + rows - 1 (rows <= 32): out[r][c - k0]
 * the signed weight (AMX_SPAN bytes a row), rows past `rows` 0; d[r][g - k0 / G]: the rows'
 * scales as floats for each group g of the span (0 past `rows`). */
XINLINE void NAME(make_a)(const pg_qtensor *w, int32_t p0, int rows, int32_t k0, int32_t k1,
                          int8_t (*out)[AMX_SPAN], float (*d)[AMX_SPAN / 32]) {
    const int32_t ngroups = w->K / w->G;
    for (int r = 0; r < 32; r++) {
        if (r >= rows) {
            memset(out[r], 0, sizeof out[r]);
            memset(d[r], 0, sizeof d[r]);
            continue;
        }
        const uint8_t *p = w->qs + (int64_t)(p0 + r) * (w->K / 2);
        for (int32_t c = k0; c < k1; c += 64) W_STORE((uint8_t *)out[r] + (c - k0), ZNAME(wblock)(p + c / 2));
        for (int32_t g = k0 / w->G; g < k1 / w->G; g++) d[r][g - k0 / w->G] = _cvtsh_ss(w->scales[(int64_t)(p0 + r) * ngroups + g]);
    }
}

/* fsum[16 a + r][n - t0 ..] (+)= d * C: the float work of the stored C tile c (16 rows x 16 tokens
 * from n) for row tile a, a multiply then an add, from 0 at the first group (0 + x, as every path) */
XINLINE void NAME(fold)(const int32_t (*c)[16], const float (*d)[AMX_SPAN / 32], int a, int32_t gi,
                        int first, float (*fsum)[AMX_TOKENS], int32_t col) {
    for (int r = 0; r < 16; r++) {
        float *f = fsum[16 * a + r] + col;
        const W512F prod = W_MULF(W_CVTF(W_LOAD((const uint8_t *)c[r])), W_SPLATF(d[16 * a + r][gi]));
        W_STOREF(f, W_ADDF(first ? W_ZEROF() : W_LOADF(f), prod));
    }
}

/* The span's groups for R row tiles (of the 32 rows in a) x T token tiles from token n0 of the
 * packed activations qt (K 16 bytes a vector of 16 tokens), into fsum. R, T constant at every call. */
XINLINE void NAME(block)(const int8_t (*a)[AMX_SPAN], const float (*d)[AMX_SPAN / 32], int32_t K, int32_t k0, int32_t k1, int32_t G,
                         const uint8_t *qt, int32_t n0, float (*fsum)[AMX_TOKENS], int32_t t0,
                         const int R, const int T) {
    const int cols = G == 32 ? 32 : 64;
    _Alignas(64) int32_t cbuf[4][16][16];
    for (int32_t g0 = k0; g0 < k1; g0 += G) {
        T_ZERO(0);
        if (T == 2) T_ZERO(1);
        if (R == 2) T_ZERO(2);
        if (R == 2 && T == 2) T_ZERO(3);
        for (int32_t c = g0; c < g0 + G; c += cols) {
            const uint8_t *b = qt + (int64_t)n0 * K + (int64_t)c * 16; /* vector n0 / 16, chunk c / 4 */
            T_LOAD(4, a[0] + (c - k0), AMX_SPAN);
            T_LOAD(6, b, 64);
            T_DPBSUD(0, 4, 6);
            if (T == 2) {
                T_LOAD(7, b + (int64_t)K * 16, 64);
                T_DPBSUD(1, 4, 7);
            }
            if (R == 2) {
                T_LOAD(5, a[16] + (c - k0), AMX_SPAN);
                T_DPBSUD(2, 5, 6);
                if (T == 2) T_DPBSUD(3, 5, 7);
            }
        }
        T_STORE(0, cbuf[0], 64);
        if (T == 2) T_STORE(1, cbuf[1], 64);
        if (R == 2) T_STORE(2, cbuf[2], 64);
        if (R == 2 && T == 2) T_STORE(3, cbuf[3], 64);
        const int first = g0 == 0;
        const int32_t gi = (g0 - k0) / G;
        for (int i = 0; i < R; i++)
            for (int j = 0; j < T; j++) NAME(fold)((const int32_t (*)[16])cbuf[2 * i + j], d, i, gi, first, fsum, n0 + 16 * j - t0);
    }
}

/* Rows [m0, m1) of Y[N][M] from the activations packed for 16 tokens a vector (NP = N rounded up
 * to 16, the padding tokens 0): by blocks of AMX_TOKENS tokens, 32 rows at a time; for each span
 * of columns the rows' weights are unpacked once and every 32 tokens of the block pass over them,
 * their float sums waiting in fsum. */
XTARGET static void NAME(gemm_rows)(const pg_qtensor *w, int32_t m0, int32_t m1, const uint8_t *qt,
                                    const float *scale, const int32_t *zp, int32_t N, float *y) {
    const int32_t K = w->K, G = w->G;
    const int64_t NP = ((int64_t)N + 15) / 16 * 16;
    _Alignas(64) int8_t abuf[32][AMX_SPAN];
    _Alignas(64) float dbuf[32][AMX_SPAN / 32], fsum[32][AMX_TOKENS];
    NAME(tilecfg) cfg;
    NAME(config)(&cfg, G == 32 ? 32 : 64);
    T_CONFIG(&cfg); /* on every call: a pool thread (or a forked child's caller) may not have it yet */
    for (int32_t t0 = 0; t0 < N; t0 += AMX_TOKENS) {
        const int32_t t1 = NP - t0 < AMX_TOKENS ? (int32_t)NP : t0 + AMX_TOKENS; /* a multiple of 16 */
        for (int32_t p0 = m0; p0 < m1; p0 += 32) {
            const int rows = m1 - p0 < 32 ? m1 - p0 : 32;
            for (int32_t k0 = 0; k0 < K; k0 += AMX_SPAN) {
                const int32_t k1 = K - k0 < AMX_SPAN ? K : k0 + AMX_SPAN;
                NAME(make_a)(w, p0, rows, k0, k1, abuf, dbuf);
                __asm__ volatile("" ::: "memory"); /* the tile loads read abuf: the compiler cannot see it */
                const int8_t (*a)[AMX_SPAN] = (const int8_t (*)[AMX_SPAN])abuf;
                const float (*d)[AMX_SPAN / 32] = (const float (*)[AMX_SPAN / 32])dbuf;
                for (int32_t n0 = t0; n0 < t1; n0 += 32) {
                    if (rows > 16 && t1 - n0 > 16) NAME(block)(a, d, K, k0, k1, G, qt, n0, fsum, t0, 2, 2);
                    else if (rows > 16) NAME(block)(a, d, K, k0, k1, G, qt, n0, fsum, t0, 2, 1);
                    else if (t1 - n0 > 16) NAME(block)(a, d, K, k0, k1, G, qt, n0, fsum, t0, 1, 2);
                    else NAME(block)(a, d, K, k0, k1, G, qt, n0, fsum, t0, 1, 1);
                }
            }
            for (int32_t n = t0; n < t1 && n < N; n++)
                for (int r = 0; r < rows; r++)
                    y[(int64_t)n * w->M + p0 + r] = scale[n] * (fsum[r][n - t0] - (float)zp[n] * w->rowsum[p0 + r]);
        }
    }
    T_RELEASE();
}

XTARGET static int32_t NAME(gemm_lanes)(const pg_qtensor *w, int32_t N, int32_t *tail) {
    (void)w, (void)N;
    *tail = 0;
    return 16; /* B tiles read 16 tokens' 4-byte column chunks side by side */
}

#undef AMX_SPAN
#undef AMX_TOKENS
