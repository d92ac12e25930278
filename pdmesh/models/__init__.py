"""Model families and the registry from HF architecture names to builders.

Every family is the one ``CausalLM`` (pdmesh.models.transformer) configured by its ``ModelArch``;
a family only states what its architecture must look like:

* Llama (Llama-2/3.x, SmolLM2, Mistral-style dense): RMSNorm, rotary (incl. llama3 and yarn
  scaling), GQA, SwiGLU; optional attention/MLP biases; tied embeddings supported; no q/k norm.
* Qwen2 / Qwen2.5: Llama's layout with a bias on the q/k/v projections (none on o).
* Qwen3 dense: per-head RMSNorm on q and k before rotary, no q/k/v bias by default.
* Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention; its sparse layers route each
  token to ``num_experts_per_tok`` of ``num_experts`` gated-MLP experts (``pdmesh.models.moe``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from pdmesh.distributed.group import TPGroup
from pdmesh.kv.shards import tp_error
from pdmesh.models.arch import ModelArch, arch_from_hf_config
from pdmesh.models.moe import expert_split_error
from pdmesh.models.transformer import CausalLM


def _llama(arch: ModelArch) -> None:
    if arch.qk_norm:
        raise ValueError("Llama has no q/k norm")


def _qwen2(arch: ModelArch) -> None:
    if not arch.qkv_bias or arch.o_bias or arch.qk_norm:
        raise ValueError("Qwen2: qkv bias, no o bias, no q/k norm")


def _qwen3(arch: ModelArch) -> None:
    if not arch.qk_norm:
        raise ValueError("Qwen3 normalises q and k per head")


def _qwen3_moe(arch: ModelArch) -> None:
    _qwen3(arch)
    if not 1 <= arch.num_experts_per_tok <= arch.num_experts or arch.moe_intermediate_size < 1:
        raise ValueError("Qwen3-MoE needs experts: 1 <= num_experts_per_tok <= num_experts, moe_intermediate_size >= 1")


REGISTRY: dict[str, Callable[[ModelArch], None]] = {
    "LlamaForCausalLM": _llama,
    "MistralForCausalLM": _llama,
    "Qwen2ForCausalLM": _qwen2,
    "Qwen3ForCausalLM": _qwen3,
    "Qwen3MoeForCausalLM": _qwen3_moe,
}
"""Supported HF architecture names -> the check their ModelArch must pass."""


def check_tensor_parallel(arch: ModelArch, tp: int, expert_parallel: bool = False) -> None:
    """ValueError naming --tensor-parallel-size (or --enable-expert-parallel) when the model does
    not split over ``tp`` ranks."""
    dense = arch.num_layers > arch.num_moe_layers
    err = tp_error(arch.num_heads, arch.num_kv_heads, arch.intermediate_size if dense else 0, tp)
    err = err or expert_split_error(arch, tp, expert_parallel)
    if err:
        raise ValueError(err)


def build_model(arch: ModelArch, dtype: torch.dtype, tp: Optional[TPGroup] = None,
                expert_parallel: bool = False) -> CausalLM:
    """Build on the meta device (this rank's shard under ``tp``; whole experts per rank with
    ``expert_parallel``); the caller materializes and loads weights."""
    try:
        check = REGISTRY[arch.architecture]
    except KeyError:
        raise ValueError(f"unsupported architecture {arch.architecture!r}") from None
    check(arch)
    check_tensor_parallel(arch, tp.size if tp is not None else 1, expert_parallel)
    with torch.device("meta"):
        return CausalLM(arch, dtype, tp, expert_parallel)


__all__ = ["ModelArch", "CausalLM", "arch_from_hf_config", "build_model", "check_tensor_parallel", "REGISTRY"]
