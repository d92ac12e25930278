"""Host-side page-table metadata in the CSR form FlashInfer's wrappers take (pure, CPU), and the
KV store into paged slots."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from pdmesh.attention.base import BatchLayout


@dataclass(frozen=True)
class PagedMetadata:
    qo_indptr: np.ndarray
    """[B+1] int32: query token offsets per sequence."""
    kv_indptr: np.ndarray
    """[B+1] int32: offsets into kv_indices per sequence."""
    kv_indices: np.ndarray
    """[sum(pages)] int32: block ids of each sequence's used pages, in order."""
    kv_last_page_len: np.ndarray
    """[B] int32: tokens in each sequence's last page (1..page_size)."""


def paged_metadata(batch: BatchLayout) -> PagedMetadata:
    bs = batch.block_size
    ctx = np.asarray(batch.context_lens, dtype=np.int64)
    pages = (ctx + bs - 1) // bs
    qo = np.zeros(len(ctx) + 1, dtype=np.int32)
    qo[1:] = np.cumsum(batch.query_lens)
    kv = np.zeros(len(ctx) + 1, dtype=np.int32)
    kv[1:] = np.cumsum(pages)
    indices = np.concatenate([t[:p] for t, p in zip(batch.block_tables, pages.tolist())]).astype(np.int32, copy=False)
    last = (ctx - (pages - 1) * bs).astype(np.int32)
    return PagedMetadata(qo, kv, indices, last)


class PinnedStaging:
    """A pinned host int32 buffer that grows as needed, for host-to-device copies that do not sync
    the stream.  Its owner rewrites it only once the previous step's copies ran (the model runner's
    input fence)."""

    def __init__(self, pinned: bool = True) -> None:
        self.pinned = pinned
        self._buf: Optional[torch.Tensor] = None

    def host(self, n: int) -> torch.Tensor:
        """[n] int32 pinned host tensor (a view of the buffer, valid until the next call)."""
        if self._buf is None or self._buf.shape[0] < n:
            self._buf = torch.empty(max(n, 1 << 16), dtype=torch.int32, pin_memory=self.pinned)
        return self._buf[:n]


FP8_KV = torch.float8_e4m3fn
FP8_KV_MAX = 448.0


def to_kv_dtype(x: torch.Tensor, kv_dtype: torch.dtype) -> torch.Tensor:
    """New K or V values as the pool stores them: fp8 e4m3 values are clamped to +-448 first (a
    plain cast is not saturating on CUDA), unscaled (vLLM's default k/v scale of 1.0)."""
    if kv_dtype == FP8_KV and x.dtype != FP8_KV:
        return x.clamp(-FP8_KV_MAX, FP8_KV_MAX).to(FP8_KV)
    return x


def store_kv(kv_layer: torch.Tensor, slot_block: torch.Tensor, slot_offset: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor) -> None:
    """kv_layer [N, 2, bs, Hkv, D] (model dtype or fp8); k, v [T, Hkv, D] in the model dtype:
    write new tokens into their slots (one kernel when v follows k in each row, as the qkv
    projection's views do; converted first for an fp8 pool)."""
    kv = _kv_rows(k, v)
    dt = kv_layer.dtype
    if kv is not None:
        kv_layer[slot_block, :, slot_offset] = to_kv_dtype(kv, dt)
    else:
        kv_layer[:, 0][slot_block, slot_offset] = to_kv_dtype(k, dt)
        kv_layer[:, 1][slot_block, slot_offset] = to_kv_dtype(v, dt)


def _kv_rows(k: torch.Tensor, v: torch.Tensor) -> Optional[torch.Tensor]:
    """k, v [T, Hkv, D] -> the [T, 2, Hkv, D] view covering both, if v directly follows k in
    every row of one buffer; else None."""
    t, h, d = k.shape
    if (k.stride() != v.stride() or k.stride(2) != 1 or k.stride(1) != d or k.dtype != v.dtype
            or v.data_ptr() - k.data_ptr() != h * d * k.element_size()
            or k.untyped_storage().data_ptr() != v.untyped_storage().data_ptr()):
        return None  # (two tensors can sit back to back in memory without sharing a storage)
    return k.as_strided((t, 2, h, d), (k.stride(0), h * d, d, 1))
