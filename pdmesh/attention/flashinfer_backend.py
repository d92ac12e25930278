"""FlashInfer attention backend (CUDA): ``BatchPrefillWithPagedKVCacheWrapper`` for prefill and
chunked prefill (a sequence's queries are aligned to the end of its KV, so prefix-cache hits and
earlier chunks are attended causally), ``BatchDecodeWithPagedKVCacheWrapper`` for decode-only
steps (tensor cores when the GQA group is >= 4), or our Triton split-KV decode kernel
(``triton_decode``) for the GQA shapes where it measured faster (``decode_kernel``).  ``plan`` runs
once per step; ``run`` per layer.

The KV pool's per-layer slice ``[num_blocks, 2, block_size, Hkv, D]`` is FlashInfer's NHD layout,
so no copies happen between the cache and the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import flashinfer
import numpy as np
import torch

from pdmesh.attention.base import BaseAttentionBackend, BatchLayout
from pdmesh.attention.paged import PinnedStaging, paged_metadata, store_kv
from pdmesh.attention.triton_decode import DecodeAttention, pick_decode_kernel

WORKSPACE_BYTES = 256 << 20


@dataclass(frozen=True)
class FlashInferPlan:
    wrapper: Any
    """The planned FlashInfer wrapper this step's layers run."""
    slot_block: torch.Tensor
    """[T] int64: block of each new token's slot."""
    slot_offset: torch.Tensor
    """[T] int64: offset inside that block."""


class FlashInferBackend(BaseAttentionBackend):
    name = "flashinfer"

    def __init__(self, device: torch.device, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 block_size: int, decode_kernel: str = "auto", kv_dtype: Optional[torch.dtype] = None) -> None:
        self.device = device
        self.hq, self.hkv, self.d, self.dtype, self.block_size = num_heads, num_kv_heads, head_dim, dtype, block_size
        self.kv_dtype = kv_dtype or dtype
        """The KV pool's element type: the model dtype, or fp8 e4m3 (the kernels read it as is)."""
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.use_tensor_cores = num_heads // num_kv_heads >= 4
        self.triton_decode = pick_decode_kernel(decode_kernel, device, num_heads, num_kv_heads, head_dim) == "triton"
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        self.decode = self.new_decode_wrapper()
        self._staging = PinnedStaging()

    def new_decode_wrapper(self, graph_batch: Optional[int] = None, max_pages: int = 0) -> Any:
        """A decode wrapper (FlashInfer's or the Triton one); with ``graph_batch`` in CUDA-graph mode,
        its buffers fixed for ``graph_batch`` sequences of at most ``max_pages`` pages."""
        if self.triton_decode:
            return DecodeAttention(self.device, self.hq, self.hkv, self.d, self.block_size, graph_batch, max_pages,
                                   kv_dtype=self.kv_dtype)
        if graph_batch is None:
            return flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD", use_tensor_cores=self.use_tensor_cores)
        b, dev = graph_batch, self.device
        return flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=self.use_tensor_cores,
            paged_kv_indptr_buffer=torch.zeros(b + 1, dtype=torch.int32, device=dev),
            paged_kv_indices_buffer=torch.zeros(b * max_pages, dtype=torch.int32, device=dev),
            paged_kv_last_page_len_buffer=torch.zeros(b, dtype=torch.int32, device=dev))

    def plan_decode(self, wrapper: Any, batch: BatchLayout) -> None:
        """Plan a decode wrapper (this backend's, or a CUDA-graph one) for a decode-only batch.
        The page indices go to the device through a pinned buffer: a CUDA-graph wrapper copies
        host indices with a blocking copy, which would wait for the step still on the GPU."""
        m = paged_metadata(batch)
        if isinstance(wrapper, DecodeAttention):
            wrapper.plan(m)
            return
        wrapper.plan(torch.from_numpy(m.kv_indptr), self._indices_on_device(m.kv_indices),
                     torch.from_numpy(m.kv_last_page_len), self.hq, self.hkv, self.d, batch.block_size,
                     q_data_type=self.dtype, kv_data_type=self.kv_dtype)

    def _indices_on_device(self, indices: np.ndarray) -> torch.Tensor:
        """[P] int32 host -> device without a stream sync (through the pinned staging buffer)."""
        host = self._staging.host(indices.shape[0])
        host.copy_(torch.from_numpy(indices))
        return host.to(self.device, non_blocking=True)

    def plan(self, batch: BatchLayout) -> FlashInferPlan:
        # Host tensors: plan() reads indptr on the host anyway and copies what the kernels need.
        slots = batch.slot_mapping.to(self.device, non_blocking=True)
        bs = batch.block_size
        if batch.is_decode_only:
            wrapper = self.decode
            self.plan_decode(wrapper, batch)
        else:
            m = paged_metadata(batch)
            qo, kv_indptr, kv_indices, last = (torch.from_numpy(a) for a in
                                               (m.qo_indptr, m.kv_indptr, m.kv_indices, m.kv_last_page_len))
            wrapper = self.prefill
            wrapper.plan(qo, kv_indptr, kv_indices, last, self.hq, self.hkv, self.d, bs, causal=True,
                         q_data_type=self.dtype, kv_data_type=self.kv_dtype)
        return FlashInferPlan(wrapper, slots // bs, slots % bs)

    def run(self, plan: FlashInferPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor) -> torch.Tensor:
        store_kv(kv_layer, plan.slot_block, plan.slot_offset, k, v)
        return plan.wrapper.run(q, kv_layer)
