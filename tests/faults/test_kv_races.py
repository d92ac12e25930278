"""Races between a KV transfer still writing and the blocks it writes changing hands.

A pull is slowed by fault injection so that its copy is still in flight when the client goes
away; other requests then take the freed blocks.  With ``--kv-audit`` every worker checksums each
request's prompt KV when it is complete and again when its blocks are freed, so a late write into
blocks that another request owns shows up as a mismatch; the other requests' tokens must equal an
undisturbed run, and every block must be free at the end.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.faults.client import WORKER_ARGS, Outcome, Tally, body, make_client, nothing_lost, stream
from tests.meshproc import Services, gateway_books, scrape

PROMPT_LEN = 300  # 10 blocks of 32 tokens: 5 chunks of the grpc transport
PIECE_DELAY = 1.5
"""Seconds between the pieces of the slowed pull landing (5 pieces: a 7.5 s copy)."""
CANCEL_AFTER = 1.9
"""Seconds after the first token at which the client of the slowed request hangs up: one piece
has landed, the next lands about a second later, after the other requests took the blocks."""


def _prompt(i: int) -> list[int]:
    return [5000 + 17 * i + k % 700 for k in range(PROMPT_LEN)]


def _greedy(svc: Services, prompt: list[int], max_tokens: int) -> str:
    r = httpx.post(svc.base + "/v1/completions", headers={"Authorization": "Bearer fault-suite-key"}, timeout=60,
                   json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.fixture(scope="module", params=["grpc", "nixl"])
def slowed(request, tmp_path_factory, embedded_dir):
    """Decode without a prefix cache (freed blocks go straight to the next request) whose 4th pull
    lands one piece every PIECE_DELAY s, over the two-sided (grpc) and a one-sided (nixl)
    transport; both workers audit KV contents."""
    svc = Services(tmp_path_factory.mktemp("races"), prefill=1, decode=1,
                   worker_args=WORKER_ARGS + ("--kv-transports", request.param),
                   role_args={"decode": ("--no-enable-prefix-caching", "--inject-kv-faults", f"delay:{PIECE_DELAY}:4")},
                   gateway_args=("--api-key", "fault-suite-key"))
    yield svc
    rcs = svc.stop_all()
    assert all(rc == 0 for rc in rcs.values()), rcs


def test_cancel_mid_pull_never_lets_the_copy_write_into_reused_blocks(slowed, report):
    svc = slowed
    others = [_prompt(i) for i in (1, 2, 3)]
    refs = [_greedy(svc, p, 48) for p in others]  # pulls 1-3, undisturbed
    before = gateway_books(svc.metrics_url("gateway"))
    tally = Tally()

    async def main():
        async with make_client(svc.base) as c:
            first = asyncio.Event()
            slow = asyncio.create_task(stream(c, Tally(), body(_prompt(0), 48), on_chunk=lambda n: first.set()))
            await asyncio.wait_for(first.wait(), 30)  # token 0 is out: the slowed pull (the 4th) runs
            await asyncio.sleep(CANCEL_AFTER)
            slow.cancel()  # the client hangs up mid-pull
            tally.sent += 1
            tally.add(Outcome("aborted", 200))
            return await asyncio.gather(*(stream(c, tally, body(p, 48)) for p in others))

    t0 = time.monotonic()
    outs = asyncio.run(main())
    assert [o.kind for o in outs] == ["ok"] * 3, tally.summary()
    time.sleep(max(0.0, 5 * PIECE_DELAY + 1.0 - (time.monotonic() - t0)))  # past the slowed copy's end
    time.sleep(1.0)  # the audit counters reach /metrics within 0.5 s
    for name in ("decode-0", "prefill-0"):
        m = scrape(svc.metrics_url(name))
        assert m.get("pdmesh:kv_audit_mismatches_total", 0) == 0, f"{name}: KV changed under its owner"
    assert [o.text for o in outs] == refs, "another request's tokens changed: its KV was overwritten"
    leaked = nothing_lost(svc.scheduler, svc.metrics_url("gateway"), tally, before, expect_workers=2)
    m = scrape(svc.metrics_url("decode-0"))
    transport = svc.worker_args[svc.worker_args.index("--kv-transports") + 1]
    assert m.get(f'pdmesh:kv_transfer_bytes_total{{transport="{transport}"}}', 0) > 0, "the pulls did not use " + transport
    report.add(f"cancel_mid_pull_block_reuse_{transport}", tally, faults_injected=1, blocks_leaked=leaked)


READ_PIECE_DELAY = 1.0
"""Seconds between the pieces of the slowed one-sided read (5 pieces: a 5 s read)."""


@pytest.fixture(scope="module")
def short_lease(tmp_path_factory, embedded_dir):
    """A one-sided transport (nixl) whose 4th read takes ~5 s, from a prefill worker whose leases
    expire after 1 s and whose freed blocks go straight to the next prompt (no prefix cache)."""
    svc = Services(tmp_path_factory.mktemp("source-race"), prefill=1, decode=1,
                   worker_args=WORKER_ARGS + ("--kv-transports", "nixl", "--no-enable-prefix-caching"),
                   role_args={"prefill": ("--kv-lease-seconds", "1"),
                              "decode": ("--inject-kv-faults", f"delay:{READ_PIECE_DELAY}:4")},
                   gateway_args=("--api-key", "fault-suite-key"))
    yield svc
    rcs = svc.stop_all()
    assert all(rc == 0 for rc in rcs.values()), rcs


def test_source_blocks_stay_put_under_a_one_sided_read(short_lease, report):
    """The read outlives the lease's soft deadline while other prompts are computed on prefill:
    the read pin keeps the source blocks until the read ends, so the slowed request's KV arrives
    as it was (the decode worker compares it with the descriptor's checksums) and its tokens and
    the others' equal an undisturbed run."""
    svc = short_lease
    slow_prompt, others = _prompt(10), [_prompt(i) for i in (11, 12, 13)]
    ref_slow = _greedy(svc, slow_prompt, 24)  # pull 1
    refs = [_greedy(svc, p, 24) for p in others[:2]]  # pulls 2, 3
    before = gateway_books(svc.metrics_url("gateway"))
    tally = Tally()

    async def main():
        async with make_client(svc.base) as c:
            first = asyncio.Event()
            slow = asyncio.create_task(stream(c, tally, body(slow_prompt, 24), on_chunk=lambda n: first.set()))
            await asyncio.wait_for(first.wait(), 30)  # the slowed read (the 4th pull) runs
            await asyncio.sleep(1.5)  # past the lease's soft deadline
            rest = await asyncio.gather(*(stream(c, tally, body(p, 24)) for p in others[:2]))
            return await slow, rest

    slow_out, outs = asyncio.run(main())
    assert slow_out.kind == "ok" and all(o.kind == "ok" for o in outs), tally.summary()
    time.sleep(1.0)  # the audit counters reach /metrics within 0.5 s
    for name in ("decode-0", "prefill-0"):
        m = scrape(svc.metrics_url(name))
        assert m.get("pdmesh:kv_audit_mismatches_total", 0) == 0, f"{name}: KV changed under a reader"
    assert slow_out.text == ref_slow, "the slowed request's tokens changed: its source KV was reused mid-read"
    assert [o.text for o in outs] == refs
    leaked = nothing_lost(svc.scheduler, svc.metrics_url("gateway"), tally, before, expect_workers=2)
    report.add("one_sided_read_outlives_soft_lease", tally, faults_injected=1, blocks_leaked=leaked)
