"""The scheduler behind the authenticating interceptor (a real gRPC server on loopback, the real
servicer): who may call what, worker ids bound to the identity that registered them, bounded
registrations, and the health service open to probes."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdmesh.rpc.auth import Identity, MeshSecretAuthenticator
from pdmesh.rpc.channels import open_channel
from pdmesh.rpc.server import Health, bind, make_server
from pdmesh.v1 import common_pb2 as pb
from pdmesh.v1 import scheduler_pb2 as spb
from pdmesh.v1 import scheduler_pb2_grpc as sgrpc
from services.scheduler.server import SchedulerServiceConfig, SchedulerServicer

SECRET = b"k" * 64
LAYOUT = pb.KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, block_size=4, dtype="float32", layout="LNKBHD")


def info(worker_id: str, role=pb.ROLE_DECODE, address="127.0.0.1:7001", model="m") -> pb.WorkerInfo:
    return pb.WorkerInfo(worker_id=worker_id, role=role, address=address, model=model, dtype="float32", kv_layout=LAYOUT,
                         transports=["grpc"])


def auth(role: str, ident: str, secret: bytes = SECRET) -> MeshSecretAuthenticator:
    return MeshSecretAuthenticator(secret, lambda: Identity(role, ident))


class Scheduler:
    def __init__(self, **cfg) -> None:
        self.cfg = SchedulerServiceConfig(metrics_port=-1, **cfg)

    async def __aenter__(self):
        self.servicer = SchedulerServicer(self.cfg)
        self.server = make_server(auth("scheduler", "scheduler"), self.servicer.metrics.refused_call)
        sgrpc.add_SchedulerServicer_to_server(self.servicer, self.server)
        Health(self.server, ["pdmesh.v1.Scheduler"])
        self.address = f"127.0.0.1:{bind(self.server, '127.0.0.1', 0)}"
        await self.server.start()
        return self

    async def __aexit__(self, *exc):
        await self.server.stop(0)

    def stub(self, a) -> sgrpc.SchedulerStub:
        return sgrpc.SchedulerStub(open_channel(self.address, auth=a))

    def refused(self, code: str) -> float:
        return sum(smp.value for fam in self.servicer.metrics.registry.collect() for smp in fam.samples
                   if smp.name == "pdmesh:internal_calls_refused_total" and smp.labels["code"] == code)


async def code_of(aw) -> grpc.StatusCode:
    try:
        await aw
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def run(coro):
    return asyncio.run(coro)


def test_unauthenticated_calls_fail_and_health_stays_open():
    async def main():
        async with Scheduler() as s:
            async with grpc.aio.insecure_channel(s.address) as ch:  # no credentials at all
                assert await code_of(sgrpc.SchedulerStub(ch).ListWorkers(spb.ListWorkersRequest(), timeout=5)) == \
                    grpc.StatusCode.UNAUTHENTICATED
                st = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert st.status == health_pb2.HealthCheckResponse.SERVING
            wrong = s.stub(auth("gateway", "g", secret=b"x" * 64))
            assert await code_of(wrong.ListWorkers(spb.ListWorkersRequest(), timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
            assert s.refused("UNAUTHENTICATED") == 2

    run(main())


def test_each_role_calls_only_its_methods():
    async def main():
        async with Scheduler() as s:
            gw, dec = s.stub(auth("gateway", "g")), s.stub(auth("decode", "decode-1"))
            assert await code_of(gw.ListWorkers(spb.ListWorkersRequest(), timeout=5)) == grpc.StatusCode.OK
            # a gateway cannot register a worker; a worker cannot route
            assert await code_of(gw.Register(spb.RegisterRequest(worker=info("decode-1")), timeout=5)) == \
                grpc.StatusCode.PERMISSION_DENIED
            assert await code_of(dec.Route(spb.RouteRequest(request_id="r"), timeout=5)) == grpc.StatusCode.PERMISSION_DENIED
            pre = s.stub(auth("prefill", "p"))  # decode workers list the prefill workers they may dial; prefill may not
            assert await code_of(dec.ListWorkers(spb.ListWorkersRequest(), timeout=5)) == grpc.StatusCode.OK
            assert await code_of(pre.ListWorkers(spb.ListWorkersRequest(), timeout=5)) == grpc.StatusCode.PERMISSION_DENIED
            # a decode identity registers decode workers only
            assert await code_of(dec.Register(spb.RegisterRequest(worker=info("p", pb.ROLE_PREFILL)), timeout=5)) == \
                grpc.StatusCode.PERMISSION_DENIED
            assert await code_of(dec.Register(spb.RegisterRequest(worker=info("decode-1")), timeout=5)) == grpc.StatusCode.OK
            assert s.refused("PERMISSION_DENIED") == 4

    run(main())


def test_a_worker_id_belongs_to_the_identity_that_registered_it():
    async def main():
        async with Scheduler(heartbeat_interval=0.1, lease=0.3) as s:
            real, thief = s.stub(auth("decode", "decode-1")), s.stub(auth("decode", "evil"))
            await real.Register(spb.RegisterRequest(worker=info("decode-1")), timeout=5)
            # another identity can neither take the id over, nor beat for it, nor remove it
            assert await code_of(thief.Register(spb.RegisterRequest(worker=info("decode-1", address="10.6.6.6:1")),
                                                timeout=5)) == grpc.StatusCode.PERMISSION_DENIED
            beats = thief.Heartbeat(iter([spb.HeartbeatRequest(worker_id="decode-1", draining=True)]), timeout=5)
            assert await code_of(beats.read()) == grpc.StatusCode.PERMISSION_DENIED
            assert await code_of(thief.Deregister(spb.DeregisterRequest(worker_id="decode-1"), timeout=5)) == \
                grpc.StatusCode.PERMISSION_DENIED
            entry = s.servicer.registry.workers["decode-1"]
            assert entry.info.address == "127.0.0.1:7001" and not entry.draining
            # the binding outlives the lease: a dead worker's id is not up for grabs
            await asyncio.sleep(0.5)
            s.servicer.registry.expire()
            assert "decode-1" not in s.servicer.registry.workers
            assert await code_of(thief.Register(spb.RegisterRequest(worker=info("decode-1")), timeout=5)) == \
                grpc.StatusCode.PERMISSION_DENIED
            assert await code_of(real.Register(spb.RegisterRequest(worker=info("decode-1")), timeout=5)) == grpc.StatusCode.OK
            # its owner leaving frees the id
            await real.Deregister(spb.DeregisterRequest(worker_id="decode-1"), timeout=5)
            assert await code_of(thief.Register(spb.RegisterRequest(worker=info("decode-1")), timeout=5)) == grpc.StatusCode.OK

    run(main())


@pytest.mark.parametrize("bad,why", [
    (dict(address="x" * 300 + ":1"), "FAILED_PRECONDITION"),
    (dict(address="no-port"), "FAILED_PRECONDITION"),
    (dict(model="m" * 5000), "FAILED_PRECONDITION"),
    (dict(transports=[f"t{i}" for i in range(9)]), "FAILED_PRECONDITION"),
])
def test_registrations_are_bounded(bad, why):
    async def main():
        async with Scheduler() as s:
            w = info("decode-1")
            for k, v in bad.items():
                if k == "transports":
                    del w.transports[:]
                    w.transports.extend(v)
                else:
                    setattr(w, k, v)
            code = await code_of(s.stub(auth("decode", "decode-1")).Register(spb.RegisterRequest(worker=w), timeout=5))
            assert code.name == why

    run(main())


def test_oversized_messages_are_refused_before_they_are_buffered_and_workers_are_capped():
    async def main():
        async with Scheduler(max_workers=2) as s:
            dec = s.stub(auth("decode", "d"))
            huge = info("d", model="m" * (9 << 20))  # 9 MiB: over the servers' 8 MiB receive limit
            assert await code_of(dec.Register(spb.RegisterRequest(worker=huge), timeout=10)) == \
                grpc.StatusCode.RESOURCE_EXHAUSTED
            for i in range(2):
                await dec.Register(spb.RegisterRequest(worker=info(f"d{i}", address=f"127.0.0.1:{7000 + i}")), timeout=5)
            assert await code_of(dec.Register(spb.RegisterRequest(worker=info("d9")), timeout=5)) == \
                grpc.StatusCode.RESOURCE_EXHAUSTED
            assert len(s.servicer.registry.workers) == 2

    run(main())
