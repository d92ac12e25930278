"""Fused mixture-of-experts on CUDA: the (token, expert) pairs sorted into expert-major blocks with
device ops only, then two Triton grouped GEMMs — no Python loop over experts, no host sync (decode
steps capture into CUDA graphs).

``align`` (torch ops) lays the pairs out expert by expert, each expert's run padded to a multiple
of ``BLOCK_M`` rows, so that every ``BLOCK_M``-row block belongs to one expert:

* ``sorted_ids [capacity]`` int32: the pair index (``token * top_k + j``) of each row, or
  ``num_pairs`` for padding rows (and for pairs whose expert another rank holds);
* ``block_expert [capacity / BLOCK_M]`` int32: the local expert of each block;
* ``total [1]`` int32: rows in use (the blocks past it exit at once).

``capacity`` is a bound fixed by the shapes (pairs + experts * (BLOCK_M - 1)), so the launch grid
never depends on the routing.

Kernel 1: ``mid[pair] = x[pair // top_k] @ gate_up[e].T`` ([pairs, 2I]).  Kernel 2:
``out[pair] = w[pair] * (silu(mid_gate) * mid_up)[pair] @ down[e].T`` ([pairs, H]; the activation
is computed while loading, as the GEMV's is); then the ``top_k`` rows of each token are summed.
Accumulation is float32; inputs and outputs are the model's dtype.  The tile shapes come from
``tiles_for`` (decode: 16-row blocks, the weights streamed once per routed expert; prefill: larger
tiles); ``benchmarks/gpu_moe.py`` measures them and the floor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


@dataclass(frozen=True)
class Tiles:
    """Tile shape and launch options of the grouped GEMMs."""

    block_m: int
    """Rows (pairs) per block; every block belongs to one expert."""
    block_n: int
    """Output columns per program."""
    block_k: int
    """Reduction step."""
    group_m: int = 1
    """Row blocks that share weight tiles in L2 (programs ordered in groups of this many)."""
    num_warps: int = 4
    num_stages: int = 3


def tiles_for(num_pairs: int, num_local_experts: int) -> Tiles:
    """Tiles by the mean rows per expert (decode: about one; prefill: hundreds)."""
    per_expert = num_pairs / max(1, num_local_experts)
    if per_expert <= 16:
        return Tiles(16, 64, 128, 1, 4, 4)
    if per_expert <= 64:
        return Tiles(32, 64, 128, 4, 4, 3)
    if per_expert <= 256:
        return Tiles(64, 128, 64, 8, 4, 3)
    return Tiles(128, 128, 64, 8, 8, 3)


def fused_moe_applies(x: torch.Tensor) -> bool:
    """Whether ``fused_experts`` serves this input: on CUDA, with Triton installed."""
    return triton is not None and x.is_cuda


def align(ids: torch.Tensor, first: int, num_local: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [T, k] global expert ids -> (sorted_ids, block_expert, total) as the module docstring
    says, for the experts ``first .. first + num_local - 1``.  Pairs keep their order within an
    expert (stable sort)."""
    flat = ids.reshape(-1)
    n, dev = flat.numel(), flat.device
    local = flat - first
    key = torch.where((local >= 0) & (local < num_local), local, num_local)
    counts = torch.zeros(num_local + 1, dtype=torch.int64, device=dev).scatter_add_(0, key, torch.ones_like(key))
    padded = (counts + block_m - 1) // block_m * block_m
    padded[num_local] = 0
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    raw_start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(key, stable=True)
    skey = key[order]
    capacity = -(-(n + min(n, num_local) * (block_m - 1)) // block_m) * block_m
    dest = pad_start[skey] + torch.arange(n, device=dev) - raw_start[skey]
    dest = torch.where(skey < num_local, dest, capacity)  # pairs of other ranks' experts: a dump slot
    sorted_ids = torch.full((capacity + 1,), n, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    starts = torch.arange(0, capacity, block_m, device=dev)
    block_expert = torch.searchsorted(pad_end[:num_local], starts, right=True).clamp_(max=num_local - 1).to(torch.int32)
    return sorted_ids[:capacity], block_expert, pad_end[num_local:].to(torch.int32)


if triton is not None:

    @triton.jit
    def _moe_gemm(a_ptr, b_ptr, c_ptr, w_ptr, sorted_ptr, block_expert_ptr, total_ptr,
                  num_pairs, capacity, n, k, stride_am, stride_be, stride_bn, stride_bk, stride_cm,
                  TOP_K: tl.constexpr, GATHER: tl.constexpr, SILU_MUL: tl.constexpr, MUL_WEIGHT: tl.constexpr,
                  IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(capacity, BLOCK_M)
        num_pid_n = tl.cdiv(n, BLOCK_N)
        in_group = GROUP_M * num_pid_n
        first_m = (pid // in_group) * GROUP_M
        group_size = min(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % in_group) % group_size
        pid_n = (pid % in_group) // group_size
        if pid_m * BLOCK_M >= tl.load(total_ptr):
            return
        pair = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        row_ok = pair < num_pairs
        a_row = pair // TOP_K if GATHER else pair
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n
        offs_k = tl.arange(0, BLOCK_K)
        a_rows = a_ptr + a_row[:, None].to(tl.int64) * stride_am
        b_cols = b_ptr + expert * stride_be + offs_n[None, :].to(tl.int64) * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < k
            a_mask = row_ok[:, None] & k_ok[None, :]
            if SILU_MUL:  # a = silu(gate) * up, gate and up side by side in each row of a_ptr
                g = tl.load(a_rows + kk[None, :], mask=a_mask, other=0.0).to(tl.float32)
                u = tl.load(a_rows + k + kk[None, :], mask=a_mask, other=0.0).to(tl.float32)
                a = (g / (1.0 + tl.exp(-g)) * u).to(b_ptr.dtype.element_ty)
            else:
                a = tl.load(a_rows + kk[None, :], mask=a_mask, other=0.0)
            b = tl.load(b_cols + kk[:, None] * stride_bk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(a, b, input_precision="ieee")
            else:
                acc += tl.dot(a, b)
        if MUL_WEIGHT:
            acc = acc * tl.load(w_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        c = c_ptr + pair[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def _gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, w: Optional[torch.Tensor], routing, top_k: int,
          gather: bool, silu_mul: bool, tiles: Tiles) -> None:
    sorted_ids, block_expert, total = routing
    capacity, n, k = sorted_ids.numel(), b.shape[1], b.shape[2]
    grid = (triton.cdiv(capacity, tiles.block_m) * triton.cdiv(n, tiles.block_n),)
    _moe_gemm[grid](a, b, c, w if w is not None else c, sorted_ids, block_expert, total,
                    c.shape[0], capacity, n, k, a.stride(0), b.stride(0), b.stride(1), b.stride(2), c.stride(0),
                    TOP_K=top_k, GATHER=gather, SILU_MUL=silu_mul, MUL_WEIGHT=w is not None,
                    IEEE=a.dtype == torch.float32, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
                    BLOCK_K=tiles.block_k, GROUP_M=tiles.group_m, num_warps=tiles.num_warps,
                    num_stages=tiles.num_stages)


def fused_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                  first: int, every_expert: bool = True, tiles: Optional[Tiles] = None) -> torch.Tensor:
    """``pdmesh.models.moe.grouped_experts``'s contract on CUDA: x [T, H]; gate_up [El, 2I, H];
    down [El, H, I]; weights [T, k] (x's dtype); ids [T, k] global expert ids; experts ``first ..
    first + El - 1`` are this rank's (``every_expert``: they are all of them, so every pair is
    computed here) -> [T, H] in x's dtype."""
    t, top_k = ids.shape
    num_local, two_i, h = gate_up.shape
    pairs = t * top_k
    tiles = tiles or tiles_for(pairs, num_local)
    routing = align(ids, first, num_local, tiles.block_m)
    mid = torch.empty((pairs, two_i), dtype=x.dtype, device=x.device)
    _gemm(x, gate_up, mid, None, routing, top_k, True, False, tiles)
    # rows of pairs routed to other ranks' experts are never written: they must add nothing
    out = (torch.empty if every_expert else torch.zeros)((pairs, h), dtype=x.dtype, device=x.device)
    _gemm(mid, down, out, weights.reshape(-1).contiguous(), routing, top_k, False, True, tiles)
    return out.view(t, top_k, h).sum(dim=1)
