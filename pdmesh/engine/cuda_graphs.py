"""Decode steps replayed from CUDA graphs, one per batch-size bucket (CUDA + FlashInfer only).

Capture (at start-up, largest bucket first, one shared memory pool): for each bucket ``b`` a
decode wrapper in CUDA-graph mode (FlashInfer's or the Triton one) with its own preallocated
page-table buffers, static ``input_ids``/``positions``/slot tensors, two warm-up runs on a side stream, then
the capture of the model's forward.  Replay: copy the step's inputs into the static tensors
(padding rows decode one token into the reserved *null block*, which no request ever owns),
``plan()`` the bucket's wrapper (host work + buffer copies, outside the graph), ``replay()``.
"""

from __future__ import annotations

import bisect
import logging
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch

from pdmesh.attention.base import BatchLayout, StepAttention

if TYPE_CHECKING:  # FlashInfer exists only on CUDA hosts; the padding logic is testable anywhere
    from pdmesh.attention.flashinfer_backend import FlashInferBackend

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)


class DecodeGraphs:
    def __init__(self, model, backend: "FlashInferBackend", kv: torch.Tensor, max_num_seqs: int, max_model_len: int,
                 block_size: int, null_block: int, device: torch.device) -> None:
        self.model = model
        self.backend = backend
        self.kv = kv
        self.block_size = block_size
        self.null_block = null_block
        self.device = device
        self.max_pages = -(-max_model_len // block_size)
        self.buckets = sorted({b for b in DEFAULT_BUCKETS if b < max_num_seqs} | {max_num_seqs})
        top = self.buckets[-1]
        self.input_ids = torch.zeros(top, dtype=torch.int64, device=device)
        self.positions = torch.zeros(top, dtype=torch.int64, device=device)
        self.slot_block = torch.full((top,), null_block, dtype=torch.int64, device=device)
        self.slot_offset = torch.zeros(top, dtype=torch.int64, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, object, torch.Tensor]] = {}
        with torch.cuda.device(device):  # capture streams belong to the engine's device, not device 0
            self._capture_all()
        log.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def _capture_all(self) -> None:
        from pdmesh.attention.flashinfer_backend import FlashInferPlan

        model, backend, kv, device = self.model, self.backend, self.kv, self.device
        pool = torch.cuda.graph_pool_handle()
        # An explicit capture stream on this device: torch.cuda.graph's default capture stream is
        # created once per process on whichever device captured first.
        capture_stream = torch.cuda.Stream(device)
        for b in reversed(self.buckets):
            wrapper = backend.new_decode_wrapper(b, self.max_pages)
            backend.plan_decode(wrapper, self._padded_layout(None, b))
            ctx = StepAttention(backend, FlashInferPlan(wrapper, self.slot_block[:b], self.slot_offset[:b]), kv)
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(2):
                    model(self.input_ids[:b], self.positions[:b], ctx)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=capture_stream), torch.inference_mode():
                out = model(self.input_ids[:b], self.positions[:b], ctx)
            self.graphs[b] = (graph, wrapper, out)
        torch.cuda.synchronize(device)

    def _padded_layout(self, layout: Optional[BatchLayout], b: int) -> BatchLayout:
        """``layout`` padded to ``b`` rows; padding rows hold one token in the null block."""
        ctx = list(layout.context_lens) if layout else []
        tables = list(layout.block_tables) if layout else []
        pad = b - len(ctx)
        null_table = np.array([self.null_block], dtype=np.int32)
        return BatchLayout([1] * b, ctx + [1] * pad, tables + [null_table] * pad, self.slot_block[:0], self.block_size)

    def can_run(self, layout: BatchLayout) -> bool:
        return layout.is_decode_only and self.fits(len(layout.query_lens), max(layout.context_lens))

    def fits(self, rows: int, max_context: int) -> bool:
        """Whether ``rows`` one-query rows whose longest context is ``max_context`` fit a captured graph."""
        return rows <= self.buckets[-1] and max_context <= self.max_pages * self.block_size

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, layout: BatchLayout,
            on_loaded: Optional[Callable[[], None]] = None) -> torch.Tensor:
        """input_ids/positions [B] on device -> hidden [B, hidden] (a view of static output).
        ``on_loaded`` runs once the step's inputs and plan are queued, before the replay."""
        n = len(layout.query_lens)
        b = self.buckets[bisect.bisect_left(self.buckets, n)]
        graph, wrapper, out = self.graphs[b]
        slots = layout.slot_mapping.to(self.device, non_blocking=True)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_block[:n].copy_(slots // self.block_size)
        self.slot_offset[:n].copy_(slots % self.block_size)
        if b > n:
            self.input_ids[n:b].zero_()
            self.positions[n:b].zero_()
            self.slot_block[n:b].fill_(self.null_block)
            self.slot_offset[n:b].zero_()
        self.backend.plan_decode(wrapper, self._padded_layout(layout, b))
        if on_loaded is not None:
            on_loaded()
        with torch.cuda.device(self.device):
            graph.replay()
        return out[:n]
