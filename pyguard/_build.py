"""cffi builder (API mode, out of line): compiles csrc/ into pyguard._kernels at install time."""

import pathlib
import re

from cffi import FFI

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"

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
    extra_compile_args=["-O2", "-std=c11", "-ffp-contract=off", "-pthread"],
    extra_link_args=["-pthread"],
    libraries=["m"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(CSRC.parent), verbose=False)
