"""Scheduler registry/routing and the prefill lease table (pure logic)."""

import pytest

from pdmesh.routing import (LeastLoadedPolicy, NoRoute, RegistrationRefused, Registry, RoundRobinPolicy, _pairs, can_use,
                            route, shared_transport)
from pdmesh.transport.lease import LeaseTable
from pdmesh.v1 import common_pb2 as pb


def info(wid, role, transports=("grpc",), host="h1", block_size=32, model="m", tp=0):
    return pb.WorkerInfo(worker_id=wid, role=role, address=f"{wid}:1", model=model, dtype="float32",
                         kv_layout=pb.KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=block_size,
                                               dtype="float32", layout="LNKBHD", tensor_parallel_size=tp),
                         transports=list(transports), host_id=host, max_model_len=100)


def test_register_refuses_incompatible_layout():
    r = Registry()
    r.register(info("p1", pb.ROLE_PREFILL))
    with pytest.raises(RegistrationRefused):
        r.register(info("d1", pb.ROLE_DECODE, block_size=16))
    r.register(info("d2", pb.ROLE_DECODE, block_size=16, model="other"))  # other model: fine


def test_workers_of_different_tensor_parallel_sizes_pair():
    r = Registry()
    r.register(info("p-tp2", pb.ROLE_PREFILL, tp=2))
    r.register(info("d-tp1", pb.ROLE_DECODE, tp=1))
    r.register(info("d-tp4", pb.ROLE_DECODE, tp=4))  # 2 KV heads on 4 ranks: each replicated twice
    pairs = {(p.worker_id, d.worker_id) for p, d, _ in _pairs(r.routable(pb.ROLE_PREFILL, "m"), r.routable(pb.ROLE_DECODE, "m"))}
    assert pairs == {("p-tp2", "d-tp1"), ("p-tp2", "d-tp4")}
    # 2 KV heads cannot be split over 3 ranks: such a worker is never half of a pair
    r.register(info("d-tp3", pb.ROLE_DECODE, tp=3))
    rr = RoundRobinPolicy()
    seen = {route(r, rr, "m", 10)[1].worker_id for _ in range(6)}
    assert seen == {"d-tp1", "d-tp4"}


def test_least_loaded_spreads_a_burst():
    r = Registry()
    for w in ("p1", "p2"):
        r.register(info(w, pb.ROLE_PREFILL))
    for w in ("d1", "d2"):
        r.register(info(w, pb.ROLE_DECODE))
    pol = LeastLoadedPolicy()
    picks = [route(r, pol, "m", 10)[:2] for _ in range(4)]
    assert {p.worker_id for p, _ in picks} == {"p1", "p2"}
    assert {d.worker_id for _, d in picks} == {"d1", "d2"}


def test_heartbeat_load_and_expiry():
    r = Registry(lease_s=3.0)
    r.register(info("p1", pb.ROLE_PREFILL))
    r.register(info("d1", pb.ROLE_DECODE))
    r.register(info("d2", pb.ROLE_DECODE))
    r.heartbeat("d1", pb.WorkerLoad(running=5, total_blocks=10, free_blocks=1), False, now=100.0)
    r.heartbeat("d2", pb.WorkerLoad(running=0, total_blocks=10, free_blocks=10), False, now=100.0)
    r.heartbeat("p1", pb.WorkerLoad(), False, now=100.0)
    _, d, t, reason = route(r, LeastLoadedPolicy(), "m", 5)
    assert d.worker_id == "d2" and t == "grpc" and "least_loaded" in reason
    assert not r.heartbeat("zz", pb.WorkerLoad(), False)
    assert sorted(r.expire(now=103.5)) == ["d1", "d2", "p1"]
    with pytest.raises(NoRoute):
        route(r, LeastLoadedPolicy(), "m", 5)


def test_draining_and_excluded_workers_are_not_routed():
    r = Registry()
    r.register(info("p1", pb.ROLE_PREFILL))
    r.register(info("p2", pb.ROLE_PREFILL))
    r.register(info("d1", pb.ROLE_DECODE))
    r.heartbeat("p1", pb.WorkerLoad(), True)
    for _ in range(3):
        assert route(r, RoundRobinPolicy(), "m", 5)[0].worker_id == "p2"
    with pytest.raises(NoRoute):
        route(r, RoundRobinPolicy(), "m", 5, exclude=["p2"])


def test_transport_pairing():
    r = Registry()
    r.register(info("p1", pb.ROLE_PREFILL, transports=("cuda_ipc", "grpc"), host="h1"))
    r.register(info("d1", pb.ROLE_DECODE, transports=("cuda_ipc", "grpc"), host="h2"))
    assert route(r, LeastLoadedPolicy(), "m", 5)[2] == "grpc"  # different hosts: no cuda_ipc
    r2 = Registry()
    r2.register(info("p1", pb.ROLE_PREFILL, transports=("cuda_ipc", "grpc")))
    r2.register(info("d1", pb.ROLE_DECODE, transports=("cuda_ipc", "grpc")))
    assert route(r2, LeastLoadedPolicy(), "m", 5)[2] == "cuda_ipc"
    r3 = Registry()
    r3.register(info("p1", pb.ROLE_PREFILL, transports=("cuda_ipc",), host="a"))
    r3.register(info("d1", pb.ROLE_DECODE, transports=("cuda_ipc",), host="b"))
    with pytest.raises(NoRoute):
        route(r3, LeastLoadedPolicy(), "m", 5)


def test_prompt_too_long_for_workers():
    r = Registry()
    r.register(info("p1", pb.ROLE_PREFILL))
    r.register(info("d1", pb.ROLE_DECODE))
    with pytest.raises(NoRoute):
        route(r, LeastLoadedPolicy(), "m", 100)


def test_lease_release_expiry_and_pins():
    freed = []
    t = LeaseTable(freed.append, ttl=10.0)
    t.add("a", [1, 2], 40)
    t.add("b", [3], 10)
    t.add("c", [4], 10)
    assert t.held_blocks() == 4
    assert t.release("a") and not t.release("a")
    assert freed == ["a"]
    t.pin("b")
    assert t.release("b")  # deferred while pinned
    assert freed == ["a"]
    t.unpin("b")
    assert freed == ["a", "b"]
    lease = t.get("c")
    t.pin("c")
    assert t.reap(now=lease.deadline + 100) == 0  # pinned: not expired under a reader
    t.unpin("c")
    assert t.reap(now=lease.deadline + 100) == 1 and freed == ["a", "b", "c"]
    assert t.expired_total == 1 and t.held_blocks() == 0


def test_colocated_only_mesh_routes_whole_requests_to_one_worker():
    r = Registry()
    for w in ("b1", "b2"):
        r.register(info(w, pb.ROLE_BOTH, transports=("local",)))
    picks = [route(r, LeastLoadedPolicy(), "m", 10) for _ in range(4)]
    for p, d, t, reason in picks:
        assert p is d and t == "local" and "colocated" in reason
    # pending routes spread a burst over both workers
    assert [p.worker_id for p, *_ in picks] == ["b1", "b2", "b1", "b2"]
    rr = RoundRobinPolicy()
    assert [route(r, rr, "m", 10)[0].worker_id for _ in range(3)] == ["b1", "b2", "b1"]
    with pytest.raises(NoRoute, match="max_model_len"):
        route(r, LeastLoadedPolicy(), "m", 100)
    assert route(r, LeastLoadedPolicy(), "m", 10, exclude=["b1"])[0].worker_id == "b2"
    with pytest.raises(NoRoute):
        route(r, LeastLoadedPolicy(), "m", 10, exclude=["b1", "b2"])


def test_conditional_disaggregation_by_prompt_length():
    r = Registry()
    r.register(info("p1", pb.ROLE_PREFILL))
    r.register(info("d1", pb.ROLE_DECODE))
    r.register(info("b1", pb.ROLE_BOTH, transports=("local",)))
    pol = LeastLoadedPolicy()
    p, d, t, _ = route(r, pol, "m", 20, colocate_below_tokens=32)
    assert (p.worker_id, d.worker_id, t) == ("b1", "b1", "local")
    p, d, t, _ = route(r, pol, "m", 32, colocate_below_tokens=32)
    assert (p.worker_id, d.worker_id, t) == ("p1", "d1", "grpc")
    # a colocated worker is never half of a pair, even when it is the least loaded
    r.heartbeat("p1", pb.WorkerLoad(running=50), False)
    assert route(r, pol, "m", 90, colocate_below_tokens=0)[:2] == (r.workers["p1"], r.workers["d1"])
    # no usable pair (the decode worker is excluded): the colocated worker serves long prompts too
    p, d, t, _ = route(r, pol, "m", 90, exclude=["d1"], colocate_below_tokens=0)
    assert (p.worker_id, t) == ("b1", "local")
    r.remove("b1")
    with pytest.raises(NoRoute, match="decode"):
        route(r, pol, "m", 10, exclude=["d1"], colocate_below_tokens=32)


def test_transport_preference_and_reachability():
    def pick(pt, dt, ph="h1", dh="h1"):
        return shared_transport(info("p", pb.ROLE_PREFILL, transports=pt, host=ph), info("d", pb.ROLE_DECODE, transports=dt, host=dh))

    every = ("cuda_ipc", "nixl", "grpc")
    assert pick(every, every) == "cuda_ipc"
    assert pick(every, every, dh="h2") == "nixl"  # across hosts: nixl before the grpc fallback
    assert pick(("cuda_ipc", "grpc"), ("cuda_ipc", "grpc"), dh="h2") == "grpc"
    assert pick(every, ("nixl",)) == "nixl"  # --kv-transports nixl forces it
    assert pick(("grpc", "nixl"), ("grpc", "nixl")) == "grpc"  # both prefer grpc
    assert pick(("nixl", "grpc"), ("grpc", "nixl")) == "nixl"  # a tie: the default order decides
    assert pick(("cuda_ipc",), ("cuda_ipc",), dh="h2") is None
    assert pick(("local",), ("local",)) is None
    assert can_use("cuda_ipc", info("d", pb.ROLE_DECODE, transports=every, host="h1"), "h1")
    assert not can_use("cuda_ipc", info("d", pb.ROLE_DECODE, transports=every, host="h2"), "h1")
    assert can_use("nixl", info("d", pb.ROLE_DECODE, transports=every, host="h2"), "h1")
    assert not can_use("nixl", info("d", pb.ROLE_DECODE, transports=("grpc",)), "h1")


def test_read_pins_defer_release_and_never_pass_the_hard_limit(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("pdmesh.transport.lease.time.monotonic", lambda: now[0])
    freed = []
    t = LeaseTable(freed.append, ttl=2.0, max_ttl=10.0)
    lease = t.add("a", [1, 2], 40)
    assert (lease.deadline, lease.hard_deadline) == (1002.0, 1010.0)
    read_id, granted = t.begin_read("a", 30.0)
    assert granted == 10.0  # capped at the hard limit
    assert t.release("a") and freed == [] and t.deferred_releases_total == 1  # the gateway's release waits for the read
    now[0] = 1005.0
    assert t.reap() == 0 and freed == []  # pinned past the soft deadline
    assert t.end_read("a", read_id) and freed == ["a"]  # the reader is done: released now
    # a reader that never ends its read: the pin runs out, then the lease expires
    t.add("b", [3], 10)
    rb, gb = t.begin_read("b", 3.0)
    assert gb == 3.0
    now[0] = 1007.9
    assert t.reap() == 0
    now[0] = 1008.1  # pin over (1008); soft deadline was extended to 1005 + 3 + 2 = 1010
    assert t.reap() == 0
    now[0] = 1010.1
    assert t.reap() == 1 and freed == ["a", "b"]
    # no pin, stream or read, past the hard limit
    t.add("c", [4], 10)
    now[0] = 1020.1
    assert t.begin_read("c", 1.0) is None and t.pin("c") is None
    assert t.reap() == 1 and freed == ["a", "b", "c"]
    assert t.begin_read("gone", 1.0) is None and not t.end_read("gone", 1)
