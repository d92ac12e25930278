"""KV capabilities: a descriptor is something to check, never something to trust.

When a prefill worker puts a request's KV under a lease, it issues with the descriptor an
unguessable **lease token** (256 random bits) and the **prompt hash** (SHA-256 of the prompt's
token ids as little-endian int32).  The lease table keeps the truth: blocks, token count, prompt
hash, token.  What the token grants:

* ``Pull`` of blocks of that lease, and only for the prompt the KV was computed for: the pull
  names its prompt's length and hash, and both must be the lease's;
* ``Release`` of that lease;
* nothing once the lease ended (released, aborted, expired: ``--kv-lease-seconds`` after the last
  pull, and in any case ``--kv-lease-max-seconds`` after it was made — an open pull included).

The first decode identity that pulls with the token becomes the lease's **holder**: from then on
no other identity may pull it, and only the holder or the request's own gateway may release it.

On the decode side, ``check_descriptor`` runs before anything is allocated, pulled or cached: the
descriptor's token count and prompt hash must match the prompt the gateway sent (so KV computed
for another prompt can never enter the prefix cache under this prompt's block hashes).

Every check compares in constant time; a refusal names what did not match, never the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Optional, Protocol, Sequence

import numpy as np

TOKEN_BYTES = 32


class Grant(Protocol):
    """What a lease records of its capability (``pdmesh.transport.lease.Lease``)."""

    token: str
    prompt_hash: bytes
    num_tokens: int
    holder: Optional[str]


def new_token() -> str:
    """A fresh lease token (URL-safe text of ``TOKEN_BYTES`` random bytes)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def prompt_hash(token_ids: Sequence[int]) -> bytes:
    """SHA-256 of the token ids as little-endian int32 (32 bytes)."""
    return hashlib.sha256(np.asarray(token_ids, dtype="<i4").tobytes()).digest()


def _token_ok(grant: Grant, presented: str) -> bool:
    return bool(grant.token) and hmac.compare_digest(grant.token.encode(), presented.encode())


def authorize_pull(grant: Grant, token: str, num_tokens: int, hash_: bytes, who: str) -> Optional[str]:
    """None when ``who`` may pull this lease's KV for a prompt of ``num_tokens`` tokens hashing to
    ``hash_`` (``who`` becomes the holder if there is none yet); else why not."""
    if not _token_ok(grant, token):
        return "the lease token does not match"
    if num_tokens != grant.num_tokens or not hmac.compare_digest(hash_, grant.prompt_hash):
        return "the KV was computed for another prompt (token count or prompt hash differ)"
    if grant.holder is not None and grant.holder != who:
        return "the lease is held by another decode worker"
    grant.holder = who
    return None


def authorize_release(grant: Grant, token: str, who: str, owner: Optional[str]) -> Optional[str]:
    """None when ``who`` may end this lease (its token, and: the request's gateway ``owner``, the
    holder, or any decode worker while there is no holder); else why not."""
    if not _token_ok(grant, token):
        return "the lease token does not match"
    if who != owner and grant.holder is not None and grant.holder != who:
        return "the lease is held by another decode worker"
    return None


def check_descriptor(num_tokens: int, hash_: bytes, prompt: Sequence[int]) -> Optional[str]:
    """Decode side, before caching anything: None when the descriptor's token count and prompt
    hash are those of ``prompt``; else why not."""
    if num_tokens != len(prompt):
        return f"the descriptor holds KV of {num_tokens} tokens, the prompt has {len(prompt)}"
    if not hmac.compare_digest(hash_, prompt_hash(prompt)):
        return "the descriptor's prompt hash does not match the prompt"
    return None
