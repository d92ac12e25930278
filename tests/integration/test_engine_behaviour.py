"""Continuous batching, paging, prefix caching, chunked prefill, preemption, aborts, seeds and
prefill->decode handoff inside the engine (CPU, fp32)."""

from __future__ import annotations

import pytest

from pdmesh.engine import LLM, RequestRejected, SamplingParams
from tests.integration.helpers import PROMPTS, run_disaggregated

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def make(model_dir, **kw):
    kw.setdefault("num_kv_blocks", 256)
    kw.setdefault("block_size", 8)
    return LLM(model=model_dir, device="cpu", **kw)


def tokens(llm, prompts, params=GREEDY):
    return [r.outputs[0].token_ids for r in llm.generate(prompts, params, detokenize=False)]


@pytest.fixture(scope="module")
def reference(model_dir):
    llm = make(model_dir)
    return [tokens(llm, [p])[0] for p in PROMPTS]


def test_batched_equals_one_by_one(model_dir, reference):
    assert tokens(make(model_dir), PROMPTS) == reference


@pytest.mark.parametrize("block_size", [1, 4, 16, 64])
def test_identical_across_page_sizes(model_dir, reference, block_size):
    assert tokens(make(model_dir, block_size=block_size, num_kv_blocks=4096 // block_size + 8), PROMPTS) == reference


def test_chunked_prefill_equals_whole(model_dir, reference):
    llm = make(model_dir, max_num_batched_tokens=7)
    assert tokens(llm, PROMPTS) == reference


def test_prefix_cache_hit_gives_same_tokens_and_counts(model_dir, reference):
    llm = make(model_dir)
    long = PROMPTS[2]
    first = llm.generate([long], GREEDY, detokenize=False)[0]
    hits_before = llm.engine.blocks.prefix_hits
    second = llm.generate([long], GREEDY, detokenize=False)[0]
    assert first.outputs[0].token_ids == second.outputs[0].token_ids == reference[2]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 64  # 8 full blocks of 8 out of 70 tokens
    assert llm.engine.blocks.prefix_hits - hits_before == 64
    llm_nocache = make(model_dir, enable_prefix_caching=False)
    assert tokens(llm_nocache, [long, long]) == [reference[2]] * 2


def test_preemption_recomputes_to_the_same_tokens(model_dir, reference):
    # 14 blocks of 8 tokens cannot hold all four sequences at full length at once.
    llm = make(model_dir, num_kv_blocks=14)
    out = tokens(llm, PROMPTS)
    assert llm.engine.scheduler.num_preemptions > 0
    assert out == reference
    assert llm.engine.blocks.num_free_blocks == 14
    llm.engine.blocks.check_invariants()


def test_abort_mid_prefill_and_mid_decode_leaks_nothing(model_dir):
    llm = make(model_dir, max_num_batched_tokens=16)
    eng = llm.engine
    free0 = eng.blocks.num_free_blocks
    eng.add_request("a", list(range(60)), GREEDY)  # needs 4 chunked steps
    eng.add_request("b", [1, 2, 3], GREEDY)
    eng.step()
    assert eng.blocks.has_request("a") and eng.scheduler.running[0].num_computed_tokens < 60
    assert eng.abort("a")  # mid-prefill
    for _ in range(3):
        eng.step()
    assert eng.abort("b")  # mid-decode
    assert not eng.has_work()
    assert eng.blocks.num_free_blocks == free0
    eng.blocks.check_invariants()
    assert not eng.abort("b")


def test_seeded_sampling_repeats_exactly(model_dir):
    p = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=20, ignore_eos=True)
    a = tokens(make(model_dir), PROMPTS, p)
    b = tokens(make(model_dir), PROMPTS[::-1], p)[::-1]  # other batch order, other engine
    assert a == b
    c = tokens(make(model_dir), PROMPTS, p.with_updates(seed=99))
    assert a != c


def test_rejects_requests_that_can_never_fit(model_dir):
    eng = make(model_dir, num_kv_blocks=4, max_model_len=100).engine
    with pytest.raises(RequestRejected, match="max_model_len"):
        eng.add_request("x", [1] * 90, SamplingParams(max_tokens=20))
    with pytest.raises(RequestRejected, match="KV blocks"):
        eng.add_request("y", [1] * 40, SamplingParams(max_tokens=10))
    with pytest.raises(RequestRejected, match="empty"):
        eng.add_request("z", [], SamplingParams())


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(temperature=1.0, seed=7, max_tokens=24, ignore_eos=True)])
def test_disaggregation_never_changes_tokens(model_dir, params):
    single = tokens(make(model_dir), PROMPTS, params)
    pre, dec = make(model_dir).engine, make(model_dir).engine
    free_p, free_d = pre.blocks.num_free_blocks, dec.blocks.num_free_blocks
    for i, p in enumerate(PROMPTS):
        assert run_disaggregated(pre, dec, f"r{i}", p, params) == single[i]
    # second pass: decode's own prefix cache now covers the long prompt (fewer blocks pulled)
    assert run_disaggregated(pre, dec, "again", PROMPTS[2], params) == single[2]
    assert dec.blocks.prefix_hits > 0
    assert pre.blocks.num_free_blocks == free_p and dec.blocks.num_free_blocks == free_d


def test_prefill_only_that_ends_at_first_token_holds_nothing(model_dir):
    pre = make(model_dir).engine
    free0 = pre.blocks.num_free_blocks
    pre.add_request("one", [1, 2, 3], SamplingParams(temperature=0, max_tokens=1), prefill_only=True)
    out = pre.step()[0]
    assert out.finished and out.finish_reason == "length" and out.held_block_ids is None
    assert pre.blocks.num_free_blocks == free0 and not pre.held


def test_warm_up_leaves_the_engine_as_new(model_dir, reference):
    from pdmesh.engine.warmup import warm_up

    llm = make(model_dir, max_num_batched_tokens=32, num_kv_blocks=64)
    eng = llm.engine
    fresh_free = list(eng.blocks.free_queue)
    assert warm_up(eng) >= 0
    assert eng.num_steps == 0 and not eng.has_work() and not eng.blocks.requests and not eng.held and not eng.remote
    assert list(eng.blocks.free_queue) == fresh_free == list(range(64)) and eng.blocks.cached == {}
    assert eng.blocks.prefix_queries == 0 and eng.blocks.prefix_hits == 0
    eng.blocks.check_invariants()
    assert tokens(llm, PROMPTS) == reference  # the same tokens as an engine that never warmed up
    eng.add_request("busy", PROMPTS[0], GREEDY)
    with pytest.raises(RuntimeError, match="idle engine"):
        warm_up(eng)
