"""The KV-transport contract: the decode worker *pulls* a request's blocks from a prefill worker.

Decode side: ``BaseKVTransport.pull(desc, src_ids, dst_ids, pool)`` copies blocks ``src_ids`` of
the prefill worker named by ``desc`` into local blocks ``dst_ids`` (same length, same order) and
returns what it cost.  Invariants:

* It either fills every destination block completely or raises ``TransferError``; a partly filled
  destination is never reported as success (the caller frees those blocks on error).
* It never frees or releases anything: the caller owns the destination blocks, and tells the
  prefill worker to release the source blocks after a successful pull.
* It takes at most ``timeout`` seconds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

from pdmesh.kv.pool import KVCachePool, KVLayout
from pdmesh.v1 import common_pb2 as pb


class TransferError(RuntimeError):
    """A transfer failed: peer gone, bad handle, truncated or mismatched data, or timeout."""


@dataclass(frozen=True)
class TransferResult:
    transport: str
    bytes: int
    blocks: int
    seconds: float

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def check_layout(local: KVLayout, remote: pb.KVLayout) -> None:
    want = (local.num_layers, local.num_kv_heads, local.head_dim, local.block_size, local.dtype, local.layout)
    got = (remote.num_layers, remote.num_kv_heads, remote.head_dim, remote.block_size, remote.dtype, remote.layout)
    if want != got:
        raise TransferError(f"KV layout mismatch: local {want} vs remote {got}")


class BaseKVTransport(ABC):
    name: str = "base"

    def _precheck(self, desc: pb.KVDescriptor, src_block_ids: Sequence[int], dst_block_ids: Sequence[int],
                  pool: KVCachePool) -> bool:
        """Validate a pull's arguments; False when there is nothing to move."""
        check_layout(pool.layout, desc.layout)
        if len(src_block_ids) != len(dst_block_ids):
            raise TransferError("source and destination block counts differ")
        return bool(src_block_ids)

    @abstractmethod
    async def pull(self, desc: pb.KVDescriptor, src_block_ids: Sequence[int], dst_block_ids: Sequence[int],
                   pool: KVCachePool, timeout: float, metadata: tuple = ()) -> TransferResult:
        """Copy remote blocks into the local pool (see module docstring). ``metadata``: gRPC
        metadata for any call the transport makes (the W3C trace context)."""

    async def close(self) -> None:
        """Release cached connections/handles."""
