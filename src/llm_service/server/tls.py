"""Mutual TLS for the gRPC port: credentials that re-read their files; client names."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from llm_service.errors import ConfigurationError
from llm_service.settings import ServiceSettings, read_pem

__all__ = ["ReloadableCredentials", "client_names", "tls_files"]

logger = logging.getLogger(__name__)

HOW_TO_FIX = (
    "mutual TLS is required: give --tls-cert, --tls-key and --tls-ca (or LLM_TLS_CERT,"
    " LLM_TLS_KEY, LLM_TLS_CA); `llm_service certs --out DIR` writes a development set. To serve"
    " plaintext on a trusted network, pass --insecure (LLM_INSECURE=1)."
)


def _public(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def tls_files(settings: ServiceSettings) -> dict[str, Path | None]:
    """The TLS file settings by flag."""
    return {"--tls-cert": settings.tls_cert, "--tls-key": settings.tls_key,
            "--tls-ca": settings.tls_ca}  # fmt: skip


class ReloadableCredentials:
    """Server credentials requiring client certificates, re-read from disk on ``reload()``.

    gRPC asks for the current certificates at each new TLS handshake; established connections
    (and the streams on them) keep theirs. A reload that fails keeps the previous files.
    """

    def __init__(self, cert: Path, key: Path, ca: Path) -> None:
        self._paths = (cert, key, ca)
        self._lock = threading.Lock()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.credentials = grpc.dynamic_ssl_server_credentials(
            # The stubs say the fetcher must return a configuration; gRPC documents None as
            # "keep the current one".
            self._load(),
            self._fetch,  # type: ignore[arg-type]
            require_client_authentication=True,
        )

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> ReloadableCredentials:
        """Credentials from ``settings``; ConfigurationError says what is missing and how to fix."""
        missing = [flag for flag, value in tls_files(settings).items() if value is None]
        if missing:
            raise ConfigurationError(f"missing {', '.join(missing)}: {HOW_TO_FIX}")
        assert settings.tls_cert and settings.tls_key and settings.tls_ca
        return cls(settings.tls_cert, settings.tls_key, settings.tls_ca)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        cert_path, key_path, ca_path = self._paths
        cert = read_pem(cert_path, "--tls-cert", "server certificate")
        key = read_pem(key_path, "--tls-key", "server key", secret=True)
        ca = read_pem(ca_path, "--tls-ca", "client CA")
        try:
            certificate = x509.load_pem_x509_certificate(cert)
            x509.load_pem_x509_certificates(ca)
        except ValueError as exc:
            raise ConfigurationError(f"cannot parse the TLS certificates: {exc}") from None
        try:
            private_key = serialization.load_pem_private_key(key, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"--tls-key: cannot load {key_path}: {exc}") from None
        if _public(private_key.public_key()) != _public(certificate.public_key()):
            raise ConfigurationError(
                f"--tls-key: {key_path} is not the private key of --tls-cert {cert_path}"
            )
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def reload(self) -> bool:
        """Re-read the files; new connections use them. False (logged) if they are unusable."""
        try:
            loaded = self._load()
        except ConfigurationError as exc:
            logger.error("TLS reload failed, keeping the previous certificates: %s", exc)
            return False
        with self._lock:
            self._pending = loaded
        logger.info("TLS certificates re-read; new connections use them")
        return True

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC, on its own threads, for each handshake: None keeps the configuration
        # in use.
        with self._lock:
            pending, self._pending = self._pending, None
        return pending


def client_names(context: grpc.aio.ServicerContext[Any, Any]) -> list[str]:
    """The peer certificate's subject, common name and subject alternative names."""
    auth = context.auth_context()
    names: list[str] = []
    for key in ("x509_subject", "x509_common_name", "x509_subject_alternative_name"):
        names.extend(v.decode("utf-8", "replace") for v in auth.get(key, ()))
    return names
