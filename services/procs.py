"""The child processes of ``pdmesh up``: spawned, watched for their ``READY`` line, stopped.

Every service prints one line ``READY <name> <address> [key=value ...]`` (shell-quoted) on stdout once it
serves (workers after binding and starting to register, the gateway once both its listeners are
up). A reader thread per child forwards its stdout to ours and records that line, so readiness is
known from the processes ``pdmesh up`` started itself, never from whatever answers on a port.
"""

from __future__ import annotations

import ctypes
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Optional

STOP_ORDER = ("gateway", "prefill", "decode", "both", "scheduler")
"""Gateway first (stops taking requests), then workers, scheduler last."""


def _pdeathsig() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass(frozen=True)
class ReadyLine:
    """What a service announced when it became ready."""

    name: str
    """Its id (``scheduler``, ``gateway``, or a worker id such as ``prefill-127.0.0.1-41234``)."""
    address: str
    """Its main listener (host:port, or the gateway's URL)."""
    extra: dict[str, str] = field(default_factory=dict)
    """Other listeners and facts (``metrics=PORT``, ``grpc=HOST:PORT``, ``device=cuda:1``)."""

    @staticmethod
    def parse(line: str) -> Optional["ReadyLine"]:
        if not line.startswith("READY "):
            return None
        try:
            parts = shlex.split(line)  # a worker id may hold spaces (quoted)
        except ValueError:
            return None
        if len(parts) < 3:
            return None
        extra = dict(p.split("=", 1) for p in parts[3:] if "=" in p)
        return ReadyLine(parts[1], parts[2], extra)


class Child:
    """One service process, its stdout forwarded line by line, its READY line kept."""

    def __init__(self, name: str, cmd: list[str], out: IO[str]) -> None:
        self.name = name
        self.ready: Optional[ReadyLine] = None
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, bufsize=1, preexec_fn=_pdeathsig)
        self._out = out
        self._reader = threading.Thread(target=self._forward, name=f"stdout-{name}", daemon=True)
        self._reader.start()

    @property
    def role(self) -> str:
        return self.name.split("-")[0]

    def _forward(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if self.ready is None:
                self.ready = ReadyLine.parse(line)
            self._out.write(line)
            self._out.flush()

    def exited(self) -> Optional[int]:
        return self.proc.poll()


class ProcessGroup:
    """The mesh's children; ``stop()`` ends them in ``STOP_ORDER`` (SIGTERM, then SIGKILL)."""

    def __init__(self, out: IO[str] = sys.stdout) -> None:
        self.children: list[Child] = []
        self._out = out

    def spawn(self, name: str, cmd: list[str]) -> Child:
        child = Child(name, cmd, self._out)
        self.children.append(child)
        return child

    def failed(self) -> Optional[str]:
        for c in self.children:
            rc = c.exited()
            if rc is not None:
                return f"{c.name} exited with code {rc}"
        return None

    def wait_ready(self, timeout: float) -> None:
        """Until every child has printed its READY line; RuntimeError when one exits first,
        TimeoutError naming the ones still starting."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            err = self.failed()
            if err:
                raise RuntimeError(err)
            if all(c.ready is not None for c in self.children):
                return
            time.sleep(0.1)
        waiting = ", ".join(c.name for c in self.children if c.ready is None)
        raise TimeoutError(f"not ready after {timeout:.0f}s: {waiting} (raise --startup-timeout if it is still loading)")

    def stop(self, grace: float = 40.0) -> int:
        order = sorted(self.children, key=lambda c: STOP_ORDER.index(c.role))
        for c in order:
            if c.exited() is None:
                c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for c in order:
            try:
                c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait()
        codes = [c.proc.returncode for c in self.children]
        return 0 if not any(codes) else max(max(codes), 1)  # killed by a signal (negative): 1
