"""One-row matmul (decode at batch 1) as a Triton GEMV: ``y[N] = W[N, K] @ x[K] (+ bias)``.

At one row a projection is a pure weight stream; cuBLAS's kernels for these shapes leave part of
HBM bandwidth unused on the smaller projections (split-K plus a reduce kernel) and cannot take the
gated activation as a prologue.  This kernel reads each weight tile once with an evict-first hint,
accumulates in float32 (1-byte fp8/int8 weights are converted as they load and scaled per row at the
end: weight-only quantization at batch 1), and optionally computes ``silu(gate) * up`` from a ``[2K]`` input while
loading it (the MLP's down projection without a separate activation kernel).

Callers check ``gemv_applies`` (Triton present, CUDA, one row) and otherwise use ``F.linear``.
"""

from __future__ import annotations

from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


if triton is not None:

    @triton.jit
    def _gemv_kernel(w_ptr, x_ptr, b_ptr, s_ptr, y_ptr, n, k, stride_w,
                     HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr, HAS_SCALE: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < k
            w = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_w + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0, eviction_policy="evict_first")
            if SILU_MUL:
                g = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
                u = tl.load(x_ptr + k + cols, mask=col_ok, other=0.0).to(tl.float32)
                # round the activation to the input dtype, as the unfused kernel's output is
                x = (g / (1.0 + tl.exp(-g)) * u).to(x_ptr.dtype.element_ty).to(tl.float32)
            else:
                x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_SCALE:  # a 1-byte weight (fp8 or int8) with one scale per output row
            y *= tl.load(s_ptr + rows, mask=row_ok, other=0.0)
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


def _config(n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for an [n, k] weight, from a sweep on an H200
    (``benchmarks/gpu_kernels.py --only gemv``; results/README.md)."""
    if k >= 8192:
        return 8, 1024, 4
    if n > 4096 and k <= 1024:
        return 8, 256, 4
    if n <= 1024 and k > 2048:
        return 2, 1024, 8
    return 2, 1024, 4


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, silu_mul: bool = False,
         config: Optional[tuple[int, int, int]] = None, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x: [1, K] (or [1, 2K] with ``silu_mul``: gate then up), weight: [N, K], bias: [N] or None,
    on one CUDA device -> [1, N] in x's dtype.  The weight is in x's dtype, or (weight-only
    quantization) fp8 e4m3 / int8 with ``scale`` [N] float32 per output row."""
    n, k = weight.shape
    if x.shape != (1, 2 * k if silu_mul else k) or not x.is_contiguous() or weight.stride(1) != 1:
        raise ValueError(f"gemv: x {tuple(x.shape)} does not fit weight {tuple(weight.shape)}")
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    block_n, block_k, warps = config or _config(n, k)
    _gemv_kernel[(triton.cdiv(n, block_n),)](weight, x, bias if bias is not None else x, scale if scale is not None else x,
                                             y, n, k, weight.stride(0), HAS_BIAS=bias is not None, SILU_MUL=silu_mul,
                                             HAS_SCALE=scale is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return y


def gemv_applies(x: torch.Tensor) -> bool:
    """Whether ``gemv`` serves this input: one row, on CUDA, with Triton installed."""
    return triton is not None and x.is_cuda and x.dim() == 2 and x.shape[0] == 1
