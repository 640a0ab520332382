/* Public entry points: pick the kernel table for this CPU and split work over the pool. */
#include <stdlib.h>
#include <string.h>
#include "kernels.h"
#if defined(__aarch64__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

#define ROW_TILE 16 /* task boundaries fall on multiples of this, wider than any microkernel */

static const pg_kernels *active = &pg_kernels_scalar; /* the dispatch table */

/* Kernel tables this CPU can run, best first, NULL-terminated. */
static int supported(const pg_kernels **out) {
    int n = 0;
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) out[n++] = &pg_kernels_avx2;
#endif
#if defined(__aarch64__) /* ASIMD is part of every ARMv8-A core; dotprod is optional */
    if (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) out[n++] = &pg_kernels_neon_dotprod;
    out[n++] = &pg_kernels_neon;
#endif
    out[n++] = &pg_kernels_scalar;
    out[n] = NULL;
    return n;
}

__attribute__((constructor)) static void pick_best(void) {
    const pg_kernels *k[8];
    supported(k);
    active = k[0];
}

const char *pg_isa(void) { return active->name; }

int pg_set_isa(const char *name) {
    const pg_kernels *k[8];
    for (int i = 0, n = supported(k); i < n; i++) {
        if (strcmp(k[i]->name, name) == 0) {
            active = k[i];
            return 0;
        }
    }
    return -1;
}

int pg_threads(void) { return pg_pool_size(); }
void pg_set_threads(int n) { pg_pool_resize(n); }

typedef struct {
    const pg_qtensor *w;
    const float *x;
    const int32_t *rows;
    const uint8_t *q;
    const float *scale;
    const int32_t *zp;
    int32_t N, rows_per_task;
    float *y;
    uint8_t *qout;
    float *sout;
    int32_t *zout;
} job;

static void quantize_task(void *ctx, int32_t n) {
    job *j = ctx;
    int64_t K = j->w->K;
    active->quantize_row(j->x + n * K, (int32_t)K, j->qout + n * K, j->sout + n, j->zout + n);
}

void pg_quantize_acts(const float *x, int32_t N, int32_t K, uint8_t *q, float *scale, int32_t *zp) {
    pg_qtensor shape = {.K = K};
    job j = {.w = &shape, .x = x, .qout = q, .sout = scale, .zout = zp};
    pg_pool_run(quantize_task, &j, N);
}

/* Tasks of whole ROW_TILEs, about four per thread so that uneven progress evens out. */
static int32_t rows_per_task(int32_t M) {
    int32_t tiles = (M + ROW_TILE - 1) / ROW_TILE, per = tiles / (4 * pg_pool_size());
    return (per > 0 ? per : 1) * ROW_TILE;
}

static void gemm_task(void *ctx, int32_t t) {
    job *j = ctx;
    int32_t m0 = t * j->rows_per_task, m1 = m0 + j->rows_per_task;
    if (m1 > j->w->M) m1 = j->w->M;
    if (j->N == 1)
        active->gemv_rows(j->w, m0, m1, j->q, j->scale[0], j->zp[0], j->y);
    else
        active->gemm_rows(j->w, m0, m1, j->q, j->scale, j->zp, j->N, j->y);
}

static void run_rows(job *j) {
    j->rows_per_task = rows_per_task(j->w->M);
    pg_pool_run(gemm_task, j, (j->w->M + j->rows_per_task - 1) / j->rows_per_task);
}

void pg_gemm(const pg_qtensor *w, const uint8_t *q, const float *scale, const int32_t *zp,
             int32_t N, float *y) {
    job j = {.w = w, .q = q, .scale = scale, .zp = zp, .N = N, .y = y};
    run_rows(&j);
}

void pg_gemv(const pg_qtensor *w, const float *x, float *y) {
    uint8_t *q = malloc((size_t)w->K);
    float scale;
    int32_t zp;
    if (!q) abort();
    active->quantize_row(x, w->K, q, &scale, &zp);
    job j = {.w = w, .q = q, .scale = &scale, .zp = &zp, .N = 1, .y = y};
    run_rows(&j);
    free(q);
}

static void dequant_task(void *ctx, int32_t i) {
    job *j = ctx;
    active->dequant_row(j->w, j->rows[i], j->y + (int64_t)i * j->w->K);
}

void pg_dequant_rows(const pg_qtensor *w, const int32_t *rows, int32_t n, float *out) {
    job j = {.w = w, .rows = rows, .y = out};
    pg_pool_run(dequant_task, &j, n);
}

typedef struct {
    const uint64_t *words;
    int64_t n, per_task;
    uint64_t sums[256];
} read_job;

static void read_task(void *ctx, int32_t t) {
    read_job *j = ctx;
    int64_t a = t * j->per_task, b = a + j->per_task < j->n ? a + j->per_task : j->n;
    uint64_t s[4] = {0}; /* independent sums, so the adds never limit the loads */
    int64_t i = a;
    for (; i + 4 <= b; i += 4)
        for (int u = 0; u < 4; u++) s[u] += j->words[i + u];
    for (; i < b; i++) s[0] += j->words[i];
    j->sums[t] = s[0] + s[1] + s[2] + s[3];
}

uint64_t pg_stream_read(const uint8_t *buf, int64_t n) {
    read_job j = {.words = (const uint64_t *)buf, .n = n / 8};
    int32_t tasks = 4 * pg_pool_size() > 256 ? 256 : 4 * pg_pool_size();
    j.per_task = (j.n + tasks - 1) / tasks;
    pg_pool_run(read_task, &j, tasks);
    uint64_t s = 0;
    for (int32_t t = 0; t < tasks; t++) s += j.sums[t];
    return s;
}
