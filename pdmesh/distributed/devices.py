"""Which device each tensor-parallel rank of a worker runs on (``--device`` with
``--tensor-parallel-size``)."""

from __future__ import annotations

import torch


def rank_devices(name: str, tp: int, check_cuda: bool = True) -> list[torch.device]:
    """Devices of ranks 0..tp-1: 'cpu' (every rank), 'cuda' / 'auto' on a CUDA host (GPUs 0..tp-1),
    'cuda:N' (tp 1), 'cuda:A,B,...' (one GPU per rank, rank 0 on the first).  ValueError otherwise;
    ``check_cuda`` also checks that the GPUs exist (False: syntax only, for config validation)."""
    if name == "auto":
        name = "cuda" if check_cuda and torch.cuda.is_available() else ("cpu" if check_cuda else "auto")
        if name == "auto":
            return [torch.device("cpu")] * tp  # decided at start-up
    if name == "cpu":
        return [torch.device("cpu")] * tp
    if name == "cuda":
        out = [torch.device(f"cuda:{i}") for i in range(tp)]
    elif name.startswith("cuda:"):
        try:
            idx = [int(x) for x in name[5:].split(",")]
        except ValueError:
            raise ValueError(f"{name!r}: expected cuda, cuda:N or cuda:A,B,... (one GPU per rank)") from None
        if len(idx) != tp:
            raise ValueError(f"{name!r} names {len(idx)} GPU(s) for --tensor-parallel-size {tp}: give one per rank, "
                             f"e.g. cuda:{','.join(str(i) for i in range(tp))}")
        if len(set(idx)) != len(idx) or min(idx) < 0:
            raise ValueError(f"{name!r}: each rank needs its own GPU")
        out = [torch.device(f"cuda:{i}") for i in idx]
    else:
        raise ValueError(f"unknown device {name!r}")
    if check_cuda:
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        missing = [d.index for d in out if d.index is None or d.index >= have]
        if missing:
            raise ValueError(f"GPU {missing[0]} does not exist ({have} visible)")
    return out
