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
from pdmesh.engine.sampler import Sampler, build_sampling_batch
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
        self.graphs = None
        """``DecodeGraphs`` when CUDA graphs are captured (``capture_decode_graphs``)."""

    def capture_decode_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        from pdmesh.engine.cuda_graphs import DecodeGraphs

        self.graphs = DecodeGraphs(self.model, self.backend, self.pool.kv, max_num_seqs, max_model_len,
                                   self.block_size, self.pool.null_block, self.device)

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
        input_ids = torch.from_numpy(np.concatenate(ids)).to(self.device)
        positions = torch.from_numpy(np.concatenate(pos)).to(self.device)
        slot_mapping = torch.from_numpy(np.concatenate(slots))
        layout = BatchLayout(list(batch.num_new_tokens), ctx_lens, tables, slot_mapping, bs)
        return input_ids, positions, layout, logits_idx, sample_seqs

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
        return self.model.compute_logits(hidden[torch.tensor(logits_idx, device=self.device)]), sample_seqs

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepResult:
        logits, sample_seqs = self.forward(batch)
        if logits is None:
            return StepResult([], [], [])
        sb = build_sampling_batch(sample_seqs, logits.shape[-1], self.device)
        tokens, logprobs = self.sampler(logits, sb, sample_seqs)
        return StepResult(sample_seqs, tokens, logprobs)
