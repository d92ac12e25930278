"""Lower KV tiers in the engine (CPU, tiny model): blocks evicted from a small device pool come back
from host memory or disk with the same tokens as recomputing them, byte for byte the KV that went
down, counted as cached tokens; a damaged disk block is a miss; a restarted engine finds its disk
blocks; an abort during a load leaves nothing behind."""

from __future__ import annotations

import time

import pytest
import torch

from pdmesh.config import CacheConfig, DeviceConfig, EngineConfig, KVCacheDtype, ModelConfig
from pdmesh.engine import LLMEngine, SamplingParams

BS = 8
BLOCK_BYTES = 2 * 2 * BS * 2 * 16 * 4  # layers, K/V, slots, kv heads, head dim, fp32
GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
A, B, C = list(range(10, 90)), list(range(100, 180)), [(i * 7) % 256 for i in range(80)]
A2 = A[:72] + [3, 1, 4, 1, 5, 9, 2, 6]  # A's first 9 blocks, another last block


def engine(model_dir, blocks=24, host_blocks=0, disk=None, disk_blocks=64, kv: KVCacheDtype = "auto") -> LLMEngine:
    bb = BLOCK_BYTES // 4 if kv == "fp8" else BLOCK_BYTES
    cache = CacheConfig(block_size=BS, num_kv_blocks=blocks, kv_offload_cpu_gb=host_blocks * bb / 2**30,
                        kv_offload_disk_path=str(disk) if disk else None,
                        kv_offload_disk_gb=disk_blocks * (bb + 36) / 2**30 if disk else 0.0, kv_cache_dtype=kv)
    return LLMEngine(EngineConfig(model=ModelConfig(model=model_dir), cache=cache, device=DeviceConfig(device="cpu")))


def settle(eng: LLMEngine, timeout: float = 30.0) -> None:
    """Until every copy and disk write has finished."""
    deadline = time.monotonic() + timeout
    while eng.poll_transfers():
        assert time.monotonic() < deadline, "tier copies did not finish"
        time.sleep(0.002)


def run(eng: LLMEngine, rid: str, prompt: list[int], prefill_only: bool = False):
    """(tokens, cached tokens, held block ids) of one request run alone."""
    eng.add_request(rid, prompt, GREEDY, prefill_only)
    toks, cached, held = [], 0, None
    deadline = time.monotonic() + 60
    while True:
        for out in eng.step():
            toks += out.new_token_ids
            cached, held = out.num_cached_tokens, out.held_block_ids
            if out.finished:
                settle(eng)
                return toks, cached, held
        assert time.monotonic() < deadline


def idle(eng: LLMEngine) -> None:
    settle(eng)
    eng.blocks.check_invariants()
    assert eng.blocks.num_free_blocks == eng.blocks.num_blocks and not eng.remote and not eng.connector.pending
    t = eng.tiers
    assert not any(t.host.readers) and not t.host.pending and not t.host.detached


@pytest.fixture(scope="module")
def reference(model_dir):
    eng = engine(model_dir, blocks=128)
    return {name: run(eng, name, p)[0] for name, p in (("A", A), ("B", B), ("C", C), ("A2", A2))}


@pytest.mark.parametrize("tiers", ["host", "host+disk"])
def test_tiers_give_the_same_tokens_and_count_reloaded_tokens_as_cached(model_dir, reference, tmp_path, tiers):
    disk = tmp_path / "kv" if tiers == "host+disk" else None
    eng = engine(model_dir, host_blocks=64 if disk is None else 16, disk=disk)
    got = {}
    for name, p in (("A", A), ("B", B), ("C", C), ("A2", A2)):  # B and C push A out of the 24-block pool
        got[name], cached, _ = run(eng, name, p)
        assert cached == (72 if name == "A2" else 0), name
    assert got == reference
    c = eng.stats().tiers
    device = eng.blocks.prefix_hits  # A's head blocks were freed last: still on the device
    if disk is None:
        assert c["host"].hits > 0 and device + c["host"].hits == 72
        assert c["host"].load_bytes == c["host"].hits // BS * BLOCK_BYTES
    else:  # host holds 16 blocks: A's tail went on to disk
        assert device + c["host"].hits + c["disk"].hits == 72 and c["disk"].hits > 0 and c["disk"].offload_bytes > 0
    assert c["host"].offload_bytes > 0 and c["host"].used_bytes > 0
    idle(eng)


def test_reloaded_kv_is_the_kv_that_was_offloaded_and_equals_recomputed(model_dir, tmp_path):
    eng = engine(model_dir, host_blocks=16, disk=tmp_path / "kv")
    _, _, held = run(eng, "a", A, prefill_only=True)
    offloaded = eng.pool.kv[:, held[:9]].clone()
    eng.release("a")
    run(eng, "b", B)
    run(eng, "c", C)
    _, cached, held2 = run(eng, "a2", A2, prefill_only=True)
    assert cached == 72 and not set(held2[:9]) & set(held[:9]) or cached == 72
    assert torch.equal(eng.pool.kv[:, held2[:9]], offloaded)  # bit for bit
    ref = engine(model_dir, blocks=64)
    _, _, held_ref = run(ref, "a2", A2, prefill_only=True)
    torch.testing.assert_close(eng.pool.kv[:, held2], ref.pool.kv[:, held_ref], rtol=1e-5, atol=1e-5)
    eng.release("a2")
    idle(eng)


def a_chain() -> list[bytes]:
    from pdmesh.kv.block_manager import hash_block

    chain, parent = [], None
    for i in range(9):
        parent = hash_block(parent, A[i * BS:(i + 1) * BS])
        chain.append(parent)
    return chain


def push_a_to_disk(eng: LLMEngine) -> torch.Tensor:
    """Run A, then enough others that A's blocks are on disk only (not on the device, not in host
    memory); returns the bytes of A's 9 full blocks as they were on the device."""
    more = [[(i * 13 + k) % 256 for i in range(80)] for k in (1, 2)]
    run(eng, "A", A)
    a_bytes = eng.pool.kv[:, [eng.blocks.cached[h] for h in a_chain()]].view(torch.uint8).clone()
    for name, p in (("B", B), ("C", C), ("D", more[0]), ("E", more[1])):
        run(eng, name, p)
    idle(eng)
    assert all(h in eng.tiers.disk and h not in eng.tiers.host and h not in eng.blocks.cached for h in a_chain())
    return a_bytes


def test_a_damaged_disk_block_is_a_miss_never_served(model_dir, reference, tmp_path):
    eng = engine(model_dir, host_blocks=12, disk=tmp_path / "kv")
    push_a_to_disk(eng)
    path = eng.tiers.disk.path(a_chain()[4])
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    toks, cached, _ = run(eng, "A2", A2)
    assert toks == reference["A2"]
    assert cached == 4 * BS  # the blocks before the damaged one, nothing from it on
    c = eng.stats().tiers["disk"]
    assert c.corrupt_blocks == 1 and c.hits == 4 * BS and not path.exists() and a_chain()[4] not in eng.tiers.disk
    idle(eng)


def test_warm_restart_reuses_the_disk_tier(model_dir, reference, tmp_path):
    eng = engine(model_dir, host_blocks=12, disk=tmp_path / "kv")
    push_a_to_disk(eng)
    on_disk = set(eng.tiers.disk.index)
    del eng
    again = engine(model_dir, host_blocks=12, disk=tmp_path / "kv")
    assert set(again.tiers.disk.index) == on_disk
    toks, cached, _ = run(again, "A2", A2)
    assert toks == reference["A2"] and cached == 72
    assert again.stats().tiers["disk"].hits == cached  # nothing was on the device or in host memory
    idle(again)


def test_abort_during_a_load_frees_every_block_and_slot(model_dir, reference, tmp_path):
    eng = engine(model_dir, host_blocks=16, disk=tmp_path / "kv")
    for name, p in (("A", A), ("B", B), ("C", C)):
        run(eng, name, p)
    eng.add_request("x", A2, GREEDY)
    eng.step()  # admitted: its blocks load
    assert "x" in eng.remote and eng.connector.has("x")
    assert eng.abort("x")
    idle(eng)
    toks, cached, _ = run(eng, "A2", A2)  # the tiers still serve it afterwards
    assert toks == reference["A2"] and cached == 72
    idle(eng)


def test_disk_tier_stays_within_its_size(model_dir, tmp_path):
    eng = engine(model_dir, host_blocks=4, disk=tmp_path / "kv", disk_blocks=6)
    for name, p in (("A", A), ("B", B), ("C", C)):
        run(eng, name, p)
    idle(eng)
    d = eng.tiers.disk
    files = sorted(d.dir.glob("*/*"))
    assert len(d.index) == 6 and {p.stem for p in files} == {h.hex() for h in d.index}  # nothing else on disk
    assert sum(p.stat().st_size for p in files) == 6 * (BLOCK_BYTES + 36) <= d.capacity
    c = eng.stats().tiers["disk"]
    assert c.used_bytes == 6 * (BLOCK_BYTES + 36) and c.offload_bytes > c.used_bytes  # more went down than stayed


def test_a_graceful_stop_writes_host_blocks_to_disk_for_the_next_start(model_dir, reference, tmp_path):
    eng = engine(model_dir, host_blocks=64, disk=tmp_path / "kv")
    run(eng, "A", A)
    idle(eng)
    assert all(h in eng.tiers.host and h not in eng.tiers.disk for h in a_chain())  # A is in host memory only
    assert eng.tiers.flush(eng.poll_transfers, 10.0) >= 9
    assert all(h in eng.tiers.disk for h in a_chain())
    del eng
    again = engine(model_dir, host_blocks=64, disk=tmp_path / "kv")
    toks, cached, _ = run(again, "A2", A2)
    assert toks == reference["A2"] and cached == 72 and again.stats().tiers["disk"].hits == 72
    idle(again)


def test_fp8_kv_blocks_go_to_disk_and_come_back_byte_for_byte(model_dir, tmp_path):
    """--kv-cache-dtype fp8 under host and disk tiers: blocks of a quarter of fp32's bytes go down
    to host memory and disk and come back bit for bit, with the tokens of an fp8 engine that
    recomputes them; fp8, quantized and full-precision blocks live in separate disk namespaces."""
    from pdmesh.engine.offload import namespace

    eng = engine(model_dir, host_blocks=12, disk=tmp_path / "kv", kv="fp8")
    assert eng.tiers.host.block_bytes == BLOCK_BYTES // 4
    a_bytes = push_a_to_disk(eng)
    toks, cached, _ = run(eng, "A2", A2)
    assert cached == 72 and eng.stats().tiers["disk"].hits == 72
    assert torch.equal(eng.pool.kv[:, [eng.blocks.cached[h] for h in a_chain()]].view(torch.uint8), a_bytes)
    assert toks == run(engine(model_dir, blocks=64, kv="fp8"), "A2", A2)[0]
    idle(eng)
    plain = engine(model_dir, blocks=4)
    keys = {namespace(ModelConfig(model=model_dir, quantization=q), pool) for q in (None, "int8") for pool in (eng.pool, plain.pool)}
    assert len(keys) == 4
