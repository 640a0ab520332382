"""numpy's BLAS runs single-threaded once pyguard's kernels are loaded (the pool owns the cores),
and gives the converter right products on this CPU (the wheels' tests run this file on aarch64
under qemu's -cpu max too, where OpenBLAS picks its SME kernels)."""

import ctypes
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from pyguard.convert import calibrate
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


def test_calibration_products_are_right():
    """The calibration's Hessians X^T X (calibrate.gram) and its layer products X W^T, against
    float64, on inputs shaped like a span's (2048 rows, 256 to 512 columns), from three threads
    at once as in a conversion (the pass and two error-feedback threads). Where numpy's OpenBLAS
    runs a kernel set known to get them wrong, calibration refuses it (test_calibrate), and so
    this test: under qemu -cpu max, OpenBLAS 0.3.31's SME kernels return NaN here (the wheels'
    aarch64 tests run with OPENBLAS_CORETYPE=NEOVERSEN1, as docs/INSTALL.md tells users)."""
    if blas.broken_core():
        pytest.skip(f"numpy's OpenBLAS runs its {blas.broken_core()} kernels, which calibration refuses")

    def check(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for k in (256, 512, 256):
            x = rng.standard_normal((2048, k)).astype(np.float32)
            w = rng.standard_normal((384, k)).astype(np.float32)
            x64 = x.astype(np.float64)
            for got, want in ((calibrate.gram(x), x64.T @ x64), (x @ w.T, x64 @ w.T.astype(np.float64))):
                assert np.isfinite(got).all()
                assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(check, range(3)))
