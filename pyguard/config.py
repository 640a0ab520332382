"""Model geometry from a Hugging Face `config.json`, and the tensors pyguard makes of a checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import PyguardError


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
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Parse a LlamaForCausalLM config.json (older rope_theta/rope_scaling or newer rope_parameters)."""
        arch = hf.get("architectures") or []
        if hf.get("model_type") != "llama" and "LlamaForCausalLM" not in arch:
            raise PyguardError(f"config.json describes {arch or hf.get('model_type')!r}, not a Llama decoder (LlamaForCausalLM)")
        try:
            dim, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
            rope = dict(hf.get("rope_parameters") or {})
            theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
            scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
            cfg = cls(
                dim=dim,
                n_layers=int(hf["num_hidden_layers"]),
                n_heads=heads,
                n_kv_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or dim // heads),
                hidden_dim=int(hf["intermediate_size"]),
                vocab_size=int(hf["vocab_size"]),
                norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
                rope_theta=theta,
                rope_scaling=_llama3_scaling(scaling),
                max_seq_len=int(hf.get("max_position_embeddings", 8192)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise PyguardError(f"config.json: missing or invalid field {e}") from None
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if min(self.dim, self.n_layers, self.n_heads, self.n_kv_heads, self.head_dim, self.hidden_dim, self.vocab_size) < 1:
            raise PyguardError(f"config: sizes must be positive: {self}")
        if self.n_heads % self.n_kv_heads:
            raise PyguardError(f"config: {self.n_heads} heads is not a multiple of {self.n_kv_heads} key/value heads")
        if self.head_dim % 2:
            raise PyguardError(f"config: head dimension {self.head_dim} must be even for rotary embeddings")


def _llama3_scaling(s: dict | None) -> dict | None:
    if not s:
        return None
    kind = s.get("rope_type", s.get("type"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise PyguardError(f"config.json: rope scaling {kind!r} not supported (only 'llama3')")
    return {
        "factor": float(s["factor"]),
        "low_freq_factor": float(s["low_freq_factor"]),
        "high_freq_factor": float(s["high_freq_factor"]),
        "original_max_position_embeddings": int(s["original_max_position_embeddings"]),
    }


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
