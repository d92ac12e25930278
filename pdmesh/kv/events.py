"""Which prefix hashes a worker holds, per tier (device, host, disk), as it publishes them for
routing by cached prefix: net changes since the last heartbeat (events), and the whole current
set only when the scheduler has none (after a (re)registration, or when it saw a gap).

The engine thread records every change (``record``); the event loop's heartbeat drains them
(``drain``) or takes a snapshot (``snapshot``).  Thread-safe (one lock, held for a dict operation).
A hint may be late or lost: the scheduler routes on it, the worker checks every block by hash
itself, so a stale hint costs a miss, never a wrong answer.
"""

from __future__ import annotations

import threading
from typing import Iterator

from pdmesh.v1 import scheduler_pb2 as spb

TIER_NAMES = ("device", "host", "disk")
MAX_HASHES_PER_MESSAGE = 50_000
"""Hashes per heartbeat message at most (a snapshot of large tiers goes over several)."""


class KVEventLog:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: dict[str, set[bytes]] = {t: set() for t in TIER_NAMES}
        self._changes: dict[str, dict[bytes, bool]] = {t: {} for t in TIER_NAMES}

    def record(self, tier: str, h: bytes, added: bool) -> None:
        """``h`` is now held (``added``) or no longer held in ``tier`` (engine thread)."""
        with self._lock:
            if added:
                self._current[tier].add(h)
            else:
                self._current[tier].discard(h)
            self._changes[tier][h] = added

    def held(self, tier: str) -> set[bytes]:
        with self._lock:
            return set(self._current[tier])

    def drain(self) -> list[spb.KVEvents]:
        """Net changes since the last drain or snapshot, one ``KVEvents`` per tier that changed."""
        with self._lock:
            changes = {t: c for t, c in self._changes.items() if c}
            self._changes = {t: {} for t in TIER_NAMES}
        return [spb.KVEvents(tier=t, added=[h for h, a in c.items() if a], removed=[h for h, a in c.items() if not a])
                for t, c in changes.items()]

    def snapshot(self) -> Iterator[list[spb.KVEvents]]:
        """Everything held now, in messages of at most ``MAX_HASHES_PER_MESSAGE`` hashes (pending
        changes are part of it and dropped)."""
        with self._lock:
            held = {t: list(s) for t, s in self._current.items()}
            self._changes = {t: {} for t in TIER_NAMES}
        batch: list[spb.KVEvents] = []
        room = MAX_HASHES_PER_MESSAGE
        for t, hs in held.items():
            while hs:
                take, hs = hs[:room], hs[room:]
                batch.append(spb.KVEvents(tier=t, added=take))
                room -= len(take)
                if room == 0:
                    yield batch
                    batch, room = [], MAX_HASHES_PER_MESSAGE
        yield batch
