"""The int4 weight / int8 activation formats and the numpy reference of every kernel.

This module is the specification: the C kernels (scalar, AVX2, NEON) are tested against
these functions, and the converter writes exactly what `pack_weights` produces.

Weights W[M, K] (M output rows, K inputs), group size G (32, 64, 128 or 256):
- q = clamp(rint(W / d), -8, 7) with one scale d per group of G consecutive inputs of a row.
- `qs`: uint8 [M, K/2]. Columns are packed in blocks of 64: within block b, byte i (0..31)
  holds column 64b+i in its low nibble and column 64b+32+i in its high nibble, each stored as
  q + 8 (0..15). One 32-byte load then yields 64 weights with a mask and a shift.
- `scales`: float16 [M, K/G]. fp16 halves the scale bytes (0.5 instead of 1 bit per weight
  at G=32) on a path bound by memory bandwidth; F16C and NEON convert in one instruction.
- `rowsum`: float32 [M], sum over groups of d * sum(q): lets the kernels apply the activation
  zero point once per output instead of once per weight.
Requires K % 64 == 0 and K % G == 0.

Activations X[N, K] (float32) are quantized per row (token), asymmetric uint8 as in Meta's
INT4 recipe: the range [min(x, 0), max(x, 0)] maps to 0..255 with a zero point, so
x ~ s * (q - zp). The integer part of a dot product is then sum(q_x * q_w) per group, which
the SIMD kernels compute with u8 x s8 multiply-adds.

The embedding table (and a pruned or tied output head) may instead be int8 (`Q8Tensor`): per
row, q = clamp(rint(w / d), -127, 127) with one float32 scale d = max|w| / 127. A lookup
dequantizes n rows; the head product (`gemm8`) sums the integer products exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import PyguardError

GROUP_SIZES = (32, 64, 128, 256)
MAX_WEIGHT = 8 * 65504  # largest |w| whose absmax scale (|w| / 8) is a finite fp16
BLOCK = 64  # columns per nibble block


@dataclass
class QTensor:
    """An int4 weight matrix in the packed layout (see module docstring)."""

    qs: np.ndarray  # uint8 [M, K/2]
    scales: np.ndarray  # float16 [M, K/G]
    rowsum: np.ndarray  # float32 [M]
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.qs.shape[0], self.qs.shape[1] * 2


@dataclass
class Q8Tensor:
    """An int8 matrix, symmetric per row: w ~ scales[m] * q[m]."""

    q: np.ndarray  # int8 [M, K], in -127..127
    scales: np.ndarray  # float32 [M], >= 0

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape


@dataclass
class QActs:
    """Activation rows quantized to uint8: x ~ scale[n] * (q[n] - zp[n])."""

    q: np.ndarray  # uint8 [N, K]
    scale: np.ndarray  # float32 [N]
    zp: np.ndarray  # int32 [N], 0..255


def check_shape(k: int, group: int) -> None:
    if group not in GROUP_SIZES:
        raise PyguardError(f"group size {group} not supported (use one of {GROUP_SIZES})")
    if k % BLOCK or k % group:
        raise PyguardError(f"input dimension {k} must be a multiple of 64 and of the group size {group}")


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """int8 [M, K] in -8..7 -> uint8 [M, K/2] in the 64-column block layout."""
    m, k = q.shape
    u = (q.astype(np.int16) + 8).astype(np.uint8).reshape(m, k // BLOCK, 2, BLOCK // 2)
    return (u[:, :, 0, :] | (u[:, :, 1, :] << 4)).reshape(m, k // 2)


def unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8 [M, K/2] -> int8 [M, K], inverse of pack_nibbles."""
    m, half = qs.shape
    b = qs.reshape(m, half // (BLOCK // 2), 1, BLOCK // 2)
    u = np.concatenate([b & 0x0F, b >> 4], axis=2)
    return (u.astype(np.int8) - 8).reshape(m, half * 2)


def quantize_with_scales(w: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Round W [M, K] to int8 in -8..7 given fp16 scales [M, K/G]; a zero scale gives zeros."""
    m, k = w.shape
    d = scales.astype(np.float32)
    g = k // d.shape[1]
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    wg = w.astype(np.float32).reshape(m, -1, g)
    return np.clip(np.rint(wg * inv[:, :, None]), -8, 7).astype(np.int8).reshape(m, k)


def pack_weights(q: np.ndarray, scales: np.ndarray) -> QTensor:
    """Assemble a QTensor from int8 values [M, K] and fp16 scales [M, K/G]."""
    m, k = q.shape
    group = k // scales.shape[1]
    check_shape(k, group)
    scales = np.ascontiguousarray(scales, dtype=np.float16)
    qsum = q.reshape(m, -1, group).sum(axis=2, dtype=np.int64)
    rowsum = (scales.astype(np.float64) * qsum).sum(axis=1).astype(np.float32)
    return QTensor(pack_nibbles(q), scales, rowsum, group)


def absmax_scales(w: np.ndarray, group: int) -> np.ndarray:
    """Plain absmax scales: the value of largest magnitude in a group maps to -8 (ggml Q4_0 style)."""
    m, k = w.shape
    wg = w.astype(np.float32).reshape(m, k // group, group)
    idx = np.abs(wg).argmax(axis=2)
    peak = np.take_along_axis(wg, idx[:, :, None], axis=2)[:, :, 0]
    return (peak / -8.0).astype(np.float16)


SEARCH_FACTORS = tuple(np.linspace(1.0, 0.5, 11))  # fractions of the absmax scale tried


def mse_scales(w: np.ndarray, group: int, a: np.ndarray | None = None) -> np.ndarray:
    """fp16 scales [M, K/G] minimising sum_j a_j (w_j - d q_j)^2 per group; a: [K] >= 0, the
    importance of each input (calibration's mean square activations), 1 by default.

    Clipping the largest value of a group buys finer steps for all the others, so shrunken
    absmax scales (SEARCH_FACTORS) are tried, then the best is refined once by weighted least
    squares for its rounding (d = sum a w q / sum a q^2). Every candidate is judged after fp16
    rounding, as stored; absmax is a candidate, so the result is never worse than absmax.
    """
    m, k = w.shape
    wg = np.ascontiguousarray(w, dtype=np.float32).reshape(m, k // group, group)
    ag = np.ones((k // group, group), np.float32) if a is None else np.asarray(a, np.float32).reshape(k // group, group)

    def err(d: np.ndarray) -> np.ndarray:  # in place: this loop is most of the converter's time
        inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
        r = wg * inv[:, :, None]
        np.rint(r, out=r)
        np.clip(r, -8, 7, out=r)
        r *= d[:, :, None]
        r -= wg
        r *= r
        r *= ag
        return r.sum(axis=2)  # not einsum: it fuses multiply-adds on some CPUs (aarch64), not on others

    base = absmax_scales(w, group).astype(np.float32)
    best, best_err = base, err(base)
    for f in SEARCH_FACTORS[1:]:
        d = (base * np.float32(f)).astype(np.float16).astype(np.float32)
        e = err(d)
        better = e < best_err
        best, best_err = np.where(better, d, best), np.where(better, e, best_err)
    inv = np.divide(np.float32(1), best, out=np.zeros_like(best), where=best != 0)
    q = np.clip(np.rint(wg * inv[:, :, None]), -8, 7)
    aq = q * ag
    qq = (aq * q).sum(axis=2)
    ls = np.divide((aq * wg).sum(axis=2), qq, out=best.copy(), where=qq > 0)
    ls = np.clip(ls, -65504, 65504).astype(np.float16).astype(np.float32)
    return np.where(err(ls) < best_err, ls, best).astype(np.float16)


def check_weights(w: np.ndarray, name: str, quantized: bool) -> None:
    """Refuse what would convert into infinite or NaN scales (and so NaN logits) rather than
    clamp it: such a checkpoint is damaged, and a clamped model would silently be another model."""
    if not np.isfinite(w).all():
        raise PyguardError(f"tensor {name} holds infinite or NaN values")
    peak = float(np.abs(w).max(initial=0))
    if quantized and peak > MAX_WEIGHT:
        raise PyguardError(f"tensor {name} holds a weight of magnitude {peak:.6g}, beyond the int4 range with fp16 scales "
                           f"(at most 8 x 65504 = {MAX_WEIGHT})")


def quantize_weights(w: np.ndarray, group: int, search: bool = False) -> QTensor:
    """Quantize a float matrix: absmax scales (the plain reference), or searched scales."""
    check_shape(w.shape[1], group)
    scales = mse_scales(w, group) if search else absmax_scales(w, group)
    return pack_weights(quantize_with_scales(w, scales), scales)


def dequantize(t: QTensor, rows: np.ndarray | None = None) -> np.ndarray:
    """float32 [len(rows) or M, K]: d * q. Rows given: the embedding lookup."""
    qs, scales = (t.qs, t.scales) if rows is None else (t.qs[rows], t.scales[rows])
    q = unpack_nibbles(qs).astype(np.float32)
    m, k = q.shape
    return (q.reshape(m, -1, t.group) * scales.astype(np.float32)[:, :, None]).reshape(m, k)


def quantize8(w: np.ndarray) -> Q8Tensor:
    """Per-row symmetric int8: d = max|w| / 127 in float32 (0 for a zero row, whose q are 0),
    q = clamp(rint(w / d), -127, 127). Plain absmax: at 8 bits clipping buys nothing measurable."""
    w = np.asarray(w, dtype=np.float32)
    d = np.abs(w).max(axis=1, initial=0) / np.float32(127)
    q = np.rint(np.divide(w, d[:, None], out=np.zeros_like(w), where=d[:, None] != 0))
    return Q8Tensor(np.clip(q, -127, 127).astype(np.int8), d.astype(np.float32))


def dequantize8(t: Q8Tensor, rows: np.ndarray | None = None) -> np.ndarray:
    """float32 [len(rows) or M, K]: d * q. Rows given: the embedding lookup."""
    q, d = (t.q, t.scales) if rows is None else (t.q[rows], t.scales[rows])
    return q.astype(np.float32) * d[:, None]


def gemm8(t: Q8Tensor, a: QActs) -> np.ndarray:
    """Y[N, M] = (float32(dot[n, m]) * d[m]) * s_n, float32, with dot = sum_k (q_x - zp_n) q_w
    exact (int64). A row of NaN activations gives NaN."""
    dot = (a.q.astype(np.int64) - a.zp[:, None]) @ t.q.astype(np.int64).T
    return (dot.astype(np.float32) * t.scales[None, :]) * a.scale[:, None]


def quantize_acts(x: np.ndarray) -> QActs:
    """Per-row asymmetric uint8 quantization of float32 X [N, K].

    In float32, exactly as the C kernels: lo = min(x, 0), hi = max(x, 0), s = (hi - lo) / 255
    (1 if zero), zp = clamp(rint(-lo / s), 0, 255), q = clamp(rint(x * (1 / s)) + zp, 0, 255).
    A row holding NaN or +-inf gets q = 0, zp = 0 and s = NaN: every product it enters is NaN,
    which the engine reports as an error instead of a verdict.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    x = np.where(bad[:, None], np.float32(0), x)
    lo = np.minimum(x.min(axis=1), np.float32(0))
    hi = np.maximum(x.max(axis=1), np.float32(0))
    s = (hi - lo) / np.float32(255)
    s[s == 0] = 1
    zp = np.clip(np.rint(-lo / s), 0, 255)
    inv = np.float32(1) / s
    q = np.clip(np.rint(x * inv[:, None]) + zp[:, None], 0, 255)
    s[bad], zp[bad] = np.nan, 0
    return QActs(q.astype(np.uint8), s.astype(np.float32), zp.astype(np.int32))


def group_dots(t: QTensor, a: QActs) -> np.ndarray:
    """int64 [N, M, K/G]: the exact integer dot products sum(q_x * q_w) of every group."""
    qw = unpack_nibbles(t.qs).astype(np.int64)
    m, k = qw.shape
    n = a.q.shape[0]
    qx = a.q.astype(np.int64).reshape(n, 1, -1, t.group)
    return (qx * qw.reshape(1, m, -1, t.group)).sum(axis=3)


def gemm(t: QTensor, a: QActs) -> np.ndarray:
    """Y[N, M] = s_n * (sum_g d[m, g] * dot[n, m, g] - zp_n * rowsum[m]), float32, in the one
    order every kernel path follows (so results are the same bits on every CPU): per output,
    acc = acc + d_g * float(dot_g), group after group (each a float32 multiply, then an add),
    from acc = 0; then s * (acc - zp * rowsum). dot_g is exact (|dot_g| < 2^24: exact in float32)."""
    dots = group_dots(t, a).astype(np.float32)
    d = t.scales.astype(np.float32)
    acc = np.zeros(dots.shape[:2], np.float32)
    for g in range(dots.shape[2]):
        acc += dots[:, :, g] * d[None, :, g]
    y = a.scale[:, None] * (acc - a.zp[:, None].astype(np.float32) * t.rowsum[None, :])
    return y.astype(np.float32)


def gemv(t: QTensor, x: np.ndarray) -> np.ndarray:
    """y[M] = W . x for float32 x[K]: x is quantized like a one-token prefill (the INT4 recipe)."""
    return gemm(t, quantize_acts(x.reshape(1, -1)))[0]
