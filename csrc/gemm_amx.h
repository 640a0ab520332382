/* The AMX-INT8 GEMM (N > 1; the GEMV stays on the AVX-512 VNNI path), included by
 * kernels_avx2.c right after the 512-bit gemm_x86.h, whose W_* operations and wblock (named by
 * ZNAME) it uses, with NAME, XTARGET, XINLINE and the tile operations:
 *   T_STATE            declares what the tile operations work on (nothing natively)
 *   T_CONFIG(cfg)      ldtilecfg       T_ZERO(t)            tilezero
 *   T_LOAD(t, p, s)    tileloadd       T_STORE(t, p, s)     tilestored
 *   T_DPBUSD(c, a, b)  tdpbusd         T_RELEASE()          tilerelease
 * Natively each is that instruction; the emulated build implements each in C by its definition
 * (kernels_avx2.c), so this code, layout, edges and all, runs and is compared on any x86.
 *
 * TDPBUSD multiplies A (16 rows of uint8: tokens) by B (K/4 rows of 16 x 4 int8: the 4 weights
 * of 16 output rows for each 4 columns) into C[16 tokens][16 rows] int32: exact sums per
 * (row, token) and group, as every path has them (gemm_x86.h states the order), then the float
 * work for 16 rows a vector. A is the activations as they are (q[N][K], row stride K); B is made
 * from the int4 rows a span at a time: each 64-column block's 16 rows unpacked (wblock) and
 * transposed by 4-byte units. Tiles: 0 = C, 1 = A, 2 = B; G = 32 takes 32-column A tiles and
 * 8-row B tiles (one group per product), other groups 64-column products summed in C. */

#define AMX_SPAN 1024   /* columns of B made at a time: 16 KB on the stack */
#define AMX_TOKENS 256  /* tokens per block: their float sums, 16 KB on the stack */

/* The 64-byte tile configuration (palette 1): C and A 16 rows, B K/4 rows; C 64 bytes a row,
 * A and B the columns of one product (cols), B always 64. */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} NAME(tilecfg);

XINLINE void NAME(config)(NAME(tilecfg) *cfg, int cols) {
    memset(cfg, 0, sizeof *cfg);
    cfg->palette = 1;
    cfg->rows[0] = 16, cfg->colsb[0] = 64;
    cfg->rows[1] = 16, cfg->colsb[1] = (uint16_t)cols;
    cfg->rows[2] = (uint8_t)(cols / 4), cfg->colsb[2] = 64;
}

/* B for columns [k0, k1) of rows p0 .. p0 + rows - 1 (rows <= 16; the others 0): for each
 * 64-column block b, 16 B rows of 64 bytes at out + 1024 (b - k0 / 64), row j holding bytes
 * 4j..4j+3 of each of the 16 weight rows; for G = 32 rows 0..7 are columns 0..31, 8..15 32..63.
 * 16x16 transpose of 4-byte units in four steps (pairs, pairs of pairs, then 128-bit lanes). */
XINLINE void NAME(make_b)(const pg_qtensor *w, int32_t p0, int rows, int32_t k0, int32_t k1, uint8_t *out) {
    for (int32_t c = k0; c < k1; c += 64, out += 1024) {
        W512 r[16], a[16], b[16];
        for (int n = 0; n < 16; n++) r[n] = n < rows ? ZNAME(wblock)(w->qs + (int64_t)(p0 + n) * (w->K / 2) + c / 2) : W_ZERO();
        for (int i = 0; i < 8; i++)
            a[2 * i] = W_UNPACKLO32(r[2 * i], r[2 * i + 1]), a[2 * i + 1] = W_UNPACKHI32(r[2 * i], r[2 * i + 1]);
        for (int i = 0; i < 4; i++) { /* b[4i + j], 128-bit lane L: unit 4L + j of rows 4i..4i+3 */
            b[4 * i] = W_UNPACKLO64(a[4 * i], a[4 * i + 2]), b[4 * i + 1] = W_UNPACKHI64(a[4 * i], a[4 * i + 2]);
            b[4 * i + 2] = W_UNPACKLO64(a[4 * i + 1], a[4 * i + 3]), b[4 * i + 3] = W_UNPACKHI64(a[4 * i + 1], a[4 * i + 3]);
        }
        for (int j = 0; j < 4; j++) { /* B row 4L + j: lane L of b[j], b[4 + j], b[8 + j], b[12 + j] */
            const W512 c0 = W_SHUF128(b[j], b[4 + j], 0x44), c1 = W_SHUF128(b[j], b[4 + j], 0xEE);
            const W512 c2 = W_SHUF128(b[8 + j], b[12 + j], 0x44), c3 = W_SHUF128(b[8 + j], b[12 + j], 0xEE);
            W_STORE(out + 64 * j, W_SHUF128(c0, c2, 0x88));
            W_STORE(out + 64 * (4 + j), W_SHUF128(c0, c2, 0xDD));
            W_STORE(out + 64 * (8 + j), W_SHUF128(c1, c3, 0x88));
            W_STORE(out + 64 * (12 + j), W_SHUF128(c1, c3, 0xDD));
        }
    }
}

/* Rows [m0, m1) of Y[N][M] from q[N][K]: 16 rows at a time; for each span of columns, B is made
 * once and every 16 tokens of a block pass over it, their float sums waiting in fsum. */
XTARGET static void NAME(gemm_rows)(const pg_qtensor *w, int32_t m0, int32_t m1, const uint8_t *q,
                                    const float *scale, const int32_t *zp, int32_t N, float *y) {
    const int32_t K = w->K, G = w->G, ngroups = K / G, cols = G == 32 ? 32 : 64;
    _Alignas(64) uint8_t bbuf[AMX_SPAN * 16], abuf[16 * AMX_SPAN];
    _Alignas(64) int32_t cbuf[16][16];
    _Alignas(64) float dbuf[AMX_SPAN / 32][16], fsum[AMX_TOKENS][16];
    NAME(tilecfg) cfg;
    T_STATE;
    NAME(config)(&cfg, cols);
    T_CONFIG(&cfg); /* on every call: a pool thread (or a forked child's caller) may not have it yet */
    for (int32_t t0 = 0; t0 < N; t0 += AMX_TOKENS) {
        const int32_t t1 = N - t0 < AMX_TOKENS ? N : t0 + AMX_TOKENS;
        for (int32_t p0 = m0; p0 < m1; p0 += 16) {
            const int rows = m1 - p0 < 16 ? m1 - p0 : 16;
            for (int32_t k0 = 0; k0 < K; k0 += AMX_SPAN) {
                const int32_t k1 = K - k0 < AMX_SPAN ? K : k0 + AMX_SPAN;
                NAME(make_b)(w, p0, rows, k0, k1, bbuf);
                for (int32_t g = k0 / G; g < k1 / G; g++) /* dbuf[g]: the 16 rows' scales of group g */
                    for (int n = 0; n < 16; n++) dbuf[g - k0 / G][n] = n < rows ? _cvtsh_ss(w->scales[(int64_t)(p0 + n) * ngroups + g]) : 0.0f;
                __asm__ volatile("" ::: "memory"); /* the tile loads read bbuf: the compiler cannot see it */
                for (int32_t n0 = t0; n0 < t1; n0 += 16) {
                    const uint8_t *a = q + (int64_t)n0 * K + k0;
                    int64_t stride = K;
                    if (t1 - n0 < 16) { /* the last tokens: a zero-padded copy, never read past q */
                        memset(abuf, 0, sizeof abuf);
                        for (int32_t n = n0; n < t1; n++) memcpy(abuf + (n - n0) * AMX_SPAN, q + (int64_t)n * K + k0, (size_t)(k1 - k0));
                        a = abuf, stride = AMX_SPAN;
                        __asm__ volatile("" ::: "memory");
                    }
                    for (int32_t g0 = k0; g0 < k1; g0 += G) {
                        T_ZERO(0);
                        for (int32_t c = g0; c < g0 + G; c += cols) {
                            T_LOAD(1, a + (c - k0), stride);
                            T_LOAD(2, bbuf + (c - k0) * 16, 64);
                            T_DPBUSD(0, 1, 2);
                        }
                        T_STORE(0, cbuf, 64);
                        const W512F d = W_LOADF(dbuf[(g0 - k0) / G]);
                        for (int32_t n = n0; n < n0 + 16 && n < t1; n++) { /* a multiply, then an add */
                            float *f = fsum[n - t0];
                            const W512F prod = W_MULF(W_CVTF(W_LOAD((const uint8_t *)cbuf[n - n0])), d);
                            W_STOREF(f, W_ADDF(g0 == 0 ? W_ZEROF() : W_LOADF(f), prod)); /* 0 + x, as every path */
                        }
                    }
                }
            }
            for (int32_t n = t0; n < t1; n++)
                for (int r = 0; r < rows; r++)
                    y[(int64_t)n * w->M + p0 + r] = scale[n] * (fsum[n - t0][r] - (float)zp[n] * w->rowsum[p0 + r]);
        }
    }
    T_RELEASE();
}

#undef AMX_SPAN
#undef AMX_TOKENS
