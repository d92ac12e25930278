"""Fault injection for KV pulls (``--inject-kv-faults``; tests only).

On a prefill worker the faults hit the pulls it serves: an aborted ``KVTransfer.Pull`` call, a
stream that ends one chunk early (the decode side's completeness check must catch it), or chunks
slowed down (so a test can kill a worker mid-transfer).  On a decode worker ``delay`` slows the
pulls it makes: each piece of the pull lands in the pool that much later (a slow copy in flight,
so a test can cancel a request mid-pull).  Deterministic: every Nth pull, counted per process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from pdmesh.config import ConfigError


@dataclass
class FaultPlan:
    mode: str = ""
    """'' (none), 'fail', 'truncate' or 'delay'."""
    every: int = 0
    """fail/truncate: every Nth pull (1: all)."""
    delay: float = 0.0
    """delay: seconds before each chunk (prefill) or before each piece lands (decode)."""
    pulls: int = field(default=0, init=False)
    """Pulls served so far."""

    @staticmethod
    def parse(spec: str) -> "FaultPlan":
        if not spec:
            return FaultPlan()
        mode, _, arg = spec.partition(":")
        try:
            if mode in ("fail", "truncate"):
                every = int(arg)
                if every < 1:
                    raise ValueError
                return FaultPlan(mode, every=every)
            if mode == "delay":
                seconds, _, count = arg.partition(":")
                delay, n = float(seconds), int(count or 1)
                if delay < 0 or n < 1:
                    raise ValueError
                return FaultPlan(mode, every=n, delay=delay)
        except ValueError:
            pass
        raise ConfigError(f"--inject-kv-faults: expected fail:N, truncate:N or delay:SECONDS[:N] (N >= 1), got {spec!r}")

    def next_pull(self) -> Optional[str]:
        """Called once per pull: the mode for this one (pulls N, 2N, ...; 'delay' without N: every
        pull), or None."""
        self.pulls += 1
        if self.mode and self.pulls % self.every == 0:
            return self.mode
        return None
