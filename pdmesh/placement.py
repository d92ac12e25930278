"""Placing a mesh's workers on this host's GPUs (``pdmesh up``).

``plan()`` gives every worker its GPUs and its share of each GPU's memory:

* A role with ``--<role>-devices`` takes exactly those GPUs: the list holds one group of
  ``gpus_per_worker`` devices per worker, in order, or a single group that every worker of the role
  shares.
* Other workers go, one at a time (prefill, then decode, then colocated), to the GPUs that carry
  the fewest workers so far (lowest index first on ties): ``--prefill 1 --decode 1`` on two GPUs puts
  prefill on GPU 0 and decode on GPU 1; on one GPU both share it.
* Workers that share a GPU split ``gpu_memory_utilization`` of it evenly (each engine sizes its KV
  cache from its share), and ``check_fit`` refuses a plan where a share cannot hold the model's
  weights, the engine's working reserve and the KV of one longest request.

Everything here is pure (no CUDA calls) except ``visible_gpu_memory``, so plans are tested on CPU.
A worker spanning several GPUs (``--tensor-parallel-size N``: one rank per GPU) gets a group of N
devices; ``gpus_per_worker`` is given per role.  Its flags name them (``--device cuda:0,1
--tensor-parallel-size 2``); a GPU in several groups splits its memory among them like any GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

ROLE_ORDER = ("prefill", "decode", "both")
"""Order in which workers are placed and named."""
ROLE_FLAGS = {"prefill": "--prefill-devices", "decode": "--decode-devices", "both": "--colocated-devices"}
WORKING_RESERVE_BYTES = 2 << 30
"""What an engine keeps free on its GPU for activations and CUDA graphs (``LLMEngine._size_kv``)."""


class PlacementError(ValueError):
    """The requested workers cannot be placed; the message names the flag to change."""


@dataclass(frozen=True)
class WorkerPlacement:
    """Where one worker runs."""

    role: str
    """'prefill', 'decode' or 'both' (colocated)."""
    index: int
    """Its number within the role (``prefill-0``, ``prefill-1``, ...)."""
    devices: tuple[int, ...]
    """GPU indices it uses (empty: CPU)."""
    gpu_memory_utilization: Optional[float]
    """Its share of each of its GPUs (None on CPU)."""
    tensor_parallel_size: int = 1
    """Its ranks (one per device on GPUs; processes on a CPU host)."""

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"

    def flags(self) -> list[str]:
        """Worker flags that put it there."""
        tp = ["--tensor-parallel-size", str(self.tensor_parallel_size)] if self.tensor_parallel_size > 1 else []
        if not self.devices:
            return tp
        if len(self.devices) != self.tensor_parallel_size:
            raise PlacementError(f"{self.name}: {len(self.devices)} GPUs for {self.tensor_parallel_size} tensor-parallel rank(s)")
        return ["--device", "cuda:" + ",".join(map(str, self.devices)), *tp,
                "--gpu-memory-utilization", f"{self.gpu_memory_utilization:.4f}"]


def parse_devices(flag: str, text: str) -> tuple[int, ...]:
    """'0,1' -> (0, 1); a clear error naming ``flag`` otherwise."""
    try:
        out = tuple(int(x) for x in text.replace(" ", "").split(",") if x != "")
    except ValueError:
        raise PlacementError(f"{flag} {text!r}: expected GPU indices separated by commas, e.g. 0,1") from None
    if not out or any(d < 0 for d in out):
        raise PlacementError(f"{flag} {text!r}: expected GPU indices >= 0 separated by commas, e.g. 0,1")
    return out


def plan(counts: Mapping[str, int], num_gpus: int, devices: Optional[Mapping[str, tuple[int, ...]]] = None,
         gpu_memory_utilization: float = 0.9, gpus_per_worker: int | Mapping[str, int] = 1) -> list[WorkerPlacement]:
    """Every worker's GPUs and memory share; ``counts`` by role, ``devices`` the roles' explicit
    device lists (``parse_devices``), ``num_gpus`` the GPUs visible (0: a CPU host),
    ``gpus_per_worker`` the tensor-parallel size of every worker or of each role."""
    devices = {r: d for r, d in (devices or {}).items() if d}
    per = {r: (gpus_per_worker.get(r, 1) if isinstance(gpus_per_worker, Mapping) else gpus_per_worker) for r in ROLE_ORDER}
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise PlacementError(f"--gpu-memory-utilization {gpu_memory_utilization}: must be in (0, 1]")
    if num_gpus == 0:
        if devices:
            role = next(iter(devices))
            raise PlacementError(f"{ROLE_FLAGS[role]}: no GPU is visible on this host (workers run on the CPU)")
        return [WorkerPlacement(r, i, (), None, per[r]) for r in ROLE_ORDER for i in range(counts.get(r, 0))]
    need = max(per[r] for r in ROLE_ORDER if counts.get(r, 0)) if any(counts.values()) else 1
    if num_gpus < need:
        raise PlacementError(f"a worker needs {need} GPUs; {num_gpus} visible")
    groups: dict[str, list[tuple[int, ...]]] = {}
    load = [0] * num_gpus
    for role, devs in devices.items():
        flag, n, k = ROLE_FLAGS[role], counts.get(role, 0), per[role]
        if n == 0:
            raise PlacementError(f"{flag} given but no {role} workers are started")
        bad = [d for d in devs if d >= num_gpus]
        if bad:
            raise PlacementError(f"{flag}: GPU {bad[0]} does not exist ({num_gpus} visible: 0..{num_gpus - 1})")
        if len(devs) == k:
            groups[role] = [devs] * n
        elif len(devs) == n * k:
            groups[role] = [devs[i * k:(i + 1) * k] for i in range(n)]
        else:
            raise PlacementError(f"{flag} lists {len(devs)} GPUs for {n} {role} worker(s) of {k} GPU(s) "
                                 f"each: give {n * k} (one group per worker) or {k} (shared)")
        for g in groups[role]:
            if len(set(g)) != len(g):
                raise PlacementError(f"{flag}: a worker cannot use GPU {g} twice")
            for d in g:
                load[d] += 1
    out: list[tuple[str, int, tuple[int, ...]]] = []
    for role in ROLE_ORDER:
        for i in range(counts.get(role, 0)):
            if role in groups:
                g = groups[role][i]
            else:
                g = tuple(sorted(sorted(range(num_gpus), key=lambda d: (load[d], d))[:per[role]]))
                for d in g:
                    load[d] += 1
            out.append((role, i, g))
    return [WorkerPlacement(r, i, g, round(gpu_memory_utilization / max(load[d] for d in g), 4), len(g)) for r, i, g in out]


def memory_needed(weight_bytes: int, kv_bytes_per_token: int, max_model_len: int, tensor_parallel_size: int = 1) -> int:
    """Bytes a worker needs on each of its GPUs at least: its share of the weights (1/TP of them;
    weight_bytes counts the whole model), the working reserve, its share of one longest request's KV
    (``kv_bytes_per_token``: one rank's)."""
    return -(-weight_bytes // tensor_parallel_size) + WORKING_RESERVE_BYTES + kv_bytes_per_token * max_model_len


def check_fit(placements: Sequence[WorkerPlacement], gpu_bytes: Sequence[int], need_bytes: int | Mapping[int, int],
              what: str) -> None:
    """Refuse a plan in which some worker's share of its GPU is below ``need_bytes`` (or, by
    tensor-parallel size, ``need_bytes[tp]``)."""
    for p in placements:
        need = need_bytes[p.tensor_parallel_size] if isinstance(need_bytes, Mapping) else need_bytes
        for d in p.devices:
            share = int(gpu_bytes[d] * (p.gpu_memory_utilization or 0.0))
            if share < need:
                sharing = sum(d in q.devices for q in placements)
                raise PlacementError(
                    f"{p.name} gets {p.gpu_memory_utilization:.2f} of GPU {d} ({share / 2**30:.1f} GiB, shared by {sharing} "
                    f"worker(s)) but {what} needs {need / 2**30:.1f} GiB (weights, 2 GiB working memory, KV of one "
                    f"longest request): put fewer workers on a GPU (--prefill-devices/--decode-devices/--colocated-devices), "
                    f"raise --gpu-memory-utilization or lower --max-model-len")


def visible_gpu_memory() -> list[int]:
    """Total memory (bytes) of each visible CUDA device; [] without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]
