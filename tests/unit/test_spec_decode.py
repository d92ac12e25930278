"""Speculative decoding parts without a model: --speculative-config validation, n-gram proposals,
the scheduler's draft budget, rolling back KV blocks of rejected drafts (exact block ids), and the
verification rule's statistics (it is rejection sampling: the output keeps the model's distribution)."""

import argparse

import numpy as np
import pytest
import torch

from pdmesh.config import ConfigError, EngineConfig, SchedulerConfig, SpeculativeConfig, parse_speculative_config
from pdmesh.engine.ngram import TokenHistory, propose_ngram
from pdmesh.engine.sampler import Sampler, build_sampling_batch
from pdmesh.engine.scheduler import Scheduler
from pdmesh.engine.sequence import SamplingParams, Sequence, SequenceStatus
from pdmesh.engine.spec_decode import BACKOFF_TOKENS, MISSES_BEFORE_BACKOFF, SpecDecoder, may_propose
from pdmesh.kv.block_manager import PrefixCachingBlockManager


# ---------------------------------------------------------------- --speculative-config
def test_vllm_spelling_and_defaults():
    cfg = parse_speculative_config('{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 2}')
    assert cfg == SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_max=3, prompt_lookup_min=2)
    assert parse_speculative_config('{"method": "[ngram]", "num_speculative_tokens": 2}') == SpeculativeConfig(2, 5, 5)
    assert parse_speculative_config('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}') == \
        SpeculativeConfig(2, 3, 3)
    assert parse_speculative_config('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 2}') == \
        SpeculativeConfig(2, 2, 2)
    assert parse_speculative_config(None) is None and parse_speculative_config("  ") is None


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"num_speculative_tokens": 4}', '"method" is required'),
    ('{"method": "eagle", "num_speculative_tokens": 4}', "method 'eagle' is not supported"),
    ('{"method": "ngram"}', "num_speculative_tokens is required"),
    ('{"method": "ngram", "num_speculative_tokens": 0}', "num_speculative_tokens must be in 1..16"),
    ('{"method": "ngram", "num_speculative_tokens": 2.5}', "num_speculative_tokens must be an integer"),
    ('{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 4, "prompt_lookup_max": 2}',
     r"prompt_lookup_min \(4\) must be <= prompt_lookup_max \(2\)"),
    ('{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 0, "prompt_lookup_max": 2}', ">= 1"),
    ('{"method": "ngram", "num_speculative_tokens": 4, "model": "x"}', "model not supported"),
    ('{"method": "ngram", "num_speculative_tokens": 4, "lookahead": 3}', "unknown key"),
])
def test_bad_config_is_a_clear_error_naming_the_flag(text, message):
    with pytest.raises(ConfigError, match="--speculative-config") as exc:
        parse_speculative_config(text)
    assert exc.match(message)


def test_flag_reaches_the_engine_config():
    p = argparse.ArgumentParser()
    EngineConfig.add_flags(p)
    ns = p.parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}'])
    assert EngineConfig.from_flags(ns).speculative == SpeculativeConfig(3, 2, 2)
    assert EngineConfig.from_flags(p.parse_args([])).speculative is None


# ---------------------------------------------------------------- n-gram proposals
def arr(xs):
    return np.asarray(xs, dtype=np.int64)


def test_longest_suffix_wins_and_the_latest_occurrence():
    #          0  1  2  3  4  5  6  7  8  9 10 11
    tokens = [1, 2, 3, 9, 9, 2, 3, 7, 8, 5, 2, 3]
    # suffix [2, 3] occurs at 1..2 (then 9 9 2) and 5..6 (then 7 8 5): the latest one wins
    assert propose_ngram(arr(tokens), 3, 1, 3) == [7, 8, 5]
    # a longer match beats a more recent shorter one: suffix [1, 2, 3] matches only at 0..2
    tokens = [1, 2, 3, 4, 5, 0, 2, 3, 6, 1, 2, 3]
    assert propose_ngram(arr(tokens), 2, 1, 3) == [4, 5]
    assert propose_ngram(arr(tokens), 2, 1, 2) == [6, 1]  # at most 2-grams: the latest [2, 3]


def test_min_length_and_short_histories_and_the_end():
    assert propose_ngram(arr([4, 5, 6, 5, 6]), 3, 3, 4) == []  # only a 2-gram matches
    assert propose_ngram(arr([4, 5, 6, 5, 6]), 3, 2, 4) == [5, 6]  # what follows, up to the end
    assert propose_ngram(arr([7]), 3, 1, 2) == []
    assert propose_ngram(arr([1, 2, 3]), 3, 1, 3) == []  # no earlier occurrence
    assert propose_ngram(arr([8, 8, 8, 8]), 2, 1, 3) == [8]  # overlapping occurrence at 0..2, followed by one 8
    assert propose_ngram(arr([1, 2, 1, 2]), 0, 1, 2) == []


def test_token_history_appends_what_is_new():
    h = TokenHistory()
    toks = list(range(300))
    assert h.sync(toks[:10]).tolist() == toks[:10]
    assert h.sync(toks).tolist() == toks  # grown past its first buffer
    toks.append(5)
    assert h.sync(toks)[-1] == 5 and h.n == 301


# ---------------------------------------------------------------- scheduling and rollback
def running_seq(rid, prompt, outputs, bm, params=None):
    params = params or SamplingParams(temperature=0, max_tokens=50)
    s = Sequence(rid, list(prompt) + list(outputs), len(prompt), params, frozenset())
    s.num_computed_tokens = s.num_tokens - 1
    s.status = SequenceStatus.RUNNING
    assert bm.allocate(rid, s.num_computed_tokens) is not None
    return s


def test_proposals_respect_max_tokens_and_skip_what_cannot_speculate():
    bm = PrefixCachingBlockManager(num_blocks=16, block_size=4)
    spec = SpecDecoder(SpeculativeConfig(4, 2, 1), max_model_len=64)
    a = running_seq("a", [1, 2, 3, 4, 5, 6], [1, 2], bm)
    b = running_seq("b", [1, 2, 3, 4, 5, 6], [1, 2], bm, SamplingParams(temperature=0, max_tokens=4))
    c = running_seq("c", [1, 2, 3, 4, 5, 6], [1, 2], bm, SamplingParams(temperature=0, repetition_penalty=1.2))
    d = running_seq("d", [1, 2, 3, 4, 5, 6], [1, 2], bm)
    d.prefill_only = True
    spec.propose([a, b, c, d])
    assert a.spec_token_ids == [3, 4, 5, 6]
    assert b.spec_token_ids == [3]  # 2 generated of 4: the verify step may emit 2 (1 draft + 1)
    assert c.spec_token_ids == [] and d.spec_token_ids == []


def test_back_off_where_proposals_keep_failing():
    bm = PrefixCachingBlockManager(num_blocks=16, block_size=4)
    spec = SpecDecoder(SpeculativeConfig(2, 2, 2), max_model_len=256)
    a = running_seq("a", [1, 2, 3, 4, 5, 6], [7], bm, SamplingParams(temperature=0, max_tokens=200))
    for _ in range(MISSES_BEFORE_BACKOFF):  # no 2-gram of the history repeats: nothing to propose
        assert may_propose(a)
        spec.propose([a])
        assert a.spec_token_ids == []
    assert not may_propose(a) and a.spec_state.cold_until == 1 + BACKOFF_TOKENS
    a.token_ids += [8] * BACKOFF_TOKENS  # cold: proposals wait until the back-off has passed
    assert may_propose(a)
    a.token_ids += [1, 2]  # "1 2" occurred: drafts, then all rejected: misses again
    a.num_computed_tokens = a.num_tokens - 1
    for _ in range(MISSES_BEFORE_BACKOFF):
        spec.propose([a])
        assert a.spec_token_ids == [3, 4]
        assert spec.accept(a, [9, 9, 9]) == 1
    assert a.spec_state.backoff == 2 * BACKOFF_TOKENS and not may_propose(a)
    a.spec_state.cold_until = 0
    spec.propose([a])
    assert spec.accept(a, [3, 9, 9]) == 2 and a.spec_state.backoff == 0 and a.spec_state.misses == 0


def test_scheduler_cuts_drafts_to_the_budget_and_drops_them_before_preempting():
    bm = PrefixCachingBlockManager(num_blocks=4, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=4), bm)
    a = running_seq("a", [1, 2, 3, 4, 5, 6], [7], bm)  # computed 6: blocks 0, 1
    a.spec_token_ids = [1, 2, 3, 4, 5]
    sched.running.append(a)
    batch = sched.schedule()
    assert batch.num_new_tokens == [4] and a.spec_token_ids == [1, 2, 3]  # 1 + 3 drafts = the budget
    assert bm.block_table("a") == [0, 1, 2]  # slots for positions 6..9
    b = running_seq("b", [9, 9, 9], [9], bm)  # block 3: the last free one
    b.spec_token_ids = [9, 9, 9]
    sched.running = [b]
    batch = sched.schedule()  # 3 + 4 tokens need a second block: none free, so the drafts go
    assert batch.num_new_tokens == [1] and b.spec_token_ids == [] and not batch.preempted


def test_rejected_drafts_blocks_are_returned_exactly():
    bm = PrefixCachingBlockManager(num_blocks=8, block_size=4)
    assert bm.allocate("a", 6) == [0, 1]
    assert bm.allocate("a", 6 + 5) == [2]  # a verify step of 1 + 4 tokens at positions 6..10
    assert bm.trim("a", 8) == [2]  # one draft accepted: 8 tokens computed, block 2 held rejected KV only
    assert bm.block_table("a") == [0, 1] and list(bm.free_queue)[:1] == [2]
    assert bm.block_table_array("a").tolist() == [0, 1]
    assert bm.allocate("a", 9) == [2]
    assert bm.trim("a", 9) == []
    bm.check_invariants()
    bm.cache_full_blocks("a", list(range(9)), 8)
    with pytest.raises(AssertionError, match="shared or cached"):
        bm.trim("a", 3)  # block 1 holds computed tokens: never a rejected draft's


# ---------------------------------------------------------------- verification keeps the distribution
def test_verification_is_rejection_sampling_with_the_models_distribution():
    """Rows drawn as the runner draws them; accepting a draft iff the row's sample equals it must
    accept with probability p(draft) and, on rejection, emit p without the draft, renormalised."""
    n, vocab = 40_000, 5
    probs = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05])
    logits = probs.log().repeat(2 * n, 1)
    params = SamplingParams(temperature=1.0, max_tokens=8)
    seqs = []
    for i in range(n):
        s = Sequence(f"r{i}", [1, 2, 3], 2, params, frozenset())
        s.spec_token_ids = [1]  # draft token 1, p = 0.25
        seqs.append(s)
    rows = [s for s in seqs for _ in range(2)]
    sampler = Sampler(torch.device("cpu"))
    flat = sampler.sample(logits, build_sampling_batch(rows, vocab, torch.device("cpu"), [0, 1] * n)).tolist()
    spec = SpecDecoder(SpeculativeConfig(1, 1, 1), 64)
    first = [flat[2 * i:2 * i + 2][:spec.accept(s, flat[2 * i:2 * i + 2])][0] for i, s in enumerate(seqs)]
    accepted = spec.stats.num_accepted_tokens / n
    assert abs(accepted - 0.25) < 4 * (0.25 * 0.75 / n) ** 0.5
    counts = np.bincount(first, minlength=vocab) / n
    assert np.allclose(counts, probs.numpy(), atol=0.012), counts  # first emitted token ~ p
    rejected = np.bincount([t for t in first if t != 1], minlength=vocab)
    want = probs.clone()
    want[1] = 0
    assert np.allclose(rejected / rejected.sum(), (want / want.sum()).numpy(), atol=0.012)


def test_verify_rows_are_seeded_like_the_tokens_they_stand_for():
    """Row j of a seeded sequence draws with the noise of output index num_output_tokens + j: the
    same token that plain decoding draws there."""
    logits = torch.randn(1, 64)
    p = SamplingParams(temperature=0.9, seed=3, max_tokens=20)
    sampler = Sampler(torch.device("cpu"))
    base = Sequence("r", [1, 2, 7], 2, p, frozenset())
    spec_rows = sampler.sample(logits.repeat(4, 1), build_sampling_batch([base] * 4, 64, torch.device("cpu"), [0, 1, 2, 3]))
    plain = []
    for j in range(4):
        s = Sequence("r", [1, 2, 7] + [0] * j, 2, p, frozenset())
        plain.append(int(sampler.sample(logits, build_sampling_batch([s], 64, torch.device("cpu")))[0]))
    assert spec_rows.tolist() == plain


def test_prefill_worker_refuses_speculation_decode_and_colocated_take_it():
    from pdmesh.worker import build_configs

    flag = ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}']
    with pytest.raises(ConfigError, match="speculative.config.*never speculates"):
        build_configs("prefill", 0, flag)
    assert build_configs("decode", 0, flag)[1].speculative == SpeculativeConfig(3, 2, 2)
    assert build_configs("both", 0, flag)[1].speculative is not None


def test_llm_refuses_arguments_next_to_an_engine_config():
    from pdmesh.engine.llm import LLM

    with pytest.raises(TypeError, match="also given: quantization, speculative_config"):
        LLM(engine_config=EngineConfig(), quantization="int8", speculative_config={"method": "ngram", "num_speculative_tokens": 2})
