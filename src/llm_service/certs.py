"""Development certificates for mutual TLS: a CA, a server certificate and a client certificate.

``llm_service certs --out DIR`` writes them; tests use the same functions to make certificates
from other CAs or that have expired. Production deployments bring their own PKI.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["DEFAULT_SANS", "Issued", "issue", "new_ca", "write_dev_certs"]

DEFAULT_SANS = ("localhost", "127.0.0.1", "::1")
_DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    """A private key and its certificate."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "llm-service development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def new_ca(common_name: str = "llm-service development CA", *, days: int = 3650) -> Issued:
    """A self-signed CA certificate valid for ``days``."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _DAY)
        .not_valid_after(now + days * _DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(key, cert)


def issue(
    ca: Issued,
    common_name: str,
    *,
    server: bool,
    sans: Sequence[str] = (),
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> Issued:
    """A certificate signed by ``ca``, for a server (``server=True``) or a client.

    Args:
        ca: the issuing CA.
        common_name: the subject CN (also what an allow-list matches on).
        server: True for server authentication, False for client authentication.
        sans: DNS names and IP addresses for the subjectAltName extension.
        not_before: start of validity (default: one day ago).
        not_after: end of validity (default: one year from now).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - _DAY)
        .not_valid_after(not_after or now + 365 * _DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_san(s) for s in sans]), critical=False
        )
    return Issued(key, builder.sign(ca.key, hashes.SHA256()))


def _write(path: Path, data: bytes, mode: int) -> None:
    # The mode is set before anything is written (also on a file that already existed), so a
    # key is never readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.fchmod(fd, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_dev_certs(
    out: Path, *, sans: Sequence[str] = (), client_name: str = "llm-client"
) -> dict[str, Path]:
    """Write ca.crt/ca.key, server.crt/server.key and client.crt/client.key into ``out``.

    Keys are written with mode 0600, certificates 0644; ``out`` is created with mode 0700.
    The server certificate's SANs are localhost, 127.0.0.1, ::1 and ``sans``.

    Returns:
        The written files by name (``"ca.crt"``, ``"server.key"``, ...).
    """
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca = new_ca()
    server_sans = list(dict.fromkeys([*DEFAULT_SANS, *sans]))
    issued = {
        "ca": ca,
        "server": issue(ca, "llm-service", server=True, sans=server_sans),
        "client": issue(ca, client_name, server=False, sans=[client_name]),
    }
    written: dict[str, Path] = {}
    for stem, item in issued.items():
        for suffix, data, mode in (("crt", item.cert_pem, 0o644), ("key", item.key_pem, 0o600)):
            path = out / f"{stem}.{suffix}"
            _write(path, data, mode)
            written[path.name] = path
    return written
