"""The rank processes of a tensor-parallel worker, and how rank 0 drives them.

One process per rank.  Rank 0 is the worker itself (gRPC servicers, engine thread, scheduler,
block manager, KV connector); when its engine is built it starts ranks 1..n-1 (``RankGroup``),
each a spawned child process that builds the same shard of the model and of the KV pool
(``build_shard``) on its own device and then does only what rank 0 tells it::

    rank 0 (engine thread)                         rank r (rank_main)
    spawn ranks ─────────────────────────────────▶ set device, join the process group
    join the process group (gloo / NCCL)           build_shard (same collectives, same order)
    build_shard                                    share its KV pool with rank 0 (pipe)
    wait_ready: map every rank's pool ◀───────────
    step: prepare ─ send_step(StepInputs) ───────▶ execute (the same forward, same collectives)
          execute ─ sample ─ [broadcast ids] ────▶ [receive ids: the next step's placeholders]
    close: "stop" ───────────────────────────────▶ exit 0

Messages go over one pipe per rank (a pickled ``StepInputs`` per step; tensors go over the
process group, never through the pipe).  The pools of ranks 1.. are shared with rank 0 once, at
start-up (shared memory on CPU, CUDA IPC handles on GPUs), so KV transfers and the audit read and
write every rank's share from rank 0 without involving the other ranks.

Failure: a rank that dies (crash, SIGKILL, OOM) takes the worker down — rank 0 learns it from
``dead()`` (polled by the worker, which then leaves the mesh and exits non-zero) or from a failing
collective or pipe (the engine thread stops with an error).  Ranks 1.. die with rank 0: their pipe
reads end (EOF), their collectives fail, and PR_SET_PDEATHSIG kills them if rank 0's engine
thread is gone.  During start-up rank 0 may block in a collective that a dead rank will never
join, so a watchdog ends the process then (``STARTUP_DEATH_EXIT``) rather than hang.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import os
import pickle
import signal
import socket
import threading
import time
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)

STARTUP_DEATH_EXIT = 3
"""Exit status of a worker whose rank died while the engine was being built."""


class RankDied(RuntimeError):
    """A rank of this worker's tensor-parallel group is gone."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankGroup:
    """Rank 0's handle on ranks 1..n-1: their processes and pipes."""

    def __init__(self, config, resolved, devices: list[torch.device]) -> None:
        import torch.multiprocessing  # noqa: F401 - registers tensor pickling for the pool hand-over

        self.devices = devices
        self.size = len(devices)
        self.init_method = f"tcp://127.0.0.1:{_free_port()}"
        self.all_reduce = config.device.tp_all_reduce
        ctx = mp.get_context("spawn")
        self.conns = []
        self.procs = []
        self._stopping = False
        self._started = threading.Event()
        for r in range(1, self.size):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=rank_main, name=f"pdmesh-rank{r}", daemon=True,
                            args=(config, resolved, r, devices, self.init_method, child))
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
        log.info("started ranks 1..%d (pids %s) for tensor parallelism over %s", self.size - 1,
                 [p.pid for p in self.procs], [str(d) for d in devices])
        threading.Thread(target=self._watch_startup, name="rank-startup-watchdog", daemon=True).start()

    def join(self):
        """Join the process group as rank 0."""
        from pdmesh.distributed.group import TPGroup

        return TPGroup.join(0, self.size, self.devices[0], self.init_method, self.all_reduce)

    def _watch_startup(self) -> None:
        while not self._started.wait(0.2):
            if self._stopping:
                return
            why = self.dead()
            if why:
                log.error("%s while the engine was being built; exiting", why)
                os._exit(STARTUP_DEATH_EXIT)

    def wait_ready(self, timeout: float = 1800.0) -> list[Any]:
        """Each rank's KV pool share (``pool_share``), once every rank has built its shard."""
        pools = []
        deadline = time.monotonic() + timeout
        for r, conn in enumerate(self.conns, start=1):
            while not conn.poll(0.2):
                why = self.dead()
                if why:
                    raise RankDied(why)
                if time.monotonic() > deadline:
                    raise RankDied(f"rank {r} not ready within {timeout:.0f}s")
            kind, share = conn.recv()
            if kind != "ready":
                raise RankDied(f"rank {r}: {share}")
            pools.append(share)
        self._started.set()
        return pools

    def send_step(self, inputs) -> None:
        """Send one step to every other rank (raises ``RankDied`` when one is gone)."""
        self.send(("step", inputs))

    def send(self, msg: Any) -> None:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        for r, conn in enumerate(self.conns, start=1):
            try:
                conn.send_bytes(data)
            except (BrokenPipeError, OSError) as exc:
                raise RankDied(self.dead() or f"rank {r}: {exc!r}") from exc

    def dead(self) -> Optional[str]:
        """Why a rank is gone ('rank 1 (pid 123) exited with status -9'), or None while all live."""
        for r, p in enumerate(self.procs, start=1):
            if not p.is_alive():
                return f"rank {r} (pid {p.pid}) exited with status {p.exitcode}"
        return None

    def kill(self) -> None:
        """Kill every rank now (the worker is going down without them)."""
        self._stopping = True
        self._started.set()
        for p in self.procs:
            if p.is_alive():
                p.kill()

    def stop(self, timeout: float = 10.0) -> None:
        """Tell every rank to exit; kill those that do not within ``timeout``."""
        self._stopping = True
        self._started.set()
        try:
            self.send(("stop", None))
        except RankDied:
            pass
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5)
        for c in self.conns:
            c.close()


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def rank_main(config, resolved, rank: int, devices: list[torch.device], init_method: str, conn) -> None:
    """Entry point of rank ``rank`` (a spawned process): build the shard, then run what rank 0 sends."""
    from pdmesh.distributed.group import TPGroup
    from pdmesh.engine.engine import pick_dtype
    from pdmesh.engine.shard import build_shard
    from pdmesh.log import configure_logging
    from pdmesh.transport.cuda_ipc import pool_share

    _die_with_parent()
    configure_logging(f"rank{rank}")
    device = devices[rank]
    tp = None
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        elif config.device.cpu_threads:
            torch.set_num_threads(config.device.cpu_threads)
        tp = TPGroup.join(rank, len(devices), device, init_method, config.device.tp_all_reduce)
        max_len = config.model.max_model_len or resolved.arch.max_position_embeddings
        shard = build_shard(config, resolved, tp, pick_dtype(config.model.dtype, device), max_len)
        conn.send(("ready", pool_share(shard.pool.kv)))
        prev: Optional[torch.Tensor] = None
        while True:
            kind, body = pickle.loads(conn.recv_bytes())
            if kind == "stop":
                break
            prev = shard.runner.follow(body, prev)
    except EOFError:  # rank 0 is gone
        log.warning("rank 0 went away; rank %d exits", rank)
        os._exit(1)
    except BaseException as exc:  # noqa: BLE001 - reported, then the worker is taken down
        log.exception("rank %d failed", rank)
        try:
            conn.send(("error", repr(exc)))
        except OSError:
            pass
        os._exit(1)
    if tp is not None:
        tp.destroy()
    os._exit(0)  # without running atexit hooks of a spawned child (gloo threads, the parent's pipes)
