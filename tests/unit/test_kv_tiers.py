"""The lower KV tiers' bookkeeping with exact slots and hashes (host LRU, disk files, checksums,
restart scan), the block manager's release list and pins, prefix-hash events and routing by them."""

from __future__ import annotations

import os
import time

import pytest
import torch

from pdmesh.kv.block_manager import PrefixCachingBlockManager, hash_block
from pdmesh.kv.events import KVEventLog
from pdmesh.kv.pool import KVLayout
from pdmesh.kv.tiers import DiskTier, HostTier, read_block_file, write_block_file
from pdmesh.routing import KVAwarePolicy, Prompt, Registry, route
from pdmesh.v1 import common_pb2 as pb
from pdmesh.v1 import scheduler_pb2 as spb

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, block_size=2, dtype="float32")  # 128 bytes a block


def h(i: int) -> bytes:
    return bytes([i]) * 16


def host(slots: int, events=None) -> HostTier:
    return HostTier(LAYOUT, slots * LAYOUT.block_bytes, torch.float32, pin=False, on_event=events)


def test_host_tier_slots_and_lru_order():
    seen = []
    t = host(3, lambda tier, k, added: seen.append((tier, k[0], added)))
    assert [t.take(h(i)) for i in (1, 2, 3)] == [0, 1, 2] and t.take(h(4)) is None
    for i in (1, 2, 3):
        t.commit(h(i), True)
    t.touch(h(1))  # LRU order now 2, 3, 1
    t.add_reader(1)  # block 2 is being read: not evictable
    assert t.evict_lru() == (h(3), 2)
    assert t.take(h(4)) is None  # the evicted slot is detached until let go
    t.drop_detached(2)
    assert t.take(h(4)) == 2
    t.commit(h(4), False)  # its copy failed: slot free again, no hit
    assert h(4) not in t and t.free_slots == [2]
    assert seen == [("host", 1, True), ("host", 2, True), ("host", 3, True), ("host", 3, False)]
    # a slot evicted while read frees when the last reader is done
    assert t.evict_lru(eligible=lambda k: k == h(2)) is None  # block 2 is read
    t.done_reading(1)
    assert t.evict_lru(eligible=lambda k: k == h(2)) == (h(2), 1)
    t.add_reader(1)
    t.done_reading(1)
    assert sorted(t.free_slots) == [1, 2] and list(t.index) == [h(1)]


def test_disk_file_roundtrip_and_damage_is_a_miss(tmp_path):
    payload = bytearray(os.urandom(LAYOUT.block_bytes))
    p = tmp_path / "x.kv"
    assert write_block_file(p, h(7), memoryview(payload)) == LAYOUT.block_bytes + 36
    out = bytearray(LAYOUT.block_bytes)
    assert read_block_file(p, h(7), memoryview(out)) is None and out == payload
    assert read_block_file(p, h(8), memoryview(out)) == "header does not match"  # another block's file
    assert not p.exists()  # refused files are deleted
    for damage, why in ((lambda b: b[:100], "truncated payload"), (lambda b: b[:10], "truncated header"),
                        (lambda b: b[:60] + bytes([b[60] ^ 1]) + b[61:], "checksum mismatch"),
                        (lambda b: b + b"x", "trailing bytes")):
        write_block_file(p, h(7), memoryview(payload))
        p.write_bytes(damage(p.read_bytes()))
        assert read_block_file(p, h(7), memoryview(bytearray(LAYOUT.block_bytes))) == why
        assert not p.exists()
    assert read_block_file(p, h(7), memoryview(out)) == "file missing"


def test_disk_tier_size_limit_lru_and_restart(tmp_path):
    fb = LAYOUT.block_bytes + 36
    d = DiskTier(tmp_path, "ns", 3 * fb, LAYOUT.block_bytes)
    data = memoryview(bytearray(LAYOUT.block_bytes))
    for i in (1, 2, 3):
        assert d.begin_write(h(i)) == []
        write_block_file(d.path(h(i)), h(i), data)
        d.end_write(h(i), True)
        os.utime(d.path(h(i)), (time.time() + i, time.time() + i))  # distinct ages for the scan
    assert d.begin_write(h(1)) is None  # already there
    d.touch(h(1))  # LRU: 2, 3, 1
    path3 = d.begin_read(h(3))  # read in flight: never deleted
    doomed = d.begin_write(h(4))
    assert doomed == [d.path(h(2))] and h(2) not in d
    write_block_file(d.path(h(4)), h(4), data, doomed)
    d.end_write(h(4), True)
    os.utime(d.path(h(4)), (time.time() + 9, time.time() + 9))
    doomed = d.begin_write(h(5))
    assert doomed == [d.path(h(1))]  # 3 is busy: 1 is next
    doomed[0].unlink()  # what the writer does first; then its write fails
    d.end_write(h(5), False)
    d.end_read(h(3), True)
    assert path3.exists() and not d.path(h(2)).exists() and not d.path(h(1)).exists()
    assert list(d.index) == [h(3), h(4)]
    (d.path(h(3)).with_suffix(".tmp")).write_bytes(b"half")  # a write cut short by a crash
    again = DiskTier(tmp_path, "ns", 3 * fb, LAYOUT.block_bytes)
    assert list(again.index) == [h(3), h(4)] and not d.path(h(3)).with_suffix(".tmp").exists()
    smaller = DiskTier(tmp_path, "ns", fb, LAYOUT.block_bytes)  # a smaller limit after a restart
    assert list(smaller.index) == [h(4)] and not d.path(h(3)).exists()
    assert list(DiskTier(tmp_path, "other-model", 3 * fb, LAYOUT.block_bytes).index) == []


def test_block_manager_release_list_and_pins_exact_ids():
    bm = PrefixCachingBlockManager(num_blocks=6, block_size=2)
    bm.released = []
    t = [1, 2, 3, 4, 5]
    bm.allocate("a", 5)  # blocks 0, 1, 2; 0 and 1 full
    bm.cache_full_blocks("a", t, 5)
    h0 = hash_block(None, [1, 2])
    h1 = hash_block(h0, [3, 4])
    bm.free("a")
    assert bm.released == [(1, h1), (0, h0)]  # tail first; the unhashed block 2 is not released
    bm.pin("\x00hold", [0, 1])
    assert bm.ref_count[:2] == [1, 1] and 0 not in bm.free_queue and bm.cached[h0] == 0  # still cached
    bm.released = []
    bm.free("\x00hold")
    assert bm.released == [(1, h1), (0, h0)] and list(bm.free_queue)[-2:] == [1, 0]
    bm.check_invariants()


def test_event_log_nets_changes_and_snapshots():
    log = KVEventLog()
    log.record("device", h(1), True)
    log.record("device", h(2), True)
    log.record("device", h(2), False)
    log.record("host", h(3), True)
    ev = {e.tier: (list(e.added), list(e.removed)) for e in log.drain()}
    assert ev == {"device": ([h(1)], [h(2)]), "host": ([h(3)], [])}
    assert log.drain() == []
    log.record("disk", h(4), True)
    snap = list(log.snapshot())
    assert len(snap) == 1 and {e.tier: set(e.added) for e in snap[0]} == {"device": {h(1)}, "host": {h(3)}, "disk": {h(4)}}
    assert log.drain() == []  # the snapshot carried them


def _worker(reg: Registry, wid: str, role=pb.ROLE_PREFILL, block_size=2):
    reg.register(pb.WorkerInfo(worker_id=wid, role=role, address=f"{wid}:1", model="m", transports=["grpc"],
                               kv_layout=pb.KVLayout(block_size=block_size, num_layers=2, num_kv_heads=2, head_dim=4)))


def test_kv_aware_routes_to_the_cached_prefix_weighted_by_tier_and_load():
    reg = Registry()
    for w in ("p1", "p2"):
        _worker(reg, w)
    _worker(reg, "d1", pb.ROLE_DECODE)
    prompt = list(range(1, 12))  # 5 full blocks before the last token
    hs = Prompt(prompt).hashes(2)
    assert len(hs) == 5 and hs[1] == hash_block(hash_block(None, [1, 2]), [3, 4])
    pol = KVAwarePolicy(load_weight=0.1)
    assert not reg.apply_kv_events("p1", 1, True, [spb.KVEvents(tier="disk", added=hs[:4])])
    assert not reg.apply_kv_events("p2", 1, True, [spb.KVEvents(tier="device", added=hs[:2])])
    p, d, t, why = route(reg, pol, "m", len(prompt), prompt_ids=prompt)
    assert p.worker_id == "p1" and "cached=4 blocks" in why  # 4 x 0.5 beats 2 x 1.0
    p.pending = 0
    reg.workers["p1"].load = pb.WorkerLoad(waiting=3)  # 0.4 - 0.3 < 0.4 - 0
    assert route(reg, pol, "m", len(prompt), prompt_ids=prompt)[0].worker_id == "p2"
    # without the prompt, or for a prompt nobody holds: least loaded
    assert route(reg, pol, "m", len(prompt))[0].worker_id == "p2"
    assert route(reg, pol, "m", 11, prompt_ids=list(range(50, 61)))[0].worker_id == "p2"
    # a chain counts from the first block: a worker holding only later blocks has nothing
    reg.workers["p1"].load = pb.WorkerLoad()
    reg.workers["p2"].pending = reg.workers["p1"].pending = 0
    assert not reg.apply_kv_events("p2", 2, False, [spb.KVEvents(tier="device", removed=[hs[0]], added=hs[2:])])
    assert KVAwarePolicy.cached(reg.workers["p2"], Prompt(prompt)) == (0.0, 0)


def test_kv_events_gap_drops_hints_until_a_reset():
    reg = Registry()
    _worker(reg, "p1")
    assert not reg.apply_kv_events("p1", 1, True, [spb.KVEvents(tier="device", added=[h(1)])])
    assert not reg.apply_kv_events("p1", 2, False, [spb.KVEvents(tier="host", added=[h(2)])])
    assert reg.workers["p1"].kv == {"device": {h(1)}, "host": {h(2)}}
    assert reg.apply_kv_events("p1", 4, False, [spb.KVEvents(tier="device", added=[h(3)])])  # 3 was lost
    assert reg.workers["p1"].kv == {}
    assert reg.apply_kv_events("p1", 5, False, [])  # still waiting for everything again
    assert not reg.apply_kv_events("p1", 6, True, [spb.KVEvents(tier="device", added=[h(1), h(3)])])
    assert reg.workers["p1"].kv == {"device": {h(1), h(3)}}
    assert not reg.apply_kv_events("p1", 0, False, [])  # a worker that publishes nothing


def test_kv_hints_are_bounded(monkeypatch):
    """A worker's published hashes stay within MAX_KV_HINTS, known tiers and 16-byte hashes: a
    member flooding its heartbeats cannot grow the scheduler's memory without bound."""
    import pdmesh.routing as routing

    monkeypatch.setattr(routing, "MAX_KV_HINTS", 3)
    reg = Registry()
    _worker(reg, "p1")
    junk = [spb.KVEvents(tier="elsewhere", added=[h(9)]), spb.KVEvents(tier="device", added=[b"short", h(1) + b"x"])]
    assert not reg.apply_kv_events("p1", 1, True, junk)
    assert reg.workers["p1"].kv == {"device": set()}
    assert not reg.apply_kv_events("p1", 2, False, [spb.KVEvents(tier="device", added=[h(1), h(2)]),
                                                    spb.KVEvents(tier="host", added=[h(3), h(4), h(5)])])
    assert reg.workers["p1"].kv == {"device": {h(1), h(2)}, "host": {h(3)}}  # 3 kept, the rest dropped
    assert not reg.apply_kv_events("p1", 3, False, [spb.KVEvents(tier="device", removed=[h(1)], added=[h(6)])])
    assert reg.workers["p1"].kv == {"device": {h(2), h(6)}, "host": {h(3)}}  # a removal makes room


@pytest.mark.parametrize("bad", [dict(kv_offload_cpu_gb=-1), dict(kv_offload_disk_path="/x"),
                                 dict(kv_offload_disk_gb=1.0), dict(kv_offload_disk_path="/x", kv_offload_disk_gb=1.0),
                                 dict(kv_offload_cpu_gb=1.0, enable_prefix_caching=False), dict(kv_offload_flush_seconds=-1)])
def test_tier_flags_are_validated(bad):
    from pdmesh.config import CacheConfig, ConfigError

    with pytest.raises(ConfigError, match="--kv-offload"):
        CacheConfig(**bad)


def test_decode_worker_refuses_tier_flags():
    from pdmesh.config import ConfigError
    from pdmesh.worker import build_configs

    with pytest.raises(ConfigError, match="prefill and colocated"):
        build_configs("decode", 0, ["--kv-offload-cpu-gb", "1"])
    assert build_configs("prefill", 0, ["--kv-offload-cpu-gb", "1"])[1].cache.kv_offload_cpu_gb == 1.0


def test_kv_aware_never_pairs_layouts_that_do_not_convert():
    """The worker holding the prefix is passed over when no decode worker can take its KV."""
    reg = Registry()
    for wid, role, tp in (("p1", pb.ROLE_PREFILL, 2), ("p2", pb.ROLE_PREFILL, 1), ("d1", pb.ROLE_DECODE, 1)):
        reg.register(pb.WorkerInfo(worker_id=wid, role=role, address=f"{wid}:1", model="m", transports=["grpc"],
                                   kv_layout=pb.KVLayout(block_size=2, num_layers=2, num_kv_heads=3, head_dim=4,
                                                         tensor_parallel_size=tp)))  # p1: 3 heads do not split over 2 ranks
    prompt = list(range(1, 12))
    assert not reg.apply_kv_events("p1", 1, True, [spb.KVEvents(tier="device", added=Prompt(prompt).hashes(2))])
    p, d, _, _ = route(reg, KVAwarePolicy(), "m", len(prompt), prompt_ids=prompt)
    assert (p.worker_id, d.worker_id) == ("p2", "d1")


def test_tiers_with_tensor_parallelism_are_refused_naming_the_flags():
    """A rank's pool holds only its KV heads, a tier slot one pool's whole block: refused up front."""
    from pdmesh.config import CacheConfig, ConfigError, DeviceConfig, EngineConfig

    with pytest.raises(ConfigError, match="--kv-offload-cpu-gb: lower KV tiers are not supported with --tensor-parallel-size 2"):
        EngineConfig(cache=CacheConfig(kv_offload_cpu_gb=1.0), device=DeviceConfig(device="cpu", tensor_parallel_size=2))
    EngineConfig(cache=CacheConfig(kv_offload_cpu_gb=1.0), device=DeviceConfig(device="cpu"))
    EngineConfig(device=DeviceConfig(device="cpu", tensor_parallel_size=2))
