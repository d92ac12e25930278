"""Lower KV tiers as engine state: blocks copied from the device pool down to host memory (and from
there to disk) and loaded back on a prefix hit instead of recomputed.  Engine thread only.

Lifecycle of a block
--------------------
1. **Offload.**  A cached block whose ref count drops to 0 (``block_manager.released``) and that the
   host tier lacks gets a host slot (the host LRU evicts to make room: an evicted block is written
   to disk unless it is there already, else dropped).  Its device block is *pinned* under a
   connector hold while one batched copy reads it (CUDA: the copy kernel on a low-priority side
   stream, after the compute stream's queued work; CPU: a copy thread); when the copy has stopped
   the hold frees the device block (still cached there) and the host slot becomes a hit.
2. **Lookup.**  When the scheduler admits a request, the prefix chain goes on past the device's hits
   into the host tier, then the disk tier (``plan``): as many consecutive blocks as the lower tiers
   hold (never the prompt's last token).
3. **Load.**  If there are such blocks, the request gets all its prompt blocks at once and waits in
   the connector (``TierLoadJob``, like a pull) while disk blocks are read into host slots (I/O
   threads, checksums verified) and then every block that arrived intact, in order up to the first
   that did not, is copied host -> device in one launch (CUDA: a high-priority side stream).  The
   engine then requeues it with those tokens computed (they count as cached tokens) and the rest is
   computed as usual.  Other requests run meanwhile.  A request aborted during its load is dropped
   at once; blocks a copy may still write wait in the connector's quarantine.

Who owns what: a device block belongs to the block manager's owners (requests, a hold while an
offload reads it); a host slot to the host tier (free, pending while a copy writes it, valid, or
detached while still read); a disk file to the disk tier (never deleted while read or written).
A slot or file is never reused while anything reads or writes it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from pdmesh.config import CacheConfig, ModelConfig
from pdmesh.kv.block_manager import PrefixCachingBlockManager, PrefixHit, hash_block
from pdmesh.kv.copy import copy_blocks
from pdmesh.kv.pool import KVCachePool
from pdmesh.kv.tiers import DiskTier, HostTier, TierEvent, read_block_file, write_block_file
from pdmesh.transport.base import BaseTransfer, TransferState
from pdmesh.transport.cuda_ipc import CudaCopy

log = logging.getLogger(__name__)

TIERS = ("host", "disk")
MAX_DISK_WRITES = 64
"""Host -> disk writes in flight at most; a block evicted from the host tier beyond that is dropped
(copies never queue without bound behind a slow disk)."""
LOAD_TIMEOUT_S = 60.0
"""A load not done by then fails (its request computes the prompt instead)."""


def namespace(model: ModelConfig, pool: KVCachePool) -> str:
    """What a disk block's bytes depend on besides its tokens: the model and weights (quantized or
    not, and the dtype computing it), the KV dtype and layout (a directory name; blocks of another
    model are never looked at)."""
    lay = pool.layout
    key = repr((model.model, model.load_format, model.seed if model.load_format == "dummy" else None,
                lay.num_layers, lay.num_kv_heads, lay.head_dim, lay.block_size, lay.dtype, lay.layout,
                model.quantization, model.dtype))
    return hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


class FutureCopy(BaseTransfer):
    """Work running on a thread: done when its future is; ``cancel`` stops it only before it started."""

    def __init__(self, fut: Future, nbytes: int) -> None:
        self.fut = fut
        self.nbytes = nbytes

    def poll(self) -> TransferState:
        if not self.fut.done():
            return TransferState.RUNNING
        if self.fut.cancelled() or self.fut.exception() is not None:
            self.error = repr(self.fut.exception()) if not self.fut.cancelled() else "cancelled"
            return TransferState.FAILED
        return TransferState.DONE

    def cancel(self) -> bool:
        return self.fut.cancel() or self.fut.done()


class Copier:
    """Launches one batched block copy between the pool and the host tier without waiting for it:
    on CUDA the copy kernel on a side stream of the pool's device (explicitly: the calling thread's
    current device may be another), finished when its event fires; on CPU, on a copy thread."""

    def __init__(self, device: torch.device, high_priority: bool, after_compute: bool) -> None:
        self.device = device
        self.after_compute = after_compute
        """Order the copy after the compute stream's queued work (it reads blocks a step wrote)."""
        if device.type == "cuda":
            high, low = torch.cuda.Stream.priority_range()  # type: ignore[call-arg]  # a staticmethod at runtime; torch's stub omits it
            self.stream = torch.cuda.Stream(device, priority=high if high_priority else low)
        else:
            self.thread = ThreadPoolExecutor(1, thread_name_prefix="kv-copy")

    def launch(self, src: torch.Tensor, src_ids: Sequence[int], dst: torch.Tensor, dst_ids: Sequence[int],
               nbytes: int) -> BaseTransfer:
        if self.device.type != "cuda":
            s, d = torch.tensor(list(src_ids), dtype=torch.int64), torch.tensor(list(dst_ids), dtype=torch.int64)
            return FutureCopy(self.thread.submit(copy_blocks, src, s, dst, d), nbytes)
        dev = self.device
        ids = torch.tensor([list(src_ids), list(dst_ids)], dtype=torch.int64).pin_memory()
        with torch.cuda.device(dev), torch.cuda.stream(self.stream):
            if self.after_compute:
                self.stream.wait_stream(torch.cuda.default_stream(dev))
            begin, event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            idx = ids.to(dev, non_blocking=True)
            begin.record(self.stream)
            copy_blocks(src, idx[0], dst, idx[1])
            event.record(self.stream)
        return CudaCopy([(begin, event)], nbytes, (ids, idx))


@dataclass
class TierCounters:
    """Counters of one lower tier (monotonic, read by the metrics refresher)."""

    hits: int = 0
    """Prompt tokens loaded from this tier instead of recomputed."""
    misses: int = 0
    """Prompt tokens looked up in this tier (past the tiers above) and not loaded from it."""
    offload_bytes: int = 0
    offload_seconds: float = 0.0
    load_bytes: int = 0
    load_seconds: float = 0.0
    dropped_blocks: int = 0
    """Blocks not written into this tier (it was full of blocks in use, or the disk was behind)."""
    corrupt_blocks: int = 0
    """Disk blocks refused on read (checksum, truncated, header): treated as misses."""
    used_bytes: int = 0
    capacity_bytes: int = 0


@dataclass
class TierLoadJob:
    """A request waiting in the connector for lower-tier blocks (settled by the engine)."""

    request_id: str
    first_block: int
    """Index in the request's block table of the first loaded block (the ones before are device hits)."""
    hashes: list[bytes]
    tiers: list[str]
    """Where each block was found at lookup ('host' or 'disk')."""
    on_stopped: Callable[[], None] = lambda: None
    error: str = ""
    started: float = field(default_factory=time.monotonic)
    count_tokens: Optional[int] = None
    """Tokens looked up past the device's hit, to count in the tier hit/miss counters when the load
    ends (None: counted already, e.g. a preempted request's second load)."""


class TierLoad(BaseTransfer):
    """Disk reads into host slots (futures of the tiers' I/O threads), then one host -> device copy
    of the blocks that arrived intact, in order (``loaded`` of them)."""

    def __init__(self, reads: list[Optional[Future]], slots: list[int], dst: list[int], launch) -> None:
        self.reads, self.slots, self.dst, self._launch = reads, slots, dst, launch
        self.copy: Optional[BaseTransfer] = None
        self.loaded = 0

    def poll(self) -> TransferState:
        if self.copy is None:
            if any(f is not None and not f.done() for f in self.reads):
                return TransferState.RUNNING
            ok = [f is None or (not f.cancelled() and f.exception() is None and f.result() is None) for f in self.reads]
            self.loaded = ok.index(False) if False in ok else len(ok)
            if self.loaded == 0:
                return TransferState.DONE
            self.copy = self._launch(self.slots[:self.loaded], self.dst[:self.loaded])
        st = self.copy.poll()
        self.nbytes, self.error = self.copy.nbytes, self.copy.error
        return st

    def cancel(self) -> bool:
        """Before the device copy nothing writes the request's blocks (reads land in host slots)."""
        return self.copy is None or self.copy.cancel()


class KVTiers:
    """The host (and disk) tiers of one engine and the copies between them (see module docstring)."""

    def __init__(self, cfg: CacheConfig, model: ModelConfig, pool: KVCachePool, blocks: PrefixCachingBlockManager,
                 connector, device: torch.device, on_event: Optional[TierEvent] = None) -> None:
        self.pool, self.blocks, self.connector = pool, blocks, connector
        self.bs = pool.block_size
        self.host = HostTier(pool.layout, int(cfg.kv_offload_cpu_gb * 2**30), pool.kv.dtype, device.type == "cuda", on_event)
        self.disk: Optional[DiskTier] = None
        if cfg.kv_offload_disk_path:
            self.disk = DiskTier(Path(cfg.kv_offload_disk_path), namespace(model, pool), int(cfg.kv_offload_disk_gb * 2**30),
                                 self.host.block_bytes, on_event)
        self.io = ThreadPoolExecutor(cfg.kv_offload_io_threads, thread_name_prefix="kv-disk") if self.disk else None
        self.offloader = Copier(device, high_priority=False, after_compute=True)
        self.loader = Copier(device, high_priority=True, after_compute=False)
        self.counters = {t: TierCounters() for t in TIERS}
        self._writes: dict[bytes, tuple[Future, int, float]] = {}
        """Host -> disk writes in flight: hash -> (future, host slot, start)."""
        self._reads: dict[bytes, tuple[Future, int, float]] = {}
        """Disk -> host reads in flight: hash -> (future, host slot, start)."""
        self._holds = 0
        self._deferred: list[tuple[int, bytes]] = []
        """Released blocks waiting for a host slot that a disk write in flight will free."""
        self.spare_slots = max(1, self.host.num_slots // 8) if self.disk is not None else 0
        """With a disk tier, host slots kept free (or being written to disk) ahead of need."""
        blocks.released = []
        log.info("KV tiers: host %.2f GiB (%d blocks of %.1f MiB)%s", self.host.capacity_bytes / 2**30, self.host.num_slots,
                 self.host.block_bytes / 2**20, f", disk {cfg.kv_offload_disk_gb:g} GiB at {self.disk.dir}" if self.disk else "")

    # ---------------------------------------------------------------- every step
    @property
    def busy(self) -> bool:
        """Disk I/O in flight (copies to and from the pool are connector entries)."""
        return bool(self._writes or self._reads or self._deferred)

    def step(self) -> None:
        """Between steps: settle finished disk I/O, copy newly released cached blocks down, and keep
        some host slots free ahead of need (evicting to disk takes a write before a slot frees)."""
        self._poll_io()
        self._offload_released()
        if self.disk is not None:
            host = self.host
            while len(host.free_slots) + len(self._writes) < self.spare_slots and len(self._writes) < MAX_DISK_WRITES:
                victim = host.evict_lru()
                if victim is None:
                    break
                self._spill(*victim)

    def _offload_released(self) -> None:
        released = self._deferred + (self.blocks.released or [])
        self.blocks.released, self._deferred = [], []
        ids, slots, hashes = [], [], []
        for b, h in released:
            if self.blocks.block_hash[b] != h:  # evicted and reused since
                continue
            if self.host.known(h):
                if h in self.host:
                    self.host.touch(h)
                continue
            slot = self._host_slot(h)
            if slot is None:
                if self._writes and len(self._deferred) < self.host.num_slots:
                    self._deferred.append((b, h))  # a slot frees when a disk write ends: next step
                else:
                    self.counters["host"].dropped_blocks += 1
                continue
            ids.append(b)
            slots.append(slot)
            hashes.append(h)
        if not ids:
            return
        self._holds += 1
        key = f"\x00kv-offload-{self._holds}"
        self.blocks.pin(key, ids[::-1])  # freed last to first: back in the free queue in release order
        started = time.monotonic()
        copy = self.offloader.launch(self.pool.kv, ids, self.host.view, slots, len(ids) * self.host.block_bytes)
        self.connector.hold(key, copy, lambda: self._offloaded(hashes, copy, started))

    def _offloaded(self, hashes: list[bytes], copy: BaseTransfer, started: float) -> None:
        ok = copy.poll() is TransferState.DONE
        for h in hashes:
            self.host.commit(h, ok)
        if ok:
            c = self.counters["host"]
            c.offload_bytes += copy.nbytes
            c.offload_seconds += copy.device_seconds() or (time.monotonic() - started)
        else:
            log.warning("offloading %d KV blocks to host memory failed: %s", len(hashes), copy.error)

    def _host_slot(self, h: bytes, for_load: bool = False) -> Optional[int]:
        """A host slot for ``h``: a free one, else one evicted from the LRU end that frees at once
        (no disk tier, or the block is on disk already).  Else, for a load (a block wanted now),
        the least recently used block is dropped; for an offload it is written to disk and None
        returned (the slot frees when the write is done: the caller retries then)."""
        slot = self.host.take(h)
        while slot is None:
            victim = self.host.evict_lru(lambda k: self.disk is None or k in self.disk)
            if victim is None and (for_load or self.disk is None):
                victim = self.host.evict_lru()
                if victim is not None and self.disk is not None:
                    self.counters["disk"].dropped_blocks += 1
                    self.host.drop_detached(victim[1])
                    slot = self.host.take(h)
                    continue
            elif victim is None:
                victim = self.host.evict_lru() if len(self._writes) < MAX_DISK_WRITES else None
                if victim is not None:
                    self._spill(*victim)
                return None
            if victim is None:
                return None
            self._spill(*victim)
            slot = self.host.take(h)
        return slot

    def _spill(self, h: bytes, slot: int) -> None:
        """A block evicted from host memory: written to disk (unless it is there), else dropped."""
        disk = self.disk
        if disk is not None and h in disk:
            disk.touch(h)
        elif disk is not None and len(self._writes) < MAX_DISK_WRITES and (doomed := disk.begin_write(h)) is not None:
            self.host.add_reader(slot)
            assert self.io is not None  # made with the disk tier
            fut = self.io.submit(write_block_file, disk.path(h), h, self.host.slot_bytes(slot), doomed)
            self._writes[h] = (fut, slot, time.monotonic())
            return
        elif disk is not None:
            self.counters["disk"].dropped_blocks += 1
        self.host.drop_detached(slot)

    def _poll_io(self) -> None:
        now = time.monotonic()
        for h, (fut, slot, t0) in list(self._writes.items()):
            if fut.done():
                del self._writes[h]
                ok = fut.exception() is None
                if not ok:
                    log.warning("writing KV block %s to disk failed: %r", h.hex(), fut.exception())
                assert self.disk is not None  # disk writes exist only with a disk tier
                self.disk.end_write(h, ok)
                self.host.done_reading(slot)
                if ok:
                    c = self.counters["disk"]
                    c.offload_bytes += fut.result()
                    c.offload_seconds += now - t0
        for h, (fut, _slot, t0) in list(self._reads.items()):
            if fut.done():
                del self._reads[h]
                why = fut.exception() or fut.result()
                if why is not None:
                    log.warning("disk KV block %s refused (%s): a miss", h.hex(), why)
                    self.counters["disk"].corrupt_blocks += 1
                else:
                    c = self.counters["disk"]
                    c.load_bytes += self.host.block_bytes
                    c.load_seconds += now - t0
                assert self.disk is not None  # disk reads exist only with a disk tier
                self.disk.end_read(h, why is None)
                self.host.commit(h, why is None)

    # ---------------------------------------------------------------- lookups and loads
    def plan(self, token_ids: Sequence[int], hit: PrefixHit) -> list[tuple[bytes, str]]:
        """The blocks right after the device's hit that the lower tiers hold, in order: (hash, tier);
        never the block of the last token."""
        out: list[tuple[bytes, str]] = []
        parent = hit.hashes[-1] if hit.hashes else None
        for i in range(len(hit.block_ids), (len(token_ids) - 1) // self.bs):
            h = hash_block(parent, token_ids[i * self.bs:(i + 1) * self.bs])
            if h in self.host:
                out.append((h, "host"))
            elif self.disk is not None and h in self.disk and h not in self._reads and not self.host.known(h):
                out.append((h, "disk"))
            else:
                break
            parent = h
        return out

    def count_lookup(self, looked_up_tokens: int, tiers: Sequence[str] = ()) -> None:
        """Tier counters of one admitted request: ``looked_up_tokens`` past the device's hit, and the
        tiers its loaded blocks came from (in order)."""
        host_hit = sum(1 for t in tiers if t == "host") * self.bs
        disk_hit = sum(1 for t in tiers if t == "disk") * self.bs
        self.counters["host"].hits += host_hit
        self.counters["host"].misses += looked_up_tokens - host_hit
        if self.disk is not None:
            self.counters["disk"].hits += disk_hit
            self.counters["disk"].misses += looked_up_tokens - host_hit - disk_hit

    def start_load(self, request_id: str, plan: list[tuple[bytes, str]], first_block: int,
                   dst: list[int]) -> tuple[TierLoadJob, TierLoad]:
        """Start loading ``plan``'s blocks into device blocks ``dst`` (the request's, from
        ``first_block``).  Host slots are read-pinned until the job has stopped."""
        for h, tier in plan:  # pin the host hits first: finding room for disk blocks must not evict them
            if tier == "host":
                self.host.add_reader(self.host.index[h])
                self.host.touch(h)
        slots: list[int] = []
        reads: list[Optional[Future]] = []
        slot: Optional[int]
        for i, (h, tier) in enumerate(plan):
            if tier == "host":
                slot = self.host.index[h]
                reads.append(None)
            else:
                slot = self._host_slot(h, for_load=True)
                if slot is None:  # host memory full of blocks in use: load what comes before
                    for h2, t2 in plan[i:]:
                        if t2 == "host":
                            self.host.done_reading(self.host.index[h2])
                    break
                assert self.disk is not None and self.io is not None  # plan() lists disk blocks only with a disk tier
                path = self.disk.begin_read(h)
                fut = self.io.submit(read_block_file, path, h, self.host.slot_bytes(slot))
                self._reads[h] = (fut, slot, time.monotonic())
                reads.append(fut)
                self.host.add_reader(slot)
            slots.append(slot)
        n = len(slots)
        job = TierLoadJob(request_id, first_block, [h for h, _ in plan[:n]], [t for _, t in plan[:n]])

        def stopped() -> None:
            for s in slots:
                self.host.done_reading(s)

        job.on_stopped = stopped

        def launch(src_slots: list[int], dst_ids: list[int]) -> BaseTransfer:
            return self.loader.launch(self.host.view, src_slots, self.pool.kv, dst_ids, len(src_slots) * self.host.block_bytes)

        return job, TierLoad(reads, slots, dst[:n], launch)

    def loaded(self, job: TierLoadJob, load: Optional[TierLoad]) -> int:
        """A load ended: count it; returns the blocks that arrived (0 for a failed one)."""
        n = load.loaded if load is not None and load.copy is not None and load.copy.poll() is TransferState.DONE else 0
        if n:
            assert load is not None and load.copy is not None  # n > 0 only then
            c = self.counters["host"]
            c.load_bytes += load.copy.nbytes
            c.load_seconds += load.copy.device_seconds() or (time.monotonic() - job.started)
        return n

    def flush(self, poll: Callable[[], bool], seconds: float) -> int:
        """A graceful shutdown (engine thread, nothing left to run): let the copies and disk I/O in
        flight finish (``poll``: the engine's ``poll_transfers``), then write every host block the
        disk tier lacks to disk, least recently used first (so a restart's scan, oldest first,
        keeps the hottest longest), within ``seconds`` in all.  Returns the blocks written."""
        if self.disk is None or seconds <= 0:
            return 0
        assert self.io is not None  # made with the disk tier
        deadline = time.monotonic() + seconds
        while poll() and time.monotonic() < deadline:
            time.sleep(0.002)
        writes = []
        for h, slot in list(self.host.index.items()):
            if h in self.disk or (doomed := self.disk.begin_write(h)) is None:
                continue
            self.host.add_reader(slot)
            writes.append((h, slot, self.io.submit(write_block_file, self.disk.path(h), h, self.host.slot_bytes(slot), doomed)))
        written = 0
        for h, slot, fut in writes:
            try:
                self.counters["disk"].offload_bytes += fut.result(timeout=max(0.0, deadline - time.monotonic()))
                ok = True
            except Exception as exc:  # noqa: BLE001 - a block not written is only a later miss
                ok = False
                log.warning("writing KV block %s to disk at shutdown failed or ran out of time: %r", h.hex(), exc)
            self.disk.end_write(h, ok)
            self.host.done_reading(slot)
            written += ok
        log.info("KV tiers: wrote %d of %d host blocks to disk at shutdown", written, len(writes))
        return written

    def snapshot(self) -> dict[str, TierCounters]:
        """The counters with occupancy filled in (a copy: safe to hand to another thread)."""
        out = {}
        for t, c in self.counters.items():
            tier = self.host if t == "host" else self.disk
            if tier is None:
                continue
            used, cap = tier.used_bytes, tier.capacity_bytes if isinstance(tier, HostTier) else tier.capacity
            out[t] = TierCounters(**{**c.__dict__, "used_bytes": used, "capacity_bytes": cap})
        return out
