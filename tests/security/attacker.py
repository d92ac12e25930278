"""The attacker's tools: gRPC calls to the mesh's internal services with no credentials, a wrong
mesh secret, or a mesh member's credentials under another identity; each returns the status code."""

from __future__ import annotations

import asyncio
from typing import Callable, Optional, Union

import grpc
import httpx

from pdmesh.rpc.auth import Identity, MeshSecretAuthenticator
from pdmesh.rpc.channels import open_channel
from pdmesh.v1 import common_pb2 as pb
from tests.faults.client import Load, nothing_lost
from tests.meshproc import list_workers, mesh_auth

KEY = "security-suite-key"
"""The API key of the suite's gateway."""
PULL_DELAY = 0.5
"""Seconds before each KV chunk a pull serves (--inject-kv-faults delay): a 300-token prompt's pull
takes 2 s, long enough for the attacker to act while the victim's KV is leased."""
LEASE_MAX_S = 12.0
"""--kv-lease-max-seconds of the suite's prefill worker."""
HEADER_TIMEOUT = 2.0
MAX_CONNECTIONS = 128
EVIL_GATEWAY = Identity("gateway", "gateway@evil:1")
EVIL_DECODE = Identity("decode", "decode-evil")

NONE = "no_credentials"
WRONG = "wrong_secret"
Cred = Union[str, Identity]
"""NONE, WRONG, or the identity a mesh member claims."""


def authenticator(cred: Cred) -> Optional[MeshSecretAuthenticator]:
    if cred == NONE:
        return None
    if cred == WRONG:
        return MeshSecretAuthenticator(b"not-the-mesh-secret" * 4, lambda: Identity("gateway", "attacker"))
    assert isinstance(cred, Identity)
    return mesh_auth(cred.role, cred.id)


def attempt(address: str, stub_cls, cred: Cred, call: Callable, timeout: float = 10.0) -> tuple[str, object]:
    """Run ``call(stub)`` (a coroutine, or a stream call whose messages are read) against ``address``
    with ``cred``; (status code name, the response or the messages read)."""
    async def go():
        async with open_channel(address, auth=authenticator(cred)) as ch:
            res = call(stub_cls(ch))
            if hasattr(res, "__aiter__"):
                return [m async for m in res]
            return await res

    try:
        return "OK", asyncio.run(asyncio.wait_for(go(), timeout))
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, exc.details()


def code(address: str, stub_cls, cred: Cred, call: Callable, timeout: float = 10.0) -> str:
    return attempt(address, stub_cls, cred, call, timeout)[0]


def workers(mesh) -> dict[int, pb.WorkerInfo]:
    """The mesh's workers by role."""
    return {w.info.role: w.info for w in list_workers(mesh.scheduler)}


def auth_headers() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def greedy(mesh, prompt, max_tokens: int) -> str:
    """A user's greedy completion through the gateway (the reference the attacks must not change)."""
    r = httpx.post(mesh.base + "/v1/completions", headers=auth_headers(), timeout=120,
                   json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def users(mesh) -> Load:
    """Users streaming through the gateway in the background while an attack runs."""
    return Load(mesh.base, max_tokens=16, loops=3, api_key=KEY)


def finish(mesh, load: Load, before: dict) -> int:
    """Stop the users: every request of theirs succeeded, and nothing was lost (blocks leaked: 0)."""
    load.finish()
    assert load.tally.outcomes and all(o.kind == "ok" for o in load.tally.outcomes), load.tally.summary()
    return nothing_lost(mesh.scheduler, mesh.metrics_url("gateway"), load.tally, before, expect_workers=2)
