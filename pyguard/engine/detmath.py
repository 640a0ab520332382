"""exp, log, sin, cos, pow and float32 matrix products whose results are the same bits on every CPU.

numpy's own exp, sin, cos and power are vectorized per instruction set and chosen at run time:
on this project's machines np.cos of float32 angles, np.exp of float64 and np.float32 power
give different last bits on an AVX-512 CPU than on an AVX2-only one (and again on ARM). The
rotary tables and the verdict's probabilities go through them, so a verdict would depend on the
CPU. These use only +, -, *, /, rint and ldexp, which IEEE 754 rounds the same everywhere (numpy
never fuses them), and stay within about an ulp of float64 (far below the float32 the rotary
tables are kept in).

Matrix products through BLAS sum in an order that depends on the CPU (and on its kernel
set), so the converter's products go through pyguard's own kernel (kernels.sgemm), whose
order `matmul_reference` states: every element is one chain of fused multiply-adds in order.
"""

from __future__ import annotations

import math
from decimal import Context, Decimal

import numpy as np

# ln 2 in two parts (fdlibm): n * LN2_HI is exact for |n| < 2^11
LN2 = math.log(2)  # only picks n: any nearby value gives the same bits on every machine
LN2_HI, LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10
# pi / 2 in two parts (fdlibm): n * PIO2_HI is exact for |n| < 2^20
PIO2_HI, PIO2_LO = 1.57079632673412561417e+00, 6.07710050650619224932e-11


def _horner(r: np.ndarray, coefficients: list[float]) -> np.ndarray:
    """sum_i c_i r^i, highest power first."""
    p = np.full_like(r, coefficients[0])
    for c in coefficients[1:]:
        p = p * r + c
    return p


EXP_POLY = [1 / math.factorial(i) for i in range(13, -1, -1)]  # |r| <= ln2/2: the r^14 term is below 2^-60
SIN_POLY = [(-1) ** k / math.factorial(2 * k + 1) for k in range(8, 0, -1)]  # sin r = r + r^3 P(r^2), |r| <= pi/4
COS_POLY = [(-1) ** k / math.factorial(2 * k) for k in range(9, -1, -1)]  # cos r = Q(r^2)


def exp(x: np.ndarray) -> np.ndarray:
    """e^x, float64, elementwise: x = n ln2 + r, e^r by its Taylor series, times 2^n (0 below
    about -745, inf above 709.8, NaN for NaN)."""
    x = np.clip(np.asarray(x, np.float64), -1100.0, 1100.0)
    n = np.rint(x * (1 / LN2))
    r = (x - n * LN2_HI) - n * LN2_LO
    with np.errstate(over="ignore"):  # e^x beyond float64: inf, as intended
        return np.ldexp(_horner(r, EXP_POLY), np.nan_to_num(n).astype(np.int64))


def sincos32(angles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) of float32 angles, each computed in float64 and rounded to float32: within an
    ulp of float32 for |angle| < 2^20 (rotary angles stay below 2^17 at 131072 positions);
    larger ones lose accuracy but not determinism; NaN for a non-finite angle."""
    x = np.asarray(angles, np.float32).astype(np.float64)
    n = np.rint(x * (2 / math.pi))
    r = (x - n * PIO2_HI) - n * PIO2_LO  # x = n pi/2 + r, |r| <= pi/4
    r2 = r * r
    s, c = r + r * r2 * _horner(r2, SIN_POLY), _horner(r2, COS_POLY)
    q = np.nan_to_num(np.fmod(n, 4), nan=0.0).astype(np.int64) % 4  # fmod is exact
    return np.choose(q, [c, -s, -c, s]).astype(np.float32), np.choose(q, [s, c, -s, -c]).astype(np.float32)


def pow32(base: float, exponents: np.ndarray) -> np.ndarray:
    """float32(base ** e) for float32 exponents, base > 0: computed in decimal arithmetic (a
    software library, the same on every machine) to 40 digits, then rounded to float32."""
    ctx = Context(prec=40)
    b = Decimal(float(np.float32(base)))
    return np.array([float(ctx.power(b, Decimal(float(e)))) for e in np.asarray(exponents, np.float32)], np.float64).astype(np.float32)


def log(x: np.ndarray) -> np.ndarray:
    """Natural log, float64, elementwise, for x > 0 (NaN for x <= 0 or NaN, inf for inf):
    x = m 2^e with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(f), f = (m - 1) / (m + 1), by
    its series (|f| < 0.172: 12 terms reach 2^-60)."""
    x = np.asarray(x, np.float64)
    ok = np.isfinite(x) & (x > 0)
    m, e = np.frexp(np.where(ok, x, 1.0))
    low = m < math.sqrt(0.5)
    m, e = np.where(low, 2 * m, m), np.where(low, e - 1, e)
    f = (m - 1) / (m + 1)
    f2 = f * f
    out = 2 * f * _horner(f2, [1 / (2 * i + 1) for i in range(11, -1, -1)]) + e * LN2_HI + e * LN2_LO
    return np.where(ok, out, np.where(x == np.inf, np.inf, np.nan))


def fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 a * b + c rounded once (C's fmaf), elementwise (broadcasting): the product of two
    float32 is exact in float64, the sum is rounded to odd in float64 (53 >= 24 + 2 bits: one
    rounding to float32 then equals the correctly rounded result, Boldo and Melquiond 2008)."""
    p = np.asarray(a, np.float32).astype(np.float64) * np.asarray(b, np.float32).astype(np.float64)
    c = np.asarray(c, np.float32).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        s = p + c
        t = s - p
        err = (p - (s - t)) + (c - t)  # TwoSum: s + err == p + c exactly (finite s)
        odd = np.isfinite(s) & (err != 0) & (s.view(np.int64) & 1 == 0)
        s = np.where(odd, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
        return s.astype(np.float32)


def matmul_reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The specification of kernels.sgemm: float32 a [m, k] times b [n, k]^T, element (i, j)
    the chain c = fma(a[i, p], b[j, p], c) from c = 0 for p = 0, 1, ..., k - 1."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    c = np.zeros((a.shape[0], b.shape[0]), np.float32)
    for p in range(a.shape[1]):
        c = fma32(a[:, p, None], b[None, :, p], c)
    return c
