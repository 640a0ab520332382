"""The rotary, SwiGLU and fused RMSNorm + quantization kernels on every ISA path this CPU has,
against their numpy specifications (model.apply_rope, model.swiglu_reference,
quant.quantize_acts(model.rms_norm)), bit for bit, on 1-3 threads."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyguard import PyguardError
from pyguard.engine import kernels, model
from pyguard.formats import quant

from kernel_paths import each_path

# inf and NaN inputs make the numpy references warn: they are inputs here, not faults
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
ISAS = kernels.available_isas()
POOLS = {t: kernels.Pool(t) for t in (1, 2, 3)}
SPECIAL = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, -87.0, -87.5, -88.7, -104.0, 88.7, 1e-45, -1e-45, 3e38, -3e38], np.float32)


@pytest.fixture(autouse=True)
def restore_isa():
    before = kernels.isa()
    yield
    kernels.set_isa(before)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal bit for bit, except that any NaN equals any NaN (payloads may differ by operand order)."""
    nan = np.isnan(a)
    return a.shape == b.shape and np.array_equal(nan, np.isnan(b)) and np.array_equal(a.view(np.uint32)[~nan], b.view(np.uint32)[~nan])


def random_floats(rng: np.random.Generator, shape: tuple[int, ...], log_mag: int, specials: int) -> np.ndarray:
    """Normal values of magnitude 10**log_mag, with `specials` of SPECIAL at random places."""
    x = (rng.standard_normal(shape) * 10.0**log_mag).astype(np.float32)
    flat = x.reshape(-1)
    flat[rng.integers(0, flat.size, specials)] = rng.choice(SPECIAL, specials)
    return x


@each_path()
@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 9), heads=st.integers(1, 6), rest=st.integers(0, 3), hd=st.sampled_from([64, 128, 2, 6, 8, 10, 18, 34, 48]),
       theta=st.sampled_from([10000.0, 500000.0]), first=st.integers(0, 130000), log_mag=st.integers(-30, 30),
       specials=st.integers(0, 4), threads=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**32 - 1))
def test_rope_is_its_reference_bit_for_bit(isa, n, heads, rest, hd, theta, first, log_mag, specials, threads, seed):
    """The first `heads` heads of each row rotated as apply_rope does (and as the numpy form of
    before the kernel did: x cos + x[swapped halves] (-sin, sin)), the other heads untouched."""
    rng = np.random.default_rng(seed)
    x = random_floats(rng, (n, (heads + rest) * hd), log_mag, specials)
    inv_freq = (1.0 / np.float32(theta) ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd))).astype(np.float32)
    cos, sin = model.rope_tables(inv_freq, first + rng.permutation(n))
    ref, before = x.copy(), x.copy()
    model.apply_rope(ref[:, : heads * hd].reshape(n, heads, 2, hd // 2), cos, sin)
    v = before[:, : heads * hd].reshape(n, heads, 2, hd // 2)
    np.add(v * cos[:, None, None], v[:, :, ::-1] * np.stack([-sin, sin], axis=1)[:, None], out=v)
    assert same_bits(ref, before)
    kernels.set_isa(isa)
    got = x.copy()
    kernels.rope(got, heads, cos, sin, POOLS[threads])
    assert same_bits(got, ref)


@each_path()
@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 6), hidden=st.one_of(st.integers(1, 70), st.sampled_from([2048, 8192])), log_mag=st.integers(-40, 37),
       specials=st.integers(0, 12), threads=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**32 - 1))
def test_swiglu_is_its_reference_bit_for_bit(isa, n, hidden, log_mag, specials, threads, seed):
    rng = np.random.default_rng(seed)
    gate_up = random_floats(rng, (n, 2 * hidden), log_mag, specials)
    kernels.set_isa(isa)
    got = kernels.swiglu(gate_up, POOLS[threads])
    assert same_bits(got, model.swiglu_reference(gate_up))


def test_swiglu_edges_on_every_path():
    """Every special value against every other as gate and up, in SIMD lanes and in tails."""
    g, u = np.meshgrid(SPECIAL, np.append(SPECIAL, np.float32([1.0, -2.5])))
    gate_up = np.concatenate([g.reshape(1, -1), u.reshape(1, -1)], axis=1)
    ref = model.swiglu_reference(gate_up)
    for isa in ISAS:
        kernels.set_isa(isa)
        for width in (gate_up.shape[1] // 2, 7, 9):  # tails of 8-lane and 4-lane loops
            part = np.concatenate([gate_up[:, :width], gate_up[:, gate_up.shape[1] // 2 :][:, :width]], axis=1)
            assert same_bits(kernels.swiglu(part), ref[:, :width]), (isa, width)


def test_swiglu_reference_is_silu():
    """The specification computes silu(g) * up: within a few float32 roundings of the float64
    value down to g = -87; below, exp(-|g|) stops at exp(-87) ~ 1.6e-38 (no overflow, no
    subnormals): silu(g) is then g e / (1 + e), within |g| 2e-38 of silu's ~0."""
    g = np.concatenate([np.linspace(-87, 87, 20001), np.geomspace(1e-30, 87, 500), -np.geomspace(1e-30, 87, 500)]).astype(np.float32)
    up = np.float32(1.5)
    got = model.swiglu_reference(np.stack([g, np.full_like(g, up)], axis=1))[:, 0].astype(np.float64)
    exact = g.astype(np.float64) / (1 + np.exp(-g.astype(np.float64))) * up
    assert np.all(np.abs(got - exact) <= 6 * np.finfo(np.float32).eps * np.abs(exact) + 1e-44)
    far = -np.geomspace(88, 3e38, 200).astype(np.float32)
    out = model.swiglu_reference(np.stack([far, np.ones_like(far)], axis=1))[:, 0]
    assert np.all(np.isfinite(out)) and np.all(out <= 0) and np.all(np.abs(out) <= np.abs(far) * 2e-38)
    assert np.isnan(model.swiglu_reference(np.array([[np.nan, 1.0]], np.float32))).all()


def same_acts(a: quant.QActs, b: quant.QActs) -> bool:
    return np.array_equal(a.q, b.q) and same_bits(a.scale, b.scale) and np.array_equal(a.zp, b.zp)


@each_path()
@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 130), k=st.one_of(st.integers(1, 40).map(lambda i: 8 * i), st.sampled_from([64, 2048, 3072])),
       log_mag=st.integers(-30, 30), w_mag=st.integers(-3, 3), specials=st.integers(0, 3), eps=st.sampled_from([1e-5, 1e-6, 0.1]),
       threads=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**32 - 1))
def test_norm_quantize_is_its_reference_bit_for_bit(isa, n, k, log_mag, w_mag, specials, eps, threads, seed):
    """Magnitudes from 1e-30 (squares underflow to subnormals and zero) to 1e30 (squares
    overflow: r = 0), with NaN/inf in some rows (q = 0, zp = 0, scale = NaN)."""
    rng = np.random.default_rng(seed)
    x = random_floats(rng, (n, k), log_mag, specials)
    w = random_floats(rng, (k,), w_mag, 0)
    ref = quant.quantize_acts(model.rms_norm(x, w, eps))
    kernels.set_isa(isa)
    assert same_acts(kernels.norm_quantize(x, w, eps, POOLS[threads]), ref)


def test_norm_quantize_rows_do_not_depend_on_the_batch():
    """Each row alone gives the bits it gets among 130 others, on every path and thread count."""
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal((130, 2048), dtype=np.float32), rng.standard_normal(2048, dtype=np.float32)
    x[3] = np.nan
    x[5, 100] = -np.inf
    for isa in ISAS:
        kernels.set_isa(isa)
        whole = kernels.norm_quantize(x, w, 1e-5, POOLS[3])
        for i in (0, 3, 5, 129):
            one = kernels.norm_quantize(x[i : i + 1], w, 1e-5, POOLS[1])
            assert same_acts(one, quant.QActs(whole.q[i : i + 1], whole.scale[i : i + 1], whole.zp[i : i + 1])), (isa, i)
        assert np.isnan(whole.scale[[3, 5]]).all() and not whole.q[[3, 5]].any() and not whole.zp[[3, 5]].any()


def test_rms_norm_order_is_lanes_then_tree8():
    """The reference's sum of squares is the lane order written out by hand (a different order,
    e.g. numpy's pairwise sum, differs in the last bits for most rows), and rms_norm is within
    float32 rounding of the float64 RMSNorm."""
    rng = np.random.default_rng(3)
    x, w = (rng.standard_normal((64, 2048)) * 7).astype(np.float32), rng.standard_normal(2048).astype(np.float32)
    lanes = np.zeros((64, 8), np.float32)
    for i in range(0, 2048, 8):
        lanes += x[:, i : i + 8] * x[:, i : i + 8]
    ss = (lanes[:, 0] + lanes[:, 4] + (lanes[:, 2] + lanes[:, 6])) + (lanes[:, 1] + lanes[:, 5] + (lanes[:, 3] + lanes[:, 7]))
    r = np.float32(1) / np.sqrt(ss / np.float32(2048) + np.float32(1e-5))
    assert same_bits(model.rms_norm(x, w, 1e-5), (x * r[:, None]) * w)
    x64 = x.astype(np.float64)
    exact = x64 / np.sqrt((x64 * x64).mean(axis=1, keepdims=True) + 1e-5) * w
    assert np.allclose(model.rms_norm(x, w, 1e-5), exact, rtol=4e-7 * 8, atol=0)
    with pytest.raises(PyguardError):
        model.rms_norm(x[:, :12], w[:12], 1e-5)


def test_bad_arguments():
    x = np.zeros((2, 4 * 8), np.float32)
    cs = np.zeros((2, 4), np.float32)
    bad_rope = [
        (x.astype(np.float64), 2, cs, cs),  # dtype
        (np.zeros((2, 8), np.float32), 2, cs, cs),  # 2 heads of 8 in a row of 8
        (np.asfortranarray(np.zeros((2, 32), np.float32)), 1, cs, cs),  # not C-contiguous: not rotated in place
        (x[None], 1, cs, cs),  # 3-D
        (x, 0, cs, cs),  # no heads
        (x, True, cs, cs),  # not an int
        (x, 5, cs, cs),  # past the row
        (x, 1, cs[:1], cs[:1]),  # one row of tables for two rows
        (x, 1, cs, cs[:, :3]),  # sin of another size
        (x, 1, cs.astype(np.float64), cs),  # float64 tables: not silently rounded
        (x, 1, cs.reshape(-1), cs.reshape(-1)),  # 1-D tables
        (x.tolist(), 1, cs, cs),  # not an array
    ]
    for args in bad_rope:
        with pytest.raises(PyguardError):
            kernels.rope(*args)
    frozen = x.copy()
    frozen.flags.writeable = False
    with pytest.raises(PyguardError):
        kernels.rope(frozen, 1, cs, cs)
    for gu in (np.zeros((2, 7), np.float32), np.zeros((2, 1), np.float32), np.zeros(8, np.float32),
               np.zeros((2, 8), np.float64), np.zeros((2, 8), np.float16), [[0.0, 1.0]]):
        with pytest.raises(PyguardError):
            kernels.swiglu(gu)
    w = np.ones(16, np.float32)
    for args in ((np.zeros((2, 16), np.float64), w), (np.zeros((2, 12), np.float32), np.ones(12, np.float32)),  # dtype, K % 8
                 (np.zeros((2, 16), np.float32), w[:8]), (np.zeros((2, 16), np.float32), w.astype(np.float64)),  # weight
                 (np.zeros(16, np.float32), w), (np.zeros((1, 2, 16), np.float32), w), ([[0.0] * 16], w)):  # 1-D, 3-D, a list
        with pytest.raises(PyguardError):
            kernels.norm_quantize(*args, 1e-5)


def test_strided_tables_and_gate_up_are_read_as_values():
    """Non-contiguous inputs are copied, not misread."""
    rng = np.random.default_rng(5)
    gate_up = rng.standard_normal((4, 40), dtype=np.float32)
    assert same_bits(kernels.swiglu(gate_up[::2]), model.swiglu_reference(gate_up[::2]))
    x = rng.standard_normal((3, 16), dtype=np.float32)
    tables = rng.standard_normal((3, 16), dtype=np.float32)
    cos, sin = tables[:, ::2], tables[:, 1::2]
    ref = x.copy()
    model.apply_rope(ref.reshape(3, 1, 2, 8), cos, sin)
    kernels.rope(x, 1, cos, sin)
    assert same_bits(x, ref)
    y, w = rng.standard_normal((6, 16), dtype=np.float32), rng.standard_normal(32, dtype=np.float32)
    assert same_acts(kernels.norm_quantize(y[::2], w[::2], 1e-5), quant.quantize_acts(model.rms_norm(y[::2], w[::2], 1e-5)))
