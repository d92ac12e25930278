"""Who is calling: identities and the authentication of the mesh's internal gRPC calls.

Every service has an identity: a role (``gateway``, ``scheduler``, ``prefill``, ``decode``,
``both`` for a colocated worker) and an id (a worker's id, ``gateway@host:port``, ``scheduler``).
Every internal call proves its caller's identity in one of two ways:

* **mutual TLS** (``--tls-cert --tls-key --tls-ca``) with certificates that name the identity: a URI
  SAN ``spiffe://<trust domain>/pdmesh/<role>[/<id>]`` (or a common name ``pdmesh-<role>[-<id>]``).
  The CA vouches for the role; nothing travels in the call.
* **the mesh secret** (``--mesh-secret-file`` or ``PDMESH_MESH_SECRET``), shared by every service:
  each call carries ``pdmesh-auth: v1.<role>.<id>.<unix ms>.<nonce>.<mac>``, an HMAC-SHA256 under a
  key derived from the secret over role, id, time, a random nonce and the method called.  A server
  accepts a token once (nonces are remembered for the window), within ``--auth-max-skew`` seconds of
  its own clock, and for that method only.  The secret proves membership of the mesh; the role and
  id are asserted by a member (mTLS is what makes a role unforgeable by another member).

TLS certificates that name no pdmesh identity still encrypt and authenticate the transport; the
mesh secret then names the caller.  A service with neither refuses to start unless told
``--insecure-internal`` (``InsecureAuthenticator``: every caller is the same anonymous identity and
every call is allowed — for a trusted loopback only).
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import hmac
import logging
import re
import secrets
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from pdmesh.config import _require
from pdmesh.env import ENV
from pdmesh.log import StartupError
from pdmesh.rpc.tls import TlsConfig

log = logging.getLogger(__name__)

ROLES = ("gateway", "scheduler", "prefill", "decode", "both")
"""Roles of the mesh's services ('both': a colocated worker)."""
METADATA_KEY = "pdmesh-auth"
"""gRPC metadata key of a mesh-secret token."""
MIN_SECRET_CHARS = 32
_SPIFFE = re.compile(r"^spiffe://[^/]+/pdmesh/(" + "|".join(ROLES) + r")(?:/(.+))?$")
_CN = re.compile(r"^pdmesh-(" + "|".join(ROLES) + r")(?:-(.+))?$")


@dataclass(frozen=True)
class Identity:
    """A caller: its role and its id (unique per role)."""

    role: str
    id: str

    def __str__(self) -> str:
        return f"{self.role}/{self.id}"


ANONYMOUS = Identity("insecure", "anonymous")
"""Every caller under ``--insecure-internal``."""


class AuthError(Exception):
    """A call's credentials are missing, malformed, forged, expired or replayed (UNAUTHENTICATED)."""


class BaseAuthenticator(ABC):
    """Proves this process's identity on its outgoing calls and checks the identity of incoming ones.

    Invariants: ``authenticate`` returns an identity only from verified evidence (a certificate the
    TLS handshake checked against the CA, or a token whose MAC, time and nonce check out); anything
    else raises ``AuthError``.  ``metadata`` is called once per outgoing call and never blocks.
    """

    enforcing: bool = True
    """False only for ``InsecureAuthenticator``: roles and owners are not checked."""

    @abstractmethod
    def metadata(self, method: str) -> tuple[tuple[str, str], ...]:
        """gRPC metadata proving this process's identity on a call of ``method`` (``/pkg.Service/Method``)."""

    @abstractmethod
    def authenticate(self, method: str, metadata: Sequence[tuple[str, object]], auth_context: Mapping[str, list]) -> Identity:
        """The verified identity of the caller of ``method``; raises ``AuthError``."""


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _unb64(text: str) -> str:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()


class MeshSecretAuthenticator(BaseAuthenticator):
    """HMAC tokens under the shared mesh secret, bound to role, id, time, a nonce and the method.

    A token is accepted once: nonces are remembered until their token expires; beyond
    ``replay_capacity`` remembered nonces the oldest are forgotten and tokens stamped at or before
    the forgotten ones are refused from then on, so the memory stays bounded and no token is ever
    accepted twice."""

    def __init__(self, secret: bytes, whoami: Callable[[], Identity], max_skew: float = 30.0,
                 clock: Callable[[], float] = time.time, replay_capacity: int = 1 << 18) -> None:
        self._key = hmac.new(secret, b"pdmesh mesh-secret v1", hashlib.sha256).digest()
        self.whoami = whoami
        """This process's identity (read per call: a worker's id is known once its port is bound)."""
        self.max_skew = max_skew
        self._clock = clock
        self._capacity = replay_capacity
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()
        """nonce -> unix time its token expires, in arrival order."""
        self._floor = 0.0
        """Tokens stamped at or before this unix time are refused (their nonces may be forgotten)."""

    def _mac(self, body: str, method: str) -> str:
        return hmac.new(self._key, f"{body}.{method}".encode(), hashlib.sha256).hexdigest()

    def metadata(self, method: str) -> tuple[tuple[str, str], ...]:
        me = self.whoami()
        body = f"v1.{me.role}.{_b64(me.id)}.{int(self._clock() * 1000)}.{secrets.token_hex(12)}"
        return ((METADATA_KEY, f"{body}.{self._mac(body, method)}"),)

    def authenticate(self, method, metadata, auth_context) -> Identity:
        token = next((v for k, v in metadata if k == METADATA_KEY), None)
        if token is None:
            raise AuthError(f"no credentials (the '{METADATA_KEY}' token of the mesh secret, or a client certificate naming a pdmesh role)")
        if isinstance(token, bytes):
            token = token.decode(errors="replace")
        parts = token.split(".")
        if len(parts) != 6 or parts[0] != "v1" or parts[1] not in ROLES or not parts[3].isdigit():
            raise AuthError("malformed mesh-secret token")
        body = ".".join(parts[:5])
        if not hmac.compare_digest(parts[5], self._mac(body, method)):
            raise AuthError("mesh-secret token does not verify (another secret, or made for another method)")
        try:
            ident = Identity(parts[1], _unb64(parts[2]))
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise AuthError("malformed mesh-secret token") from None
        stamped, now, nonce = int(parts[3]) / 1000.0, self._clock(), parts[4]
        if abs(now - stamped) > self.max_skew:
            raise AuthError(f"mesh-secret token is {now - stamped:+.0f}s old (allowed: {self.max_skew:.0f}s; clocks in sync?)")
        if stamped <= self._floor:
            raise AuthError("mesh-secret token is older than the replay window")
        while self._seen and next(iter(self._seen.values())) < now:
            self._seen.popitem(last=False)
        if nonce in self._seen:
            raise AuthError("mesh-secret token replayed")
        self._seen[nonce] = stamped + self.max_skew
        if len(self._seen) > self._capacity:
            _, expiry = self._seen.popitem(last=False)
            self._floor = max(self._floor, expiry - self.max_skew)
        return ident


def identity_from_certificate(auth_context: Mapping[str, list]) -> Optional[Identity]:
    """The pdmesh identity named by a peer's verified client certificate (URI SAN, then CN), or None."""
    def values(key: str) -> list[str]:
        return [v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in auth_context.get(key, ())]

    for uri in values("peer_spiffe_id") + values("peer_uri"):
        m = _SPIFFE.match(uri)
        if m:
            return Identity(m.group(1), m.group(2) or m.group(1))
    for cn in values("x509_common_name"):
        m = _CN.match(cn)
        if m:
            return Identity(m.group(1), m.group(2) or m.group(1))
    return None


class TlsIdentityAuthenticator(BaseAuthenticator):
    """The caller's identity from its client certificate (mutual TLS); nothing travels in the call.
    With a mesh secret as well, callers whose certificate names no pdmesh role prove themselves with
    a token instead."""

    def __init__(self, secret: Optional[MeshSecretAuthenticator] = None) -> None:
        self.secret = secret

    def metadata(self, method: str) -> tuple[tuple[str, str], ...]:
        return self.secret.metadata(method) if self.secret is not None else ()

    def authenticate(self, method, metadata, auth_context) -> Identity:
        ident = identity_from_certificate(auth_context)
        if ident is not None:
            return ident
        if self.secret is not None:
            return self.secret.authenticate(method, metadata, auth_context)
        raise AuthError("the client certificate names no pdmesh role (URI SAN spiffe://DOMAIN/pdmesh/ROLE/ID)")


class InsecureAuthenticator(BaseAuthenticator):
    """``--insecure-internal``: no credentials sent, every caller is ``ANONYMOUS``, nothing is checked."""

    enforcing = False

    def metadata(self, method: str) -> tuple[tuple[str, str], ...]:
        return ()

    def authenticate(self, method, metadata, auth_context) -> Identity:
        return ANONYMOUS


@dataclass(frozen=True)
class InternalAuthConfig:
    """Authentication of the mesh's internal gRPC calls (with --tls-*: mutual TLS identities)."""

    mesh_secret_file: Optional[str] = None
    """File holding the mesh secret shared by every service (its first line, at least 32 characters,
    e.g. from 'openssl rand -hex 32'); or set PDMESH_MESH_SECRET. Every internal call then carries a
    token under it. 'pdmesh up' makes one for its children."""
    insecure_internal: bool = False
    """Make and accept internal calls without authentication (no mesh secret, no TLS identities):
    anyone who reaches a port can register workers, route, pull KV or abort requests. Only for a
    trusted loopback; logged loudly at start."""
    auth_max_skew: float = 30.0
    """Seconds a mesh-secret token stays valid around its time stamp (clock skew between hosts plus
    transit); each token is accepted once."""

    def __post_init__(self) -> None:
        _require(self.auth_max_skew > 0, "auth_max_skew", "must be > 0")
        _require(not (self.insecure_internal and self.mesh_secret_file), "insecure_internal",
                 "give --mesh-secret-file or --insecure-internal, not both")

    def secret(self) -> Optional[bytes]:
        """The mesh secret (file, else PDMESH_MESH_SECRET), or None; ``StartupError`` when unusable."""
        if self.mesh_secret_file:
            path = Path(self.mesh_secret_file)
            try:
                lines = path.read_text().splitlines()
            except OSError as exc:
                raise StartupError(f"--mesh-secret-file {path}: {exc.strerror or exc}") from None
            text = lines[0].strip() if lines else ""
            if path.stat().st_mode & 0o077:
                log.warning("--mesh-secret-file %s is readable by other users (chmod 600 it)", path)
            source = f"--mesh-secret-file {path}"
        else:
            text, source = ENV.MESH_SECRET.get().strip(), "PDMESH_MESH_SECRET"
            if not text:
                return None
        if len(text) < MIN_SECRET_CHARS:
            raise StartupError(f"{source}: the mesh secret must have at least {MIN_SECRET_CHARS} characters "
                               "(e.g. 'openssl rand -hex 32')")
        return text.encode()


def certificate_identity(cert_path: str) -> Optional[Identity]:
    """The pdmesh identity named in a PEM certificate file (None when it names none, or when this
    Python cannot decode certificates)."""
    import ssl

    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:  # pragma: no cover - CPython has it
        return None
    info = decode(cert_path)
    ctx = {"peer_uri": [v for k, v in info.get("subjectAltName", ()) if k == "URI"],
           "x509_common_name": [v for rdn in info.get("subject", ()) for k, v in rdn if k == "commonName"]}
    return identity_from_certificate(ctx)


def build_authenticator(cfg: InternalAuthConfig, tls: TlsConfig, role: str, whoami: Callable[[], Identity]
                        ) -> BaseAuthenticator:
    """This service's authenticator from its flags; ``StartupError`` (one line naming the flags)
    when internal calls would be unauthenticated without ``--insecure-internal``."""
    assert role in ROLES, role
    if cfg.insecure_internal:
        if tls.enabled and tls.tls_ca:
            raise StartupError("--insecure-internal conflicts with mutual TLS (--tls-ca): drop one")
        log.warning("INSECURE: --insecure-internal: internal gRPC calls are neither authenticated nor "
                    "authorized; anyone who reaches this service's port can register, route, pull KV and abort requests")
        return InsecureAuthenticator()
    key = cfg.secret()
    secret = MeshSecretAuthenticator(key, whoami, cfg.auth_max_skew) if key is not None else None
    if tls.enabled and tls.tls_ca:
        own = certificate_identity(tls.tls_cert)  # type: ignore[arg-type]
        if own is not None and own.role != role:
            raise StartupError(f"--tls-cert {tls.tls_cert} names role '{own.role}', but this is the {role}")
        if own is None and secret is None:
            raise StartupError(f"--tls-cert {tls.tls_cert} names no pdmesh role (URI SAN spiffe://DOMAIN/pdmesh/{role}/ID "
                               "or CN pdmesh-ROLE-ID): give certificates that do, or a mesh secret as well")
        return TlsIdentityAuthenticator(secret)
    if secret is None:
        raise StartupError("internal gRPC calls would be unauthenticated: give --mesh-secret-file FILE (or "
                           "PDMESH_MESH_SECRET), or mutual TLS (--tls-cert --tls-key --tls-ca); "
                           "--insecure-internal runs without (trusted loopback only)")
    return secret
