"""Qwen3-MoE over two CPU rank processes (gloo): experts split by width (tensor parallelism) and
whole experts per rank (``--enable-expert-parallel``) give one process's greedy tokens and
logprobs, with async scheduling; each rank's routed pairs are only its own experts' (EP)."""

from __future__ import annotations

import pytest

from pdmesh.engine import LLM, SamplingParams
from tests.integration.helpers import assert_same_logprobs
from tests.integration.test_engine_parity import PROMPTS_IDS
from tests.integration.test_moe import build_moe_hf

KW = dict(device="cpu", block_size=8, num_kv_blocks=256)


@pytest.fixture(scope="module")
def mixed_moe(tmp_path_factory) -> str:
    """Dense, sparse, dense, dense layers; 6 experts (3 per rank under EP), expert width 32, top-3."""
    path = tmp_path_factory.mktemp("qwen3-moe-tp")
    build_moe_hf("mixed", path, seed=11)
    return str(path)


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp-split", "ep"])
def test_two_ranks_give_one_process_tokens(mixed_moe, expert_parallel):
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    with_lps = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    one = LLM(model=mixed_moe, **KW)
    want = [r.outputs[0].token_ids for r in one.generate(PROMPTS_IDS, greedy, detokenize=False)]
    want_lp = one.generate(PROMPTS_IDS[:2], with_lps, detokenize=False)
    with LLM(model=mixed_moe, tensor_parallel_size=2, enable_expert_parallel=expert_parallel, cpu_threads=1,
             async_scheduling="on", **KW) as two:
        experts = two.engine.model.model.layers[1].mlp.experts
        if expert_parallel:  # rank 0 holds experts 0-2 whole
            assert (experts.split.first, experts.split.count, experts.gate_up_proj.shape[1]) == (0, 3, 64)
        else:  # rank 0 holds columns 0-15 of all 6 experts
            assert (experts.split.count, experts.gate_up_proj.shape[1]) == (6, 32)
        got = [r.outputs[0].token_ids for r in two.generate(PROMPTS_IDS, greedy, detokenize=False)]
        assert two.engine.num_steps_launched_behind > 0
        got_lp = two.generate(PROMPTS_IDS[:2], with_lps, detokenize=False)
    assert got == want
    assert_same_logprobs(got_lp, want_lp)


def test_an_expert_split_that_does_not_divide_is_a_clear_error(mixed_moe):
    with pytest.raises(ValueError, match="6 experts do not divide over 4 ranks"):
        LLM(model=mixed_moe, tensor_parallel_size=4, enable_expert_parallel=True, **KW)
