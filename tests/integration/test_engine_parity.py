"""Parity with Hugging Face transformers (fp32, CPU): last-position logits and 32-token greedy
continuations, for the real SmolLM2-135M GGUF and random Llama / Qwen2 / Qwen3 models.

Tolerance: last-position logits within 2e-3 absolute (fp32; both sides differ only in op order).
"""

from __future__ import annotations

import pytest
import torch

from pdmesh.engine import LLM, SamplingParams

LOGIT_ATOL = 2e-3

RANDOM_CONFIGS = {
    # llama3 rope scaling, GQA 4:2, head_dim 16
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rope_theta=10000.0,
                                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                                  tie_word_embeddings=False)),
    # qkv bias, tied embeddings, head_dim 32
    "qwen2": ("Qwen2Config", dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=1, max_position_embeddings=512, rope_theta=1000000.0,
                                  tie_word_embeddings=True)),
    # q/k norm, head_dim 32 with hidden 64 and 4 heads (head_dim != hidden/heads)
    "qwen3": ("Qwen3Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=32, max_position_embeddings=512, rope_theta=1000000.0,
                                  tie_word_embeddings=False)),
}

PROMPTS_IDS = [[5, 17, 42, 7, 99, 3], [1, 2, 3], list(range(10, 80)), [200, 201, 5, 5, 5, 9, 250, 31], [77]]


def build_random_hf(kind: str, tmp_path_factory):
    import transformers

    cls_name, kw = RANDOM_CONFIGS[kind]
    cfg = getattr(transformers, cls_name)(vocab_size=256, rms_norm_eps=1e-6, initializer_range=0.3,
                                          bos_token_id=None, eos_token_id=None, pad_token_id=None, **kw)
    torch.manual_seed({"llama": 1, "qwen2": 2, "qwen3": 3}[kind])
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    path = tmp_path_factory.mktemp(f"hf-{kind}")
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module", params=sorted(RANDOM_CONFIGS))
def random_pair(request, tmp_path_factory):
    hf, path = build_random_hf(request.param, tmp_path_factory)
    llm = LLM(model=str(path), device="cpu", block_size=8, num_kv_blocks=256)
    return request.param, hf, llm


def hf_greedy(hf, ids, n=32):
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def assert_logits_match_hf(kind: str, hf, llm) -> None:
    """Last-position logits of every prompt in PROMPTS_IDS within LOGIT_ATOL of transformers'."""
    for ids in PROMPTS_IDS:
        ours = llm.engine.score(ids)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0, -1].float()
        assert torch.allclose(ours, ref, atol=LOGIT_ATOL, rtol=0), f"{kind}: max diff {(ours - ref).abs().max()}"


def test_random_models_logits_match_hf(random_pair):
    assert_logits_match_hf(*random_pair)


def test_random_models_greedy_32_match_hf(random_pair):
    kind, hf, llm = random_pair
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    ours = llm.generate(PROMPTS_IDS, params, detokenize=False)
    for ids, res in zip(PROMPTS_IDS, ours):
        assert res.outputs[0].token_ids == hf_greedy(hf, ids), kind


# ---------------------------------------------------------------------- real weights (GGUF)
CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three colors.",
    "Explain gravity in one sentence.",
    "What is 12 times 7?",
]


@pytest.fixture(scope="module")
def smol_llm(embedded_dir):
    return LLM(device="cpu", block_size=16, num_kv_blocks=512)


def test_smollm2_gguf_logits_match_hf(smol_hf, smol_llm):
    tok = smol_llm.tokenizer
    for q in CHATS[:3]:
        ids = tok.apply_chat_template([{"role": "user", "content": q}])
        ours = smol_llm.engine.score(ids)
        with torch.no_grad():
            ref = smol_hf(torch.tensor([ids])).logits[0, -1].float()
        assert torch.allclose(ours, ref, atol=LOGIT_ATOL, rtol=0), f"max diff {(ours - ref).abs().max()}"


def test_smollm2_gguf_greedy_32_match_hf(smol_hf, smol_llm):
    tok = smol_llm.tokenizer
    convs = [[{"role": "user", "content": q}] for q in CHATS]
    ours = smol_llm.chat(convs, SamplingParams(temperature=0, max_tokens=32))
    for conv, res in zip(convs, ours):
        ids = tok.apply_chat_template(conv)
        ref = smol_hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
        assert res.outputs[0].token_ids == ref
        assert res.outputs[0].text == tok.decode(ref)
