"""SIGTERM of every service under load drains as specified (in-flight requests finish, new ones
go elsewhere or get 503, exit 0, no orphans); internal gRPC behind mutual TLS."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import httpx
import pytest

from tests.certs import make_pki, tls_flags
from tests.faults.client import WORKER_ARGS, Load, Tally, body, make_client, nothing_lost, stream
from tests.meshproc import Services, gateway_books, list_workers, wait_http
from pdmesh.v1 import scheduler_pb2 as spb
from pdmesh.v1 import scheduler_pb2_grpc as sgrpc

KEY = "fault-suite-key"


def test_sigterm_of_each_service_under_load_drains_and_exits_zero(tmp_path, embedded_dir, report):
    svc = Services(tmp_path, prefill=2, decode=2, worker_args=(*WORKER_ARGS, "--drain-timeout", "20"),
                   gateway_args=("--api-key", KEY, "--drain-timeout", "20"))
    try:
        svc.wait_workers(2, 2)
        before = gateway_books(svc.metrics_url("gateway"))
        load = Load(svc.base)
        rcs = {}
        try:
            for name in ("prefill-1", "decode-1"):  # workers: in flight finish, new work goes to the other one
                time.sleep(2.0)
                t = time.monotonic()
                rcs[name] = svc.stop(name)
                assert time.monotonic() - t < 20
            time.sleep(2.0)
            worker_phase_end = time.monotonic()
            rcs["scheduler"] = svc.stop("scheduler")  # gateways answer 503 in the gap; nothing hangs
            time.sleep(1.0)
            svc.start("scheduler")
            svc.wait_workers(1, 1)
            wait_http(svc.base + "/health", svc.procs["gateway"])
            time.sleep(2.0)
        finally:
            load.finish()
        assert all(rc == 0 for rc in rcs.values()), rcs
        during_workers = [(k, s) for t, k, s in load.timeline if t <= worker_phase_end]
        assert during_workers and all(k == "ok" for k, _ in during_workers), [
            o for o in load.tally.outcomes if o.kind != "ok"]
        assert all(k == "ok" or (k == "error" and s == 503) for _, k, s in load.timeline), load.timeline
        leaked = nothing_lost(svc.scheduler, svc.metrics_url("gateway"), load.tally, before, expect_workers=2)

        # the gateway: streams in flight finish, /health and new requests get 503, then exit 0
        tally = Tally()
        results: list = []

        async def streams():
            async with make_client(svc.base) as c:
                results.extend(await asyncio.gather(*(stream(c, tally, body(list(range(700 + i, 740 + i)), 200))
                                                      for i in range(3))))

        th = threading.Thread(target=lambda: asyncio.run(streams()))
        th.start()
        time.sleep(0.5)
        svc.kill("gateway", 15)
        time.sleep(0.2)
        h = httpx.get(svc.base + "/health", timeout=5)
        refused = httpx.post(svc.base + "/v1/completions", json={"prompt": "x", "max_tokens": 2},
                             headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
        th.join(60)
        assert h.status_code == 503 and refused.status_code == 503, (h.text, refused.text)
        assert [o.kind for o in results] == ["ok"] * 3, results
        assert svc.procs["gateway"].p.wait(30) == 0
        rcs.update({"gateway": 0})
    finally:
        final = svc.stop_all()
    assert all(rc == 0 for rc in final.values()), final
    time.sleep(0.5)
    assert all(not p.alive() for p in svc.procs.values()), "orphan processes"
    load.tally.sent += tally.sent
    load.tally.outcomes += tally.outcomes
    report.add("sigterm_drain_every_service", load.tally, faults_injected=5, blocks_leaked=leaked,
               exit_codes={**rcs, **{f"{k} (final)": v for k, v in final.items()}})


def test_internal_grpc_behind_mutual_tls(tmp_path, embedded_dir, report):
    pki = make_pki(tmp_path, {"service": ("pdmesh-service", None)})  # one certificate, no pdmesh role: the mesh secret names callers
    tls = tls_flags(pki["service"])
    svc = Services(tmp_path, prefill=1, decode=1, worker_args=(*WORKER_ARGS, *tls), gateway_args=tls, scheduler_args=tls)
    tally = Tally()
    try:
        # the gateway is ready only once it reached the scheduler, and the workers registered, over mTLS
        r = httpx.post(svc.base + "/v1/completions", json={"prompt": list(range(100, 180)), "max_tokens": 6,
                                                           "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text  # prefill+pull+decode
        tally.sent += 1
        o = asyncio.run(_one_stream(svc.base))
        tally.add(o)
        assert o.kind == "ok"
        with pytest.raises(grpc.RpcError):  # plaintext is refused
            list_workers(svc.scheduler)

        async def no_client_cert():
            creds = grpc.ssl_channel_credentials(root_certificates=open(pki["ca"]["cert"], "rb").read())
            async with grpc.aio.secure_channel(svc.scheduler, creds) as ch:
                await sgrpc.SchedulerStub(ch).ListWorkers(spb.ListWorkersRequest(), timeout=5)

        with pytest.raises(grpc.RpcError):  # TLS without a certificate from the CA is refused too
            asyncio.run(no_client_cert())
    finally:
        rcs = svc.stop_all()
    assert all(rc == 0 for rc in rcs.values()), rcs
    report.add("mutual_tls", tally, faults_injected=2, blocks_leaked=0)


async def _one_stream(base: str):
    async with make_client(base, api_key=None) as c:
        return await stream(c, Tally(), body(list(range(100, 180)), 6))
