"""The child processes of ``pdmesh up``: spawned, watched for their ``READY`` line, restarted with
back-off when they exit while the mesh runs (``Supervisor``), stopped.

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

    def __init__(self, name: str, cmd: list[str], out: IO[str], env: Optional[dict[str, str]] = None) -> None:
        self.name = name
        self.cmd = cmd
        self.env = env
        self._out = out
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        self.ready: Optional[ReadyLine] = None
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, text=True, bufsize=1, preexec_fn=_pdeathsig,
                                     env=self.env)
        self._reader = threading.Thread(target=self._forward, name=f"stdout-{self.name}", daemon=True)
        self._reader.start()

    def respawn(self) -> None:
        """Start the same command again (after this process exited)."""
        assert self.exited() is not None
        self.restarts += 1
        self._start()

    @property
    def role(self) -> str:
        return self.name.split("-")[0]

    def _forward(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        for line in stdout:
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

    def spawn(self, name: str, cmd: list[str], env: Optional[dict[str, str]] = None) -> Child:
        child = Child(name, cmd, self._out, env)
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


class Supervisor:
    """Keeps a running mesh's children alive: a child that exits is started again with the same
    command after a back-off (``initial`` seconds, doubling per consecutive failure up to
    ``maximum``; a child that stayed up ``stable_after`` seconds starts over at ``initial``), while
    the others keep serving.  Every exit, restart and return is one line on ``err``."""

    def __init__(self, group: ProcessGroup, err: IO[str] = sys.stderr, initial: float = 1.0, maximum: float = 30.0,
                 stable_after: float = 60.0) -> None:
        self.group = group
        self.err = err
        self.initial, self.maximum, self.stable_after = initial, maximum, stable_after
        self._failures: dict[str, int] = {}
        self._restart_at: dict[str, float] = {}
        self._back: set[str] = set()
        """Restarted children whose READY line has not been reported yet."""

    def _say(self, text: str) -> None:
        self.err.write(f"pdmesh up: {text}\n")
        self.err.flush()

    def poll(self, now: Optional[float] = None) -> None:
        now = time.monotonic() if now is None else now
        for c in self.group.children:
            rc = c.exited()
            if rc is None:
                if c.name in self._back and c.ready is not None:
                    self._back.discard(c.name)
                    self._say(f"{c.name} is back: {c.ready.address}")
                if self._failures.get(c.name) and now - c.started >= self.stable_after:
                    self._failures[c.name] = 0
                continue
            at = self._restart_at.get(c.name)
            if at is None:
                n = self._failures[c.name] = self._failures.get(c.name, 0) + 1
                delay = min(self.maximum, self.initial * 2 ** (n - 1))
                self._restart_at[c.name] = now + delay
                self._say(f"{c.name} exited with code {rc}; restarting it in {delay:g}s "
                          f"({'the rest keep serving' if len(self.group.children) > 1 else 'nothing else runs'})")
            elif now >= at:
                del self._restart_at[c.name]
                c.respawn()
                self._back.add(c.name)
                self._say(f"restarted {c.name} (pid {c.proc.pid}, restart {c.restarts})")
