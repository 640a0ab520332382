/* Standalone test of every kernel path this CPU runs against the scalar path, without Python:
 * cross-compiled for aarch64 and run under qemu by tests/test_neon.py, built with
 * -fsanitize=address,undefined by tests/test_sanitize.py. Usage: test_kernels [seed [cases]].
 * Prints the path chosen at load, one line per path tested; exits 1 at the first mismatch. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "kernels.h"

static const char *PATHS[] = {"avx2", "neon", "neon-dotprod"};
/* paths whose float work follows the scalar order exactly: they must match bit for bit */
static int exact_path(const char *name) { return strncmp(name, "neon", 4) == 0; }

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
    c.K = (c.G < 64 ? 64 : c.G) * rnd_int(1, 4);
    c.M = rnd_int(1, 40);
    c.N = rnd_int(1, 9);
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

static results run(const test_case *c) {
    results r = {xmalloc((size_t)c->N * c->K), xmalloc(sizeof(float) * c->N), xmalloc(sizeof(float) * c->N * c->M),
                 xmalloc(sizeof(float) * c->M), xmalloc(sizeof(float) * c->M * c->K), xmalloc(sizeof(int32_t) * c->N)};
    int32_t *rows = xmalloc(sizeof(int32_t) * c->M);
    for (int32_t m = 0; m < c->M; m++) rows[m] = c->M - 1 - m;
    pg_quantize_acts(c->x, c->N, c->K, r.q, r.scale, r.zp);
    pg_gemm(&c->w, r.q, r.scale, r.zp, c->N, r.y);
    pg_gemv(&c->w, c->x + (int64_t)(c->N - 1) * c->K, r.yv);
    pg_dequant_rows(&c->w, rows, c->M, r.deq);
    free(rows);
    return r;
}

static void free_results(results *r) {
    free(r->q), free(r->scale), free(r->y), free(r->yv), free(r->deq), free(r->zp);
}

/* Largest difference two correct float evaluations of output (n, m) may show: twice the
 * rounding bound of any summation order (see tests/test_kernels.py::_bound). */
static double bound(const test_case *c, const results *ref, int32_t n, int32_t m) {
    double t = 0;
    for (int32_t k = 0; k < c->K; k++)
        t += fabs(pg_f16_to_f32(c->w.scales[m * (c->K / c->G) + k / c->G])) * ref->q[n * c->K + k] * abs(c->wq[m * c->K + k]);
    t += fabs((double)ref->zp[n] * c->w.rowsum[m]);
    return 2.0 * (c->K / c->G + 12) * 1.1920929e-7 * ref->scale[n] * t + 1e-38;
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
    int exact = exact_path(path);
    for (int32_t n = 0; n < c->N; n++)
        for (int32_t m = 0; m < c->M; m++) {
            float a = ref->y[n * c->M + m], b = got->y[n * c->M + m];
            float av = n == c->N - 1 ? ref->yv[m] : a, bv = n == c->N - 1 ? got->yv[m] : b;
            if (exact ? (memcmp(&a, &b, 4) || memcmp(&av, &bv, 4))
                      : (fabs((double)a - b) > bound(c, ref, n, m) || fabs((double)av - bv) > bound(c, ref, n, m)))
                return fail(path, case_no, exact ? "gemm/gemv not bit-identical to scalar" : "gemm/gemv beyond rounding bound");
        }
    return 0;
}

int main(int argc, char **argv) {
    rng_state = argc > 1 ? strtoull(argv[1], NULL, 10) * 2654435761ULL + 1 : 88172645463325252ULL;
    int cases = argc > 2 ? atoi(argv[2]) : 200;
    printf("best: %s\n", pg_isa());
    int tested = 0;
    for (size_t p = 0; p < sizeof PATHS / sizeof *PATHS; p++) {
        if (pg_set_isa(PATHS[p]) != 0) continue;
        for (int i = 0; i < cases; i++) {
            test_case c = make_case(i % 3 == 0);
            pg_set_isa("scalar");
            pg_set_threads(1);
            results ref = run(&c);
            pg_set_isa(PATHS[p]);
            int bad = 0;
            for (int threads = 1; threads <= 3 && !bad; threads += 2) {
                pg_set_threads(threads);
                results got = run(&c);
                bad = compare(PATHS[p], i, &c, &ref, &got);
                free_results(&got);
            }
            free_results(&ref);
            free_case(&c);
            if (bad) return 1;
        }
        printf("ok %s: %d cases (%s scalar)\n", PATHS[p], cases, exact_path(PATHS[p]) ? "bit-identical to" : "within rounding of");
        tested++;
    }
    pg_set_threads(1);
    printf("%d SIMD paths tested\n", tested);
    return 0;
}
