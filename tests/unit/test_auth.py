"""Mesh-secret tokens and certificate identities (``pdmesh.rpc.auth``): what verifies, what does
not (another secret, another method, a replay, a stale or future stamp, a forged role), the
bounded replay memory, and the start-up rules."""

from __future__ import annotations

import os

import pytest

from pdmesh.log import StartupError
from pdmesh.rpc.auth import (METADATA_KEY, AuthError, Identity, InsecureAuthenticator, InternalAuthConfig,
                             MeshSecretAuthenticator, TlsIdentityAuthenticator, build_authenticator,
                             identity_from_certificate)
from pdmesh.rpc.tls import PLAINTEXT

SECRET = b"s" * 64
METHOD = "/pdmesh.v1.Scheduler/Route"


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def pair(role="gateway", ident="gw-1", clock=None, secret=SECRET, **kw):
    clock = clock or Clock()
    me = MeshSecretAuthenticator(secret, lambda: Identity(role, ident), clock=clock, **kw)
    server = MeshSecretAuthenticator(SECRET, lambda: Identity("scheduler", "scheduler"), clock=clock, **kw)
    return me, server, clock


def test_a_token_names_its_caller_and_verifies_once():
    me, server, _ = pair(ident="decode 127.0.0.1:5 é")  # ids may hold spaces, colons, any text
    md = me.metadata(METHOD)
    assert [k for k, _ in md] == [METADATA_KEY]
    assert server.authenticate(METHOD, md, {}) == Identity("gateway", "decode 127.0.0.1:5 é")
    with pytest.raises(AuthError, match="replayed"):
        server.authenticate(METHOD, md, {})


@pytest.mark.parametrize("tamper,match", [
    (lambda t: t.replace("v1.gateway.", "v1.decode."), "does not verify"),    # a forged role
    (lambda t: t[:-1] + ("0" if t[-1] != "0" else "1"), "does not verify"),   # a forged MAC
    (lambda t: "v2" + t[2:], "malformed"),
    (lambda t: t.rsplit(".", 1)[0], "malformed"),
    (lambda t: "garbage", "malformed"),
])
def test_tampered_tokens_are_refused(tamper, match):
    me, server, _ = pair()
    (key, token), = me.metadata(METHOD)
    with pytest.raises(AuthError, match=match):
        server.authenticate(METHOD, ((key, tamper(token)),), {})


def test_another_secret_or_another_method_does_not_verify():
    me, server, _ = pair(secret=b"t" * 64)
    with pytest.raises(AuthError, match="does not verify"):
        server.authenticate(METHOD, me.metadata(METHOD), {})
    me, server, _ = pair()
    with pytest.raises(AuthError, match="does not verify"):  # a token for Route cannot open Register
        server.authenticate("/pdmesh.v1.Scheduler/Register", me.metadata(METHOD), {})


def test_no_token_is_unauthenticated():
    _, server, _ = pair()
    with pytest.raises(AuthError, match="no credentials"):
        server.authenticate(METHOD, (("traceparent", "x"),), {})


def test_stale_and_future_tokens_are_refused():
    me, server, clock = pair(max_skew=30.0)
    md = me.metadata(METHOD)
    clock.t += 31
    with pytest.raises(AuthError, match="old"):
        server.authenticate(METHOD, md, {})
    md = me.metadata(METHOD)
    clock.t -= 31
    with pytest.raises(AuthError, match="old"):
        server.authenticate(METHOD, md, {})
    clock.t += 29  # within the window: accepted
    assert server.authenticate(METHOD, md, {}).role == "gateway"


def test_replay_memory_is_bounded_and_never_accepts_a_token_twice():
    me, server, clock = pair(replay_capacity=8)
    tokens = []
    for _ in range(20):
        clock.t += 0.001
        md = me.metadata(METHOD)
        server.authenticate(METHOD, md, {})
        tokens.append(md)
    assert len(server._seen) <= 8
    for md in tokens:  # forgotten ones are refused by age, remembered ones as replays
        with pytest.raises(AuthError, match="replayed|replay window"):
            server.authenticate(METHOD, md, {})
    clock.t += 0.001
    assert server.authenticate(METHOD, me.metadata(METHOD), {}) == Identity("gateway", "gw-1")
    clock.t += 100  # expired nonces are forgotten
    server.authenticate(METHOD, me.metadata(METHOD), {})
    assert len(server._seen) == 1


def test_certificate_identities():
    ctx = lambda **kw: {k: [v.encode()] for k, v in kw.items()}  # noqa: E731 - grpc gives bytes
    assert identity_from_certificate(ctx(peer_spiffe_id="spiffe://corp.example/pdmesh/decode/d-7")) == Identity("decode", "d-7")
    assert identity_from_certificate(ctx(peer_uri="spiffe://x/pdmesh/gateway")) == Identity("gateway", "gateway")
    assert identity_from_certificate(ctx(x509_common_name="pdmesh-prefill-p0")) == Identity("prefill", "p0")
    assert identity_from_certificate(ctx(x509_common_name="pdmesh-service")) is None
    assert identity_from_certificate(ctx(peer_uri="spiffe://x/other/decode/d")) is None
    assert identity_from_certificate({}) is None


def test_tls_identity_falls_back_to_the_secret_for_certificates_without_a_role():
    me, secret, _ = pair(role="decode", ident="d1")
    auth = TlsIdentityAuthenticator(secret)
    with_role = {"peer_uri": [b"spiffe://d/pdmesh/prefill/p1"]}
    assert auth.authenticate(METHOD, (), with_role) == Identity("prefill", "p1")
    assert auth.authenticate(METHOD, me.metadata(METHOD), {"x509_common_name": [b"svc"]}) == Identity("decode", "d1")
    with pytest.raises(AuthError, match="names no pdmesh role"):
        TlsIdentityAuthenticator().authenticate(METHOD, (), {"x509_common_name": [b"svc"]})


def test_services_refuse_to_start_unauthenticated(tmp_path, monkeypatch):
    monkeypatch.delenv("PDMESH_MESH_SECRET", raising=False)
    who = lambda: Identity("prefill", "p")  # noqa: E731
    with pytest.raises(StartupError, match="--mesh-secret-file.*--insecure-internal"):
        build_authenticator(InternalAuthConfig(), PLAINTEXT, "prefill", who)
    assert isinstance(build_authenticator(InternalAuthConfig(insecure_internal=True), PLAINTEXT, "prefill", who),
                      InsecureAuthenticator)
    short = tmp_path / "short"
    short.write_text("tooshort\n")
    with pytest.raises(StartupError, match="at least 32"):
        build_authenticator(InternalAuthConfig(mesh_secret_file=str(short)), PLAINTEXT, "prefill", who)
    with pytest.raises(StartupError, match="No such file"):
        build_authenticator(InternalAuthConfig(mesh_secret_file=str(tmp_path / "absent")), PLAINTEXT, "prefill", who)
    good = tmp_path / "secret"
    good.write_text("a" * 64 + "\n")
    os.chmod(good, 0o600)
    auth = build_authenticator(InternalAuthConfig(mesh_secret_file=str(good)), PLAINTEXT, "prefill", who)
    assert isinstance(auth, MeshSecretAuthenticator) and auth.whoami() == Identity("prefill", "p")
    monkeypatch.setenv("PDMESH_MESH_SECRET", "b" * 40)
    assert isinstance(build_authenticator(InternalAuthConfig(), PLAINTEXT, "prefill", who), MeshSecretAuthenticator)
    with pytest.raises(ValueError, match="not both"):
        InternalAuthConfig(mesh_secret_file=str(good), insecure_internal=True)


def test_every_internal_method_is_in_the_authorization_table():
    """Default deny: a method missing from POLICY would be refused to everyone (a new RPC must be
    given its roles), and every entry names a real method."""
    from pdmesh.rpc.authz import POLICY, WORKERS
    from pdmesh.v1 import decode_pb2, kv_transfer_pb2, prefill_pb2, scheduler_pb2

    methods = {f"/{svc.full_name}/{m.name}" for mod in (scheduler_pb2, prefill_pb2, kv_transfer_pb2, decode_pb2)
               for svc in mod.DESCRIPTOR.services_by_name.values() for m in svc.methods}
    assert methods == set(POLICY), (methods ^ set(POLICY))
    assert all(roles and roles <= WORKERS | {"gateway"} for roles in POLICY.values())  # the scheduler calls nobody
