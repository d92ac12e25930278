"""Layers shared by every model family: RMSNorm, rotary embedding (with rope scaling), gated MLP,
GQA attention.  Tensors are flat over tokens: ``T`` is the number of tokens in the step's batch.
"""

from __future__ import annotations

import math
from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from pdmesh.models.arch import ModelArch
from pdmesh.models.gemv import gemv, gemv_applies


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


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul; ``fused`` (CUDA):
    FlashInfer's SiLU*mul kernel, and at one row Triton GEMVs with SiLU*mul inside the down one."""

    def __init__(self, arch: ModelArch, dtype: torch.dtype) -> None:
        super().__init__()
        self.inter = arch.intermediate_size
        self.gate_up_proj = nn.Linear(arch.hidden_size, 2 * arch.intermediate_size, bias=arch.mlp_bias, dtype=dtype)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=arch.mlp_bias, dtype=dtype)
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and gemv_applies(x):  # one row: GEMVs, the activation inside the down one
            gu = gemv(x, self.gate_up_proj.weight, self.gate_up_proj.bias)
            return gemv(gu, self.down_proj.weight, self.down_proj.bias, silu_mul=True)
        gu = self.gate_up_proj(x)
        if self.fused:
            from flashinfer.activation import silu_and_mul

            return self.down_proj(silu_and_mul(gu))
        gate, up = gu.split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Attention(nn.Module):
    """GQA self-attention with fused qkv, optional per-head q/k RMSNorm (Qwen3) and rotary."""

    def __init__(self, arch: ModelArch, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.hq, self.hkv, self.d = arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.qkv_proj = nn.Linear(arch.hidden_size, (self.hq + 2 * self.hkv) * self.d, bias=arch.qkv_bias, dtype=dtype)
        self.o_proj = nn.Linear(self.hq * self.d, arch.hidden_size, bias=arch.o_bias, dtype=dtype)
        if arch.qk_norm:
            self.q_norm: Optional[RMSNorm] = RMSNorm(self.d, arch.rms_norm_eps, dtype)
            self.k_norm: Optional[RMSNorm] = RMSNorm(self.d, arch.rms_norm_eps, dtype)
        else:
            self.q_norm = self.k_norm = None
        self.fused = False
        """CUDA: one-row projections run as Triton GEMVs (``pdmesh.models.gemv``)."""

    def _project(self, x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
        return gemv(x, lin.weight, lin.bias) if self.fused and gemv_applies(x) else lin(x)

    def forward(self, x: torch.Tensor, rope: "BoundRotary", ctx: AttentionContext) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden]."""
        t = x.shape[0]
        q, k, v = self._project(x, self.qkv_proj).split([self.hq * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1)
        q = q.view(t, self.hq, self.d)
        k = k.view(t, self.hkv, self.d)
        v = v.view(t, self.hkv, self.d)
        if self.q_norm is not None and self.k_norm is not None:  # both or neither (arch.qk_norm)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope.apply(q, k)
        out = ctx.attend(self.layer_idx, q, k, v)
        return self._project(out.reshape(t, self.hq * self.d), self.o_proj)
