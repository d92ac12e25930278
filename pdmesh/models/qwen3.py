"""Qwen3 dense family: per-head RMSNorm on q and k before rotary, no q/k/v bias by default."""

from __future__ import annotations

import torch

from pdmesh.models.arch import ModelArch
from pdmesh.models.transformer import CausalLM


def build(arch: ModelArch, dtype: torch.dtype) -> CausalLM:
    assert arch.architecture == "Qwen3ForCausalLM"
    assert arch.qk_norm, "Qwen3 normalises q and k per head"
    return CausalLM(arch, dtype)
