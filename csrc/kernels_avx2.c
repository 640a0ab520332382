/* x86-64 kernels: AVX2+FMA+F16C, and the VNNI paths (the same with vpdpbusd for the integer
 * core of the GEMM and GEMV, csrc/gemm_x86.h). Each function carries its own target attribute,
 * so the library is built for baseline x86-64 and a path is only entered when the CPU (and the
 * OS, for AVX-512 state) reports it. */
#if defined(__x86_64__)
#include <immintrin.h>
#include <math.h>
#include "kernels.h"

#define TARGET __attribute__((target("avx2,fma,f16c")))
#define INLINE TARGET __attribute__((always_inline)) static inline
#define UNROLL _Pragma("GCC unroll 8") /* tile loops must unroll for the tile to live in registers */

/* 4 bytes at p (any alignment) */
static inline int32_t pg_load32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Sum of 8 floats in a fixed order (every output uses this same order). */
INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* x[K] -> q[K], any K: same float32 operations as the scalar path, 8 lanes at a time. */
TARGET static void quantize_row(const float *x, int32_t K, uint8_t *q, float *scale, int32_t *zp) {
    __m256 lo8 = _mm256_setzero_ps(), hi8 = _mm256_setzero_ps(), nan8 = _mm256_setzero_ps();
    int32_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 v = _mm256_loadu_ps(x + k);
        lo8 = _mm256_min_ps(v, lo8); /* returns lo8 on ties (and NaN), like the scalar compare */
        hi8 = _mm256_max_ps(v, hi8);
        nan8 = _mm256_or_ps(nan8, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    int nan = _mm256_movemask_ps(nan8) != 0;
    float lanes_lo[8], lanes_hi[8], lo = 0.0f, hi = 0.0f;
    _mm256_storeu_ps(lanes_lo, lo8);
    _mm256_storeu_ps(lanes_hi, hi8);
    for (int i = 0; i < 8; i++) {
        lo = lanes_lo[i] < lo ? lanes_lo[i] : lo;
        hi = lanes_hi[i] > hi ? lanes_hi[i] : hi;
    }
    for (int32_t j = k; j < K; j++) {
        lo = x[j] < lo ? x[j] : lo;
        hi = x[j] > hi ? x[j] : hi;
        nan |= x[j] != x[j];
    }
    if (pg_nonfinite_row(lo, hi, nan, K, q, scale, zp)) return;
    float s, z, inv;
    pg_quant_params(lo, hi, &s, &z, &inv);
    const __m256 vinv = _mm256_set1_ps(inv), vz = _mm256_set1_ps(z), vmax = _mm256_set1_ps(255.0f);
    for (k = 0; k + 32 <= K; k += 32) {
        __m256i i[4];
        for (int p = 0; p < 4; p++) {
            __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + k + 8 * p), vinv);
            v = _mm256_add_ps(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), vz);
            v = _mm256_min_ps(_mm256_max_ps(v, _mm256_setzero_ps()), vmax);
            i[p] = _mm256_cvtps_epi32(v);
        }
        /* packs interleave 128-bit lanes; the permute restores the order */
        __m256i w = _mm256_packus_epi16(_mm256_packus_epi32(i[0], i[1]), _mm256_packus_epi32(i[2], i[3]));
        w = _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(q + k), w);
    }
    for (; k < K; k++) q[k] = pg_quant_one(x[k], inv, z);
    *scale = s;
    *zp = (int32_t)z;
}

/* AVX2: vpmaddubsw gives 16 int16 lanes, each the sum of two products of magnitude <= 255*8;
 * eight such results (256 inputs, a group of 256) sum to at most 16*2040 = 32640 < 32767, so a
 * group accumulates in int16 and is widened (vpmaddwd by ones: lane l = bytes 4l..4l+3) once. */
#define NAME(x) x##_avx2
#define XTARGET TARGET
#define XINLINE INLINE
#define MULADD(acc, x, w) _mm256_maddubs_epi16(x, w) /* G = 32: one chunk per group, acc is 0 */
#define MULADD2(acc, x, w, x2, w2) _mm256_add_epi16(acc, _mm256_add_epi16(_mm256_maddubs_epi16(x, w), _mm256_maddubs_epi16(x2, w2)))
#define WIDEN(acc) _mm256_madd_epi16(acc, _mm256_set1_epi16(1))
/* GEMM: acc += the products of each 4-byte unit of x with the 4 bytes of w, as int16 pairs */
#define DOT4(acc, x, w) _mm256_add_epi16(acc, _mm256_maddubs_epi16(x, w))
#define PARTIAL16 1 /* 8 such sums (32 columns) reach 8 * 2 * 255 * 8 = 32640 at most: no overflow */
#include "gemm_x86.h"
#undef NAME
#undef XTARGET
#undef XINLINE
#undef MULADD
#undef MULADD2
#undef WIDEN
#undef DOT4
#undef PARTIAL16

/* VNNI: vpdpbusd adds the four products of bytes 4l..4l+3 to int32 lane l in one instruction
 * (what vpmaddubsw + vpmaddwd + vpaddd do): the same integers as AVX2. AVX-VNNI (VEX) runs on
 * ymm; AVX512-VNNI on zmm, a whole 64-column block per instruction. The integer sums, and so
 * every result, are those of AVX2.
 * PG_VNNI_EMULATION (test builds only) adds both codes with vpdpbusd replaced by the AVX2
 * sequence (exact here: no int16 sum can saturate) and, for the zmm code, each 512-bit vector
 * by a pair of 256-bit ones, so their layout, tiling and edges are tested on CPUs without VNNI. */
#define XINLINE XTARGET __attribute__((always_inline)) static inline
#define WIDEN(acc) (acc)
#define DOT4(acc, x, w) MULADD(acc, x, w)
#define PARTIAL16 0 /* int32 lanes hold a whole group (G <= 256) */
#define MULADD2(acc, x, w, x2, w2) MULADD(MULADD(acc, x, w), x2, w2)
#define DPBUSD_EMULATED(acc, x, w) _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(x, w), _mm256_set1_epi16(1)))
#define NAME(x) x##_avxvnni
#define XTARGET __attribute__((target("avx2,fma,f16c,avxvnni")))
#define MULADD(acc, x, w) _mm256_dpbusd_avx_epi32(acc, x, w)
#include "gemm_x86.h"
#undef NAME
#undef XTARGET
#undef MULADD

#define WIDE 1
#define NAME(x) x##_avx512vnni
#define XTARGET __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#define W512 __m512i
#define W512F __m512
#define W_BCAST32(p) _mm512_set1_epi32(pg_load32(p))
#define W_ZEROF() _mm512_setzero_ps()
#define W_LOADF(p) _mm512_loadu_ps(p)
#define W_STOREF(p, v) _mm512_storeu_ps(p, v)
#define W_CVTF(v) _mm512_cvtepi32_ps(v)
#define W_MULF(a, b) _mm512_mul_ps(a, b)
#define W_ADDF(a, b) _mm512_add_ps(a, b)
#define W_SPLATF(f) _mm512_set1_ps(f)
#define W_ZERO() _mm512_setzero_si512()
#define W_LOAD(p) _mm512_loadu_si512((const void *)(p))
#define W_STORE(p, v) _mm512_storeu_si512((void *)(p), v)
#define W_SPLAT8(b) _mm512_set1_epi8(b)
#define W_AND(a, b) _mm512_and_si512(a, b)
#define W_SUB8(a, b) _mm512_sub_epi8(a, b)
#define W_JOIN(lo, hi) _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
#define W_DP(acc, x, w) _mm512_dpbusd_epi32(acc, x, w)
#define W_ADD32(a, b) _mm512_add_epi32(a, b)
#define W_UNPACKLO32(a, b) _mm512_unpacklo_epi32(a, b)
#define W_UNPACKHI32(a, b) _mm512_unpackhi_epi32(a, b)
#define W_UNPACKLO64(a, b) _mm512_unpacklo_epi64(a, b)
#define W_UNPACKHI64(a, b) _mm512_unpackhi_epi64(a, b)
#define W_SHUF128(a, b, imm) _mm512_shuffle_i32x4(a, b, imm)
#define W_LO(v) _mm512_castsi512_si256(v)
#define W_HI(v) _mm512_extracti64x4_epi64(v, 1)
#include "gemm_x86.h"
#undef NAME
#undef XTARGET
/* AMX: the tile instructions themselves (the OS must have granted tile data: dispatch.c) */
#define ZNAME(x) x##_avx512vnni
#define NAME(x) x##_amx
#define XTARGET __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8")))
#define T_CONFIG(cfg) _tile_loadconfig(cfg)
#define T_ZERO(t) _tile_zero(t)
#define T_LOAD(t, p, s) _tile_loadd(t, p, s)
#define T_STORE(t, p, s) _tile_stored(t, p, s)
#define T_DPBSUD(c, a, b) _tile_dpbsud(c, a, b)
#define T_RELEASE() _tile_release()
#include "gemm_amx.h"
#undef ZNAME
#undef NAME
#undef XTARGET
#undef T_CONFIG
#undef T_ZERO
#undef T_LOAD
#undef T_STORE
#undef T_DPBSUD
#undef T_RELEASE
#undef W512
#undef W_ZERO
#undef W_LOAD
#undef W_STORE
#undef W_SPLAT8
#undef W_AND
#undef W_SUB8
#undef W_JOIN
#undef W_DP
#undef W_ADD32
#undef W_UNPACKLO32
#undef W_UNPACKHI32
#undef W_UNPACKLO64
#undef W_UNPACKHI64
#undef W_SHUF128
#undef W_LO
#undef W_HI
#undef W512F
#undef W_BCAST32
#undef W_ZEROF
#undef W_LOADF
#undef W_STOREF
#undef W_CVTF
#undef W_MULF
#undef W_ADDF
#undef W_SPLATF

#ifdef PG_VNNI_EMULATION
/* Each 512-bit instruction the zmm code uses, on a pair of 256-bit vectors (lo: bytes 0..31,
 * 128-bit lanes 0 and 1; hi: bytes 32..63, lanes 2 and 3), with the instruction's semantics. */
typedef struct { __m256i lo, hi; } w512e;
typedef struct { __m256 lo, hi; } w512fe;
INLINE w512fe w512fe_mul(w512fe a, w512fe b) { return (w512fe){_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
INLINE w512fe w512fe_add(w512fe a, w512fe b) { return (w512fe){_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
#define W512E_OP(name, op) INLINE w512e name(w512e a, w512e b) { return (w512e){op(a.lo, b.lo), op(a.hi, b.hi)}; }
W512E_OP(w512e_and, _mm256_and_si256)
W512E_OP(w512e_sub8, _mm256_sub_epi8)
W512E_OP(w512e_add32, _mm256_add_epi32)
W512E_OP(w512e_unpacklo32, _mm256_unpacklo_epi32)
W512E_OP(w512e_unpackhi32, _mm256_unpackhi_epi32)
W512E_OP(w512e_unpacklo64, _mm256_unpacklo_epi64)
W512E_OP(w512e_unpackhi64, _mm256_unpackhi_epi64)
#undef W512E_OP
INLINE w512e w512e_load(const uint8_t *p) {
    return (w512e){_mm256_loadu_si256((const __m256i *)p), _mm256_loadu_si256((const __m256i *)(p + 32))};
}
INLINE w512e w512e_dp(w512e acc, w512e x, w512e w) {
    return (w512e){DPBUSD_EMULATED(acc.lo, x.lo, w.lo), DPBUSD_EMULATED(acc.hi, x.hi, w.hi)};
}
INLINE __m128i w512e_lane(w512e v, int i) { /* 128-bit lane i (0..3) */
    const __m256i h = i < 2 ? v.lo : v.hi;
    return i & 1 ? _mm256_extracti128_si256(h, 1) : _mm256_castsi256_si128(h);
}
/* vshufi32x4: lanes 0, 1 from a, 2, 3 from b, each picked by two bits of imm */
INLINE w512e w512e_shuf128(w512e a, w512e b, int imm) {
    return (w512e){_mm256_setr_m128i(w512e_lane(a, imm & 3), w512e_lane(a, imm >> 2 & 3)),
                   _mm256_setr_m128i(w512e_lane(b, imm >> 4 & 3), w512e_lane(b, imm >> 6 & 3))};
}
#define NAME(x) x##_avx512vnni_emulated
#define XTARGET TARGET
#define W512 w512e
#define W512F w512fe
#define W_BCAST32(p) ((w512e){_mm256_set1_epi32(pg_load32(p)), _mm256_set1_epi32(pg_load32(p))})
#define W_ZEROF() ((w512fe){_mm256_setzero_ps(), _mm256_setzero_ps()})
#define W_LOADF(p) ((w512fe){_mm256_loadu_ps(p), _mm256_loadu_ps((p) + 8)})
#define W_STOREF(p, v) (_mm256_storeu_ps(p, (v).lo), _mm256_storeu_ps((p) + 8, (v).hi))
#define W_CVTF(v) ((w512fe){_mm256_cvtepi32_ps((v).lo), _mm256_cvtepi32_ps((v).hi)})
#define W_MULF(a, b) w512fe_mul(a, b)
#define W_ADDF(a, b) w512fe_add(a, b)
#define W_SPLATF(f) ((w512fe){_mm256_set1_ps(f), _mm256_set1_ps(f)})
#define W_ZERO() ((w512e){_mm256_setzero_si256(), _mm256_setzero_si256()})
#define W_LOAD(p) w512e_load(p)
#define W_STORE(p, v) (_mm256_storeu_si256((__m256i *)(p), (v).lo), _mm256_storeu_si256((__m256i *)((p) + 32), (v).hi))
#define W_SPLAT8(b) ((w512e){_mm256_set1_epi8(b), _mm256_set1_epi8(b)})
#define W_AND(a, b) w512e_and(a, b)
#define W_SUB8(a, b) w512e_sub8(a, b)
#define W_JOIN(lo, hi) ((w512e){lo, hi})
#define W_DP(acc, x, w) w512e_dp(acc, x, w)
#define W_ADD32(a, b) w512e_add32(a, b)
#define W_UNPACKLO32(a, b) w512e_unpacklo32(a, b)
#define W_UNPACKHI32(a, b) w512e_unpackhi32(a, b)
#define W_UNPACKLO64(a, b) w512e_unpacklo64(a, b)
#define W_UNPACKHI64(a, b) w512e_unpackhi64(a, b)
#define W_SHUF128(a, b, imm) w512e_shuf128(a, b, imm)
#define W_LO(v) ((v).lo)
#define W_HI(v) ((v).hi)
#include "gemm_x86.h"
#undef NAME
#undef XTARGET
/* The tile instructions by their definitions, on tiles in memory (8 of 16 rows of 64 bytes) */
typedef struct {
    uint8_t t[8][16][64];
    int rows[8], colsb[8];
} amx_emulated;
/* Tiles are per-thread registers; so is their emulation (test builds only) */
static _Thread_local amx_emulated amx_tiles;
static void amx_config_emulated(amx_emulated *s, const void *cfg) {
    const uint8_t *c = cfg; /* palette, start row, 14 reserved, colsb[16] (16-bit), rows[16] */
    memset(s, 0, sizeof *s);
    if (c[0] != 1) abort(); /* palette 1: 8 tiles of at most 16 rows of 64 bytes */
    for (int i = 0; i < 8; i++) {
        s->colsb[i] = c[16 + 2 * i] | c[17 + 2 * i] << 8, s->rows[i] = c[48 + i];
        if (s->colsb[i] > 64 || s->rows[i] > 16) abort();
    }
}
static void amx_zero_emulated(amx_emulated *s, int t) { memset(s->t[t], 0, sizeof s->t[t]); }
static void amx_load_emulated(amx_emulated *s, int t, const void *p, int64_t stride) {
    memset(s->t[t], 0, sizeof s->t[t]);
    for (int r = 0; r < s->rows[t]; r++) memcpy(s->t[t][r], (const uint8_t *)p + r * stride, (size_t)s->colsb[t]);
}
static void amx_store_emulated(amx_emulated *s, int t, void *p, int64_t stride) {
    for (int r = 0; r < s->rows[t]; r++) memcpy((uint8_t *)p + r * stride, s->t[t][r], (size_t)s->colsb[t]);
}
/* C[m][n] += sum over k < colsb(A) of A[m][k] (int8) * B[k / 4][4 n + k % 4] (uint8), int32;
 * shapes the hardware refuses (#UD) abort */
static void amx_dpbsud_emulated(amx_emulated *s, int c, int a, int b) {
    if (s->rows[a] != s->rows[c] || s->colsb[a] != 4 * s->rows[b] || s->colsb[b] != s->colsb[c] || s->colsb[a] % 4) abort();
    for (int m = 0; m < s->rows[c]; m++)
        for (int n = 0; n < s->colsb[c] / 4; n++) {
            int32_t sum;
            memcpy(&sum, s->t[c][m] + 4 * n, 4);
            for (int k = 0; k < s->colsb[a]; k++) sum += (int8_t)s->t[a][m][k] * (int32_t)s->t[b][k / 4][4 * n + k % 4];
            memcpy(s->t[c][m] + 4 * n, &sum, 4);
        }
}
#define ZNAME(x) x##_avx512vnni_emulated
#define NAME(x) x##_amx_emulated
#define XTARGET TARGET
#define T_CONFIG(cfg) amx_config_emulated(&amx_tiles, cfg)
#define T_ZERO(t) amx_zero_emulated(&amx_tiles, t)
#define T_LOAD(t, p, s) amx_load_emulated(&amx_tiles, t, p, s)
#define T_STORE(t, p, s) amx_store_emulated(&amx_tiles, t, p, s)
#define T_DPBSUD(c, a, b) amx_dpbsud_emulated(&amx_tiles, c, a, b)
#define T_RELEASE() ((void)0)
#include "gemm_amx.h"
#undef ZNAME
#undef NAME
#undef XTARGET
#undef WIDE
#define NAME(x) x##_emulated
#define XTARGET TARGET
#define MULADD(acc, x, w) DPBUSD_EMULATED(acc, x, w)
#include "gemm_x86.h"
#undef NAME
#undef XTARGET
#undef MULADD
#else
#undef WIDE
#endif
#undef XINLINE
#undef WIDEN
#undef MULADD2
#undef DOT4
#undef PARTIAL16
#undef DPBUSD_EMULATED

/* out[K] = d * q for one row; products of a 4-bit integer and an fp16 scale are exact. */
TARGET static void dequant_row(const pg_qtensor *w, int32_t row, float *out) {
    const int32_t K = w->K, G = w->G;
    const uint16_t *d = w->scales + (int64_t)row * (K / G);
    for (int32_t b = 0; b < K; b += 64) {
        __m256i half[2];
        unpack64_avx2(w->qs + (int64_t)row * (K / 2) + b / 2, &half[0], &half[1]);
        for (int h = 0; h < 2; h++) {
            const int32_t c = b + 32 * h;
            const __m256 s = _mm256_set1_ps(_cvtsh_ss(d[c / G]));
            __m128i parts[2] = {_mm256_castsi256_si128(half[h]), _mm256_extracti128_si256(half[h], 1)};
            for (int p = 0; p < 4; p++) {
                __m128i bytes = p & 1 ? _mm_srli_si128(parts[p / 2], 8) : parts[p / 2];
                __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
                _mm256_storeu_ps(out + c + 8 * p, _mm256_mul_ps(v, s));
            }
        }
    }
}

/* exp(x), x <= 0, 8 lanes: pg_exp_neg's operations in the same order (same bits). */
INLINE __m256 exp_neg8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(PG_EXP_MIN)); /* a NaN lane becomes -87, as in pg_exp_neg */
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(PG_LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(PG_LN2_HI)));
    r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(PG_LN2_LO)));
    __m256 p = _mm256_set1_ps(PG_EXP_P0);
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(PG_EXP_P1));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(PG_EXP_P2));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(PG_EXP_P3));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(PG_EXP_P4));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(PG_EXP_P5));
    __m256 y = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(p, _mm256_mul_ps(r, r)), r), _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* hsum of each of a[0..7], in hsum's order of adds, as one vector: the eight sums reduced
 * side by side: 7 adds and 15 shuffles instead of 24 and 24. */
INLINE __m256 hsum8(const __m256 *a) {
    __m256 s[4], p[2];
    UNROLL for (int t = 0; t < 4; t++) /* lanes 0+4, 1+5, 2+6, 3+7 of a[2t] | of a[2t + 1] */
        s[t] = _mm256_add_ps(_mm256_permute2f128_ps(a[2 * t], a[2 * t + 1], 0x20), _mm256_permute2f128_ps(a[2 * t], a[2 * t + 1], 0x31));
    UNROLL for (int t = 0; t < 2; t++) /* then 0+2, 1+3: (a[4t], a[4t + 2]) | (a[4t + 1], a[4t + 3]) */
        p[t] = _mm256_add_ps(_mm256_shuffle_ps(s[2 * t], s[2 * t + 1], 0x44), _mm256_shuffle_ps(s[2 * t], s[2 * t + 1], 0xEE));
    /* then 0+1: sums of a[0], a[2], a[4], a[6] | a[1], a[3], a[5], a[7] */
    __m256 r = _mm256_add_ps(_mm256_shuffle_ps(p[0], p[1], 0x88), _mm256_shuffle_ps(p[0], p[1], 0xDD));
    return _mm256_permutevar8x32_ps(r, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* KEYS dot products of one query head qh[hd] with consecutive keys k[KEYS][hd] (KEYS <= 8):
 * per key, lanes accumulate products in order of the 8-column chunk, then hsum (the scalar
 * dot8's order). Several keys at once give the core independent sums to overlap. HD is the
 * head size when it is a compile-time constant (every address an immediate offset, the loop
 * unrolled: index arithmetic had cost as much as the products), else 0 and hd is used. */
INLINE void dots(const float *qh, const float *k, int32_t hd, float *out, const int KEYS, const int HD) {
    if (HD) hd = HD;
    __m256 acc[8];
    UNROLL for (int t = 0; t < KEYS; t++) acc[t] = _mm256_mul_ps(_mm256_loadu_ps(qh), _mm256_loadu_ps(k + (int64_t)t * hd));
    _Pragma("GCC unroll 16") for (int32_t i = 8; i < hd; i += 8) {
        const __m256 qv = _mm256_loadu_ps(qh + i);
        UNROLL for (int t = 0; t < KEYS; t++)
            acc[t] = _mm256_add_ps(acc[t], _mm256_mul_ps(qv, _mm256_loadu_ps(k + (int64_t)t * hd + i)));
    }
    if (KEYS == 8)
        _mm256_storeu_ps(out, hsum8(acc));
    else
        UNROLL for (int t = 0; t < KEYS; t++) out[t] = hsum(acc[t]);
}

INLINE void scores_hd(const float *q, const float *k, int32_t count, int32_t hd, float *out, const int HD) {
    int32_t t = 0;
    for (; t + 8 <= count; t += 8) dots(q, k + (int64_t)t * hd, hd, out + t, 8, HD);
    for (; t < count; t++) dots(q, k + (int64_t)t * hd, hd, out + t, 1, HD);
}

/* Llama Guard 3's heads are 64 (1B) and 128 (8B) wide. */
TARGET static void scores(const float *q, const float *k, int32_t count, int32_t hd, float *out) {
    if (hd == 64)
        scores_hd(q, k, count, hd, out, 64);
    else if (hd == 128)
        scores_hd(q, k, count, hd, out, 128);
    else
        scores_hd(q, k, count, hd, out, 0);
}

/* pg_softmax_scalar's result, 8 positions at a time (lane l of the sum takes positions 8i + l,
 * zeros past the end). */
TARGET static float softmax(float *s, int32_t len) {
    /* the max is exact in any order; a non-finite score poisons it (inf - inf, or NaN) */
    __m256 m8 = _mm256_set1_ps(s[0]), bad8 = _mm256_setzero_ps();
    int32_t j = 0;
    for (; j + 8 <= len; j += 8) {
        const __m256 v = _mm256_loadu_ps(s + j);
        m8 = _mm256_max_ps(m8, v);
        bad8 = _mm256_or_ps(bad8, _mm256_cmp_ps(_mm256_sub_ps(v, v), _mm256_setzero_ps(), _CMP_NEQ_UQ));
    }
    float lanes[8], m = s[0];
    int bad = _mm256_movemask_ps(bad8) != 0;
    _mm256_storeu_ps(lanes, m8);
    for (int l = 0; l < 8; l++) m = lanes[l] > m ? lanes[l] : m;
    for (; j < len; j++) {
        bad |= !isfinite(s[j]);
        m = s[j] > m ? s[j] : m;
    }
    __m256 sum = _mm256_setzero_ps();
    const __m256 mv = _mm256_set1_ps(m);
    for (j = 0; j + 8 <= len; j += 8) {
        __m256 e = exp_neg8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
        _mm256_storeu_ps(s + j, e);
        sum = _mm256_add_ps(sum, e);
    }
    if (j < len) {
        float tail[8] = {0};
        for (int32_t t = j; t < len; t++) tail[t - j] = pg_exp_neg(s[t] - m);
        memcpy(s + j, tail, sizeof(float) * (size_t)(len - j));
        sum = _mm256_add_ps(sum, _mm256_loadu_ps(tail));
    }
    return bad ? NAN : hsum(sum);
}

/* o[8 C] (+)= sum_t w[t] v[t][8 C], t in order: C vectors of columns, each its own sum. */
INLINE void weigh_cols(const float *w, const float *v, int32_t count, int32_t hd, int first, float *o, const int C) {
    __m256 acc[8];
    int32_t t = 0;
    if (first) {
        const __m256 w0 = _mm256_set1_ps(w[0]);
        UNROLL for (int c = 0; c < C; c++) acc[c] = _mm256_mul_ps(w0, _mm256_loadu_ps(v + 8 * c));
        t = 1;
    } else {
        UNROLL for (int c = 0; c < C; c++) acc[c] = _mm256_loadu_ps(o + 8 * c);
    }
    for (; t < count; t++) {
        const __m256 wt = _mm256_set1_ps(w[t]);
        UNROLL for (int c = 0; c < C; c++) acc[c] = _mm256_add_ps(acc[c], _mm256_mul_ps(wt, _mm256_loadu_ps(v + (int64_t)t * hd + 8 * c)));
    }
    UNROLL for (int c = 0; c < C; c++) _mm256_storeu_ps(o + 8 * c, acc[c]);
}

/* 64 columns at a time (8 independent sums), then 8 at a time. */
TARGET static void weigh(const float *w, const float *v, int32_t count, int32_t hd, int first, float *o) {
    int32_t d = 0;
    for (; d + 64 <= hd; d += 64) weigh_cols(w, v + d, count, hd, first, o + d, 8);
    for (; d < hd; d += 8) weigh_cols(w, v + d, count, hd, first, o + d, 1);
}

/* rope_row, 8 pairs at a time in the scalar pair's operations, the rest pair by pair. */
TARGET static void rope_row(float *x, int32_t heads, int32_t hd, const float *cos, const float *sin) {
    const int32_t half = hd / 2;
    for (int32_t h = 0; h < heads; h++, x += hd) {
        int32_t j = 0;
        for (; j + 8 <= half; j += 8) {
            const __m256 a = _mm256_loadu_ps(x + j), b = _mm256_loadu_ps(x + j + half);
            const __m256 c = _mm256_loadu_ps(cos + j), s = _mm256_loadu_ps(sin + j);
            _mm256_storeu_ps(x + j, _mm256_sub_ps(_mm256_mul_ps(a, c), _mm256_mul_ps(b, s)));
            _mm256_storeu_ps(x + j + half, _mm256_add_ps(_mm256_mul_ps(b, c), _mm256_mul_ps(a, s)));
        }
        for (; j < half; j++) pg_rope_pair(x, half, j, cos[j], sin[j]);
    }
}

/* pg_silu_mul, 8 lanes at a time (the tail one by one). */
TARGET static void swiglu_row(const float *g, const float *up, int32_t len, float *out) {
    int32_t j = 0;
    for (; j + 8 <= len; j += 8) {
        const __m256 gv = _mm256_loadu_ps(g + j), e = exp_neg8(_mm256_or_ps(gv, _mm256_set1_ps(-0.0f))); /* exp(-|g|) */
        const __m256 ge0 = _mm256_cmp_ps(gv, _mm256_setzero_ps(), _CMP_GE_OQ); /* false for NaN, as in C */
        const __m256 num = _mm256_blendv_ps(_mm256_mul_ps(gv, e), gv, ge0);
        _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_div_ps(num, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), _mm256_loadu_ps(up + j)));
    }
    for (; j < len; j++) out[j] = pg_silu_mul(g[j], up[j]);
}

/* pg_rms_row_scalar 8 lanes at a time: the vector's lane l is the scalar's acc[l], hsum is tree8. */
TARGET static void rms_row(const float *x, const float *w, int32_t K, float eps, float *y) {
    __m256 acc = _mm256_setzero_ps();
    for (int32_t k = 0; k < K; k += 8) {
        const __m256 v = _mm256_loadu_ps(x + k);
        acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
    }
    const __m256 r = _mm256_set1_ps(pg_rms_scale(hsum(acc), K, eps));
    for (int32_t k = 0; k < K; k += 8)
        _mm256_storeu_ps(y + k, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k), r), _mm256_loadu_ps(w + k)));
}

/* Benchmark ceilings (pg_peak_macs): `iters` rounds of 8 independent multiply-add instructions
 * of each path's integer core (the int16 sums added directly on AVX2) on values the compiler
 * cannot know. Returns the multiply-adds done. */
#define PEAK_LOOP(VT, SPLAT, OP, MACS)                                                         \
    {                                                                                         \
        const VT x = SPLAT((int32_t)iters);                                                   \
        VT acc[8];                                                                            \
        for (int i = 0; i < 8; i++) acc[i] = SPLAT(i);                                        \
        for (int64_t it = 0; it < iters; it++) UNROLL for (int i = 0; i < 8; i++) acc[i] = OP; \
        for (int i = 1; i < 8; i++) acc[0] = acc[0] ^ acc[i];                                 \
        volatile VT sink = acc[0]; /* the sums are used */                                    \
        (void)sink;                                                                           \
        return iters * 8 * (MACS);                                                            \
    }
TARGET static int64_t peak_avx2(int64_t iters) PEAK_LOOP(__m256i, _mm256_set1_epi32, _mm256_add_epi16(acc[i], _mm256_maddubs_epi16(x, x)), 32)
__attribute__((target("avx2,avxvnni"))) static int64_t peak_avxvnni(int64_t iters) PEAK_LOOP(__m256i, _mm256_set1_epi32, _mm256_dpbusd_avx_epi32(acc[i], x, x), 32)
__attribute__((target("avx2,avx512f,avx512vnni"))) static int64_t peak_avx512vnni(int64_t iters) PEAK_LOOP(__m512i, _mm512_set1_epi32, _mm512_dpbusd_epi32(acc[i], x, x), 64)
#undef PEAK_LOOP
/* AMX: 4 independent 16x16x64 tdpbsud (the GEMM's instruction) a round (tiles 0-3 += 4 x 5), 16384 multiply-adds each */
__attribute__((target("amx-tile,amx-int8"))) static int64_t peak_amx(int64_t iters) {
    _Alignas(64) uint8_t cfg[64] = {1}, zeros[1024] = {0};
    for (int t = 0; t < 6; t++) cfg[16 + 2 * t] = 64, cfg[48 + t] = 16;
    _tile_loadconfig(cfg);
    _tile_loadd(4, zeros, 64);
    _tile_loadd(5, zeros, 64);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t it = 0; it < iters; it++) {
        _tile_dpbsud(0, 4, 5);
        _tile_dpbsud(1, 4, 5);
        _tile_dpbsud(2, 4, 5);
        _tile_dpbsud(3, 4, 5);
    }
    _tile_release();
    return iters * 4 * 16384;
}

__attribute__((target("avx512f"), always_inline)) static inline __m512 _mm512_set1_ps_ptr(const float *p) { return _mm512_set1_ps(*p); }
/* The converter's float tile (pg_sgemm_tile): broadcast a, fused multiply-add with a row of bp.
 * AVX2: 6 x 16 (12 accumulators); AVX-512: 8 x 32 (16 of its 32 registers). */
#define SGEMM_TILE(NAME, ATTR, VEC, LOAD, STORE, BCAST, FMA, MR, NV, W)                              \
    ATTR static void NAME(const float *a, int64_t lda, const float *bp, int32_t kc, float *c, int64_t ldc) { \
        VEC acc[MR][NV];                                                                          \
        UNROLL for (int r = 0; r < MR; r++) UNROLL for (int v = 0; v < NV; v++) acc[r][v] = LOAD(c + r * ldc + v * W); \
        for (int32_t k = 0; k < kc; k++) {                                                        \
            VEC b[NV];                                                                            \
            UNROLL for (int v = 0; v < NV; v++) b[v] = LOAD(bp + (int64_t)k * NV * W + v * W);     \
            UNROLL for (int r = 0; r < MR; r++) {                                                 \
                const VEC x = BCAST(a + r * lda + k);                                              \
                UNROLL for (int v = 0; v < NV; v++) acc[r][v] = FMA(x, b[v], acc[r][v]);           \
            }                                                                                     \
        }                                                                                         \
        UNROLL for (int r = 0; r < MR; r++) UNROLL for (int v = 0; v < NV; v++) STORE(c + r * ldc + v * W, acc[r][v]); \
    }
SGEMM_TILE(sgemm_tile_avx2, TARGET, __m256, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_broadcast_ss, _mm256_fmadd_ps, 6, 2, 8)
SGEMM_TILE(sgemm_tile_avx512, __attribute__((target("avx2,fma,avx512f"))), __m512, _mm512_loadu_ps, _mm512_storeu_ps,
           _mm512_set1_ps_ptr, _mm512_fmadd_ps, 8, 2, 16)
const pg_sgemm_tile pg_sgemm_avx2 = {sgemm_tile_avx2, 6, 16};
const pg_sgemm_tile pg_sgemm_avx512 = {sgemm_tile_avx512, 8, 32};

const pg_kernels pg_kernels_avx2 = {"avx2", quantize_row, gemm_rows_avx2, gemv_rows_avx2, dequant_row, scores, softmax, weigh, rope_row, swiglu_row, rms_row, gemm_lanes_avx2, peak_avx2, &pg_sgemm_avx2};
const pg_kernels pg_kernels_avxvnni = {"avxvnni", quantize_row, gemm_rows_avxvnni, gemv_rows_avxvnni, dequant_row, scores, softmax, weigh, rope_row, swiglu_row, rms_row, gemm_lanes_avxvnni, peak_avxvnni, &pg_sgemm_avx2};
const pg_kernels pg_kernels_avx512vnni = {"avx512vnni", quantize_row, gemm_rows_avx512vnni, gemv_rows_avx512vnni, dequant_row, scores, softmax, weigh, rope_row, swiglu_row, rms_row, gemm_lanes_avx512vnni, peak_avx512vnni, &pg_sgemm_avx512};
const pg_kernels pg_kernels_amx = {"amx", quantize_row, gemm_rows_amx, gemv_rows_avx512vnni, dequant_row, scores, softmax, weigh, rope_row, swiglu_row, rms_row, gemm_lanes_amx, peak_amx, &pg_sgemm_avx512};
#ifdef PG_VNNI_EMULATION
const pg_kernels pg_kernels_vnni_emulated = {"vnni-emulated", quantize_row, gemm_rows_emulated, gemv_rows_emulated, dequant_row, scores, softmax, weigh, rope_row, swiglu_row, rms_row, gemm_lanes_emulated, NULL, &pg_sgemm_avx2};
const pg_kernels pg_kernels_avx512vnni_emulated = {"avx512vnni-emulated", quantize_row, gemm_rows_avx512vnni_emulated, gemv_rows_avx512vnni_emulated, dequant_row, scores, softmax, weigh, rope_row, swiglu_row, rms_row, gemm_lanes_avx512vnni_emulated, NULL, &pg_sgemm_avx2};
const pg_kernels pg_kernels_amx_emulated = {"amx-emulated", quantize_row, gemm_rows_amx_emulated, gemv_rows_avx512vnni_emulated, dequant_row, scores, softmax, weigh, rope_row, swiglu_row, rms_row, gemm_lanes_amx_emulated, NULL, &pg_sgemm_avx2};
#endif
#endif
