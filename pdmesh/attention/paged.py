"""Host-side page-table metadata in the CSR form FlashInfer's wrappers take (pure, CPU)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
    indices = np.concatenate([np.asarray(t[:p], dtype=np.int32) for t, p in zip(batch.block_tables, pages)])
    last = (ctx - (pages - 1) * bs).astype(np.int32)
    return PagedMetadata(qo, kv, indices, last)
