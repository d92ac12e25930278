"""A worker's registration against a real scheduler servicer: heartbeat streams renew at their
deadline, load reaches the scheduler, and a restarted scheduler gets the worker back by itself."""

import asyncio

import grpc

from pdmesh.rpc.registration import Registration
from pdmesh.v1 import common_pb2 as pb
from pdmesh.v1 import scheduler_pb2_grpc as sgrpc
from services.scheduler.server import SchedulerServiceConfig, SchedulerServicer
from tests.meshproc import free_port

INFO = pb.WorkerInfo(worker_id="d1", role=pb.ROLE_DECODE, address="127.0.0.1:1", model="m", dtype="float32",
                     kv_layout=pb.KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, block_size=4, dtype="float32", layout="LNKBHD"),
                     transports=["grpc"])


async def start_scheduler(port):
    servicer = SchedulerServicer(SchedulerServiceConfig(port=port, heartbeat_interval=0.1, lease=0.5, metrics_port=-1))
    server = grpc.aio.server()
    sgrpc.add_SchedulerServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, servicer


def test_heartbeats_renew_and_survive_a_scheduler_restart():
    async def main():
        port = free_port()
        server, servicer = await start_scheduler(port)
        load = {"n": 0}

        def report():
            load["n"] += 1
            return pb.WorkerLoad(free_blocks=7, total_blocks=9, requests_total=load["n"])

        reg = Registration(f"127.0.0.1:{port}", INFO, report, rpc_timeout=2)
        reg.stream_deadline = 0.4
        task = asyncio.create_task(reg.run())
        await asyncio.sleep(1.5)  # several stream deadlines pass
        entry = servicer.registry.workers.get("d1")
        assert entry is not None and entry.load.free_blocks == 7 and entry.load.requests_total > 3
        await server.stop(0)  # the scheduler dies, loses its registry, comes back
        server, servicer = await start_scheduler(port)
        for _ in range(60):
            if "d1" in servicer.registry.workers:
                break
            await asyncio.sleep(0.1)
        assert "d1" in servicer.registry.workers
        await reg.stop()
        await asyncio.wait_for(task, 5)
        assert "d1" not in servicer.registry.workers  # deregistered on stop
        await server.stop(0)

    asyncio.run(main())


def test_a_second_server_on_a_taken_port_is_an_error_not_a_shared_listener():
    """grpc sets SO_REUSEPORT by default; ours turn it off, so a port clash fails at start-up instead
    of splitting connections between two services (clients would get UNIMPLEMENTED at random)."""
    from pdmesh.rpc.server import bind, make_server

    async def main():
        first = make_server()
        port = bind(first, "127.0.0.1", 0)
        await first.start()
        try:
            second = make_server()
            try:
                bind(second, "127.0.0.1", port)
            except (OSError, RuntimeError) as e:
                return str(e)
            return None
        finally:
            await first.stop(None)

    err = asyncio.run(main())
    assert err is not None and str(err), "a second server bound a port already in use"


def test_prefix_hash_events_reach_the_scheduler_and_a_lost_one_is_resent_in_full():
    """kv-aware routing's hints: a prefill worker's events arrive in heartbeats; when the scheduler
    misses one (a lost or late message: its sequence number jumps) it drops that worker's hints,
    answers kv_resync, and the worker sends everything it holds again, changes made meanwhile included."""
    from pdmesh.kv.events import KVEventLog
    from pdmesh.routing import KVAwarePolicy, Prompt, route

    info = pb.WorkerInfo()
    info.CopyFrom(INFO)
    info.worker_id, info.role = "p1", pb.ROLE_PREFILL
    prompt = list(range(1, 14))  # 3 full blocks of 4 before the last token
    hs = Prompt(prompt).hashes(4)

    async def wait_for(cond, what):
        for _ in range(100):
            if cond():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(what)

    async def main():
        port = free_port()
        server, servicer = await start_scheduler(port)
        log = KVEventLog()
        log.record("device", hs[0], True)  # held before registering: the first snapshot carries it
        reg = Registration(f"127.0.0.1:{port}", info, pb.WorkerLoad, rpc_timeout=2, kv_events=log)
        task = asyncio.create_task(reg.run())
        kv = lambda: servicer.registry.workers["p1"].kv if "p1" in servicer.registry.workers else None  # noqa: E731
        await wait_for(lambda: kv() == {"device": {hs[0]}}, "the snapshot reaches the scheduler")
        log.record("device", hs[1], True)
        log.record("host", hs[2], True)
        await wait_for(lambda: kv() == {"device": {hs[0], hs[1]}, "host": {hs[2]}}, "events reach the scheduler")
        entry = servicer.registry.workers["p1"]
        entry.kv_seq -= 1  # as if a heartbeat got lost: the next one is out of sequence
        log.record("host", hs[2], False)  # a change the resync must carry
        log.record("disk", hs[2], True)
        await wait_for(lambda: kv() == {"device": {hs[0], hs[1]}, "disk": {hs[2]}}, "everything is sent again")
        reg2 = pb.WorkerInfo()
        reg2.CopyFrom(INFO)  # a decode worker to pair with
        servicer.registry.register(reg2)
        p, _, _, why = route(servicer.registry, KVAwarePolicy(0.1), "m", len(prompt), prompt_ids=prompt)
        assert p.worker_id == "p1" and "cached=3 blocks" in why
        await reg.stop()
        await asyncio.wait_for(task, 5)
        await server.stop(0)

    asyncio.run(main())
