"""One result on every CPU: a verdict is a pure function of (file, conversation, options).

Every kernel path follows one accumulation order (quant.gemm: exact int32 group sums, then group
after group in float32), and what numpy would compute differently per instruction set (exp,
sin, cos, pow: its SIMD builds round differently) goes through pyguard.engine.detmath. Checked
here on every path this CPU runs and with numpy's SIMD code switched off
(NPY_DISABLE_CPU_FEATURES), which is what another CPU would run; the NEON paths are checked
kernel by kernel against the scalar path under qemu (tests/test_neon.py), which these
whole-model results are equal to. The decisive test model is built from numpy linear algebra:
its file must be the same bytes under all of these too (else a suite tuned on one CPU fails on
another). So must a conversion with calibration (its float products are kernels.sgemm, not
BLAS: also checked with OpenBLAS forced to other kernel sets), and the wheels' tests compare
x86-64's and aarch64's conversions of the demo (tools/build_wheels.py)."""

from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import synth
from pyguard.engine import kernels
from pyguard.engine.model import Model
from pyguard.formats.config import ModelConfig

ISAS = kernels.available_isas()
TESTS = pathlib.Path(__file__).resolve().parent
CFG = ModelConfig(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=32, hidden_dim=512, vocab_size=600,
                  rope_theta=500000.0, max_seq_len=131072, rope_scaling=synth.GUARD_1B.rope_scaling)


def numpy_simd_off() -> str | None:
    """NPY_DISABLE_CPU_FEATURES naming every optional SIMD feature numpy dispatches to on this
    CPU: numpy then runs its baseline code, as on a CPU without them."""
    from numpy._core import _multiarray_umath as mu

    found = [f for f in getattr(mu, "__cpu_dispatch__", []) if mu.__cpu_features__.get(f)]
    return " ".join(found) or None


@pytest.fixture(autouse=True)
def restore_isa():
    before = kernels.isa()
    yield
    kernels.set_isa(before)


@pytest.mark.parametrize("group", [32, 256])
def test_whole_model_logits_are_the_same_bits_on_every_path(group):
    """Prefill (the GEMM) and decode (the GEMV) logits of a random model, every kernel path
    against scalar, bit for bit."""
    tensors, _ = synth.quantize_checkpoint(CFG, synth.random_weights(CFG, seed=3), group)
    ids = np.random.default_rng(group).integers(0, CFG.vocab_size, 70)
    got = {}
    for isa in ISAS:
        kernels.set_isa(isa)
        model = Model(CFG, tensors, threads=2)
        state = model.new_state(3100)
        state.pos = 3000  # a long conversation's positions (the rotary tables' large angles); the cache's zeros as keys
        logits = model.prefill(state, ids[:69], all_logits=True)
        got[isa] = np.concatenate([logits, model.decode(state, int(ids[69]))[None]])
    assert len(got) >= 2 and all(np.isfinite(v).all() for v in got.values())
    for isa, logits in got.items():
        assert np.array_equal(logits, got["scalar"]), isa


SCRIPT = """
import hashlib, sys, tempfile
import numpy as np
import synth
from pyguard.guard.guard import Guard
path = synth.decisive_guard(tempfile.mkdtemp(dir=sys.argv[1]), "guard")
scores = np.array([Guard.load(path, threads=1).classify(c).score for c in synth.SAMPLES])
print(hashlib.sha256(open(path, "rb").read()).hexdigest(), hashlib.sha256(scores.tobytes()).hexdigest())
"""


def test_decisive_model_and_its_scores_are_the_same_everywhere(tmp_path):
    """The decisive file, built and judged under every kernel path and with numpy's SIMD code
    off: the same bytes and the same score bits each time."""
    variants = [{"PYGUARD_ISA": isa} for isa in ISAS]
    simd = numpy_simd_off()
    if simd:
        variants.append({"NPY_DISABLE_CPU_FEATURES": simd})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}

    def build(extra: dict) -> str:
        r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                           env={**env, **extra}, timeout=600)
        assert r.returncode == 0, f"{extra}: {r.stderr}"
        return r.stdout.strip()

    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(map(str, variants), pool.map(build, variants)))
    assert len(results) >= 3 and len(set(results.values())) == 1, results


CONVERT = """
import hashlib, sys
from pyguard.convert.checkpoint import DEMO, reference_tokenizer_model, write_checkpoint
from pyguard.convert.hf import convert
d = sys.argv[1]
convert(d + "/hf", d + "/out.pgw", threads=int(sys.argv[2]))
print(hashlib.sha256(open(d + "/out.pgw", "rb").read()).hexdigest())
"""


def blas_variants() -> list[dict]:
    """OpenBLAS kernel sets any CPU of this architecture runs, forced (their float32 sums differ)."""
    import platform

    return [{"OPENBLAS_CORETYPE": c} for c in {"x86_64": ["Prescott", "Haswell"] if "avx2" in ISAS else ["Prescott"],
                                               "aarch64": ["ARMV8"]}.get(platform.machine(), [])]


def test_calibrated_conversion_is_the_same_bytes_everywhere(tmp_path):
    """`pyguard demo`'s conversion (calibration, folding, error feedback) under every kernel
    path, 1 and 2 threads, numpy's SIMD code off and OpenBLAS's kernel sets forced: the same
    file bytes each time."""
    from pyguard.convert.checkpoint import DEMO, reference_tokenizer_model, write_checkpoint

    write_checkpoint(str(tmp_path / "hf"), DEMO, seed=0, tokenizer_model=reference_tokenizer_model())
    variants = [{"PYGUARD_ISA": isa} for isa in ISAS] + [{"threads": "1"}] + blas_variants()
    simd = numpy_simd_off()
    if simd:
        variants.append({"NPY_DISABLE_CPU_FEATURES": simd})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}

    def convert(k: int) -> str:
        extra, d = dict(variants[k]), tmp_path / str(k)
        d.mkdir()
        (d / "hf").symlink_to(tmp_path / "hf")
        r = subprocess.run([sys.executable, "-c", CONVERT, str(d), extra.pop("threads", "2")], capture_output=True,
                           text=True, env={**env, **extra}, timeout=600)
        assert r.returncode == 0, f"{variants[k]}: {r.stderr}"
        return r.stdout.strip().splitlines()[-1]

    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(map(str, variants), pool.map(convert, range(len(variants)))))
    assert len(results) >= 4 and len(set(results.values())) == 1, results


def test_exact_fma_and_log():
    """detmath.fma32 is C's fmaf (one rounding) on random and on double-rounding cases, checked
    against exact rational arithmetic; detmath.log is within 2 float64 ulps of libm's."""
    import math
    from fractions import Fraction

    from pyguard.engine import detmath

    def fmaf(a: float, b: float, c: float) -> np.float32:  # exact, then the nearest float32, ties to even
        x = Fraction(a) * Fraction(b) + Fraction(c)
        near = np.float32(float(x))
        best = min((near, np.nextafter(near, np.float32(np.inf)), np.nextafter(near, np.float32(-np.inf))),
                   key=lambda f: (abs(Fraction(float(f)) - x), int(np.float32(f).view(np.int32)) & 1))
        return np.float32(best)

    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal(3000) * 10.0 ** rng.integers(-6, 6, 3000)).astype(np.float32).reshape(3, 1000)
    c[:300] = -(a[:300] * b[:300])  # cancellation
    t = np.float32(1 + 2**-12)  # t * t = 1 + 2^-11 + 2^-24: a float32 tie; +-2^-60 decides it, which float64 loses
    a, b = np.append(a, [t, t, t]), np.append(b, [t, t, t])
    c = np.append(c, [np.float32(2**-60), np.float32(-(2**-60)), np.float32(0)])
    got = detmath.fma32(a, b, c)
    want = np.array([fmaf(float(x), float(y), float(z)) for x, y, z in zip(a, b, c)], np.float32)
    assert np.array_equal(got, want)
    assert got[-3] != got[-2] and got[-1] == got[-2]  # ties to even below, the nudge up above
    x = np.concatenate([np.geomspace(1e-300, 1e300, 20001), [0.5, 1.0, 2.0, math.e, 1 - 2**-52]])
    want = np.array([math.log(v) for v in x])
    assert (np.abs(detmath.log(x) - want) <= 2 * np.spacing(np.abs(want)) + 1e-300).all()
    assert detmath.log(np.array([1.0]))[0] == 0.0 and np.isnan(detmath.log(np.array([0.0, -1.0, np.nan]))).all()
    assert detmath.log(np.array([np.inf]))[0] == np.inf


def test_detmath_matches_the_exact_functions():
    """detmath's functions are accurate, not only reproducible: exp within 2 float64 ulps, cos
    and sin within a float32 rounding of the float64 libm values, pow32 within one float32 ulp."""
    import math

    from pyguard.engine import detmath

    x = np.concatenate([np.linspace(-745, 0, 20001), [-1e-300, -0.0, 0.0, 1.0, 700.0]])
    want = np.array([math.exp(v) for v in x])
    assert (np.abs(detmath.exp(x) - want) <= 2 * np.spacing(want)).all()
    assert detmath.exp(np.array([-np.inf]))[0] == 0 and np.isinf(detmath.exp(np.array([800.0]))[0])
    angles = (np.arange(0, 131072, 7, dtype=np.float32)[:, None] * np.float32([1, 0.37, 1e-3, 2e-7])).astype(np.float32)
    cos, sin = detmath.sincos32(angles)
    a64 = angles.astype(np.float64)
    for got, ref in ((cos, np.cos(a64)), (sin, np.sin(a64))):
        assert (np.abs(got - ref) <= np.spacing(np.abs(ref).astype(np.float32)) / 2 + 1e-45).all()
    e = np.arange(0, 128, 2, dtype=np.float32) / np.float32(128)
    ref = np.array([500000.0 ** float(v) for v in e])
    assert (np.abs(detmath.pow32(500000.0, e) - ref) <= np.spacing(ref.astype(np.float32))).all()
