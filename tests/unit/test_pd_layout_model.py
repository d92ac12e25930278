"""The prefill:decode layout model (benchmarks/pd_layout_model.py) and its fit
(benchmarks/pd_layout_fit.py): exact single-request figures, limiting cases, monotonicity, fits
that reproduce their points, and its check against the committed 2-GPU runs."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.pd_layout_fit import committed, costs_from_workers, layout_of
from benchmarks.pd_layout_model import (SLO, Costs, Layout, Workload, burst_mean_batch, choose, fit_decode, fit_nonneg, fit_prefill,
                                        main, predict, steady_state)

# llama-3.1-8b on an H200 at c86b1ed, as fitted from the committed runs (rounded)
H200 = Costs(alpha_ms=4.7, per_kv_token_ms=3.4e-5, prefill_per_token_ms=0.026, overhead_ms=20.0)


def test_one_request_alone_is_exact() -> None:
    c = Costs(alpha_ms=5.0, per_kv_token_ms=1e-4, per_seq_ms=0.5, prefill_per_token_ms=0.02, prefill_per_token2_ms=1e-6, overhead_ms=7.0)
    w = Workload(1000, 101, 1)
    s, step = 0.02 * 1000 + 1e-6 * 1000 ** 2, 5.0 + 0.5 + 1e-4 * (1000 + 50.5)
    for lay in (Layout(1, 1), Layout(2, 3), Layout(colocated=1, chunk=256), Layout(1, 1, shared_gpu=True)):
        p = predict(lay, w, c)
        assert p.ttft_ms == [pytest.approx(7.0 + s)], lay
        assert p.tpot_ms == [pytest.approx(step)], lay
        assert p.duration_s == pytest.approx((7.0 + s + 100 * step) / 1e3), lay  # o once: the client sees every token o late
        assert p.output_throughput == pytest.approx(101 / p.duration_s)


def test_a_burst_queues_at_the_prefill_gpus() -> None:
    """C requests at once on x prefill GPUs: the last first token after ceil(C/x) prefills."""
    s = H200.prefill_ms(3500)
    for x, conc in ((1, 32), (3, 30)):
        p = predict(Layout(x, 1), Workload(3500, 100, conc), H200)
        assert max(p.ttft_ms) == pytest.approx(H200.overhead_ms + math.ceil(conc / x) * s)
        assert sorted(p.ttft_ms)[:x] == [pytest.approx(H200.overhead_ms + s)] * x


def test_decode_bound_work_wants_decode_gpus() -> None:
    """Short prompts, long outputs, many requests: 1P3D > 2P2D > 3P1D in throughput and goodput."""
    w = Workload(500, 2000, 384, 768)
    ps = [predict(Layout(x, 4 - x), w, H200, [SLO(35.0)]) for x in (1, 2, 3)]
    thr = [p.output_throughput for p in ps]
    assert thr[0] > thr[1] > thr[2], thr
    good = [p.goodput["TPOT 35"] for p in ps]
    assert good[0] > good[1] >= good[2], good
    assert ps[0].busy["decode"] > 0.8 and ps[0].busy["prefill"] < 0.3


def test_prefill_bound_work_wants_prefill_gpus_and_meets_their_capacity() -> None:
    """Long prompts, 2 output tokens, many waves: throughput is the prefill GPUs' x / s(I)."""
    w = Workload(8000, 2, 64, 640)
    s = H200.prefill_ms(8000)
    reqs = [predict(Layout(x, 4 - x), w, H200).request_throughput for x in (1, 2, 3)]
    assert reqs[0] < reqs[1] < reqs[2], reqs
    for x, r in zip((1, 2, 3), reqs):
        assert r == pytest.approx(x / s * 1e3, rel=0.05)
    assert predict(Layout(3, 1), w, H200).busy["prefill"] > 0.9


def test_an_slo_below_the_fastest_step_gives_zero_goodput() -> None:
    w = Workload(2000, 200, 16)
    floor = H200.step_ms(1, 2100)
    for lay in (Layout(1, 3), Layout(2, 2), Layout(colocated=4)):
        p = predict(lay, w, H200, [SLO(floor * 0.99), SLO(1000.0), SLO(1000.0, floor * 0.99)])
        assert p.goodput[SLO(floor * 0.99).name] == 0.0
        assert p.goodput[SLO(1000.0, floor * 0.99).name] == 0.0
        assert p.goodput[SLO(1000.0).name] == pytest.approx(p.request_throughput)


def test_many_waves_reach_the_steady_state() -> None:
    """12 waves: the recursion's throughput is the long-run balance's, less at most the first wave's
    ramp and the last one's drain (one request latency, C / X, over N / X)."""
    for lay in (Layout(1, 1), Layout(1, 3), Layout(colocated=2)):
        w = Workload(3500, 300, 32, 32 * 12)
        got, x = predict(lay, w, H200).request_throughput, steady_state(lay, w, H200)["req_per_s"]
        assert x * 12 / 13 * 0.98 <= got <= x * 1.02, (lay, got, x)


def test_colocated_prefill_stretches_the_token_stream() -> None:
    """Chunks ride on decode steps: TPOT grows with the prefill work (phi) and each request's P99
    ITL is a mixed step (decode + a chunk), which a disaggregated layout does not see."""
    w = Workload(3500, 1500, 64)
    tpots = [predict(Layout(colocated=2), w, Costs(**{**H200.__dict__, "chunk_overhead": phi})).percentile("tpot_ms", 50)
             for phi in (1.0, 1.5, 2.0)]
    assert tpots[0] < tpots[1] < tpots[2]
    col = predict(Layout(colocated=2, chunk=2048), w, H200)
    dis = predict(Layout(1, 1), w, H200)
    assert col.percentile("p99_itl_ms", 50) > H200.prefill_ms(3500) / 2 > dis.percentile("p99_itl_ms", 50)
    itl = SLO(35.0, 40.0).name
    assert col.goodput[itl] < 0.5 * col.request_throughput and dis.goodput[itl] == pytest.approx(dis.request_throughput)
    smaller = predict(Layout(colocated=2, chunk=512), w, H200)  # 7 chunks of 1/7 the work each
    assert smaller.percentile("p99_itl_ms", 50) < col.percentile("p99_itl_ms", 50)


def test_more_concurrency_raises_throughput_until_the_slo_gives_way() -> None:
    ps = [predict(Layout(1, 1), Workload(3500, 1500, c), H200, [SLO(20.0)]) for c in (16, 64, 256)]
    assert ps[0].output_throughput < ps[1].output_throughput < ps[2].output_throughput
    assert ps[1].goodput["TPOT 20"] == pytest.approx(ps[1].request_throughput)  # every request meets it
    assert ps[2].goodput["TPOT 20"] < 0.1 * ps[2].request_throughput  # all but the ramp's first few miss it
    assert ps[0].percentile("tpot_ms", 50) < ps[1].percentile("tpot_ms", 50) < ps[2].percentile("tpot_ms", 50)


def test_a_full_decode_batch_makes_requests_wait_for_a_slot() -> None:
    c = Costs(**{**H200.__dict__, "max_batch": 4})
    p = predict(Layout(1, 1), Workload(100, 200, 8), c)
    waited = sorted(p.tpot_ms)[4:]
    assert min(waited) > 1.8 * max(sorted(p.tpot_ms)[:4])  # about one whole window of the first four
    assert predict(Layout(1, 2), Workload(100, 200, 8), c).percentile("tpot_ms", 100) < 0.6 * max(waited)


def test_fits_reproduce_their_points() -> None:
    truth = Costs(alpha_ms=4.0, per_kv_token_ms=3e-5, per_seq_ms=0.02, prefill_per_token_ms=0.02, prefill_per_token2_ms=2e-6)
    pts = [(b, ctx, truth.step_ms(b, ctx)) for b in (1, 16, 64, 128) for ctx in (2000, 4000)]
    got = fit_decode(pts)
    assert got == pytest.approx({"alpha_ms": 4.0, "per_kv_token_ms": 3e-5, "per_seq_ms": 0.02}, rel=1e-6)
    one_ctx = fit_decode([p for p in pts if p[1] == 2000])  # B and B*L are proportional: per_seq folds into the KV term
    assert one_ctx["per_seq_ms"] == 0.0
    for b, ctx, ms in pts:
        if ctx == 2000:
            assert one_ctx["alpha_ms"] + one_ctx["per_kv_token_ms"] * b * ctx == pytest.approx(ms)
    assert fit_decode([(8, 3000, 9.0)]) == {"alpha_ms": 9.0, "per_kv_token_ms": 0.0, "per_seq_ms": 0.0}
    pre = fit_prefill([(i, truth.prefill_ms(i)) for i in (1000, 2500, 3500)])
    assert pre == pytest.approx({"prefill_per_token_ms": 0.02, "prefill_per_token2_ms": 2e-6}, rel=1e-6)
    assert fit_prefill([(3500, 99.0)]) == pytest.approx({"prefill_per_token_ms": 99.0 / 3500, "prefill_per_token2_ms": 0.0})


def test_fit_keeps_coefficients_non_negative() -> None:
    # the step gets faster with the batch: no negative per-sequence cost, a flat step instead
    got = fit_nonneg([(1.0, 1.0), (1.0, 10.0), (1.0, 20.0)], [10.0, 9.0, 8.0], ("alpha_ms", "per_seq_ms"))
    assert got == pytest.approx({"alpha_ms": 9.0, "per_seq_ms": 0.0})
    with pytest.raises(ValueError, match="at least one point"):
        fit_nonneg([], [], ("a",))


def test_costs_from_workers_recover_the_costs() -> None:
    """Workers' windows made from known costs (a 1P1D and a colocated point) fit back to them."""
    truth = Costs(alpha_ms=5.0, per_kv_token_ms=3e-5, prefill_per_token_ms=0.025, overhead_ms=30.0, chunk_overhead=1.25)
    pts = []
    for inp, out, b in ((3500, 1500, 20.0), (2500, 1500, 50.0)):
        ctx, s = inp + out / 2, truth.prefill_ms(inp)
        dec = {"decode_steps": 100, "decode_step_tokens": 100 * b, "mean_decode_step_ms": truth.step_ms(b, ctx)}
        pre = {"prefill_steps": 40, "prefill_step_tokens": 40, "mean_prefill_step_ms": s}
        pts.append({"layout": Layout(1, 1), "input_len": inp, "output_len": out, "concurrency": 32, "num_prompts": 32,
                    "workers": [dec, pre], "ttfts": [30.0 + s, 30.0 + 2 * s], "measured": {}})
        mixed_b = 10.0
        colo = {"mixed_steps": 64, "mixed_step_tokens": 640, "prompts": 32, "prefill_steps": 0, "mean_prefill_step_ms": None,
                "mean_mixed_step_ms": truth.step_ms(mixed_b, ctx) + 32 * 1.25 * s / 64}
        pts.append({"layout": Layout(colocated=2), "input_len": inp, "output_len": out, "concurrency": 32, "num_prompts": 32,
                    "workers": [colo], "ttfts": [], "measured": {}})
    got, used = costs_from_workers(pts)
    assert len(used["decode_points"]) == 2 and len(used["prefill_points"]) == 2
    assert got.alpha_ms == pytest.approx(5.0) and got.per_kv_token_ms == pytest.approx(3e-5)
    assert got.prefill_ms(3500) == pytest.approx(truth.prefill_ms(3500)) and got.prefill_ms(2500) == pytest.approx(truth.prefill_ms(2500))
    assert got.overhead_ms == pytest.approx(30.0) and got.chunk_overhead == pytest.approx(1.25)
    with pytest.raises(ValueError, match="need both"):
        costs_from_workers([p for p in pts if p["layout"].colocated])


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="alpha_ms"):
        Costs(alpha_ms=-1.0, per_kv_token_ms=0.0, prefill_per_token_ms=0.01)
    with pytest.raises(ValueError, match="prefill must cost"):
        Costs(alpha_ms=1.0, per_kv_token_ms=0.0, prefill_per_token_ms=0.0)
    with pytest.raises(ValueError, match="unknown fields"):
        Costs.from_dict({"alpha_ms": 1.0, "per_kv_token_ms": 0.0, "prefill_per_token_ms": 0.01, "bogus": 1})
    with pytest.raises(ValueError, match="expected xPyD"):
        Layout.parse("4X")
    with pytest.raises(ValueError, match="prefill >= 1"):
        Layout(prefill=1, decode=0)
    with pytest.raises(ValueError, match="output_len >= 2"):
        Workload(100, 1, 4)
    with pytest.raises(ValueError, match="tpot:MS"):
        SLO.parse("ttft:100")
    assert Layout.parse("1P3D") == Layout(1, 3) and Layout.parse("4C", 1024) == Layout(colocated=4, chunk=1024)
    assert layout_of("colocated-1024") == Layout(colocated=2, chunk=1024) and layout_of("disagg-1gpu") == Layout(1, 1, shared_gpu=True)
    assert SLO.parse("tpot:20,itl:40") == SLO(20.0, 40.0)


def test_burst_mean_batch() -> None:
    assert burst_mean_batch(1, 100.0, 1000.0) == 1.0
    assert burst_mean_batch(10, 0.0, 1000.0) == 10.0  # all at once
    assert burst_mean_batch(10, 2000.0, 1000.0) == 1.0  # no two overlap
    assert 1.0 < burst_mean_batch(10, 100.0, 1000.0) < 10.0


def test_choose_and_cli(tmp_path, capsys) -> None:
    ranked = choose(4, 500, 2000, H200, SLO(35.0), [128, 384])
    assert [r[0] for r in ranked][:1] in (["1P3D"], ["4C"]) and ranked[-1][0] == "3P1D"
    f = tmp_path / "costs.json"
    f.write_text(json.dumps({"costs": H200.__dict__}))
    assert main(["--costs", str(f), "--gpus", "2", "--shape", "3500:200", "--concurrency", "8", "16", "--slo", "tpot:35"]) == 0
    text = capsys.readouterr().out
    assert "| 1P1D | 8 |" in text and "| 2C | 16 |" in text and "TPOT 35: " in text
    f.write_text(json.dumps({"alpha_ms": 1.0}))
    assert main(["--costs", str(f)]) == 2


def test_check_against_the_committed_runs() -> None:
    """The committed check: fitted on 1P1D alone and at concurrency 32, the model predicts the
    other 2-GPU points (1P1D at 64/128, colocated at 32-128) within 10% throughput and TPOT."""
    text = committed()
    first = text.split("### ")[1]
    for label in ("out tok/s", "TPOT p50"):
        line = next(x for x in first.splitlines() if x.startswith(f"- {label}:"))
        largest = float(line.split("largest ")[1].split("%")[0])
        assert largest <= 10.0, line
