"""API keys: one check for every front end (HTTP and the gRPC API)."""

from __future__ import annotations

import hmac
from typing import Optional

UNAUTHORIZED = "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'."


def authorize(keys: frozenset[str], authorization: Optional[str]) -> bool:
    """Whether an ``Authorization`` value (``Bearer <key>``) carries one of ``keys``; True when no
    key is configured.  Every key is compared, in constant time, whatever matches first."""
    if not keys:
        return True
    scheme, _, token = (authorization or "").partition(" ")
    given = token.strip().encode()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, key.encode())
    return ok and scheme.lower() == "bearer"
