"""The nixl KV transport under the fault suite, CPU to CPU with UCX forced onto TCP (what a link
between hosts gives): tokens identical to the grpc transport, a NIXL peer killed mid-transfer,
a restarted peer's stale metadata, a read that never completes (timeout); nothing is lost."""

from __future__ import annotations

import asyncio
import re
import signal
import time

import pytest

from tests.faults.client import WORKER_ARGS, Tally, body, greedy, make_client, nothing_lost, stream
from tests.meshproc import Services, gateway_books, scrape, wait_http

PROMPT = list(range(2000, 2300))  # 300 tokens: 10 KV blocks, 5 pieces when slowed
PROMPTS = [PROMPT, PROMPT[:40], [7] + PROMPT[1:200]]


@pytest.fixture(scope="module")
def nixl_pair(tmp_path_factory, embedded_dir):
    svc = Services(tmp_path_factory.mktemp("nixl"), prefill=1, decode=1, worker_args=WORKER_ARGS,
                   role_args={"prefill": ("--kv-transports", "nixl", "grpc"), "decode": ("--kv-transports", "nixl")},
                   # the restart test freezes decode for a prefill restart (seconds): the gateway must not give up on it
                   gateway_args=("--api-key", "fault-suite-key", "--keepalive", "60", "--stream-idle-timeout", "120"),
                   env={"UCX_TLS": "tcp"})
    yield svc
    rcs = svc.stop_all()
    assert all(rc == 0 for rc in rcs.values()), rcs


@pytest.fixture(scope="module")
def refs(nixl_pair) -> dict:
    """Greedy tokens of PROMPTS through the grpc transport (decode restarted for it, then back)."""
    decode_as(nixl_pair, transports=("grpc",))
    out = {tuple(p): greedy(nixl_pair, p, 16) for p in PROMPTS}
    assert metric(nixl_pair, "decode-0", 'pdmesh:kv_transfer_bytes_total{transport="grpc"}') > 0
    decode_as(nixl_pair)
    return out


def decode_as(svc: Services, *flags: str, transports: tuple[str, ...] = ("nixl",)) -> None:
    """Restart the decode worker with ``flags``, offering only ``transports``, and wait until it is
    routable (a repeated --kv-transports extends the list: the role's own is replaced, not added to)."""
    assert svc.stop("decode-0") == 0, svc.procs["decode-0"].tail()
    svc.role_args["decode"] = ["--kv-transports", *transports]
    svc.start("decode-0", flags)
    svc.wait_registered("decode-0")
    svc.wait_workers(1, 1)
    wait_http(svc.base + "/health", svc.procs["gateway"])


def restart_prefill(svc: Services, routable: bool = True) -> None:
    """Kill and restart the prefill worker (a new incarnation on the same address); ``routable``:
    wait until the gateway can route again (it cannot while decode is stopped)."""
    if svc.procs["prefill-0"].alive():
        svc.kill("prefill-0")
    svc.procs["prefill-0"].p.wait(30)
    svc.start("prefill-0")
    svc.wait_registered("prefill-0")
    if routable:
        wait_http(svc.base + "/health", svc.procs["gateway"])


def metric(svc: Services, name: str, key: str) -> float:
    return scrape(svc.metrics_url(name)).get(key, 0.0)


def no_audit_mismatch(svc: Services) -> None:
    time.sleep(1.0)  # gauges and counters refresh every 0.5 s
    for name in ("prefill-0", "decode-0"):
        assert metric(svc, name, "pdmesh:kv_audit_mismatches_total") == 0, f"{name}: KV changed"
    staging_idle(svc)


def staging_idle(svc: Services, timeout: float = 15.0) -> None:
    """Every extent of both staging arenas is back (leases ended, reads stopped) within ``timeout``."""
    t0 = time.monotonic()
    while (used := {n: metric(svc, n, "pdmesh:kv_nixl_staging_used_bytes") for n in ("prefill-0", "decode-0")}) != \
            {"prefill-0": 0, "decode-0": 0}:
        assert time.monotonic() - t0 < timeout, f"staging extents still taken: {used}"
        time.sleep(0.25)


def test_nixl_gives_the_grpc_tokens_and_frees_every_block(nixl_pair, refs, report):
    svc = nixl_pair
    before = gateway_books(svc.metrics_url("gateway"))
    tally = Tally()

    async def all_prompts():
        async with make_client(svc.base) as c:
            return [await stream(c, tally, body(p, 16)) for p in PROMPTS]

    outs = asyncio.run(all_prompts())
    assert [o.kind for o in outs] == ["ok"] * len(PROMPTS), tally.summary()
    assert [o.text for o in outs] == [refs[tuple(p)] for p in PROMPTS], "nixl and grpc hand-offs gave different tokens"
    assert metric(svc, "decode-0", 'pdmesh:kv_transfer_bytes_total{transport="nixl"}') > 0
    assert metric(svc, "gateway", 'pdmesh:kv_transfer_bytes_total{transport="nixl"}') > 0
    assert metric(svc, "decode-0", "pdmesh:kv_transfer_failures_total") == 0
    # staged on both sides (--nixl-staging-mb's default): one READ of the packed blocks per pull
    reads = {k: metric(svc, "decode-0", f'pdmesh:kv_nixl_reads_total{{kind="{k}"}}') for k in ("staged", "direct", "unstaged", "fallback")}
    assert reads["staged"] + reads["direct"] == len(PROMPTS) and reads["unstaged"] == reads["fallback"] == 0, reads
    no_audit_mismatch(svc)
    leaked = nothing_lost(svc.scheduler, svc.metrics_url("gateway"), tally, before, expect_workers=2)
    report.add("nixl_tokens_equal_grpc", tally, faults_injected=0, blocks_leaked=leaked)


def _first_token_then(svc: Services, tally: Tally, payload: dict, after: float, action):
    """Stream ``payload``; ``after`` s after its first token run ``action()`` in a thread."""

    async def main():
        async with make_client(svc.base) as c:
            first = asyncio.Event()
            task = asyncio.create_task(stream(c, tally, payload, on_chunk=lambda n: first.set(), timeout=90))
            await asyncio.wait_for(first.wait(), 60)
            await asyncio.sleep(after)
            await asyncio.to_thread(action)
            return await task

    return asyncio.run(main())


def test_nixl_peer_killed_mid_transfer_recomputes(nixl_pair, refs, report):
    svc = nixl_pair
    decode_as(svc, "--inject-kv-faults", "delay:0.5")  # every read lands in 5 pieces over 2.5 s
    before = gateway_books(svc.metrics_url("gateway"))
    failed0 = metric(svc, "decode-0", 'pdmesh:kv_transfer_failures_total{action="recompute"}')
    tally = Tally()
    o = _first_token_then(svc, tally, body(PROMPT, 16), 1.0, lambda: svc.kill("prefill-0"))
    assert o.kind == "ok" and o.text == refs[tuple(PROMPT)], o
    assert metric(svc, "decode-0", 'pdmesh:kv_transfer_failures_total{action="recompute"}') == failed0 + 1
    restart_prefill(svc)
    decode_as(svc)
    no_audit_mismatch(svc)
    leaked = nothing_lost(svc.scheduler, svc.metrics_url("gateway"), tally, before, expect_workers=2)
    report.add("nixl_peer_killed_mid_transfer", tally, faults_injected=1, blocks_leaked=leaked)


def _incarnation(svc: Services, name: str) -> str:
    """The incarnation of the running worker ``name`` (its NIXL agent is named after it)."""
    m = re.search(r"NIXL agent pdmesh-\w+-([0-9a-f]{32}): registered", svc.procs[name].log_path.read_text())
    assert m, svc.procs[name].tail()
    return m.group(1)


def test_restarted_nixl_peer_metadata_is_fetched_again(nixl_pair, refs, report):
    """A restarted prefill (new incarnation, same address): decode drops the old agent and loads
    the new one.  A descriptor from the old process (prefilled before the restart, pulled after)
    is never read with what decode knows of the old process: the read pin (or the incarnation
    check) refuses it and the prompt is recomputed."""
    svc = nixl_pair
    tally = Tally()
    old = _incarnation(svc, "prefill-0")
    restart_prefill(svc)
    new = _incarnation(svc, "prefill-0")
    assert new != old
    assert greedy(svc, PROMPT, 16) == refs[tuple(PROMPT)]
    address = f"127.0.0.1:{svc.ports['prefill-0'][0]}"
    assert f"opened nixl peer {address} ({new})" in svc.procs["decode-0"].log_path.read_text(), "metadata not fetched again"
    before = gateway_books(svc.metrics_url("gateway"))
    failed0 = metric(svc, "decode-0", 'pdmesh:kv_transfer_failures_total{action="recompute"}')
    svc.kill("decode-0", signal.SIGSTOP)  # decode takes the next request but cannot pull yet

    def restart_prefill_then_resume_decode() -> None:
        restart_prefill(svc, routable=False)
        svc.kill("decode-0", signal.SIGCONT)

    try:
        o = _first_token_then(svc, tally, body(PROMPT, 16), 0.3, restart_prefill_then_resume_decode)
    finally:
        svc.kill("decode-0", signal.SIGCONT)
    assert o.kind == "ok" and o.text == refs[tuple(PROMPT)], o
    assert metric(svc, "decode-0", 'pdmesh:kv_transfer_failures_total{action="recompute"}') == failed0 + 1
    svc.wait_workers(1, 1)
    no_audit_mismatch(svc)
    leaked = nothing_lost(svc.scheduler, svc.metrics_url("gateway"), tally, before, expect_workers=2)
    wait_http(svc.base + "/health", svc.procs["gateway"])
    assert greedy(svc, PROMPT, 16) == refs[tuple(PROMPT)]  # and the newest process's metadata works
    assert f"({_incarnation(svc, 'prefill-0')})" in svc.procs["decode-0"].log_path.read_text()
    report.add("nixl_restarted_peer_stale_metadata", tally, faults_injected=2, blocks_leaked=leaked)


def test_nixl_read_that_never_completes_times_out_and_recomputes(nixl_pair, refs, report):
    """Over TCP a read needs the peer's progress: a stopped prefill stalls it.  The connector gives
    up at the pull's deadline, cancels the READ (its blocks kept until NIXL says it stopped) and
    recomputes; after the peer resumes, everything is back at baseline."""
    svc = nixl_pair
    decode_as(svc, "--inject-kv-faults", "delay:0.5", "--kv-transfer-timeout", "4")
    before = gateway_books(svc.metrics_url("gateway"))
    failed0 = metric(svc, "decode-0", 'pdmesh:kv_transfer_failures_total{action="recompute"}')
    tally = Tally()
    try:
        o = _first_token_then(svc, tally, body(PROMPT, 16), 0.8, lambda: svc.kill("prefill-0", signal.SIGSTOP))
    finally:
        svc.kill("prefill-0", signal.SIGCONT)
    assert o.kind == "ok" and o.text == refs[tuple(PROMPT)], o
    assert metric(svc, "decode-0", 'pdmesh:kv_transfer_failures_total{action="recompute"}') == failed0 + 1
    assert "timed out" in svc.procs["decode-0"].log_path.read_text()
    decode_as(svc)
    no_audit_mismatch(svc)
    leaked = nothing_lost(svc.scheduler, svc.metrics_url("gateway"), tally, before, expect_workers=2)
    report.add("nixl_read_never_completes", tally, faults_injected=1, blocks_leaked=leaked)
