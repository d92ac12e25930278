"""Paged decode attention in Triton (split-KV flash decoding) for GQA shapes FlashInfer serves poorly.

One query token per sequence.  Program ``(b, h, s)`` takes the whole query group of KV head ``h``
(``G = Hq / Hkv`` query heads, padded to a tensor-core tile) against split ``s`` of sequence ``b``'s
context, so each K/V tile is read once for all the heads that share it and the scores are one
``tl.dot``.  Splits keep the GPU full when ``B * Hkv`` is small (batch 1 reads 1 MB of KV with
hundreds of programs, not two); a second kernel merges the splits by their log-sum-exp.  With one
split the first kernel writes the output itself.

Why: for qwen2.5-0.5b (head dim 64, 7 query heads per KV head) FlashInfer's tensor-core decode read
a layer's KV at about half the copy bandwidth and its CUDA-core decode has no group-7 variant
(``results/gpu/2026-11-22-h200-gemv``).  ``DecodeAttention`` mirrors the FlashInfer decode
wrapper's shape: ``plan()`` once per step (host metadata -> one device buffer), ``run()`` per layer;
in CUDA-graph mode its buffers are fixed at construction and ``plan()`` only refills them.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from pdmesh.attention.paged import PagedMetadata, PinnedStaging

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

MAX_SPLITS = 64

if triton is not None:

    @triton.jit
    def _split_kernel(q_ptr, kv_ptr, meta_ptr, o_ptr, part_ptr, lse_ptr, num_seqs, num_splits,
                      stride_qt, stride_qh, stride_page, stride_kv, stride_tok, stride_ot, stride_oh, scale_log2,
                      GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                      BLOCK_N: tl.constexpr, DIRECT: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.program_id(2)
        num_kv_heads = tl.num_programs(1)
        page_lo = tl.load(meta_ptr + b)
        ctx = tl.load(meta_ptr + num_seqs + 1 + b)
        idx_base = meta_ptr + 2 * num_seqs + 1 + page_lo
        chunk = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N
        lo = s * chunk
        hi = tl.minimum(ctx, lo + chunk)

        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, D)
        g_ok = g < GROUP
        heads = h * GROUP + g
        q = tl.load(q_ptr + b * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=g_ok[:, None], other=0.0)
        m_i = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
        l_i = tl.zeros((GROUP_PAD,), tl.float32)
        acc = tl.zeros((GROUP_PAD, D), tl.float32)
        for start in range(lo, hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < hi
            page = tl.load(idx_base + n // PAGE, mask=n_ok, other=0).to(tl.int64)
            row = page * stride_page + (n % PAGE) * stride_tok + h * D
            k = tl.load(kv_ptr + row[None, :] + d[:, None], mask=n_ok[None, :], other=0.0).to(q.dtype)  # [D, BLOCK_N]
            sc = tl.dot(q, k) * scale_log2  # [GROUP_PAD, BLOCK_N], log2 domain
            sc = tl.where(n_ok[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            p = tl.exp2(sc - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(kv_ptr + stride_kv + row[:, None] + d[None, :], mask=n_ok[:, None], other=0.0).to(q.dtype)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v)  # (an fp8 cache is converted as it loads)
            m_i = m_new
        if DIRECT:
            out = acc / l_i[:, None]
            tl.store(o_ptr + b * stride_ot + heads[:, None] * stride_oh + d[None, :], out.to(o_ptr.dtype.element_ty),
                     mask=g_ok[:, None])
        else:
            empty = l_i == 0.0
            out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
            lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
            row_id = (b * num_kv_heads * GROUP + heads) * num_splits + s  # [B, Hq, S] row-major
            tl.store(part_ptr + row_id[:, None] * D + d[None, :], out, mask=g_ok[:, None])
            tl.store(lse_ptr + row_id, lse, mask=g_ok)

    @triton.jit
    def _merge_kernel(part_ptr, lse_ptr, o_ptr, num_heads, num_splits, stride_ot, stride_oh,
                      D: tl.constexpr, S_PAD: tl.constexpr):
        r = tl.program_id(0)  # b * Hq + head
        b = r // num_heads
        hd = r % num_heads
        s = tl.arange(0, S_PAD)
        d = tl.arange(0, D)
        s_ok = s < num_splits
        lse = tl.load(lse_ptr + r * num_splits + s, mask=s_ok, other=float("-inf"))
        m = tl.max(lse, 0)
        w = tl.where(s_ok & (lse > float("-inf")), tl.exp2(lse - m), 0.0)
        part = tl.load(part_ptr + (r * num_splits + s)[:, None] * D + d[None, :], mask=s_ok[:, None], other=0.0)
        out = tl.sum(part * w[:, None], 0) / tl.sum(w, 0)
        tl.store(o_ptr + b * stride_ot + hd * stride_oh + d, out.to(o_ptr.dtype.element_ty))


def triton_decode_available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def pick_decode_kernel(choice: str, device: torch.device, num_heads: int, num_kv_heads: int, head_dim: int) -> str:
    """'flashinfer' or 'triton' for decode-only steps.  'auto' takes Triton for GQA groups of 4 and
    more, where FlashInfer would use its tensor-core decode: ours was faster for every shape and batch
    measured (qwen2.5-0.5b's group 7 at head dim 64: 5.3 vs 10.1 us per layer at batch 1, 24 vs 33 at
    64; llama's group 4 at head dim 128: 10.4 vs 12.5 and 136 vs 141; results/gpu/2026-11-22-h200-
    triton-decode).  Groups 1-3 keep FlashInfer's CUDA-core kernel (not measured against ours)."""
    fits = head_dim >= 16 and head_dim & (head_dim - 1) == 0
    if choice == "triton" and not triton_decode_available(device):
        raise RuntimeError("--decode-attention triton needs Triton on a CUDA device")
    if choice == "triton" and not fits:
        raise RuntimeError(f"--decode-attention triton needs a power-of-two head dim >= 16, not {head_dim}")
    if choice != "auto":
        return choice
    group = num_heads // num_kv_heads
    return "triton" if group >= 4 and fits and triton_decode_available(device) else "flashinfer"


def pick_tiles(num_splits: int, head_dim: int, elem_bytes: int) -> tuple[int, int]:
    """(tokens per K/V tile, pipeline stages), from the sweep in ``benchmarks/gpu_kernels.py``: 16 KB
    tiles when each program walks a long stretch of context (few splits), 8 KB ones when many splits
    share a short context (batch 1), so more of them have work."""
    tile = 16384 if num_splits < 8 else 8192
    block_n = min(128, max(32, tile // (head_dim * elem_bytes)))
    return block_n, 3 if num_splits < 8 and head_dim <= 64 else 2


def pick_splits(num_seqs: int, num_kv_heads: int, num_sms: int) -> int:
    """Splits per (sequence, KV head): enough programs for two waves over the SMs, at most MAX_SPLITS."""
    return max(1, min(MAX_SPLITS, -(-2 * num_sms // (num_seqs * num_kv_heads))))


class DecodeAttention:
    """Decode attention for ``num_seqs`` one-token queries over a paged KV layer.

    Eager mode (``graph_batch=None``): buffers sized per ``plan``.  CUDA-graph mode
    (``graph_batch=b``, ``max_pages`` per sequence): the metadata buffer ``[2b + 1 + b*max_pages]``
    int32 and the split buffers are allocated once, so a captured ``run`` stays valid; ``plan`` must
    then describe exactly ``b`` sequences (the caller pads).
    """

    def __init__(self, device: torch.device, num_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                 graph_batch: Optional[int] = None, max_pages: int = 0, tiles: Optional[tuple[int, int]] = None,
                 kv_dtype: torch.dtype = torch.bfloat16, splits: Optional[int] = None) -> None:
        if triton is None:
            raise RuntimeError("Triton decode attention needs triton")
        if num_heads % num_kv_heads or head_dim < 16 or head_dim & (head_dim - 1):
            raise ValueError(f"unsupported shape: {num_heads} heads over {num_kv_heads} KV heads, head dim {head_dim}")
        self.device, self.hq, self.hkv, self.d, self.page = device, num_heads, num_kv_heads, head_dim, page_size
        self.group = num_heads // num_kv_heads
        self.group_pad = max(16, triton.next_power_of_2(self.group))
        self.tiles = tiles
        """(block_n, stages) to force (the kernel sweep); None: ``pick_tiles`` per batch size."""
        self.forced_splits = splits
        """Splits to force (the kernel sweep); None: ``pick_splits`` per batch size."""
        self.elem_bytes = torch.empty(0, dtype=kv_dtype).element_size()
        self.block_n, self.num_stages = 64, 2
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        self.graph_batch = graph_batch
        self._staging = PinnedStaging(pinned=device.type == "cuda")
        self.num_seqs = 0
        self.splits = 1
        self.meta: Optional[torch.Tensor] = None
        self.part: Optional[torch.Tensor] = None
        self.lse: Optional[torch.Tensor] = None
        if graph_batch is not None:
            self.meta = torch.zeros(2 * graph_batch + 1 + graph_batch * max_pages, dtype=torch.int32, device=device)
            self._size(graph_batch)

    def _size(self, num_seqs: int) -> None:
        self.num_seqs = num_seqs
        self.splits = self.forced_splits or pick_splits(num_seqs, self.hkv, self.num_sms)
        self.block_n, self.num_stages = self.tiles or pick_tiles(self.splits, self.d, self.elem_bytes)
        if self.splits > 1:
            need = num_seqs * self.hq * self.splits
            if self.lse is None or self.lse.shape[0] < need:
                self.part = torch.empty(need, self.d, dtype=torch.float32, device=self.device)
                self.lse = torch.empty(need, dtype=torch.float32, device=self.device)

    def plan(self, m: PagedMetadata) -> None:
        """Host page tables -> the device metadata buffer ``[kv_indptr | context_lens | indices]``, one
        copy through a pinned buffer (the caller's input fence guarantees the previous step's copy ran)."""
        b = len(m.kv_last_page_len)
        if self.graph_batch is not None and b != self.graph_batch:
            raise ValueError(f"graph-mode plan for {b} sequences, captured for {self.graph_batch}")
        n = 2 * b + 1 + m.kv_indices.shape[0]
        staged = self._staging.host(n)
        host = staged.numpy()
        host[:b + 1] = m.kv_indptr
        host[b + 1:2 * b + 1] = context_lens(m, self.page)
        host[2 * b + 1:n] = m.kv_indices
        if self.graph_batch is None:
            self.meta = torch.empty(n, dtype=torch.int32, device=self.device)
            self._size(b)
        else:
            assert self.meta is not None  # graph mode: allocated in __init__
            if n > self.meta.shape[0]:
                raise ValueError(f"{m.kv_indices.shape[0]} pages exceed the captured buffer")
        self.meta[:n].copy_(staged, non_blocking=True)

    def run(self, q: torch.Tensor, kv_layer: torch.Tensor) -> torch.Tensor:
        """q [B, Hq, D] (any row/head strides, unit stride in D); kv_layer [N, 2, page, Hkv, D]
        (contiguous) -> [B, Hq, D] in q's dtype."""
        b = self.num_seqs
        if q.shape != (b, self.hq, self.d) or q.stride(2) != 1:
            raise ValueError(f"q {tuple(q.shape)} does not match the plan ({b}, {self.hq}, {self.d})")
        if kv_layer.shape[1:] != (2, self.page, self.hkv, self.d) or kv_layer.stride(3) != self.d or kv_layer.stride(4) != 1:
            raise ValueError(f"kv_layer {tuple(kv_layer.shape)} is not [N, 2, {self.page}, {self.hkv}, {self.d}] with dense heads")
        out = torch.empty(b, self.hq, self.d, dtype=q.dtype, device=q.device)
        direct = self.splits == 1
        part = out if direct else self.part
        lse = out if direct else self.lse
        _split_kernel[(b, self.hkv, self.splits)](
            q, kv_layer, self.meta, out, part, lse, b, self.splits,
            q.stride(0), q.stride(1), kv_layer.stride(0), kv_layer.stride(1), kv_layer.stride(2),
            out.stride(0), out.stride(1), self.scale_log2,
            GROUP=self.group, GROUP_PAD=self.group_pad, D=self.d, PAGE=self.page, BLOCK_N=self.block_n, DIRECT=direct,
            num_warps=4, num_stages=self.num_stages)
        if not direct:
            _merge_kernel[(b * self.hq,)](self.part, self.lse, out, self.hq, self.splits, out.stride(0), out.stride(1),
                                          D=self.d, S_PAD=triton.next_power_of_2(self.splits), num_warps=2)
        return out

    @property
    def scale_log2(self) -> float:
        return float(self.d ** -0.5 * 1.4426950408889634)


def context_lens(m: PagedMetadata, page_size: int) -> np.ndarray:
    """[B] tokens per sequence from the CSR page table."""
    return (m.kv_indptr[1:] - m.kv_indptr[:-1] - 1) * page_size + m.kv_last_page_len
