"""Which device and dtype an engine runs on (``--device``, ``--dtype``), and making its GPU current
on a thread."""

from __future__ import annotations

import contextlib

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    """The device of ``--device`` (rank 0's when it lists one GPU per rank)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name.split(",")[0])


def on_device(device: torch.device):
    """A context making ``device`` the calling thread's current CUDA device (a no-op on CPU).
    Work that takes the current device implicitly (event records, Triton launches, library
    wrappers) then runs on the engine's GPU whichever thread calls the engine."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]
