"""``TPGroup``: one rank's view of its worker's tensor-parallel group and the collectives the model
and the runner use.  Passed explicitly to every layer that communicates (never a global).

Backends: gloo on CPU (real processes, so CI runs TP for real); NCCL on GPUs, where the all-reduce
of the row-parallel layers may instead use PyTorch symmetric memory (``--tp-all-reduce symm_mem``:
one-shot / two-shot all-reduce through peer memory for messages up to its buffer, NCCL above) or
FlashInfer's TensorRT-LLM all-reduce fused with the residual add and RMSNorm that follow it
(``--tp-all-reduce flashinfer``, ``pdmesh.distributed.fused``; up to its token capacity, NCCL and
the separate norm above).  All are safe inside CUDA graphs: each rank captures the same graphs in
the same order (``DecodeGraphs``), so the collectives recorded in them pair up at replay.  NVLink
multicast is never used.  An implementation that cannot start on every rank (a missing library, an
unsupported topology, a result that differs from NCCL's) is given up on every rank alike, and
``all_reduce_impl`` says which one runs.

Collective order is the contract between ranks: every rank calls the same collectives in the same
order, which holds because every rank runs the same code on the same step description
(``ModelRunner.execute``).
"""

from __future__ import annotations

import datetime
import logging
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist

if TYPE_CHECKING:  # imported at run time only by enable_fused_norm (GPUs with --tp-all-reduce flashinfer)
    from pdmesh.distributed.fused import FusedAllReduceNorm

log = logging.getLogger(__name__)

INIT_TIMEOUT = datetime.timedelta(minutes=20)
"""Longest wait for every rank to join and for one collective (start-up includes weight loading)."""


class TPGroup:
    def __init__(self, rank: int, size: int, device: torch.device, all_reduce: str = "nccl") -> None:
        self.rank = rank
        self.size = size
        self.device = device
        self._symm: Optional[_SymmMemAllReduce] = None
        self._fused: Optional[FusedAllReduceNorm] = None  # once enable_fused_norm() succeeded
        self._all_reduce_kind = all_reduce

    @staticmethod
    def single(device: torch.device) -> "TPGroup":
        """A group of one: every collective is the identity (no process group is created)."""
        return TPGroup(0, 1, device)

    @staticmethod
    def join(rank: int, size: int, device: torch.device, init_method: str, all_reduce: str = "auto") -> "TPGroup":
        """Join the group (blocks until every rank has): gloo for CPU ranks, NCCL for GPU ones."""
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size, timeout=INIT_TIMEOUT,
                                device_id=device if device.type == "cuda" else None)
        group = TPGroup(rank, size, device, "nccl" if all_reduce == "auto" else all_reduce)
        if device.type == "cuda" and group._all_reduce_kind == "symm_mem":
            group._symm = _SymmMemAllReduce.create(device)
            if group._symm is None:
                group._all_reduce_kind = "nccl"
        return group

    @property
    def all_reduce_impl(self) -> str:
        """The all-reduce that runs: 'none' (one rank), 'gloo', 'nccl', 'symm_mem' or 'flashinfer'
        (which falls back as its docstring says; asked-for implementations that could not start
        read as 'nccl')."""
        if self.size == 1:
            return "none"
        if self.device.type != "cuda":
            return "gloo"
        if self._all_reduce_kind == "flashinfer" and self._fused is None:
            return "nccl"
        return self._all_reduce_kind

    def enable_fused_norm(self, max_tokens: int, hidden: int, dtype: torch.dtype) -> None:
        """With ``--tp-all-reduce flashinfer`` on GPUs: set up the fused all-reduce + residual add +
        RMSNorm for up to ``max_tokens`` rows of ``hidden`` (a collective: every rank calls it)."""
        if self.size == 1 or self.device.type != "cuda" or self._all_reduce_kind != "flashinfer":
            return
        from pdmesh.distributed.fused import FusedAllReduceNorm

        self._fused = FusedAllReduceNorm.create(self, max_tokens, hidden, dtype)

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

    def all_reduce_add_norm(self, x: torch.Tensor, residual: torch.Tensor, norm) -> tuple[torch.Tensor, torch.Tensor]:
        """``residual <- sum over ranks of x + residual``; returns ``(norm(residual), residual)``.
        x, residual: [T, hidden]; ``norm`` an ``RMSNorm`` (its ``add_forward`` is the unfused path,
        which may update x and residual in place).  One kernel with FlashInfer's fused all-reduce
        where it applies; the same collectives on every rank either way (decided by shapes)."""
        if self._fused is not None:
            out = self._fused.run(x, residual, norm.weight, norm.eps)
            if out is not None:
                return out
        return norm.add_forward(self.all_reduce(x), residual)

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
    """PyTorch symmetric memory: a buffer every rank maps, and an all-reduce through peer loads and
    stores over NVLink (no multicast): one-shot (each rank reads every peer's whole buffer) up to
    ``ONE_SHOT_MAX`` bytes, two-shot (reduce-scatter + all-gather) above, NCCL beyond the buffer or
    for dtypes other than bf16.  Graph-safe: the copy in, the reduce and the copy out are kernels.
    ``create`` checks one reduction against NCCL on every rank and gives up (all ranks alike) on any
    error or difference."""

    MAX_BYTES = 8 << 20
    ONE_SHOT_MAX = 256 << 10

    def __init__(self, buffer: torch.Tensor, group_name: str) -> None:
        self.buffer = buffer
        self.group_name = group_name

    @staticmethod
    def create(device: torch.device) -> Optional["_SymmMemAllReduce"]:
        ok, inst = 1, None
        try:
            import torch.distributed._symmetric_memory as symm

            world = dist.group.WORLD
            assert world is not None  # join() created the process group before this
            name = world.group_name
            if hasattr(symm, "enable_symm_mem_for_group"):
                symm.enable_symm_mem_for_group(name)
            buf = symm.empty(_SymmMemAllReduce.MAX_BYTES // 2, dtype=torch.bfloat16, device=device)
            symm.rendezvous(buf, name)
            inst = _SymmMemAllReduce(buf, name)
            for n in (4096, 1 << 20):  # one-shot and two-shot sizes, against NCCL
                x = torch.randn(n, device=device).to(torch.bfloat16)
                want = x.clone()
                dist.all_reduce(want)
                got = inst.all_reduce(x.clone())
                if got is None or not torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2):
                    raise RuntimeError("symmetric-memory all-reduce differs from NCCL's")
        except Exception as exc:  # noqa: BLE001 - an unsupported build or topology: NCCL it is
            log.warning("symmetric-memory all-reduce unavailable (%r); using NCCL", exc)
            ok = 0
        t = torch.tensor([ok], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)  # every rank takes the same path
        return inst if int(t.item()) == 1 else None

    def all_reduce(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        n = x.numel()
        if x.dtype != torch.bfloat16 or n > self.buffer.numel() or (n * 2) % 16:
            return None
        buf = self.buffer[:n]
        buf.copy_(x.reshape(-1))
        if n * 2 <= self.ONE_SHOT_MAX:
            return x.copy_(torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", self.group_name).view(x.shape))
        torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", self.group_name)
        return x.copy_(buf.view(x.shape))
