"""The C kernels under AddressSanitizer and UndefinedBehaviorSanitizer (csrc/test_kernels.c
built natively: the scalar path and this CPU's SIMD path, 1 and 3 threads)."""

import subprocess

from test_neon import build


def test_kernels_clean_under_sanitizers(tmp_path):
    binary = build("gcc", tmp_path / "test_kernels", "-O1", "-g", "-fno-omit-frame-pointer",
                   "-fsanitize=address,undefined", "-fno-sanitize-recover=all")
    r = subprocess.run([str(binary), "3", "300"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "runtime error" not in r.stderr and "AddressSanitizer" not in r.stderr
    assert "SIMD paths tested" in r.stdout
