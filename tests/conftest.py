"""Shared fixtures. The embedded model is dequantized once (cached as safetensors under
PDMESH_CACHE_DIR) and reused by every test and every mesh process."""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    """Options of the fault suite (tests/faults), declared here so that any run accepts them."""
    parser.addoption("--soak-seconds", type=float, default=45.0, help="length of the fault suite's soak run")
    parser.addoption("--fault-report", default=None,
                     help="where the fault suite writes its figures (default: the run's temporary directory)")
    parser.addoption("--security-report", default=None,
                     help="where the security suite (tests/security) writes its figures (default: the run's temporary directory)")
    parser.addoption(
        "--deploy", choices=("auto", "require"), default="auto",
        help="tests/deploy (builds the CPU image and runs the compose stack with podman): 'auto' skips it, "
             "naming what is missing, on a host without podman & co; 'require' fails instead (.ci/run sets it "
             "through PYTEST_ADDOPTS, after installing them)")


@pytest.fixture(scope="session")
def embedded_dir():
    from pdmesh.models.loader import embedded_gguf_path, gguf_to_hf_dir

    return gguf_to_hf_dir(embedded_gguf_path())


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from pdmesh.tokenizer import Tokenizer

    return Tokenizer(str(embedded_dir))


@pytest.fixture(scope="session")
def smol_hf():
    """transformers' own model, dequantized from the same GGUF file (the reference)."""
    import torch
    from transformers import AutoModelForCausalLM

    from pdmesh.models.loader import embedded_gguf_path

    gguf = embedded_gguf_path()
    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> str:
    """A random Qwen3 saved as a Hugging Face directory, on the embedded tokenizer's vocabulary (49152)
    and small enough for meshes of tensor-parallel workers on CPU: 4 attention heads and 2 KV heads
    (one per rank at TP 2), hidden 64, 2 layers."""
    import torch
    import transformers

    cfg = transformers.Qwen3Config(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                                   initializer_range=0.3, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                                   pad_token_id=None)
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("tiny-qwen3")
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_qwen3_moe(tmp_path_factory) -> str:
    """A random Qwen3-MoE saved as a Hugging Face directory on the embedded tokenizer's vocabulary:
    layers 0 and 2 sparse (8 experts of width 32, top-2 renormalised), layer 1 dense
    (``mlp_only_layers``); 4 attention heads, 2 KV heads, hidden 64 — splits over 2 ranks both by
    expert width and by whole experts."""
    import torch
    import transformers

    cfg = transformers.Qwen3MoeConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                      num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                                      mlp_only_layers=[1], num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                                      initializer_range=0.3, tie_word_embeddings=False, bos_token_id=None,
                                      eos_token_id=None, pad_token_id=None)
    torch.manual_seed(8)
    path = tmp_path_factory.mktemp("tiny-qwen3-moe")
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    return str(path)
