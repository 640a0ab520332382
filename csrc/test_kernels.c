/* Standalone test of every kernel path this CPU runs against the scalar path, without Python
 * (products, quantization, attention, rotary embeddings, SwiGLU, RMSNorm + quantization, the
 * converter's float products):
 * cross-compiled for aarch64 and run under qemu by tests/test_neon.py, built with
 * -fsanitize=address,undefined and -fsanitize=thread by tests/test_sanitize.py.
 * Usage: test_kernels [seed [cases [stress_rounds]]]. Prints the path chosen at load, one line
 * per path tested, then the pool stress test; exits 1 at the first mismatch. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "kernels.h"

/* Every path computes the same exact int32 group sums and then the scalar path's float
 * operations in its order: each must match scalar bit for bit. */
static const char *PATHS[] = {"avx2", "avxvnni", "avx512vnni", "amx", "vnni-emulated", "avx512vnni-emulated", "amx-emulated",
                              "neon", "neon-dotprod", "neon-i8mm"};

static uint64_t rng_state;
static uint32_t rnd(void) { /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 2685821657736338717ULL) >> 32);
}
static int rnd_int(int lo, int hi) { return lo + (int)(rnd() % (uint32_t)(hi - lo + 1)); }
static float rnd_unit(void) { return (float)rnd() / 4294967296.0f * 2.0f - 1.0f; }

typedef struct {
    int32_t M, K, G, N;
    int8_t *wq;       /* [M][K] values -8..7 */
    pg_qtensor w;
    float *x;         /* [N][K] */
} test_case;

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) abort();
    return p;
}

/* A random case; exact: power-of-two scales and activations quantized without rounding. */
static test_case make_case(int exact) {
    static const int32_t groups[] = {32, 64, 128, 256};
    test_case c;
    c.G = groups[rnd_int(0, 3)];
    const int32_t unit = c.G < 64 ? 64 : c.G, large = rnd() % 8 == 0; /* spans of columns, blocks of tokens */
    c.K = unit * (large ? rnd_int(1, 3000 / unit) : rnd_int(1, 4));
    /* tasks are 16 rows unless a thread has 8 tiles or more: then rows go 32 at a time (AMX) */
    c.M = rnd() % 4 == 0 ? rnd_int(113, 160) : rnd_int(1, 40);
    c.N = large ? rnd_int(10, 300) : rnd_int(1, 9);
    int32_t ng = c.K / c.G;
    uint8_t *qs = xmalloc((size_t)c.M * c.K / 2);
    uint16_t *scales = xmalloc(sizeof(uint16_t) * c.M * ng);
    float *rowsum = xmalloc(sizeof(float) * c.M);
    c.wq = xmalloc((size_t)c.M * c.K);
    c.x = xmalloc(sizeof(float) * c.N * c.K);
    for (int32_t i = 0; i < c.M * c.K; i++) c.wq[i] = (int8_t)rnd_int(-8, 7);
    for (int32_t m = 0; m < c.M; m++)
        for (int32_t b = 0; b < c.K / 64; b++)
            for (int i = 0; i < 32; i++)
                qs[(int64_t)m * c.K / 2 + 32 * b + i] =
                    (uint8_t)((c.wq[m * c.K + 64 * b + i] + 8) | (c.wq[m * c.K + 64 * b + 32 + i] + 8) << 4);
    for (int32_t i = 0; i < c.M * ng; i++) {
        uint16_t sign = (uint16_t)(rnd() & 1) << 15;
        if (exact) scales[i] = sign | (uint16_t)(rnd_int(14, 16) << 10);  /* +-1/2, 1, 2 */
        else if (rnd() % 10 == 0) scales[i] = 0;
        else scales[i] = sign | (uint16_t)(rnd_int(0, 30) << 10) | (uint16_t)(rnd() & 0x3FF);  /* subnormal..65504 */
    }
    for (int32_t m = 0; m < c.M; m++) {
        double r = 0;
        for (int32_t g = 0; g < ng; g++) {
            int32_t s = 0;
            for (int32_t k = g * c.G; k < (g + 1) * c.G; k++) s += c.wq[m * c.K + k];
            r += (double)pg_f16_to_f32(scales[m * ng + g]) * s;
        }
        rowsum[m] = (float)r;
    }
    float mag = exact ? 1.0f : powf(10.0f, (float)rnd_int(-20, 20));
    for (int32_t i = 0; i < c.N * c.K; i++) c.x[i] = exact ? (float)rnd_int(-128, 127) / 128.0f : rnd_unit() * mag;
    if (exact)
        for (int32_t n = 0; n < c.N; n++) c.x[n * c.K] = -1.0f, c.x[n * c.K + 1] = 127.0f / 128.0f;
    c.w = (pg_qtensor){qs, scales, rowsum, c.M, c.K, c.G};
    return c;
}

static void free_case(test_case *c) {
    free((void *)c->w.qs);
    free((void *)c->w.scales);
    free((void *)c->w.rowsum);
    free(c->wq);
    free(c->x);
}

typedef struct {
    uint8_t *q;
    float *scale, *y, *yv, *deq;
    int32_t *zp;
} results;

static pg_pool *pool; /* the pool every kernel of run() uses: NULL (caller alone) or 3 threads */

static results run(const test_case *c) {
    results r = {xmalloc((size_t)c->N * c->K), xmalloc(sizeof(float) * c->N), xmalloc(sizeof(float) * c->N * c->M),
                 xmalloc(sizeof(float) * c->M), xmalloc(sizeof(float) * c->M * c->K), xmalloc(sizeof(int32_t) * c->N)};
    int32_t *rows = xmalloc(sizeof(int32_t) * c->M);
    for (int32_t m = 0; m < c->M; m++) rows[m] = c->M - 1 - m;
    pg_quantize_acts(pool, c->x, c->N, c->K, r.q, r.scale, r.zp);
    if (pg_gemm(pool, &c->w, r.q, r.scale, r.zp, c->N, r.y) != 0) abort();
    if (pg_gemv(pool, &c->w, c->x + (int64_t)(c->N - 1) * c->K, r.yv) != 0) abort();
    pg_dequant_rows(pool, &c->w, rows, c->M, r.deq);
    free(rows);
    return r;
}

static void free_results(results *r) {
    free(r->q), free(r->scale), free(r->y), free(r->yv), free(r->deq), free(r->zp);
}

/* Equal bits, or both NaN (a NaN's payload may depend on the order of an operation's operands). */
static int same_floats(const float *a, const float *b, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (memcmp(a + i, b + i, 4) && !(isnan(a[i]) && isnan(b[i]))) return 0;
    return 1;
}

static int fail(const char *path, int case_no, const char *what) {
    printf("FAIL %s case %d: %s\n", path, case_no, what);
    return 1;
}

static int compare(const char *path, int case_no, const test_case *c, const results *ref, const results *got) {
    if (memcmp(ref->q, got->q, (size_t)c->N * c->K) || memcmp(ref->scale, got->scale, sizeof(float) * c->N) ||
        memcmp(ref->zp, got->zp, sizeof(int32_t) * c->N))
        return fail(path, case_no, "quantize_acts differs");
    if (memcmp(ref->deq, got->deq, sizeof(float) * c->M * c->K)) return fail(path, case_no, "dequant_rows differs");
    if (!same_floats(ref->y, got->y, (int64_t)c->N * c->M) || !same_floats(ref->yv, got->yv, c->M))
        return fail(path, case_no, "gemm/gemv not bit-identical to scalar");
    return 0;
}

/* Attention of random queries against a random cache, every path against scalar, bit for bit
 * (the sums' order is fixed), including a non-finite key: its heads must come out NaN. */
static int attention_case(const char *path, int case_no) {
    /* head sizes up to 8B's 128; a quarter of the cases past pg_attention's first tile of 64
     * positions (the weighted sums' later tiles add to the first's) */
    const int32_t hd = rnd() % 4 ? 8 * rnd_int(1, 8) : 128, n_kv = rnd_int(1, 3), group = rnd_int(1, 4), n_heads = n_kv * group;
    const int32_t start = rnd() % 4 ? rnd_int(0, 40) : rnd_int(60, 300), n = rnd_int(1, 9), len = start + n, stride = (len + 3) * hd;
    float *q = xmalloc(sizeof(float) * n * n_heads * hd), *k = xmalloc(sizeof(float) * n_kv * stride),
          *v = xmalloc(sizeof(float) * n_kv * stride), *ref = xmalloc(sizeof(float) * n * n_heads * hd),
          *got = xmalloc(sizeof(float) * n * n_heads * hd);
    for (int32_t i = 0; i < n * n_heads * hd; i++) q[i] = rnd_unit() * 4.0f;
    for (int32_t i = 0; i < n_kv * stride; i++) k[i] = rnd_unit(), v[i] = rnd_unit();
    int poison = case_no % 4 == 0;
    if (poison) k[rnd_int(0, len - 1) * hd] = (case_no / 4) % 2 ? NAN : INFINITY; /* head 0 */
    const float scale = 1.0f / sqrtf((float)hd);
    int bad = 0;
    pg_set_isa("scalar");
    bad |= pg_attention(NULL, q, k, v, stride, n, start, n_heads, n_kv, hd, scale, ref);
    pg_set_isa(path);
    bad |= pg_attention(pool, q, k, v, stride, n, start, n_heads, n_kv, hd, scale, got);
    if (bad) return fail(path, case_no, "attention out of memory");
    if (memcmp(ref, got, sizeof(float) * n * n_heads * hd)) return fail(path, case_no, "attention not bit-identical to scalar");
    if (poison && !isnan(got[(n - 1) * n_heads * hd])) return fail(path, case_no, "non-finite key gave a finite attention");
    free(q), free(k), free(v), free(ref), free(got);
    return 0;
}

/* Random values of magnitude 10^-20..10^20, one in 40 a special value (NaN, inf, 0, -0, exp's
 * clamp, the largest floats, a subnormal). */
static void fill(float *x, int64_t n) {
    static const float special[] = {NAN, INFINITY, -INFINITY, 0.0f, -0.0f, -87.0f, -88.7f, 88.7f, 1e-45f, 3e38f, -3e38f};
    const float mag = powf(10.0f, (float)rnd_int(-20, 20));
    for (int64_t i = 0; i < n; i++)
        x[i] = rnd() % 40 ? rnd_unit() * mag : special[rnd() % (sizeof special / sizeof *special)];
}

/* n rows of K normalized and quantized: q, scale, zp as the scalar path's. */
static int norm_case(const char *path, int case_no, int32_t n, int32_t K) {
    float *x = xmalloc(sizeof(float) * n * K), *w = xmalloc(sizeof(float) * K), s[2][9];
    uint8_t *q[2] = {xmalloc((size_t)n * K), xmalloc((size_t)n * K)};
    int32_t zp[2][9];
    fill(x, (int64_t)n * K);
    for (int32_t k = 0; k < K; k++) w[k] = rnd_unit();
    int bad = 0;
    for (int r = 0; r < 2; r++) {
        pg_set_isa(r ? path : "scalar");
        bad |= pg_norm_quantize(r ? pool : NULL, x, n, K, w, 1e-5f, q[r], s[r], zp[r]);
    }
    bad = bad ? fail(path, case_no, "norm_quantize out of memory")
        : memcmp(q[0], q[1], (size_t)n * K) || !same_floats(s[0], s[1], n) || memcmp(zp[0], zp[1], sizeof(int32_t) * n)
            ? fail(path, case_no, "norm_quantize not bit-identical to scalar") : 0;
    free(x), free(w), free(q[0]), free(q[1]);
    return bad;
}

/* The converter's float products: m, n ragged against every tile (sometimes past a 256-row
 * block), k past a 256 block or 0, rows padded (lda, ldb, ldc beyond k, k, n). */
static int sgemm_case(const char *path, int case_no) {
    const int32_t m = rnd() % 8 ? rnd_int(1, 40) : rnd_int(200, 300), n = rnd_int(1, 70), k = rnd() % 10 ? rnd_int(1, 300) : rnd_int(0, 600);
    const int64_t lda = k + rnd_int(0, 3), ldb = k + rnd_int(0, 3), ldc = n + rnd_int(0, 3);
    float *a = xmalloc(sizeof(float) * m * lda), *b = xmalloc(sizeof(float) * n * ldb), *c[2];
    fill(a, m * lda);
    fill(b, n * ldb);
    int bad = 0;
    for (int r = 0; r < 2; r++) {
        c[r] = xmalloc(sizeof(float) * m * ldc);
        for (int64_t i = 0; i < m * ldc; i++) c[r][i] = -1.0f; /* the padding must stay */
        pg_set_isa(r ? path : "scalar");
        bad |= pg_sgemm(r ? pool : NULL, a, lda, b, ldb, m, n, k, c[r], ldc);
    }
    bad = bad ? fail(path, case_no, "sgemm out of memory")
        : !same_floats(c[0], c[1], m * ldc) ? fail(path, case_no, "sgemm not bit-identical to scalar") : 0;
    for (int32_t i = 0; i < m && !bad; i++)
        for (int64_t j = n; j < ldc; j++)
            if (c[1][i * ldc + j] != -1.0f) bad = fail(path, case_no, "sgemm wrote past its columns");
    free(a), free(b), free(c[0]), free(c[1]);
    return bad;
}

/* The converter's inverse Hessian factor (no per-path code): U^T U h = I to float32 accuracy
 * on h = B B^T / n + I, and a matrix that is not positive definite refused. */
static int factor_case(int case_no) {
    const int32_t n = rnd_int(1, 60);
    float *b = xmalloc(sizeof(float) * n * n), *h = xmalloc(sizeof(float) * n * n), *u = xmalloc(sizeof(float) * n * n);
    for (int32_t i = 0; i < n * n; i++) b[i] = rnd_unit();
    for (int32_t i = 0; i < n; i++)
        for (int32_t j = 0; j < n; j++) {
            double acc = i == j;
            for (int32_t k = 0; k < n; k++) acc += (double)b[i * n + k] * b[j * n + k] / n;
            h[i * n + j] = (float)acc;
        }
    int bad = pg_upper_inverse(h, n, u) ? fail("factor", case_no, "a positive definite matrix refused") : 0;
    for (int32_t i = 0; i < n && !bad; i++) /* (U^T U h)[i][j] */
        for (int32_t j = 0; j < n && !bad; j++) {
            double e = 0;
            for (int32_t k = 0; k < n; k++) {
                double utu = 0;
                for (int32_t r = 0; r < n; r++) utu += (double)u[r * n + i] * u[r * n + k];
                e += utu * h[k * n + j];
            }
            if (fabs(e - (i == j)) > 1e-4) bad = fail("factor", case_no, "U^T U h is not the identity");
        }
    h[0] = -1.0f;
    if (!bad && pg_upper_inverse(h, n, u) != 1) bad = fail("factor", case_no, "a matrix that is not positive definite accepted");
    free(b), free(h), free(u);
    return bad;
}

/* Rotary embeddings (any even head size: SIMD tails; heads past `heads` untouched), SwiGLU
 * (lengths with tails) and RMSNorm + quantization (K % 8 == 0) of random rows, every path
 * against scalar. */
static int fused_case(const char *path, int case_no) {
    const int32_t n = rnd_int(1, 9), heads = rnd_int(1, 5), hd = 2 * rnd_int(1, 40), width = (heads + rnd_int(0, 2)) * hd;
    const int32_t hidden = rnd_int(1, 100), K = 8 * rnd_int(1, 40);
    float *x = xmalloc(sizeof(float) * n * width), *xr = xmalloc(sizeof(float) * n * width), *cs = xmalloc(sizeof(float) * n * hd),
          *gu = xmalloc(sizeof(float) * n * 2 * hidden), *ref = xmalloc(sizeof(float) * n * hidden), *got = xmalloc(sizeof(float) * n * hidden);
    fill(x, (int64_t)n * width);
    for (int32_t i = 0; i < n * hd; i++) cs[i] = rnd_unit(); /* cos [n][hd/2], then sin */
    fill(gu, (int64_t)n * 2 * hidden);
    memcpy(xr, x, sizeof(float) * n * width);
    pg_set_isa("scalar");
    pg_rope(NULL, xr, n, width, heads, hd, cs, cs + n * hd / 2);
    pg_swiglu(NULL, gu, n, hidden, ref);
    pg_set_isa(path);
    pg_rope(pool, x, n, width, heads, hd, cs, cs + n * hd / 2);
    pg_swiglu(pool, gu, n, hidden, got);
    int bad = !same_floats(x, xr, (int64_t)n * width) ? fail(path, case_no, "rope not bit-identical to scalar")
            : !same_floats(got, ref, (int64_t)n * hidden) ? fail(path, case_no, "swiglu not bit-identical to scalar") : 0;
    free(x), free(xr), free(cs), free(gu), free(ref), free(got);
    return bad || norm_case(path, case_no, n, K) || sgemm_case(path, case_no);
}


/* The worst case of the int16 group sums: activations 255, weights -8, group 256, per path. */
static int worst_case_sum(const char *path) {
    const int32_t M = 2, K = 512, G = 256;
    uint8_t *qs = xmalloc((size_t)M * K / 2), *q = xmalloc(K);
    uint16_t scales[4] = {0x3C00, 0x3C00, 0x3C00, 0x3C00}; /* 1.0 */
    float rowsum[2] = {-8.0f * K, -8.0f * K}, x[512], y[2];
    int32_t zp = 0;
    float s = 1.0f;
    memset(qs, 0x00, (size_t)M * K / 2); /* nibbles 0: weight -8 */
    memset(q, 255, K);
    for (int32_t i = 0; i < K; i++) x[i] = 1.0f;
    pg_set_isa(path);
    pg_qtensor w = {qs, scales, rowsum, M, K, G};
    if (pg_gemm(pool, &w, q, &s, &zp, 1, y) != 0) abort();
    int bad = y[0] != -8.0f * 255 * K || y[1] != y[0];
    if (pg_gemv(pool, &w, x, y) != 0) abort();
    bad |= y[0] != -8.0f * K; /* x = 1 quantizes to 255 with scale 1/255 */
    free(qs), free(q);
    return bad ? fail(path, 0, "worst-case int16 group sum overflowed") : 0;
}

/* Back-to-back jobs of very different task counts on a 2-thread pool (a 2-task gemv, a
 * many-task gemm with M large enough that task boundaries move with the thread count, an
 * attention): every result must equal the first run's. The old pool let a worker carry a
 * task number into the next job; ThreadSanitizer also watches this. */
static int stress(int rounds) {
    pg_set_isa(PATHS[0]);
    pg_pool *p2 = pg_pool_new(2);
    if (!p2) return fail("pool", 0, "cannot create a pool");
    const int32_t K = 256, small_m = 32, big_m = 1000;
    uint8_t *qs = xmalloc((size_t)big_m * K / 2);
    uint16_t *sc = xmalloc(sizeof(uint16_t) * big_m * K / 32);
    float *rs = xmalloc(sizeof(float) * big_m), *x = xmalloc(sizeof(float) * 4 * K), *y = xmalloc(sizeof(float) * 4 * big_m),
          *ys = xmalloc(sizeof(float) * small_m), *y0 = xmalloc(sizeof(float) * 4 * big_m), *ys0 = xmalloc(sizeof(float) * small_m);
    uint8_t *q = xmalloc(4 * K);
    float scale[4];
    int32_t zp[4];
    for (int32_t i = 0; i < big_m * K / 2; i++) qs[i] = (uint8_t)rnd();
    for (int32_t i = 0; i < big_m * K / 32; i++) sc[i] = (uint16_t)(0x2C00 | (rnd() & 0x3FF));
    for (int32_t i = 0; i < big_m; i++) rs[i] = rnd_unit();
    for (int32_t i = 0; i < 4 * K; i++) x[i] = rnd_unit();
    pg_qtensor big = {qs, sc, rs, big_m, K, 32}, small = {qs, sc, rs, small_m, K, 32};
    int bad = 0;
    for (int r = 0; r < rounds && !bad; r++) {
        float *out = r ? y : y0, *outs = r ? ys : ys0;
        if (pg_gemv(p2, &small, x, outs) != 0) abort();
        pg_quantize_acts(p2, x, 4, K, q, scale, zp);
        if (pg_gemm(p2, &big, q, scale, zp, 4, out) != 0) abort();
        if (r) bad = memcmp(y, y0, sizeof(float) * 4 * big_m) || memcmp(ys, ys0, sizeof(float) * small_m);
    }
    pg_pool_free(p2);
    free(qs), free(sc), free(rs), free(x), free(y), free(ys), free(y0), free(ys0), free(q);
    if (bad) return fail("pool", 0, "results changed between identical jobs");
    printf("ok pool: %d rounds of back-to-back jobs\n", rounds);
    return 0;
}

int main(int argc, char **argv) {
    rng_state = argc > 1 ? strtoull(argv[1], NULL, 10) * 2654435761ULL + 1 : 88172645463325252ULL;
    int cases = argc > 2 ? atoi(argv[2]) : 200, rounds = argc > 3 ? atoi(argv[3]) : 2000;
    printf("best: %s\n", pg_isa());
    pg_pool *pool3 = pg_pool_new(3);
    if (!pool3) return fail("pool", 0, "cannot create a pool");
    int tested = 0;
    for (size_t p = 0; p < sizeof PATHS / sizeof *PATHS; p++) {
        if (pg_set_isa(PATHS[p]) != 0) continue;
        for (int i = 0; i < cases; i++) {
            test_case c = make_case(i % 3 == 0);
            pg_set_isa("scalar");
            pool = NULL;
            results ref = run(&c);
            pg_set_isa(PATHS[p]);
            int bad = 0;
            for (int threads = 1; threads <= 3 && !bad; threads += 2) {
                pool = threads == 1 ? NULL : pool3;
                results got = run(&c);
                bad = compare(PATHS[p], i, &c, &ref, &got);
                free_results(&got);
            }
            free_results(&ref);
            free_case(&c);
            pool = pool3;
            if (bad || attention_case(PATHS[p], i) || fused_case(PATHS[p], i)) return 1;
        }
        pool = pool3;
        if (worst_case_sum(PATHS[p]) || worst_case_sum("scalar")) return 1;
        printf("ok %s: %d cases (bit-identical to scalar)\n", PATHS[p], cases);
        tested++;
    }
    pg_pool_free(pool3);
    printf("%d SIMD paths tested\n", tested);
    for (int i = 0; i < 20; i++)
        if (factor_case(i)) return 1;
    printf("factor: 20 cases ok\n");
    return stress(rounds);
}
