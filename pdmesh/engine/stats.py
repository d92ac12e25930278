"""What the engine reports: its state after a step, and a remote prompt's admission."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from pdmesh.engine.spec_decode import SpecStats


@dataclass(frozen=True)
class RemoteAdmission:
    """Decode side: where a remote prompt's KV must land."""

    block_ids: list[int]
    """All local blocks of the prompt, in token order."""
    num_cached_blocks: int
    """Leading blocks already present from the local prefix cache (not to be pulled)."""


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_waiting_for_kv: int
    num_held: int
    free_blocks: int
    total_blocks: int
    held_blocks: int
    prefix_queries: int
    prefix_hits: int
    audit_mismatches: int = 0
    transfers_stopping: int = 0
    """Stopped KV transfers whose blocks wait until they certainly write no more."""
    quarantined_blocks: int = 0
    tiers: Optional[dict] = None
    """Lower KV tiers: {'host' | 'disk': TierCounters} (None without tiers)."""
    spec: Optional[SpecStats] = None
    """Speculative decoding counters (a copy), when it is on."""
