"""TLS credentials from PEM files (common.settings.TlsFiles).

A server's certificate is reread when its files change, without a restart: gRPC asks
``ReloadingCertificates`` at each new connection's handshake, which costs one ``stat`` per file
while nothing changed. A new pair is taken only once the key matches the certificate, so a
certificate written before its key is not served half-replaced; until then the old pair serves.
"""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from common.settings import ConfigurationError, TlsFiles

log = logging.getLogger(__name__)

Stamp = tuple[tuple[int, int, int], ...]


class ReloadingCertificates:
    """gRPC's certificate-configuration fetcher for ``files``: a new configuration when the
    files changed (and make a valid pair), None (keep the current one) otherwise."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._paths = [files.cert, files.key, *([files.ca] if files.ca else [])]
        self._stamp = self._stamps()
        self.initial = self._load()

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            stamp = self._stamps()
            if stamp == self._stamp:
                return None
            configuration = self._load()
        except (OSError, ValueError) as exc:
            log.warning("TLS certificate files changed but cannot be used yet: %s", exc)
            return None
        self._stamp = stamp
        log.info("TLS certificate reloaded from %s", self.files.cert)
        return configuration

    def _stamps(self) -> Stamp:
        stats = [os.stat(path) for path in self._paths]
        return tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in stats)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        cert, key = self.files.cert.read_bytes(), self.files.key.read_bytes()
        _check_pair(cert, key, self.files.cert)
        ca = self.files.ca.read_bytes() if self.files.ca else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)


def _check_pair(cert_pem: bytes, key_pem: bytes, where: Path) -> None:
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(
        serialization.Encoding.DER, public
    ) != key.public_key().public_bytes(serialization.Encoding.DER, public):
        raise ValueError(f"{where}: the key does not belong to the certificate")


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """TLS with ``files`` (reread when they change); with ``files.ca``, clients must present a
    certificate of that CA."""
    try:
        certificates = ReloadingCertificates(files)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot use the TLS certificate: {exc}") from exc
    return grpc.dynamic_ssl_server_credentials(
        certificates.initial,
        # grpc-stubs omit that the fetcher may answer None (no change).
        certificates,  # type: ignore[arg-type]
        require_client_authentication=files.ca is not None,
    )


def channel_credentials(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """A TLS client trusting ``ca`` (None: the system's roots), presenting ``cert`` if given."""
    try:
        return grpc.ssl_channel_credentials(
            root_certificates=ca.read_bytes() if ca else None,
            private_key=key.read_bytes() if key else None,
            certificate_chain=cert.read_bytes() if cert else None,
        )
    except OSError as exc:
        raise ConfigurationError(f"cannot read a TLS file: {exc}") from exc


def ssl_context(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """A client's ssl context (for NATS) trusting ``ca`` (None: the system's roots), presenting
    ``cert`` if given."""
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
        if cert is not None:
            context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot use the TLS files: {exc}") from exc
    return context
