"""``FusedAllReduceNorm``: FlashInfer's TensorRT-LLM all-reduce fused with the residual add and the
RMSNorm that follow every row-parallel projection (``--tp-all-reduce flashinfer``, GPUs only).

One kernel per norm instead of NCCL's all-reduce plus FlashInfer's ``fused_add_rmsnorm``: each rank
writes its partial sums into a workspace every rank maps (Lamport flags, one-shot or two-shot by
FlashInfer's size heuristic), reduces, adds the residual and normalises.  Graph-safe (no host
synchronisation), so decode graphs capture it like NCCL's all-reduce.

Defensive by construction: ``create`` is a collective that every rank calls; it gives up on every
rank alike (the group then uses NCCL and the separate norm) when FlashInfer or its workspace is
unavailable, when a rank's GPU index is not its rank (FlashInfer's workspace maps rank r to
``cuda:r``), or when one fused step on random data differs from NCCL + the unfused norm.  ``run``
declines (returns None) inputs it was not sized for (more rows than ``max_tokens``, another dtype);
that depends only on shapes, which every rank shares, so all ranks take the same path.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class FusedAllReduceNorm:
    def __init__(self, workspace, rank: int, size: int, max_tokens: int, hidden: int, dtype: torch.dtype) -> None:
        self.workspace = workspace
        self.rank = rank
        self.size = size
        self.max_tokens = max_tokens
        self.hidden = hidden
        self.dtype = dtype

    @staticmethod
    def create(tp, max_tokens: int, hidden: int, dtype: torch.dtype) -> Optional["FusedAllReduceNorm"]:
        """Every rank of ``tp`` (a ``TPGroup``) calls this; all get an instance or all get None."""
        inst, why = None, ""
        try:  # preconditions first, agreed before any rank enters the workspace's collectives
            import flashinfer.comm as comm

            if tp.device.index != tp.rank:
                raise RuntimeError(f"rank {tp.rank} is on {tp.device} (FlashInfer's workspace needs rank r on cuda:r)")
        except Exception as exc:  # noqa: BLE001
            why = repr(exc)[:500]
        if not tp.min_int(0 if why else 1):
            log.warning("FlashInfer fused all-reduce + RMSNorm unavailable (%s); using NCCL and the separate norm",
                        why or "another rank cannot start it")
            return None
        try:
            with torch.cuda.device(tp.device):
                ws = comm.create_allreduce_fusion_workspace(backend="trtllm", world_size=tp.size, rank=tp.rank,
                                                            max_token_num=max_tokens, hidden_dim=hidden, dtype=dtype)
            inst = FusedAllReduceNorm(ws, tp.rank, tp.size, max_tokens, hidden, dtype)
            inst._check(tp)
        except Exception as exc:  # noqa: BLE001 - an unsupported build or topology: NCCL it is
            why = repr(exc)[:500]
            inst = None
        agreed = tp.min_int(0 if inst is None else 1)
        if not agreed:
            log.warning("FlashInfer fused all-reduce + RMSNorm unavailable (%s); using NCCL and the separate norm",
                        why or "another rank could not start it")
            return None
        log.info("FlashInfer fused all-reduce + residual + RMSNorm for up to %d rows of %d", max_tokens, hidden)
        return inst

    def _check(self, tp) -> None:
        """One fused step on random data against NCCL's all-reduce + the float32 reference norm."""
        mine = torch.Generator(device=tp.device).manual_seed(1234 + tp.rank)  # partial sums differ per rank
        same = torch.Generator(device=tp.device).manual_seed(99)  # the residual and the norm weight do not
        for rows in (1, min(self.max_tokens, 64)):
            x = torch.randn(rows, self.hidden, device=tp.device, generator=mine).to(self.dtype)
            res = torch.randn(rows, self.hidden, device=tp.device, generator=same).to(self.dtype)
            w = torch.rand(self.hidden, device=tp.device, generator=same).to(self.dtype) + 0.5
            summed = x.clone()
            dist.all_reduce(summed)
            want_res = (summed.float() + res.float())
            want = want_res * torch.rsqrt(want_res.pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()
            got = self.run(x, res.clone(), w, 1e-6)
            if got is None:
                raise RuntimeError("the fused all-reduce declined its own check")
            normed, residual = got
            torch.cuda.synchronize(tp.device)
            for name, a, b in (("residual", residual, want_res), ("norm", normed, want)):
                err = ((a.float() - b).norm() / b.norm()).item()
                if not err < 2e-2:
                    raise RuntimeError(f"fused all-reduce {name} differs from NCCL's by {err:.3g} (relative)")

    def run(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
            eps: float) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """x (this rank's partial sums), residual: [T, hidden] -> (norm(sum x + residual), sum x +
        residual), new tensors; None when the input is not one it was sized for."""
        import flashinfer.comm as comm

        if (x.dim() != 2 or x.shape[0] > self.max_tokens or x.shape[1] != self.hidden or x.dtype != self.dtype
                or residual.dtype != self.dtype):
            return None
        x = x.contiguous()
        residual_in = residual.contiguous()
        norm_out = torch.empty_like(x)
        residual_out = torch.empty_like(x)
        comm.allreduce_fusion(input=x, workspace=self.workspace, pattern=comm.AllReduceFusionPattern.kARResidualRMSNorm,
                              launch_with_pdl=False, residual_out=residual_out, norm_out=norm_out,
                              residual_in=residual_in, rms_gamma=weight, rms_eps=eps)
        return norm_out, residual_out
