"""numpy-facing wrappers of the C kernels (same signatures as the references in quant.py)."""

from __future__ import annotations

import os

import numpy as np

from . import blas
from ._kernels import ffi, lib
from .errors import PyguardError
from .quant import QActs, QTensor

ISAS = ("scalar", "avx2", "neon", "neon-dotprod")


def isa() -> str:
    """The active kernel path."""
    return ffi.string(lib.pg_isa()).decode()


def available_isas() -> list[str]:
    """Kernel paths this CPU can run."""
    current = isa()
    found = [name for name in ISAS if lib.pg_set_isa(name.encode()) == 0]
    lib.pg_set_isa(current.encode())
    return found


def set_isa(name: str) -> None:
    """Force a kernel path (PYGUARD_ISA does this at import)."""
    if lib.pg_set_isa(name.encode()) != 0:
        raise PyguardError(f"kernel path {name!r} is not available here (available: {', '.join(available_isas())})")


def threads() -> int:
    return lib.pg_threads()


def set_threads(n: int | None = None) -> None:
    """Worker threads for every kernel; None means PYGUARD_THREADS or the number of cores."""
    if n is None:
        n = _env_threads()
    if not isinstance(n, int) or n < 1:
        raise PyguardError(f"thread count must be a positive integer, not {n!r}")
    if n != lib.pg_threads():
        lib.pg_set_threads(n)


def _env_threads() -> int:
    value = os.environ.get("PYGUARD_THREADS")
    if value is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not value.isdigit() or int(value) < 1:
        raise PyguardError(f"PYGUARD_THREADS={value!r}: expected a positive integer")
    return int(value)


def _ptr(ctype: str, a: np.ndarray):
    assert a.flags.c_contiguous
    return ffi.cast(ctype, ffi.from_buffer(a))


def _qtensor(t: QTensor):
    """The C view of a QTensor, built once and kept on it (decode calls kernels thousands of times)."""
    c = t.__dict__.get("_c")
    if c is None:
        c = t._c = _new_qtensor(t)
    return c


def _new_qtensor(t: QTensor):
    m, k = t.shape
    return ffi.new(
        "pg_qtensor *",
        {
            "qs": _ptr("uint8_t *", t.qs),
            "scales": _ptr("uint16_t *", t.scales),
            "rowsum": _ptr("float *", t.rowsum),
            "M": m,
            "K": k,
            "G": t.group,
        },
    )


def _check_out(out: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if out.dtype != np.float32 or out.shape != shape or not out.flags.c_contiguous or not out.flags.writeable:
        raise PyguardError(f"output must be a writable contiguous float32 array of shape {shape}")
    return out


def quantize_acts(x: np.ndarray) -> QActs:
    """Per-row uint8 quantization of float32 X [N, K] (quant.quantize_acts)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] < 1:
        raise PyguardError(f"activations must be a 2-D float array, not shape {x.shape}")
    n, k = x.shape
    a = QActs(np.empty((n, k), np.uint8), np.empty(n, np.float32), np.empty(n, np.int32))
    lib.pg_quantize_acts(_ptr("float *", x), n, k, _ptr("uint8_t *", a.q), _ptr("float *", a.scale), _ptr("int32_t *", a.zp))
    return a


def gemm(t: QTensor, a: QActs, out: np.ndarray | None = None) -> np.ndarray:
    """Y[N, M] = X . W^T from quantized activations (quant.gemm)."""
    n = a.q.shape[0]
    m, k = t.shape
    if a.q.dtype != np.uint8 or a.q.ndim != 2 or a.q.shape[1] != k or not a.q.flags.c_contiguous:
        raise PyguardError(f"activations must be contiguous uint8 [N, {k}], not {a.q.dtype} {a.q.shape}")
    if a.scale.shape != (n,) or a.zp.shape != (n,) or a.scale.dtype != np.float32 or a.zp.dtype != np.int32:
        raise PyguardError("activation scales and zero points must be float32 and int32 [N]")
    y = np.empty((n, m), np.float32) if out is None else _check_out(out, (n, m))
    lib.pg_gemm(_qtensor(t), _ptr("uint8_t *", a.q), _ptr("float *", a.scale), _ptr("int32_t *", a.zp), n, _ptr("float *", y))
    return y


def gemv(t: QTensor, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """y[M] = W . x for float32 x[K] (quant.gemv)."""
    m, k = t.shape
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape != (k,):
        raise PyguardError(f"gemv input must have shape ({k},), not {x.shape}")
    y = np.empty(m, np.float32) if out is None else _check_out(out, (m,))
    lib.pg_gemv(_qtensor(t), _ptr("float *", x), _ptr("float *", y))
    return y


def dequant_rows(t: QTensor, rows: np.ndarray) -> np.ndarray:
    """float32 [len(rows), K]: rows of W dequantized, e.g. embedding lookup (quant.dequantize)."""
    m, k = t.shape
    rows = np.ascontiguousarray(rows, dtype=np.int32)
    if rows.size and (rows.min() < 0 or rows.max() >= m):
        raise PyguardError(f"row index out of range 0..{m - 1}")
    out = np.empty((rows.size, k), np.float32)
    lib.pg_dequant_rows(_qtensor(t), _ptr("int32_t *", rows), rows.size, _ptr("float *", out))
    return out


if os.environ.get("PYGUARD_ISA"):
    set_isa(os.environ["PYGUARD_ISA"])
set_threads()
blas.limit_to_one_thread()
