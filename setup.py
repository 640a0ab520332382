"""The C kernels are built by cffi at install time (pyguard/_build.py); all other metadata is
in pyproject.toml. The extension uses Python's limited API (cffi's default), so a wheel is tagged
cp310-abi3: one wheel per architecture serves every CPython from 3.10."""

from setuptools import setup

setup(cffi_modules=["pyguard/_build.py:ffibuilder"], options={"bdist_wheel": {"py_limited_api": "cp310"}})
