"""Qwen3-MoE against transformers' ``Qwen3MoeForCausalLM`` (fp32, CPU) on random checkpoints built
here: last-position logits and 32-token greedy continuations, batched, with chunked prefill, with
prefix-cache hits and split between a prefill and a decode engine; the two routing variants
(``norm_topk_prob``) and dense layers among the sparse ones (``decoder_sparse_step``,
``mlp_only_layers``); checkpoints in transformers 5's fused expert layout load the same."""

from __future__ import annotations

import json

import pytest
import torch

from pdmesh.engine import LLM, SamplingParams
from tests.integration.helpers import run_disaggregated
from tests.integration.test_engine_parity import PROMPTS_IDS, assert_logits_match_hf, hf_greedy

MOE_CONFIGS = {
    # every layer sparse, top-2 of 8 renormalised
    "sparse": dict(num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                   decoder_sparse_step=1, mlp_only_layers=[]),
    # layers 1 and 3 sparse by the step, layer 3 dense by mlp_only_layers: dense, sparse, dense, dense;
    # top-3 of 6 weighted by their softmax probabilities
    "mixed": dict(num_hidden_layers=4, num_experts=6, num_experts_per_tok=3, norm_topk_prob=False,
                  decoder_sparse_step=2, mlp_only_layers=[3]),
}
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


def build_moe_hf(kind: str, path, seed: int = 0, **overrides):
    """A random-weight transformers Qwen3MoeForCausalLM saved (per-expert tensors) under ``path``."""
    import transformers

    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rope_theta=1000000.0,
              rms_norm_eps=1e-6, initializer_range=0.3, tie_word_embeddings=False, bos_token_id=None,
              eos_token_id=None, pad_token_id=None)
    cfg = transformers.Qwen3MoeConfig(**{**kw, **MOE_CONFIGS[kind], **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=sorted(MOE_CONFIGS))
def moe_pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"qwen3-moe-{request.param}")
    hf = build_moe_hf(request.param, path, seed=len(request.param))
    return request.param, hf, str(path), LLM(model=str(path), device="cpu", block_size=8, num_kv_blocks=256)


def tokens(llm, prompts, params=GREEDY):
    return [r.outputs[0].token_ids for r in llm.generate(prompts, params, detokenize=False)]


def test_layers_follow_the_config(moe_pair):
    kind, hf, _, llm = moe_pair
    ours = [type(layer.mlp).__name__ for layer in llm.engine.model.model.layers]
    theirs = [type(layer.mlp).__name__.replace("Qwen3Moe", "") for layer in hf.model.layers]
    assert ours == {"sparse": ["SparseMoeBlock"] * 2,
                    "mixed": ["GatedMLP", "SparseMoeBlock", "GatedMLP", "GatedMLP"]}[kind]
    assert [o == "SparseMoeBlock" for o in ours] == [t == "SparseMoeBlock" for t in theirs]


def test_logits_match_hf(moe_pair):
    kind, hf, _, llm = moe_pair
    assert_logits_match_hf(kind, hf, llm)


def test_greedy_32_match_hf_batched_chunked_and_cached(moe_pair):
    kind, hf, path, llm = moe_pair
    want = [hf_greedy(hf, ids) for ids in PROMPTS_IDS]
    assert tokens(llm, PROMPTS_IDS) == want, kind  # one continuous batch
    chunked = LLM(model=path, device="cpu", block_size=8, num_kv_blocks=256, max_num_batched_tokens=7)
    assert tokens(chunked, PROMPTS_IDS) == want, f"{kind}: chunked prefill"
    hits = llm.engine.blocks.prefix_hits
    again = llm.generate([PROMPTS_IDS[2]], GREEDY, detokenize=False)[0]
    assert again.num_cached_tokens == 64 and llm.engine.blocks.prefix_hits - hits == 64  # 8 blocks of 70 tokens
    assert again.outputs[0].token_ids == want[2]


def test_disaggregated_equals_hf(moe_pair):
    kind, hf, path, _ = moe_pair
    pre, dec = (LLM(model=path, device="cpu", block_size=8, num_kv_blocks=256).engine for _ in range(2))
    free_p, free_d = pre.blocks.num_free_blocks, dec.blocks.num_free_blocks
    for i, ids in enumerate(PROMPTS_IDS[:3]):
        assert run_disaggregated(pre, dec, f"r{i}", ids, GREEDY) == hf_greedy(hf, ids), kind
    assert pre.blocks.num_free_blocks == free_p and dec.blocks.num_free_blocks == free_d


def test_fused_expert_checkpoints_load_the_same(moe_pair, tmp_path):
    """transformers 5 holds experts as [E, 2I, H] / [E, H, I] tensors; a checkpoint saved that way
    gives the same weights as one tensor per expert."""
    from safetensors.torch import load_file, save_file

    kind, _, path, llm = moe_pair
    state = load_file(f"{path}/model.safetensors")
    fused = {k: v for k, v in state.items() if ".mlp.experts." not in k}
    layers = sorted({k.split(".mlp.experts.")[0] for k in state if ".mlp.experts." in k})
    for layer in layers:
        n = len({k for k in state if k.startswith(f"{layer}.mlp.experts.") and k.endswith("down_proj.weight")})
        one = lambda e, p, layer=layer: state[f"{layer}.mlp.experts.{e}.{p}.weight"]  # noqa: E731
        fused[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([one(e, "gate_proj"), one(e, "up_proj")]) for e in range(n)])
        fused[f"{layer}.mlp.experts.down_proj"] = torch.stack([one(e, "down_proj") for e in range(n)])
    save_file(fused, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(json.load(open(f"{path}/config.json"))))
    other = LLM(model=str(tmp_path), device="cpu", block_size=8, num_kv_blocks=64)
    theirs = dict(other.engine.model.named_parameters())
    for name, p in llm.engine.model.named_parameters():
        assert torch.equal(p, theirs[name]), name
    incomplete = {k: v for k, v in state.items() if k != f"{layers[0]}.mlp.experts.1.up_proj.weight"}
    save_file(incomplete, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks 1 tensors"):
        LLM(model=str(tmp_path), device="cpu", block_size=8, num_kv_blocks=64)
