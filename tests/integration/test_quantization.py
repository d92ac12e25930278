"""Online quantization (--quantization fp8|int8) and the fp8 KV cache (--kv-cache-dtype fp8) in
the engine, CPU.

The real embedded model (SmolLM2-135M) quantized still answers the capital of France with Paris,
its last-position logits stay close, and its perplexity on a fixed text stays within a stated
bound of the unquantized model's
(measured here: fp32 20.06; int8 21.44 (+7%); fp8 22.13 (+10%); fp8 KV 20.45 (+2%); fp8 weights
and KV 22.13).  Bounds: int8 <= +12%, fp8 <= +16%, fp8 KV alone <= +5%.  A small model is the hard
case for W8A8 (few channels absorb activation outliers).  Tiny random models: fp8 KV moves between a prefill and a decode engine
byte for byte (tokens equal to one engine with fp8 KV); speculative decoding works on top.
(Random tiny models amplify quantization error through their large activations: the logit checks
use the real model.)"""

from __future__ import annotations

import json
import math

import pytest

from pdmesh.config import CacheConfig, DeviceConfig, EngineConfig, ModelConfig, parse_speculative_config
from pdmesh.engine import LLM, SamplingParams
from tests.integration.helpers import PROMPTS, run_disaggregated

TEXT = ("The quick brown fox jumps over the lazy dog. Paris is the capital and most populous city of France. "
        "Water boils at one hundred degrees Celsius at sea level, and it freezes at zero degrees.")
PPL_BOUND = {(None, "auto"): 0.0, ("int8", "auto"): 0.12, ("fp8", "auto"): 0.16, (None, "fp8"): 0.05,
             ("fp8", "fp8"): 0.16}


def engine(model=None, quantization=None, kv="auto", spec=None, **cache) -> LLM:
    cache.setdefault("num_kv_blocks", 64)
    cache.setdefault("block_size", 16)
    cfg = EngineConfig(model=ModelConfig(**({"model": model} if model else {}), quantization=quantization),
                       cache=CacheConfig(kv_cache_dtype=kv, **cache), device=DeviceConfig(device="cpu"),
                       speculative=parse_speculative_config(json.dumps(spec)) if spec else None)
    return LLM(engine_config=cfg)


def perplexity(llm: LLM, text: str) -> float:
    res = llm.generate([text], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))[0]
    return math.exp(-sum(lp.logprob for lp in res.prompt_logprobs) / len(res.prompt_logprobs))


CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def base(embedded_dir):
    """The unquantized model's perplexity on TEXT and its logits after the chat prompt."""
    llm = engine()
    return perplexity(llm, TEXT), llm.engine.score(llm.tokenizer.apply_chat_template(CHAT))


@pytest.mark.parametrize("quantization, kv", [("int8", "auto"), ("fp8", "auto"), ("fp8", "fp8")])
def test_smollm2_quantized_answers_paris_and_perplexity_within_bound(base, quantization, kv):
    base_ppl, base_logits = base
    llm = engine(quantization=quantization, kv=kv)
    answer = llm.chat([CHAT], SamplingParams(temperature=0, max_tokens=10))[0].outputs[0].text
    assert "Paris" in answer, answer
    ppl = perplexity(llm, TEXT)
    assert ppl <= base_ppl * (1 + PPL_BOUND[(quantization, kv)]), (ppl, base_ppl)
    assert ppl != base_ppl  # it did change something
    # last-position logits (measured: 6% relative error, cosine 0.9986): bound 15%, same argmax
    logits = llm.engine.score(llm.tokenizer.apply_chat_template(CHAT))
    assert float((logits - base_logits).norm() / base_logits.norm()) < 0.15
    assert int(logits.argmax()) == int(base_logits.argmax())


def test_fp8_kv_disaggregated_equals_one_engine_and_halves_transfer_bytes(model_dir):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    one = engine(model_dir, kv="fp8", block_size=8, num_kv_blocks=128)
    prefill = engine(model_dir, kv="fp8", block_size=8, num_kv_blocks=128)
    decode = engine(model_dir, kv="fp8", block_size=8, num_kv_blocks=128,
                    spec={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2, "prompt_lookup_min": 1})
    for i, prompt in enumerate(PROMPTS):
        want = one.generate([prompt], params, detokenize=False)[0].outputs[0].token_ids
        assert run_disaggregated(prefill.engine, decode.engine, f"q{i}", prompt, params) == want
    assert prefill.engine.pool.layout.dtype == "float8_e4m3fn"
    assert prefill.engine.pool.layout.block_bytes * 4 == engine(model_dir, block_size=8).engine.pool.layout.block_bytes


def test_speculation_on_a_quantized_model_keeps_its_greedy_tokens(model_dir):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ref = engine(model_dir, "int8", block_size=8).generate(PROMPTS, params, detokenize=False)
    got = engine(model_dir, "int8", block_size=8,
                 spec={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
                 ).generate(PROMPTS, params, detokenize=False)
    assert [r.outputs[0].token_ids for r in got] == [r.outputs[0].token_ids for r in ref]
