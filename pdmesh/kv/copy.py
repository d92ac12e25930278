"""Moving KV blocks between pools: one Triton kernel that copies whole blocks (all layers) from
source rows to destination rows in a single pass (read once, write once), with a torch fallback
(``index_select`` + ``index_copy_``, two extra passes through a temporary) where Triton is absent.

Pools are viewed as ``[L, N, X]``: layer, block, the block's X = 2 * block_size * Hkv * D elements.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


if triton is not None:

    @triton.jit
    def _copy_rows_kernel(src_ptr, dst_ptr, src_idx_ptr, dst_idx_ptr, n, src_blocks, dst_blocks, x,
                          BLOCK: tl.constexpr):
        row = tl.program_id(0)  # layer * n + pair
        chunk = tl.program_id(1)
        layer = row // n
        pair = row % n
        s = tl.load(src_idx_ptr + pair).to(tl.int64)
        d = tl.load(dst_idx_ptr + pair).to(tl.int64)
        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < x
        src_base = (layer.to(tl.int64) * src_blocks + s) * x
        dst_base = (layer.to(tl.int64) * dst_blocks + d) * x
        vals = tl.load(src_ptr + src_base + offs, mask=mask)
        tl.store(dst_ptr + dst_base + offs, vals, mask=mask)


def copy_blocks(src: torch.Tensor, src_ids: torch.Tensor, dst: torch.Tensor, dst_ids: torch.Tensor) -> None:
    """dst[:, dst_ids] = src[:, src_ids] for pools [L, N, ...] on the same device (any stream
    ordering is the caller's: it runs on the current stream of that device).

    src_ids/dst_ids: [n] int64 on that device.
    """
    L = src.shape[0]
    n = src_ids.numel()
    if n == 0:
        return
    s3 = src.view(L, src.shape[1], -1)
    d3 = dst.view(L, dst.shape[1], -1)
    x = s3.shape[2]
    if triton is None or src.device.type != "cuda":
        d3.index_copy_(1, dst_ids, s3.index_select(1, src_ids))
        return
    block = 4096
    grid = (L * n, triton.cdiv(x, block))
    _copy_rows_kernel[grid](s3, d3, src_ids, dst_ids, n, s3.shape[1], d3.shape[1], x, BLOCK=block, num_warps=8)


def _full(t: torch.Tensor, heads: tuple[int, int]) -> bool:
    return heads == (0, t.shape[4])


def gather_heads(src: torch.Tensor, src_ids: torch.Tensor, heads: tuple[int, int]) -> torch.Tensor:
    """Contiguous ``[L, n, 2, bs, h, D]`` copy of blocks ``src_ids`` of pool ``src`` (its local heads
    ``heads``), on ``src``'s device and current stream."""
    n = src_ids.numel()
    if _full(src, heads):
        out = torch.empty((src.shape[0], n) + tuple(src.shape[2:]), dtype=src.dtype, device=src.device)
        copy_blocks(src, src_ids, out, torch.arange(n, device=src.device))
        return out
    return src.index_select(1, src_ids)[:, :, :, :, heads[0]:heads[1]].contiguous()


def scatter_heads(data: torch.Tensor, dst: torch.Tensor, dst_ids: torch.Tensor, heads: tuple[int, int]) -> None:
    """Write ``data`` [L, n, 2, bs, h, D] (on ``dst``'s device) into blocks ``dst_ids`` of pool ``dst``
    (its local heads ``heads``), on the current stream."""
    if _full(dst, heads):
        copy_blocks(data, torch.arange(data.shape[1], device=data.device), dst, dst_ids)
    else:
        dst[:, :, :, :, heads[0]:heads[1]].index_copy_(1, dst_ids, data)


def copy_heads(src: torch.Tensor, src_ids: torch.Tensor, src_heads: tuple[int, int], dst: torch.Tensor,
               dst_ids: torch.Tensor, dst_heads: tuple[int, int]) -> None:
    """``dst[:, dst_ids, ..., dst_heads] = src[:, src_ids, ..., src_heads]`` for pools on one device:
    one block-copy kernel when both sides are whole blocks, else a gather of the heads and a
    scatter (tensor parallelism of different sizes)."""
    if _full(src, src_heads) and _full(dst, dst_heads):
        copy_blocks(src, src_ids, dst, dst_ids)
    else:
        scatter_heads(gather_heads(src, src_ids, src_heads), dst, dst_ids, dst_heads)
