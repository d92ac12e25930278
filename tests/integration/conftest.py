"""Fixtures of the engine tests: a tiny random-weight Llama saved as a Hugging Face directory."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   initializer_range=0.3, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return str(path)
