"""Test certificates made with the openssl command: a CA and node certificates that it signs."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from pxfs.tls import TlsFiles

OPENSSL = shutil.which("openssl")
#: Elliptic-curve keys, because generating them takes milliseconds where RSA takes up to seconds.
KEY_OPTIONS = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class Ca:
    """A self-signed CA: its certificate and its key."""

    cert: Path
    key: Path


def openssl(*args: str) -> None:
    """Run the openssl command with `args`; skips the test when openssl is missing."""
    if OPENSSL is None:
        pytest.skip("the openssl command is not installed")
    result = subprocess.run([OPENSSL, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"openssl {' '.join(args)} failed:\n{result.stderr}"


def make_ca(directory: Path, name: str = "pxfs test CA") -> Ca:
    """Create a CA under `directory`, valid for two days."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = Ca(directory / "ca.crt", directory / "ca.key")
    openssl(
        "req", "-x509", *KEY_OPTIONS, "-keyout", str(ca.key), "-out", str(ca.cert),
        "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return ca


def make_node_cert(
    ca: Ca, directory: Path, name: str, ip: str, usages: str = "serverAuth,clientAuth"
) -> TlsFiles:
    """Create a key and a certificate for node `name` at `ip`, signed by `ca`.

    `usages` is the extended key usage of the certificate.
    """
    directory.mkdir(parents=True, exist_ok=True)
    key, request, cert = directory / "node.key", directory / "node.csr", directory / "node.crt"
    openssl(
        "req", "-new", *KEY_OPTIONS, "-keyout", str(key), "-out", str(request),
        "-subj", f"/CN={name}",
    )  # fmt: skip
    extensions = directory / "node.ext"
    extensions.write_text(
        "basicConstraints = critical,CA:FALSE\n"
        "keyUsage = critical,digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage = {usages}\n"
        f"subjectAltName = IP:{ip}\n"
    )
    openssl(
        "x509", "-req", "-in", str(request), "-CA", str(ca.cert), "-CAkey", str(ca.key),
        "-CAcreateserial", "-days", "2", "-extfile", str(extensions), "-out", str(cert),
    )  # fmt: skip
    key.chmod(0o600)
    return TlsFiles(cert, key, ca.cert)
