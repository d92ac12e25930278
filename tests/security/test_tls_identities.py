"""Identities proven by mutual TLS alone (no mesh secret): each service presents a certificate
whose URI SAN names its role (spiffe://pdmesh.test/pdmesh/ROLE/ID); the mesh serves, a certificate
of another role is refused what that role may not do, one without a role is unauthenticated, and a
service given another role's certificate refuses to start.  And ``pdmesh up --tls-*`` puts every
service behind TLS."""

from __future__ import annotations

import asyncio
import sys

import grpc
import httpx
import pytest

from pdmesh.rpc.channels import open_channel
from pdmesh.rpc.tls import TlsConfig
from pdmesh.v1 import scheduler_pb2 as spb
from pdmesh.v1 import scheduler_pb2_grpc as sgrpc
from services.cli import MODULES
from tests.certs import make_pki, tls_flags
from tests.faults.client import WORKER_ARGS, Outcome, Tally, nothing_lost
from tests.meshproc import Mesh, Proc, Services, free_port, gateway_books, list_workers

ROLES = ("scheduler", "gateway", "prefill", "decode")


@pytest.fixture(scope="module")
def tls_mesh(tmp_path_factory, embedded_dir):
    tmp = tmp_path_factory.mktemp("mtls")
    pki = make_pki(tmp, {**{r: (f"pdmesh-{r}", f"spiffe://pdmesh.test/pdmesh/{r}/{r}-1") for r in ROLES},
                         "norole": ("pdmesh-service", None)})
    svc = Services(tmp, prefill=1, decode=1, worker_args=WORKER_ARGS, mesh_secret=False,
                   role_args={r: tls_flags(pki[r]) for r in ("prefill", "decode")},
                   scheduler_args=tls_flags(pki["scheduler"]), gateway_args=tls_flags(pki["gateway"]))
    yield svc, pki, tmp
    rcs = svc.stop_all()
    assert all(rc == 0 for rc in rcs.values()), rcs


def tls_of(paths: dict) -> TlsConfig:
    return TlsConfig(paths["cert"], paths["key"], paths["ca"])


def list_as(scheduler: str, paths: dict) -> str:
    async def go():
        async with open_channel(scheduler, tls_of(paths)) as ch:
            await sgrpc.SchedulerStub(ch).ListWorkers(spb.ListWorkersRequest(), timeout=5)

    try:
        asyncio.run(go())
        return "OK"
    except grpc.aio.AioRpcError as exc:
        return exc.code().name


def test_roles_from_certificates_alone(tls_mesh, security_report):
    svc, pki, _ = tls_mesh
    gw_tls = tls_of(pki["gateway"])
    before = gateway_books(svc.metrics_url("gateway"))
    tally = Tally()
    for i in range(3):  # prefill, pull and decode between services identified by their certificates
        tally.sent += 1
        r = httpx.post(svc.base + "/v1/completions", timeout=60,
                       json={"prompt": list(range(100 + i, 180 + i)), "max_tokens": 6, "temperature": 0})
        tally.add(Outcome("ok" if r.status_code == 200 else "error", r.status_code))
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text
    ids = sorted(w.info.worker_id for w in list_workers(svc.scheduler, gw_tls))
    assert len(ids) == 2
    tried = {"ListWorkers with the gateway's certificate": list_as(svc.scheduler, pki["gateway"]),
             "ListWorkers with a prefill certificate": list_as(svc.scheduler, pki["prefill"]),
             "ListWorkers with a certificate naming no role": list_as(svc.scheduler, pki["norole"])}
    assert tried == {"ListWorkers with the gateway's certificate": "OK",
                     "ListWorkers with a prefill certificate": "PERMISSION_DENIED",
                     "ListWorkers with a certificate naming no role": "UNAUTHENTICATED"}
    leaked = nothing_lost(svc.scheduler, svc.metrics_url("gateway"), tally, before, expect_workers=2, tls=gw_tls)
    security_report.add("mtls_identities", tally, faults_injected=2, blocks_leaked=leaked,
                        refused=2, attempts=tried)


def test_a_service_with_another_roles_certificate_refuses_to_start(tls_mesh):
    svc, pki, tmp = tls_mesh
    p = Proc([sys.executable, "-m", MODULES["scheduler"], "--host", "127.0.0.1", "--port", str(free_port()),
              "--metrics-port", "-1", *tls_flags(pki["decode"])], tmp / "wrong-cert.log")
    assert p.p.wait(60) == 2, p.tail()
    p.stop()
    assert "names role 'decode', but this is the scheduler" in p.log_path.read_text()
    p = Proc([sys.executable, "-m", MODULES["scheduler"], "--host", "127.0.0.1", "--port", str(free_port()),
              "--metrics-port", "-1", *tls_flags(pki["norole"])], tmp / "norole-cert.log")
    assert p.p.wait(60) == 2, p.tail()
    p.stop()
    assert "names no pdmesh role" in p.log_path.read_text()


def test_pdmesh_up_gives_tls_to_every_service(tls_mesh, tmp_path):
    """``pdmesh up --tls-*``: the scheduler, the workers and the gateway all serve TLS (the mesh
    secret ``pdmesh up`` made names the callers: this certificate names no role)."""
    _, pki, _ = tls_mesh
    mesh = Mesh(tmp_path, extra=list(tls_flags(pki["norole"])))
    try:
        r = httpx.post(mesh.base + "/v1/completions", timeout=60,
                       json={"prompt": list(range(100, 140)), "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
        with pytest.raises(grpc.RpcError):  # plaintext is refused by the scheduler
            list_workers(mesh.scheduler)
        ws = list_workers(mesh.scheduler, tls_of(pki["norole"]))  # over TLS, with the mesh's secret
        assert sorted(w.info.role for w in ws) == [1, 2]
        for w in ws:  # every worker's own server is TLS too (health is open: only the transport can refuse)
            with pytest.raises(grpc.RpcError):
                asyncio.run(_plain_health(w.info.address))
    finally:
        assert mesh.stop() == 0, mesh.proc.tail()


async def _plain_health(address: str) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(address) as ch:
        await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=3)
