"""A self-signed certificate for the TLS tests (voxlens serving HTTPS/WSS itself)."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def self_signed(folder: Path, addresses: tuple[str, ...] = ("127.0.0.1",)) -> tuple[Path, Path]:
    """A certificate for localhost and ``addresses``, and its key (PEM files in ``folder``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "voxlens test")])
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def wait_serving(proc: subprocess.Popen[bytes], log: Path, answers: Callable[[], bool],
                 timeout_s: float = 180) -> None:
    """Wait until a TLS server process answers (``answers()``); fail with its log if it
    exits or does not answer in time (``server.launch.spawn`` only probes plain HTTP)."""
    deadline = time.monotonic() + timeout_s
    while not answers():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"TLS server did not start:\n{log.read_text()[-3000:]}")
        try:
            proc.wait(0.3)
        except subprocess.TimeoutExpired:
            pass
