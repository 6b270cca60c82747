"""Mutual TLS on the peer RPC over TCP: the SSL contexts of one node, built from its files.

With `ssl = true` in pxd.toml, every peer RPC connection over TCP, between nodes and from a
mount child to a remote replica, runs over TLS. Each side presents the certificate in
`ssl_cert` (with its key in `ssl_key`) and rejects a peer whose certificate the CA in `ssl_ca`
did not sign. The secret handshake of pxfs.rpc still runs inside the TLS session. Unix sockets
stay plain.

The names in a certificate are not compared with the address that was dialled. Nodes are
reached at the addresses they publish in the catalog, and the CA is the cluster's own. So a
certificate that it signed, together with the cluster secret, identifies a member of the cluster.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from pxfs.config import Config
from pxfs.errors import InvalidArgument, NotFound, PermissionDenied

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files of one node: its certificate, the certificate's private key, the CA."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def from_config(cls, config: Config) -> TlsFiles | None:
        """Return the files that `config` names when its `ssl` is true, else None."""
        if not config.ssl:
            return None
        return cls(config.ssl_cert, config.ssl_key, config.ssl_ca)

    def child_arguments(self) -> list[str]:
        """Return the options that pass these files to a mount child."""
        return ["--ssl-cert", str(self.cert), "--ssl-key", str(self.key), "--ssl-ca", str(self.ca)]


@dataclass(frozen=True)
class PeerTls:
    """The server and client SSL contexts of the peer RPC over TCP."""

    server: ssl.SSLContext
    client: ssl.SSLContext

    @classmethod
    def load(cls, files: TlsFiles) -> PeerTls:
        """Build both contexts from `files`; raises NotFound, PermissionDenied or InvalidArgument.

        The files are read here, once, so a missing or broken one stops start-up.
        """
        for option, path in (
            ("ssl_cert", files.cert),
            ("ssl_key", files.key),
            ("ssl_ca", files.ca),
        ):
            _check_readable(option, path)
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        # PROTOCOL_TLS_CLIENT checks host names by default; see the module docstring for why
        # the CA alone decides here.
        client.check_hostname = False
        for context in (server, client):
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.verify_mode = ssl.CERT_REQUIRED
            _load_files(context, files)
        log.info("peer rpc: TLS with certificate %s, CA %s", files.cert, files.ca)
        return cls(server, client)


def _check_readable(option: str, path: Path) -> None:
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise NotFound(f"{option} file {path} does not exist") from None
    except PermissionError:
        raise PermissionDenied(f"{option} file {path} is not readable") from None
    except IsADirectoryError:
        raise InvalidArgument(f"{option} {path} is a directory, not a PEM file") from None


def _reject_encrypted_key() -> str:
    # Without a callback OpenSSL would prompt for the passphrase on the terminal, and a daemon
    # has none, so start-up would hang.
    raise InvalidArgument("the key is encrypted: give ssl_key a key without a passphrase")


def _load_files(context: ssl.SSLContext, files: TlsFiles) -> None:
    try:
        context.load_cert_chain(files.cert, files.key, password=_reject_encrypted_key)
    except InvalidArgument as exc:
        raise InvalidArgument(f"ssl_key {files.key}: {exc.message}") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise InvalidArgument(
                f"ssl_key {files.key} is not the private key of ssl_cert {files.cert}"
            ) from None
        raise InvalidArgument(
            f"ssl_cert {files.cert} and ssl_key {files.key} are not a PEM certificate and its "
            f"private key ({exc.reason or exc})"
        ) from None
    try:
        context.load_verify_locations(cafile=files.ca)
    except ssl.SSLError as exc:
        raise InvalidArgument(
            f"ssl_ca {files.ca} contains no PEM certificate ({exc.reason or exc})"
        ) from None
