"""Test certificates: a CA and a certificate it signed for localhost / 127.0.0.1."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path


def make_certs(tmp: Path) -> dict[str, str]:
    """Write ca.pem, cert.pem and key.pem (EC P-256, valid for a day) into ``tmp``; their paths by name."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def make(name, issuer=None, issuer_key=None, ca=False):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer or subject).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                             x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        return key, b.sign(issuer_key or key, hashes.SHA256())

    ca_key, ca = make("pdmesh-test-ca", ca=True)
    key, cert = make("pdmesh-service", ca.subject, ca_key)
    paths = {}
    for name, data in (("ca.pem", ca.public_bytes(serialization.Encoding.PEM)),
                       ("cert.pem", cert.public_bytes(serialization.Encoding.PEM)),
                       ("key.pem", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))):
        (tmp / name).write_bytes(data)
        paths[name] = str(tmp / name)
    return paths
