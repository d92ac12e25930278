"""Tensor parallelism on CPU with real rank processes (gloo): TP 2 gives TP 1's greedy tokens in
fp32 for Llama, Qwen2 (one KV head: replicated on both ranks) and Qwen3, with async scheduling's
id broadcast, prompt logprobs and logprobs; a model that does not split is a clear error; each
rank's weights are exactly its slices of the TP-1 weights (checkpoint and dummy alike)."""

from __future__ import annotations

import pytest
import torch

from pdmesh.distributed.group import TPGroup
from pdmesh.engine import LLM, SamplingParams
from pdmesh.models.loader import fill_dummy, iter_safetensors, resolve
from pdmesh.config import ModelConfig
from pdmesh.models import build_model
from tests.integration.helpers import assert_same_logprobs
from tests.integration.test_engine_parity import PROMPTS_IDS, build_random_hf

KW = dict(device="cpu", block_size=8, num_kv_blocks=256)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_tp2_greedy_tokens_equal_tp1(kind, tmp_path_factory):
    _, path = build_random_hf(kind, tmp_path_factory)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with_lps = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    tp1 = LLM(model=str(path), **KW)
    want = [r.outputs[0].token_ids for r in tp1.generate(PROMPTS_IDS, greedy, detokenize=False)]
    want_lp = tp1.generate(PROMPTS_IDS[:2], with_lps, detokenize=False)
    with LLM(model=str(path), tensor_parallel_size=2, cpu_threads=1, async_scheduling="on", **KW) as tp2:
        assert tp2.engine.tp.size == 2 and len(tp2.engine.pool.ranks) == 2
        got = [r.outputs[0].token_ids for r in tp2.generate(PROMPTS_IDS, greedy, detokenize=False)]
        assert tp2.engine.num_steps_launched_behind > 0  # decode steps ran launched, ids broadcast to rank 1
        got_lp = tp2.generate(PROMPTS_IDS[:2], with_lps, detokenize=False)
    assert got == want
    assert all(r.prompt_logprobs for r in want_lp)
    assert_same_logprobs(got_lp, want_lp)


def test_a_model_that_does_not_split_is_a_clear_error(tmp_path_factory):
    _, path = build_random_hf("llama", tmp_path_factory)  # 4 attention heads, 2 KV heads
    with pytest.raises(ValueError, match="--tensor-parallel-size 3: the model's 4 attention heads do not divide over 3 ranks"):
        LLM(model=str(path), tensor_parallel_size=3, **KW)
    odd = _config_dir(tmp_path_factory, "odd-mlp", intermediate_size=66)
    with pytest.raises(ValueError, match="MLP width 66 does not divide over 4 ranks"):
        LLM(model=odd, load_format="dummy", tensor_parallel_size=4, **KW)
    with pytest.raises(ValueError, match="one per rank"):
        LLM(model=str(path), tensor_parallel_size=2, **{**KW, "device": "cuda:0"})


def _config_dir(tmp_path_factory, name: str, **overrides) -> str:
    """A model directory holding only a config.json (for --load-format dummy)."""
    import json

    path = tmp_path_factory.mktemp(name)
    cfg = dict(architectures=["LlamaForCausalLM"], vocab_size=256, hidden_size=32, intermediate_size=64,
               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    (path / "config.json").write_text(json.dumps({**cfg, **overrides}))
    return str(path)


def _shards(model_dir: str, load_format: str, tp: int) -> list[dict[str, torch.Tensor]]:
    res = resolve(ModelConfig(model=model_dir, load_format=load_format))
    out = []
    for rank in range(tp):
        m = build_model(res.arch, torch.float32, TPGroup(rank, tp, torch.device("cpu")))
        m.materialize(torch.device("cpu"), 64)
        if load_format == "dummy":
            fill_dummy(m, seed=3)
        else:
            m.load_weights(iter_safetensors(res.weights_dir))
        out.append(dict(m.named_parameters()))
    return out


@pytest.mark.parametrize("load_format", ["safetensors", "dummy"])
def test_each_rank_holds_its_slices_of_the_tp1_weights(load_format, tmp_path_factory):
    _, path = build_random_hf("qwen2", tmp_path_factory)  # qkv bias, 2 heads / 1 KV head, tied embeddings
    (full,) = _shards(str(path), load_format, 1)
    ranks = _shards(str(path), load_format, 2)
    d, q = 32, 2 * 32  # head_dim, q width
    for r, p in enumerate(ranks):
        qkv = full["model.layers.0.self_attn.qkv_proj.weight"]
        # q rows of this rank's head, then the one KV head (replicated: every rank holds k and v whole)
        want = torch.cat([qkv[r * d:(r + 1) * d], qkv[q:q + d], qkv[q + d:q + 2 * d]])
        assert torch.equal(p["model.layers.0.self_attn.qkv_proj.weight"], want)
        bias = full["model.layers.0.self_attn.qkv_proj.bias"]
        assert torch.equal(p["model.layers.0.self_attn.qkv_proj.bias"], torch.cat([bias[r * d:(r + 1) * d], bias[q:]]))
        o = full["model.layers.0.self_attn.o_proj.weight"]
        assert torch.equal(p["model.layers.0.self_attn.o_proj.weight"], o[:, r * d:(r + 1) * d])
        gu, inter = full["model.layers.1.mlp.gate_up_proj.weight"], 80
        assert torch.equal(p["model.layers.1.mlp.gate_up_proj.weight"],
                           torch.cat([gu[r * inter:(r + 1) * inter], gu[160 + r * inter:160 + (r + 1) * inter]]))
        down = full["model.layers.1.mlp.down_proj.weight"]
        assert torch.equal(p["model.layers.1.mlp.down_proj.weight"], down[:, r * inter:(r + 1) * inter])
        emb = full["model.embed_tokens.weight"]  # 256 rows: 128 per rank
        assert torch.equal(p["model.embed_tokens.weight"], emb[r * 128:(r + 1) * 128])
        assert torch.equal(p["model.norm.weight"], full["model.norm.weight"])


def test_vocabulary_padding_rows_are_zero(tmp_path_factory):
    path = _config_dir(tmp_path_factory, "odd-vocab", vocab_size=255)
    (full,) = _shards(path, "dummy", 1)
    r0, r1 = _shards(path, "dummy", 2)
    assert r0["lm_head.weight"].shape == r1["lm_head.weight"].shape == (128, 32)
    assert torch.equal(torch.cat([r0["lm_head.weight"], r1["lm_head.weight"][:127]]), full["lm_head.weight"])
    assert not r1["lm_head.weight"][127].any() and not r1["model.embed_tokens.weight"][127].any()


SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_tp2_quantized_fp8_kv_and_speculating(tmp_path_factory):
    """--quantization int8 with --kv-cache-dtype fp8 over TP 2: each rank quantizes its own shard (a
    row-parallel layer scales its slice of K), so TP 2's logits differ from float32 by about what
    TP 1's quantized ones do; every rank's pool is fp8; n-gram speculation on that engine gives
    its greedy tokens exactly (the verify rows' logits gathered on both ranks), async scheduling on."""
    from pdmesh.models.quant import QuantLinear

    _, path = build_random_hf("llama", tmp_path_factory)
    ids = PROMPTS_IDS[2]
    ref = LLM(model=str(path), **KW).engine.score(ids)
    err1 = _relative(LLM(model=str(path), quantization="int8", kv_cache_dtype="fp8", **KW).engine.score(ids), ref)
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    q = dict(model=str(path), tensor_parallel_size=2, cpu_threads=1, quantization="int8", kv_cache_dtype="fp8",
             async_scheduling="on", **KW)
    with LLM(**q) as tp2:
        layer = tp2.engine.model.model.layers[0]
        assert isinstance(layer.self_attn.o_proj, QuantLinear) and isinstance(layer.mlp.gate_up_proj, QuantLinear)
        assert [t.dtype for t in tp2.engine.pool.ranks] == [torch.float8_e4m3fn] * 2
        err2 = _relative(tp2.engine.score(ids), ref)
        want = [r.outputs[0].token_ids for r in tp2.generate(PROMPTS_IDS, greedy, detokenize=False)]
    with LLM(speculative_config=SPEC, **q) as spec2:
        got = [r.outputs[0].token_ids for r in spec2.generate(PROMPTS_IDS, greedy, detokenize=False)]
        assert spec2.engine.spec.stats.num_drafts > 0
    assert got == want
    assert 0 < err1 < 0.2 and err2 < 2 * err1, (err1, err2)
