"""numpy's BLAS runs single-threaded once pyguard's kernels are loaded (the pool owns the cores)."""

import ctypes

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
