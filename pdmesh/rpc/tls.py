"""TLS for the mesh's internal gRPC (scheduler, prefill, decode, and the gateway as their client).

Off by default (one host, loopback).  Across hosts give every service the same three flags: its
certificate and key (presented as a server and, to its peers, as a client) and the CA bundle that
every peer's certificate must chain to.  With a CA given, servers require client certificates
(mutual TLS): a process without a certificate from that CA cannot register, route, prefill, pull
KV or release anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import grpc

from pdmesh.config import _require


@dataclass(frozen=True)
class TlsConfig:
    """Internal gRPC transport security."""

    tls_cert: Optional[str] = None
    """PEM certificate chain this service presents (as a server, and as a client to its peers); off when unset."""
    tls_key: Optional[str] = None
    """PEM private key of --tls-cert."""
    tls_ca: Optional[str] = None
    """PEM CA bundle peers' certificates must chain to (servers then require client certificates)."""
    tls_server_name: Optional[str] = None
    """Name checked in peers' server certificates instead of the dialled host (for certificates issued to a
    service name while peers are dialled by IP)."""

    def __post_init__(self) -> None:
        _require(bool(self.tls_cert) == bool(self.tls_key), "tls_key", "give --tls-cert and --tls-key together")
        _require(not self.tls_ca or bool(self.tls_cert), "tls_ca", "--tls-ca needs --tls-cert and --tls-key")
        for name in ("tls_cert", "tls_key", "tls_ca"):
            path = getattr(self, name)
            _require(not path or Path(path).is_file(), name, f"no such file: {path}")

    @property
    def enabled(self) -> bool:
        return bool(self.tls_cert)

    def _read(self, path: Optional[str]) -> Optional[bytes]:
        return Path(path).read_bytes() if path else None

    def server_credentials(self) -> grpc.ServerCredentials:
        ca = self._read(self.tls_ca)
        return grpc.ssl_server_credentials([(self._read(self.tls_key), self._read(self.tls_cert))],
                                           root_certificates=ca, require_client_auth=ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self._read(self.tls_ca),
                                            private_key=self._read(self.tls_key),
                                            certificate_chain=self._read(self.tls_cert))

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.tls_server_name)] if self.enabled and self.tls_server_name else []


PLAINTEXT = TlsConfig()
