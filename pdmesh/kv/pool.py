"""The KV tensor pool: one tensor for all layers.

Layout ``[num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim]`` (K at index 0, V at 1).
Each layer's slice ``kv[l]`` is contiguous and is FlashInfer's NHD paged layout
``[num_pages, 2, page_size, num_kv_heads, head_dim]``; a request's blocks for *all* layers move in
one gather (``kv[:, ids]``) and one scatter, which is what KV transfer wants.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdmesh.models.arch import ModelArch


@dataclass(frozen=True)
class KVLayout:
    """What a peer must agree on to exchange KV blocks."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str
    """torch dtype name, e.g. 'float32', 'bfloat16'."""
    layout: str = "LNKBHD"
    """Axis order: layers, blocks, K/V, block slots, kv heads, head dim."""

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over all layers."""
        elem = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * elem


class KVCachePool:
    def __init__(self, arch: ModelArch, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.layout = KVLayout(arch.num_layers, arch.num_kv_heads, arch.head_dim, block_size, str(dtype).removeprefix("torch."))
        self.null_block = num_blocks
        """One extra block no request ever owns: padding rows of CUDA-graph batches write there."""
        # zeros, not empty: padded attention reads must see finite values.
        self.kv = torch.zeros(
            (arch.num_layers, num_blocks + 1, 2, block_size, arch.num_kv_heads, arch.head_dim), dtype=dtype, device=device
        )

    @torch.no_grad()
    def gather_blocks(self, block_ids: torch.Tensor) -> torch.Tensor:
        """block_ids: [n] int64 -> contiguous [L, n, 2, bs, Hkv, D] copy."""
        return self.kv.index_select(1, block_ids.to(self.kv.device))

    @torch.no_grad()
    def scatter_blocks(self, block_ids: torch.Tensor, data: torch.Tensor) -> None:
        """Write ``data`` [L, n, 2, bs, Hkv, D] into blocks ``block_ids`` [n]."""
        self.kv.index_copy_(1, block_ids.to(self.kv.device), data.to(self.kv.device, self.kv.dtype))


def num_blocks_for_memory(arch: ModelArch, block_size: int, dtype: torch.dtype, memory_bytes: int) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    per_block = arch.kv_bytes_per_token(elem) * block_size
    return max(2, memory_bytes // per_block)
