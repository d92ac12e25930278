"""Online quantization of a loaded model (``--quantization fp8|int8``): W8A8 linear layers.

Weights are quantized once at load, per output channel (``w_scale[n] = max_k |W[n, k]| / QMAX``);
activations per token at every call (``x_scale[t] = max_k |x[t, k]| / QMAX``), so no calibration
is needed.  ``y = (x_q @ w_q^T) * x_scale * w_scale^T (+ bias)``, accumulated in float32 (fp8) or
int32 (int8).  Which layers: the attention's qkv and o projections and the MLP's gate/up and down
projections of every decoder layer; embeddings, norms and the LM head stay in the model dtype (as
vLLM does).

Kernels, on CUDA and CPU alike (torch 2.11+ has both on both):

* fp8 (e4m3, QMAX 448): ``torch._scaled_mm`` with row-wise scales (Hopper FP8 tensor cores; on
  CPU the same call computes it in float32).  Shapes whose K or N is not a multiple of 16 take the
  dequantized path below.
* int8 (QMAX 127, symmetric): ``torch._int_mm`` (int8 x int8 -> int32; CUDA needs more than 16
  rows, so 2..16 rows are zero-padded to 17), scales applied to the int32 result.
* one row on CUDA with fused kernels (decode at batch 1): a weight-only GEMV instead
  (``pdmesh.models.gemv`` reads the 1-byte weights and applies ``w_scale`` per row; the activation
  stays in the model dtype), because at one row a projection is a pure weight stream.

Tensor parallelism: every rank quantizes its own shard after loading it, so a column-parallel
layer (qkv, gate/up) has the scales of its output rows, a row-parallel one (o, down) scales over
its slice of K, and its activations are quantized per token over that slice (the all-reduce then
sums dequantized partial products).  Mixture-of-experts models are refused (``check_quantization``).

``quant_error`` is what the tests bound: the relative error of a quantized layer against the same
layer in float32.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pdmesh.config import Quantization
from pdmesh.models.arch import ModelArch

QuantMethod = Quantization
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0
QUANTIZED_LAYERS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
"""Names of the nn.Linear modules that ``quantize_model`` replaces."""


def _qmax(qdtype: torch.dtype) -> float:
    return FP8_MAX if qdtype == FP8 else INT8_MAX


def quantize_rows(x: torch.Tensor, qdtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [R, K] (any float dtype) -> (x_q [R, K] in ``qdtype``, scale [R, 1] float32) with
    ``x ~= x_q * scale`` row by row (symmetric; an all-zero row gets a tiny scale, not a NaN)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / _qmax(qdtype)
    q = xf / scale
    if qdtype == FP8:
        return q.clamp(-FP8_MAX, FP8_MAX).to(FP8), scale
    return q.round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


class QuantLinear(nn.Module):
    """A linear layer with a 1-byte weight [N, K] and per-output-channel scales; activations are
    quantized per token on each call.  Input [T, K] and output [T, N] in the model dtype."""

    def __init__(self, linear: nn.Linear, method: QuantMethod) -> None:
        super().__init__()
        self.method = method
        self.qdtype = FP8 if method == "fp8" else torch.int8
        self.out_dtype = linear.weight.dtype
        w_q, w_scale = quantize_rows(linear.weight.data, self.qdtype)
        self.weight = nn.Parameter(w_q, requires_grad=False)
        """[N, K] fp8 e4m3 or int8 (row-major: ``weight.t()`` is the column-major operand the
        kernels take)."""
        self.weight_scale = nn.Parameter(w_scale.squeeze(1).contiguous(), requires_grad=False)
        """[N] float32: per-output-channel scale."""
        self.bias = linear.bias
        """[N] in the model dtype, or None."""
        self.in_features, self.out_features = linear.in_features, linear.out_features
        n, k = self.weight.shape
        align = 8 if method == "int8" else 16
        self.use_kernel = n % align == 0 and k % align == 0
        """False where the kernel cannot take the shape (K or N not a multiple of 16 for _scaled_mm,
        of 8 for _int_mm): the dequantized matmul instead."""

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}"

    def dequantized_weight(self) -> torch.Tensor:
        """[N, K] float32: the weight as the kernels see it."""
        return self.weight.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, K] -> [T, N] in x's dtype."""
        return self.matmul(x, self.bias)

    def matmul(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """x: [..., K] -> [..., N] in x's dtype, plus ``bias`` [N] (or none: a row-parallel shard's
        partial product on ranks other than 0)."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        x_q, x_scale = quantize_rows(x2, self.qdtype)
        if not self.use_kernel:
            y = (x_q.float() * x_scale) @ self.dequantized_weight().t()
        elif self.method == "fp8":
            out = torch.bfloat16 if x.is_cuda else torch.float32  # CUDA's row-wise scaling writes bf16
            y = torch._scaled_mm(x_q, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale[None, :], out_dtype=out)
        else:
            rows = x_q.shape[0]
            if x_q.is_cuda and rows <= 16:  # cuBLASLt's int8 GEMM wants more than 16 rows
                x_q = F.pad(x_q, (0, 0, 0, 17 - rows))
            acc = torch._int_mm(x_q, self.weight.t())[:rows]
            y = acc.float() * x_scale * self.weight_scale[None, :]
        y = y.to(x.dtype)
        if bias is not None:
            y = y + bias
        return y.reshape(*shape[:-1], self.out_features)


def check_quantization(arch: ModelArch, method: Optional[QuantMethod]) -> None:
    """ValueError naming --quantization when ``method`` cannot quantize this model: mixture-of-experts
    models are refused (their experts, most of the weights, are fused grouped tensors that no
    quantized kernel here reads; quantizing only the attention would be a silent half measure)."""
    if method is None:
        return
    if method not in ("fp8", "int8"):
        raise ValueError(f"--quantization: unknown method {method!r} (fp8 or int8)")
    if arch.num_experts > 0:
        raise ValueError(f"--quantization {method}: mixture-of-experts models ({arch.architecture}, {arch.num_experts} "
                         "experts) are not supported: their expert layers have no quantized kernel; serve it without "
                         "--quantization (--kv-cache-dtype fp8 works)")


FP8_MIN_CAPABILITY = (8, 9)
"""Compute capability of the first GPUs with FP8 matmuls (Ada, Hopper): ``torch._scaled_mm`` needs it."""


def check_device(device: torch.device, method: QuantMethod) -> None:
    """ValueError naming --quantization when ``device`` has no kernel for ``method`` (fp8 below
    compute capability 8.9), instead of a torch error at the first forward pass."""
    if method == "fp8" and device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if tuple(cap) < FP8_MIN_CAPABILITY:
            raise ValueError(f"--quantization fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                             f"{torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}: use --quantization int8")


def quantize_model(model: nn.Module, method: Optional[QuantMethod]) -> int:
    """Replace every projection of ``QUANTIZED_LAYERS`` in ``model`` (a ``CausalLM``, whose ``arch``
    must pass ``check_quantization``) by a ``QuantLinear`` in place, freeing the full-precision
    weights; returns how many were replaced.  ``None``: nothing.  Under tensor parallelism each
    rank quantizes its own shard (column-parallel: its output rows; row-parallel: its slice of K)."""
    arch = getattr(model, "arch", None)
    if arch is not None:
        check_quantization(arch, method)
    if method is None:
        return 0
    first = next(model.parameters(), None)
    if first is not None:
        check_device(first.device, method)
    targets = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
               if name in QUANTIZED_LAYERS and isinstance(child, nn.Linear)]
    with torch.no_grad():
        for parent, name in targets:
            setattr(parent, name, QuantLinear(getattr(parent, name), method))
    return len(targets)


def quant_error(layer: QuantLinear, reference: nn.Linear, x: torch.Tensor) -> float:
    """Relative error ``||y_q - y|| / ||y||`` of the quantized layer against the float32 reference
    on inputs ``x`` [T, K]."""
    with torch.no_grad():
        want = F.linear(x.float(), reference.weight.float(), None if reference.bias is None else reference.bias.float())
        got = layer(x.to(layer.out_dtype)).float()
    return float((got - want).norm() / want.norm())
