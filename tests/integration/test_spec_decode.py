"""N-gram speculative decoding in the engine (CPU, fp32): greedy tokens identical to decoding
without speculation for every model family, seeded sampling identical too (each verify row draws
the noise of the output index it stands for), in batches mixed with requests that cannot speculate,
with prefix caching, async scheduling and the disaggregated hand-off; after every step each request
holds exactly the blocks of its computed tokens (rejected drafts' blocks are returned at once).

Random weights accept few drafts; the real embedded model on a copy-heavy prompt accepts most of
them (acceptance figures: benchmarks/spec_acceptance_cpu.py -> results/cpu/spec-acceptance.json)."""

from __future__ import annotations

import pytest

from pdmesh.engine import LLM, SamplingParams
from tests.integration.helpers import PROMPTS, run_disaggregated
from tests.integration.test_engine_parity import RANDOM_CONFIGS, build_random_hf

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


def make(model, spec=None, **kw) -> LLM:
    kw.setdefault("num_kv_blocks", 256)
    kw.setdefault("block_size", 8)
    return LLM(model=model, device="cpu", speculative_config=spec, **kw)


def run(llm: LLM, prompts, params_list, check_blocks: bool = True) -> list[tuple[list[int], str, list]]:
    """All prompts in one continuous batch, each with its params: (tokens, finish reason, logprobs);
    after every step each live request holds exactly the blocks covering its computed tokens."""
    eng = llm.engine
    got = {f"r{i}": ([], [None], []) for i in range(len(prompts))}
    for i, (p, sp) in enumerate(zip(prompts, params_list)):
        eng.add_request(f"r{i}", p, sp)
    while eng.has_work():
        for out in eng.step():
            toks, reason, lps = got[out.request_id]
            toks += out.new_token_ids
            lps += out.logprobs or []
            reason[0] = out.finish_reason
        if check_blocks:
            eng.blocks.check_invariants()
            for seq in eng.scheduler.running:
                assert len(eng.blocks.block_table(seq.request_id)) == eng.blocks.blocks_needed(seq.num_computed_tokens)
                assert seq.spec_token_ids == []
    assert eng.blocks.num_free_blocks == eng.blocks.num_blocks and not eng.blocks.requests
    return [got[f"r{i}"] for i in range(len(prompts))]


@pytest.fixture(scope="module", params=sorted(RANDOM_CONFIGS))
def family(request, tmp_path_factory):
    _, path = build_random_hf(request.param, tmp_path_factory)
    return request.param, str(path)


def test_greedy_identical_for_every_family_in_one_batch_and_with_prefix_hits(family):
    kind, path = family
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (96, 5, 64, 80)]
    ref = run(make(path), PROMPTS, params)
    llm = make(path, SPEC)
    assert run(llm, PROMPTS, params) == ref, kind
    stats = llm.engine.spec.stats
    assert stats.num_drafts > 0 and stats.num_draft_tokens >= stats.num_drafts
    # the same prompts again: prefix-cache hits, then the same tokens
    hits = llm.engine.blocks.prefix_hits
    assert run(llm, PROMPTS, params) == ref, kind
    assert llm.engine.blocks.prefix_hits > hits


def test_seeded_sampling_identical_to_plain_decoding_and_reproducible(model_dir):
    params = [SamplingParams(temperature=t, top_p=0.9, top_k=k, seed=s, max_tokens=40, min_tokens=6, ignore_eos=True)
              for t, k, s in ((0.7, 0, 1), (1.0, 20, 2), (0.3, 5, 3), (1.2, 0, 4))]
    ref = run(make(model_dir), PROMPTS, params)
    spec = make(model_dir, SPEC)
    assert run(spec, PROMPTS, params) == ref
    assert run(spec, PROMPTS, params) == ref


def test_mixed_batch_penalties_logprobs_stop_ids_bias(model_dir):
    """Requests that speculate next to ones that cannot (penalties): everything as without
    speculation, logprobs of accepted drafts included."""
    base = run(make(model_dir), PROMPTS[:1], [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)])[0][0]
    params = [
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=(base[20],), logprobs=2),
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, repetition_penalty=1.3),
        SamplingParams(temperature=0.8, seed=9, max_tokens=30, ignore_eos=True, logit_bias=((7, 3.0),), logprobs=0),
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, presence_penalty=0.5),
    ]
    ref = run(make(model_dir), PROMPTS, params)
    got = run(make(model_dir, SPEC), PROMPTS, params)
    for (rt, rr, rl), (gt, gr, gl) in zip(ref, got):
        assert (gt, gr) == (rt, rr)
        assert [lp.token_id for lp in gl] == [lp.token_id for lp in rl]
        assert all(abs(a.logprob - b.logprob) < 1e-4 and [t for t, _ in a.top] == [t for t, _ in b.top]
                   for a, b in zip(gl, rl))
    assert ref[0][1] == ["stop"] and len(ref[0][0]) == 21


def test_async_scheduling_and_small_budgets(model_dir):
    """Async scheduling on (a sequence that may speculate goes one step at a time) and a token
    budget that cuts drafts and chunks prompts."""
    params = [SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)] * len(PROMPTS)
    ref = run(make(model_dir), PROMPTS, params)
    assert run(make(model_dir, SPEC, async_scheduling="on"), PROMPTS, params) == ref
    assert run(make(model_dir, SPEC, max_num_batched_tokens=6), PROMPTS, params) == ref


def test_verify_as_decode_rows(model_dir):
    """The verify step as one-query rows (what CUDA graphs replay on GPU) gives the same tokens."""
    params = [SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)] * len(PROMPTS)
    ref = run(make(model_dir), PROMPTS, params)
    llm = make(model_dir, SPEC)
    llm.engine.runner.verify_as_decode = True
    assert run(llm, PROMPTS, params) == ref
    assert llm.engine.spec.stats.num_drafts > 0


def test_preemption_under_block_pressure(model_dir):
    params = [SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)] * len(PROMPTS)
    ref = run(make(model_dir), PROMPTS, params)
    llm = make(model_dir, SPEC, num_kv_blocks=20)
    assert run(llm, PROMPTS, params) == ref
    assert llm.engine.scheduler.num_preemptions > 0


def test_disaggregated_decode_speculates(model_dir):
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    prefill, ref_llm = make(model_dir), make(model_dir)
    decode = make(model_dir, SPEC)
    for i, prompt in enumerate(PROMPTS):
        want = ref_llm.generate([prompt], params, detokenize=False)[0].outputs[0].token_ids
        assert run_disaggregated(prefill.engine, decode.engine, f"d{i}", prompt, params) == want
    assert decode.engine.spec.stats.num_drafts > 0
    assert decode.engine.blocks.num_free_blocks == decode.engine.blocks.num_blocks


# ---------------------------------------------------------------------- the real embedded model
PASSAGE = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
           "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.")


def test_smollm2_copy_heavy_prompt_accepts_most_drafts(embedded_dir):
    """SmolLM2 asked to repeat a passage: the same greedy tokens in far fewer steps (measured here:
    about 3/4 of the drafts accepted, 4 tokens per verify step)."""
    conv = [[{"role": "user", "content": "Repeat the following passage exactly, word for word:\n\n" + PASSAGE}]]
    params = SamplingParams(temperature=0, max_tokens=40)
    plain = LLM(device="cpu", block_size=16, num_kv_blocks=128)
    ref = plain.chat(conv, params)[0].outputs[0]
    llm = LLM(device="cpu", block_size=16, num_kv_blocks=128,
              speculative_config={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3,
                                  "prompt_lookup_min": 2})
    got = llm.chat(conv, params)[0].outputs[0]
    assert got.token_ids == ref.token_ids and got.text.startswith("The Eiffel Tower is a wrought-iron lattice")
    s = llm.engine.spec.stats
    assert s.acceptance_rate >= 0.5, s
    assert llm.engine.num_steps <= plain.engine.num_steps / 2, (llm.engine.num_steps, plain.engine.num_steps)
