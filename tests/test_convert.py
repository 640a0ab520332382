"""Converter and file format: exact round trips, the guard head, bad input, fuzzed readers."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyguard.convert import checkpoint
from pyguard.formats import file, quant
from pyguard.formats.config import ModelConfig, tensor_plan
from pyguard.convert.hf import convert, read_tokenizer
from pyguard.errors import PyguardError
from pyguard.engine.model import Model
from pyguard.formats.safetensors import Checkpoint, SafetensorsFile

TINY = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=256, vocab_size=640,
                   rope_theta=10000.0, max_seq_len=4096)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make(tmp_path, cfg=TINY, name="hf", **kw) -> str:
    d = str(tmp_path / name)
    checkpoint.write_checkpoint(d, cfg, **kw)
    return d


@pytest.mark.parametrize("dtype, shards, tied, rope_format, group", [
    ("BF16", 1, False, "rope_scaling", 32),
    ("F32", 3, True, "rope_parameters", 64),
    ("F16", 2, False, "rope_parameters", 256),
])
def test_round_trip_is_the_reference_quantization(tmp_path, dtype, shards, tied, rope_format, group):
    cfg = dataclasses.replace(TINY, tie_embeddings=tied, rope_scaling=checkpoint.GUARD_1B.rope_scaling if shards > 1 else None,
                              dim=max(TINY.dim, group), hidden_dim=max(TINY.hidden_dim, group), n_heads=max(4, group // 32))
    hf = make(tmp_path, cfg, dtype=dtype, shards=shards, rope_format=rope_format)
    out = str(tmp_path / "m.pg")
    with pytest.warns(UserWarning, match="tokenizer not converted"):
        convert(hf, out, group=group, threads=2)
    f = file.load(out)
    assert f.config == cfg and f.head_ids is None and f.meta["quant"]["group"] == group
    ck = Checkpoint(hf)
    for name, sources, quantized in tensor_plan(cfg):
        if name == "output" and tied:
            assert name not in f.tensors  # the head is the embedding table
            continue
        w = np.concatenate([ck.read(s) for s in sources])
        if name == "tok_embeddings":  # int8 per row by default (a full head stays int4)
            ref, got = quant.quantize8(w), f.tensors[name]
            assert np.array_equal(ref.q, got.q) and np.array_equal(ref.scales, got.scales), name
        elif quantized:
            ref, got = quant.quantize_weights(w, group, search=True), f.tensors[name]
            assert np.array_equal(ref.qs, got.qs) and np.array_equal(ref.scales, got.scales), name
            assert np.array_equal(ref.rowsum, got.rowsum), name
        else:
            assert np.array_equal(w, f.tensors[name]), name
    assert file.verify(out) == len(f.meta["arrays"])
    assert Model.load(out).logits([1, 2, 3]).shape == (3, cfg.vocab_size)


def test_bf16_reader_rounds_like_torch(tmp_path):
    torch = pytest.importorskip("torch", reason="torch is the bf16 oracle (a test dependency)")
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32) * 3
    path = str(tmp_path / "t.safetensors")
    from pyguard.formats import safetensors

    safetensors.write(path, [("w", w.shape)], lambda _: w, "BF16")
    expect = torch.from_numpy(w).bfloat16().float().numpy()
    assert np.array_equal(SafetensorsFile(path).read("w"), expect)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.sampled_from(quant.GROUP_SIZES), st.integers(0, 2**32 - 1),
       st.sampled_from([1e-6, 1e-2, 1.0, 300.0]), st.floats(0, 0.5))
def test_searched_scales_never_worse_than_absmax(rows, group, seed, magnitude, zero_fraction):
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(3, (rows, 2 * group)) * magnitude).astype(np.float32)
    w[rng.random(w.shape) < zero_fraction] = 0
    w[0, :group] = 0  # an all-zero group: scale 0, exact
    err = {}
    for search in (False, True):
        t = quant.quantize_weights(w, group, search=search)
        err[search] = ((quant.dequantize(t) - w).reshape(rows, -1, group).astype(np.float64) ** 2).sum(axis=2)
    assert (err[True] <= err[False] * (1 + 1e-6) + 1e-30).all()
    assert err[True][0, 0] == 0


def test_searched_scales_lower_rmse():
    w = np.random.default_rng(1).standard_normal((256, 1024)).astype(np.float32)
    rmse = [np.sqrt(np.mean((quant.dequantize(quant.quantize_weights(w, 32, search=s)) - w) ** 2)) for s in (False, True)]
    assert rmse[1] < 0.97 * rmse[0]


# ---- bad input: one clear PyguardError, no output file left behind


def _expect_error(tmp_path, hf, match):
    out = tmp_path / "bad.pg"
    with pytest.raises(PyguardError, match=match):
        convert(str(hf), str(out))
    assert not out.exists() and not (tmp_path / "bad.pg.part").exists()


def test_missing_directory_and_config(tmp_path):
    _expect_error(tmp_path, tmp_path / "nope", "not a directory")
    (tmp_path / "empty").mkdir()
    _expect_error(tmp_path, tmp_path / "empty", "no config.json")


def test_other_architecture(tmp_path):
    hf = make(tmp_path)
    cfg = json.load(open(os.path.join(hf, "config.json")))
    cfg.update(model_type="mistral", architectures=["MistralForCausalLM"])
    json.dump(cfg, open(os.path.join(hf, "config.json"), "w"))
    _expect_error(tmp_path, hf, "not a Llama")


def test_shape_mismatch_and_missing_tensor(tmp_path):
    hf = make(tmp_path)
    cfg = json.load(open(os.path.join(hf, "config.json")))
    json.dump(dict(cfg, intermediate_size=512), open(os.path.join(hf, "config.json"), "w"))
    _expect_error(tmp_path, hf, "shape")
    json.dump(dict(cfg, num_hidden_layers=3), open(os.path.join(hf, "config.json"), "w"))
    _expect_error(tmp_path, hf, "lacks tensor model.layers.2")


def test_missing_shard_and_truncated_file(tmp_path):
    hf = make(tmp_path, shards=2)
    os.remove(os.path.join(hf, "model-00002-of-00002.safetensors"))
    _expect_error(tmp_path, hf, "shard model-00002-of-00002.safetensors is missing")
    hf = make(tmp_path, name="hf2")
    path = os.path.join(hf, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    _expect_error(tmp_path, hf, "truncated")


def test_nan_weights_and_failure_midway_leave_no_file(tmp_path):
    w = checkpoint.random_weights(TINY)
    w["model.layers.1.mlp.down_proj.weight"][3, 5] = np.nan
    hf = make(tmp_path, weights=w, dtype="F32")
    _expect_error(tmp_path, hf, "NaN")


def test_weights_beyond_fp16_scale_range(tmp_path):
    """|w| / 8 above fp16's 65504 would make an infinite scale (and NaN logits): refused, naming the tensor."""
    w = checkpoint.random_weights(TINY)
    w["model.layers.0.self_attn.o_proj.weight"][1, 2] = 6e5
    _expect_error(tmp_path, make(tmp_path, weights=w, dtype="F32"), "o_proj.weight holds a weight of magnitude 600000")
    w["model.layers.0.self_attn.o_proj.weight"][1, 2] = quant.MAX_WEIGHT  # the largest that converts
    w["model.norm.weight"][0] = np.inf
    _expect_error(tmp_path, make(tmp_path, name="hf2", weights=w, dtype="F32"), "model.norm.weight holds infinite")
    w["model.norm.weight"][0] = 1e30  # norms stay float32: any finite value converts
    out = tmp_path / "ok.pg"
    with pytest.warns(UserWarning, match="tokenizer not converted"):
        convert(make(tmp_path, name="hf3", weights=w, dtype="F32"), str(out))
    f = file.load(str(out))
    assert np.isfinite(f.tensors["layers.0.wo"].scales.astype(np.float32)).all() and file.verify(str(out))


HF_CONFIG = checkpoint.hf_config(TINY)


@pytest.mark.parametrize("change, match", [
    ({"num_attention_heads": 0}, "num_attention_heads must be an integer"),
    ({"hidden_size": float("inf")}, "hidden_size must be an integer"),  # JSON 1e400
    ({"hidden_size": "128"}, "hidden_size must be an integer"),
    ({"hidden_size": 128.0}, "hidden_size must be an integer"),
    ({"num_hidden_layers": 10**9}, "num_hidden_layers must be an integer in 1..1024"),
    ({"num_hidden_layers": True}, "num_hidden_layers must be an integer"),
    ({"vocab_size": None}, "vocab_size must be an integer"),
    ({"architectures": 5}, "architectures must be a list"),
    ({"architectures": [["LlamaForCausalLM"]]}, "architectures must be a list"),
    ({"head_dim": None, "hidden_size": 130}, "hidden_size 130 is not divisible by num_attention_heads 4"),
    ({"rms_norm_eps": -1}, "rms_norm_eps must be a finite positive number"),
    ({"rope_theta": "1e4"}, "rope_theta must be a finite positive number"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false"),
    ({"num_key_value_heads": 3}, "4 heads is not a multiple of 3"),
    ({"max_position_embeddings": 2**40}, "max_position_embeddings must be an integer"),
    ({"rope_scaling": 5}, "rope_scaling must be an object"),
    ({"rope_scaling": {"rope_type": "yarn"}}, "rope scaling 'yarn' not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling lacks low_freq_factor"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}}, "rope_scaling low_freq_factor must be below high_freq_factor"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": [8.0], "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}}, "rope_scaling.factor must be a finite positive number"),
    ({"rope_parameters": [1]}, "rope_parameters must be an object"),
])
def test_hostile_config_json(tmp_path, change, match):
    hf = make(tmp_path)
    with open(os.path.join(hf, "config.json"), "w") as f:
        json.dump({**HF_CONFIG, **change}, f)
    _expect_error(tmp_path, hf, "config.json: " + match)


@given(st.sampled_from(sorted(HF_CONFIG)), st.sampled_from([None, True, 0, -1, 1.5, 2**70, "x", [], {}, [64], {"a": 1}]))
@settings(max_examples=80, deadline=None, derandomize=True)
def test_any_wrong_config_value_is_a_pyguard_error(key, value):
    """Every field of config.json with any JSON value: a config or one PyguardError, never another exception."""
    try:
        ModelConfig.from_hf({**HF_CONFIG, key: value})
    except PyguardError as e:
        assert str(e).startswith("config.json")


def test_deeply_nested_json_files(tmp_path):
    deep = "[" * 100000 + "]" * 100000
    hf = make(tmp_path)
    with open(os.path.join(hf, "config.json"), "w") as f:
        f.write(deep)
    _expect_error(tmp_path, hf, "config.json: cannot parse")
    hf = make(tmp_path, name="hf2", shards=2)
    with open(os.path.join(hf, "model.safetensors.index.json"), "w") as f:
        f.write(deep)
    _expect_error(tmp_path, hf, "index.json: not a valid safetensors index")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # read for the special token names
        d = tmp_path / name
        (d / "original").mkdir(parents=True)
        (d / "original" / "tokenizer.model").write_bytes(b"".join(b"%s %d\n" % (base64.b64encode(bytes([i])), i) for i in range(256)))
        (d / name).write_text(deep)
        tok, note = read_tokenizer(str(d))  # the checkpoint then converts without a tokenizer, with a warning
        assert tok is None and note.endswith(f"{name}: malformed " + ("added_tokens" if name == "tokenizer.json" else "added_tokens_decoder"))


@pytest.mark.parametrize("name, content", [
    ("tokenizer.json", {"added_tokens": [{"content": "<|x|>", "id": True}]}),
    ("tokenizer.json", {"added_tokens": [{"content": "<|x|>", "id": float("inf")}]}),  # JSON 1e400
    ("tokenizer.json", {"added_tokens": [{"content": "<|x|>", "id": "3e2"}]}),
    ("tokenizer.json", {"added_tokens": [{"content": ["<|x|>"], "id": 300}]}),
    ("tokenizer.json", {"added_tokens": 5}),
    ("tokenizer.json", [1]),
    ("tokenizer_config.json", {"added_tokens_decoder": {"300": {"content": 5}}}),
    ("tokenizer_config.json", {"added_tokens_decoder": {"x": {"content": "<|x|>"}}}),
    ("tokenizer_config.json", {"added_tokens_decoder": [1]}),
])
def test_malformed_special_token_names(tmp_path, name, content):
    """The special token names a checkpoint declares: ids must be integers or decimal strings
    (tokenizer_config.json's keys are strings); anything else leaves the tokenizer out, saying why."""
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "tokenizer.model").write_bytes(b"".join(b"%s %d\n" % (base64.b64encode(bytes([i])), i) for i in range(256)))
    (tmp_path / name).write_text(json.dumps(content))
    tok, note = read_tokenizer(str(tmp_path))
    assert tok is None and f"{name}: malformed added_tokens" in note


@pytest.mark.parametrize("weight_map", [None, 5, [], {"a": 5}, {"a": ["x"]}, {"a": "../model.safetensors"}, {"a": "nope.safetensors"}])
def test_hostile_safetensors_index(tmp_path, weight_map):
    hf = make(tmp_path, shards=2)
    with open(os.path.join(hf, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": weight_map}, f)
    _expect_error(tmp_path, hf, "model.safetensors.index.json: ")


def test_tensor_in_two_shards_and_unsupported_dtype(tmp_path):
    from pyguard.formats import safetensors

    hf = make(tmp_path, shards=2, dtype="F32")
    shard1, shard2 = (os.path.join(hf, f"model-0000{i}-of-00002.safetensors") for i in (1, 2))
    f1, f2 = SafetensorsFile(shard1), SafetensorsFile(shard2)
    extra = next(iter(f1.tensors))
    specs = [(n, t.shape) for n, t in f2.tensors.items()] + [(extra, f1.tensors[extra].shape)]
    data = {n: (f2 if n in f2.tensors else f1).read(n) for n, _ in specs}
    safetensors.write(shard2, specs, data.__getitem__, "F32")
    _expect_error(tmp_path, hf, f"model-00002-of-00002.safetensors: tensor {extra} is also in .*model-00001")

    hf = make(tmp_path, name="hf2", dtype="F32")
    path = os.path.join(hf, "model.safetensors")
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["model.norm.weight"]["dtype"] = "I32"  # same item size: only the dtype check can object
    head = json.dumps(header).encode()
    open(path, "wb").write(len(head).to_bytes(8, "little") + head + raw[8 + n :])
    _expect_error(tmp_path, hf, "model.safetensors: tensor model.norm.weight has dtype I32")


def test_cli_reports_one_line_and_exit_status_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pyguard.cli", "convert", str(tmp_path / "nope"), str(tmp_path / "o.pg")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "not a directory" in r.stderr and "Traceback" not in r.stderr


def test_cli_convert_and_verify(tmp_path):
    hf = make(tmp_path)
    out = tmp_path / "m.pg"
    r = subprocess.run([sys.executable, "tools/convert_hf.py", hf, str(out), "--group", "64"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "wrote 15 tensors" in r.stdout and "converting 100.0%" in r.stderr
    r = subprocess.run([sys.executable, "-m", "pyguard.cli", "verify", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "all checksums match" in r.stdout
    data = bytearray(out.read_bytes())
    data[-10] ^= 0xFF
    out.write_bytes(bytes(data))
    r = subprocess.run([sys.executable, "-m", "pyguard.cli", "verify", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "checksum mismatch" in r.stderr


def test_cli_table_option(tmp_path):
    """The table is int8 by default and int4 with --table int4, the same rounding as every matrix."""
    from pyguard import cli

    hf = make(tmp_path)
    for table, kind in ((None, quant.Q8Tensor), ("int4", quant.QTensor)):
        out = str(tmp_path / f"{table}.pg")
        assert cli.main(["convert", hf, out, "--no-calibration"] + (["--table", table] if table else [])) == 0
        assert isinstance(file.load(out).tensors["tok_embeddings"], kind)
    with pytest.raises(SystemExit) as e:  # argparse's own usage error
        cli.main(["convert", hf, str(tmp_path / "x.pg"), "--table", "int2"])
    assert e.value.code == 2


# ---- fuzzed readers: corrupt and truncated files raise PyguardError, never anything else


@pytest.fixture(scope="module")
def small_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    cfg = dataclasses.replace(TINY, n_layers=1, vocab_size=64, dim=64, head_dim=16, hidden_dim=128)
    checkpoint.write_checkpoint(str(d / "hf"), cfg, dtype="F16")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(str(d / "hf"), str(d / "m.pg"))
    return (d / "hf" / "model.safetensors").read_bytes(), (d / "m.pg").read_bytes()


def _mutate(data: bytes, cut: int | None, flips: list[tuple[int, int]]) -> bytes:
    b = bytearray(data if cut is None else data[:cut])
    for pos, val in flips:
        if b:
            b[pos % len(b)] = val
    return bytes(b)


mutations = st.tuples(st.one_of(st.none(), st.integers(0, 60000)), st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)), max_size=4))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations, st.booleans())
def test_fuzzed_safetensors(tmp_path, small_files, mutation, header_only):
    data = small_files[0]
    cut, flips = mutation
    if header_only:  # aim the flips at the JSON header, where they matter most
        n = int.from_bytes(data[:8], "little")
        flips = [(8 + p % n, v) for p, v in flips]
    path = tmp_path / "f.safetensors"
    path.write_bytes(_mutate(data, cut, flips))
    try:
        f = SafetensorsFile(str(path))
        for name in f.tensors:
            if f.tensors[name].dtype in ("F16", "F32", "BF16"):
                f.read(name)
    except PyguardError:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations, st.booleans())
def test_fuzzed_pyguard_file(tmp_path, small_files, mutation, header_only):
    data = small_files[1]
    cut, flips = mutation
    if header_only:
        n = int.from_bytes(data[12:16], "little")
        flips = [(p % (32 + n), v) for p, v in flips]
    path = tmp_path / "m.pg"
    path.write_bytes(_mutate(data, cut, flips))
    try:
        f = file.load(str(path))
        file.verify(str(path))
    except PyguardError:
        return
    # undetected changes can only be in padding: what the file says is unchanged
    ref = file.load(str(path.with_name("orig.pg")) if path.with_name("orig.pg").exists() else _write(path.with_name("orig.pg"), data))
    assert f.meta == ref.meta and f.tensors.keys() == ref.tensors.keys()
    for name, t in f.tensors.items():
        for a, b in zip(_arrays(t), _arrays(ref.tensors[name])):
            assert np.array_equal(a, b)


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _arrays(t):
    if isinstance(t, quant.QTensor):
        return [t.qs, t.scales, t.rowsum]
    return [t.q, t.scales] if isinstance(t, quant.Q8Tensor) else [t]


def test_save_and_load_in_memory_tensors(tmp_path):
    cfg = dataclasses.replace(TINY, tie_embeddings=True)
    tensors = {}
    for name, sources, quantized in tensor_plan(cfg):
        if name == "output":
            continue
        w = np.concatenate([checkpoint.random_tensor(cfg, s) for s in sources])
        tensors[name] = quant.quantize_weights(w, 64) if quantized else w
    path = str(tmp_path / "m.pgw")
    file.save(path, cfg, tensors)
    f = file.load(path)
    assert f.config == cfg and f.meta["quant"]["group"] == 64 and f.tokenizer_ranks is None
    assert np.array_equal(f.tensors["layers.1.w2"].qs, tensors["layers.1.w2"].qs)
    np.testing.assert_array_equal(Model.load(path).logits([5, 6]), Model(cfg, tensors).logits([5, 6]))
