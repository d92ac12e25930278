"""GPU checks of online quantization, the fp8 KV cache and speculative verify steps (skipped where
CUDA is unavailable).  Bounds as on CPU: a quantized layer within 2% (int8) / 6% (fp8) of float32;
the weight-only one-row GEMV within 1% of the same layer's dequantized weight."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("method, bound", [("fp8", 0.06), ("int8", 0.02)])
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 64, 3500])
def test_quantized_layer_on_cuda(method, bound, rows):
    from pdmesh.models.quant import QuantLinear, quant_error

    torch.manual_seed(0)
    ref = torch.nn.Linear(4096, 6144, device="cuda")
    torch.nn.init.normal_(ref.weight, std=4096 ** -0.5)
    lin = torch.nn.Linear(4096, 6144, device="cuda")
    lin.load_state_dict(ref.state_dict())
    q = QuantLinear(lin.to(torch.bfloat16), method)
    assert quant_error(q, ref, torch.randn(rows, 4096, device="cuda")) < bound


@pytest.mark.parametrize("method", ["fp8", "int8"])
@pytest.mark.parametrize("silu_mul", [False, True])
def test_weight_only_gemv(method, silu_mul):
    from pdmesh.models.gemv import gemv
    from pdmesh.models.quant import QuantLinear

    torch.manual_seed(1)
    q = QuantLinear(torch.nn.Linear(2048, 4096, device="cuda", dtype=torch.bfloat16), method)
    x = torch.randn(1, 2 * 2048 if silu_mul else 2048, device="cuda", dtype=torch.bfloat16)
    act = torch.nn.functional.silu(x[:, :2048].float()) * x[:, 2048:].float() if silu_mul else x.float()
    want = act.to(torch.bfloat16).float() @ q.dequantized_weight().t() + q.bias.float()
    got = gemv(x, q.weight, q.bias, silu_mul=silu_mul, scale=q.weight_scale).float()
    assert ((got - want).norm() / want.norm()).item() < 0.01


def test_engine_fp8_with_speculation_and_fp8_kv():
    """qwen2.5-0.5b (dummy) with fp8 weights and fp8 KV through FlashInfer and CUDA graphs: a
    repetitive prompt gets drafts (verify steps as decode rows, under graphs); every token the
    speculating engine emits is its own greedy choice at that prefix (scored again in one prefill)
    up to 5% of the logit range (fp8/bf16 numerics differ between computation orders; a token from
    a wrong position or wrong KV would be far off), and every block is free at the end."""
    from dataclasses import replace

    from pdmesh.config import SpeculativeConfig
    from pdmesh.engine import SamplingParams
    from pdmesh.engine.engine import LLMEngine
    from pdmesh.testing import engine_config

    motif = [(i * 97) % 20000 + 10 for i in range(20)]
    prompts = [motif * 5 + [11 + i] for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    cfg = replace(engine_config("qwen2.5-0.5b", max_num_seqs=32, max_model_len=1024, quantization="fp8",
                                kv_cache_dtype="fp8"), speculative=SpeculativeConfig(4, 3, 1))
    eng = LLMEngine(cfg)
    assert eng.runner.graphs is not None
    got: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, params)
    while eng.has_work():
        for o in eng.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert eng.blocks.num_free_blocks == eng.blocks.num_blocks
    assert eng.spec.stats.num_drafts > 0
    for i, p in enumerate(prompts):
        toks = got[f"r{i}"]
        assert len(toks) == 24
        for t in range(len(toks)):
            logits = eng.score(p + toks[:t])
            assert logits.max() - logits[toks[t]] <= 0.05 * (logits.max() - logits.min()), (i, t)
    del eng
    torch.cuda.empty_cache()
