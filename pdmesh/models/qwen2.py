"""Qwen2 / Qwen2.5 family: Llama's layout with a bias on the q/k/v projections (none on o)."""

from __future__ import annotations

import torch

from pdmesh.models.arch import ModelArch
from pdmesh.models.transformer import CausalLM


def build(arch: ModelArch, dtype: torch.dtype) -> CausalLM:
    assert arch.architecture == "Qwen2ForCausalLM"
    assert arch.qkv_bias and not arch.o_bias and not arch.qk_norm, "Qwen2: qkv bias, no o bias, no q/k norm"
    return CausalLM(arch, dtype)
