#define _GNU_SOURCE /* syscall() */
/* Public entry points: pick the kernel table for this CPU and split work over the pool. */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include "kernels.h"
#if defined(__aarch64__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#ifndef AT_HWCAP2
#define AT_HWCAP2 26
#endif
#ifndef HWCAP2_I8MM
#define HWCAP2_I8MM (1 << 13)
#endif
#endif

#define ROW_TILE 16 /* task boundaries fall on multiples of this, wider than any microkernel */

/* The dispatch table; atomic because set_isa may run while another thread's job starts. */
static _Atomic(const pg_kernels *) active = &pg_kernels_scalar;

#if defined(__x86_64__)
#include <cpuid.h>
#include <errno.h>
#include <sys/syscall.h>
#include <unistd.h>
#define ARCH_REQ_XCOMP_PERM 0x1023 /* Linux: ask for an extended state component */
#define XFEATURE_XTILEDATA 18

/* The state the OS saves on context switches: EVEX instructions (even on ymm registers) need
 * the AVX-512 state enabled, which the CPUID feature bits alone do not tell. */
static uint64_t xcr0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (uint64_t)hi << 32 | lo;
}
#endif

#if defined(__x86_64__)
/* NULL if this process may run AMX-INT8 code, else why not: the CPU reports AMX-TILE and
 * AMX-INT8, the OS saves tile state (XCR0 bits 17, 18), and Linux grants this process the tile
 * data (a per-process permission, kept across fork; asking again is harmless). */
static const char *amx_missing(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & 1u << 24) || !(d & 1u << 25)) return "the CPU lacks AMX-TILE or AMX-INT8";
    if ((xcr0() & 0x60000) != 0x60000) return "the OS does not enable tile state (XCR0)";
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0) return NULL;
    if (errno == ENOSPC) /* Linux checks every thread's sigaltstack against the larger signal frame */
        return "Linux refused the tile data permission (ENOSPC: a thread's alternate signal stack is too small for tile state)";
    if (errno == EPERM) return "Linux refused the tile data permission (EPERM: a seccomp filter or sandbox blocks arch_prctl)";
    return "Linux refused the tile data permission";
}
#endif

/* Kernel tables this CPU can run, best first, NULL-terminated. */
static int supported(const pg_kernels **out) {
    int n = 0;
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) { /* implies OSXSAVE and ymm state */
        const uint64_t avx512_state = 0xE6; /* XCR0: SSE, AVX, opmask, zmm upper halves, zmm16-31 */
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
            __builtin_cpu_supports("avx512vnni") && (xcr0() & avx512_state) == avx512_state) {
            if (!amx_missing()) out[n++] = &pg_kernels_amx; /* its GEMV is avx512vnni's */
            out[n++] = &pg_kernels_avx512vnni; /* zmm: twice avxvnni's work per instruction */
        }
        if (__builtin_cpu_supports("avxvnni")) out[n++] = &pg_kernels_avxvnni;
        out[n++] = &pg_kernels_avx2;
#ifdef PG_VNNI_EMULATION
        out[n++] = &pg_kernels_vnni_emulated; /* below avx2: tested, never chosen */
        out[n++] = &pg_kernels_avx512vnni_emulated;
        out[n++] = &pg_kernels_amx_emulated;
#endif
    }
#endif
#if defined(__aarch64__) /* ASIMD is part of every ARMv8-A core; dotprod and i8mm are optional */
    if (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) {
        if (getauxval(AT_HWCAP2) & HWCAP2_I8MM) out[n++] = &pg_kernels_neon_i8mm; /* its GEMV is neon-dotprod's */
        out[n++] = &pg_kernels_neon_dotprod;
    }
    out[n++] = &pg_kernels_neon;
#endif
    out[n++] = &pg_kernels_scalar;
    out[n] = NULL;
    return n;
}

__attribute__((constructor)) static void pick_best(void) {
    const pg_kernels *k[12];
    supported(k);
    atomic_store(&active, k[0]);
}

int64_t pg_peak_macs(int64_t iters) {
    const pg_kernels *k = atomic_load(&active);
    return k->peak && iters > 0 ? k->peak(iters) : 0;
}

const char *pg_amx_status(void) {
#if defined(__x86_64__)
    const char *why = amx_missing();
    return why ? why : "available";
#else
    return "not an x86-64 CPU";
#endif
}

const char *pg_isa(void) { return atomic_load(&active)->name; }

int pg_set_isa(const char *name) {
    const pg_kernels *k[12];
    for (int i = 0, n = supported(k); i < n; i++) {
        if (strcmp(k[i]->name, name) == 0) {
            atomic_store(&active, k[i]);
            return 0;
        }
    }
    return -1;
}

/* One job's arguments; `k` is the table read once when the job starts. */
typedef struct {
    const pg_kernels *k;
    const pg_qtensor *w;
    const float *x;
    const int32_t *rows;
    const uint8_t *q;
    const float *scale;
    const int32_t *zp;
    int32_t N, K, rows_per_task, lanes;
    float *y;
    uint8_t *qout;
    float *sout;
    int32_t *zout;
} job;

static void quantize_task(void *ctx, int32_t n) {
    job *j = ctx;
    int64_t K = j->K;
    j->k->quantize_row(j->x + n * K, j->K, j->qout + n * K, j->sout + n, j->zout + n);
}

void pg_quantize_acts(pg_pool *pool, const float *x, int32_t N, int32_t K, uint8_t *q, float *scale, int32_t *zp) {
    job j = {.k = atomic_load(&active), .x = x, .K = K, .qout = q, .sout = scale, .zout = zp};
    pg_pool_run(pool, quantize_task, &j, N);
}

/* Tasks of whole ROW_TILEs, about four per thread so that uneven progress evens out. */
static int32_t rows_per_task(pg_pool *pool, int32_t M) {
    int32_t tiles = (M + ROW_TILE - 1) / ROW_TILE, per = tiles / (4 * pg_pool_threads(pool));
    return (per > 0 ? per : 1) * ROW_TILE;
}

static void gemm_task(void *ctx, int32_t t) {
    job *j = ctx;
    int32_t m0 = t * j->rows_per_task, m1 = m0 + j->rows_per_task;
    if (m1 > j->w->M) m1 = j->w->M;
    if (j->N == 1)
        j->k->gemv_rows(j->w, m0, m1, j->q, j->scale[0], j->zp[0], j->y);
    else
        j->k->gemm_rows(j->w, m0, m1, j->q, j->scale, j->zp, j->N, j->y);
}

static void run_rows(pg_pool *pool, job *j) {
    j->rows_per_task = rows_per_task(pool, j->w->M);
    pg_pool_run(pool, gemm_task, j, (j->w->M + j->rows_per_task - 1) / j->rows_per_task);
}

/* q[N][K] (K % 4 == 0) -> qout [NP / lanes][K/4][lanes][4]: the 4 bytes of columns 4c..4c+3 of
 * token n at ((n / lanes) K/4 + c) lanes 4 + (n % lanes) 4, NP = N rounded up to a multiple of
 * lanes, the padding tokens 0 (qout comes zeroed). A vector of tokens is one
 * sequential stream over K (a layout by column chunk, [K/4][NP][4], put chunks NP 4 bytes apart:
 * at N = 256, 1 KB strides that alias in the caches and cost a third of the GEMM at K = 8192).
 * One task per vector: N K bytes, against the product's M N K multiply-adds. */
static void pack_task(void *ctx, int32_t v) {
    job *j = ctx;
    const int64_t K = j->K, lanes = j->lanes;
    for (int64_t n = v * lanes; n < (v + 1) * lanes && n < j->N; n++) {
        uint8_t *out = j->qout + v * K * lanes + n % lanes * 4;
        for (int64_t c = 0; c < K / 4; c++) memcpy(out + c * lanes * 4, j->q + n * K + c * 4, 4);
    }
}

int pg_gemm(pg_pool *pool, const pg_qtensor *w, const uint8_t *q, const float *scale, const int32_t *zp,
            int32_t N, float *y) {
    job j = {.k = atomic_load(&active), .w = w, .q = q, .scale = scale, .zp = zp, .N = N, .y = y};
    uint8_t *packed = NULL;
    int32_t tail = 0;
    const int32_t lanes = N > 1 && j.k->gemm_lanes ? j.k->gemm_lanes(w, N, &tail) : 0; /* N = 1: the GEMV reads q */
    if (lanes) {
        const int32_t vectors = (int32_t)(((int64_t)N - tail + lanes - 1) / lanes);
        if (!(packed = calloc((size_t)vectors * lanes + (size_t)tail, (size_t)w->K))) return -1;
        job p = {.q = q, .N = N - tail, .K = w->K, .lanes = lanes, .qout = packed};
        pg_pool_run(pool, pack_task, &p, vectors);
        memcpy(packed + (size_t)vectors * lanes * w->K, q + (size_t)(N - tail) * w->K, (size_t)tail * w->K);
        j.q = packed;
    }
    run_rows(pool, &j);
    free(packed);
    return 0;
}

int pg_gemv(pg_pool *pool, const pg_qtensor *w, const float *x, float *y) {
    job j = {.k = atomic_load(&active), .w = w, .N = 1, .y = y};
    uint8_t *q = malloc((size_t)w->K);
    float scale;
    int32_t zp;
    if (!q) return -1;
    j.k->quantize_row(x, w->K, q, &scale, &zp);
    j.q = q, j.scale = &scale, j.zp = &zp;
    run_rows(pool, &j);
    free(q);
    return 0;
}

static void dequant_task(void *ctx, int32_t i) {
    job *j = ctx;
    j->k->dequant_row(j->w, j->rows[i], j->y + (int64_t)i * j->w->K);
}

void pg_dequant_rows(pg_pool *pool, const pg_qtensor *w, const int32_t *rows, int32_t n, float *out) {
    job j = {.k = atomic_load(&active), .w = w, .rows = rows, .y = out};
    pg_pool_run(pool, dequant_task, &j, n);
}

#define ATT_TOKENS 8 /* query tokens per task: their rows share every key and value read */
#define ATT_TILE 64  /* positions per pass over the rows: 16 KB of keys or values at hd 64, in L1 */

typedef struct {
    const pg_kernels *k;
    const float *q, *kc, *vc;
    int64_t kv_stride;
    int32_t n, start, n_heads, n_kv, hd;
    float scale;
    float *out;
    atomic_int failed;
} attention_job;

/* Task t: query tokens [i0, i1) of block t / n_kv and cache head t % n_kv, with the query
 * heads that read it: row r is token i0 + r / group, head (t % n_kv) * group + r % group.
 * Keys, then values, are read a tile at a time for all rows, so the cache is streamed once
 * per block, not once per query head and token; each row's sums keep their order. */
static void attention_task(void *ctx, int32_t t) {
    attention_job *j = ctx;
    const int32_t group = j->n_heads / j->n_kv, h = t % j->n_kv, hd = j->hd, i0 = (t / j->n_kv) * ATT_TOKENS;
    const int32_t i1 = i0 + ATT_TOKENS < j->n ? i0 + ATT_TOKENS : j->n, rows = (i1 - i0) * group;
    const int32_t width = j->start + i1; /* the last token's length: a row of scores each */
    /* per row: its offset in q and out, scaled query, scores, their sum, length */
    int64_t *at = malloc((sizeof(int64_t) + sizeof(float) * ((size_t)hd + (size_t)width + 1) + sizeof(int32_t)) * (size_t)rows);
    if (!at) {
        atomic_store(&j->failed, 1);
        return;
    }
    float *qs = (float *)(at + rows), *s = qs + (size_t)rows * hd, *total = s + (size_t)rows * width;
    int32_t *len = (int32_t *)(total + rows);
    const float *kc = j->kc + h * j->kv_stride, *vc = j->vc + h * j->kv_stride;
    for (int32_t r = 0; r < rows; r++) {
        len[r] = j->start + i0 + r / group + 1;
        at[r] = (int64_t)(i0 + r / group) * j->n_heads * hd + (int64_t)(h * group + r % group) * hd;
    }
    for (int32_t r = 0; r < rows; r++)
        for (int32_t d = 0; d < hd; d++) qs[(int64_t)r * hd + d] = j->q[at[r] + d] * j->scale;
    for (int32_t p = 0; p < width; p += ATT_TILE)
        for (int32_t r = 0; r < rows; r++) {
            const int32_t count = len[r] - p < ATT_TILE ? len[r] - p : ATT_TILE;
            if (count > 0) j->k->scores(qs + (int64_t)r * hd, kc + (int64_t)p * hd, count, hd, s + (int64_t)r * width + p);
        }
    for (int32_t r = 0; r < rows; r++) total[r] = j->k->softmax(s + (int64_t)r * width, len[r]);
    for (int32_t p = 0; p < width; p += ATT_TILE)
        for (int32_t r = 0; r < rows; r++) {
            const int32_t count = len[r] - p < ATT_TILE ? len[r] - p : ATT_TILE;
            if (count > 0) j->k->weigh(s + (int64_t)r * width + p, vc + (int64_t)p * hd, count, hd, p == 0, j->out + at[r]);
        }
    for (int32_t r = 0; r < rows; r++)
        for (int32_t d = 0; d < hd; d++) j->out[at[r] + d] = j->out[at[r] + d] / total[r];
    free(at);
}

int pg_attention(pg_pool *pool, const float *q, const float *k, const float *v, int64_t kv_stride, int32_t n,
                 int32_t start, int32_t n_heads, int32_t n_kv, int32_t hd, float scale, float *out) {
    attention_job j = {.k = atomic_load(&active), .q = q, .kc = k, .vc = v, .kv_stride = kv_stride, .n = n, .start = start,
                       .n_heads = n_heads, .n_kv = n_kv, .hd = hd, .scale = scale, .out = out};
    atomic_init(&j.failed, 0);
    pg_pool_run(pool, attention_task, &j, (n + ATT_TOKENS - 1) / ATT_TOKENS * n_kv);
    return atomic_load(&j.failed) ? -1 : 0;
}

/* Rotary embeddings and SwiGLU: one task per token row (elementwise work: the same bits on any split). */
typedef struct {
    const pg_kernels *k;
    float *x;
    const float *cos, *sin;
    int64_t stride;
    int32_t heads, hd;
} rope_job;

static void rope_task(void *ctx, int32_t t) {
    rope_job *j = ctx;
    const int64_t half = j->hd / 2;
    j->k->rope_row(j->x + t * j->stride, j->heads, j->hd, j->cos + t * half, j->sin + t * half);
}

void pg_rope(pg_pool *pool, float *x, int32_t n, int64_t stride, int32_t heads, int32_t hd, const float *cos, const float *sin) {
    rope_job j = {.k = atomic_load(&active), .x = x, .cos = cos, .sin = sin, .stride = stride, .heads = heads, .hd = hd};
    pg_pool_run(pool, rope_task, &j, n);
}

typedef struct {
    const pg_kernels *k;
    const float *gate_up;
    float *out;
    int32_t hidden;
} swiglu_job;

static void swiglu_task(void *ctx, int32_t t) {
    swiglu_job *j = ctx;
    const float *g = j->gate_up + 2 * (int64_t)t * j->hidden;
    j->k->swiglu_row(g, g + j->hidden, j->hidden, j->out + (int64_t)t * j->hidden);
}

void pg_swiglu(pg_pool *pool, const float *gate_up, int32_t n, int32_t hidden, float *out) {
    swiglu_job j = {.k = atomic_load(&active), .gate_up = gate_up, .out = out, .hidden = hidden};
    pg_pool_run(pool, swiglu_task, &j, n);
}

typedef struct {
    const pg_kernels *k;
    const float *x, *w;
    float eps;
    int32_t K;
    uint8_t *q;
    float *scale;
    int32_t *zp;
    atomic_int failed;
} norm_job;

/* Row t normalized into a buffer of its own (K floats: in L1 while quantize_row reads it back),
 * never into the caller's memory. */
static void norm_task(void *ctx, int32_t t) {
    norm_job *j = ctx;
    const int64_t at = (int64_t)t * j->K;
    float *y = malloc(sizeof(float) * (size_t)j->K);
    if (!y) {
        atomic_store(&j->failed, 1);
        return;
    }
    j->k->rms_row(j->x + at, j->w, j->K, j->eps, y);
    j->k->quantize_row(y, j->K, j->q + at, j->scale + t, j->zp + t);
    free(y);
}

int pg_norm_quantize(pg_pool *pool, const float *x, int32_t N, int32_t K, const float *w, float eps, uint8_t *q, float *scale, int32_t *zp) {
    norm_job j = {.k = atomic_load(&active), .x = x, .w = w, .eps = eps, .K = K, .q = q, .scale = scale, .zp = zp};
    atomic_init(&j.failed, 0);
    pg_pool_run(pool, norm_task, &j, N);
    return atomic_load(&j.failed) ? -1 : 0;
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

uint64_t pg_stream_read(pg_pool *pool, const uint8_t *buf, int64_t n) {
    read_job j = {.words = (const uint64_t *)buf, .n = n / 8};
    int32_t tasks = 4 * pg_pool_threads(pool) > 256 ? 256 : 4 * pg_pool_threads(pool);
    j.per_task = (j.n + tasks - 1) / tasks;
    pg_pool_run(pool, read_task, &j, tasks);
    uint64_t s = 0;
    for (int32_t t = 0; t < tasks; t++) s += j.sums[t];
    return s;
}

/* The converter's float32 products: tasks are blocks of SGEMM_MC rows by SGEMM_NC / nr panels
 * of nr columns; a task packs its panels of B (SGEMM_KC of k at a time) and runs the path's
 * tile over them. Ragged edges go through zero-padded copies of A's rows and C's tile, so the
 * tile always sees whole tiles; no element's chain depends on the tiling. */
#define SGEMM_MC 256
#define SGEMM_KC 256
#define SGEMM_PANELS 4

typedef struct {
    const pg_sgemm_tile *t;
    const float *a, *b;
    float *c;
    int64_t lda, ldb, ldc;
    int32_t m, n, k, mblocks;
    atomic_int failed;
} sgemm_job;

static void sgemm_task(void *ctx, int32_t task) {
    sgemm_job *j = ctx;
    const int32_t mr = j->t->mr, nr = j->t->nr, nc = SGEMM_PANELS * nr;
    const int32_t i0 = task % j->mblocks * SGEMM_MC, i1 = i0 + SGEMM_MC < j->m ? i0 + SGEMM_MC : j->m;
    const int32_t j0 = task / j->mblocks * nc, j1 = j0 + nc < j->n ? j0 + nc : j->n, panels = (j1 - j0 + nr - 1) / nr;
    float *bp = malloc(sizeof(float) * ((size_t)SGEMM_PANELS * SGEMM_KC * nr + (size_t)mr * SGEMM_KC + (size_t)mr * nr));
    if (!bp) {
        atomic_store(&j->failed, 1);
        return;
    }
    float *apad = bp + (size_t)SGEMM_PANELS * SGEMM_KC * nr, *cpad = apad + (size_t)mr * SGEMM_KC;
    for (int32_t i = i0; i < i1; i++) memset(j->c + i * j->ldc + j0, 0, sizeof(float) * (size_t)(j1 - j0));
    for (int32_t k0 = 0; k0 < j->k; k0 += SGEMM_KC) {
        const int32_t kc = j->k - k0 < SGEMM_KC ? j->k - k0 : SGEMM_KC;
        for (int32_t col = 0; col < panels * nr; col++) { /* panel p holds bp[p][kk][col % nr] */
            float *dst = bp + (size_t)(col / nr) * kc * nr + col % nr;
            const float *src = j->b + (int64_t)(j0 + col) * j->ldb + k0;
            for (int32_t kk = 0; kk < kc; kk++) dst[(int64_t)kk * nr] = j0 + col < j1 ? src[kk] : 0.0f;
        }
        for (int32_t r0 = i0; r0 < i1; r0 += mr) {
            const int32_t rows = i1 - r0 < mr ? i1 - r0 : mr;
            const float *ap = j->a + r0 * j->lda + k0;
            int64_t la = j->lda;
            if (rows < mr) {
                memset(apad, 0, sizeof(float) * (size_t)mr * kc);
                for (int32_t r = 0; r < rows; r++) memcpy(apad + r * kc, ap + r * j->lda, sizeof(float) * (size_t)kc);
                ap = apad, la = kc;
            }
            for (int32_t p = 0; p < panels; p++) {
                const int32_t cols = j1 - j0 - p * nr < nr ? j1 - j0 - p * nr : nr;
                float *cp = j->c + r0 * j->ldc + j0 + p * nr;
                if (rows == mr && cols == nr) {
                    j->t->tile(ap, la, bp + (size_t)p * kc * nr, kc, cp, j->ldc);
                    continue;
                }
                memset(cpad, 0, sizeof(float) * (size_t)mr * nr);
                for (int32_t r = 0; r < rows; r++) memcpy(cpad + r * nr, cp + r * j->ldc, sizeof(float) * (size_t)cols);
                j->t->tile(ap, la, bp + (size_t)p * kc * nr, kc, cpad, nr);
                for (int32_t r = 0; r < rows; r++) memcpy(cp + r * j->ldc, cpad + r * nr, sizeof(float) * (size_t)cols);
            }
        }
    }
    free(bp);
}

int pg_sgemm(pg_pool *pool, const float *a, int64_t lda, const float *b, int64_t ldb, int32_t m, int32_t n, int32_t k,
             float *c, int64_t ldc) {
    if (m <= 0 || n <= 0) return 0;
    sgemm_job j = {.t = atomic_load(&active)->sgemm, .a = a, .b = b, .c = c, .lda = lda, .ldb = ldb, .ldc = ldc,
                   .m = m, .n = n, .k = k, .mblocks = (m + SGEMM_MC - 1) / SGEMM_MC};
    atomic_init(&j.failed, 0);
    const int32_t nc = SGEMM_PANELS * j.t->nr;
    pg_pool_run(pool, sgemm_task, &j, j.mblocks * ((n + nc - 1) / nc));
    return atomic_load(&j.failed) ? -1 : 0;
}
