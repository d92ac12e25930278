"""The attention-backend contract: ``plan()`` once per step, ``run()`` per layer.

A step's batch is flat over tokens: sequence ``b`` contributes ``query_lens[b]`` consecutive
tokens (its new tokens this step) and, after the step, has ``context_lens[b]`` tokens in the KV
cache (its previously computed tokens plus the new ones).  The new tokens' K/V are stored into the
paged cache at ``slot_mapping`` (slot = block_id * block_size + offset) before attending.

Invariants every backend keeps:
* ``run`` stores the whole batch's new K/V for the layer before any query of the layer attends, so
  a sequence may read blocks another sequence of the same step is filling.
* Query token ``i`` of sequence ``b`` sits at absolute position
  ``context_lens[b] - query_lens[b] + i`` and attends causally to positions ``<=`` its own.
* Nothing is global: plans are values returned by ``plan`` and passed back to ``run``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Sequence, Union

import numpy as np
import numpy.typing as npt
import torch


@dataclass(frozen=True)
class BatchLayout:
    """Host-side description of one step's batch (built by the model runner)."""

    query_lens: list[int]
    """New tokens per sequence this step (1 for a decode)."""
    context_lens: list[int]
    """Tokens in the cache per sequence after this step."""
    block_tables: Sequence[Union[Sequence[int], npt.NDArray[np.int32]]]
    """KV block ids per sequence, covering context_lens (int32 arrays from the runner)."""
    slot_mapping: torch.Tensor
    """[T] int64 on the model's device: cache slot of each new token (block * block_size + offset)."""
    block_size: int
    """Tokens per block."""

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens)

    def as_decode_rows(self) -> "BatchLayout":
        """The same tokens as one-query rows: query token ``i`` of sequence ``b`` becomes a row of
        its own with context ``context_lens[b] - query_lens[b] + i + 1`` over ``b``'s block table
        (causal by construction).  A verify step of speculative decoding (1 + K tokens per
        sequence) then runs as a decode step: the decode kernels and their CUDA graphs, at the
        price of reading each sequence's KV 1 + K times (it pays at small batches)."""
        ctx: list[int] = []
        tables: list = []
        for q, c, t in zip(self.query_lens, self.context_lens, self.block_tables):
            ctx.extend(range(c - q + 1, c + 1))
            tables.extend([t] * q)
        return BatchLayout([1] * len(ctx), ctx, tables, self.slot_mapping, self.block_size)


class BaseAttentionBackend(ABC):
    """Paged attention over a KV pool laid out ``[num_blocks, 2, block_size, Hkv, D]`` per layer."""

    name: str = "base"

    @abstractmethod
    def plan(self, batch: BatchLayout) -> Any:
        """Precompute everything that is the same for every layer of this step."""

    @abstractmethod
    def run(self, plan: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] (model dtype); kv_layer: [N, 2, bs, Hkv, D].

        Stores k/v at the plan's slots, then returns attention output [T, Hq, D].
        """


class StepAttention:
    """The per-step ``AttentionContext`` handed to the model: backend + plan + KV pool."""

    __slots__ = ("backend", "plan", "kv")

    def __init__(self, backend: BaseAttentionBackend, plan: Any, kv: torch.Tensor) -> None:
        self.backend, self.plan, self.kv = backend, plan, kv

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.backend.run(self.plan, q, k, v, self.kv[layer_idx])
