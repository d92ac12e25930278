"""Layers shared by every model family: RMSNorm, rotary embedding (with rope scaling), gated MLP,
GQA attention.  Tensors are flat over tokens: ``T`` is the number of tokens in the step's batch.

Tensor parallelism (``tp``, a ``TPGroup``): the qkv and gate/up projections are column-parallel
(each rank computes its heads and its slice of the MLP width), o and down are row-parallel (each
rank's partial product, summed by one all-reduce; a bias is added by rank 0 only).  KV heads are
split like the query heads, or replicated when there are fewer than ranks (``pdmesh.kv.shards``).
"""

from __future__ import annotations

import math
from typing import Optional, Protocol, Union

import torch
import torch.nn.functional as F
from torch import nn

from pdmesh.distributed.group import TPGroup
from pdmesh.kv.shards import local_kv_heads
from pdmesh.models.arch import ModelArch
from pdmesh.models.gemv import gemv, gemv_applies
from pdmesh.models.quant import QuantLinear


class AttentionContext(Protocol):
    """What a layer needs from the step's attention: passed explicitly, never global."""

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] (model dtype) -> [T, Hq, D]; stores k/v in the cache."""


class RMSNorm(nn.Module):
    """RMSNorm; ``fused`` (CUDA) runs FlashInfer's kernels instead of the float32 torch math."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, dim] or [T, H, dim] -> same shape and dtype (normalised in float32, as HF does)."""
        if self.fused:
            from flashinfer.norm import rmsnorm

            return rmsnorm(x.contiguous(), self.weight, self.eps)
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """residual <- x + residual; returns (norm(residual), residual).  x, residual: [T, dim].
        The fused kernel updates both tensors in place."""
        if self.fused:
            from flashinfer.norm import fused_add_rmsnorm

            fused_add_rmsnorm(x, residual, self.weight, self.eps)
            return x, residual
        residual = x + residual
        return self.forward(residual), residual


def rope_inv_freq(arch: ModelArch, max_len: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] (float32) and the attention scaling, per rope type."""
    dim, base = arch.head_dim, arch.rope_theta
    sc = arch.rope_scaling_dict
    kind = sc.get("rope_type", "default")
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if kind == "default":
        return inv, 1.0
    factor = float(sc.get("factor", 1.0))
    if kind == "linear":
        return inv / factor, 1.0
    if kind == "dynamic":
        # Static NTK: scaled for the longest length this engine serves (HF rescales per batch).
        orig = arch.max_position_embeddings
        if max_len > orig:
            base = base * ((factor * max_len / orig) - (factor - 1)) ** (dim / (dim - 2))
            inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv, 1.0
    if kind == "llama3":
        low, high = float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
        old = float(sc["original_max_position_embeddings"])
        low_wl, high_wl = old / low, old / high
        wavelen = 2 * math.pi / inv
        inv_l = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wavelen < high_wl) * ~(wavelen > low_wl)
        return torch.where(medium, smoothed, inv_l), 1.0
    if kind == "yarn":
        orig = sc.get("original_max_position_embeddings") or arch.max_position_embeddings

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attn = sc.get("attention_factor")
        if attn is None:
            m, m_all = sc.get("mscale"), sc.get("mscale_all_dim")
            attn = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        beta_fast, beta_slow = sc.get("beta_fast") or 32, sc.get("beta_slow") or 1

        def corr_dim(rot: float) -> float:
            return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

        lo, hi = corr_dim(beta_fast), corr_dim(beta_slow)
        if sc.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo), 0, 1)
        pos = base ** (torch.arange(0, dim, 2).float() / dim)
        extra_f = 1 - ramp
        inv = (1.0 / (factor * pos)) * (1 - extra_f) + (1.0 / pos) * extra_f
        return inv, float(attn)
    raise ValueError(f"unsupported rope_scaling type {kind!r}")


class RotaryEmbedding:
    """cos/sin tables for every position up to ``max_len``, computed once (float32)."""

    def __init__(self, arch: ModelArch, max_len: int, device: torch.device) -> None:
        inv, scale = rope_inv_freq(arch, max_len)
        t = torch.arange(max_len, dtype=torch.float32)
        freqs = torch.outer(t, inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * scale).to(device)
        self.sin = (emb.sin() * scale).to(device)
        self.max_len = max_len

        half = self.cos.shape[-1] // 2
        self.cos_sin_cache = torch.cat((self.cos[:, :half], self.sin[:, :half]), dim=-1).contiguous()
        """[max_len, D] float32, cos then sin: FlashInfer's fused rope layout."""
        self.fused = False

    def bind(self, positions: torch.Tensor, dtype: torch.dtype) -> "BoundRotary":
        """The rotation for this step's tokens (computed once, applied in every layer)."""
        if self.fused:
            return BoundRotary(positions, None, None, self.cos_sin_cache)
        return BoundRotary(positions, self.cos[positions].unsqueeze(1).to(dtype),
                           self.sin[positions].unsqueeze(1).to(dtype), None)


class BoundRotary:
    __slots__ = ("positions", "cos", "sin", "cos_sin_cache")

    def __init__(self, positions, cos, sin, cos_sin_cache) -> None:
        self.positions, self.cos, self.sin, self.cos_sin_cache = positions, cos, sin, cos_sin_cache

    def apply(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, Hq, D], k: [T, Hkv, D] -> rotated (rotate-half convention, HF Llama/Qwen)."""
        if self.cos_sin_cache is not None:
            from flashinfer.rope import apply_rope_with_cos_sin_cache_inplace

            # In place on the projection's output where heads sit packed in each row (the qkv
            # split): no copies, and k stays next to v for a single KV-store kernel.
            q, k = (x if x.stride(2) == 1 and x.stride(1) == x.shape[2] else x.contiguous() for x in (q, k))
            t, d = q.shape[0], q.shape[-1]
            apply_rope_with_cos_sin_cache_inplace(self.positions, q.view(t, -1), k.view(t, -1), d, self.cos_sin_cache, True)
            return q, k
        return apply_rotary(q, self.cos, self.sin), apply_rotary(k, self.cos, self.sin)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; cos/sin: [T, 1, D]; rotate-half convention (HF Llama/Qwen)."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


Projection = Union[nn.Linear, QuantLinear]
"""A projection layer: full precision, or quantized at load (``--quantization``)."""


def linear(x: torch.Tensor, lin: Projection, bias: Optional[torch.Tensor], use_gemv: bool, silu_mul: bool = False) -> torch.Tensor:
    """``x @ W^T + bias`` for x [T, K] and ``lin``'s weight W [N, K] (``lin``: nn.Linear, or a
    ``QuantLinear`` with 1-byte weights, ``--quantization``); ``use_gemv`` and one row on CUDA: a
    Triton GEMV (weight-only for a quantized layer).  ``silu_mul``: x is [T, 2K] gate|up and
    SiLU(gate)*up is applied first (inside the GEMV, else FlashInfer's kernel)."""
    if use_gemv and gemv_applies(x):
        return gemv(x, lin.weight, bias, silu_mul=silu_mul, scale=getattr(lin, "weight_scale", None))
    if silu_mul:
        from flashinfer.activation import silu_and_mul

        x = silu_and_mul(x)
    if isinstance(lin, QuantLinear):
        return lin.matmul(x, bias)
    return F.linear(x, lin.weight, bias)


def row_parallel(x: torch.Tensor, lin: Projection, tp: TPGroup, use_gemv: bool, silu_mul: bool = False,
                 reduce: bool = True) -> torch.Tensor:
    """A row-parallel projection: this rank's partial product (its bias only on rank 0), summed
    over the ranks (``reduce=False``: not summed; the caller sums it, e.g. with the next norm).
    A quantized layer's scales are this rank's own (its slice of K), which the sum composes."""
    y = linear(x, lin, lin.bias if tp.rank == 0 else None, use_gemv, silu_mul)
    return tp.all_reduce(y) if reduce else y


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul; ``fused`` (CUDA):
    FlashInfer's SiLU*mul kernel, and at one row Triton GEMVs with SiLU*mul inside the down one.
    Under TP each rank holds ``intermediate_size / tp`` of the width (gate and up alike)."""

    def __init__(self, arch: ModelArch, dtype: torch.dtype, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        self.inter = arch.intermediate_size // tp.size
        self.gate_up_proj = nn.Linear(arch.hidden_size, 2 * self.inter, bias=arch.mlp_bias, dtype=dtype)
        self.down_proj = nn.Linear(self.inter, arch.hidden_size, bias=arch.mlp_bias, dtype=dtype)
        self.fused = False

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden], summed over the ranks unless ``reduce`` is False."""
        if self.fused and gemv_applies(x):  # one row: GEMVs, the activation inside the down one
            gu = linear(x, self.gate_up_proj, self.gate_up_proj.bias, True)
            return row_parallel(gu, self.down_proj, self.tp, True, silu_mul=True, reduce=reduce)
        gu = self.gate_up_proj(x)
        if self.fused:
            return row_parallel(gu, self.down_proj, self.tp, False, silu_mul=True, reduce=reduce)
        gate, up = gu.split(self.inter, dim=-1)
        return row_parallel(F.silu(gate) * up, self.down_proj, self.tp, False, reduce=reduce)


class Attention(nn.Module):
    """GQA self-attention with fused qkv, optional per-head q/k RMSNorm (Qwen3) and rotary; under TP
    over this rank's query and KV heads."""

    def __init__(self, arch: ModelArch, layer_idx: int, dtype: torch.dtype, tp: TPGroup) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.tp = tp
        self.hq, self.hkv, self.d = arch.num_heads // tp.size, local_kv_heads(arch.num_kv_heads, tp.size), arch.head_dim
        self.qkv_proj = nn.Linear(arch.hidden_size, (self.hq + 2 * self.hkv) * self.d, bias=arch.qkv_bias, dtype=dtype)
        self.o_proj = nn.Linear(self.hq * self.d, arch.hidden_size, bias=arch.o_bias, dtype=dtype)
        if arch.qk_norm:
            self.q_norm: Optional[RMSNorm] = RMSNorm(self.d, arch.rms_norm_eps, dtype)
            self.k_norm: Optional[RMSNorm] = RMSNorm(self.d, arch.rms_norm_eps, dtype)
        else:
            self.q_norm = self.k_norm = None
        self.fused = False
        """CUDA: one-row projections run as Triton GEMVs (``pdmesh.models.gemv``)."""

    def _project(self, x: torch.Tensor, lin: Projection) -> torch.Tensor:
        return linear(x, lin, lin.bias, self.fused)

    def forward(self, x: torch.Tensor, rope: "BoundRotary", ctx: AttentionContext, reduce: bool = True) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden], summed over the ranks unless ``reduce`` is False."""
        t = x.shape[0]
        q, k, v = self._project(x, self.qkv_proj).split([self.hq * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1)
        q = q.view(t, self.hq, self.d)
        k = k.view(t, self.hkv, self.d)
        v = v.view(t, self.hkv, self.d)
        if self.q_norm is not None and self.k_norm is not None:  # both or neither (arch.qk_norm)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope.apply(q, k)
        out = ctx.attend(self.layer_idx, q, k, v)
        return row_parallel(out.reshape(t, self.hq * self.d), self.o_proj, self.tp, self.fused, reduce=reduce)
