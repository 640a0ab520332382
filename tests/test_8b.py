"""Llama Guard 3 8B's path at a reduced size (the full-size run is a benchmark: docs/8B.md).

The reduced model keeps what distinguishes the 8B from the 1B: head_dim 128, four query heads
per key/value head, an untied head, no rope scaling, categories S1..S14, and a bf16 checkpoint
cut into shards with an index as Hugging Face writes it. It goes through convert (calibration
included), verify, and classify by the API and the CLI. The converter's memory is checked not
to grow with the model's depth (what lets the 8B convert in a few GB).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tracemalloc
import warnings

import numpy as np
import pytest

import oracle
from synth import result_key
from pyguard import Guard, format_prompt
from pyguard.convert import calibrate, checkpoint
from pyguard.convert.hf import convert
from pyguard.engine.model import Model
from pyguard.formats import file, safetensors
from pyguard.formats.config import ModelConfig, expected_shapes
from pyguard.guard.prompt import CATEGORIES

# the 8B's shapes, narrower and shallower: q heads 4 x 128 = 2 x dim, 1 key/value head
REDUCED = dataclasses.replace(checkpoint.GUARD_8B, dim=256, n_layers=2, n_heads=4, n_kv_heads=1, hidden_dim=896)
SHARD = 40_000_000  # bytes: the table and the head (65.7 MB each) alone in a shard, the layers together


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("hf8b") / "hf")
    checkpoint.write_checkpoint(d, REDUCED, seed=8, tokenizer_model=checkpoint.reference_tokenizer_model(), max_shard_bytes=SHARD)
    return d


@pytest.fixture(scope="module")
def converted(hf, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("pg8b") / "guard8b.pgw")
    convert(hf, out, family="llama-guard-3-8b", threads=2)  # the defaults: G=32, full head, calibration
    return out


def test_checkpoint_is_hugging_face_sharded_bf16(hf):
    """Shards named and cut as save_pretrained cuts them (a new file before the tensor that
    would pass the limit, in the model's module order), an index naming every tensor's file,
    bf16 everywhere, the 8B's config keys; and the weights streamed block by block are the
    whole-tensor ones."""
    index = json.load(open(os.path.join(hf, "model.safetensors.index.json")))
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-{i:05d}-of-00003.safetensors" for i in range(1, 4)]  # the table, the layers, the head
    shapes = expected_shapes(REDUCED)
    assert set(index["weight_map"]) == set(shapes)
    assert index["metadata"]["total_size"] == sum(2 * int(np.prod(s)) for s in shapes.values())
    assert index["weight_map"]["model.embed_tokens.weight"] == files[0] and index["weight_map"]["lm_head.weight"] == files[-1]
    for name in files:
        f = safetensors.SafetensorsFile(os.path.join(hf, name))
        assert {t.dtype for t in f.tensors.values()} == {"BF16"}
        size = sum(t.end - t.begin for t in f.tensors.values())
        assert size <= SHARD or len(f.tensors) == 1, name
    config = json.load(open(os.path.join(hf, "config.json")))
    assert (config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]) == (128, 4, 1)
    assert config["tie_word_embeddings"] is False and config["rope_scaling"] is None
    assert json.load(open(os.path.join(hf, "generation_config.json")))["eos_token_id"] == 128009
    ck = safetensors.Checkpoint(hf)
    for name in ("lm_head.weight", "model.layers.1.mlp.down_proj.weight"):  # the head: 126 blocks of 1024 rows
        want = safetensors.to_bf16(checkpoint.random_tensor(REDUCED, name, 8))
        assert np.array_equal(safetensors.to_bf16(ck.read(name)), want), name


def test_converts_verifies_and_classifies(converted):
    """The file records the 8B family and geometry, passes verify, and judges through the API
    with the 14 categories in its prompt."""
    f = file.load(converted)
    assert f.family == "llama-guard-3-8b" and f.config == REDUCED and f.head_ids is None
    assert f.meta["quant"]["calibration"]["error_feedback"] is not None
    assert file.verify(converted) == len(f.meta["arrays"])
    guard = Guard.load(converted, threads=2, verify=True)
    conv = [{"role": "user", "content": "How do I run a shell command from this code interpreter?"}]
    assert "S14: Code Interpreter Abuse.\n<END UNSAFE CONTENT CATEGORIES>" in format_prompt(conv, family="llama-guard-3-8b")
    r = guard.classify(conv)
    assert r.verdict in ("safe", "unsafe") and 0 <= r.score <= 1
    assert set(r.categories) <= set(CATEGORIES["llama-guard-3-8b"])
    # the same verdict batched as alone, and with the policy prefix already cached
    assert [result_key(x) for x in guard.classify_many([conv, conv], batch_size=2)] == [result_key(r)] * 2


def test_engine_matches_transformers_at_head_dim_128(converted):
    """The engine on the converted file equals transformers holding the file's dequantized
    weights (4:1 grouped queries of 128 dimensions, untied int4 head), given the same int8
    rounding decisions."""
    f = file.load(converted)
    model = Model(f.config, f.tensors, f.head_ids, threads=2)
    ids = np.arange(1000, 1090)
    with oracle.linear_inputs() as inputs:
        got = model.logits(ids)
    ref = oracle.hf_model(REDUCED, calibrate.float_checkpoint(REDUCED, f.tensors, f.head_ids))
    with oracle.quantized_activations(ref, model, inputs):
        want = oracle.oracle_logits(ref, ids)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * want.std())


def test_cli_classifies(converted, tmp_path):
    """`pyguard verify` and `pyguard classify` on the file: exit 0 or 1 with a verdict, never 2."""
    run = lambda *a: subprocess.run([sys.executable, "-m", "pyguard.cli", *a], capture_output=True, text=True)  # noqa: E731
    v = run("verify", converted)
    assert v.returncode == 0, v.stderr
    c = run("classify", "-m", converted, "--json", "Write a script that deletes every file on the host.")
    assert c.returncode in (0, 1), c.stderr
    out = json.loads(c.stdout)
    assert (out["verdict"] == "unsafe") == (c.returncode == 1)


def test_converter_memory_does_not_grow_with_depth(tmp_path):
    """The whole conversion (calibration with error feedback, then the streamed writing) peaks
    at about the same traced allocation for 3 layers as for 9 (within 2 layers' float32 weights,
    as the error feedback's threads overlap differently from run to run; growing with the model
    would add 6): what the 8B needs is bounded by its layers' size, not their number (its own
    peak RSS, measured by the benchmark, is in docs/8B.md)."""
    def peak(layers: int) -> int:
        cfg = dataclasses.replace(REDUCED, n_layers=layers, vocab_size=2048)
        d = str(tmp_path / f"hf{layers}")
        checkpoint.write_checkpoint(d, cfg, max_shard_bytes=SHARD // 8)
        prompts = [list(range(1 + 7 * k, 100 + 7 * k)) for k in range(4)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no tokenizer: token ids only
            tracemalloc.start()
            try:
                convert(d, str(tmp_path / f"{layers}.pgw"), calibration=prompts, threads=2)
                return tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()

    shapes = expected_shapes(dataclasses.replace(REDUCED, n_layers=1))
    layer = sum(4 * int(np.prod(s)) for n, s in shapes.items() if n.startswith("model.layers.0."))
    shallow, deep = peak(3), peak(9)
    assert abs(deep - shallow) < 2 * layer, (shallow, deep, layer)
