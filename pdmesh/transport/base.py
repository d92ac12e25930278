"""The KV-transport contract: the decode worker *pulls* a request's blocks from a prefill worker.

A pull has three phases, each on the thread that owns what it touches:

1. ``prepare(desc, src_ids, timeout, metadata)`` — event loop.  Everything that needs I/O before
   bytes move: the peer's pool handle or agent metadata (fetched once per peer *incarnation*,
   never per request), a read pin on the source lease for one-sided transports (``BeginRead``), or
   the network stream of a two-sided one.  Returns a ``PreparedPull``; raises ``TransferError``.
2. ``start(prepared, dst_ids, pool)`` — engine thread, between steps.  Launches the copy into
   local blocks ``dst_ids`` (same length and order as ``src_ids``) and returns a ``BaseTransfer``,
   which the engine's connector polls between steps.
3. When the transfer has stopped (done, failed, or cancelled and certainly stopped), the caller
   tells the source: ``EndRead`` (one-sided, with ``read_id``) or ``Release``.

Invariants:

* A transfer reports ``DONE`` only when every destination block is completely written;
  ``FAILED`` means it stopped and writes nothing more.  A partly filled destination is never done.
* ``cancel()`` returns True only when no write into the destination can happen any more; otherwise
  the caller keeps polling until ``poll()`` is no longer ``RUNNING`` before the blocks change hands.
* Transports never free or release anything: the engine owns the destination blocks, the caller
  owns the source lease.
* A one-sided read is trusted only if it completed before ``PreparedPull.deadline``, which is never
  later than the source's pin on the lease (so the source cannot have freed the blocks under it).

Tensor parallelism (either side): the descriptor's layout says how the source's KV heads are split
over its ranks; a pull reads the whole pools of the source ranks ``source_ranks`` names (each head
once) and writes ``Piece``s into the destination ranks' pools (``pdmesh.kv.shards``), all from the
destination's rank 0, which maps every local rank's pool.
"""

from __future__ import annotations

import enum
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from pdmesh.kv.pool import KVCachePool, KVLayout
from pdmesh.kv.shards import Piece, plan_pieces, source_ranks
from pdmesh.v1 import common_pb2 as pb


class TransferError(RuntimeError):
    """A transfer failed: peer gone, bad handle, truncated or mismatched data, or timeout."""


class TransferState(enum.Enum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


def remote_layout(m: pb.KVLayout) -> KVLayout:
    return KVLayout(m.num_layers, m.num_kv_heads, m.head_dim, m.block_size, m.dtype, m.layout, tp_size=max(1, m.tensor_parallel_size))


def pull_pieces(local: KVLayout, remote: pb.KVLayout) -> list[Piece]:
    """How KV of the ``remote`` layout lands in pools of the ``local`` one (TransferError when it
    cannot: another model shape, block size or dtype)."""
    src = remote_layout(remote)
    if not local.convertible(src):
        key = lambda x: (x.num_layers, x.num_kv_heads, x.head_dim, x.block_size, x.dtype, x.layout)  # noqa: E731
        raise TransferError(f"KV layout mismatch: local {key(local)} vs remote {key(src)}")
    return plan_pieces(local.num_kv_heads, src.tp_size, local.tp_size)


def read_ranks(remote: pb.KVLayout) -> list[int]:
    """The source ranks a pull reads (whole pools): the first holder of each head."""
    return source_ranks(remote.num_kv_heads, max(1, remote.tensor_parallel_size))


@dataclass
class PreparedPull:
    """What ``prepare`` found out; handed to ``start`` on the engine thread."""

    desc: pb.KVDescriptor
    src_block_ids: list[int]
    deadline: float
    """time.monotonic() by which the transfer must be done (the pull's timeout, and for one-sided
    transports never later than the source's read pin)."""
    read_id: int = 0
    """The source's read pin (one-sided transports; 0: none): ended with ``EndRead``."""
    delay: float = 0.0
    """Fault injection (decode ``--inject-kv-faults delay:S``): seconds between pieces landing."""
    state: Any = None
    """Transport-specific: the peer's pool view, a stream's inbox, a NIXL peer."""
    close: Optional[Callable[[], None]] = None
    """Stops whatever ``prepare`` started (a stream); safe to call more than once, from any thread."""


class BaseTransfer(ABC):
    """One pull in flight.  ``poll`` and ``cancel`` are called on the engine thread only."""

    nbytes: int = 0
    error: str = ""

    @abstractmethod
    def poll(self) -> TransferState:
        """Advance the transfer (a two-sided one writes what has arrived) and report its state."""

    @abstractmethod
    def cancel(self) -> bool:
        """Stop the transfer; True when it is certainly stopped (see module docstring).  Idempotent:
        called again on later polls until it returns True."""

    def device_seconds(self) -> Optional[float]:
        """Once DONE: how long the copy ran on the device (None when the transport cannot tell)."""
        return None


class DoneTransfer(BaseTransfer):
    """A pull that finished inside ``start`` (nothing to move, or a synchronous copy)."""

    def __init__(self, nbytes: int = 0) -> None:
        self.nbytes = nbytes

    def poll(self) -> TransferState:
        return TransferState.DONE

    def cancel(self) -> bool:
        return True


class PacedTransfer(BaseTransfer):
    """Fault injection: a pull cut into pieces of ``per_piece`` blocks, piece i started
    ``(i + 1) * delay`` seconds after the start (and after piece i-1 finished): a slow copy that
    stays in flight long enough for a test to cancel or kill something mid-transfer."""

    def __init__(self, start_piece: Callable[[int, int], BaseTransfer], n: int, per_piece: int, delay: float) -> None:
        self._start_piece = start_piece
        self._bounds = [(i, min(n, i + per_piece)) for i in range(0, n, per_piece)]
        self._delay = delay
        self._t0 = time.monotonic()
        self._current: Optional[BaseTransfer] = None
        self._next = 0

    def poll(self) -> TransferState:
        while True:
            if self._current is not None:
                st = self._current.poll()
                if st is not TransferState.DONE:
                    self.error = self._current.error
                    return st
                self.nbytes += self._current.nbytes
                self._current = None
            if self._next == len(self._bounds):
                return TransferState.DONE
            if time.monotonic() < self._t0 + (self._next + 1) * self._delay:
                return TransferState.RUNNING
            a, b = self._bounds[self._next]
            self._next += 1
            self._current = self._start_piece(a, b)

    def cancel(self) -> bool:
        self._next = len(self._bounds)
        return self._current is None or self._current.cancel()


class BaseKVTransport(ABC):
    name: str = "base"

    @staticmethod
    def check_start(prepared: PreparedPull, dst_block_ids: Sequence[int], pool: KVCachePool) -> list[Piece]:
        """What ``start`` checks first: the layouts convert, and one destination per source block;
        returns where each source rank's heads land."""
        pieces = pull_pieces(pool.layout, prepared.desc.layout)
        if len(dst_block_ids) != len(prepared.src_block_ids):
            raise TransferError("source and destination block counts differ")
        if len(pool.ranks) != pool.layout.tp_size:
            raise TransferError("this worker's rank pools are not all mapped")
        return pieces

    @abstractmethod
    async def prepare(self, desc: pb.KVDescriptor, src_block_ids: Sequence[int], timeout: float,
                      metadata: tuple = ()) -> PreparedPull:
        """Phase 1, event loop (see module docstring).  ``metadata``: gRPC metadata for any call
        it makes (the W3C trace context)."""

    @abstractmethod
    def start(self, prepared: PreparedPull, dst_block_ids: Sequence[int], pool: KVCachePool) -> BaseTransfer:
        """Phase 2, engine thread: launch the copy (raises ``TransferError`` if it cannot)."""

    async def close(self) -> None:  # noqa: B027 - optional hook: a transport without cached state has nothing to close
        """Release cached connections/handles."""
