"""The lower KV tiers under a worker's device pool: host memory and disk, both keyed by a block's
prefix hash (the chained content hash of ``block_manager``), each an LRU bounded in size.

Pure bookkeeping and storage; the engine's ``pdmesh.engine.offload.KVTiers`` decides what moves
when, on the engine thread (these classes are not thread-safe: one owner thread).  The I/O
functions at the bottom (``write_block_file``, ``read_block_file``) are the only code that runs on
I/O threads; they touch nothing but the file and the buffer they are given.

Host tier
---------
One buffer ``[slots, L, 2, block_size, Hkv, D]`` (block-major: one block is one contiguous run of
bytes, which a disk file is written from and read into without staging), pinned on CUDA workers
(``cudaHostRegister``: exactly the size asked, and mapped for the copy kernel).  A slot is

* free;
* *pending* under a hash: a copy (device -> host, or disk -> host) is writing it; not yet a hit;
* *valid* under a hash: in the LRU index, a hit;
* *detached*: evicted from the index while readers (a load to the device, a write to disk) still
  read it; free when the last reader is done.

A slot with readers is never evicted or reused.  Eviction takes the least recently used valid
slot without readers; the caller may write it to disk (adding a reader) or drop it.

Disk tier
---------
One file per block, ``DIR/<namespace>/<hh>/<hash>.kv``: a header (magic, version, the block's hash,
payload length, CRC-32 of the payload) and the payload.  Written to a temporary name and renamed,
so a file under its final name was complete when written; read back only if the header, the
length and the checksum agree (else the file is deleted and the read is a miss — never served).
The namespace (model, weights, dtype, KV layout) keeps one model's blocks from another's.  At start
the directory is scanned (oldest file first in the LRU), so a restarted worker reuses its blocks;
the total size stays under the limit (least recently used files deleted first, never a file being
read or written).
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from pdmesh.kv.pool import KVLayout

log = logging.getLogger(__name__)

TierEvent = Callable[[str, bytes, bool], None]
"""(tier name, block hash, True: now held / False: no longer held) -> None."""

_HEADER = struct.Struct("<4sHH16sQI")
_MAGIC = b"PDKV"
_VERSION = 1


class HostTier:
    """Host-memory KV blocks by hash (see module docstring)."""

    name = "host"

    def __init__(self, layout: KVLayout, capacity_bytes: int, dtype: torch.dtype, pin: bool,
                 on_event: Optional[TierEvent] = None) -> None:
        self.block_bytes = layout.block_bytes
        self.num_slots = capacity_bytes // self.block_bytes
        if self.num_slots < 1:
            raise ValueError(f"a host KV tier of {capacity_bytes} bytes holds no block of {self.block_bytes} bytes")
        shape = (self.num_slots, layout.num_layers, 2, layout.block_size, layout.num_kv_heads, layout.head_dim)
        self.data = torch.empty(shape, dtype=dtype)
        self._registered = False
        if pin:
            nbytes = self.data.numel() * self.data.element_size()
            err = torch.cuda.cudart().cudaHostRegister(self.data.data_ptr(), nbytes, 0)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister of the {nbytes / 2**30:.1f} GiB host KV tier failed ({err})")
            self._registered = True
        self.view = self.data.transpose(0, 1)
        """[L, slots, 2, bs, Hkv, D]: the pool layout that ``copy_blocks`` takes."""
        self.index: OrderedDict[bytes, int] = OrderedDict()
        """Valid blocks, least recently used first."""
        self.pending: dict[bytes, int] = {}
        self.readers = [0] * self.num_slots
        self.detached: set[int] = set()
        self.free_slots = list(range(self.num_slots - 1, -1, -1))
        """Free slots; pop() hands out the lowest id."""
        self.on_event = on_event

    def close(self) -> None:
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self.data.data_ptr())
            self._registered = False

    # ---------------------------------------------------------------- queries
    def __contains__(self, h: bytes) -> bool:
        return h in self.index

    def known(self, h: bytes) -> bool:
        """Valid or being written."""
        return h in self.index or h in self.pending

    @property
    def used_bytes(self) -> int:
        return len(self.index) * self.block_bytes

    @property
    def capacity_bytes(self) -> int:
        return self.num_slots * self.block_bytes

    def slot_bytes(self, slot: int) -> memoryview:
        """The slot's bytes (I/O threads write a file from them or read one into them)."""
        # numpy's stubs give ndarray __buffer__ only on Python >= 3.12; it is a buffer on every version
        return memoryview(self.data[slot].view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]

    # ---------------------------------------------------------------- changes
    def touch(self, h: bytes) -> None:
        self.index.move_to_end(h)

    def take(self, h: bytes) -> Optional[int]:
        """A free slot to write block ``h`` into (pending until ``commit``), or None when none is
        free (``evict_lru`` makes room)."""
        if not self.free_slots:
            return None
        slot = self.free_slots.pop()
        self.pending[h] = slot
        return slot

    def evict_lru(self, eligible: Optional[Callable[[bytes], bool]] = None, window: int = 64) -> Optional[tuple[bytes, int]]:
        """Evict the least recently used block that nobody reads (and, with ``eligible``, that it
        accepts, among the ``window`` least recently used): its (hash, slot), now detached; the
        caller reads it (``add_reader``: a write to disk) or lets it go (``drop_detached``).  None
        when there is no such block."""
        victim = None
        for i, (k, s) in enumerate(self.index.items()):
            if eligible is not None and i >= window:
                break
            if self.readers[s] == 0 and (eligible is None or eligible(k)):
                victim = k
                break
        if victim is None:
            return None
        slot = self.index.pop(victim)
        self._event(victim, False)
        self.detached.add(slot)
        return victim, slot

    def commit(self, h: bytes, ok: bool) -> None:
        """The write into ``h``'s pending slot is over: valid (most recently used) or freed."""
        slot = self.pending.pop(h)
        if ok:
            self.index[h] = slot
            self._event(h, True)
        else:
            self._release_slot(slot)

    def add_reader(self, slot: int) -> None:
        self.readers[slot] += 1

    def done_reading(self, slot: int) -> None:
        self.readers[slot] -= 1
        if self.readers[slot] == 0 and slot in self.detached:
            self._release_slot(slot)

    def drop_detached(self, slot: int) -> None:
        """An evicted slot nobody reads: free it now."""
        if self.readers[slot] == 0 and slot in self.detached:
            self._release_slot(slot)

    def _release_slot(self, slot: int) -> None:
        if self.readers[slot] > 0:  # still read (a load pinned it before its write failed)
            self.detached.add(slot)
            return
        self.detached.discard(slot)
        self.free_slots.append(slot)

    def _event(self, h: bytes, added: bool) -> None:
        if self.on_event is not None:
            self.on_event(self.name, h, added)


class DiskTier:
    """Block files by hash under one namespace directory (see module docstring)."""

    name = "disk"

    def __init__(self, root: Path, namespace: str, capacity_bytes: int, block_bytes: int,
                 on_event: Optional[TierEvent] = None) -> None:
        self.dir = Path(root) / namespace
        self.capacity = capacity_bytes
        self.file_bytes = _HEADER.size + block_bytes
        if self.capacity < self.file_bytes:
            raise ValueError(f"a disk KV tier of {capacity_bytes} bytes holds no block file of {self.file_bytes} bytes")
        self.index: OrderedDict[bytes, None] = OrderedDict()
        """Files on disk, least recently used first."""
        self.busy: dict[bytes, int] = {}
        """Files being read or written (never deleted meanwhile)."""
        self.writing: set[bytes] = set()
        self.on_event = on_event
        self.dir.mkdir(parents=True, exist_ok=True)
        self._scan()

    def _scan(self) -> None:
        found = []
        for p in self.dir.glob("*/*"):
            if p.suffix == ".tmp":
                p.unlink(missing_ok=True)  # a write cut short by a crash
                continue
            try:
                h = bytes.fromhex(p.stem)
                st = p.stat()
            except (ValueError, OSError):
                continue
            if p.suffix == ".kv" and len(h) == 16:
                found.append((st.st_mtime, h))
        for _, h in sorted(found):
            self.index[h] = None
        over = self.used_bytes - self.capacity
        while over > 0 and self.index:
            h, _ = self.index.popitem(last=False)
            self.path(h).unlink(missing_ok=True)
            over -= self.file_bytes
        for h in self.index:
            self._event(h, True)
        if self.index:
            log.info("disk KV tier %s: %d blocks from earlier runs (%.2f GiB)", self.dir, len(self.index),
                     self.used_bytes / 2**30)

    @property
    def used_bytes(self) -> int:
        return len(self.index) * self.file_bytes

    @property
    def reserved_bytes(self) -> int:
        return (len(self.index) + len(self.writing)) * self.file_bytes

    def path(self, h: bytes) -> Path:
        x = h.hex()
        return self.dir / x[:2] / f"{x}.kv"

    def __contains__(self, h: bytes) -> bool:
        return h in self.index

    def touch(self, h: bytes) -> None:
        self.index.move_to_end(h)

    def begin_write(self, h: bytes) -> Optional[list[Path]]:
        """Room for block ``h`` (None: already here or being written, or every file is busy): the
        files to delete first (least recently used, evicted from the index now)."""
        if h in self.index or h in self.writing:
            return None
        doomed = []
        while self.reserved_bytes + self.file_bytes > self.capacity:
            victim = next((k for k in self.index if not self.busy.get(k)), None)
            if victim is None:
                return None
            del self.index[victim]
            self._event(victim, False)
            doomed.append(self.path(victim))
        self.writing.add(h)
        self.busy[h] = self.busy.get(h, 0) + 1
        return doomed

    def end_write(self, h: bytes, ok: bool) -> None:
        self.writing.discard(h)
        self._unbusy(h)
        if ok:
            self.index[h] = None
            self._event(h, True)

    def begin_read(self, h: bytes) -> Path:
        self.busy[h] = self.busy.get(h, 0) + 1
        self.touch(h)
        return self.path(h)

    def end_read(self, h: bytes, ok: bool) -> None:
        """A read is over; a failed one (corrupt, truncated, gone) drops the file from the index
        (the reader deleted it)."""
        self._unbusy(h)
        if not ok and h in self.index:
            del self.index[h]
            self._event(h, False)

    def _unbusy(self, h: bytes) -> None:
        n = self.busy.get(h, 0) - 1
        if n > 0:
            self.busy[h] = n
        else:
            self.busy.pop(h, None)

    def _event(self, h: bytes, added: bool) -> None:
        if self.on_event is not None:
            self.on_event(self.name, h, added)


# ---------------------------------------------------------------- I/O threads
def write_block_file(path: Path, key: bytes, payload: memoryview, doomed: Iterable[Path] = ()) -> int:
    """Delete ``doomed`` files, then write ``payload`` under ``path`` (temporary name, renamed when
    complete).  Returns the bytes written; raises OSError."""
    for p in doomed:
        p.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    header = _HEADER.pack(_MAGIC, _VERSION, 0, key, len(payload), zlib.crc32(payload))
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(payload)
    os.replace(tmp, path)
    return len(header) + len(payload)


def read_block_file(path: Path, key: bytes, out: memoryview) -> Optional[str]:
    """Read block ``key`` from ``path`` into ``out``; None when it is intact, else why not (the file
    is then deleted: a corrupt or truncated block is never served)."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEADER.size)
            if len(head) != _HEADER.size:
                why = "truncated header"
            else:
                magic, version, _, got_key, length, crc = _HEADER.unpack(head)
                if magic != _MAGIC or version != _VERSION or got_key != key or length != len(out):
                    why = "header does not match"
                elif f.readinto(out) != length:
                    why = "truncated payload"
                elif f.read(1):
                    why = "trailing bytes"
                elif zlib.crc32(out) != crc:
                    why = "checksum mismatch"
                else:
                    os.utime(path)  # most recently used, for the LRU order a restart rebuilds
                    return None
    except FileNotFoundError:
        return "file missing"
    except OSError as exc:
        why = f"read error: {exc}"
    path.unlink(missing_ok=True)
    return why
