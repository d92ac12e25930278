"""``TPGroup``: one rank's view of its worker's tensor-parallel group and the collectives the model
and the runner use.  Passed explicitly to every layer that communicates (never a global).

Backends: gloo on CPU (real processes, so CI runs TP for real); NCCL on GPUs, where the all-reduce
of the row-parallel layers may instead use PyTorch symmetric memory (``--tp-all-reduce symm_mem``:
a two-shot all-reduce through peer memory for messages up to its buffer, NCCL above).  Both are
safe inside CUDA graphs: each rank captures the same graphs in the same order (``DecodeGraphs``),
so the collectives recorded in them pair up at replay.  NVLink multicast is never used.

Collective order is the contract between ranks: every rank calls the same collectives in the same
order, which holds because every rank runs the same code on the same step description
(``ModelRunner.execute``).
"""

from __future__ import annotations

import datetime
import logging
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

INIT_TIMEOUT = datetime.timedelta(minutes=20)
"""Longest wait for every rank to join and for one collective (start-up includes weight loading)."""


class TPGroup:
    def __init__(self, rank: int, size: int, device: torch.device, all_reduce: str = "nccl") -> None:
        self.rank = rank
        self.size = size
        self.device = device
        self._symm: Optional[_SymmMemAllReduce] = None
        self._all_reduce_kind = all_reduce

    @staticmethod
    def single(device: torch.device) -> "TPGroup":
        """A group of one: every collective is the identity (no process group is created)."""
        return TPGroup(0, 1, device)

    @staticmethod
    def join(rank: int, size: int, device: torch.device, init_method: str, all_reduce: str = "auto") -> "TPGroup":
        """Join the group (blocks until every rank has): gloo for CPU ranks, NCCL for GPU ones."""
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size, timeout=INIT_TIMEOUT, **kwargs)
        group = TPGroup(rank, size, device, "nccl" if all_reduce == "auto" else all_reduce)
        if device.type == "cuda" and group._all_reduce_kind == "symm_mem":
            group._symm = _SymmMemAllReduce.create(device)
        return group

    def destroy(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks (in place when it can be; use the result)."""
        if self.size == 1:
            return x
        if self._symm is not None:
            out = self._symm.all_reduce(x)
            if out is not None:
                return out
        dist.all_reduce(x)
        return x

    def gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """[N, v] on every rank -> [N, size * v], rank-major along the last axis (every rank gets it)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``x`` on every rank (in place)."""
        if self.size > 1:
            dist.broadcast(x, src=0)
        return x

    def min_int(self, value: int) -> int:
        """The smallest ``value`` over the ranks (e.g. KV blocks every rank can hold)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())


class _SymmMemAllReduce:
    """PyTorch symmetric memory: a buffer every rank maps, and ``two_shot_all_reduce_`` over it
    (peer loads and stores over NVLink; no multicast).  Inputs larger than the buffer, or not bf16,
    go to NCCL.  Graph-safe: the copy in, the reduce and the copy out are plain kernels."""

    MAX_BYTES = 8 << 20

    def __init__(self, buffer: torch.Tensor, group_name: str) -> None:
        self.buffer = buffer
        self.group_name = group_name

    @staticmethod
    def create(device: torch.device) -> Optional["_SymmMemAllReduce"]:
        try:
            import torch.distributed._symmetric_memory as symm

            name = dist.group.WORLD.group_name
            if hasattr(symm, "enable_symm_mem_for_group"):
                symm.enable_symm_mem_for_group(name)
            buf = symm.empty(_SymmMemAllReduce.MAX_BYTES // 2, dtype=torch.bfloat16, device=device)
            symm.rendezvous(buf, name)
            return _SymmMemAllReduce(buf, name)
        except Exception as exc:  # noqa: BLE001 - an unsupported build or topology: NCCL it is
            log.warning("symmetric-memory all-reduce unavailable (%r); using NCCL", exc)
            return None

    def all_reduce(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        n = x.numel()
        if x.dtype != torch.bfloat16 or n > self.buffer.numel() or (n * 2) % 16:
            return None
        buf = self.buffer[:n]
        buf.copy_(x.reshape(-1))
        torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", self.group_name)
        return x.copy_(buf.view(x.shape))
