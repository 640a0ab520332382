"""Meta's Llama Guard 3-1B-INT4 `.pte` import (pyguard.convert.pte) against the ExecuTorch runtime.

Tiny random-weight checkpoints are exported with the 1B-INT4 recipe by ExecuTorch 1.5.1
(test-only dependency, tools/export_pte.py; about two minutes each, once per run), converted,
and run by both engines on the same token ids.

Tolerance: both engines run int4 weights (the same values and scales) on int8 activations
quantized per token with the same asymmetric recipe, in float32 otherwise. They differ in the
order of float sums and may round an activation to the neighbouring int8 step; one step is 1/255
of the row's range, so each of the 4 L + 1 quantized products on the way to a logit may move it
by about 1/255 of its scale: |pyguard - ExecuTorch| <= (4 L + 1) / 255 * max |logit|.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

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


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """exported(embedding_group) -> (Meta-layout directory, converted pyguard file), made once per run."""
    cache = {}

    def get(group: int):
        if group not in cache:
            d = tmp_path_factory.mktemp(f"pte{group}")
            export_pte.export(str(d), "tiny", embedding_group=group, max_seq_length=MAX_SEQ)
            shutil.rmtree(d / "src")
            out = d.parent / f"pte{group}.pgw"
            summary = pte.convert_pte(str(d), str(out))
            cache[group] = (d, out, summary)
        return cache[group]

    return get


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
