"""``agentrun certs`` as a real process: two CAs and the certificates they sign."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from common.certs import expected_files

GUARD = 60.0


def agentrun_certs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "certs", *args],
        capture_output=True,
        text=True,
        timeout=GUARD,
    )


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_certs_writes_two_authorities_and_keeps_what_exists(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    done = agentrun_certs("--out", str(out), "--host", "executors", "--host", "10.0.0.7")
    assert done.returncode == 0, done.stderr
    for path in expected_files(out):
        assert path.exists(), path
        if path.name.endswith("-key.pem"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    internal_ca, public_ca = load(out / "internal" / "ca.pem"), load(out / "public" / "ca.pem")
    for name in ("executor", "gateway"):
        cert = load(out / "internal" / f"{name}.pem")
        cert.verify_directly_issued_by(internal_ca)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "executors" in names.get_values_for_type(x509.DNSName)
        assert "localhost" in names.get_values_for_type(x509.DNSName)
        assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} >= {
            "127.0.0.1",
            "10.0.0.7",
        }
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usage)
    load(out / "public" / "server.pem").verify_directly_issued_by(public_ca)
    client = load(out / "public" / "client.pem")
    client.verify_directly_issued_by(public_ca)
    assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert internal_ca.subject != public_ca.subject

    before = (out / "internal" / "ca.pem").read_bytes()
    again = agentrun_certs("--out", str(out))
    assert again.returncode == 0, again.stderr
    assert "kept" in again.stdout
    assert (out / "internal" / "ca.pem").read_bytes() == before
    forced = agentrun_certs("--out", str(out), "--force")
    assert forced.returncode == 0, forced.stderr
    assert (out / "internal" / "ca.pem").read_bytes() != before


def test_certs_refuses_to_complete_a_partial_set(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    (out / "internal").mkdir(parents=True)
    (out / "internal" / "ca.pem").write_text("someone's CA")
    done = agentrun_certs("--out", str(out))
    assert done.returncode == 1
    assert "--force" in done.stderr
    assert (out / "internal" / "ca.pem").read_text() == "someone's CA"
