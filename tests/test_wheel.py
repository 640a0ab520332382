"""What a wheel promises, checked on the installed package (tools/build_wheels.py runs this suite
from the wheel it built, on x86_64 and on aarch64 under qemu): one version string, an extension
that needs nothing newer than the manylinux_2_17 tag says (glibc 2.17), a wheel of modules and
one extension only."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import pathlib
import re
import shutil
import subprocess

import pytest

import pyguard
import pyguard._kernels

ROOT = pathlib.Path(__file__).resolve().parent.parent
DISTRIBUTION = "pyguard-lg3"
MANYLINUX_GLIBC = (2, 17)


def build_wheels():
    spec = importlib.util.spec_from_file_location("build_wheels", ROOT / "tools" / "build_wheels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_version_string():
    """pyguard.__version__ is the version: pyproject.toml reads it, the installed metadata has it."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    project = pyproject.split("[project]", 1)[1].split("\n[", 1)[0]
    assert f'name = "{DISTRIBUTION}"' in project and 'dynamic = ["version"]' in project
    assert not re.search(r"(?m)^version\s*=", project)
    assert 'version = {attr = "pyguard.__version__"}' in pyproject
    assert re.fullmatch(r"\d+\.\d+\.\d+", pyguard.__version__)
    assert importlib.metadata.version(DISTRIBUTION) == pyguard.__version__
    # the installed metadata, and an editable install's egg-info when run from the source tree
    assert set(importlib.metadata.packages_distributions()["pyguard"]) == {DISTRIBUTION}


def test_extension_needs_glibc_2_17_at_most():
    """The pthread functions glibc 2.34 moved into libc are bound to their old versions
    (csrc/glibc_compat.h): no symbol version above manylinux_2_17's glibc, and libpthread.so.0,
    where an older glibc defines them, is linked."""
    if shutil.which("objdump") is None:
        pytest.fail("objdump is missing: apt-get install binutils")
    so = pyguard._kernels.__file__
    symbols = subprocess.run(["objdump", "-T", so], capture_output=True, text=True, check=True).stdout
    versions = {tuple(map(int, v.split("."))) for v in re.findall(r"\bGLIBC_(\d+(?:\.\d+)+)", symbols)}
    assert versions and max(versions) <= MANYLINUX_GLIBC, sorted(versions)
    assert re.search(r"\(GLIBC_[\d.]+\)\s+pthread_create\b", symbols), "pthread_create is not versioned as expected"
    needed = subprocess.run(["objdump", "-p", so], capture_output=True, text=True, check=True).stdout
    assert re.search(r"NEEDED\s+libpthread\.so\.0", needed)


def test_extension_is_limited_api():
    """cp310-abi3: the one extension serves every CPython from 3.10."""
    assert pyguard._kernels.__file__.endswith(".abi3.so")


@pytest.mark.parametrize("names, ok", [
    (["pyguard/__init__.py", "pyguard/engine/model.py", "pyguard/_kernels.abi3.so", "pyguard_lg3-0.1.0.dist-info/RECORD"], True),
    (["pyguard/__init__.py", "pyguard_lg3-0.1.0.dist-info/RECORD"], False),                             # no extension
    (["pyguard/__init__.py", "pyguard/_kernels.abi3.so", "pyguard/_kernels.c"], False),               # its C source
    (["pyguard/__init__.py", "pyguard/_kernels.abi3.so", "csrc/pool.o"], False),                      # an object file
    (["pyguard/_kernels.abi3.so", "pyguard/_kernels.cpython-311-x86_64-linux-gnu.so"], False),       # a second build
    (["pyguard/_kernels.abi3.so", "pyguard_lg3.libs/libgomp-a34b3233.so.1.0.0"], False),             # a grafted library
])
def test_wheel_content_check(names, ok):
    check = build_wheels().check_wheel_files
    if ok:
        check(names)
    else:
        with pytest.raises(SystemExit, match="unexpected wheel content"):
            check(names)
