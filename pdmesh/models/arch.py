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
    """HF architecture name, e.g. 'LlamaForCausalLM', 'Qwen2ForCausalLM', 'Qwen3ForCausalLM',
    'Qwen3MoeForCausalLM'."""
    vocab_size: int
    """Rows of the embedding and of the LM head."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the gated MLP (of the dense layers in a mixture-of-experts model)."""
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
    num_experts: int = 0
    """Routed experts per mixture-of-experts layer (0: a dense model)."""
    num_experts_per_tok: int = 0
    """Experts each token is routed to (top-k of the router's softmax)."""
    moe_intermediate_size: int = 0
    """Width of one expert's gated MLP."""
    norm_topk_prob: bool = False
    """Renormalise the top-k routing weights to sum to 1 (else: their softmax probabilities)."""
    decoder_sparse_step: int = 1
    """Layer ``i`` has experts when ``(i + 1) % decoder_sparse_step == 0`` (and it is not in
    ``mlp_only_layers``); the others have a dense MLP of ``intermediate_size``."""
    mlp_only_layers: tuple[int, ...] = ()
    """Layers that keep a dense MLP whatever ``decoder_sparse_step`` says."""
    eos_token_ids: tuple[int, ...] = ()
    """End-of-sequence ids from the config (the tokenizer may add more)."""
    bos_token_id: Optional[int] = None
    """Beginning-of-sequence id."""
    extra: dict = field(default_factory=dict, compare=False, hash=False)
    """The original config dict (for saving next to cached weights)."""

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` routes tokens to experts (HF Qwen3-MoE's rule)."""
        return (self.num_experts > 0 and layer_idx not in self.mlp_only_layers
                and (layer_idx + 1) % self.decoder_sparse_step == 0)

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_layers))

    def num_parameters(self, active: bool = False) -> int:
        """Weights of the model: embedding, LM head (unless tied), each layer's projections,
        biases and norms (and router and experts), and the final norm.  ``active``: only the
        experts one token is routed to (``num_experts_per_tok`` of them) count."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv) * self.qkv_bias + h * self.o_bias
        mlp = 3 * h * self.intermediate_size + (2 * self.intermediate_size + h) * self.mlp_bias
        experts = self.num_experts_per_tok if active else self.num_experts
        moe = self.num_experts * h + experts * 3 * h * self.moe_intermediate_size
        norms = 2 * h + 2 * self.head_dim * self.qk_norm
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        sparse = self.num_moe_layers
        return embed + self.num_layers * (attn + norms) + (self.num_layers - sparse) * mlp + sparse * moe + h

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
        "qwen3_moe": "Qwen3MoeForCausalLM",
    }.get(model_type, "")
    if name not in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM", "Qwen3MoeForCausalLM"):
        raise ValueError(f"unsupported architecture {name or model_type!r}; supported: Llama, Qwen2, Qwen3, Qwen3-MoE")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    theta, scaling = _rope(cfg)
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    is_qwen2 = name == "Qwen2ForCausalLM"
    is_qwen3 = name in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
    moe = _moe_fields(cfg) if name == "Qwen3MoeForCausalLM" else {}
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
        **moe,
    )


def _moe_fields(cfg: dict) -> dict:
    """Qwen3-MoE's expert fields (``num_experts``, or transformers 5's ``num_local_experts``);
    ValueError for values the model cannot have."""
    experts = int(cfg.get("num_experts", cfg.get("num_local_experts", 0)) or 0)
    top_k = int(cfg.get("num_experts_per_tok", 0) or 0)
    if experts < 1 or not 1 <= top_k <= experts:
        raise ValueError(f"Qwen3-MoE: num_experts {experts} and num_experts_per_tok {top_k}: need 1 <= top-k <= experts")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"Qwen3-MoE: hidden_act {act!r} is not supported (silu)")
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    return dict(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=int(cfg["moe_intermediate_size"]),
                norm_topk_prob=bool(cfg.get("norm_topk_prob", False)), decoder_sparse_step=step,
                mlp_only_layers=tuple(sorted(int(i) for i in cfg.get("mlp_only_layers") or ())))


def load_hf_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json")
    return json.loads(path.read_text())
