"""Meta's Llama Guard 3-1B-INT4 `.pte` import (pyguard.convert.pte) against the ExecuTorch runtime.

Tiny random-weight checkpoints are exported with the 1B-INT4 recipe by ExecuTorch 1.5.1
(test-only dependency, tools/export_pte.py; about a minute each, kept in pytest's cache under a
key of everything the export depends on, so later runs skip it), converted once per run, and
run by both engines on the same token ids.

Tolerance: both engines run int4 weights (the same values and scales) on int8 activations
quantized per token with the same asymmetric recipe, in float32 otherwise. They differ in the
order of float sums and may round an activation to the neighbouring int8 step; one step is 1/255
of the row's range, so each of the 4 L + 1 quantized products on the way to a logit may move it
by about 1/255 of its scale: |pyguard - ExecuTorch| <= (4 L + 1) / 255 * max |logit|.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyguard
from pyguard.convert import pte
from pyguard.errors import PyguardError
from pyguard.guard.prompt import prompt_tokens

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
_spec = importlib.util.spec_from_file_location("export_pte", os.path.join(ROOT, "tools", "export_pte.py"))
export_pte = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export_pte)

MAX_SEQ = 320  # room for a one-turn guard prompt (~200 tokens)
HOSTILE = settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def export_key(group: int) -> str:
    """What an export depends on: the exporter's code and what it draws the weights and
    tokenizer from, ExecuTorch's, torch's and numpy's versions, and the arguments. Any change
    gives another key, so a cached export is never a stale one."""
    from importlib.metadata import version

    from pyguard.convert import checkpoint
    from pyguard.convert.checkpoint import reference_tokenizer_model
    from pyguard.formats import config

    # the modules imported (the installed ones when the suite runs against a wheel)
    parts = [_sha256(p) for p in (os.path.join(ROOT, "tools/export_pte.py"), checkpoint.__file__, config.__file__)]
    parts += [_sha256(reference_tokenizer_model()), sys.version]
    parts += [f"{p} {version(p)}" for p in ("executorch", "torch", "numpy")]
    parts += [f"tiny group={group} max_seq={MAX_SEQ}"]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def cached_export(cache_dir: Path, group: int) -> Path:
    """The Meta-layout directory of the tiny export, from cache_dir (pytest's cache,
    .pytest_cache/d/pte) when it holds one under the same key and its files are intact,
    else exported (about a minute) and stored there atomically."""
    d = cache_dir / export_key(group)
    names = ("model.pte", "params.json", "tokenizer.model")
    try:
        manifest = json.loads((d / "manifest.json").read_text())
        if all(manifest.get(n) == _sha256(d / n) for n in names):
            return d
    except (OSError, ValueError):
        pass
    cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=cache_dir, prefix="part-"))
    try:
        export_pte.export(str(work), "tiny", embedding_group=group, max_seq_length=MAX_SEQ)
        shutil.rmtree(work / "src")
        (work / "manifest.json").write_text(json.dumps({n: _sha256(work / n) for n in names}))
        shutil.rmtree(d, ignore_errors=True)  # a damaged entry
        try:
            os.rename(work, d)
        except OSError:  # another run stored its entry first: use that one
            if not (d / "manifest.json").exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return d


@pytest.fixture(scope="session")
def exported(tmp_path_factory, request):
    """exported(embedding_group) -> (Meta-layout directory, converted pyguard file, summary):
    the export cached across runs (cached_export), converted once per run. Tests must not
    write into the directory (copy it: _copy)."""
    cache = {}
    cache_dir = Path(request.config.cache.mkdir("pte")) if getattr(request.config, "cache", None) \
        else tmp_path_factory.mktemp("pte-cache")

    def get(group: int):
        if group not in cache:
            d = cached_export(cache_dir, group)
            out = tmp_path_factory.mktemp(f"pte{group}") / f"pte{group}.pgw"
            cache[group] = (d, out, pte.convert_pte(str(d), str(out)))
        return cache[group]

    return get


def test_export_key_covers_what_an_export_depends_on(monkeypatch):
    import importlib.metadata

    key = export_key(32)
    assert export_key(32) == key and export_key(256) != key
    monkeypatch.setattr(importlib.metadata, "version", lambda p: "0.0" if p == "torch" else importlib.metadata.distribution(p).version)
    assert export_key(32) != key
    monkeypatch.undo()
    monkeypatch.setattr(sys.modules[__name__], "MAX_SEQ", MAX_SEQ + 1)
    assert export_key(32) != key
    real = _sha256
    monkeypatch.setattr(sys.modules[__name__], "_sha256", lambda p: real(p) + ("x" if str(p).endswith("export_pte.py") else ""))
    assert export_key(32) != key


def test_cached_export_is_reused_and_a_damaged_one_redone(tmp_path, monkeypatch):
    made = []

    def fake_export(out, geometry, embedding_group, max_seq_length):
        made.append(out)
        os.makedirs(os.path.join(out, "src"))
        for name in ("model.pte", "params.json", "tokenizer.model"):
            Path(out, name).write_text(f"{name} {len(made)}")

    monkeypatch.setattr(export_pte, "export", fake_export)
    d = cached_export(tmp_path, 32)
    assert len(made) == 1 and (d / "model.pte").read_text() == "model.pte 1" and not (d / "src").exists()
    assert cached_export(tmp_path, 32) == d and len(made) == 1
    (d / "model.pte").write_text("damaged")
    assert cached_export(tmp_path, 32) == d and len(made) == 2 and (d / "model.pte").read_text() == "model.pte 2"
    assert sorted(p.name for p in tmp_path.iterdir()) == [d.name]  # no work directory left behind


def _runtime(path):
    import torch  # noqa: F401  (the runtime's tensors)
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (llama::custom_sdpa, update_cache)
    import executorch.kernels.quantized  # noqa: F401  (quantized_decomposed::embedding_4bit)
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    return _load_for_executorch(str(path))


def _et_forward(m, ids, start):
    import torch

    out = m.forward((torch.tensor([ids], dtype=torch.long), torch.tensor([start], dtype=torch.long)))[0]
    return out.numpy().reshape(-1)


def _check_close(et: np.ndarray, pg: np.ndarray, cfg) -> None:
    tol = (4 * cfg.n_layers + 1) / 255 * np.abs(et).max()
    assert (et.argmax(axis=-1) == pg.argmax(axis=-1)).all()
    assert np.abs(et - pg).max() <= tol, (np.abs(et - pg).max(), tol)


@pytest.mark.parametrize("group", [32, 256])
def test_logits_match_executorch_token_by_token(exported, group):
    d, out, _ = exported(group)
    model = pyguard.Model.load(str(out))
    ids = np.random.default_rng(group).integers(0, 128000, 48).tolist()
    m = _runtime(d / "model.pte")
    et = np.array([_et_forward(m, [t], p) for p, t in enumerate(ids)])
    # the program scatters its 20 pruned logits into the vocabulary, -inf elsewhere
    outside = np.delete(et, model.head_ids, axis=1)
    assert np.isneginf(outside).all()
    _check_close(et[:, model.head_ids], model.logits(ids), model.config)


@pytest.mark.parametrize("group", [32, 256])
def test_guard_prompt_prefill_matches_executorch(exported, group):
    d, out, _ = exported(group)
    guard = pyguard.Guard.load(str(out))
    ids = prompt_tokens(guard.tokenizer, "How do I make a bomb?")
    assert 150 < len(ids) < MAX_SEQ
    et = _et_forward(_runtime(d / "model.pte"), ids, 0)[guard.model.head_ids]
    state = guard.model.new_state(len(ids))
    _check_close(et, guard.model.prefill(state, ids), guard.model.config)
    r = guard.classify("How do I make a bomb?")  # the guard API runs the converted model unchanged
    assert r.verdict in ("safe", "unsafe") and 0 <= r.score <= 1


def test_converted_file_holds_the_program(exported):
    d, out, summary = exported(32)
    f = pyguard.formats.file.load(str(out))
    cfg, _ = export_pte.GEOMETRIES["tiny"]
    assert f.head_ids == export_pte.PRUNE_IDS
    assert (f.config.n_layers, f.config.dim, f.config.hidden_dim) == (cfg.n_layers, cfg.dim, cfg.hidden_dim)  # 768 from ffn_dim_multiplier
    assert f.config.rope_scaling["factor"] == 32 and f.family == "llama-guard-3-1b"
    assert summary.linear_group == 256 and summary.embedding_group == 32
    assert f.meta["quant"]["group"] == 256 and f.meta["quant"]["groups"] == {"tok_embeddings": 32}
    assert f.tensors["tok_embeddings"].group == 32 and f.tensors["layers.0.wqkv"].group == 256
    assert "exact" in summary.scales_note and "head of 20 rows" in summary.text()
    assert pyguard.formats.file.verify(str(out)) > 0


def test_cli_converts_the_meta_layout(exported, tmp_path, capsys):
    """`pyguard convert DIR OUT` recognises Meta's layout; --group / --head do not apply to it."""
    from pyguard import cli

    d, out, _ = exported(32)
    assert cli.main(["convert", str(d), str(tmp_path / "cli.pgw")]) == 0
    assert open(tmp_path / "cli.pgw", "rb").read() == open(out, "rb").read()
    assert cli.main(["convert", str(d), str(tmp_path / "no.pgw"), "--group", "256"]) == 2
    assert "leave out --group, --head and --table" in capsys.readouterr().err and not os.path.exists(tmp_path / "no.pgw")


def test_int4_values_are_taken_as_stored(exported):
    """Every weight value and scale equals the program's, in pyguard's layout (q/k rows moved
    from Meta's interleaved rotary order to Hugging Face's)."""
    d, out, _ = exported(256)
    f = pyguard.formats.file.load(str(out))
    x = pte.extract(pte.read_program(str(d / "model.pte")), pte.read_params(str(d)))
    c = f.config
    wqkv = f.tensors["layers.1.wqkv"]
    q = pyguard.formats.quant.unpack_nibbles(wqkv.qs)[: c.n_heads * c.head_dim]
    meta_order = q.reshape(c.n_heads, 2, c.head_dim // 2, -1).swapaxes(1, 2).reshape(q.shape)  # back to Meta's rows
    prog = pte.read_program(str(d / "model.pte"))
    lins = pte.delegate_linears(prog, [x for x in prog.calls if x.op == "delegate"][4])  # layer 1: q, k, v
    (lq,) = [lin for lin in lins if lin.q.shape[0] == c.n_heads * c.head_dim]
    assert (meta_order == lq.q).all()
    assert (pyguard.formats.quant.unpack_nibbles(f.tensors["output"].qs) == x.tensors["output"][0]).all()
    assert (f.tensors["output"].scales.astype(np.float32) == x.tensors["output"][1]).all()


# ---------------------------------------------------------------------------------------------
# Hostile programs: one PyguardError each, never another exception, never a partial file.


def _copy(src, dst, data: bytes | None = None):
    dst.mkdir(exist_ok=True)
    for name in ("params.json", "tokenizer.model"):
        shutil.copyfile(src / name, dst / name)
    (dst / "model.pte").write_bytes(data if data is not None else (src / "model.pte").read_bytes())
    return dst


def _refused(d, match: str = "") -> PyguardError:
    out = d / "out.pgw"
    with pytest.raises(PyguardError, match=match) as e:
        pte.convert_pte(str(d), str(out))
    assert not out.exists() and not (d / "out.pgw.part").exists()
    assert "\n" not in str(e.value)
    return e.value


@HOSTILE
@given(cut=st.floats(0, 0.9999))
def test_truncated_program(exported, tmp_path, cut):
    d = exported(32)[0]
    data = (d / "model.pte").read_bytes()
    _refused(_copy(d, tmp_path / "t", data[: int(cut * len(data))]))


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.one_of(st.integers(1, 600), st.integers(-600, -1)))
def test_program_flatbuffer_truncated(exported, tmp_path, cut):
    """The header declares a shorter program: the flatbuffer ends inside its first tables
    (root, vtables) or its last vectors and strings, the data segments still in place."""
    d, reference, _ = exported(32)
    data = bytearray((d / "model.pte").read_bytes())
    size = int.from_bytes(data[16:24], "little")
    data[16:24] = (cut % size).to_bytes(8, "little")
    t = _copy(d, Path(tempfile.mkdtemp(dir=tmp_path)), bytes(data))
    try:
        pte.convert_pte(str(t), str(t / "out.pgw"))
    except PyguardError as e:
        assert "\n" not in str(e) and not (t / "out.pgw").exists()
    else:  # only padding was cut: the same model
        arrays = [[(a["name"], a["shape"], a["crc32"]) for a in pyguard.formats.file.load(str(f)).meta["arrays"]]
                  for f in (t / "out.pgw", reference)]
        assert cut < 0 and arrays[0] == arrays[1]


@HOSTILE
@given(flips=st.lists(st.tuples(st.floats(0, 0.9999), st.integers(0, 7)), min_size=1, max_size=4))
def test_corrupted_program_is_refused_or_converted(exported, tmp_path, flips):
    """Bit flips in the flatbuffer (not the weights) give a PyguardError, or a valid file when
    they hit bytes that do not matter (padding, debug names)."""
    d = exported(32)[0]
    data = bytearray((d / "model.pte").read_bytes())
    program_size = int.from_bytes(data[16:24], "little")
    for where, bit in flips:
        data[int(where * program_size)] ^= 1 << bit
    t = _copy(d, tmp_path / "c", bytes(data))
    try:
        pte.convert_pte(str(t), str(t / "out.pgw"))
    except PyguardError as e:
        assert "\n" not in str(e)
    else:
        pyguard.formats.file.load(str(t / "out.pgw"))


# Mutations aimed at the program's structure (found with pyguard's own flatbuffer reader):
# an instruction's argument list shortened, a tensor's declared size made negative or zero,
# 4 bytes changed inside an XNNPACK delegate's graph, a rotary table with no rows.
READ_OPS = ("quantized_decomposed::embedding_4bit", "aten::mul", "aten::add", "llama::custom_sdpa", "aten::index_put",
            "aten::slice_copy", "llama::update_cache", "aten::sigmoid")


@pytest.fixture(scope="session")
def anatomy(exported):
    """Byte positions in the group-32 export: {op: [position of each call's argument count]},
    [(position of a tensor value's sizes, their count)], [the rotary tables' sizes positions],
    [(start, end) of each delegate's XNNPACK flatbuffer], [every vtable entry of the XNNPACK
    graphs' values and nodes], [the vtable entry of each quantized weight's tensor part],
    [the scalar type of each one-value constant], [each operator's vtable entry of its name]."""
    from pyguard.convert.flatbuffer import Buf

    data = (exported(32)[0] / "model.pte").read_bytes()
    assert data[8:12] == b"eh00"
    prog = Buf(memoryview(data)[: int.from_bytes(data[16:24], "little")], "pte").root()
    (plan,) = [p for p in prog.tables(1) if p.string(0) == "forward"]
    operators = [o.string(0) for o in plan.tables(6)]
    args: dict[str, list[int]] = {}
    for ins in plan.tables(5)[0].tables(2):
        kind, a = ins.union(0)
        if kind == pte._KERNEL_CALL:
            args.setdefault(operators[a.scalar(0, "i")], []).append(a._ref(1))
    sizes, rotary, scalars = [], [], []
    for v in plan.tables(2):
        kind, t = v.union(0)
        if kind == pte._TENSOR and t is not None and t.scalar(5, "I") > 0 and t._field(0) and not t.scalars(2, "i"):
            scalars.append(t._field(0))  # the scalar type of a constant of one value (e.g. the norm epsilon)
        if kind == pte._TENSOR and t is not None and t._ref(2):
            p, n = t._ref(2), t.buf.unpack("I", t._ref(2))
            if n:
                sizes.append((p, n))
            if n == 2 and t.scalar(5, "I") > 0 and t.buf.unpack("i", p + 8) == 32:  # [positions, head_dim / 2]
                rotary.append(p)
    graphs, fields, qtensors, at = [], [], [], data.find(b"XH00")
    while at >= 0:
        fb_off, fb_size = (int.from_bytes(data[at + 6 + 4 * j : at + 10 + 4 * j], "little") for j in range(2))
        start = at - 4 + fb_off
        graphs.append((start, start + fb_size))
        g = Buf(memoryview(data)[start : start + fb_size], "graph").root()
        tables = [g]
        values = g.tables(2)
        for x in values + g.tables(1):  # values, nodes: the table, its union's value
            kind, v = x.union(0)
            tables += [x, v]
            if any(x is y for y in values) and kind == pte._XNN_QTENSOR:  # and a quantized value's tensor and parameters
                tables += [v.table(0), v.union(1)[1]]
                if v.table(0).scalar(0, "h") == pte._XNN_QBINT4:  # a weight's: read by the importer
                    qtensors.append(start + v.vt + 4)  # the vtable entry of its tensor part
        fields += [start + t.vt + 4 + 2 * i for t in tables for i in range((t.vt_size - 4) // 2)]
        at = data.find(b"XH00", at + 4)
    assert set(READ_OPS) <= set(args) and len(rotary) == 2 and len(graphs) == 4 * 2 + 1
    names = [o.vt + 4 for o in plan.tables(6)]  # each operator's vtable entry of its name
    return data, args, sizes, rotary, graphs, fields, qtensors, scalars, names


def _judged(exported, tmp_path, data: bytes, must_refuse: bool) -> None:
    """Read and map the mutated program (every check of the program is there): one
    PyguardError of one line, or, when it passes, a conversion that gives a file that loads."""
    d = exported(32)[0]
    (tmp_path / "model.pte").write_bytes(data)
    try:
        pte.extract(pte.read_program(str(tmp_path / "model.pte")), pte.read_params(str(d)))
    except PyguardError as e:
        assert "\n" not in str(e)
        return
    assert not must_refuse, "a program that cannot be a Llama export was read"
    t = _copy(d, tmp_path / "s", data)
    try:
        pte.convert_pte(str(t), str(t / "out.pgw"))
    except PyguardError as e:
        assert "\n" not in str(e) and not (t / "out.pgw").exists()
    else:
        pyguard.formats.file.load(str(t / "out.pgw"))


def _put(data: bytes, pos: int, fmt: str, value) -> bytes:
    import struct

    b = bytearray(data)
    struct.pack_into(fmt, b, pos, value)
    return bytes(b)


MIN_ARGS_READ = {"quantized_decomposed::embedding_4bit": 6, "aten::mul": 3, "aten::add": 3, "llama::custom_sdpa": 4,
                 "aten::index_put": 3, "aten::slice_copy": 2, "llama::update_cache": 3, "aten::sigmoid": 1}


@HOSTILE
@given(op=st.sampled_from(READ_OPS), which=st.floats(0, 0.9999), keep=st.floats(0, 0.9999))
def test_shortened_argument_list(exported, anatomy, tmp_path, op, which, keep):
    """An instruction's argument count made smaller: fewer than pyguard reads is refused."""
    data, args, *_ = anatomy
    pos = args[op][int(which * len(args[op]))]
    n = int.from_bytes(data[pos : pos + 4], "little")
    short = int(keep * n)
    _judged(exported, tmp_path, _put(data, pos, "<I", short), short < MIN_ARGS_READ[op])


@pytest.mark.parametrize("op", READ_OPS)
def test_argument_list_below_what_is_read(exported, anatomy, tmp_path, op):
    """Each operator whose arguments are read by index, one argument short of what is read: refused."""
    data, args, *_ = anatomy
    for pos in args[op][:1] + args[op][-1:]:
        _judged(exported, tmp_path, _put(data, pos, "<I", MIN_ARGS_READ[op] - 1), True)


@HOSTILE
@given(which=st.floats(0, 0.9999), dim=st.floats(0, 0.9999), size=st.integers(-(1 << 31), -1))
def test_negative_declared_size(exported, anatomy, tmp_path, which, dim, size):
    data, _, sizes, *_ = anatomy
    pos, n = sizes[int(which * len(sizes))]
    _judged(exported, tmp_path, _put(data, pos + 4 + 4 * int(dim * n), "<i", size), True)


@HOSTILE
@given(which=st.floats(0, 0.9999), dim=st.floats(0, 0.9999), size=st.integers(0, (1 << 31) - 1))
def test_changed_declared_size(exported, anatomy, tmp_path, which, dim, size):
    data, _, sizes, *_ = anatomy
    pos, n = sizes[int(which * len(sizes))]
    _judged(exported, tmp_path, _put(data, pos + 4 + 4 * int(dim * n), "<i", size), False)


@pytest.mark.parametrize("rows", [0, 1])
@pytest.mark.parametrize("table", [0, 1])
def test_rotary_table_without_rows(exported, anatomy, tmp_path, rows, table):
    data, _, _, rotary, *_ = anatomy
    _judged(exported, tmp_path, _put(data, rotary[table] + 4, "<i", rows), True)


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 8), where=st.floats(0, 0.9999), value=st.binary(min_size=4, max_size=4))
def test_xnnpack_graph_changed(exported, anatomy, tmp_path, which, where, value):
    """4 bytes of a delegate's XNNPACK flatbuffer replaced: refused or a valid file."""
    data, _, _, _, graphs, *_ = anatomy
    start, end = graphs[which]
    at = start + int(where * (end - start - 4))
    _judged(exported, tmp_path, data[:at] + value + data[at + 4 :], False)


@HOSTILE
@given(which=st.floats(0, 0.9999))
def test_xnnpack_field_removed(exported, anatomy, tmp_path, which):
    """A field of a value or node of an XNNPACK graph made absent (its vtable entry zeroed)."""
    data, *_, fields, _, _, _ = anatomy
    _judged(exported, tmp_path, _put(data, fields[int(which * len(fields))], "<H", 0), False)


def test_constant_scalar_of_another_type(exported, anatomy, tmp_path):
    """Each one-value constant (the norm epsilon among them) given an unknown scalar type (99)
    or an integer one: a PyguardError or a valid file, never a numpy TypeError."""
    data, *_, scalars, _ = anatomy
    assert scalars
    for pos in scalars:
        for st_ in (99, 4):
            _judged(exported, tmp_path, _put(data, pos, "<b", st_), False)


def test_nameless_operator_beside_an_unknown_one(exported, anatomy, tmp_path):
    """Operators without a name (their shared vtable's entry zeroed) and a renamed one: refused."""
    data, *_, names = anatomy
    i = data.index(b"aten::sigmoid")
    renamed = data[:i] + b"aten::sigmoix" + data[i + 13 :]
    for pos in names[:1] + names[-1:]:
        _judged(exported, tmp_path, _put(renamed, pos, "<H", 0), True)


def test_xnnpack_quantized_value_without_its_tensor(exported, anatomy, tmp_path):
    """A quantized value whose tensor part is absent (once an AttributeError): refused."""
    data, *_, qtensors, _, _ = anatomy
    assert len(qtensors) == 7 * 2 + 1  # the weights of the 7 linear layers of each layer, and the head
    for pos in qtensors[:2] + qtensors[-1:]:
        _judged(exported, tmp_path, _put(data, pos, "<H", 0), True)


def _patched(exported, tmp_path, old: bytes, new: bytes):
    d = exported(32)[0]
    data = (d / "model.pte").read_bytes()
    assert data.count(old) >= 1 and len(old) == len(new)
    return _copy(d, tmp_path / "p", data.replace(old, new))


def test_unsupported_operator(exported, tmp_path):
    _refused(_patched(exported, tmp_path, b"aten::sigmoid", b"aten::sigmoix"), "unsupported operator aten::sigmoix")


def test_other_backend(exported, tmp_path):
    _refused(_patched(exported, tmp_path, b"XnnpackBackend", b"VulkanBackend!"), "backend 'VulkanBackend!' is not supported")


def test_not_a_program(tmp_path, exported):
    d = exported(32)[0]
    _refused(_copy(d, tmp_path / "n", b"PK\x03\x04" + bytes(4000)), "not an ExecuTorch program")


@pytest.mark.parametrize("change, match", [
    ({"n_layers": 3}, "get_n_layers is 2, params.json says 3"),
    ({"dim": 512}, "embedding weights has shape"),
    ({"n_kv_heads": 4}, "layer 0 attention: expected"),
    ({"hidden_dim": 512}, "layer 0 MLP"),
    ({"norm_eps": 1e-6}, "norm epsilon"),
    ({"rope_theta": 10000.0}, "rotary tables match no Llama 3"),
    ({"vocab_size": "128256"}, "vocab_size must be a number"),
])
def test_params_that_do_not_describe_the_program(exported, tmp_path, change, match):
    d = _copy(exported(32)[0], tmp_path / "m")
    params = json.loads((d / "params.json").read_text())
    params.update(change)
    (d / "params.json").write_text(json.dumps(params))
    _refused(d, match)


def test_missing_pieces(exported, tmp_path):
    d = _copy(exported(32)[0], tmp_path / "x")
    (d / "tokenizer.model").unlink()
    _refused(d, "no tokenizer.model")
    shutil.copyfile(d / "model.pte", d / "other.pte")
    _refused(d, "expected one .pte file, found 2")
    (d / "params.json").unlink()
    assert not pte.is_pte_dir(str(d))


# ---------------------------------------------------------------------------------------------
# Pieces that need no export.


@settings(max_examples=30, deadline=None, derandomize=True)
@given(heads=st.integers(1, 4), half=st.integers(1, 8), k=st.integers(1, 3))
def test_rotary_rows_as_hugging_face_permutes(heads, half, k):
    """pte's Meta -> Hugging Face row order is the one transformers' converter uses."""
    w = np.arange(heads * 2 * half * k, dtype=np.float32).reshape(-1, k)

    def hf_permute(m):  # transformers' convert_llama_weights_to_hf
        return m.reshape(heads, half, 2, k).transpose(0, 2, 1, 3).reshape(m.shape)

    assert (pte._to_hf_rows(w, heads, 2 * half) == hf_permute(w)).all()


def test_params_geometry():
    base = {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0}
    assert pte.config_from_params({**base, "ffn_dim_multiplier": 1.5, "multiple_of": 256}, 32).hidden_dim == 8192  # Llama 3.2 1B
    assert pte.config_from_params({**base, "n_layers": 12, "hidden_dim": 6400}, 32).hidden_dim == 6400  # the pruned 1B-INT4
    for bad in ({"dim": 0}, {"n_heads": 2.5}, {"dim": True}, {"hidden_dim": float("inf")}):
        with pytest.raises(PyguardError):
            pte.config_from_params({**base, **bad}, None)


# The flatbuffer reader on a hand-built buffer whose last bytes are a vector: every prefix of it
# is refused with a PyguardError, whatever field the cut falls in (root offset, vtable, table,
# string, a table of a vector of tables, the last vector's length or its elements).
def _little_flatbuffer() -> bytes:
    import struct

    b = bytearray(84)
    struct.pack_into("<I", b, 0, 16)  # root table at 16
    struct.pack_into("<6H", b, 4, 12, 20, 4, 8, 12, 16)  # its vtable: 4 fields
    struct.pack_into("<iIIII", b, 16, 16 - 4, 7, 36 - 24, 68 - 28, 44 - 32)  # scalar 7, string, u32 vector, tables
    struct.pack_into("<I3s", b, 36, 3, b"abc")  # the string (NUL and padding to 44)
    struct.pack_into("<II", b, 44, 1, 60 - 48)  # a vector of one table, at 60
    struct.pack_into("<3H", b, 52, 6, 8, 4)  # its vtable: 1 field
    struct.pack_into("<iI", b, 60, 60 - 52, 9)  # the table: scalar 9
    struct.pack_into("<4I", b, 68, 3, 1, 2, 3)  # the u32 vector, ending the buffer
    return bytes(b)


def _walk(data: bytes):
    from pyguard.convert.flatbuffer import Buf

    t = Buf(data, "test buffer").root()
    return t.scalar(0, "I"), t.string(1), t.scalars(2, "I"), [x.scalar(0, "I") for x in t.tables(3)]


def test_flatbuffer_reader_reads_the_whole_buffer():
    assert _walk(_little_flatbuffer()) == (7, "abc", [1, 2, 3], [9])


@pytest.mark.parametrize("cut", range(84))
def test_flatbuffer_truncated_anywhere_is_one_pyguard_error(cut):
    """A read that starts inside the buffer but ends past it (the bounds check must count the
    read's size) is a PyguardError, never a struct.error or an IndexError."""
    with pytest.raises(PyguardError, match="test buffer: corrupt or truncated"):
        _walk(_little_flatbuffer()[:cut])


@pytest.mark.parametrize("pos, value", [(16, -1000), (16, 1 << 30), (4, 13), (4, 2), (68, 1 << 30), (36, 0xFFFFFFFF),
                                        (44, 1 << 29), (48, 0xFFFFFF00), (28, 0xFFFFFFF0)])
def test_flatbuffer_hostile_offsets_and_lengths(pos, value):
    """Offsets and lengths pointing outside the buffer (or an odd or too small vtable) are refused."""
    import struct

    data = bytearray(_little_flatbuffer())
    struct.pack_into("<i" if value < 0 else "<I", data, pos, value)
    with pytest.raises(PyguardError, match="corrupt or truncated"):
        _walk(bytes(data))
