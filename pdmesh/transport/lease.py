"""Prefill side: KV held for transfer, under leases.

Every held request has exactly one entry here from the moment its first token is sampled until
its KV is freed, and the entry ends in exactly one call of ``free_fn`` — on ``release`` (decode
pulled it or gave up), ``abort``, or expiry, whichever comes first.

Reads pin the entry, so that blocks are never reused under a reader: a release or expiry that
arrives meanwhile is carried out when the last pin goes.

* A *stream pin* (``pin``/``unpin``) is taken by this process's own ``KVTransfer.Pull`` while it
  serves chunks; the whole pull runs under the hard limit (a reader that stops reading cannot
  hold it open past it: the server ends the call).
* A *read pin* (``begin_read``/``end_read``) is taken for a one-sided reader (cuda_ipc, nixl) that
  this process cannot stop; it runs out at its own deadline, which never passes the lease's hard
  limit, and the reader trusts its copy only if it completed before then.

Resources a read needs besides the blocks (a staged NIXL read's extent of the staging arena) are
*attached* to the lease (``attach``) and released right after ``free_fn`` when the lease ends, by
the same single path — never while a pin is live.

Deadlines: a lease expires ``ttl`` seconds after it was made or last pinned (soft), and in any case
``max_ttl`` seconds after it was made (hard: ``--kv-lease-max-seconds``); no pin is granted or
extended past the hard limit, so no read of the KV can outlive it.

Each lease carries its capability (``pdmesh.transport.capability``): the token that Pull, BeginRead,
EndRead and Release must present, the prompt hash, and the decode identity holding it once it read.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from pdmesh.transport.capability import new_token

log = logging.getLogger(__name__)


@dataclass
class Lease:
    request_id: str
    block_ids: list[int]
    num_tokens: int
    deadline: float
    """time.monotonic() soft deadline (extended by pins, never past ``hard_deadline``)."""
    hard_deadline: float
    """time.monotonic() after which the lease grants nothing and ends as soon as it is unpinned."""
    pins: int = 0
    """Stream pins (this process's own Pull calls in progress)."""
    reads: dict[int, float] = field(default_factory=dict)
    """Read pins: read id -> time.monotonic() when the pin runs out."""
    release_pending: bool = False
    checksums: list[int] = field(default_factory=list)
    """Per-block checksums of the held KV (``--kv-audit``), sent in the descriptor."""
    token: str = ""
    """The capability Pull, BeginRead, EndRead and Release must present."""
    prompt_hash: bytes = b""
    """SHA-256 of the prompt tokens whose KV the blocks hold."""
    holder: Optional[str] = None
    """The decode identity that read first (only it may read again)."""
    attached: list[Callable[[], None]] = field(default_factory=list)
    """Releases of what the lease owns besides its blocks (staging extents), called when it ends."""

    def pinned(self, now: float) -> bool:
        return self.pins > 0 or any(d > now for d in self.reads.values())


class LeaseTable:
    def __init__(self, free_fn: Callable[[str], None], ttl: float, max_ttl: Optional[float] = None) -> None:
        self.free_fn = free_fn
        self.ttl = ttl
        self.max_ttl = max(ttl, max_ttl if max_ttl is not None else 4 * ttl)
        self.leases: dict[str, Lease] = {}
        self.expired_total = 0
        """Leases that ended by expiry (a decode worker never pulled, or the hard limit)."""
        self.deferred_releases_total = 0
        """Releases that arrived during a read and took effect when it ended (counter)."""
        self._read_ids = itertools.count(1)

    def add(self, request_id: str, block_ids: list[int], num_tokens: int, checksums: Optional[list[int]] = None,
            prompt_hash: bytes = b"") -> Lease:
        """Hold ``block_ids`` for ``request_id`` under a fresh lease token."""
        now = time.monotonic()
        lease = Lease(request_id, block_ids, num_tokens, now + self.ttl, now + self.max_ttl, checksums=list(checksums or ()),
                      token=new_token(), prompt_hash=prompt_hash)
        self.leases[request_id] = lease
        return lease

    def get(self, request_id: str) -> Optional[Lease]:
        return self.leases.get(request_id)

    def held_blocks(self) -> int:
        return sum(len(lease.block_ids) for lease in self.leases.values())

    def _pinnable(self, request_id: str, now: float) -> Optional[Lease]:
        lease = self.leases.get(request_id)
        if lease is None or lease.release_pending or now >= lease.hard_deadline:
            return None
        return lease

    def pin(self, request_id: str) -> Optional[Lease]:
        """A stream pin (this process's Pull); None when the KV is gone, released or past its limit."""
        now = time.monotonic()
        lease = self._pinnable(request_id, now)
        if lease is None:
            return None
        lease.pins += 1
        lease.deadline = min(lease.hard_deadline, max(lease.deadline, now + self.ttl))
        return lease

    def unpin(self, request_id: str) -> None:
        lease = self.leases.get(request_id)
        if lease is None:
            return
        lease.pins -= 1
        self._maybe_end(lease, time.monotonic())

    def begin_read(self, request_id: str, seconds: float) -> Optional[tuple[int, float]]:
        """A read pin for at most ``seconds`` (capped at the hard limit): (read id, granted seconds),
        or None when the KV is gone, released or past its limit."""
        now = time.monotonic()
        lease = self._pinnable(request_id, now)
        if lease is None:
            return None
        granted = max(0.0, min(seconds, lease.hard_deadline - now))
        read_id = next(self._read_ids)
        lease.reads[read_id] = now + granted
        lease.deadline = min(lease.hard_deadline, max(lease.deadline, now + granted + self.ttl))
        return read_id, granted

    def end_read(self, request_id: str, read_id: int) -> bool:
        """The reader is done: drop its pin and release the KV (now, or when other reads end)."""
        lease = self.leases.get(request_id)
        if lease is None:
            return False
        lease.reads.pop(read_id, None)
        return self.release(request_id)

    def attach(self, request_id: str, release: Callable[[], None]) -> bool:
        """Hand the lease something to ``release`` when it ends (a staging extent).  False when the
        lease has ended already: the caller still owns it and releases it itself."""
        lease = self.leases.get(request_id)
        if lease is None:
            return False
        lease.attached.append(release)
        return True

    def release(self, request_id: str) -> bool:
        """Free the request's held KV (now, or when the reads in progress end)."""
        lease = self.leases.get(request_id)
        if lease is None:
            return False
        now = time.monotonic()
        if lease.pinned(now):
            if not lease.release_pending:
                self.deferred_releases_total += 1
            lease.release_pending = True
        else:
            self._end(lease)
        return True

    def _maybe_end(self, lease: Lease, now: float) -> None:
        if lease.release_pending and not lease.pinned(now):
            self._end(lease)

    def _end(self, lease: Lease) -> None:
        if self.leases.pop(lease.request_id, None) is not None:
            self.free_fn(lease.request_id)
            for release in lease.attached:
                release()
            lease.attached.clear()

    def reap(self, now: Optional[float] = None) -> int:
        """End leases that are released or expired and no longer pinned (read pins run out by
        themselves).  Returns how many ended by expiry."""
        now = time.monotonic() if now is None else now
        expired = 0
        for lease in list(self.leases.values()):
            lease.reads = {r: d for r, d in lease.reads.items() if d > now}
            if lease.pinned(now):
                continue
            if lease.release_pending:
                self._end(lease)
            elif lease.deadline <= now or lease.hard_deadline <= now:
                log.warning("KV lease of %s expired: freeing %d blocks", lease.request_id, len(lease.block_ids))
                self.expired_total += 1
                expired += 1
                self._end(lease)
        return expired

    async def reap_forever(self, interval: float = 0.25) -> None:
        while True:
            await asyncio.sleep(interval)
            self.reap()
