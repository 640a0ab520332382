"""Model geometry from a Hugging Face `config.json`, and the tensors pyguard makes of a checkpoint."""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from ..errors import PyguardError

# Llama Guard prompt families a file may record (guard/prompt.py has their templates)
FAMILIES = ("llama-guard-3-1b", "llama-guard-3-8b", "llama-guard-2")


# Hard bounds, far above any Llama (Llama 3 405B: 126 layers, dim 16384, vocabulary 128256),
# so that a hostile file or config fails before anything is allocated or computed.
MAX_LAYERS = 1024
MAX_DIM = 1 << 20  # dim, head dims, hidden size
MAX_VOCAB = 1 << 22
MAX_SEQ_LEN = 1 << 20
SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class ModelConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama 3 scaling: {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    rope_scaling: dict | None = field(default=None, hash=False)
    max_seq_len: int = 8192
    tie_embeddings: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "ModelConfig":
        """The inverse of to_dict, validated: unknown or missing fields and wrong types raise PyguardError."""
        if not isinstance(d, dict):
            raise PyguardError(f"config: not an object but {type(d).__name__}")
        names = {f.name: f.default is MISSING for f in fields(cls)}  # name: required?
        unknown = [k for k in d if k not in names]
        missing = [k for k, required in names.items() if required and k not in d]
        if unknown or missing:
            raise PyguardError(f"config: unknown field {unknown[0]!r:.40}" if unknown else f"config: missing field {missing[0]}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    @classmethod
    def from_hf(cls, hf: Any) -> "ModelConfig":
        """Parse a LlamaForCausalLM config.json (older rope_theta/rope_scaling or newer rope_parameters)."""
        if not isinstance(hf, dict):
            raise PyguardError("config.json: not a JSON object")
        arch, model_type = hf.get("architectures") or [], hf.get("model_type")
        if not isinstance(arch, list) or not all(isinstance(a, str) for a in arch):
            raise PyguardError(f"config.json: architectures must be a list of names, not {arch!r:.80}")
        if model_type != "llama" and "LlamaForCausalLM" not in arch:
            raise PyguardError(f"config.json describes {arch or model_type!r:.80}, not a Llama decoder (LlamaForCausalLM)")
        rope = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling")
        if not isinstance(rope, dict):
            raise PyguardError("config.json: rope_parameters must be an object")
        if "hidden_size" not in hf or "num_attention_heads" not in hf:
            raise PyguardError("config.json: missing field hidden_size or num_attention_heads")
        dim, heads = hf["hidden_size"], hf["num_attention_heads"]
        head_dim = hf.get("head_dim")
        if head_dim is None:  # implied: the heads split the model dimension
            if type(dim) is not int or type(heads) is not int or heads < 1:
                raise PyguardError(f"config.json: hidden_size and num_attention_heads must be positive integers, not {dim!r:.40}, {heads!r:.40}")
            if dim % heads:
                raise PyguardError(f"config.json: hidden_size {dim} is not divisible by num_attention_heads {heads}")
            head_dim = dim // heads
        if scaling is None and rope.get("rope_type", "default") != "default":
            scaling = rope
        try:
            scaling = _llama3_scaling(scaling)
        except PyguardError as e:
            raise PyguardError(f"config.json: {e}") from None
        missing = [k for k in ("num_hidden_layers", "intermediate_size", "vocab_size") if k not in hf]
        if missing:
            raise PyguardError(f"config.json: missing field {missing[0]}")
        cfg = cls(
            dim=dim,
            n_layers=hf["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=_get(hf, "num_key_value_heads", heads),
            head_dim=head_dim,
            hidden_dim=hf["intermediate_size"],
            vocab_size=hf["vocab_size"],
            norm_eps=_get(hf, "rms_norm_eps", 1e-5),
            rope_theta=_get(rope, "rope_theta", _get(hf, "rope_theta", 10000.0)),
            rope_scaling=scaling,
            max_seq_len=_get(hf, "max_position_embeddings", 8192),
            tie_embeddings=_get(hf, "tie_word_embeddings", False),
        )
        cfg._validate("config.json", HF_NAMES)
        return cfg

    def validate(self) -> None:
        """Types, bounds and consistency of every field: one PyguardError naming the field."""
        self._validate("config", {})

    def _validate(self, where: str, names: dict[str, str]) -> None:
        def check_int(name: str, lo: int, hi: int) -> None:
            v = getattr(self, name)
            if type(v) is not int or not lo <= v <= hi:  # type(): bool is an int subclass, and no floats
                raise PyguardError(f"{where}: {names.get(name, name)} must be an integer in {lo}..{hi}, not {v!r:.40}")

        def check_float(name: str, v: Any) -> None:  # finite and positive; an int will do, a bool will not
            if type(v) not in (int, float) or not 0 < v < math.inf:
                raise PyguardError(f"{where}: {names.get(name, name)} must be a finite positive number, not {v!r:.40}")

        for name in ("dim", "n_heads", "head_dim", "hidden_dim"):
            check_int(name, 1, MAX_DIM)
        check_int("n_layers", 1, MAX_LAYERS)
        check_int("n_kv_heads", 1, self.n_heads)
        check_int("vocab_size", 1, MAX_VOCAB)
        check_int("max_seq_len", 1, MAX_SEQ_LEN)
        check_float("norm_eps", self.norm_eps)
        check_float("rope_theta", self.rope_theta)
        if type(self.tie_embeddings) is not bool:
            raise PyguardError(f"{where}: {names.get('tie_embeddings', 'tie_embeddings')} must be true or false, not {self.tie_embeddings!r:.40}")
        if self.n_heads * self.head_dim > MAX_DIM:
            raise PyguardError(f"{where}: {self.n_heads} heads of {self.head_dim} exceed {MAX_DIM} dimensions")
        if self.n_heads % self.n_kv_heads:
            raise PyguardError(f"{where}: {self.n_heads} heads is not a multiple of {self.n_kv_heads} key/value heads")
        if self.head_dim % 2:
            raise PyguardError(f"{where}: head dimension {self.head_dim} must be even for rotary embeddings")
        s = self.rope_scaling
        if s is None:
            return
        if not isinstance(s, dict) or sorted(s) != sorted(SCALING_KEYS):
            raise PyguardError(f"{where}: rope_scaling must hold exactly {', '.join(SCALING_KEYS)}")
        for k in SCALING_KEYS[:3]:
            check_float(f"rope_scaling.{k}", s[k])
        old_len = s["original_max_position_embeddings"]
        if type(old_len) is not int or not 1 <= old_len <= MAX_SEQ_LEN:
            raise PyguardError(f"{where}: rope_scaling.original_max_position_embeddings must be an integer in 1..{MAX_SEQ_LEN}")
        if s["low_freq_factor"] >= s["high_freq_factor"]:  # the ramp between them divides by their difference
            raise PyguardError(f"{where}: rope_scaling low_freq_factor must be below high_freq_factor")


# config.json's names of the fields, for error messages
HF_NAMES = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
            "n_kv_heads": "num_key_value_heads", "hidden_dim": "intermediate_size", "norm_eps": "rms_norm_eps",
            "max_seq_len": "max_position_embeddings", "tie_embeddings": "tie_word_embeddings"}


def _get(d: dict, key: str, default: Any) -> Any:
    """d[key], or default when absent or null (as Hugging Face reads it)."""
    v = d.get(key)
    return default if v is None else v


def _llama3_scaling(s: Any) -> dict | None:
    if not s:
        return None
    if not isinstance(s, dict):
        raise PyguardError(f"rope_scaling must be an object, not {s!r:.40}")
    kind = s.get("rope_type", s.get("type"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise PyguardError(f"rope scaling {kind!r:.40} not supported (only 'llama3')")
    missing = [k for k in SCALING_KEYS if k not in s]
    if missing:
        raise PyguardError(f"rope_scaling lacks {missing[0]}")
    return {k: s[k] for k in SCALING_KEYS}  # types are checked by validate


def tensor_plan(cfg: ModelConfig) -> list[tuple[str, list[str], bool]]:
    """(pyguard name, Hugging Face tensors stacked by rows, quantized?) for every tensor of the file.

    q/k/v are stacked into one `wqkv` and gate/up into one `w13` so that a layer needs three
    matrix products instead of six. The output head `output` comes last (the converter may
    prune its rows); with tied embeddings it is made from `model.embed_tokens.weight`.
    """
    plan: list[tuple[str, list[str], bool]] = [("tok_embeddings", ["model.embed_tokens.weight"], True)]
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        plan += [
            (f"layers.{i}.attention_norm", [p + "input_layernorm.weight"], False),
            (f"layers.{i}.wqkv", [p + f"self_attn.{x}_proj.weight" for x in "qkv"], True),
            (f"layers.{i}.wo", [p + "self_attn.o_proj.weight"], True),
            (f"layers.{i}.ffn_norm", [p + "post_attention_layernorm.weight"], False),
            (f"layers.{i}.w13", [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"], True),
            (f"layers.{i}.w2", [p + "mlp.down_proj.weight"], True),
        ]
    plan.append(("norm", ["model.norm.weight"], False))
    plan.append(("output", ["model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"], True))
    return plan


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every Hugging Face tensor the architecture needs."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.dim), "model.norm.weight": (cfg.dim,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.dim)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (cfg.dim,),
            p + "post_attention_layernorm.weight": (cfg.dim,),
            p + "self_attn.q_proj.weight": (q, cfg.dim),
            p + "self_attn.k_proj.weight": (kv, cfg.dim),
            p + "self_attn.v_proj.weight": (kv, cfg.dim),
            p + "self_attn.o_proj.weight": (cfg.dim, q),
            p + "mlp.gate_proj.weight": (cfg.hidden_dim, cfg.dim),
            p + "mlp.up_proj.weight": (cfg.hidden_dim, cfg.dim),
            p + "mlp.down_proj.weight": (cfg.dim, cfg.hidden_dim),
        })
    return shapes
