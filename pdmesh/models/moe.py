"""Mixture-of-experts layer (Qwen3-MoE): a softmax router, top-k experts per token, each a gated
MLP; tokens are grouped by expert and every expert's rows go through one grouped matmul.

Routing is HF Qwen3-MoE's: ``softmax(x @ gate.T)`` in float32, the top ``k`` probabilities (and
their experts), divided by their sum with ``norm_topk_prob``, cast to the activations' dtype; a
token's output is ``sum_j w_j * down_e(silu(gate_e(x)) * up_e(x))`` over its ``k`` experts ``e``.

Experts are stored fused, as transformers 5 holds them: ``experts.gate_up_proj`` ``[E, 2I, H]``
(gate rows, then up rows) and ``experts.down_proj`` ``[E, H, I]``; checkpoints with one tensor per
expert (``experts.{e}.gate_proj.weight``...) load into them.

Two kernels compute the experts, with the same inputs and outputs:

* ``grouped_experts`` (CPU, and the reference everywhere): the (token, expert) pairs sorted by
  expert, one ``torch._grouped_mm`` per projection over all experts' rows (on CUDA, where that
  op wants bf16 and Hopper, one matmul per expert with rows: a reference, not the hot path), the
  weighted rows summed back per token with one ``index_add_`` (in expert order, as HF adds them).
* ``pdmesh.models.fused_moe.fused_experts`` (CUDA with Triton): the same sort done with device ops
  only (no host sync, so decode steps capture into CUDA graphs) and two Triton grouped GEMMs.

Parallelism (``ExpertSplit``): under tensor parallelism every rank holds every expert's slice
``[r * I/n, (r + 1) * I/n)`` of the expert width (column-parallel gate/up, row-parallel down); with
expert parallelism (``--enable-expert-parallel``) rank ``r`` holds experts ``[r * E/n, (r + 1) *
E/n)`` whole.  Either way the router is replicated, every rank sees every token (attention is
tensor-parallel, so hidden states are the same on every rank), computes the pairs its weights
serve — tokens are dispatched to a rank's experts by that selection — and one all-reduce combines
the partial outputs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pdmesh.distributed.group import TPGroup
from pdmesh.models.arch import ModelArch
from pdmesh.models.fused_moe import fused_experts, fused_moe_applies

EXPERT_TENSOR = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
"""A checkpoint tensor of one expert: (experts module, expert index, projection)."""


@dataclass(frozen=True)
class ExpertSplit:
    """Which experts, and which slice of each expert's width, one rank holds."""

    num_experts: int
    """Experts of the whole layer."""
    width: int
    """Width of one whole expert (``moe_intermediate_size``)."""
    first: int
    """First expert this rank holds."""
    count: int
    """Experts this rank holds (consecutive)."""
    start: int
    """First column of the expert width this rank holds."""
    size: int
    """Columns of the expert width this rank holds."""

    @staticmethod
    def of(arch: ModelArch, tp: TPGroup, expert_parallel: bool) -> "ExpertSplit":
        e, i, n, r = arch.num_experts, arch.moe_intermediate_size, tp.size, tp.rank
        if expert_parallel:
            return ExpertSplit(e, i, r * (e // n), e // n, 0, i)
        return ExpertSplit(e, i, 0, e, r * (i // n), i // n)

    def holds(self, expert: int) -> bool:
        return self.first <= expert < self.first + self.count


def expert_split_error(arch: ModelArch, tp: int, expert_parallel: bool) -> str:
    """Why the experts cannot be split over ``tp`` ranks ('' when they can)."""
    if arch.num_experts == 0:
        return "--enable-expert-parallel: the model has no experts" if expert_parallel else ""
    if expert_parallel and arch.num_experts % tp:
        return (f"--tensor-parallel-size {tp} with --enable-expert-parallel: the model's {arch.num_experts} experts "
                f"do not divide over {tp} ranks")
    if not expert_parallel and arch.moe_intermediate_size % tp:
        return (f"--tensor-parallel-size {tp}: the model's expert width {arch.moe_intermediate_size} does not divide "
                f"over {tp} ranks (--enable-expert-parallel splits whole experts instead)")
    return ""


def route(logits: torch.Tensor, top_k: int, renormalize: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, k] in ``dtype``, expert ids [T, k] int64), HF's way:
    softmax in float32, top-k, optionally renormalised."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(dtype), ids


def grouped_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor,
                    ids: torch.Tensor, first: int, grouped_mm: Optional[bool] = None) -> torch.Tensor:
    """The experts' output for every token, from the experts this rank holds.

    x [T, H]; gate_up [El, 2I, H]; down [El, H, I]; weights [T, k] (x's dtype); ids [T, k] global
    expert ids; this rank holds experts ``first .. first + El - 1`` (pairs routed elsewhere add
    nothing) -> [T, H] in x's dtype.  ``grouped_mm``: use ``torch._grouped_mm`` (default: on CPU).
    """
    t, k = ids.shape
    num_local, inter = gate_up.shape[0], down.shape[2]
    local = ids.reshape(-1) - first
    mine = (local >= 0) & (local < num_local)
    order = torch.argsort(torch.where(mine, local, num_local), stable=True)[: int(mine.sum())]
    expert = local[order]
    counts = torch.bincount(expert, minlength=num_local)
    rows = x[order // k]
    if grouped_mm is None:
        grouped_mm = x.device.type == "cpu" and hasattr(torch, "_grouped_mm")
    if grouped_mm:
        offs = torch.cumsum(counts, 0).to(torch.int32)
        gu = torch._grouped_mm(rows, gate_up.transpose(1, 2), offs=offs)
        h = F.silu(gu[:, :inter]) * gu[:, inter:]
        y = torch._grouped_mm(h, down.transpose(1, 2), offs=offs)
    else:  # the reference on CUDA (and torch without grouped matmuls): one matmul per expert with rows
        y = torch.empty_like(rows)
        start = 0
        for e, c in enumerate(counts.tolist()):
            if c:
                gu = F.linear(rows[start:start + c], gate_up[e])
                y[start:start + c] = F.linear(F.silu(gu[:, :inter]) * gu[:, inter:], down[e])
                start += c
    y = y * weights.reshape(-1)[order].unsqueeze(1)
    return torch.zeros_like(x).index_add_(0, order // k, y)


class FusedExperts(nn.Module):
    """This rank's experts: ``gate_up_proj`` [El, 2 * Il, H] and ``down_proj`` [El, H, Il]."""

    def __init__(self, arch: ModelArch, split: ExpertSplit, dtype: torch.dtype) -> None:
        super().__init__()
        self.split = split
        h = arch.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(split.count, 2 * split.size, h, dtype=dtype))
        self.down_proj = nn.Parameter(torch.empty(split.count, h, split.size, dtype=dtype))

    def full_shape(self, what: str) -> tuple[int, ...]:
        """Shape of ``gate_up_proj`` / ``down_proj`` holding every expert whole (TP 1)."""
        s, h = self.split, self.gate_up_proj.shape[2]
        return (s.num_experts, 2 * s.width, h) if what == "gate_up_proj" else (s.num_experts, h, s.width)

    @torch.no_grad()
    def copy_full(self, what: str, full: torch.Tensor) -> None:
        """Copy this rank's part of a tensor holding every expert whole; ValueError on a shape mismatch."""
        if tuple(full.shape) != self.full_shape(what):
            raise ValueError(f"experts.{what}: checkpoint shape {tuple(full.shape)} != expected {self.full_shape(what)}")
        s = self.split
        mine = full[s.first:s.first + s.count]
        if what == "gate_up_proj":
            self.gate_up_proj[:, :s.size].copy_(mine[:, s.start:s.start + s.size])
            self.gate_up_proj[:, s.size:].copy_(mine[:, s.width + s.start:s.width + s.start + s.size])
        else:
            self.down_proj.copy_(mine[:, :, s.start:s.start + s.size])

    @torch.no_grad()
    def copy_expert(self, expert: int, proj: str, tensor: torch.Tensor) -> None:
        """Copy one expert's checkpoint tensor (``gate_proj``/``up_proj`` [I, H], ``down_proj`` [H, I])
        if this rank holds that expert; ValueError on a bad expert index or shape."""
        s, h = self.split, self.gate_up_proj.shape[2]
        if not 0 <= expert < s.num_experts:
            raise ValueError(f"expert {expert} of a layer with {s.num_experts} experts")
        want = (h, s.width) if proj == "down_proj" else (s.width, h)
        if tuple(tensor.shape) != want:
            raise ValueError(f"experts.{expert}.{proj}: checkpoint shape {tuple(tensor.shape)} != expected {want}")
        if not s.holds(expert):
            return
        e = expert - s.first
        if proj == "down_proj":
            self.down_proj[e].copy_(tensor[:, s.start:s.start + s.size])
        else:
            rows = slice(0, s.size) if proj == "gate_proj" else slice(s.size, 2 * s.size)
            self.gate_up_proj[e, rows].copy_(tensor[s.start:s.start + s.size])

    def checkpoint_names(self, prefix: str) -> set[str]:
        """HF names of every expert's tensors (``prefix`` is this module's name)."""
        return {f"{prefix}.{e}.{p}.weight" for e in range(self.split.num_experts)
                for p in ("gate_proj", "up_proj", "down_proj")}


class SparseMoeBlock(nn.Module):
    """Router + experts (+ the all-reduce that combines the ranks' partial outputs).

    ``kernel``: 'auto' (Triton's grouped GEMMs on CUDA when Triton imports, else grouped torch
    matmuls), 'torch' or 'triton'."""

    def __init__(self, arch: ModelArch, dtype: torch.dtype, tp: TPGroup, expert_parallel: bool) -> None:
        super().__init__()
        self.tp = tp
        self.top_k = arch.num_experts_per_tok
        self.renormalize = arch.norm_topk_prob
        self.gate = nn.Linear(arch.hidden_size, arch.num_experts, bias=False, dtype=dtype)
        self.experts = FusedExperts(arch, ExpertSplit.of(arch, tp, expert_parallel), dtype)
        self.kernel = "auto"

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """x [T, H] -> [T, H], summed over the ranks unless ``reduce`` is False (the caller sums
        this rank's partial output, e.g. with the next norm: ``TPGroup.all_reduce_add_norm``)."""
        weights, ids = route(F.linear(x, self.gate.weight), self.top_k, self.renormalize, x.dtype)
        out = self.experts_out(x, weights, ids)
        return self.tp.all_reduce(out) if reduce else out

    def experts_out(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                    kernel: Optional[str] = None) -> torch.Tensor:
        """This rank's share of the output for routed tokens (before the all-reduce)."""
        ex = self.experts
        kernel = kernel or self.kernel
        if kernel == "auto":
            kernel = "triton" if fused_moe_applies(x) else "torch"
        if kernel == "triton":
            return fused_experts(x, ex.gate_up_proj, ex.down_proj, weights, ids, ex.split.first,
                                 every_expert=ex.split.count == ex.split.num_experts)
        return grouped_experts(x, ex.gate_up_proj, ex.down_proj, weights, ids, ex.split.first)
