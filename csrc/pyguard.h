/* pyguard kernel library: int4 weights x int8 activations, public C API (also the cffi cdef).
 * Layouts are specified by pyguard/quant.py (the numpy reference); see docs/FORMAT.md. */
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

/* Kernel path: "scalar", "avx2", "neon", "neon-dotprod". Chosen at load from the CPU and
 * PYGUARD_ISA; pg_set_isa returns 0, or -1 if the path is unknown or the CPU lacks it. */
const char *pg_isa(void);
int pg_set_isa(const char *name);
/* Worker threads (>= 1) used by every kernel; default PYGUARD_THREADS or the core count. */
int pg_threads(void);
void pg_set_threads(int n);

/* X[N][K] float32 -> q[N][K] uint8, scale[N], zp[N]: per-row asymmetric (quant.quantize_acts). */
void pg_quantize_acts(const float *x, int32_t N, int32_t K, uint8_t *q, float *scale, int32_t *zp);
/* Y[N][M] = W . X^T from quantized activations q[N][K] (quant.gemm). */
void pg_gemm(const pg_qtensor *w, const uint8_t *q, const float *scale, const int32_t *zp,
             int32_t N, float *y);
/* y[M] = W . x for float32 x[K], quantized internally like a one-row pg_gemm (quant.gemv). */
void pg_gemv(const pg_qtensor *w, const float *x, float *y);
/* out[n][K] = dequantized rows rows[0..n) of W (embedding lookup; quant.dequantize). */
void pg_dequant_rows(const pg_qtensor *w, const int32_t *rows, int32_t n, float *out);

/* Benchmark baseline: read n bytes (8-byte aligned, n % 8 == 0) on the pool's threads and
 * return their 64-bit sum, the plain streaming read the gemv bandwidth is compared with. */
uint64_t pg_stream_read(const uint8_t *buf, int64_t n);

#endif
