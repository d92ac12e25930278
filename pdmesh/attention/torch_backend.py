"""Reference attention backend on ``torch.nn.functional.scaled_dot_product_attention``.

Works on CPU and CUDA.  ``plan`` pads the batch into ``[B, max_q]`` queries and
``[B, max_ctx]`` keys with index tensors and one boolean mask; ``run`` is then a store, two
gathers and one SDPA call per layer — no Python loop over sequences or blocks.  An fp8 KV pool
(``--kv-cache-dtype fp8``) is written clamped to +-448 and dequantized to q's dtype when read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdmesh.attention.base import BaseAttentionBackend, BatchLayout
from pdmesh.attention.paged import to_kv_dtype


@dataclass(frozen=True)
class TorchPlan:
    slot_block: torch.Tensor
    """[T] int64: block of each new token's slot."""
    slot_offset: torch.Tensor
    """[T] int64: offset inside that block."""
    q_index: torch.Tensor
    """[B, max_q] int64: flat token index of each padded query (0 for padding)."""
    key_block: torch.Tensor
    """[B, max_ctx] int64: block of each padded key position."""
    key_offset: torch.Tensor
    """[1, max_ctx] int64: offset of each key position inside its block."""
    mask: torch.Tensor
    """[B, 1, max_q, max_ctx] bool: True where the query may attend the key."""
    out_index: torch.Tensor
    """[T] int64: row of each flat token in the padded [B*max_q] output."""


class TorchAttentionBackend(BaseAttentionBackend):
    name = "torch"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def plan(self, batch: BatchLayout) -> TorchPlan:
        dev = self.device
        bs = batch.block_size
        qlens = torch.tensor(batch.query_lens, dtype=torch.int64)
        ctx = torch.tensor(batch.context_lens, dtype=torch.int64)
        nb = len(batch.query_lens)
        max_q, max_ctx = int(qlens.max()), int(ctx.max())
        starts = torch.cumsum(qlens, 0) - qlens
        i = torch.arange(max_q)
        q_valid = i[None, :] < qlens[:, None]
        q_index = torch.where(q_valid, starts[:, None] + i[None, :], 0)
        q_pos = torch.where(q_valid, (ctx - qlens)[:, None] + i[None, :], 0)
        j = torch.arange(max_ctx)
        mask = (j[None, None, :] <= q_pos[:, :, None]).unsqueeze(1)
        max_blocks = max(len(t) for t in batch.block_tables)
        bt = torch.zeros((nb, max_blocks), dtype=torch.int64)
        for b, table in enumerate(batch.block_tables):
            bt[b, : len(table)] = torch.tensor(table, dtype=torch.int64)
        key_block = bt[:, j // bs]
        rows = torch.arange(nb)[:, None] * max_q + i[None, :]
        out_index = rows[q_valid]
        slots = batch.slot_mapping
        return TorchPlan(
            slot_block=(slots // bs).to(dev),
            slot_offset=(slots % bs).to(dev),
            q_index=q_index.to(dev),
            key_block=key_block.to(dev),
            key_offset=(j % bs)[None, :].to(dev),
            mask=mask.to(dev),
            out_index=out_index.to(dev),
        )

    def run(self, plan: TorchPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = kv_layer[:, 0], kv_layer[:, 1]
        k_cache[plan.slot_block, plan.slot_offset] = to_kv_dtype(k, kv_layer.dtype)
        v_cache[plan.slot_block, plan.slot_offset] = to_kv_dtype(v, kv_layer.dtype)
        keys = k_cache[plan.key_block, plan.key_offset].to(q.dtype)  # [B, max_ctx, Hkv, D] (fp8 dequantized)
        vals = v_cache[plan.key_block, plan.key_offset].to(q.dtype)
        qp = q[plan.q_index]  # [B, max_q, Hq, D]
        out = F.scaled_dot_product_attention(
            qp.transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2), attn_mask=plan.mask,
            enable_gqa=q.shape[1] != k.shape[1],
        )  # [B, Hq, max_q, D]
        nb, hq, max_q, d = out.shape
        return out.transpose(1, 2).reshape(nb * max_q, hq, d)[plan.out_index]
