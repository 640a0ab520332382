"""The C kernels are built by cffi at install time (pyguard/_build.py); all other metadata is
in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["pyguard/_build.py:ffibuilder"])
