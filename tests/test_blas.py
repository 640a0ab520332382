"""numpy's BLAS runs single-threaded once pyguard's kernels are loaded (the pool owns the cores),
and gives the engine's int8 table products exactly (the wheels' tests run this file on aarch64
under qemu's -cpu max too, where OpenBLAS picks its SME kernels)."""

import ctypes
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from pyguard.engine import blas, kernels  # noqa: F401 (importing the kernels applies the limit)

GETTERS = ("openblas_get_num_threads", "openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
           "scipy_openblas_get_num_threads64_")


def test_numpy_blas_threads_limited():
    import os

    import numpy

    numpy_dir = os.path.dirname(numpy.__file__)  # wheels ship it in numpy.libs beside numpy
    found = 0
    for path in [p for p in blas.loaded_blas_libraries() if p.startswith(numpy_dir)]:
        lib = ctypes.CDLL(path)
        for name in GETTERS:
            if hasattr(lib, name):
                assert getattr(lib, name)() == 1, path
                found += 1
    if not found:
        pytest.skip("numpy here is not linked to an OpenBLAS whose thread count can be read")


def test_int8_table_products_are_exact():
    """What pyguard still asks of numpy's BLAS: the int8 tables' products (model.linear8,
    integers summed in float64) equal the exact integer sums, from three threads at once (the
    wheels' tests run this file on aarch64 under qemu's -cpu max too)."""
    from pyguard.engine.model import linear8
    from pyguard.formats import quant

    def check(seed: int) -> None:
        rng = np.random.default_rng(seed)
        t = quant.quantize8(rng.standard_normal((512, 256)).astype(np.float32))
        x = rng.standard_normal((16, 256)).astype(np.float32)
        qx = kernels.quantize_acts(x)
        exact = (qx.q.astype(np.int64) - qx.zp[:, None]) @ t.q.astype(np.int64).T  # integers: no rounding
        got = linear8(t, x, kernels.Pool(1))
        want = (exact.astype(np.float32) * t.scales[None, :]) * qx.scale[:, None]
        assert np.array_equal(got, want)

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(check, range(3)))
