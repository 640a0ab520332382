"""numpy's BLAS: kept single-threaded, and its kernel set checked.

pyguard calls BLAS only for the engine's int8 tables' products (integers in float64, exact in
any order; the converter's float products are pyguard's own, kernels.sgemm). A multi-threaded OpenBLAS leaves its threads spinning after each call, and they then
compete with the kernel pool for the same cores: on 2 cores that cost a third of the prefill
speed. The library's own setter is used (environment variables only work before numpy is
first imported).

`openblas_cores` tells which kernel set OpenBLAS chose (the wheels' tests print it): OpenBLAS
0.3.31's SME kernels, which numpy 2.4's wheels choose on Armv9 CPUs with SME and under qemu's
-cpu max, get float32 products wrong (OpenBLAS issue 5873), which is one reason the converter
no longer uses BLAS.
"""

from __future__ import annotations

import ctypes

SETTERS = ("openblas_set_num_threads", "openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
           "scipy_openblas_set_num_threads64_", "MKL_Set_Num_Threads")


CORE_NAMES = ("openblas_get_corename", "openblas_get_corename64_", "scipy_openblas_get_corename",
              "scipy_openblas_get_corename64_")


def loaded_blas_libraries() -> list[str]:
    """Paths of the BLAS shared libraries mapped into this process (Linux; [] elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return []
    return sorted(p for p in paths if any(k in p.rsplit("/", 1)[-1].lower() for k in ("openblas", "libmkl_rt")))


def limit_to_one_thread() -> int:
    """Set every loaded BLAS to one thread; returns how many libraries were set."""
    import numpy as np

    np.dot(np.ones((2, 2)), np.ones((2, 2)))  # make sure numpy has loaded its BLAS
    done = 0
    for path in loaded_blas_libraries():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in SETTERS:
            fn = getattr(lib, name, None)
            if fn is not None:
                fn(1) if name != "MKL_Set_Num_Threads" else fn(ctypes.c_int(1))
                done += 1
                break
    return done


def openblas_cores() -> list[str]:
    """The kernel set (core name, lower case) each loaded OpenBLAS chose for this CPU."""
    import numpy as np

    np.dot(np.ones((2, 2)), np.ones((2, 2)))  # make sure numpy has loaded its BLAS
    cores = []
    for path in loaded_blas_libraries():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in CORE_NAMES:
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                cores.append((fn() or b"").decode("ascii", "replace").strip().lower())
                break
    return cores
