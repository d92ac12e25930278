"""The model runner: turns a scheduled batch into tensors, runs the model, samples.

``prepare`` builds flat ``input_ids``/``positions``/``slot_mapping`` with one numpy op per
sequence (never per token), ``plan`` is called once, and the model runs once over all tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from pdmesh.attention import BaseAttentionBackend, BatchLayout, StepAttention
from pdmesh.engine.sampler import Sampler, build_sampling_batch, plain_greedy
from pdmesh.engine.scheduler import ScheduledBatch
from pdmesh.engine.sequence import Sequence, TokenLogprob
from pdmesh.kv.block_manager import PrefixCachingBlockManager
from pdmesh.kv.pool import KVCachePool
from pdmesh.models.transformer import CausalLM


@dataclass
class StepResult:
    """Sampled tokens for the sequences that completed their pending tokens this step."""

    sampled_seqs: list[Sequence]
    token_ids: list[int]
    logprobs: list[Optional[TokenLogprob]]


class ModelRunner:
    def __init__(self, model: CausalLM, pool: KVCachePool, blocks: PrefixCachingBlockManager,
                 backend: BaseAttentionBackend, device: torch.device) -> None:
        self.model = model
        self.pool = pool
        self.blocks = blocks
        self.backend = backend
        self.device = device
        self.sampler = Sampler(device)
        self.block_size = pool.block_size
        self._pinned: Optional[torch.Tensor] = None
        self.graphs = None
        """``DecodeGraphs`` when CUDA graphs are captured (``capture_decode_graphs``)."""

    def capture_decode_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        from pdmesh.engine.cuda_graphs import DecodeGraphs

        self.graphs = DecodeGraphs(self.model, self.backend, self.pool.kv, max_num_seqs, max_model_len,
                                   self.block_size, self.pool.null_block, self.device)

    def _to_device(self, packed: np.ndarray) -> torch.Tensor:
        """[3, T] int64 (ids, positions, slots) -> device, in one copy (from pinned memory on CUDA)."""
        host = torch.from_numpy(packed)
        if self.device.type != "cuda":
            return host
        t = packed.shape[1]
        if self._pinned is None or self._pinned.shape[1] < t:
            self._pinned = torch.empty((3, max(t, 4096)), dtype=torch.int64, pin_memory=True)
        self._pinned[:, :t].copy_(host)
        return self._pinned[:, :t].to(self.device, non_blocking=True)

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, BatchLayout, list[int], list[Sequence]]:
        ids, pos, slots = [], [], []
        ctx_lens, tables, logits_idx, sample_seqs = [], [], [], []
        offset = 0
        bs = self.block_size
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            end = start + n
            table = self.blocks.block_table(seq.request_id)
            p = np.arange(start, end, dtype=np.int64)
            ids.append(np.asarray(seq.token_ids[start:end], dtype=np.int64))
            pos.append(p)
            slots.append(np.asarray(table, dtype=np.int64)[p // bs] * bs + p % bs)
            ctx_lens.append(end)
            tables.append(table)
            offset += n
            if end == seq.num_tokens:
                logits_idx.append(offset - 1)
                sample_seqs.append(seq)
        packed = np.stack([np.concatenate(ids), np.concatenate(pos), np.concatenate(slots)])
        dev = self._to_device(packed)
        layout = BatchLayout(list(batch.num_new_tokens), ctx_lens, tables, dev[2], bs)
        return dev[0], dev[1], layout, logits_idx, sample_seqs

    def forward(self, batch: ScheduledBatch) -> tuple[Optional[torch.Tensor], list[Sequence]]:
        """Run the model over the batch; logits [N, vocab] (float32) of the sequences whose pending
        tokens are all computed by this step, and those sequences."""
        input_ids, positions, layout, logits_idx, sample_seqs = self.prepare(batch)
        if self.graphs is not None and self.graphs.can_run(layout):
            hidden = self.graphs.run(input_ids, positions, layout)
        else:
            plan = self.backend.plan(layout)
            hidden = self.model(input_ids, positions, StepAttention(self.backend, plan, self.pool.kv))
        if not sample_seqs:
            return None, []
        if len(logits_idx) != hidden.shape[0]:  # some sequences were mid-prefill: pick last tokens
            hidden = hidden[torch.tensor(logits_idx, device=self.device)]
        return self.model.compute_logits(hidden), sample_seqs

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepResult:
        logits, sample_seqs = self.forward(batch)
        if logits is None:
            return StepResult([], [], [])
        if all(plain_greedy(s) for s in sample_seqs):
            return StepResult(sample_seqs, logits.argmax(dim=-1).tolist(), [None] * len(sample_seqs))
        sb = build_sampling_batch(sample_seqs, logits.shape[-1], self.device)
        tokens, logprobs = self.sampler(logits, sb, sample_seqs)
        return StepResult(sample_seqs, tokens, logprobs)
