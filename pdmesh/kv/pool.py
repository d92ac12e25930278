"""The KV tensor pool: one tensor for all layers.

Layout ``[num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim]`` (K at index 0, V at 1).
Each layer's slice ``kv[l]`` is contiguous and is FlashInfer's NHD paged layout
``[num_pages, 2, page_size, num_kv_heads, head_dim]``; a request's blocks for *all* layers move in
one gather (``kv[:, ids]``) and one scatter, which is what KV transfer wants.

With tensor parallelism every rank holds such a pool for its KV heads (``pdmesh.kv.shards``), all
with the same block ids.  Rank 0 — the process that schedules, serves and moves KV — also sees the
other ranks' pools (``KVCachePool.ranks``: shared memory on CPU, CUDA IPC views on GPUs), so KV
transfers and the audit read and write every rank's share from there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdmesh.kv.copy import as_bytes, scatter_heads
from pdmesh.kv.shards import local_kv_heads, rank_heads, source_ranks
from pdmesh.models.arch import ModelArch


@dataclass(frozen=True)
class KVLayout:
    """What a peer must agree on to exchange KV blocks."""

    num_layers: int
    num_kv_heads: int
    """The model's KV heads (all ranks together)."""
    head_dim: int
    block_size: int
    dtype: str
    """torch dtype name, e.g. 'float32', 'bfloat16', 'float8_e4m3fn' (--kv-cache-dtype fp8)."""
    layout: str = "LNKBHD"
    """Axis order: layers, blocks, K/V, block slots, kv heads, head dim."""
    tp_size: int = 1
    """Tensor-parallel ranks the heads are split over (each rank's pool holds ``local_kv_heads``)."""

    @property
    def local_kv_heads(self) -> int:
        """KV heads in one rank's pool."""
        return local_kv_heads(self.num_kv_heads, self.tp_size)

    def rank_heads(self, rank: int) -> tuple[int, int]:
        """Global heads [start, end) of ``rank``'s pool."""
        return rank_heads(self.num_kv_heads, self.tp_size, rank)

    @property
    def elem_bytes(self) -> int:
        return torch.empty((), dtype=getattr(torch, self.dtype)).element_size()

    def head_block_bytes(self, num_heads: int) -> int:
        """Bytes of ``num_heads`` heads of one block over all layers (K and V)."""
        return self.num_layers * 2 * self.block_size * num_heads * self.head_dim * self.elem_bytes

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one rank's pool over all layers."""
        return self.head_block_bytes(self.local_kv_heads)

    def convertible(self, other: "KVLayout") -> bool:
        """Whether KV moves between pools of these layouts (any TP sizes: heads are regrouped)."""
        key = lambda x: (x.num_layers, x.num_kv_heads, x.head_dim, x.block_size, x.dtype, x.layout)  # noqa: E731
        return key(self) == key(other)


class KVCachePool:
    def __init__(self, arch: ModelArch, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                 tp_size: int = 1, shared: bool = False) -> None:
        """``tp_size``: this pool is one rank's share (its ``local_kv_heads``); ``shared``: allocate
        in shared memory (CPU ranks other than 0, whose pools rank 0 maps)."""
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.layout = KVLayout(arch.num_layers, arch.num_kv_heads, arch.head_dim, block_size, str(dtype).removeprefix("torch."),
                               tp_size=tp_size)
        self.null_block = num_blocks
        """One extra block no request ever owns: padding rows of CUDA-graph batches write there."""
        # zeros, not empty: padded attention reads must see finite values.
        self.kv = torch.zeros(
            (arch.num_layers, num_blocks + 1, 2, block_size, self.layout.local_kv_heads, arch.head_dim), dtype=dtype,
            device=device)
        if shared and self.kv.device.type == "cpu":
            self.kv.share_memory_()
        self.ranks: list[torch.Tensor] = [self.kv]
        """Every rank's pool, indexed by rank (rank 0's is ``kv``); see ``attach_ranks``."""
        self.shares: list = [None]
        """Per rank, how its pool was shared with rank 0 (``pdmesh.transport.cuda_ipc.pool_share``;
        None for rank 0): what ``KVTransfer.GetIpcHandle`` hands to peers for that rank."""

    def attach_ranks(self, others: list[torch.Tensor], shares: list) -> None:
        """Rank 0: the pools of ranks 1.. (mapped into this process), same shape but for the device."""
        for t in others:
            if t.shape != self.kv.shape or t.dtype != self.kv.dtype:
                raise ValueError(f"a rank's KV pool {tuple(t.shape)} {t.dtype} differs from rank 0's {tuple(self.kv.shape)}")
        self.ranks = [self.kv, *others]
        self.shares = [None, *shares]

    @torch.no_grad()
    def read_heads(self, rank: int, block_ids: list[int], heads: tuple[int, int] | None = None) -> torch.Tensor:
        """Contiguous ``[L, n, 2, bs, h, D]`` copy of blocks ``block_ids`` of rank ``rank`` (its local
        heads ``heads``, default all), on that rank's device."""
        kv = self.ranks[rank]
        data = as_bytes(kv).index_select(1, torch.tensor(block_ids, dtype=torch.int64, device=kv.device))
        if heads is not None and heads != (0, kv.shape[4]):
            data = data[:, :, :, :, heads[0]:heads[1]].contiguous()
        return data.view(kv.dtype)

    @torch.no_grad()
    def write_heads(self, rank: int, block_ids: list[int], heads: tuple[int, int] | None, data: torch.Tensor) -> None:
        """Write ``data`` [L, n, 2, bs, h, D] into blocks ``block_ids`` of rank ``rank`` (local heads
        ``heads``), on the current stream of that rank's device (moved there first if it is elsewhere):
        one block-copy kernel for whole blocks, a head slice otherwise (``scatter_heads``)."""
        kv = self.ranks[rank]
        ids = torch.tensor(block_ids, dtype=torch.int64, device=kv.device)
        scatter_heads(data.to(kv.device, kv.dtype), kv, ids, heads or (0, kv.shape[4]))

    def land(self, pieces: list, src_rank: int, block_ids: list[int], data: torch.Tensor) -> None:
        """Write a source rank's blocks ``data`` [L, n, 2, bs, its heads, D] into local blocks
        ``block_ids`` of every rank that holds some of those heads (``pdmesh.kv.shards.Piece``s)."""
        for p in pieces:
            if p.src_rank == src_rank:
                part = data if p.src_heads == (0, data.shape[4]) else data[:, :, :, :, p.src_heads[0]:p.src_heads[1]]
                self.write_heads(p.dst_rank, block_ids, p.dst_heads, part)

    def logical_block(self, block_id: int, slots: int) -> torch.Tensor:
        """``[L, 2, slots, num_kv_heads, D]`` on the CPU: the block's first ``slots`` token slots with every
        KV head once, in global order, whatever the TP size (the same bytes on every layout)."""
        lay = self.layout
        parts = [self.ranks[r][:, block_id, :, :slots].cpu() for r in source_ranks(lay.num_kv_heads, lay.tp_size)]
        return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=3)


def num_blocks_for_memory(arch: ModelArch, block_size: int, dtype: torch.dtype, memory_bytes: int, tp_size: int = 1) -> int:
    """Blocks of one rank's pool (its ``local_kv_heads``) that fit ``memory_bytes``."""
    elem = torch.empty((), dtype=dtype).element_size()
    per_block = 2 * arch.num_layers * local_kv_heads(arch.num_kv_heads, tp_size) * arch.head_dim * elem * block_size
    return max(2, memory_bytes // per_block)
