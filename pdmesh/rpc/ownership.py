"""Which identity owns each live request on a worker.

A request id is claimed by the identity that started it (``Prefill.Prefill``, ``Decode.Generate``)
and stays claimed while the request lives there (on a prefill worker: until its KV lease ends).
Invariants: a claimed id cannot be claimed again (a second ``Generate`` with a live id is refused
instead of replacing the first one's stream); only the owner may abort it.  Under
``--insecure-internal`` every caller is the same anonymous identity, so ownership holds trivially.
"""

from __future__ import annotations

from typing import Optional

from pdmesh.rpc.auth import Identity


class RequestOwners:
    def __init__(self) -> None:
        self._owners: dict[str, Identity] = {}

    def claim(self, request_id: str, who: Identity) -> bool:
        """Record ``who`` as the owner of ``request_id``; False when the id is in use."""
        if request_id in self._owners:
            return False
        self._owners[request_id] = who
        return True

    def owner(self, request_id: str) -> Optional[Identity]:
        return self._owners.get(request_id)

    def may_control(self, request_id: str, who: Identity) -> bool:
        """Whether ``who`` may abort or release ``request_id`` (its owner; an unknown id: nobody)."""
        return self._owners.get(request_id) == who

    def drop(self, request_id: str) -> None:
        self._owners.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._owners)
