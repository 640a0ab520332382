"""numpy-facing wrappers of the C kernels (same signatures as the references in quant.py)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import blas
from .._kernels import ffi, lib
from ..errors import PyguardError
from ..formats.quant import GROUP_SIZES, QActs, QTensor

ISAS = ("scalar", "avx2", "avxvnni", "avx512vnni", "amx", "neon", "neon-dotprod", "neon-i8mm")
# CPU flags (Linux /proc/cpuinfo names) that decide the kernel paths, printed by the benchmarks
FEATURES = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
            "amx_tile", "amx_int8", "asimd", "asimddp", "i8mm")
MAX_THREADS = 256  # PG_MAX_THREADS in csrc/kernels.h


def isa() -> str:
    """The active kernel path (process-wide)."""
    return ffi.string(lib.pg_isa()).decode()


def available_isas() -> list[str]:
    """Kernel paths this CPU can run."""
    current = isa()
    found = [name for name in ISAS if lib.pg_set_isa(name.encode()) == 0]
    lib.pg_set_isa(current.encode())
    return found


def amx_status() -> str:
    """"available", or why this process cannot use the amx path (the CPU, the OS's tile state,
    or Linux's tile data permission)."""
    return ffi.string(lib.pg_amx_status()).decode()


def cpu_features() -> list[str]:
    """The kernel-relevant features this CPU reports (Linux; [] where /proc/cpuinfo is missing)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith(("flags", "Features"))), set())
    except OSError:
        return []
    return [name for name in FEATURES if name in flags]


def cpu_model() -> str:
    """The CPU's model name (Linux), for benchmark reports."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def set_isa(name: str) -> None:
    """Force a kernel path for the whole process (PYGUARD_ISA does this at import)."""
    if not isinstance(name, str) or lib.pg_set_isa(name.encode()) != 0:
        raise PyguardError(f"kernel path {name!r} is not available here (available: {', '.join(available_isas())})")


def check_threads(n: object, what: str = "thread count") -> int:
    if type(n) is not int or not 1 <= n <= MAX_THREADS:
        raise PyguardError(f"{what} must be an integer from 1 to {MAX_THREADS}, not {n!r}")
    return n


def env_threads() -> int:
    """PYGUARD_THREADS, or the cores this process may use."""
    value = os.environ.get("PYGUARD_THREADS")
    if value is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return min(cores, MAX_THREADS)
    if not value.strip().isdigit():
        raise PyguardError(f"PYGUARD_THREADS={value!r}: expected an integer from 1 to {MAX_THREADS}")
    return check_threads(int(value), f"PYGUARD_THREADS={value!r}")


def check_environment() -> None:
    """Raise the error of a bad PYGUARD_ISA. Import never raises (so that `pyguard --help`
    works whatever the environment); the first pool made does. A bad PYGUARD_THREADS is
    raised only where it would be used (env_threads: a pool without an explicit thread
    count), so that an explicit count wins over it."""
    if _env_isa_error:
        raise PyguardError(_env_isa_error)


class Pool:
    """The threads one model computes with: a C worker pool for the kernels and a Python
    executor for the numpy work spread over threads (model.spread). Pools are independent:
    models with their own pools run in parallel. A pool runs one kernel at a time (callers
    queue). After os.fork() the child makes its own pool and executor on first use."""

    def __init__(self, threads: int | None = None):
        """threads: None means PYGUARD_THREADS or the number of cores."""
        check_environment()
        self.threads = env_threads() if threads is None else check_threads(threads)
        self._pid = -1
        self._c = self._executor = None

    def _current(self) -> None:
        if self._pid != os.getpid():  # first use, or a forked child: the parent's threads are not here
            c = lib.pg_pool_new(self.threads)
            if c == ffi.NULL:
                raise PyguardError(f"cannot start {self.threads} kernel threads")
            self._c, self._executor, self._pid = ffi.gc(c, lib.pg_pool_free), None, os.getpid()

    @property
    def c(self):
        """The C pool (pg_pool *) of this process."""
        self._current()
        return self._c

    @property
    def executor(self) -> ThreadPoolExecutor:
        """threads - 1 Python workers (the caller is the other one)."""
        self._current()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max(self.threads - 1, 1), thread_name_prefix="pyguard")
        return self._executor


_default: Pool | None = None


def default_pool() -> Pool:
    """The pool of kernel calls that name none (tests, benchmarks)."""
    global _default
    if _default is None:
        _default = Pool()
    return _default


def threads() -> int:
    """Threads of the default pool."""
    return default_pool().threads


def set_threads(n: int | None = None) -> None:
    """Threads of the default pool; None means PYGUARD_THREADS or the number of cores.
    (Models have their own pools: Model(..., threads=n).)"""
    global _default
    pool = Pool(n)
    if _default is None or pool.threads != _default.threads:
        _default = pool


def _pool(pool: Pool | None):
    return (pool or default_pool()).c


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
    """Checked here, once, because the C kernels trust every byte they are pointed at."""
    qs, sc, rs, g = t.qs, t.scales, t.rowsum, t.group
    ok = (isinstance(qs, np.ndarray) and isinstance(sc, np.ndarray) and isinstance(rs, np.ndarray)
          and qs.dtype == np.uint8 and sc.dtype == np.float16 and rs.dtype == np.float32 and qs.ndim == 2
          and type(g) is int and g in GROUP_SIZES and all(a.flags.c_contiguous for a in (qs, sc, rs)))
    m, k = (qs.shape[0], qs.shape[1] * 2) if ok else (0, 0)
    if not ok or not 1 <= m < 1 << 31 or not 64 <= k < 1 << 31 or k % 64 or k % g or sc.shape != (m, k // g) or rs.shape != (m,):
        raise PyguardError("malformed int4 tensor (dtype, shape, group or layout)")
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


def quantize_acts(x: np.ndarray, pool: Pool | None = None) -> QActs:
    """Per-row uint8 quantization of float32 X [N, K] (quant.quantize_acts)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] < 1:
        raise PyguardError(f"activations must be a 2-D float array, not shape {x.shape}")
    n, k = x.shape
    a = QActs(np.empty((n, k), np.uint8), np.empty(n, np.float32), np.empty(n, np.int32))
    lib.pg_quantize_acts(_pool(pool), _ptr("float *", x), n, k, _ptr("uint8_t *", a.q), _ptr("float *", a.scale), _ptr("int32_t *", a.zp))
    return a


def gemm(t: QTensor, a: QActs, out: np.ndarray | None = None, pool: Pool | None = None) -> np.ndarray:
    """Y[N, M] = X . W^T from quantized activations (quant.gemm)."""
    n = a.q.shape[0]
    m, k = t.shape
    if a.q.dtype != np.uint8 or a.q.ndim != 2 or a.q.shape[1] != k or not a.q.flags.c_contiguous:
        raise PyguardError(f"activations must be contiguous uint8 [N, {k}], not {a.q.dtype} {a.q.shape}")
    if a.scale.shape != (n,) or a.zp.shape != (n,) or a.scale.dtype != np.float32 or a.zp.dtype != np.int32:
        raise PyguardError("activation scales and zero points must be float32 and int32 [N]")
    y = np.empty((n, m), np.float32) if out is None else _check_out(out, (n, m))
    if lib.pg_gemm(_pool(pool), _qtensor(t), _ptr("uint8_t *", a.q), _ptr("float *", a.scale), _ptr("int32_t *", a.zp), n,
                   _ptr("float *", y)) != 0:
        raise MemoryError("gemm activations")
    return y


def gemv(t: QTensor, x: np.ndarray, out: np.ndarray | None = None, pool: Pool | None = None) -> np.ndarray:
    """y[M] = W . x for float32 x[K] (quant.gemv)."""
    m, k = t.shape
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape != (k,):
        raise PyguardError(f"gemv input must have shape ({k},), not {x.shape}")
    y = np.empty(m, np.float32) if out is None else _check_out(out, (m,))
    if lib.pg_gemv(_pool(pool), _qtensor(t), _ptr("float *", x), _ptr("float *", y)) != 0:
        raise MemoryError("gemv activations")
    return y


def dequant_rows(t: QTensor, rows: np.ndarray, pool: Pool | None = None) -> np.ndarray:
    """float32 [len(rows), K]: rows of W dequantized, e.g. embedding lookup (quant.dequantize)."""
    m, k = t.shape
    rows = np.ascontiguousarray(rows, dtype=np.int32)
    if rows.size and (rows.min() < 0 or rows.max() >= m):
        raise PyguardError(f"row index out of range 0..{m - 1}")
    out = np.empty((rows.size, k), np.float32)
    lib.pg_dequant_rows(_pool(pool), _qtensor(t), _ptr("int32_t *", rows), rows.size, _ptr("float *", out))
    return out


def attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, start: int, scale: float,
              pool: Pool | None = None) -> np.ndarray:
    """Causal grouped-query attention (model.attention_reference): q [n, n_heads * hd] at
    positions start.., keys and values [n_kv, >= start + n, hd] float32; [n, n_heads * hd]."""
    n, width = q.shape
    n_kv, length, hd = keys.shape
    if (hd % 8 or width % hd or (width // hd) % n_kv or length < start + n or start < 0 or n < 1
            or values.shape != keys.shape or keys.strides != values.strides or n * n_kv >= 1 << 31):
        raise PyguardError(f"attention shapes do not fit: q {q.shape}, cache {keys.shape}, start {start}")
    for a in (keys, values):
        if a.dtype != np.float32 or not a[0].flags.c_contiguous or a.strides[0] % 4:
            raise PyguardError("the key/value cache must be float32 rows")
    q = np.ascontiguousarray(q, dtype=np.float32)
    out = np.empty_like(q)
    if lib.pg_attention(_pool(pool), _ptr("float *", q), ffi.cast("float *", keys.ctypes.data), ffi.cast("float *", values.ctypes.data),
                        keys.strides[0] // 4, n, start, width // hd, n_kv, hd, scale, _ptr("float *", out)) != 0:
        raise MemoryError("attention scores")
    return out


def _float32(a: object, what: str) -> np.ndarray:
    """a as a contiguous float32 array; any other dtype is an error, never converted."""
    if not isinstance(a, np.ndarray) or a.dtype != np.float32:
        raise PyguardError(f"{what} must be a float32 array, not {getattr(a, 'dtype', type(a).__name__)}")
    return np.ascontiguousarray(a)


def rope(x: np.ndarray, heads: int, cos: np.ndarray, sin: np.ndarray, pool: Pool | None = None) -> None:
    """Rotate the first `heads` heads of every row of x [n, width] in place (model.apply_rope):
    cos and sin [n, head_dim / 2] float32 hold the angles of each row's position."""
    cos, sin = _float32(cos, "rope cos"), _float32(sin, "rope sin")
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2 or not x.flags.c_contiguous or not x.flags.writeable:
        raise PyguardError("rope rotates a writable contiguous float32 array [n, width] in place")
    n, width = x.shape
    half = cos.shape[1] if cos.ndim == 2 else 0
    if (type(heads) is not int or heads < 1 or half < 1 or cos.shape != (n, half) or sin.shape != (n, half)
            or heads * 2 * half > width or max(n, width) >= 1 << 31):
        raise PyguardError(f"rope shapes do not fit: x {x.shape}, {heads!r} heads, cos {cos.shape}, sin {sin.shape}")
    lib.pg_rope(_pool(pool), _ptr("float *", x), n, width, heads, 2 * half, _ptr("float *", cos), _ptr("float *", sin))


def swiglu(gate_up: np.ndarray, pool: Pool | None = None) -> np.ndarray:
    """silu(gate) * up for gate_up [n, 2 hidden] float32, gate columns first: [n, hidden]
    (model.swiglu_reference)."""
    gate_up = _float32(gate_up, "swiglu input")
    if gate_up.ndim != 2 or gate_up.shape[1] < 2 or gate_up.shape[1] % 2 or max(gate_up.shape) >= 1 << 31:
        raise PyguardError(f"swiglu input must be [n, 2 hidden], not shape {gate_up.shape}")
    n, hidden = gate_up.shape[0], gate_up.shape[1] // 2
    out = np.empty((n, hidden), np.float32)
    lib.pg_swiglu(_pool(pool), _ptr("float *", gate_up), n, hidden, _ptr("float *", out))
    return out


def sgemm(a: np.ndarray, b: np.ndarray, pool: Pool | None = None) -> np.ndarray:
    """a [m, k] times b [n, k]^T, float32 [m, n], every element one chain of fused
    multiply-adds in order of k (detmath.matmul_reference): the converter's products, the same
    bits on every CPU, path and thread count (BLAS's are not)."""
    a, b = _float32(a, "sgemm input"), _float32(b, "sgemm input")
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or max(a.shape + b.shape) >= 1 << 31:
        raise PyguardError(f"sgemm shapes do not fit: {a.shape} and {b.shape} (a [m, k], b [n, k])")
    (m, k), n = a.shape, b.shape[0]
    c = np.empty((m, n), np.float32)
    if m and n and lib.pg_sgemm(_pool(pool), _ptr("float *", a), k, _ptr("float *", b), k, m, n, k, _ptr("float *", c), n) != 0:
        raise MemoryError("sgemm")
    return c


def upper_inverse(h: np.ndarray) -> np.ndarray:
    """float32 U, upper triangular, with U^T U = h^-1 for symmetric positive definite float32
    h [n, n] (its upper triangle read), bit for bit calibrate.upper_inverse_factor."""
    h = _float32(h, "upper_inverse input")
    if h.ndim != 2 or h.shape[0] != h.shape[1] or not 1 <= h.shape[0] < 1 << 15:
        raise PyguardError(f"upper_inverse needs a square matrix, not shape {h.shape}")
    u = np.empty_like(h)
    r = lib.pg_upper_inverse(_ptr("float *", h), h.shape[0], _ptr("float *", u))
    if r < 0:
        raise MemoryError("upper_inverse")
    if r:
        raise PyguardError("a Hessian is not positive definite")
    return u


def norm_quantize(x: np.ndarray, w: np.ndarray, eps: float, pool: Pool | None = None) -> QActs:
    """RMSNorm then per-row quantization, fused: bit for bit quant.quantize_acts(model.rms_norm(
    x, w, eps)) for float32 x [N, K] (K a multiple of 8) and w [K]."""
    x, w = _float32(x, "norm input"), _float32(w, "norm weight")
    if x.ndim != 2 or x.shape[1] < 8 or x.shape[1] % 8 or w.shape != x.shape[1:] or max(x.shape) >= 1 << 31:
        raise PyguardError(f"norm input must be [N, K] with K a multiple of 8 and weight [K], not {x.shape} and {w.shape}")
    n, k = x.shape
    a = QActs(np.empty((n, k), np.uint8), np.empty(n, np.float32), np.empty(n, np.int32))
    if lib.pg_norm_quantize(_pool(pool), _ptr("float *", x), n, k, _ptr("float *", w), eps, _ptr("uint8_t *", a.q),
                            _ptr("float *", a.scale), _ptr("int32_t *", a.zp)) != 0:
        raise MemoryError("norm rows")
    return a


def _apply_env_isa() -> str | None:
    """Apply PYGUARD_ISA; the error, if any, is raised by the first pool made."""
    name = os.environ.get("PYGUARD_ISA")
    if not name:
        return None
    try:
        set_isa(name)
    except PyguardError as e:
        return f"PYGUARD_ISA={name!r}: {e}"
    return None


_env_isa_error = _apply_env_isa()
blas.limit_to_one_thread()
