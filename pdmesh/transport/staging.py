"""Staging arenas of staged NIXL pulls: one bounded byte buffer per worker, on the KV pool's device,
registered with NIXL once and carved into *extents*.

A KV pool laid out ``[L, P, 2, bs, Hkv, D]`` puts a request's scattered blocks in ``L x n`` regions
of one (layer, block) each; UCX posts one copy per region (~9 us on NVLink), so a 3,500-token
llama-3.1-8b pull is 3,520 copies.  Staged, the blocks are packed first (one gather kernel) into
one extent laid out ``[L, n, 2, bs, Hkv, D]``: the source packs the blocks a reader asked for, the
reader moves them with one READ (one per layer when it reads part of them), into its own extent,
and scatters them into its pool blocks with one kernel — or READs straight into its blocks when
they are consecutive.

Ownership of an extent (the invariants the tests check):

* Source (prefill): allocated by ``BeginRead`` (``stage``) under the read pin, owned by that call
  while the gather writes it, then by the *lease*; freed when the lease ends — release, ``EndRead``,
  expiry, hard limit, abort — which is never while a read pin is live (``LeaseTable``).  A reader
  whose pin ran out may still be reading; it does not trust what it read (its deadline is the pin).
* Destination (decode): allocated when the pull starts (engine thread), owned by the transfer;
  freed when the transfer has stopped writing it and the scatter has run (done, failed, or
  cancelled and certainly stopped — the connector polls a transfer until then).
* A full arena never fails a pull: the reader falls back to one region per (layer, block), and the
  fallback is counted (``kv_nixl_staging_fallbacks_total``).

Thread-safe (a lock): extents are taken on the event loop or the engine thread and freed on either.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass
from typing import Optional

import torch

ALIGN = 4096
"""Extent offsets and sizes are multiples of this (page-aligned regions for UCX and the kernels)."""


@dataclass(frozen=True)
class Extent:
    """``nbytes`` bytes at ``offset`` in an arena (``nbytes`` rounded up to ``ALIGN``)."""

    offset: int
    nbytes: int


class StagingArena:
    """``capacity`` bytes on ``device``, first-fit allocation, neighbours merged on free."""

    def __init__(self, capacity: int, device: torch.device) -> None:
        if capacity < ALIGN:
            raise ValueError(f"a staging arena needs at least {ALIGN} bytes, got {capacity}")
        self.capacity = capacity - capacity % ALIGN
        self.buf = torch.empty(self.capacity, dtype=torch.uint8, device=device)
        self._free: list[tuple[int, int]] = [(0, self.capacity)]
        """Free (offset, nbytes), sorted by offset, never adjacent (merged)."""
        self._lock = threading.Lock()
        self.used_bytes = 0

    @property
    def address(self) -> int:
        return self.buf.data_ptr()

    def alloc(self, nbytes: int) -> Optional[Extent]:
        """An extent of at least ``nbytes`` (> 0), or None when no free run is that large."""
        if nbytes <= 0:
            raise ValueError("an extent needs at least one byte")
        size = -(-nbytes // ALIGN) * ALIGN
        with self._lock:
            for i, (off, free) in enumerate(self._free):
                if free >= size:
                    if free == size:
                        del self._free[i]
                    else:
                        self._free[i] = (off + size, free - size)
                    self.used_bytes += size
                    return Extent(off, size)
        return None

    def free(self, ext: Extent) -> None:
        """Give ``ext`` back (exactly once: a double or overlapping free raises)."""
        with self._lock:
            i = bisect.bisect_left(self._free, (ext.offset, 0))
            prev_end = self._free[i - 1][0] + self._free[i - 1][1] if i > 0 else 0
            next_off = self._free[i][0] if i < len(self._free) else self.capacity
            if ext.offset < prev_end or ext.offset + ext.nbytes > next_off or ext.offset % ALIGN:
                raise ValueError(f"{ext} is not an allocated extent of this arena")
            off, size = ext.offset, ext.nbytes
            if i < len(self._free) and off + size == next_off:  # merge with the next free run
                size += self._free.pop(i)[1]
            if i > 0 and prev_end == off:  # and with the previous one
                off, size = self._free[i - 1][0], self._free[i - 1][1] + size
                self._free[i - 1] = (off, size)
            else:
                self._free.insert(i, (off, size))
            self.used_bytes -= ext.nbytes

    def free_extents(self) -> list[tuple[int, int]]:
        """The free runs as (offset, nbytes), by offset: ``[(0, capacity)]`` when nothing is taken."""
        with self._lock:
            return list(self._free)

    def view(self, ext: Extent, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The extent's first bytes as a contiguous tensor of ``shape`` and ``dtype``."""
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if n > ext.nbytes:
            raise ValueError(f"{tuple(shape)} {dtype} needs {n} bytes; the extent has {ext.nbytes}")
        return self.buf[ext.offset:ext.offset + n].view(dtype).view(shape)
