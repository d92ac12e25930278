"""Fault injection for KV pulls served by a prefill worker (``--inject-kv-faults``; tests only).

The faults are real failures of the real transport: an aborted ``KVTransfer.Pull`` call, a stream
that ends one chunk early (the decode side's completeness check must catch it), or chunks slowed
down (so a test can kill a worker mid-transfer).  Deterministic: every Nth pull, counted per process.
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
    """delay: seconds before each chunk."""
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
                delay = float(arg)
                if delay < 0:
                    raise ValueError
                return FaultPlan(mode, delay=delay)
        except ValueError:
            pass
        raise ConfigError(f"--inject-kv-faults: expected fail:N, truncate:N or delay:SECONDS (N >= 1), got {spec!r}")

    def next_pull(self) -> Optional[str]:
        """Called once per pull: the fault this one gets ('fail', 'truncate', 'delay': every pull
        when delaying) or None."""
        self.pulls += 1
        if self.mode == "delay" or (self.mode in ("fail", "truncate") and self.pulls % self.every == 0):
            return self.mode
        return None
