"""Model families and the registry from HF architecture names to builders.

Every family is the one ``CausalLM`` (pdmesh.models.transformer) configured by its ``ModelArch``;
a family only states what its architecture must look like:

* Llama (Llama-2/3.x, SmolLM2, Mistral-style dense): RMSNorm, rotary (incl. llama3 and yarn
  scaling), GQA, SwiGLU; optional attention/MLP biases; tied embeddings supported; no q/k norm.
* Qwen2 / Qwen2.5: Llama's layout with a bias on the q/k/v projections (none on o).
* Qwen3 dense: per-head RMSNorm on q and k before rotary, no q/k/v bias by default.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from pdmesh.distributed.group import TPGroup
from pdmesh.kv.shards import tp_error
from pdmesh.models.arch import ModelArch, arch_from_hf_config
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


REGISTRY: dict[str, Callable[[ModelArch], None]] = {
    "LlamaForCausalLM": _llama,
    "MistralForCausalLM": _llama,
    "Qwen2ForCausalLM": _qwen2,
    "Qwen3ForCausalLM": _qwen3,
}
"""Supported HF architecture names -> the check their ModelArch must pass."""


def check_tensor_parallel(arch: ModelArch, tp: int) -> None:
    """ValueError naming --tensor-parallel-size when the model does not split over ``tp`` ranks."""
    err = tp_error(arch.num_heads, arch.num_kv_heads, arch.intermediate_size, tp)
    if err:
        raise ValueError(err)


def build_model(arch: ModelArch, dtype: torch.dtype, tp: Optional[TPGroup] = None) -> CausalLM:
    """Build on the meta device (this rank's shard under ``tp``); the caller materializes and loads weights."""
    try:
        check = REGISTRY[arch.architecture]
    except KeyError:
        raise ValueError(f"unsupported architecture {arch.architecture!r}") from None
    check(arch)
    if tp is not None:
        check_tensor_parallel(arch, tp.size)
    with torch.device("meta"):
        return CausalLM(arch, dtype, tp)


__all__ = ["ModelArch", "CausalLM", "arch_from_hf_config", "build_model", "check_tensor_parallel", "REGISTRY"]
