"""Model families and the registry from HF architecture names to builders."""

from __future__ import annotations

from typing import Callable

import torch

from pdmesh.models import llama, qwen2, qwen3
from pdmesh.models.arch import ModelArch, arch_from_hf_config
from pdmesh.models.transformer import CausalLM

REGISTRY: dict[str, Callable[[ModelArch, torch.dtype], CausalLM]] = {
    "LlamaForCausalLM": llama.build,
    "MistralForCausalLM": llama.build,
    "Qwen2ForCausalLM": qwen2.build,
    "Qwen3ForCausalLM": qwen3.build,
}


def build_model(arch: ModelArch, dtype: torch.dtype) -> CausalLM:
    """Build on the meta device; the caller materializes and loads weights."""
    try:
        builder = REGISTRY[arch.architecture]
    except KeyError:
        raise ValueError(f"unsupported architecture {arch.architecture!r}") from None
    with torch.device("meta"):
        return builder(arch, dtype)


__all__ = ["ModelArch", "CausalLM", "arch_from_hf_config", "build_model", "REGISTRY"]
