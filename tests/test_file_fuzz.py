"""Structure-level fuzzing of the pyguard file and the safetensors reader.

Byte flips rarely get past the metadata checksum, so these tests change what the metadata
*says* (dtypes, shapes, offsets, sizes, counts, field types, config values, head ids, special
tokens, group) and then recompute the metadata CRC and the array CRCs, so that only the
structural validation stands between the file and the kernels. load and verify must raise
PyguardError or succeed; a file that loads must build a model and run a forward pass (and a
classification when it has a tokenizer) in a worker process, where a crash is caught.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import synth
from pyguard.convert import checkpoint
from pyguard.formats import file, quant, safetensors
from pyguard.formats.config import ModelConfig, expected_shapes
from pyguard.errors import PyguardError
from pyguard.formats.tokenizer import LLAMA3_SPECIAL_NAMES, Tokenizer

CFG = ModelConfig(dim=64, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=32, hidden_dim=128, vocab_size=320, max_seq_len=4096)
TOKENIZER = Tokenizer({bytes([b]): b for b in range(256)}, {n: 256 + i for i, n in enumerate(LLAMA3_SPECIAL_NAMES[:16])})
JUNK = [None, True, False, 0, -1, 1.5, float("inf"), 2**64, 10**9, "", "x", "f16", [], [1], [[1]], {}, {"a": 1}]
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _base(path: str, head: str, group: int, cfg: ModelConfig = CFG, tokenizer: Tokenizer | None = TOKENIZER,
          int8: bool = False) -> str:
    """int8: the embedding table and a pruned head int8 (as the converter writes them)."""
    weights = checkpoint.random_weights(cfg)
    tensors, _ = synth.quantize_checkpoint(cfg, weights, group)
    head_ids = None
    if head == "guard":  # a pruned head: ids of some byte tokens and <|eot_id|>
        head_ids = [ord(c) for c in "safeun\n,S0123456789"] + [TOKENIZER.special("<|eot_id|>")]
        t = tensors["output"]
        tensors["output"] = quant.QTensor(t.qs[head_ids], t.scales[head_ids], t.rowsum[head_ids], group)
    if int8:
        tensors["tok_embeddings"] = quant.quantize8(weights["model.embed_tokens.weight"])
        if head_ids is not None:
            tensors["output"] = quant.quantize8(weights["model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"][head_ids])
    file.save(path, cfg, tensors, head_ids, "llama-guard-3-1b", tokenizer, {"head": head})
    return path


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, str]:
    """Paths of valid files: with a tokenizer, a full head at group 32, a pruned head at group
    64, and a pruned head with the int8 table and head; without one, tied embeddings (no
    `output` array), int4 or int8."""
    d = tmp_path_factory.mktemp("bases")
    tied = dataclasses.replace(CFG, tie_embeddings=True)
    return {"full": _base(str(d / "full.pgw"), "full", 32), "guard": _base(str(d / "guard.pgw"), "guard", 64),
            "tied": _base(str(d / "tied.pgw"), "full", 32, tied, None),
            "int8": _base(str(d / "int8.pgw"), "guard", 32, int8=True),
            "int8-tied": _base(str(d / "int8-tied.pgw"), "full", 64, tied, None, int8=True)}


def unpack(path: str) -> tuple[dict, bytes]:
    """(metadata, array data from the data offset on) of a file."""
    with open(path, "rb") as f:
        data = f.read()
    n, d = int.from_bytes(data[12:16], "little"), int.from_bytes(data[24:32], "little")
    return json.loads(data[32 : 32 + n]), data[d:]


def pack(meta: dict, arrays: bytes, version: int = file.VERSION) -> bytes:
    """A file with this metadata and array data, every checksum recomputed: the metadata's, and
    each array's whose offset and size are integers pointing into the data."""
    for e in meta.get("arrays") if isinstance(meta.get("arrays"), list) else []:
        if isinstance(e, dict) and type(e.get("offset")) is int and type(e.get("nbytes")) is int \
                and 0 <= e["offset"] and 0 <= e["nbytes"] and e["offset"] + e["nbytes"] <= len(arrays) and "crc32" in e:
            e["crc32"] = f"{zlib.crc32(arrays[e['offset'] : e['offset'] + e['nbytes']]):08x}"
    raw = json.dumps(meta).encode()
    d = -(-(32 + len(raw)) // 4096) * 4096
    head = file.MAGIC + version.to_bytes(4, "little") + len(raw).to_bytes(4, "little") + zlib.crc32(raw).to_bytes(4, "little")
    head += bytes(4) + d.to_bytes(8, "little") + raw
    return head + bytes(d - len(head)) + arrays


WORKER = r"""
import sys
from pyguard import Guard, PyguardError
from pyguard.engine.model import Model
for path in sys.stdin:
    try:
        Model.load(path.strip(), threads=1).logits([1, 2, 3, 300])
        print("classified", Guard.load(path.strip(), threads=1).classify("How do I pick a lock?").verdict, flush=True)
    except PyguardError as e:
        print("error", e, flush=True)
"""


class Engine:
    """A worker process that loads a file, runs a forward pass and (with a tokenizer) a
    classification: a crash there fails the test instead of killing pytest. A new worker
    replaces one that died, so hypothesis can replay a failing case."""

    def __init__(self):
        self.p = None

    def run(self, path: str) -> str:
        if self.p is None or self.p.poll() is not None:
            self.p = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.p.stdin.write(path + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        assert line, f"the engine crashed on {path} (exit status {self.p.wait()})"
        return line

    def close(self) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.stdin.close()
            self.p.wait()


@pytest.fixture(scope="module")
def engine():
    e = Engine()
    yield e
    e.close()


def test_bases_load_and_run(bases, engine, tmp_path):
    """The unmutated files (and pack's rewrite of them) pass, so the mutations are what fails."""
    for head, base in bases.items():
        path = tmp_path / f"{head}.pgw"
        path.write_bytes(pack(*unpack(base)))
        f = file.load(str(path))
        assert file.verify(str(path)) == len(f.meta["arrays"])
        assert isinstance(f.tensors["tok_embeddings"], quant.Q8Tensor) == head.startswith("int8")
        if f.meta["special_tokens"] is None:
            assert "output" not in f.tensors and f.tokenizer_ranks is None
            assert engine.run(str(path)).startswith("error") and "holds no tokenizer" in engine.run(str(path))
        else:
            assert f.tokenizer().special_tokens == TOKENIZER.special_tokens
            assert engine.run(str(path)).startswith("classified")


def _retype(e: dict, dtype: str) -> None:
    """Declare a directory entry with another dtype, its shape adjusted to keep its byte count
    and CRC valid (the report: u8 where fp16 scales belong passed verify and crashed classify)."""
    shape = e.get("shape")
    if isinstance(e.get("dtype"), str) and e["dtype"] in file.DTYPES and isinstance(shape, list) and shape \
            and all(type(d) is int for d in shape):
        old, new = np.dtype(file.DTYPES[e["dtype"]]).itemsize, np.dtype(file.DTYPES[dtype]).itemsize
        e["shape"] = shape[:-1] + [shape[-1] * old // new]
    e["dtype"] = dtype


@pytest.mark.parametrize("base, name, dtype", [
    ("full", "layers.0.wo.scales", "u8"), ("full", "layers.0.wo.rowsum", "u8"), ("full", "layers.0.wo.qs", "f16"),
    ("full", "norm", "u32"), ("full", "tokenizer.offsets", "f32"), ("full", "output.scales", "f32"),
    ("int8", "tok_embeddings.q8", "u8"), ("int8", "tok_embeddings.scales", "f16"), ("int8", "output.scales", "u32"),
    ("int8", "output.q8", "f32"),
])
def test_wrong_dtype_with_matching_bytes_and_checksums(bases, engine, tmp_path, base, name, dtype):
    meta, arrays = unpack(bases[base])
    _retype(next(e for e in meta["arrays"] if e["name"] == name), dtype)
    path = tmp_path / "m.pgw"
    path.write_bytes(pack(meta, arrays))
    for check in (file.load, file.verify):
        with pytest.raises(PyguardError, match=f"array {name!r} is {dtype}"):
            check(str(path))
    assert engine.run(str(path)).startswith("error")


def test_u8_scales_of_the_right_shape(bases, engine, tmp_path):
    """The report's file: scales declared u8 with the f16 shape (half the bytes, CRC fixed) made
    a QTensor whose kernels read past the array."""
    meta, arrays = unpack(bases["full"])
    e = next(e for e in meta["arrays"] if e["name"] == "layers.0.w13.scales")
    e["dtype"], e["nbytes"] = "u8", e["nbytes"] // 2
    path = tmp_path / "m.pgw"
    path.write_bytes(pack(meta, arrays))
    for check in (file.load, file.verify):
        with pytest.raises(PyguardError, match=r"'layers.0.w13.scales' is u8 \[256, 2\], expected 'layers.0.w13.scales' f16"):
            check(str(path))
    assert engine.run(str(path)).startswith("error")


@pytest.mark.parametrize("field, value, match", [
    (("config", "n_layers"), 10**9, "n_layers must be an integer"),
    (("config", "dim"), 2**40, "dim must be an integer"),
    (("config", "n_heads"), 0, "n_heads must be"),
    (("config", "vocab_size"), "320", "vocab_size must be"),
    (("config", "norm_eps"), None, "norm_eps must be"),
    (("quant", "group"), 48, "quant.group 48"),
    (("quant", "group"), 0, "quant.group 0"),
    (("quant", "group"), 64, "expected 'tok_embeddings.scales' f16 \\[320, 1\\]"),
    (("quant", "groups"), {"tok_embeddings": 64}, "expected 'tok_embeddings.scales' f16 \\[320, 1\\]"),
    (("quant", "groups"), {"tok_embeddings": 48}, "quant.groups must map"),
    (("quant", "groups"), {"norm": 32}, "quant.groups must map"),
    (("quant", "groups"), {"tok_embeddings": True}, "quant.groups must map"),
    (("quant", "groups"), [32], "quant.groups must map"),
    (("head_ids",), [0, 1], "head does not match head_ids"),
    (("head",), "guard", "head does not match head_ids"),
    (("head_ids",), [True] * 320, "head_ids must be"),
    (("family",), "llama-guard-4", "family 'llama-guard-4'"),
    (("special_tokens",), None, "a tokenizer without special_tokens"),
    (("special_tokens", "<|eot_id|>"), 7, "special_tokens must map"),
    (("special_tokens", "<|eot_id|>"), 256, "share an id"),
    (("special_tokens", "<|eot_id|>"), None, "special_tokens must map"),
    (("tokenizer_pattern",), None, "without its split pattern"),
])
def test_hostile_metadata_fields(bases, tmp_path, field, value, match):
    meta, arrays = unpack(bases["full"])
    check_fields(meta, arrays, tmp_path, field, value, match)


@pytest.mark.parametrize("field, value, match", [
    (("head_ids",), [0, 1], "'output.qs' is u8 \\[20, 32\\], expected 'output.qs' u8 \\[2, 32\\]"),
    (("head_ids",), None, "'output.qs' is u8 \\[20, 32\\], expected 'output.qs' u8 \\[320, 32\\]"),
    (("head_ids",), [1] * 20, "head_ids must be null or distinct"),
    (("head_ids",), [320] * 20, "head_ids must be null or distinct"),
    (("head_ids",), "0,1", "head_ids must be null or distinct"),
])
def test_hostile_head_ids(bases, tmp_path, field, value, match):
    meta, arrays = unpack(bases["guard"])
    meta.pop("head")
    check_fields(meta, arrays, tmp_path, field, value, match)


def check_fields(meta, arrays, tmp_path, field, value, match):
    obj = meta
    for k in field[:-1]:
        obj = obj[k]
    obj[field[-1]] = value
    path = tmp_path / "m.pgw"
    path.write_bytes(pack(meta, arrays))
    for check in (file.load, file.verify):
        with pytest.raises(PyguardError, match=match):
            check(str(path))


@pytest.mark.parametrize("base, field, value, match", [
    ("int8", ("quant", "int8"), ["tok_embeddings"], "21 arrays, the metadata implies 22"),
    ("int8", ("quant", "int8"), [], "21 arrays, the metadata implies 23"),
    ("int8", ("quant", "int8"), ["output", "output"], "quant.int8 must list distinct"),
    ("int8", ("quant", "int8"), ["norm"], "quant.int8 must list distinct"),
    ("int8", ("quant", "int8"), ["layers.0.wo"], "quant.int8 must list distinct"),
    ("int8", ("quant", "int8"), "tok_embeddings", "quant.int8 must list distinct"),
    ("int8", ("quant", "int8"), [["output"]], "quant.int8 must list distinct"),
    ("int8", ("quant", "groups"), {"output": 32}, "quant.int8 must list distinct .* \\(without a group\\)"),
    ("int8-tied", ("quant", "int8"), ["tok_embeddings", "output"], "names output, which the file does not store"),
    ("full", ("quant", "int8"), ["tok_embeddings"], "23 arrays, the metadata implies 22"),
])
def test_hostile_int8_fields(bases, tmp_path, base, field, value, match):
    meta, arrays = unpack(bases[base])
    check_fields(meta, arrays, tmp_path, field, value, match)


@pytest.mark.parametrize("value, match", [(np.nan, "holds infinite or NaN"), (np.inf, "holds infinite or NaN"),
                                          (-0.5, "holds negative scales")])
def test_bad_int8_scales_fail_load(bases, tmp_path, value, match):
    """int8 scales are few (one per row): load reads them all."""
    meta, arrays = unpack(bases["int8"])
    e = next(e for e in meta["arrays"] if e["name"] == "tok_embeddings.scales")
    arrays = bytearray(arrays)
    arrays[e["offset"] + 8 : e["offset"] + 12] = np.float32(value).tobytes()
    path = tmp_path / "m.pgw"
    path.write_bytes(pack(meta, bytes(arrays)))
    with pytest.raises(PyguardError, match=f"'tok_embeddings.scales' {match}"):
        file.load(str(path))


def test_format_versions(bases, tmp_path):
    """Version 1 files (int4 only) are still read; a version 1 file cannot declare int8
    tensors, and a version this pyguard does not know is refused."""
    path = tmp_path / "m.pgw"
    path.write_bytes(pack(*unpack(bases["guard"]), version=1))
    old, new = file.load(str(path)), file.load(bases["guard"])
    assert file.verify(str(path)) == len(old.meta["arrays"]) and old.meta == new.meta
    assert all(np.array_equal(old.tensors[n].qs, new.tensors[n].qs) for n in new.tensors if isinstance(new.tensors[n], quant.QTensor))
    path.write_bytes(pack(*unpack(bases["int8"]), version=1))
    with pytest.raises(PyguardError, match="quant.int8 in a version 1 file"):
        file.load(str(path))
    for version in (0, 3):
        path.write_bytes(pack(*unpack(bases["full"]), version=version))
        with pytest.raises(PyguardError, match=f"format version {version}, this pyguard reads versions 1, 2"):
            file.load(str(path))


def test_metadata_size_is_bounded_before_reading(bases, tmp_path):
    data = bytearray(open(bases["full"], "rb").read())
    data[12:16] = (2**32 - 1).to_bytes(4, "little")  # 4 GB of metadata in a small file
    path = tmp_path / "m.pgw"
    path.write_bytes(bytes(data))
    with pytest.raises(PyguardError, match="metadata of 4294967295 bytes"):
        file.load(str(path))


def test_deeply_nested_metadata(bases, tmp_path):
    raw = b"[" * 100000 + b"]" * 100000
    data = open(bases["full"], "rb").read()
    d = -(-(32 + len(raw)) // 4096) * 4096
    head = data[:12] + len(raw).to_bytes(4, "little") + zlib.crc32(raw).to_bytes(4, "little") + bytes(4) + d.to_bytes(8, "little")
    path = tmp_path / "m.pgw"
    path.write_bytes(head + raw + bytes(d - 32 - len(raw)))
    with pytest.raises(PyguardError, match="metadata is not a JSON object"):
        file.load(str(path))


def test_non_finite_scales_fail_verify(bases, tmp_path):
    """verify reads the scales (load does not): an infinite scale with a fixed CRC is refused."""
    meta, arrays = unpack(bases["full"])
    e = next(e for e in meta["arrays"] if e["name"] == "layers.0.w2.scales")
    arrays = bytearray(arrays)
    arrays[e["offset"] : e["offset"] + 2] = np.float16(np.inf).tobytes()
    path = tmp_path / "m.pgw"
    path.write_bytes(pack(meta, bytes(arrays)))
    file.load(str(path))
    with pytest.raises(PyguardError, match="'layers.0.w2.scales' holds infinite or NaN"):
        file.verify(str(path))


def test_non_finite_norm_fails_load(bases, tmp_path):
    meta, arrays = unpack(bases["full"])
    e = next(e for e in meta["arrays"] if e["name"] == "layers.0.ffn_norm")
    arrays = bytearray(arrays)
    arrays[e["offset"] : e["offset"] + 4] = np.float32(np.nan).tobytes()
    path = tmp_path / "m.pgw"
    path.write_bytes(pack(meta, bytes(arrays)))
    with pytest.raises(PyguardError, match="'layers.0.ffn_norm' holds infinite or NaN"):
        file.load(str(path))


INTERESTING = [0, 1, 2, 3, 16, 31, 32, 63, 64, 65, 128, 255, 256, 319, 320, 321, 4096, 2**31, 2**32, 2**40, 2**63, -1, -64]


def _mutate(draw, meta: dict) -> None:
    """One structural change to the metadata, drawn by hypothesis (nothing if an earlier change
    already broke the part it would change)."""
    arrays = meta.get("arrays")
    kind = draw(st.sampled_from(["dtype", "shape", "offset", "nbytes", "count", "junk", "config", "group", "head_ids",
                                 "specials", "int8"]))
    needs = {"junk": ("config", "quant"), "config": ("config",), "group": ("quant",), "specials": ("special_tokens",),
             "int8": ("quant",)}
    if not isinstance(arrays, list) or not arrays or not all(isinstance(x, dict) for x in arrays) \
            or not all(isinstance(meta.get(k), dict) and meta[k] for k in needs.get(kind, ())):
        return
    e = arrays[draw(st.integers(0, len(arrays) - 1))]
    number = st.sampled_from(INTERESTING)
    if kind == "dtype":
        _retype(e, draw(st.sampled_from(sorted(file.DTYPES))))
    elif kind == "shape":
        e["shape"] = draw(st.lists(number, max_size=3))
        if draw(st.booleans()) and e.get("dtype") in file.DTYPES:  # a consistent byte count: only the layout check can object
            e["nbytes"] = int(np.prod(e["shape"], dtype=object)) * np.dtype(file.DTYPES[e["dtype"]]).itemsize
    elif kind == "offset":
        e["offset"] = draw(st.one_of(number, st.sampled_from([x.get("offset") for x in arrays])))
    elif kind == "nbytes":
        e["nbytes"] = draw(number)
    elif kind == "count":
        i, j = draw(st.integers(0, len(arrays) - 1)), draw(st.integers(0, len(arrays) - 1))
        op = draw(st.sampled_from(["drop", "duplicate", "swap"]))
        if op == "drop":
            del arrays[i]
        elif op == "duplicate":
            arrays.insert(j, dict(arrays[i]))
        else:
            arrays[i], arrays[j] = arrays[j], arrays[i]
    elif kind == "junk":
        where = draw(st.sampled_from(["config", "quant", "meta", "entry"]))
        obj = {"config": meta["config"], "quant": meta["quant"], "meta": meta, "entry": e}[where]
        key = draw(st.sampled_from(sorted(obj)))
        if draw(st.booleans()):
            obj[key] = draw(st.sampled_from(JUNK))
        else:
            del obj[key]
    elif kind == "config":
        meta["config"][draw(st.sampled_from(sorted(meta["config"])))] = draw(number)
    elif kind == "group":
        meta["quant"]["group"] = draw(st.sampled_from([0, 16, 32, 48, 64, 96, 128, 256, 512]))
    elif kind == "int8":
        meta["quant"]["int8"] = draw(st.one_of(st.lists(st.sampled_from(["tok_embeddings", "output", "norm"]), max_size=3),
                                               st.sampled_from(JUNK)))
    elif kind == "head_ids":
        ids = meta["head_ids"] if isinstance(meta.get("head_ids"), list) and meta["head_ids"] else list(range(CFG.vocab_size))
        ids[draw(st.integers(0, len(ids) - 1))] = draw(st.one_of(number, st.sampled_from(JUNK)))
        meta["head_ids"] = ids
    else:
        specials = meta["special_tokens"]
        name = draw(st.sampled_from(sorted(specials)))
        if draw(st.booleans()):
            del specials[name]
        else:
            specials[name] = draw(st.one_of(number, st.sampled_from(JUNK)))


@settings(max_examples=150, **SETTINGS)
@given(st.data(), st.sampled_from(["full", "guard", "tied", "int8", "int8-tied"]), st.integers(1, 3))
def test_fuzzed_structure(bases, engine, tmp_path, data, head, n_mutations):
    meta, arrays = unpack(bases[head])
    for _ in range(n_mutations):
        _mutate(data.draw, meta)
    path = tmp_path / "m.pgw"
    path.write_bytes(pack(meta, arrays))
    try:
        file.load(str(path))
    except PyguardError as e:
        event(f"rejected: {str(e).split('(')[1][:30]}")  # --hypothesis-show-statistics lists these
        with pytest.raises(PyguardError):  # verify runs every check of load
            file.verify(str(path))
        return
    try:
        file.verify(str(path))
    except PyguardError:
        pass
    event(f"loaded, engine: {engine.run(str(path)).split()[0]}")  # a file that loads must not crash it


# ---- safetensors


@pytest.fixture(scope="module")
def st_file(tmp_path_factory) -> bytes:
    d = tmp_path_factory.mktemp("st")
    cfg = dataclasses.replace(CFG, vocab_size=64)
    shapes = expected_shapes(cfg)
    path = str(d / "model.safetensors")
    safetensors.write(path, list(shapes.items())[:6], lambda n: checkpoint.random_tensor(cfg, n), "F16")
    with open(path, "rb") as f:
        return f.read()


def _st_pack(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


@settings(max_examples=150, **SETTINGS)
@given(st.data())
def test_fuzzed_safetensors_header(st_file, tmp_path, data):
    n = int.from_bytes(st_file[:8], "little")
    header, body = json.loads(st_file[8 : 8 + n]), st_file[8 + n :]
    names = sorted(k for k in header if k != "__metadata__")
    for _ in range(data.draw(st.integers(1, 3))):
        e = header[data.draw(st.sampled_from(names))]
        if not isinstance(e, dict):
            continue
        key = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "entry", "missing"]))
        value = data.draw(st.one_of(
            st.sampled_from(JUNK + ["F32", "BF16", "F16", "I8", "F64", ["F32"]]),
            st.lists(st.sampled_from(INTERESTING + [1.0, True, None]), max_size=3),
            st.sampled_from([[a, b] for a in (0, 64, 128, len(body), len(body) + 1) for b in (0, 64, 8192, len(body), 2**64)])))
        if key == "entry":
            header[data.draw(st.sampled_from(names))] = value
        elif key == "missing":
            e.pop(data.draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        else:
            e[key] = value
    path = tmp_path / "model.safetensors"
    path.write_bytes(_st_pack(header, body))
    try:
        f = safetensors.SafetensorsFile(str(path))
    except PyguardError as err:
        assert str(path) in str(err)
        return
    for name, t in f.tensors.items():
        if t.dtype in safetensors.DTYPES:
            assert f.read(name).shape == t.shape


@pytest.mark.parametrize("header", [
    {"w": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}},
    {"w": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}},
    {"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
    {"w": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}},
    {"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}},
    {"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}},
    {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 2**64 + 8]}},
    {"w": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 8]}},
    {"w": {"dtype": "F32", "shape": [2], "data_offsets": "0:8"}},
    {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
    {"w": {"dtype": None, "shape": [2], "data_offsets": [0, 8]}},
    {"w": [1]},
    [1],
])
def test_hostile_safetensors_headers(tmp_path, header):
    path = tmp_path / "x.safetensors"
    path.write_bytes(_st_pack(header, bytes(16)))
    with pytest.raises(PyguardError, match="x.safetensors: corrupt safetensors header"):
        safetensors.SafetensorsFile(str(path))


def test_deeply_nested_safetensors_header(tmp_path):
    raw = b"[" * 100000 + b"]" * 100000
    path = tmp_path / "x.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw)
    with pytest.raises(PyguardError, match="not valid JSON"):
        safetensors.SafetensorsFile(str(path))


def test_per_tensor_group_sizes(tmp_path):
    """A tensor may keep its own group (Meta's INT4 program: a group-32 embedding beside
    group-256 layers): saved in quant.groups, loaded with it, computed with it."""
    from pyguard.engine.model import Model

    cfg = dataclasses.replace(CFG, dim=256, head_dim=128, hidden_dim=256)
    weights = checkpoint.random_weights(cfg)
    tensors = synth.quantize_checkpoint(cfg, weights, 64)[0]
    tensors["tok_embeddings"] = synth.quantize_checkpoint(cfg, weights, 32)[0]["tok_embeddings"]
    path = str(tmp_path / "mixed.pgw")
    file.save(path, cfg, tensors)
    f = file.load(path)
    assert f.meta["quant"] == {"group": 64, "groups": {"tok_embeddings": 32}} and file.verify(path) > 0
    assert f.tensors["tok_embeddings"].group == 32 and f.tensors["layers.0.w2"].group == 64
    ids = [5, 70, 300, 2]
    assert np.array_equal(Model(cfg, f.tensors).logits(ids), Model(cfg, tensors).logits(ids))
