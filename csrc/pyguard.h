/* pyguard kernel library: int4 weights x int8 activations, public C API (also the cffi cdef).
 * Layouts are specified by pyguard/formats/quant.py (the numpy reference); see docs/FORMAT.md. */
#ifndef PYGUARD_H
#define PYGUARD_H
#include <stdint.h>

/* An int4 weight matrix W[M][K]: K % 64 == 0, G in {32, 64, 128, 256}, K % G == 0.
 * qs: M rows of K/2 bytes, 64-column blocks, byte i = (q[64b+i]+8) | (q[64b+32+i]+8) << 4.
 * scales: M rows of K/G fp16 bit patterns. rowsum: M floats, sum_g d * sum(q). */
typedef struct {
    const uint8_t *qs;
    const uint16_t *scales;
    const float *rowsum;
    int32_t M, K, G;
} pg_qtensor;

/* Kernel path: "scalar", "avx2", "avxvnni", "avx512vnni", "amx", "neon", "neon-dotprod", "neon-i8mm". Chosen
 * at load from the CPU (and PYGUARD_ISA, by the Python layer); pg_set_isa returns 0, or -1 if the
 * path is unknown or the CPU lacks it. The path is process-wide; each job reads it once when it
 * starts. pg_amx_status: "available", or why this process cannot run AMX code. */
const char *pg_isa(void);
int pg_set_isa(const char *name);
const char *pg_amx_status(void);

/* A pool of worker threads (the caller counts as one). Every kernel runs on the pool it is
 * given (NULL: the caller alone); a pool runs one job at a time, callers queue. Pools are
 * independent, so models with their own pools run in parallel. threads: 1..256; returns NULL
 * if out of range or out of memory. After fork() a pool made before it runs on the caller
 * alone in the child (its workers do not exist there) and may still be freed. */
typedef struct pg_pool pg_pool;
pg_pool *pg_pool_new(int threads);
void pg_pool_free(pg_pool *pool);
int pg_pool_threads(const pg_pool *pool);

/* Every pointer below is to C-contiguous data of the stated shape, validated by the caller
 * (pyguard/engine/kernels.py): the kernels do no bounds checks. */

/* X[N][K] float32 -> q[N][K] uint8, scale[N], zp[N]: per-row asymmetric (quant.quantize_acts). */
void pg_quantize_acts(pg_pool *pool, const float *x, int32_t N, int32_t K, uint8_t *q, float *scale, int32_t *zp);
/* Y[N][M] = W . X^T from quantized activations q[N][K] (quant.gemm). Returns 0, or -1 if out
 * of memory. */
int pg_gemm(pg_pool *pool, const pg_qtensor *w, const uint8_t *q, const float *scale, const int32_t *zp,
             int32_t N, float *y);
/* y[M] = W . x for float32 x[K], quantized internally like a one-row pg_gemm (quant.gemv).
 * Returns 0, or -1 if out of memory. */
int pg_gemv(pg_pool *pool, const pg_qtensor *w, const float *x, float *y);
/* out[n][K] = dequantized rows rows[0..n) of W, each in 0..M-1 (embedding lookup; quant.dequantize). */
void pg_dequant_rows(pg_pool *pool, const pg_qtensor *w, const int32_t *rows, int32_t n, float *out);
/* Causal grouped-query attention (model.attention_reference): queries q[n][n_heads][hd] at
 * positions start..start+n-1, each multiplied by `scale`, against the cache k, v: [n_kv][.][hd]
 * with kv_stride floats between heads, positions 0..start+n-1 filled. Query head h reads cache
 * head h / (n_heads / n_kv). out[n][n_heads][hd]. hd % 8 == 0, n_heads % n_kv == 0. Every
 * query's result depends only on its own inputs: not on n, start's chunking or the threads.
 * Returns 0, or -1 if out of memory. */
int pg_attention(pg_pool *pool, const float *q, const float *k, const float *v, int64_t kv_stride, int32_t n,
                 int32_t start, int32_t n_heads, int32_t n_kv, int32_t hd, float scale, float *out);

/* Rotary embeddings in place (model.apply_rope): the first `heads` heads of hd floats (hd even) of
 * each row of x[n] (rows `stride` floats apart), rotated by cos[n][hd/2] and sin[n][hd/2], the
 * tables of the row's position ("rotate half" layout). */
void pg_rope(pg_pool *pool, float *x, int32_t n, int64_t stride, int32_t heads, int32_t hd, const float *cos, const float *sin);
/* out[n][hidden] = silu(gate) * up from gate_up[n][2 hidden], gate columns first
 * (model.swiglu_reference: silu from the exp of attention's softmax, without overflow). */
void pg_swiglu(pg_pool *pool, const float *gate_up, int32_t n, int32_t hidden, float *out);
/* RMSNorm fused with activation quantization: q, scale, zp of each row of x[N][K] normalized by
 * w[K] (K % 8 == 0), bit for bit quant.quantize_acts(model.rms_norm(x, w, eps)); the normalized
 * rows are never written out. Returns 0, or -1 if out of memory. */
int pg_norm_quantize(pg_pool *pool, const float *x, int32_t N, int32_t K, const float *w, float eps, uint8_t *q, float *scale, int32_t *zp);

/* C[m][n] = A[m][k] . B[n][k]^T in float32 (the converter's products, pyguard/convert): rows
 * lda, ldb, ldc floats apart (lda, ldb >= k, ldc >= n). Every element is the chain
 * c = fma(a[i][p], b[j][p], c) from c = 0 in order of p, one rounding a step
 * (detmath.matmul_reference): the same bits on every CPU, path and thread count. k == 0 gives
 * zeros. Returns 0, or -1 if out of memory. */
int pg_sgemm(pg_pool *pool, const float *a, int64_t lda, const float *b, int64_t ldb, int32_t m, int32_t n, int32_t k,
             float *c, int64_t ldc);

/* u[n][n] = U, upper triangular with U^T U = h^-1, for symmetric positive definite float32
 * h[n][n] (its upper triangle is read), in the float64 operations of
 * calibrate.upper_inverse_factor, in its order: the same bits. Returns 0, 1 if h is not
 * positive definite (or holds NaN), -1 if out of memory. */
int pg_upper_inverse(const float *h, int32_t n, float *u);

/* Benchmark baseline: read n bytes (8-byte aligned, n % 8 == 0) on the pool's threads and
 * return their 64-bit sum, the plain streaming read the gemv bandwidth is compared with. */
uint64_t pg_stream_read(pg_pool *pool, const uint8_t *buf, int64_t n);
/* Benchmark ceiling: iters rounds of the active path's integer core at its peak rate (8
 * independent instructions a round; AMX: 4 tdpbsud) on the calling thread; returns the
 * multiply-adds done (0: no such loop for this path, e.g. scalar). */
int64_t pg_peak_macs(int64_t iters);

#endif
