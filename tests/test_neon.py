"""The NEON paths (plain, dotprod and i8mm), cross-compiled for aarch64 and run under qemu against the
scalar path (csrc/test_kernels.c). .ci/run installs the tools: a missing tool fails, never skips."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"
TOOLS = "apt-get install gcc-aarch64-linux-gnu qemu-user (.ci/run does it)"


def build(compiler: str, out: pathlib.Path, *flags: str) -> pathlib.Path:
    if shutil.which(compiler) is None:
        pytest.fail(f"{compiler} is missing: {TOOLS}")
    sources = sorted(str(p) for p in CSRC.glob("*.c"))  # the library and test_kernels.c
    cmd = [compiler, "-std=c11", "-ffp-contract=off", "-pthread", "-I", str(CSRC), *flags, *sources, "-lm", "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def arm_binary(tmp_path_factory):
    return build("aarch64-linux-gnu-gcc", tmp_path_factory.mktemp("neon") / "test_kernels", "-O2", "-static")


@pytest.mark.parametrize("cpu, best, paths", [
    ("cortex-a53", "neon", ["neon"]),                                  # ARMv8.0: no dotprod, detected at run time
    ("cortex-a76", "neon-dotprod", ["neon", "neon-dotprod"]),          # ARMv8.2 with dotprod, no i8mm
    ("max", "neon-i8mm", ["neon", "neon-dotprod", "neon-i8mm"]),       # i8mm (USMMLA): HWCAP2_I8MM
])
@pytest.mark.parametrize("seed", [1, 2])
def test_neon_paths_match_scalar(arm_binary, cpu, best, paths, seed):
    if shutil.which("qemu-aarch64") is None:
        pytest.fail(f"qemu-aarch64 is missing: {TOOLS}")
    r = subprocess.run(["qemu-aarch64", "-cpu", cpu, str(arm_binary), str(seed), "300", "200"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"best: {best}"
    tested = [ln for ln in lines if ln.startswith("ok ") and not ln.startswith("ok pool")]
    assert [ln.split()[1].rstrip(":") for ln in tested] == paths
    assert all("bit-identical" in ln for ln in tested)
    assert "factor: 20 cases ok" in lines and "ok pool: 200 rounds of back-to-back jobs" in lines
