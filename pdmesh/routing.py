"""Worker registry and routing policies (used by the scheduler service; pure logic, no I/O).

Invariants
----------
* A worker is routable iff it registered, its lease (last heartbeat + ``lease_s``) has not run
  out, and it is not draining.  ``expire`` removes workers whose lease ran out.
* Workers serving the same model must agree on dtype and KV layout (block size, heads, head dim,
  layers): registration of an incompatible worker is refused, so any prefill/decode pair the
  scheduler hands out can exchange KV.  Their tensor-parallel sizes may differ (the layout's
  ``tensor_parallel_size``): a pair is formed only when each side's heads split validly over its
  ranks (``kv_convertible``), and the decode worker regroups the heads as it pulls.
* A pair is only formed when the two share a transport they can use between them (``cuda_ipc``
  only within one host; ``nixl`` and ``grpc`` anywhere); among those, the one both workers rank
  best in their ``--kv-transports`` lists, ties broken by ``KV_TRANSPORTS`` order.
* A worker id belongs to the identity that first registered it (its *owner*): only the owner may
  register it again, heartbeat or deregister it.  The binding outlives the worker's lease by
  ``binding_ttl`` seconds (a restarted worker, same identity, takes its id back; another identity
  cannot take over a dead worker's id meanwhile) and ends when the owner deregisters.
* Registrations are bounded: ``validate_worker_info`` limits every field, ``max_workers`` the
  number of workers, ``MAX_KV_HINTS`` the prefix hashes each may publish (known tiers, 16-byte
  hashes only), so ``ListWorkers`` and the scheduler's memory stay bounded.
* Routing by cached prefix (``KVAwarePolicy``) only ever *prefers* a worker: the prefix hashes a
  worker published (``apply_kv_events``) are hints that may be late, lost or stale; the worker
  itself looks every block up by hash, so a wrong hint costs a miss, never a wrong answer.  After
  a gap in a worker's events its hints are dropped and it is asked to send them all again.
* A colocated (ROLE_BOTH) worker serves a whole request alone (transport ``local``) and is never
  half of a pair.  With both kinds present, prompts shorter than ``colocate_below_tokens`` go to
  a colocated worker and longer ones are disaggregated (conditional disaggregation); with one
  kind, it serves every prompt.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence, get_args

from pdmesh.kv.block_manager import hash_block
from pdmesh.kv.events import TIER_NAMES
from pdmesh.v1 import common_pb2 as pb

KVTransportName = Literal["cuda_ipc", "nixl", "grpc"]
KV_TRANSPORTS: tuple[str, ...] = get_args(KVTransportName)
"""KV transports, in the default order of preference: CUDA IPC on one host, NIXL across hosts,
gRPC streaming as the fallback."""
SAME_HOST_ONLY = frozenset({"cuda_ipc"})
LOCAL = "local"
"""Transport name of a colocated route: the KV never leaves the worker."""


class RegistrationRefused(ValueError):
    """The worker cannot join: it disagrees with registered peers of the same model."""


class NotOwner(PermissionError):
    """The worker id belongs to another identity."""


class RegistryFull(RuntimeError):
    """``max_workers`` workers are registered already."""


MAX_WORKER_INFO_BYTES = 4096
"""Largest serialized ``WorkerInfo`` a registration may carry."""
MAX_KV_HINTS = 1_000_000
"""Prefix hashes (all tiers) the scheduler keeps for one worker; hashes beyond it, of unknown tiers
or of another length than ``HASH_BYTES`` are not kept (hints: a missing one costs a cache miss)."""
HASH_BYTES = 16
"""Length of a block's chained prefix hash (``pdmesh.kv.block_manager.hash_block``)."""
_FIELD_LIMITS = {"worker_id": 128, "address": 255, "model": 256, "dtype": 32, "host_id": 255}


def validate_worker_info(info: pb.WorkerInfo) -> None:
    """Raise ``RegistrationRefused`` for a registration that is incomplete or out of bounds."""
    if not info.worker_id or not info.address or info.role == pb.ROLE_UNSPECIFIED:
        raise RegistrationRefused("worker_id, address and role are required")
    if info.role not in (pb.ROLE_PREFILL, pb.ROLE_DECODE, pb.ROLE_BOTH):
        raise RegistrationRefused(f"unknown role {info.role}")
    size = info.ByteSize()
    if size > MAX_WORKER_INFO_BYTES:
        raise RegistrationRefused(f"registration of {size} bytes exceeds {MAX_WORKER_INFO_BYTES}")
    for name, limit in _FIELD_LIMITS.items():
        if len(getattr(info, name)) > limit:
            raise RegistrationRefused(f"{name} is longer than {limit} characters")
    if not info.worker_id.isprintable():
        raise RegistrationRefused("worker_id must be printable")
    host, _, port = info.address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RegistrationRefused(f"address {info.address!r} is not host:port")
    if len(info.transports) > 8 or any(len(t) > 32 for t in info.transports):
        raise RegistrationRefused("at most 8 transports of at most 32 characters")


class NoRoute(LookupError):
    """No compatible (prefill, decode) pair is available."""


@dataclass
class WorkerEntry:
    info: pb.WorkerInfo
    load: pb.WorkerLoad = field(default_factory=pb.WorkerLoad)
    last_seen: float = field(default_factory=time.monotonic)
    draining: bool = False
    pending: int = 0
    """Routes handed out since the last heartbeat (so a burst does not pile onto one worker)."""
    kv: dict[str, set[bytes]] = field(default_factory=dict)
    """Prefix hashes the worker said it holds, by tier (device, host, disk): hints."""
    kv_seq: int = 0
    """Number of the worker's last applied event batch (0: none yet)."""

    @property
    def worker_id(self) -> str:
        return self.info.worker_id


def _compat_key(info: pb.WorkerInfo) -> tuple:
    lay = info.kv_layout
    return (info.dtype, lay.num_layers, lay.num_kv_heads, lay.head_dim, lay.block_size, lay.dtype, lay.layout)


def kv_convertible(a: pb.KVLayout, b: pb.KVLayout) -> bool:
    """Whether KV moves between pools of these layouts: same shape of KV, and on each side the KV
    heads split over its tensor-parallel ranks (evenly, or replicated when fewer)."""
    def split_ok(x: pb.KVLayout) -> bool:
        tp = max(1, x.tensor_parallel_size)
        return x.num_kv_heads > 0 and (x.num_kv_heads % tp == 0 or tp % x.num_kv_heads == 0)

    key = lambda x: (x.num_layers, x.num_kv_heads, x.head_dim, x.block_size, x.dtype, x.layout)  # noqa: E731
    return key(a) == key(b) and split_ok(a) and split_ok(b)


def can_use(transport: str, worker: pb.WorkerInfo, peer_host_id: str) -> bool:
    """Whether ``worker`` offers ``transport`` and can use it with a peer on ``peer_host_id``."""
    return transport in worker.transports and (transport not in SAME_HOST_ONLY or worker.host_id == peer_host_id)


def transport_rank(t: str, p: pb.WorkerInfo, d: pb.WorkerInfo) -> tuple[int, int]:
    """Lower is better: both workers' preference (positions in their lists), then the default order."""
    default = KV_TRANSPORTS.index(t) if t in KV_TRANSPORTS else len(KV_TRANSPORTS)
    return list(p.transports).index(t) + list(d.transports).index(t), default


def shared_transport(p: pb.WorkerInfo, d: pb.WorkerInfo) -> Optional[str]:
    """The transport a (prefill, decode) pair uses, or None when they have none in common."""
    usable = [t for t in p.transports if t != LOCAL and can_use(t, d, p.host_id)]
    return min(usable, key=lambda t: transport_rank(t, p, d)) if usable else None


class Registry:
    def __init__(self, lease_s: float = 3.0, max_workers: int = 1024, binding_ttl: float = 600.0) -> None:
        self.lease_s = lease_s
        self.max_workers = max_workers
        self.binding_ttl = binding_ttl
        self.workers: dict[str, WorkerEntry] = {}
        self.owners: dict[str, tuple[str, float]] = {}
        """worker id -> (owner identity, when the binding was last used), in first-use order."""

    def _check_owner(self, worker_id: str, owner: str) -> None:
        bound = self.owners.get(worker_id)
        if bound is not None and bound[0] != owner:
            raise NotOwner(f"worker id {worker_id!r} belongs to another identity")

    def register(self, info: pb.WorkerInfo, owner: str = "", now: Optional[float] = None) -> WorkerEntry:
        """Add or replace worker ``info.worker_id`` for ``owner`` (the caller's identity). Raises
        ``RegistrationRefused``, ``NotOwner`` or ``RegistryFull``."""
        validate_worker_info(info)
        self._check_owner(info.worker_id, owner)
        if info.worker_id not in self.workers and len(self.workers) >= self.max_workers:
            raise RegistryFull(f"{self.max_workers} workers are registered already (--max-workers)")
        for other in self.workers.values():
            if other.info.model == info.model and other.worker_id != info.worker_id and _compat_key(other.info) != _compat_key(info):
                raise RegistrationRefused(
                    f"worker {info.worker_id} ({_compat_key(info)}) is incompatible with {other.worker_id} "
                    f"({_compat_key(other.info)}) serving {info.model!r}"
                )
        now = time.monotonic() if now is None else now
        entry = WorkerEntry(info, last_seen=now)
        self.workers[info.worker_id] = entry
        self.owners[info.worker_id] = (owner, now)
        return entry

    def heartbeat(self, worker_id: str, load: pb.WorkerLoad, draining: bool, now: Optional[float] = None,
                  owner: str = "") -> bool:
        """Renew ``worker_id``'s lease; False when it is not registered. Raises ``NotOwner``."""
        entry = self.workers.get(worker_id)
        if entry is None:
            return False
        self._check_owner(worker_id, owner)
        entry.load = load
        entry.draining = draining
        entry.pending = 0
        entry.last_seen = time.monotonic() if now is None else now
        self.owners[worker_id] = (owner, entry.last_seen)
        return True

    def apply_kv_events(self, worker_id: str, seq: int, reset: bool, events) -> bool:
        """Apply one heartbeat's prefix-hash events (``spb.KVEvents``, numbered ``seq``); returns
        True when the scheduler missed some (a gap): the worker's hints are dropped until it sends
        everything again (``reset``)."""
        entry = self.workers.get(worker_id)
        if entry is None or seq == 0:
            return False
        if reset:
            entry.kv = {}
        elif seq != entry.kv_seq + 1:
            entry.kv, entry.kv_seq = {}, 0
            return True
        entry.kv_seq = seq
        for ev in events:
            if ev.tier not in TIER_NAMES:
                continue
            held = entry.kv.setdefault(ev.tier, set())
            held.difference_update(ev.removed)
            room = MAX_KV_HINTS - sum(len(h) for h in entry.kv.values())
            held.update([h for h in ev.added if len(h) == HASH_BYTES][:max(0, room)])
        return False

    def remove(self, worker_id: str, owner: Optional[str] = None) -> bool:
        """Deregister (``owner`` given: only as the id's owner, else ``NotOwner``); the id is free again."""
        if owner is not None:
            self._check_owner(worker_id, owner)
        self.owners.pop(worker_id, None)
        return self.workers.pop(worker_id, None) is not None

    def expire(self, now: Optional[float] = None) -> list[str]:
        """Drop workers whose lease ran out (their ids stay bound for ``binding_ttl``); forget
        bindings unused for ``binding_ttl``, and the oldest unused ones beyond ``max_workers``."""
        now = time.monotonic() if now is None else now
        dead = [w for w, e in self.workers.items() if now - e.last_seen > self.lease_s]
        for w in dead:
            del self.workers[w]
        idle = [w for w, (_, used) in self.owners.items() if w not in self.workers]
        stale = [w for w in idle if now - self.owners[w][1] > self.binding_ttl]
        stale += [w for w in idle if w not in stale][:max(0, len(self.owners) - len(stale) - 2 * self.max_workers)]
        for w in stale:
            del self.owners[w]
        return dead

    def routable(self, role: int, model: str, exclude: Sequence[str] = ()) -> list[WorkerEntry]:
        return [e for e in self.workers.values()
                if e.info.role == role and not e.draining and e.worker_id not in exclude and (not model or e.info.model == model)]


class Prompt:
    """A prompt's token ids and, per block size, its chained block hashes (as workers compute them;
    never the block of the last token, which a worker always computes)."""

    def __init__(self, token_ids: Sequence[int]) -> None:
        self.token_ids = token_ids
        self._hashes: dict[int, list[bytes]] = {}

    def hashes(self, block_size: int) -> list[bytes]:
        if block_size not in self._hashes:
            out, parent = [], None
            for i in range(max(0, len(self.token_ids) - 1) // block_size):
                parent = hash_block(parent, self.token_ids[i * block_size:(i + 1) * block_size])
                out.append(parent)
            self._hashes[block_size] = out
        return self._hashes[block_size]


class BaseRoutingPolicy(ABC):
    """Chooses a (prefill, decode) pair among routable, transport-compatible candidates."""

    name = "base"

    @abstractmethod
    def choose(self, prefills: list[WorkerEntry], decodes: list[WorkerEntry], prompt_tokens: int,
               prompt: Optional[Prompt] = None) -> tuple[WorkerEntry, WorkerEntry, str, str]:
        """Returns (prefill, decode, transport, reason); raises NoRoute.  ``prompt``: its token ids,
        when the caller sent them (policies that route by cached prefix need them)."""

    @abstractmethod
    def choose_colocated(self, workers: list[WorkerEntry], prompt_tokens: int,
                         prompt: Optional[Prompt] = None) -> tuple[WorkerEntry, str]:
        """Returns (worker, reason) among non-empty ``workers`` (ROLE_BOTH)."""


def pair_transport(p: WorkerEntry, d: WorkerEntry) -> Optional[str]:
    """The transport prefill ``p`` hands KV to decode ``d`` over, or None when they cannot pair
    (no transport in common, or KV layouts that do not convert)."""
    if not kv_convertible(p.info.kv_layout, d.info.kv_layout):
        return None
    return shared_transport(p.info, d.info)


def _pairs(prefills: list[WorkerEntry], decodes: list[WorkerEntry]):
    for p in prefills:
        for d in decodes:
            t = pair_transport(p, d)
            if t is not None:
                yield p, d, t


class LeastLoadedPolicy(BaseRoutingPolicy):
    """Prefill with the fewest queued+running requests; decode with the fewest running plus the
    least KV in use.  Ties go to the worker registered first; ``pending`` counts routes issued
    since the last heartbeat so that a burst spreads."""

    name = "least_loaded"

    @staticmethod
    def prefill_score(e: WorkerEntry) -> tuple:
        return (e.load.waiting + e.load.running + e.load.inflight + e.pending,)

    @staticmethod
    def decode_score(e: WorkerEntry) -> tuple:
        used = 1.0 - (e.load.free_blocks / e.load.total_blocks) if e.load.total_blocks else 0.0
        return (e.load.running + e.load.waiting_for_kv + e.load.inflight + e.pending, round(used, 2))

    def choose(self, prefills, decodes, prompt_tokens, prompt=None):
        best = None
        for p, d, t in _pairs(prefills, decodes):
            key = (self.prefill_score(p) + self.decode_score(d), transport_rank(t, p.info, d.info))
            if best is None or key < best[0]:
                best = (key, p, d, t)
        if best is None:
            raise NoRoute("no prefill/decode pair shares a transport")
        _, p, d, t = best
        reason = (f"{self.name}: prefill {p.worker_id} load={self.prefill_score(p)[0]}, "
                  f"decode {d.worker_id} load={self.decode_score(d)[0]} kv_used={self.decode_score(d)[1]}, transport={t}")
        return p, d, t, reason

    def choose_colocated(self, workers, prompt_tokens, prompt=None):
        def score(e: WorkerEntry) -> tuple:
            return (self.prefill_score(e)[0] + e.load.waiting_for_kv, self.decode_score(e)[1])

        w = min(workers, key=score)
        return w, f"{self.name}: colocated {w.worker_id} load={score(w)[0]} kv_used={score(w)[1]}"


class RoundRobinPolicy(BaseRoutingPolicy):
    """Deterministic rotation over compatible pairs (tests and debugging)."""

    name = "round_robin"

    def __init__(self) -> None:
        self.counter = 0

    def choose(self, prefills, decodes, prompt_tokens, prompt=None):
        pairs = sorted(_pairs(prefills, decodes), key=lambda x: (x[0].worker_id, x[1].worker_id))
        if not pairs:
            raise NoRoute("no prefill/decode pair shares a transport")
        p, d, t = pairs[self.counter % len(pairs)]
        self.counter += 1
        return p, d, t, f"{self.name}: pair {self.counter - 1} of {len(pairs)}"

    def choose_colocated(self, workers, prompt_tokens, prompt=None):
        ordered = sorted(workers, key=lambda e: e.worker_id)
        w = ordered[self.counter % len(ordered)]
        self.counter += 1
        return w, f"{self.name}: colocated {self.counter - 1} of {len(ordered)}"


TIER_WEIGHTS = {"device": 1.0, "host": 0.8, "disk": 0.5}
"""What a cached block is worth by where it is: on the device it costs nothing, from host memory a
copy, from disk a read and a copy (a block held in several tiers counts in the best)."""


class KVAwarePolicy(LeastLoadedPolicy):
    """Routing by cached prefix (llm-d's precise prefix-cache scorer, SGLang's cache-aware router):
    the worker computing the prompt is the one with the best mix of cached prefix and load,
    ``cached - load_weight * load``, where ``cached`` is the share of the prompt's blocks that the
    worker holds as a chain from the first block, each weighted by its best tier (``TIER_WEIGHTS``),
    and ``load`` its queued + running + in-flight requests (plus routes since its last heartbeat).
    So a prompt goes where its prefix is unless that worker is ``1 / load_weight`` requests busier
    per prompt cached; with no hints (or no prompt sent) it is least-loaded.  The decode worker is
    the least loaded one that pairs with it."""

    name = "kv_aware"

    def __init__(self, load_weight: float = 0.1) -> None:
        self.load_weight = load_weight

    @staticmethod
    def cached(e: WorkerEntry, prompt: Prompt) -> tuple[float, int]:
        """(weighted share of the prompt's blocks held as a chain from the first, blocks held)."""
        hashes = prompt.hashes(e.info.kv_layout.block_size or 1)
        if not hashes or not e.kv:
            return 0.0, 0
        tiers = [(TIER_WEIGHTS.get(t, 0.0), held) for t, held in e.kv.items()]
        tiers.sort(key=lambda x: -x[0])
        total, n = 0.0, 0
        for h in hashes:
            w = next((w for w, held in tiers if h in held), None)
            if w is None:
                break
            total += w
            n += 1
        return total / max(1, len(prompt.token_ids) // max(1, e.info.kv_layout.block_size)), n

    def _best(self, workers: list[WorkerEntry], prompt: Prompt, load) -> tuple[WorkerEntry, str]:
        def score(e: WorkerEntry) -> tuple:
            share, _ = self.cached(e, prompt)
            return (-(share - self.load_weight * load(e)), load(e))

        w = min(workers, key=score)
        share, n = self.cached(w, prompt)
        return w, f"cached={n} blocks ({share:.2f} weighted) load={load(w)}"

    def choose(self, prefills, decodes, prompt_tokens, prompt=None):
        if prompt is None:
            return super().choose(prefills, decodes, prompt_tokens)
        pairable = [p for p in prefills if any(pair_transport(p, d) for d in decodes)]
        if not pairable:
            raise NoRoute("no prefill/decode pair shares a transport")
        p, why = self._best(pairable, prompt, lambda e: self.prefill_score(e)[0])
        d, t = min(((d, t) for d in decodes if (t := pair_transport(p, d)) is not None),
                   key=lambda x: (self.decode_score(x[0]), transport_rank(x[1], p.info, x[0].info)))
        return p, d, t, f"{self.name}: prefill {p.worker_id} {why}, decode {d.worker_id} load={self.decode_score(d)[0]}, transport={t}"

    def choose_colocated(self, workers, prompt_tokens, prompt=None):
        if prompt is None:
            return super().choose_colocated(workers, prompt_tokens)
        w, why = self._best(workers, prompt, lambda e: self.prefill_score(e)[0] + e.load.waiting_for_kv)
        return w, f"{self.name}: colocated {w.worker_id} {why}"


PolicyName = Literal["least-loaded", "kv-aware", "round-robin"]
POLICIES: dict[str, type[BaseRoutingPolicy]] = {"least-loaded": LeastLoadedPolicy, "kv-aware": KVAwarePolicy,
                                                "round-robin": RoundRobinPolicy}


def route(registry: Registry, policy: BaseRoutingPolicy, model: str, prompt_tokens: int,
          exclude: Sequence[str] = (), colocate_below_tokens: int = 1024,
          prompt_ids: Sequence[int] = ()) -> tuple[WorkerEntry, WorkerEntry, str, str]:
    """(prefill, decode, transport, reason) for one request; a colocated route has
    prefill is decode and transport ``LOCAL``.  ``prompt_ids``: the prompt, when sent (routing by
    cached prefix).  Raises NoRoute."""
    prompt = Prompt(prompt_ids) if prompt_ids else None
    prefills = registry.routable(pb.ROLE_PREFILL, model, exclude)
    decodes = registry.routable(pb.ROLE_DECODE, model, exclude)
    both = registry.routable(pb.ROLE_BOTH, model, exclude)
    for e in list(prefills) + list(decodes) + list(both):
        if e.info.max_model_len and prompt_tokens >= e.info.max_model_len:
            raise NoRoute(f"prompt of {prompt_tokens} tokens does not fit max_model_len {e.info.max_model_len}")
    if both and (not any(_pairs(prefills, decodes)) or prompt_tokens < colocate_below_tokens):
        w, reason = policy.choose_colocated(both, prompt_tokens, prompt)
        w.pending += 1
        return w, w, LOCAL, reason
    if not prefills or not decodes:
        raise NoRoute(f"no {'prefill' if not prefills else 'decode'} worker available for model {model!r}")
    p, d, t, reason = policy.choose(prefills, decodes, prompt_tokens, prompt)
    p.pending += 1
    d.pending += 1
    return p, d, t, reason
