"""The decoder stack every supported family shares, and HF-name weight loading into it.

Families (``llama.py``, ``qwen2.py``, ``qwen3.py``) differ only in the options their ``ModelArch``
sets (biases, q/k norm); they compose these parts rather than subclass them.
"""

from __future__ import annotations

from typing import Iterable, Optional, Protocol, runtime_checkable

import torch
from torch import nn

from pdmesh.models.arch import ModelArch
from pdmesh.models.layers import Attention, AttentionContext, BoundRotary, GatedMLP, RMSNorm, RotaryEmbedding


@runtime_checkable
class _Fusable(Protocol):
    """A module with a fused-kernel switch (``isinstance`` checks that it has ``fused``)."""

    fused: bool


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        self.self_attn = Attention(arch, layer_idx, dtype)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        self.mlp = GatedMLP(arch, dtype)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor], rope: BoundRotary,
                ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) -> (mlp output, residual); the residual stream is x + residual (HF's
        ``h = r + f(h)``, added by the next norm, fused with it on CUDA)."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        h = self.self_attn(h, rope, ctx)
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    def __init__(self, arch: ModelArch, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(arch, i, dtype) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)


# HF checkpoint names that land in a slice of one of our fused parameters: (ours, shard index).
_STACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class CausalLM(nn.Module):
    """A decoder-only LM over flat token batches.

    ``forward(input_ids [T] int64, positions [T] int64, ctx) -> hidden [T, hidden]``;
    ``compute_logits(hidden [N, hidden]) -> [N, vocab] float32``.
    Construct on the meta device, then ``materialize(device)`` and load weights.
    """

    def __init__(self, arch: ModelArch, dtype: torch.dtype) -> None:
        super().__init__()
        self.arch = arch
        self.dtype = dtype
        self.model = DecoderModel(arch, dtype)
        self.lm_head: Optional[nn.Linear] = None
        if not arch.tie_word_embeddings:
            self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False, dtype=dtype)
        self.rotary: Optional[RotaryEmbedding] = None

    def materialize(self, device: torch.device, max_len: int) -> None:
        """Allocate real (uninitialised) storage on ``device`` and build the rotary tables."""
        self.to_empty(device=device)
        self.rotary = RotaryEmbedding(self.arch, max_len, device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        assert self.rotary is not None, "materialize() first"
        x = self.model.embed_tokens(input_ids)
        rope = self.rotary.bind(positions, x.dtype)
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, residual, rope, ctx)
        assert residual is not None  # a model has at least one layer
        return self.model.norm.add_forward(x, residual)[0]

    def enable_fused_kernels(self) -> None:
        """Use FlashInfer's fused RMSNorm (+residual add), rope and SiLU*mul kernels, and Triton GEMVs for
        one-row projections (CUDA)."""
        assert self.rotary is not None and self.rotary.cos.is_cuda, "fused kernels need the model on CUDA"
        for m in self.modules():
            if isinstance(m, _Fusable):
                m.fused = True
        self.rotary.fused = True

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return torch.matmul(hidden, weight.t()).float()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors into our (partly fused) parameters; returns the names loaded.

        Raises KeyError for a tensor with no home, ValueError for a shape mismatch.
        """
        params = dict(self.named_parameters())
        arch = self.arch
        q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        split = {"qkv_proj": [q, kv, kv], "gate_up_proj": [arch.intermediate_size] * 2}
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue
            target, shard = name, None
            for hf, (ours, idx) in _STACKED.items():
                if f".{hf}." in name:
                    target, shard = name.replace(f".{hf}.", f".{ours}."), idx
                    break
            if target not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no matching parameter")
            param = params[target]
            if shard is None:
                dst = param.data
            else:
                sizes = split[target.split(".")[-2]]
                start = sum(sizes[:shard])
                dst = param.data.narrow(0, start, sizes[shard])
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != expected {tuple(dst.shape)}")
            dst.copy_(tensor.to(dst.dtype))
            loaded.add(name)
        return loaded

    def expected_weight_names(self) -> set[str]:
        """HF names a complete checkpoint must provide."""
        names: set[str] = set()
        for name, _ in self.named_parameters():
            if ".qkv_proj." in name:
                names.update(name.replace(".qkv_proj.", f".{p}.") for p in ("q_proj", "k_proj", "v_proj"))
            elif ".gate_up_proj." in name:
                names.update(name.replace(".gate_up_proj.", f".{p}.") for p in ("gate_proj", "up_proj"))
            else:
                names.add(name)
        return names
