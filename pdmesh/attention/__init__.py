"""Attention backends behind one interface; ``select_backend`` picks one for a device."""

from __future__ import annotations

import logging
from typing import Optional

import torch

from pdmesh.attention.base import BaseAttentionBackend, BatchLayout, StepAttention
from pdmesh.attention.torch_backend import TorchAttentionBackend

log = logging.getLogger(__name__)


def select_backend(name: str, device: torch.device, num_heads: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype, block_size: int, decode_kernel: str = "auto",
                   kv_dtype: Optional[torch.dtype] = None) -> BaseAttentionBackend:
    """'auto' takes flashinfer on CUDA when it imports, else torch. FlashInfer never runs on CPU.
    ``decode_kernel`` ('auto', 'flashinfer', 'triton') picks the flashinfer backend's decode kernel;
    ``kv_dtype``: the KV pool's element type when it differs from ``dtype`` (fp8)."""
    if name == "flashinfer" and device.type != "cuda":
        raise RuntimeError("--attention-backend flashinfer needs a CUDA device")
    if name == "flashinfer" or (name == "auto" and device.type == "cuda"):
        try:
            from pdmesh.attention.flashinfer_backend import FlashInferBackend  # type: ignore
        except ImportError as exc:
            if name == "flashinfer":
                raise RuntimeError(f"--attention-backend flashinfer: FlashInfer is unavailable ({exc}); pip install .[gpu]") from exc
            log.info("FlashInfer unavailable (%s); using the torch attention backend", exc)
        else:
            return FlashInferBackend(device, num_heads, num_kv_heads, head_dim, dtype, block_size, decode_kernel,
                                     kv_dtype or dtype)
    return TorchAttentionBackend(device)


__all__ = ["BaseAttentionBackend", "BatchLayout", "StepAttention", "TorchAttentionBackend", "select_backend"]
