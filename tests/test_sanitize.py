"""The C kernels and the worker pool under sanitizers (csrc/test_kernels.c built natively: the
scalar path and this CPU's SIMD paths against each other, pools of 1 and 3 threads, attention,
the worst-case int16 sum, then back-to-back jobs of different task counts on a 2-thread pool):
AddressSanitizer + UndefinedBehaviorSanitizer (float-cast-overflow included: a NaN must never
reach an integer conversion; on x86-64 with the emulated VNNI paths too, so the 512-bit code's
loads are bounds-checked on any machine), and ThreadSanitizer for the pool."""

import platform
import re
import subprocess

import pytest

from test_neon import build

SANITIZERS = {
    "address,undefined": ["-fsanitize=address,undefined,float-cast-overflow", "-fno-sanitize-recover=all"]
    + (["-DPG_VNNI_EMULATION"] if platform.machine() == "x86_64" else []),
    "thread": ["-fsanitize=thread"],
}


@pytest.mark.parametrize("name", SANITIZERS)
def test_kernels_clean_under_sanitizers(tmp_path, name):
    binary = build("gcc", tmp_path / "test_kernels", "-O1", "-g", "-fno-omit-frame-pointer", *SANITIZERS[name])
    env = {"TSAN_OPTIONS": "halt_on_error=1 second_deadlock_stack=1", "ASAN_OPTIONS": "detect_leaks=1"}
    r = subprocess.run([str(binary), "3", "150", "3000"], capture_output=True, text=True, timeout=600, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "runtime error" not in r.stderr and "Sanitizer" not in r.stderr, out
    tested = re.search(r"^(\d+) SIMD paths tested$", r.stdout, re.M)
    assert tested and int(tested.group(1)) >= 1, out  # this machine's SIMD path really ran
    assert "factor: 20 cases ok" in r.stdout and "ok pool: 3000 rounds" in r.stdout, out
