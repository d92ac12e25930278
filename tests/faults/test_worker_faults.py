"""Workers killed at each point of a request's path, KV transfers that fail, a decode worker that
refuses, the scheduler killed and restarted under load: clients get their tokens (recomputed
where the KV was lost) or a clean error, never a hang or a silent truncation; nothing leaks."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from tests.faults.client import WORKER_ARGS, Tally, body, greedy, make_client, nothing_lost, stream
from tests.meshproc import Services, gateway_books, list_workers, scrape, wait_http, wait_until

PROMPT = list(range(2000, 2300))  # 300 tokens: 19 KV blocks, 4 transfer chunks


@pytest.fixture(scope="module")
def pair(tmp_path_factory, embedded_dir):
    svc = Services(tmp_path_factory.mktemp("pair"), prefill=1, decode=1, worker_args=WORKER_ARGS,
                   gateway_args=("--api-key", "fault-suite-key"))
    yield svc
    rcs = svc.stop_all()
    assert all(rc == 0 for rc in rcs.values()), rcs


def restart(svc: Services, name: str, *extra: str, kill: bool = False) -> None:
    if svc.procs[name].alive():
        if kill:
            svc.kill(name)
            svc.procs[name].p.wait(30)
        else:
            assert svc.stop(name) == 0, svc.procs[name].tail()
    svc.start(name, extra)
    svc.wait_registered(name)
    svc.wait_workers(1, 1)
    wait_http(svc.base + "/health", svc.procs["gateway"])


def run(coro):
    return asyncio.run(coro)


async def _one(svc: Services, tally: Tally, payload: dict, at_chunk: int, action) -> "object":
    """Stream ``payload``; when chunk ``at_chunk`` arrives run ``action()`` (in a thread)."""
    fired = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_chunk(n: int) -> None:
        if n == at_chunk and not fired.is_set():
            fired.set()
            loop.run_in_executor(None, action)

    async with make_client(svc.base) as c:
        return await stream(c, tally, payload, on_chunk=on_chunk, timeout=60)


def test_sigkill_decode_mid_stream_ends_with_an_error_event(pair, report):
    before = gateway_books(pair.metrics_url("gateway"))
    tally = Tally()
    t0 = time.monotonic()
    o = run(_one(pair, tally, body(PROMPT[:50], 400), 5, lambda: pair.kill("decode-0")))
    assert o.kind == "error" and o.status == 200, o  # after the stream began: an error event, then close
    assert o.finish_reason is None, "a killed decode worker must not look like a finished stream"
    assert o.error["message"] and o.error["type"], o.error
    assert time.monotonic() - t0 < 15, "the stream hung"
    pair.procs["decode-0"].p.wait(30)  # its sockets close before the process can be reaped
    restart(pair, "decode-0")
    leaked = nothing_lost(pair.scheduler, pair.metrics_url("gateway"), tally, before, expect_workers=2)
    assert greedy(pair, PROMPT[:20], 4)
    report.add("sigkill_decode_mid_stream", tally, faults_injected=1, blocks_leaked=leaked)


def test_sigkill_prefill_after_prefill_before_the_pull_recomputes(pair, report):
    ref = greedy(pair, PROMPT, 24)
    before = gateway_books(pair.metrics_url("gateway"))
    tally = Tally()
    pair.kill("decode-0", signal.SIGSTOP)  # decode takes the request but cannot pull yet

    def kill_prefill_then_resume_decode() -> None:  # token 0 arrived: prefill holds the KV, decode cannot pull
        pair.kill("prefill-0")
        pair.procs["prefill-0"].p.wait(10)
        pair.kill("decode-0", signal.SIGCONT)

    try:
        o = run(_one(pair, tally, body(PROMPT, 24), 1, kill_prefill_then_resume_decode))
    finally:
        pair.kill("decode-0", signal.SIGCONT)
    assert o.kind == "ok" and o.finish_reason == "length", o
    assert o.text == ref, "recomputed tokens differ from the undisturbed run"
    restart(pair, "prefill-0")
    leaked = nothing_lost(pair.scheduler, pair.metrics_url("gateway"), tally, before, expect_workers=2)
    report.add("sigkill_prefill_before_pull", tally, faults_injected=1, blocks_leaked=leaked)


def test_sigkill_prefill_during_the_transfer_recomputes(pair, report):
    ref = greedy(pair, PROMPT, 24)
    restart(pair, "prefill-0", "--inject-kv-faults", "delay:0.4")  # 4 chunks: a 1.6 s transfer
    before = gateway_books(pair.metrics_url("gateway"))
    tally = Tally()
    def kill_prefill_mid_pull() -> None:  # once decode's pull has begun (its chunks take 4 x 0.4 s)
        wait_until(lambda: scrape(prefill_metrics(pair)).get('pdmesh:kv_transfer_faults_injected_total{mode="delay"}'),
                   10, "a KV pull started")
        pair.kill("prefill-0")

    o = run(_one(pair, tally, body(PROMPT, 24), 1, kill_prefill_mid_pull))
    assert o.kind == "ok" and o.text == ref, o
    dm = scrape(decode_metrics(pair))
    assert dm.get('pdmesh:kv_transfer_failures_total{action="recompute"}', 0) >= 1
    restart(pair, "prefill-0", kill=True)
    leaked = nothing_lost(pair.scheduler, pair.metrics_url("gateway"), tally, before, expect_workers=2)
    report.add("sigkill_prefill_during_transfer", tally, faults_injected=1, blocks_leaked=leaked)


def decode_metrics(svc: Services) -> str:
    return svc.metrics_url("decode-0")


def prefill_metrics(svc: Services) -> str:
    return svc.metrics_url("prefill-0")


def _varied(i: int) -> list[int]:
    return [3000 + i] + PROMPT[1:120]  # a distinct first token: no prefix-cache hit on decode, one pull each


def test_injected_transfer_failures_recompute_or_fail_per_policy(pair, report):
    refs = [greedy(pair, _varied(i), 8) for i in range(12)]
    # every 3rd pull aborted; decode recomputes: every client gets exactly its tokens
    restart(pair, "prefill-0", "--inject-kv-faults", "fail:3")
    restart(pair, "decode-0")  # fresh prefix cache: every request pulls
    before = gateway_books(pair.metrics_url("gateway"))
    tally = Tally()

    async def sequential(prompts, max_tokens):
        async with make_client(pair.base) as c:
            return [await stream(c, tally, body(p, max_tokens)) for p in prompts]

    outs = run(sequential([_varied(i) for i in range(12)], 8))
    assert [o.kind for o in outs] == ["ok"] * 12, tally.summary()
    assert [o.text for o in outs] == refs
    injected = scrape(prefill_metrics(pair)).get('pdmesh:kv_transfer_faults_injected_total{mode="fail"}', 0)
    recomputed = scrape(decode_metrics(pair)).get('pdmesh:kv_transfer_failures_total{action="recompute"}', 0)
    assert injected == 4 and recomputed == 4, (injected, recomputed)
    # every 2nd pull truncated; decode fails those requests: a clean error event each, no leak
    restart(pair, "prefill-0", "--inject-kv-faults", "truncate:2")
    restart(pair, "decode-0", "--kv-load-failure-policy", "fail")
    outs = run(sequential([_varied(100 + i) for i in range(10)], 8))
    failed = [o for o in outs if o.kind == "error"]
    assert len(failed) == 5 and sum(o.kind == "ok" for o in outs) == 5, tally.summary()
    for o in failed:
        assert o.status == 200 and o.finish_reason is None and "KV transfer failed" in o.error["message"], o
    truncated = scrape(prefill_metrics(pair)).get('pdmesh:kv_transfer_faults_injected_total{mode="truncate"}', 0)
    leaked = nothing_lost(pair.scheduler, pair.metrics_url("gateway"), tally, before, expect_workers=2)
    restart(pair, "prefill-0")
    restart(pair, "decode-0")
    report.add("injected_transfer_failures", tally, faults_injected=int(injected + truncated), blocks_leaked=leaked,
               recomputed=int(recomputed), failed_by_policy=len(failed))


def test_decode_refusing_makes_prefill_free_at_once(pair, report):
    # ~48 blocks of KV on decode: two 300-token prompts fit, a third does not (until one ends)
    restart(pair, "decode-0", "--kv-cache-memory", str(48 * 737280))
    before = gateway_books(pair.metrics_url("gateway"))
    tally = Tally()
    held_zero_after: list[float] = []

    async def main():
        async with make_client(pair.base) as c:
            async def refused_watch(o):
                t = time.monotonic()
                while time.monotonic() - t < 5:
                    held = await asyncio.to_thread(lambda: scrape(prefill_metrics(pair))["pdmesh:kv_blocks_held_for_transfer"])
                    if held == 0:
                        held_zero_after.append(time.monotonic() - t)
                        return
                    await asyncio.sleep(0.1)

            async def one(i):
                o = await stream(c, tally, body([4000 + i] + PROMPT[1:], 120))
                if o.kind == "error":
                    await refused_watch(o)
                return o

            return await asyncio.gather(*(one(i) for i in range(4)))

    outs = run(main())
    refused = [o for o in outs if o.kind == "error"]
    assert refused and all(o.status == 200 and o.error["code"] == "resource_exhausted" for o in refused), tally.summary()
    assert all(o.kind in ("ok", "error") for o in outs)
    # freed by the refusal itself (the gauge refreshes every 0.5 s), not by the 8 s lease
    assert held_zero_after and max(held_zero_after) < 2.0, held_zero_after
    leaked = nothing_lost(pair.scheduler, pair.metrics_url("gateway"), tally, before, expect_workers=2)
    restart(pair, "decode-0")
    report.add("decode_refuses_after_prefill", tally, faults_injected=len(refused), blocks_leaked=leaked,
               prefill_freed_within_s=round(max(held_zero_after), 2))


def test_scheduler_killed_and_restarted_under_load(pair, report):
    before = gateway_books(pair.metrics_url("gateway"))
    tally = Tally()
    timeline: list[tuple[float, str, int]] = []
    t0 = time.monotonic()

    async def load(seconds: float):
        async with make_client(pair.base) as c:
            async def loop_():
                while time.monotonic() - t0 < seconds:
                    o = await stream(c, tally, body(PROMPT[:30], 8), timeout=30)
                    timeline.append((time.monotonic() - t0, o.kind, o.status))
                    if o.kind != "ok":
                        await asyncio.sleep(0.2)

            await asyncio.gather(*(loop_() for _ in range(4)))

    def chaos():
        wait_until(lambda: sum(k == "ok" for _, k, _ in timeline) >= 8, 30, "load flowing before the kill")
        pair.kill("scheduler")
        pair.procs["scheduler"].p.wait(10)
        wait_until(lambda: any(k == "error" for _, k, _ in timeline), 30, "requests refused while the scheduler is down")
        pair.start("scheduler")

    async def main():
        await asyncio.gather(load(16), asyncio.to_thread(chaos))

    run(main())
    bad = [(t, k, s) for t, k, s in timeline if k != "ok" and not (k == "error" and s == 503)]
    assert not bad, bad  # every request either completed or got a 503 (never a hang, never a 5xx other than 503)
    assert any(k == "error" for _, k, _ in timeline), "the gap was not observed"
    assert any(k == "ok" and t > 10 for t, k, _ in timeline), "the mesh did not come back after the restart"
    assert all(k == "ok" for t, k, _ in timeline if t > 12), timeline[-10:]
    pair.wait_workers(1, 1)
    leaked = nothing_lost(pair.scheduler, pair.metrics_url("gateway"), tally, before, expect_workers=2)
    report.add("scheduler_restart_under_load", tally, faults_injected=1, blocks_leaked=leaked,
               refused_503_in_gap=sum(1 for _, k, _ in timeline if k == "error"))


def test_route_to_a_decode_worker_that_stopped_listening_goes_to_another(tmp_path, embedded_dir, report):
    """A route handed out before a decode worker's port closed (it was killed; the scheduler lists it
    until its lease runs out, and a draining worker's last routes race its server's stop): the call
    fails UNAVAILABLE before the worker accepted it, the KV is untouched, so the gateway offers it to
    the other decode worker instead of failing the request."""
    svc = Services(tmp_path, prefill=1, decode=2, worker_args=WORKER_ARGS,
                   gateway_args=("--api-key", "fault-suite-key"), scheduler_args=("--lease", "30", "--routing", "round-robin"))
    try:
        svc.wait_workers(1, 2)
        ref = greedy(svc, PROMPT[:20], 6)
        before = gateway_books(svc.metrics_url("gateway"))
        svc.kill("decode-1")
        svc.procs["decode-1"].p.wait(30)  # its port is closed; the scheduler still routes to it
        tally = Tally()

        async def main():
            async with make_client(svc.base) as c:
                return [await stream(c, tally, body(PROMPT[:20], 6)) for _ in range(6)]

        outs = run(main())
        assert [o.kind for o in outs] == ["ok"] * 6, [o for o in outs if o.kind != "ok"]
        assert all(o.text == ref for o in outs), (ref, [o.text for o in outs])
        dead = f"decode-127.0.0.1-{svc.ports['decode-1'][0]}"
        assert dead in [w.info.worker_id for w in list_workers(svc.scheduler)], "the killed worker left routing too early"
        svc.procs["gateway"].wait_log(f"decode {dead} refused", 5)  # routed there, then offered to decode-0
        svc.start("decode-1")
        svc.wait_registered("decode-1")
        leaked = nothing_lost(svc.scheduler, svc.metrics_url("gateway"), tally, before, expect_workers=3)
        report.add("route_to_closed_decode_port", tally, faults_injected=1, blocks_leaked=leaked)
    finally:
        rcs = svc.stop_all()
    assert all(rc == 0 for rc in rcs.values()), rcs
