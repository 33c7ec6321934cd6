"""Certificates for development and tests: a CA and the certificates it signs (``agentrun certs``).

Two authorities, so that a public client's certificate never opens the internal port:

- ``internal/``: ``ca.pem``, and ``executor.pem`` / ``gateway.pem`` (each with its ``-key.pem``),
  good for both ends of a TLS connection, for the mTLS between gateways and executors;
- ``public/``: ``ca.pem``, ``server.pem`` (the gateway's public certificate) and ``client.pem``
  (for a client of a gateway that requires client certificates).

The CAs' private keys are not written: to issue more certificates, generate a new set.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
VALIDITY = datetime.timedelta(days=825)
# Issued a little in the past: a peer whose clock is slightly behind still accepts them.
BACKDATE = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes

    def write(self, folder: Path, name: str) -> None:
        """``<name>.pem`` and ``<name>-key.pem`` (readable by its owner only)."""
        (folder / f"{name}.pem").write_bytes(self.cert_pem)
        _write_private(folder / f"{name}-key.pem", self.key_pem)


@dataclass(frozen=True)
class Authority:
    """A CA that lives in memory only."""

    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @staticmethod
    def new(name: str) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return Authority(name, key, cert)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self, name: str, hosts: Iterable[str] = (), *, server: bool = True, client: bool = True
    ) -> Issued:
        """A certificate for ``name``, valid for ``hosts`` (DNS names or IP addresses) as a
        server and/or a client."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        usages = [
            *([ExtendedKeyUsageOID.SERVER_AUTH] if server else []),
            *([ExtendedKeyUsageOID.CLIENT_AUTH] if client else []),
        ]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        names = _subject_alt_names(hosts)
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return Issued(
            cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )


def _subject_alt_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _write_private(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


INTERNAL_FILES = ("ca.pem", "executor.pem", "executor-key.pem", "gateway.pem", "gateway-key.pem")
PUBLIC_FILES = ("ca.pem", "server.pem", "server-key.pem", "client.pem", "client-key.pem")


def expected_files(folder: Path) -> list[Path]:
    return [
        *(folder / "internal" / name for name in INTERNAL_FILES),
        *(folder / "public" / name for name in PUBLIC_FILES),
    ]


def write_dev_certificates(folder: Path, hosts: Sequence[str] = ()) -> list[Path]:
    """Writes a new internal and a new public set into ``folder`` (see the module docstring);
    every server certificate is valid for DEFAULT_HOSTS and ``hosts``. Returns the files."""
    every_host = [*DEFAULT_HOSTS, *hosts]
    internal, public = folder / "internal", folder / "public"
    for sub in (internal, public):
        sub.mkdir(parents=True, exist_ok=True)
    internal_ca = Authority.new("agentrun internal CA")
    (internal / "ca.pem").write_bytes(internal_ca.cert_pem)
    internal_ca.issue("agentrun executor", every_host).write(internal, "executor")
    internal_ca.issue("agentrun gateway", every_host).write(internal, "gateway")
    public_ca = Authority.new("agentrun public CA")
    (public / "ca.pem").write_bytes(public_ca.cert_pem)
    public_ca.issue("agentrun gateway", every_host, client=False).write(public, "server")
    public_ca.issue("agentrun client", (), server=False).write(public, "client")
    return expected_files(folder)
