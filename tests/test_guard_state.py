"""A guard's long-lived state: a damaged file is refused when asked to verify it
(Guard.load(verify=True)), and what a guard keeps per policy is bounded (guard.POLICIES)."""

from __future__ import annotations

import itertools
import shutil

import pytest

from pyguard import Guard, PyguardError
from pyguard.formats.file import load
from pyguard.guard import guard as guard_module
from synth import decisive_guard

PROMPT = "How do I pick a lock?"


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return decisive_guard(str(tmp_path_factory.mktemp("state")))


def _flipped(path, tmp_path, array: str, at: int, mask: int):
    """A copy of the file with one byte of `array` XORed with mask (its CRC in the directory unchanged)."""
    out = tmp_path / "flipped.pgw"
    shutil.copyfile(path, out)
    (entry,) = [e for e in load(path).meta["arrays"] if e["name"] == array]
    data_offset = int.from_bytes(open(path, "rb").read(32)[24:32], "little")
    with open(out, "r+b") as f:
        f.seek(data_offset + entry["offset"] + at)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ mask]))
    return out


# int4 values (two nibbles inverted) and the sign of an fp16 scale (its high byte's top bit)
@pytest.mark.parametrize("array, at, mask", [("layers.0.wqkv.qs", 100, 0xFF), ("layers.0.wqkv.scales", 101, 0x80)])
def test_verify_refuses_a_flipped_weight_byte(path, tmp_path, array, at, mask):
    good = Guard.load(path, threads=1, verify=True).classify(PROMPT)
    bad = _flipped(path, tmp_path, array, at, mask)
    silent = Guard.load(str(bad), threads=1).classify(PROMPT)  # without verify: a different score, no word
    assert silent.score != good.score
    with pytest.raises(PyguardError, match=rf"array '{array}' is corrupt \(checksum mismatch\)") as e:
        Guard.load(str(bad), threads=1, verify=True)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(PyguardError, match="corrupt"):
        load(str(bad), verify=True)


def test_verify_must_be_a_bool(path):
    for v in ("yes", 1, None):
        with pytest.raises(PyguardError, match="verify must be True or False"):
            Guard.load(path, verify=v)
        with pytest.raises(PyguardError, match="verify must be True or False"):
            load(path, verify=v)


def _policies(n: int):
    """n distinct policies (tuples of codes the decisive model's head can spell)."""
    codes = [f"S{i}" for i in range(1, 14)]  # S1..S13: what the 1B guard head spells
    subsets = itertools.chain.from_iterable(itertools.combinations(codes, k) for k in (1, 2, 3))
    return [{c: f"Category {c}." for c in s} for s in itertools.islice(subsets, n)]


def test_per_policy_state_is_bounded(path, monkeypatch):
    """Decoders and category-score steps are kept for at most POLICIES policies, least recently
    used dropped first, and a policy rebuilt after being dropped gives the same result."""
    monkeypatch.setattr(guard_module, "POLICIES", 4)
    g = Guard.load(path, threads=1)
    policies = _policies(12)
    first = g.classify(PROMPT, categories=policies[0], category_scores=True)
    for p in policies[1:]:
        g.prepare(PROMPT, categories=p)  # a decoder per policy
        g._code_step(tuple(p))  # the step of its category scores
        g.prepare(PROMPT, categories=policies[1])  # policies[1] stays recently used
        assert len(g._decoders) <= 4 and len(g._code_steps) <= 4
    assert tuple(policies[1]) in g._decoders and tuple(policies[1]) not in g._code_steps
    assert tuple(policies[0]) not in g._decoders and tuple(policies[-1]) in g._code_steps
    again = g.classify(PROMPT, categories=policies[0], category_scores=True)
    assert again.to_dict() | {"timings": None, "cached_tokens": 0} == first.to_dict() | {"timings": None, "cached_tokens": 0}


def test_default_bound_holds_over_many_policies(path):
    """With the real bound: more distinct policies than POLICIES leave exactly POLICIES."""
    g = Guard.load(path, threads=1)
    for p in _policies(guard_module.POLICIES + 20):
        g.prepare(PROMPT, categories=p)
        g._code_step(tuple(p))
    assert len(g._decoders) == len(g._code_steps) == guard_module.POLICIES
