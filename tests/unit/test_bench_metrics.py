"""pdmesh bench's metrics against hand-computed examples (vLLM's definitions)."""

import asyncio
import random

import pytest

from pdmesh.bench.datasets import random_dataset, shared_prefix_dataset
from pdmesh.bench.metrics import RequestResult, meets_slo, parse_goodput, percentile, summarize
from pdmesh.bench.runner import arrivals


def test_percentile_interpolates_like_numpy():
    xs = [10.0, 20.0, 30.0, 40.0]
    assert percentile(xs, 50) == 25.0          # numpy.percentile([10,20,30,40], 50)
    assert percentile(xs, 99) == pytest.approx(39.7)  # 30 + 0.97 * 10
    assert percentile(xs, 0) == 10.0 and percentile(xs, 100) == 40.0
    assert percentile([], 50) == 0.0


def test_summary_of_three_requests():
    a = RequestResult(True, prompt_len=10, output_len=5, ttft=0.100, latency=0.500, itl=[0.1, 0.1, 0.1, 0.1])
    b = RequestResult(True, prompt_len=20, output_len=1, ttft=0.200, latency=0.200)   # no TPOT (1 token)
    c = RequestResult(True, prompt_len=30, output_len=3, ttft=0.300, latency=0.700, itl=[0.1, 0.3])
    bad = RequestResult(False, prompt_len=40, error="HTTP 500")
    m = summarize([a, b, c, bad], duration=2.0, percentiles=(50, 99), goodput={"ttft": 250, "tpot": 150}, num_gpus=2)
    assert m["completed"] == 3 and m["failed"] == 1
    assert m["total_input_tokens"] == 60 and m["total_output_tokens"] == 9
    assert m["request_throughput"] == 1.5 and m["output_throughput"] == 4.5 and m["total_token_throughput"] == 34.5
    assert m["output_throughput_per_gpu"] == 2.25
    assert m["mean_ttft_ms"] == pytest.approx(200.0) and m["median_ttft_ms"] == pytest.approx(200.0)
    # TPOT excludes the first token: a: (500-100)/4 = 100 ms, c: (700-300)/2 = 200 ms; b has none
    assert m["mean_tpot_ms"] == pytest.approx(150.0) and m["median_tpot_ms"] == pytest.approx(150.0)
    assert m["p99_tpot_ms"] == pytest.approx(199.0)
    # ITL: every gap, pooled: [100]*4 + [100, 300]
    assert m["mean_itl_ms"] == pytest.approx(800 / 6) and m["median_itl_ms"] == pytest.approx(100.0)
    assert m["mean_e2el_ms"] == pytest.approx(1400 / 3)
    # goodput: a (ttft 100, tpot 100) and b (ttft 200, tpot 0) meet it; c (ttft 300) does not
    assert m["request_goodput"] == 1.0
    assert m["std_ttft_ms"] == pytest.approx((20000 / 3) ** 0.5)


def test_goodput_parsing_and_slo():
    assert parse_goodput(["ttft:200", "tpot:35"]) == {"ttft": 200.0, "tpot": 35.0}
    assert parse_goodput(["itl:40"]) == {"itl": 40.0}
    for bad in (["ttft"], ["p99:3"], ["tpot:0"], ["tpot:-1"], ["itl:"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)
    r = RequestResult(True, 1, output_len=11, ttft=0.1, latency=0.45)  # tpot 35 ms
    assert meets_slo(r, {"tpot": 35.0}) and not meets_slo(r, {"tpot": 34.9})


def test_itl_slo_is_each_requests_p99_and_records_keep_every_request():
    # 99 gaps of 10 ms and one stall of 210 ms: P99 = 10 + 0.01 * 200 = 12 ms; the mean TPOT stays low
    stall = RequestResult(True, 8, output_len=101, ttft=0.05, latency=0.05 + 99 * 0.01 + 0.21, itl=[0.01] * 99 + [0.21])
    smooth = RequestResult(True, 8, output_len=101, ttft=0.05, latency=0.05 + 100 * 0.011, itl=[0.011] * 100)
    assert stall.p99_itl == pytest.approx(0.012) and smooth.p99_itl == pytest.approx(0.011)
    assert meets_slo(smooth, {"itl": 11.5}) and not meets_slo(stall, {"itl": 11.5}) and meets_slo(stall, {"itl": 12.5})
    assert meets_slo(stall, {"tpot": 12.0}) and not meets_slo(stall, {"tpot": 12.0, "itl": 11.5})
    m = summarize([stall, smooth], 1.0, goodput={"itl": 11.5})
    assert m["request_goodput"] == 1.0
    rec = stall.record()
    assert rec["ok"] and rec["input_tokens"] == 8 and rec["output_tokens"] == 101
    assert rec["max_itl_ms"] == pytest.approx(210.0) and rec["p99_itl_ms"] == pytest.approx(12.0)
    assert rec["tpot_ms"] == pytest.approx(12.0) and rec["ttft_ms"] == pytest.approx(50.0)
    failed = RequestResult(False, 8, error="HTTP 429").record()
    assert not failed["ok"] and failed["error"] == "HTTP 429" and failed["tpot_ms"] is None


def test_datasets_are_token_exact_and_share_prefixes():
    reqs = random_dataset(5, 64, 16, vocab_size=1000, decode=lambda ids: " ".join(map(str, ids)), special_ids=[0, 1, 2])
    assert [r.prompt_len for r in reqs] == [64] * 5 and all(r.output_len == 16 for r in reqs)
    assert all(t not in (0, 1, 2) for r in reqs for t in r.prompt_ids)
    ranged = random_dataset(50, 100, 10, 1000, str, range_ratio=0.5, seed=3)
    assert all(50 <= r.prompt_len <= 150 for r in ranged) and len({r.prompt_len for r in ranged}) > 5
    groups = shared_prefix_dataset(3, 4, prefix_len=16, suffix_len=8, output_len=4, vocab_size=500, decode=str)
    assert len(groups) == 12 and all(r.prompt_len == 24 for r in groups)
    assert len({tuple(r.prompt_ids[:16]) for r in groups}) == 3 and len({tuple(r.prompt_ids) for r in groups}) == 12


def test_poisson_arrivals_have_the_requested_mean_rate():
    async def gaps():
        loop = asyncio.get_running_loop()
        times = [loop.time() async for _ in arrivals(60, 200.0, 1.0, random.Random(0))]
        return times[-1] - times[0]

    span = asyncio.run(gaps())
    assert 0.15 < span < 0.6  # 59 gaps of mean 5 ms


def test_shared_prefix_defaults_are_the_source_workload():
    from pdmesh.bench.cli import apply_dataset_defaults, parser

    a = apply_dataset_defaults(parser().parse_args(["--dataset", "shared-prefix"]))
    assert (a.num_groups, a.prompts_per_group, a.prefix_len, a.suffix_len, a.output_len, a.max_concurrency) == \
        (30, 100, 2048, 6144, 2, [8])
    a = apply_dataset_defaults(parser().parse_args(["--dataset", "shared-prefix", "--output-len", "5", "--request-rate", "3"]))
    assert (a.output_len, a.max_concurrency) == (5, None)
    a = apply_dataset_defaults(parser().parse_args(["--dataset", "random"]))
    assert (a.output_len, a.max_concurrency) == (None, None)
