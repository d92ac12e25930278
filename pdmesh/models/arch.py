"""``ModelArch``: the shapes and options of a decoder-only model, read from a HF config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


@dataclass(frozen=True)
class ModelArch:
    """Everything the model code needs to know about a model's architecture."""

    architecture: str
    """HF architecture name, e.g. 'LlamaForCausalLM', 'Qwen2ForCausalLM', 'Qwen3ForCausalLM'."""
    vocab_size: int
    """Rows of the embedding and of the LM head."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the gated MLP."""
    num_layers: int
    """Decoder layers."""
    num_heads: int
    """Query heads."""
    num_kv_heads: int
    """Key/value heads (GQA when fewer than query heads)."""
    head_dim: int
    """Width of one attention head."""
    rms_norm_eps: float
    """Epsilon of every RMSNorm."""
    rope_theta: float
    """Rotary base."""
    max_position_embeddings: int
    """Longest sequence the model was trained for (after rope scaling)."""
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    """Rope-scaling parameters as sorted (key, value) pairs: rope_type/type, factor, ..."""
    tie_word_embeddings: bool = False
    """LM head shares the embedding matrix."""
    qkv_bias: bool = False
    """q/k/v projections carry a bias (Qwen2; Llama's attention_bias)."""
    o_bias: bool = False
    """The output projection carries a bias (Llama's attention_bias)."""
    mlp_bias: bool = False
    """MLP projections carry a bias (Llama's mlp_bias)."""
    qk_norm: bool = False
    """Per-head RMSNorm of q and k before rotary (Qwen3)."""
    eos_token_ids: tuple[int, ...] = ()
    """End-of-sequence ids from the config (the tokenizer may add more)."""
    bos_token_id: Optional[int] = None
    """Beginning-of-sequence id."""
    extra: dict = field(default_factory=dict, compare=False, hash=False)
    """The original config dict (for saving next to cached weights)."""

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling)

    def num_parameters(self) -> int:
        """Weights of the model: embedding, LM head (unless tied), each layer's projections,
        biases and norms, and the final norm."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv) * self.qkv_bias + h * self.o_bias
        mlp = 3 * h * self.intermediate_size + (2 * self.intermediate_size + h) * self.mlp_bias
        norms = 2 * h + 2 * self.head_dim * self.qk_norm
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return embed + self.num_layers * (attn + mlp + norms) + h

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V for one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


def _rope(cfg: dict) -> tuple[float, dict]:
    """(theta, scaling) from either the classic keys or transformers 5's ``rope_parameters``."""
    params = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = dict(cfg.get("rope_scaling") or {})
    if not scaling and params:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        scaling = {}
    else:
        scaling["rope_type"] = kind
        scaling.pop("type", None)
    return float(theta), scaling


def arch_from_hf_config(cfg: dict) -> ModelArch:
    """Translate a HF config dict; raises ValueError for unsupported architectures."""
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type", "")
    name = archs[0] if archs else {
        "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
    }.get(model_type, "")
    if name not in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"):
        raise ValueError(f"unsupported architecture {name or model_type!r}; supported: Llama, Qwen2, Qwen3")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    theta, scaling = _rope(cfg)
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    is_qwen2 = name == "Qwen2ForCausalLM"
    is_qwen3 = name == "Qwen3ForCausalLM"
    attention_bias = bool(cfg.get("attention_bias", False))
    return ModelArch(
        architecture=name,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        rope_scaling=tuple(sorted(scaling.items())),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=True if is_qwen2 else attention_bias,
        o_bias=False if is_qwen2 else attention_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=is_qwen3,
        eos_token_ids=eos_ids,
        bos_token_id=cfg.get("bos_token_id"),
        extra=dict(cfg),
    )


def load_hf_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json")
    return json.loads(path.read_text())
