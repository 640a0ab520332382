"""cffi builder (API mode, out of line): compiles csrc/ into pyguard._kernels at install time."""

import pathlib
import platform
import re

from cffi import FFI

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"

# glibc: pin the pthread functions to their pre-2.34 symbol versions (csrc/glibc_compat.h) and
# link libpthread.so.0, where glibc before 2.34 defines them, so that a wheel built on any glibc
# needs only glibc 2.17 (manylinux2014) and not the build host's.
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

ffibuilder = FFI()
# The public header doubles as the cdef, minus preprocessor lines.
ffibuilder.cdef(re.sub(r"^#.*$", "", (CSRC / "pyguard.h").read_text(), flags=re.M))
ffibuilder.set_source(
    "pyguard._kernels",
    '#include "pyguard.h"',
    sources=sorted(str(p.relative_to(CSRC.parent)) for p in CSRC.glob("*.c") if not p.name.startswith("test_")),
    include_dirs=[str(CSRC)],
    # No -march: SIMD paths carry their own target attributes, so one build runs on any CPU
    # of the architecture. -ffp-contract=off keeps float results identical to numpy's.
    extra_compile_args=["-O2", "-std=c11", "-ffp-contract=off", "-pthread"]
    + (["-include", str(CSRC / "glibc_compat.h")] if GLIBC else []),
    extra_link_args=["-pthread"] + (["-Wl,--push-state,--no-as-needed", "-l:libpthread.so.0", "-Wl,--pop-state"] if GLIBC else []),
    libraries=["m"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(CSRC.parent), verbose=False)
