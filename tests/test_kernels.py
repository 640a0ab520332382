"""Every C kernel on every ISA path this CPU has, against the numpy specification (quant.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyguard import PyguardError
from pyguard.engine import kernels
from pyguard.formats import quant

from kernel_paths import each_path

ISAS = kernels.available_isas()
EPS = np.finfo(np.float32).eps


@pytest.fixture(autouse=True)
def restore_isa():
    before = kernels.isa()
    yield
    kernels.set_isa(before)
    kernels.set_threads(None)


each_isa = each_path()


def test_this_machine_has_its_simd_path():
    """CI must not silently fall back to scalar: x86-64 runners have AVX2, aarch64 NEON."""
    import platform

    expect = {"x86_64": "avx2", "aarch64": "neon"}.get(platform.machine())
    if expect is None:
        pytest.skip(f"no SIMD path for {platform.machine()}")
    assert expect in ISAS and "scalar" in ISAS


def test_vnni_code_by_emulation(tmp_path):
    """The VNNI and AMX kernels' source, 256-bit and 512-bit, built with vpdpbusd emulated by its
    exact AVX2 sequence, each 512-bit instruction by its effect on a pair of 256-bit vectors and
    each tile instruction by its definition on tiles in memory, shapes the hardware refuses
    aborting (-DPG_VNNI_EMULATION, test-only paths): the same code, unpacking, folds, transposes,
    layout, tiling and edges, checked on any x86-64, bit-identical to scalar (csrc/test_kernels.c;
    tests/test_sanitize.py runs it under ASan and UBSan too)."""
    import platform

    from test_neon import build

    if platform.machine() != "x86_64" or "avx2" not in ISAS:
        pytest.skip(f"CPU lacks avx2 ({platform.machine()}): the emulation runs on AVX2")
    binary = build("gcc", tmp_path / "test_kernels", "-O2", "-DPG_VNNI_EMULATION")
    r = subprocess.run([str(binary), "11", "300", "50"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    for path in ("vnni-emulated", "avx512vnni-emulated", "amx-emulated"):
        assert f"ok {path}: 300 cases (bit-identical to scalar)" in r.stdout, r.stdout


@st.composite
def matrices(draw, exact: bool):
    """A QTensor [M, K] with G | K, 64 | K, and matching activation rows X [N, K].

    exact: power-of-two scales and activations whose quantization is exact in float32, so every
    float operation of the kernels is exact and results must equal the reference bit for bit
    (this checks the integer dot products and the layout, whatever the summation order)."""
    group = draw(st.sampled_from(quant.GROUP_SIZES))
    k = max(group, 64) * draw(st.sampled_from([1, 2, 3, 5, 6, 9]))  # past 1024: the GEMM's column spans
    m = draw(st.sampled_from([1, 2, 3, 5, 7, 16, 17, 33, 70]))
    # the GEMM's 8- and 16-token vectors, and the tails past them (up to 2 tokens on ymm, 6 on
    # zmm) taken with columns in the lanes
    n = draw(st.sampled_from([1, 2, 3, 4, 5, 8, 13, 17, 18, 19, 21, 22, 31, 33, 39, 64, 86]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    q = rng.integers(-8, 8, (m, k), dtype=np.int8)
    if exact:
        # d in {1/2, 1, 2}: every d * dot, sum and difference fits float32's 24 bits exactly
        scales = (2.0 ** rng.integers(-1, 2, (m, k // group)) * rng.choice([-1, 1], (m, k // group))).astype(np.float16)
        x = rng.integers(-128, 128, (n, k)).astype(np.float32) / 128
        x[:, 0], x[:, 1] = -1, 127 / 128  # range exactly [-1, 127/128]: scale 1/128, zero point 128
    else:
        mag = draw(st.sampled_from([6e-8, 6e-5, 1e-2, 1.0, 300.0, 60000.0]))
        scales = np.clip(rng.standard_normal((m, k // group)) * mag, -65000, 65000).astype(np.float16)
        scales[rng.random(scales.shape) < 0.1] = 0
        xmag = draw(st.sampled_from([1e-20, 1e-3, 1.0, 1e4, 1e20]))
        x = (rng.standard_normal((n, k)) * xmag).astype(np.float32)
        kind = draw(st.sampled_from(["mixed", "positive", "negative", "zero"]))
        x = np.abs(x) if kind == "positive" else -np.abs(x) if kind == "negative" else x * 0 if kind == "zero" else x
    return quant.pack_weights(q, scales), x


def _bound(t: quant.QTensor, a: quant.QActs) -> np.ndarray:
    """Float32 rounding bound of the specification's sum: the integer parts are exact, and the
    float sum of the K/G scaled group sums, minus zp * rowsum, times s, errs by at most
    (K/G + 4) eps times the magnitudes involved (+8: room to spare)."""
    qw = np.abs(quant.unpack_nibbles(t.qs).astype(np.float64))
    m, k = qw.shape
    mags = np.einsum("nk,mk->nmk", a.q.astype(np.float64), qw).reshape(len(a.q), m, -1, t.group).sum(axis=3)
    terms = (mags * np.abs(t.scales.astype(np.float64))[None]).sum(axis=2)
    terms += np.abs(a.zp[:, None] * t.rowsum.astype(np.float64)[None])
    return (k // t.group + 12) * EPS * a.scale[:, None].astype(np.float64) * terms + 1e-38


def _exact64(t: quant.QTensor, a: quant.QActs) -> np.ndarray:
    acc = (quant.group_dots(t, a) * t.scales.astype(np.float64)[None]).sum(axis=2)
    return a.scale[:, None].astype(np.float64) * (acc - a.zp[:, None] * t.rowsum.astype(np.float64)[None])


@each_isa
@settings(max_examples=60, deadline=None)
@given(matrices(exact=False))
def test_quantize_acts_exact(isa, tx):
    kernels.set_isa(isa)
    _, x = tx
    got, ref = kernels.quantize_acts(x), quant.quantize_acts(x)
    assert np.array_equal(got.q, ref.q) and np.array_equal(got.scale, ref.scale) and np.array_equal(got.zp, ref.zp)


@each_isa
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 200), st.integers(1, 5), st.integers(0, 2**32 - 1))
def test_quantize_acts_any_width(isa, k, n, seed):
    """Rows of any length: the SIMD loops' tails (K not a multiple of 8 or 32) included."""
    kernels.set_isa(isa)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, k)) * 10.0 ** rng.integers(-3, 4)).astype(np.float32)
    x[rng.random(x.shape) < 0.05] = 0
    got, ref = kernels.quantize_acts(x), quant.quantize_acts(x)
    assert np.array_equal(got.q, ref.q) and np.array_equal(got.scale, ref.scale) and np.array_equal(got.zp, ref.zp)


@each_isa
@settings(max_examples=60, deadline=None)
@given(matrices(exact=True))
def test_gemm_and_gemv_exact(isa, tx):
    kernels.set_isa(isa)
    t, x = tx
    a = quant.quantize_acts(x)
    ref = quant.gemm(t, a)
    assert np.array_equal(ref, _exact64(t, a).astype(np.float32))  # the inputs are exact: so is the reference
    assert np.array_equal(kernels.gemm(t, a), ref)
    assert np.array_equal(kernels.gemv(t, x[0]), quant.gemv(t, x[0]))


@each_isa
@settings(max_examples=80, deadline=None)
@given(matrices(exact=False))
def test_gemm_and_gemv_equal_the_specification_bit_for_bit(isa, tx):
    """One accumulation order on every path (quant.gemm: exact int32 group sums, then group after
    group in float32): results are the same bits whatever the CPU, scalar, AVX2, VNNI or NEON."""
    kernels.set_isa(isa)
    t, x = tx
    a = quant.quantize_acts(x)
    ref = quant.gemm(t, a)
    assert np.array_equal(kernels.gemm(t, a), ref)
    assert np.array_equal(kernels.gemv(t, x[0]), quant.gemv(t, x[0]))
    assert np.array_equal(quant.gemv(t, x[0]), ref[0])  # a GEMV is a one-token GEMM
    assert (np.abs(ref - _exact64(t, a)) <= _bound(t, a)).all()  # and the order is an accurate one


@each_isa
@settings(max_examples=40, deadline=None)
@given(matrices(exact=False))
def test_dequant_rows_exact(isa, tx):
    kernels.set_isa(isa)
    t, _ = tx
    rows = np.arange(t.shape[0])[::-1].copy()
    assert np.array_equal(kernels.dequant_rows(t, rows), quant.dequantize(t, rows))


@each_isa
@settings(max_examples=20, deadline=None)
@given(matrices(exact=False), st.sampled_from([1, 300, 1000]))
def test_bit_identical_for_any_thread_count(isa, tx, tall):
    """tall: extra rows, so that task boundaries move with the thread count (M <= 70 makes
    the same 16-row tasks for any count)."""
    kernels.set_isa(isa)
    t, x = tx
    if tall > 1:
        t = quant.QTensor(np.repeat(t.qs, tall, 0)[:tall * 7 // 5], np.repeat(t.scales, tall, 0)[:tall * 7 // 5],
                          np.repeat(t.rowsum, tall, 0)[:tall * 7 // 5], t.group)
    outs = []
    for n in (1, 2, 3):
        pool = kernels.Pool(n)
        a = kernels.quantize_acts(x, pool)
        outs.append((kernels.gemm(t, a, pool=pool), kernels.gemv(t, x[-1], pool=pool), a.q))
    for o in outs[1:]:
        assert all(np.array_equal(u, v) for u, v in zip(o, outs[0]))


@each_isa
@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.sampled_from([8, 16, 64, 128]), st.integers(0, 140), st.integers(1, 20),
       st.sampled_from([1e-3, 1.0, 30.0]), st.integers(0, 2**32 - 1))
def test_attention_is_its_reference_bit_for_bit(isa, n_kv, group, hd, start, n, mag, seed):
    """Every path follows model.attention_reference's order of operations exactly, and each
    query's result is the one it gets alone at its position (any n, start, threads)."""
    from pyguard.engine.model import attention_reference

    kernels.set_isa(isa)
    rng = np.random.default_rng(seed)
    q = (rng.standard_normal((n, n_kv * group * hd)) * mag).astype(np.float32)
    keys, values = (rng.standard_normal((2, n_kv, start + n + 5, hd)) * mag).astype(np.float32)
    scale = np.float32(hd**-0.5)
    ref = attention_reference(q, keys, values, start, scale)
    assert np.isfinite(ref).all()
    for threads in (1, 3):
        assert np.array_equal(kernels.attention(q, keys, values, start, scale, kernels.Pool(threads)), ref)
    last = kernels.attention(q[-1:], keys, values, start + n - 1, scale)
    assert np.array_equal(last, ref[-1:])


@each_isa
def test_non_finite_inputs_give_nan_never_a_number(isa):
    """A row with NaN or inf quantizes to scale NaN (so its products are NaN: the engine
    reports it); other rows are untouched. A non-finite key makes its heads NaN."""
    kernels.set_isa(isa)
    rng = np.random.default_rng(3)
    t = quant.quantize_weights(rng.standard_normal((40, 256)).astype(np.float32), 32)
    x = rng.standard_normal((5, 256)).astype(np.float32)
    x[1, 7], x[2, 200], x[3, 255] = np.nan, np.inf, -np.inf
    a, ref = kernels.quantize_acts(x), quant.quantize_acts(x)
    assert np.array_equal(a.q, ref.q) and np.array_equal(a.zp, ref.zp)
    assert np.array_equal(a.scale, ref.scale, equal_nan=True) and np.isnan(a.scale[1:4]).all()
    y = kernels.gemm(t, a)
    assert np.isnan(y[1:4]).all() and np.isfinite(y[[0, 4]]).all()
    assert np.isnan(kernels.gemv(t, x[1])).all()
    keys, values = rng.standard_normal((2, 2, 9, 64)).astype(np.float32)
    keys[0, 3, 5] = np.inf
    out = kernels.attention(rng.standard_normal((2, 4 * 64)).astype(np.float32), keys, values, 7, np.float32(0.125))
    assert np.isnan(out[:, :128]).all() and np.isfinite(out[:, 128:]).all()  # heads 0, 1 read cache head 0


@each_isa
@pytest.mark.parametrize("group", quant.GROUP_SIZES)
def test_worst_case_int16_group_sum(isa, group):
    """Activations 255 against weights -8 over a whole group: the AVX2 path's int16 lanes hold
    the group's sum (at G=256, 16 * 2040 = 32640 < 32767) without saturating."""
    kernels.set_isa(isa)
    k = 512
    t = quant.pack_weights(np.full((3, k), -8, np.int8), np.ones((3, k // group), np.float16))
    a = quant.QActs(np.full((2, k), 255, np.uint8), np.ones(2, np.float32), np.zeros(2, np.int32))
    assert np.array_equal(kernels.gemm(t, a), np.full((2, 3), -8.0 * 255 * k, np.float32))


@each_isa
def test_gemv_is_a_one_row_gemm(isa):
    kernels.set_isa(isa)
    rng = np.random.default_rng(5)
    t = quant.quantize_weights(rng.standard_normal((300, 512)).astype(np.float32), 64)
    x = rng.standard_normal((7, 512)).astype(np.float32)
    rows = kernels.gemm(t, kernels.quantize_acts(x))
    for i in range(7):
        assert np.array_equal(kernels.gemv(t, x[i]), rows[i])


@each_isa
@pytest.mark.parametrize("k, n", [(16384, 37), (32768, 9), (65536, 6)])
def test_long_rows_in_token_blocks(isa, k, n):
    """Long rows: the x86 GEMMs take tokens in blocks that keep their activations in L2 (one
    vector of 8 or 16 tokens at 16384 columns and more) and columns in spans of 1024; blocks
    and spans must cover every token and column once."""
    kernels.set_isa(isa)
    rng = np.random.default_rng(k + n)
    t = quant.quantize_weights(rng.standard_normal((19, k)).astype(np.float32), 256)
    a = quant.quantize_acts(rng.standard_normal((n, k)).astype(np.float32))
    assert np.array_equal(kernels.gemm(t, a), quant.gemm(t, a))
    one = [kernels.gemm(t, quant.QActs(a.q[i : i + 1], a.scale[i : i + 1], a.zp[i : i + 1])) for i in range(n)]
    assert np.array_equal(kernels.gemm(t, a), np.concatenate(one))  # as each token alone


def _run(env: dict, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})


@pytest.mark.parametrize("env, message", [
    ({"PYGUARD_ISA": "sse9"}, "PYGUARD_ISA='sse9': kernel path 'sse9' is not available"),
    ({"PYGUARD_ISA": "neon" if "avx2" in ISAS else "avx2"}, "is not available here"),
    ({"PYGUARD_THREADS": "zero"}, "PYGUARD_THREADS='zero'"),
    ({"PYGUARD_THREADS": "0"}, "PYGUARD_THREADS='0'"),
    ({"PYGUARD_THREADS": "-1"}, "PYGUARD_THREADS='-1'"),
    ({"PYGUARD_THREADS": ""}, "PYGUARD_THREADS=''"),
    ({"PYGUARD_THREADS": "99999999999999999999"}, "from 1 to 256"),
])
def test_bad_environment_fails_at_first_use_not_at_import(env, message):
    """`import pyguard` must work (so `pyguard --help` does); the first pool raises PyguardError."""
    code = ("import pyguard\nfrom pyguard.engine import kernels\ntry:\n    kernels.Pool()\nexcept pyguard.PyguardError as e:\n"
            "    print('error:', e)")
    r = _run(env, code)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.startswith("error:") and message in r.stdout, r.stdout


@each_isa
@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(1, 80), st.integers(0, 600), st.sampled_from([1, 2, 3]),
       st.sampled_from([1e-3, 1.0, 1e3]), st.integers(0, 2**32 - 1))
def test_sgemm_is_its_reference_bit_for_bit(isa, m, n, k, threads, mag, seed):
    """The converter's float products (kernels.sgemm): every element the chain of fused
    multiply-adds detmath.matmul_reference states, on every path and thread count; m, n ragged
    against every tile, k past the 256 of a packed block."""
    from pyguard.engine import detmath

    kernels.set_isa(isa)
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal((m, k)) * mag).astype(np.float32)
    b = rng.standard_normal((n, k)).astype(np.float32)
    got = kernels.sgemm(a, b, kernels.Pool(threads))
    assert np.array_equal(got.view(np.int32), detmath.matmul_reference(a, b).view(np.int32))


@each_isa
def test_sgemm_blocks_and_non_finite(isa):
    """Rows beyond one 256-row block, and NaN or inf inputs giving NaN or inf where the
    reference does, never a number."""
    from pyguard.engine import detmath

    kernels.set_isa(isa)
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((300, 70)).astype(np.float32), rng.standard_normal((45, 70)).astype(np.float32)
    a[3, 5], a[7, 1], b[2, 9] = np.nan, np.inf, np.inf
    got, want = kernels.sgemm(a, b, kernels.Pool(2)), detmath.matmul_reference(a, b)
    assert np.array_equal(np.isnan(got), np.isnan(want)) and np.isnan(got[3]).all() and np.isnan(got[7]).any()
    ok = ~np.isnan(want)
    assert np.array_equal(got[ok], want[ok])
    with pytest.raises(PyguardError, match="sgemm shapes"):
        kernels.sgemm(a, b[:, :69])
    with pytest.raises(PyguardError, match="float32"):
        kernels.sgemm(a.astype(np.float64), b)


def test_isa_and_threads_from_the_environment():
    r = _run({"PYGUARD_ISA": "scalar", "PYGUARD_THREADS": "1"}, "from pyguard.engine import kernels; print(kernels.isa(), kernels.threads())")
    assert r.returncode == 0 and r.stdout.split() == ["scalar", "1"], r.stderr


def test_bad_arguments():
    with pytest.raises(PyguardError):
        kernels.set_isa("nope")
    for n in (0, -1, 257, 1.5, True, "2"):
        with pytest.raises(PyguardError, match="from 1 to 256"):
            kernels.Pool(n)
    with pytest.raises(PyguardError):
        kernels.set_threads(0)
    t = quant.quantize_weights(np.ones((4, 64), np.float32), 32)
    with pytest.raises(PyguardError, match="out of range"):
        kernels.dequant_rows(t, np.array([4]))
    with pytest.raises(PyguardError):
        kernels.gemv(t, np.ones(128, np.float32))
    with pytest.raises(PyguardError):
        kernels.gemm(t, quant.quantize_acts(np.ones((2, 128), np.float32)))
