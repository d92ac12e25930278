"""A throw-away PKI for TLS tests: one CA and certificates for 127.0.0.1/localhost, each with the
common name and (optionally) the SPIFFE URI that names a pdmesh identity."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Optional


def make_pki(tmp: Path, certs: dict[str, tuple[str, Optional[str]]]) -> dict[str, dict[str, str]]:
    """``certs``: name -> (common name, URI SAN or None).  Returns name -> {"cert", "key", "ca"} paths
    (PEM files in ``tmp``), plus "ca" -> {"cert"}."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def make(cn: str, uri: Optional[str] = None, issuer=None, issuer_key=None, ca: bool = False):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer or subject).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            if uri:
                names.append(x509.UniformResourceIdentifier(uri))
            b = b.add_extension(x509.SubjectAlternativeName(names), False)
        return key, b.sign(issuer_key or key, hashes.SHA256())

    def write(name: str, data: bytes) -> str:
        (tmp / name).write_bytes(data)
        return str(tmp / name)

    ca_key, ca = make("pdmesh-test-ca", ca=True)
    ca_path = write("ca.pem", ca.public_bytes(serialization.Encoding.PEM))
    out = {"ca": {"cert": ca_path}}
    for name, (cn, uri) in certs.items():
        key, cert = make(cn, uri, ca.subject, ca_key)
        out[name] = {
            "cert": write(f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM)),
            "key": write(f"{name}-key.pem", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                              serialization.NoEncryption())),
            "ca": ca_path,
        }
    return out


def tls_flags(paths: dict[str, str]) -> tuple[str, ...]:
    """The --tls-* flags of one certificate from ``make_pki``."""
    return ("--tls-cert", paths["cert"], "--tls-key", paths["key"], "--tls-ca", paths["ca"])


def make_certs(tmp: Path) -> dict[str, str]:
    """One service certificate (no pdmesh identity) and its CA: the paths of ca.pem, cert.pem and
    key.pem by those names."""
    paths = make_pki(tmp, {"cert": ("pdmesh-service", None)})["cert"]
    return {"ca.pem": paths["ca"], "cert.pem": paths["cert"], "key.pem": paths["key"]}
