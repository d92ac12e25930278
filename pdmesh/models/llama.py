"""Llama family (Llama-2/3.x, SmolLM2, Mistral-style dense): RMSNorm, rotary (incl. llama3 and
yarn scaling), GQA, SwiGLU; optional attention/MLP biases; tied embeddings supported."""

from __future__ import annotations

import torch

from pdmesh.models.arch import ModelArch
from pdmesh.models.transformer import CausalLM


def build(arch: ModelArch, dtype: torch.dtype) -> CausalLM:
    assert arch.architecture in ("LlamaForCausalLM", "MistralForCausalLM")
    assert not arch.qk_norm, "Llama has no q/k norm"
    return CausalLM(arch, dtype)
