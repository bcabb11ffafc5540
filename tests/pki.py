"""A test CA with a server certificate (localhost, 127.0.0.1) and a client certificate, as PEM files."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def certificate(subject: str, key, issuer_key=None, issuer=None, ca: bool = False, server: bool = False):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def make_pki(directory: Path) -> dict[str, Path]:
    """ca.crt, server.crt/.key, client.crt/.key in `directory`, by file name."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate("test CA", ca_key, ca=True)
    files = {"ca": ca}
    for name, server in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        files[name] = certificate(name, key, ca_key, ca.subject, server=server)
        (directory / f"{name}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    for name, cert in files.items():
        (directory / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return {p.name: p for p in directory.iterdir()}
