from setuptools import setup

setup(cffi_modules=["pyguard/_build.py:ffibuilder"])
