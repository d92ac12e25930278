"""Moving KV blocks between pools: one Triton kernel that copies whole blocks (all layers) from
source rows to destination rows in a single pass (read once, write once), with a torch fallback
(``index_select`` + ``index_copy_``, two extra passes through a temporary) where Triton is absent.

Pools are viewed as ``[L, N, X]``: layer, block, the block's X = 2 * block_size * Hkv * D elements,
contiguous within a (layer, block) row; the layer and block strides are free, so a host tier laid
out block-major (``[N, L, X]``, transposed to ``[L, N, X]``) is copied by the same kernel.

One side may be pinned host memory while the other is on a GPU: the kernel then reads or writes
host memory directly through unified virtual addressing (pinned memory is mapped into every
device's address space), so a batch of blocks moves between the GPU and host in one launch, with
no staging buffer and no per-block copy calls.
"""

from __future__ import annotations

import logging

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

log = logging.getLogger(__name__)

if triton is not None:

    @triton.jit
    def _copy_rows_kernel(src_ptr, dst_ptr, src_idx_ptr, dst_idx_ptr, n, src_ls, src_bs, dst_ls, dst_bs, x,
                          BLOCK: tl.constexpr):
        row = tl.program_id(0)  # layer * n + pair
        chunk = tl.program_id(1)
        layer = (row // n).to(tl.int64)
        pair = row % n
        s = tl.load(src_idx_ptr + pair).to(tl.int64)
        d = tl.load(dst_idx_ptr + pair).to(tl.int64)
        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < x
        vals = tl.load(src_ptr + layer * src_ls + s * src_bs + offs, mask=mask)
        tl.store(dst_ptr + layer * dst_ls + d * dst_bs + offs, vals, mask=mask)


def rows(pool: torch.Tensor) -> torch.Tensor:
    """``pool`` [L, N, ...] as [L, N, X] (a view: the dims after N must be contiguous)."""
    return pool.view(pool.shape[0], pool.shape[1], -1)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """An fp8 pool (``--kv-cache-dtype fp8``) viewed as its bytes (uint8, same shape and strides):
    block moves copy bytes, and ``index_copy_`` has no fp8 kernel on the CPU; other dtypes as they are."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _on_gpu(src: torch.Tensor, dst: torch.Tensor) -> bool:
    """Whether the kernel can run: Triton present, one side on a GPU, the other on it or pinned."""
    if triton is None:
        return False
    cuda = [t for t in (src, dst) if t.device.type == "cuda"]
    if not cuda:
        return False
    return all(t.device == cuda[0].device or (t.device.type == "cpu" and t.is_pinned()) for t in (src, dst))


def copy_blocks(src: torch.Tensor, src_ids: torch.Tensor, dst: torch.Tensor, dst_ids: torch.Tensor) -> None:
    """dst[:, dst_ids] = src[:, src_ids] for pools [L, N, ...] (any stream ordering is the caller's:
    it runs on the current stream of the GPU side).

    src, dst: on one GPU, or one on a GPU and the other in pinned host memory (moved through
    UVA), or both on the CPU (torch ops).  src_ids/dst_ids: [n] int64, on the GPU side when there is
    one (pinned host index tensors work too), else on the CPU.
    """
    L = src.shape[0]
    n = src_ids.numel()
    if n == 0:
        return
    s3, d3 = as_bytes(rows(src)), as_bytes(rows(dst))
    x = s3.shape[2]
    if not _on_gpu(src, dst):
        if src.device != dst.device:
            raise ValueError(f"cannot copy KV blocks from {src.device} to {dst.device} (pinned host memory and Triton needed)")
        d3.index_copy_(1, dst_ids, s3.index_select(1, src_ids))
        return
    if s3.stride(2) != 1 or d3.stride(2) != 1:
        raise ValueError("KV block rows must be contiguous")
    block = 4096
    grid = (L * n, triton.cdiv(x, block))
    _copy_rows_kernel[grid](s3, d3, src_ids, dst_ids, n, s3.stride(0), s3.stride(1), d3.stride(0), d3.stride(1), x,
                            BLOCK=block, num_warps=8)


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
    return as_bytes(src).index_select(1, src_ids)[:, :, :, :, heads[0]:heads[1]].contiguous().view(src.dtype)


def scatter_heads(data: torch.Tensor, dst: torch.Tensor, dst_ids: torch.Tensor, heads: tuple[int, int]) -> None:
    """Write ``data`` [L, n, 2, bs, h, D] (on ``dst``'s device) into blocks ``dst_ids`` of pool ``dst``
    (its local heads ``heads``), on the current stream: one block-copy kernel when ``data`` is whole
    contiguous blocks on a GPU, else ``index_copy_`` into the heads' (strided) view."""
    if _full(dst, heads) and data.is_contiguous() and _on_gpu(data, dst):
        copy_blocks(data, torch.arange(data.shape[1], device=data.device), dst, dst_ids)
    else:
        as_bytes(dst[:, :, :, :, heads[0]:heads[1]]).index_copy_(1, dst_ids, as_bytes(data))


def copy_heads(src: torch.Tensor, src_ids: torch.Tensor, src_heads: tuple[int, int], dst: torch.Tensor,
               dst_ids: torch.Tensor, dst_heads: tuple[int, int]) -> None:
    """``dst[:, dst_ids, ..., dst_heads] = src[:, src_ids, ..., src_heads]`` for pools on one device:
    one block-copy kernel when both sides are whole blocks, else a gather of the heads and a
    scatter (tensor parallelism of different sizes)."""
    if _full(src, src_heads) and _full(dst, dst_heads):
        copy_blocks(src, src_ids, dst, dst_ids)
    else:
        scatter_heads(gather_heads(src, src_ids, src_heads), dst, dst_ids, dst_heads)


class SideStreams:
    """A stream of the highest priority per GPU, made on first use: the GPU's block scheduler
    dispatches its kernels before those of normal-priority streams (a busy prefill's GEMMs, a decode
    step's), so a pull under load is not queued behind them.  Used from any thread: two threads
    racing on a device's first use make one stream each, and one of them is kept."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def __call__(self, device: torch.device) -> torch.cuda.Stream:
        st = self._streams.get(device)
        if st is None:
            # (greatest, least): lower numbers are higher priority
            high, _ = torch.cuda.Stream.priority_range()  # type: ignore[call-arg]  # a staticmethod at runtime; torch's stub omits it
            st = self._streams[device] = torch.cuda.Stream(device, priority=high)
        return st
