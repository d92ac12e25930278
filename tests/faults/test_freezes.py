"""SIGSTOP of each service: a frozen peer is not a dead one (its sockets stay open, the kernel even
acknowledges what is sent to it), so only keepalive pings and stream idle deadlines can tell.
Bounds: a frozen worker fails the calls on its connections within KEEPALIVE_S + PING_TIMEOUT_S
(6 s) — a request waiting on a frozen prefill is retried elsewhere, a stream from a frozen decode
worker ends with an error event; a frozen scheduler costs new requests a 503 within the gateway's
route timeout while streams in flight finish; a frozen gateway's calls are dropped by the workers
within the same 6 s, freeing their KV while it is still stopped.  After SIGCONT everything is back
at baseline and the books balance."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import pytest

from pdmesh.rpc.server import KEEPALIVE_S, PING_TIMEOUT_S
from tests.faults.client import WORKER_ARGS, Load, Tally, body, make_client, nothing_lost, stream
from tests.meshproc import Services, gateway_books, wait_http, wait_idle

DETECT_S = KEEPALIVE_S + PING_TIMEOUT_S
SLACK_S = 5.0
"""Scheduling slack on a loaded 2-core machine (the bound asserted is DETECT_S + SLACK_S)."""


@pytest.fixture(scope="module")
def frozen(tmp_path_factory, embedded_dir):
    svc = Services(tmp_path_factory.mktemp("freeze"), prefill=2, decode=1, worker_args=WORKER_ARGS,
                   gateway_args=("--api-key", "fault-suite-key", "--route-timeout", "3"))
    svc.wait_workers(2, 1)
    yield svc
    for name in svc.procs:  # never leave a stopped process behind
        if svc.procs[name].alive():
            svc.kill(name, signal.SIGCONT)
    rcs = svc.stop_all()
    assert all(rc == 0 for rc in rcs.values()), rcs


def run(coro):
    return asyncio.run(coro)


def test_frozen_decode_worker_ends_its_streams_with_an_error(frozen, report):
    before = gateway_books(frozen.metrics_url("gateway"))
    tally = Tally()
    froze_at: list[float] = []

    def freeze(n: int) -> None:
        if n == 3 and not froze_at:
            frozen.kill("decode-0", signal.SIGSTOP)
            froze_at.append(time.monotonic())

    async def main():
        async with make_client(frozen.base) as c:
            return await stream(c, tally, body(list(range(3000, 3040)), 400), on_chunk=freeze, timeout=60)

    try:
        o = run(main())
        ended_after = time.monotonic() - froze_at[0]
    finally:
        frozen.kill("decode-0", signal.SIGCONT)
    assert o.kind == "error" and o.status == 200 and o.finish_reason is None, o  # an error event, never a silent stall
    assert ended_after < DETECT_S + SLACK_S, ended_after
    leaked = nothing_lost(frozen.scheduler, frozen.metrics_url("gateway"), tally, before, expect_workers=3)
    report.add("sigstop_decode_mid_stream", tally, faults_injected=1, blocks_leaked=leaked,
               stream_ended_after_s=round(ended_after, 1), bound_s=DETECT_S + SLACK_S)


def test_frozen_prefill_worker_fails_over(frozen, report):
    before = gateway_books(frozen.metrics_url("gateway"))
    tally = Tally()
    frozen.kill("prefill-0", signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        async def main():  # sent at once while the frozen worker is still routable (3 s lease)
            async with make_client(frozen.base) as c:
                return await asyncio.gather(*(stream(c, tally, body([4000 + i] + list(range(1, 40)), 8), timeout=60)
                                              for i in range(6)))

        outs = run(main())
        slowest = max(o.seconds for o in outs)
    finally:
        frozen.kill("prefill-0", signal.SIGCONT)
    assert [o.kind for o in outs] == ["ok"] * 6, tally.summary()
    assert slowest < DETECT_S + SLACK_S, slowest
    frozen.wait_workers(2, 1)  # it re-registers once it runs again
    leaked = nothing_lost(frozen.scheduler, frozen.metrics_url("gateway"), tally, before, expect_workers=3)
    report.add("sigstop_prefill_failover", tally, faults_injected=1, blocks_leaked=leaked,
               slowest_request_s=round(slowest, 1), bound_s=DETECT_S + SLACK_S, frozen_for_s=round(time.monotonic() - t0, 1))


def test_frozen_scheduler_costs_new_requests_a_503_and_comes_back(frozen, report):
    before = gateway_books(frozen.metrics_url("gateway"))
    tally = Tally()
    inflight: dict = {}

    async def long_one():
        async with make_client(frozen.base) as c:
            inflight["o"] = await stream(c, tally, body(list(range(5000, 5040)), 120), timeout=90)

    th = threading.Thread(target=lambda: run(long_one()))
    th.start()
    time.sleep(1.0)
    frozen.kill("scheduler", signal.SIGSTOP)
    try:
        t = time.monotonic()

        async def new_one():
            async with make_client(frozen.base) as c:
                return await stream(c, tally, body(list(range(10, 30)), 4), timeout=60)

        refused = run(new_one())
        refused_after = time.monotonic() - t
        time.sleep(2.0)
    finally:
        frozen.kill("scheduler", signal.SIGCONT)
    th.join(90)
    assert inflight["o"].kind == "ok", inflight  # streams in flight never needed the scheduler
    assert refused.kind == "error" and refused.status == 503, refused
    assert refused_after < 3.0 + SLACK_S, refused_after  # --route-timeout 3
    t = time.monotonic()
    frozen.wait_workers(2, 1, timeout=30)
    wait_http(frozen.base + "/health", frozen.procs["gateway"], timeout=30)
    back_after = time.monotonic() - t

    async def after_one():
        async with make_client(frozen.base) as c:
            return await stream(c, tally, body(list(range(10, 30)), 4), timeout=60)

    assert run(after_one()).kind == "ok"
    leaked = nothing_lost(frozen.scheduler, frozen.metrics_url("gateway"), tally, before, expect_workers=3)
    report.add("sigstop_scheduler", tally, faults_injected=1, blocks_leaked=leaked, refused_503_after_s=round(refused_after, 1),
               serving_again_after_sigcont_s=round(back_after, 1))


def test_frozen_gateway_is_dropped_by_the_workers(frozen, report):
    before = gateway_books(frozen.metrics_url("gateway"))
    load = Load(frozen.base, max_tokens=200, loops=3)
    time.sleep(2.0)  # streams in flight on every worker
    frozen.kill("gateway", signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        # with the gateway frozen, the workers drop its calls and free their KV
        wait_idle(frozen.scheduler, DETECT_S + SLACK_S, expect=3)
        freed_after = time.monotonic() - t0
    finally:
        frozen.kill("gateway", signal.SIGCONT)
    time.sleep(1.0)
    load.finish()
    kinds = {o.kind for o in load.tally.outcomes}
    assert kinds <= {"ok", "error"} and load.tally.count("truncated") == 0, load.tally.summary()
    cut = [o for o in load.tally.outcomes if o.kind == "error"]
    assert all(o.status == 200 and o.finish_reason is None and o.error for o in cut), cut  # error events, not silence
    leaked = nothing_lost(frozen.scheduler, frozen.metrics_url("gateway"), load.tally, before, expect_workers=3)
    report.add("sigstop_gateway", load.tally, faults_injected=1, blocks_leaked=leaked,
               workers_freed_kv_after_s=round(freed_after, 1), bound_s=DETECT_S + SLACK_S, streams_cut=len(cut))
