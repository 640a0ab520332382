"""Every kernel path of this machine's architecture, as a test parameter: a path this CPU lacks
is skipped with that reason, so each run's report names the paths it did not run natively (the
emulation build, test_kernels.test_vnni_code_by_emulation, still runs their x86 source)."""

from __future__ import annotations

import platform

import pytest

from pyguard.engine import kernels


def this_architecture() -> list[str]:
    """scalar and the SIMD paths of this machine's architecture (kernels.ISAS order)."""
    arm = platform.machine() == "aarch64"
    x86 = platform.machine() == "x86_64"
    return [n for n in kernels.ISAS if n == "scalar" or (n.startswith("neon") and arm) or (not n.startswith("neon") and x86)]


def each_path():
    """pytest.mark.parametrize("isa", ...) over this_architecture(), the paths this CPU cannot
    run skipped as 'CPU lacks NAME' (amx: with kernels.amx_status's reason)."""
    have = kernels.available_isas()
    params = []
    for name in this_architecture():
        why = f"CPU lacks {name}" + (f": {kernels.amx_status()}" if name == "amx" else "")
        params.append(pytest.param(name, marks=pytest.mark.skipif(name not in have, reason=why)))
    return pytest.mark.parametrize("isa", params)
