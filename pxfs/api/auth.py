"""The bearer token of the REST API: the token file, the loopback rule and the header check.

The REST API listens on 127.0.0.1 by default. An operator who binds it to any other address
must name a token file, and with a token every request, /metrics included, must carry
`Authorization: Bearer TOKEN` (RFC 6750). The token is read once at start. Only a digest of it
is kept, and neither the token nor a presented credential reaches a log line or a reply.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import socket
import stat
from pathlib import Path

from pxfs import errors

log = logging.getLogger(__name__)

#: Bounds on the token's length in characters. The minimum rejects a token short enough to
#: guess by trying; `openssl rand -hex 32` makes one of 64.
MIN_TOKEN_LENGTH = 16
MAX_TOKEN_LENGTH = 4096

#: The characters of RFC 6750's b64token, the form a token takes in the Authorization header.
_TOKEN_FORM = re.compile(r"[A-Za-z0-9\-._~+/]+=*")

#: The challenge of a 401 reply (RFC 6750, section 3).
CHALLENGE = 'Bearer realm="pxfs"'

#: The replies to a request without a valid token.
MISSING_TOKEN = "missing bearer token: send the header Authorization: Bearer TOKEN"
INVALID_TOKEN = "invalid bearer token"


class BearerToken:
    """The REST API's token, kept as its SHA-256 digest; repr and str do not show it."""

    __slots__ = ("_digest",)

    def __init__(self, value: str) -> None:
        self._digest = _digest(value)

    def matches(self, presented: str) -> bool:
        """Compare `presented` with the token in constant time."""
        # Comparing digests of a fixed length keeps the token's length secret as well.
        return hmac.compare_digest(_digest(presented), self._digest)

    def __repr__(self) -> str:
        return "BearerToken(<hidden>)"


def _digest(value: str) -> bytes:
    # aiohttp decodes header bytes that are not UTF-8 with surrogateescape.
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


def is_loopback(host: str) -> bool:
    """Return whether every address that `host` names is a loopback address.

    An IP address is loopback when it is in 127.0.0.0/8 or is ::1, also written as an
    IPv4-mapped IPv6 address. A host name counts as loopback only when all of its addresses do,
    because the sidecar listens on all of them. A name that does not resolve is not loopback.
    """
    try:
        return _is_loopback_address(host)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(_is_loopback_address(str(info[4][0])) for info in infos)


def _is_loopback_address(text: str) -> bool:
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def rest_token(host: str, token_file: Path | None) -> BearerToken | None:
    """Return the token that the REST API on `host` requires, or None when it requires none.

    Raises InvalidArgument when `host` is not a loopback address and no token file is given,
    and the errors of load_token for a token file that cannot be used.
    """
    if token_file is not None:
        return load_token(token_file)
    if is_loopback(host):
        return None
    raise errors.InvalidArgument(
        f"the REST API address {host} is not a loopback address, so it needs a bearer token: "
        "set rest_token_file in pxd.toml (or --rest-token-file) to a file of mode 0600 that "
        "contains the token, or listen on 127.0.0.1"
    )


def load_token(path: Path) -> BearerToken:
    """Read the token from `path`, a regular file that only its owner, root or this user, reads.

    Leading and trailing white space, such as the newline of `echo`, is dropped. Raises
    PermissionDenied when the file cannot be read. Raises InvalidArgument for a file that is
    missing, not regular or open to other users, and for a token that is empty, too short, too
    long or has characters that a bearer token cannot contain.
    """
    try:
        # O_NONBLOCK keeps a FIFO in its place from blocking the open; it is rejected below.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise errors.InvalidArgument(f"REST token file {path} does not exist") from None
    except PermissionError:
        raise errors.PermissionDenied(f"REST token file {path} is not readable") from None
    except OSError as exc:
        raise errors.InvalidArgument(
            f"REST token file {path} cannot be opened: {exc.strerror}"
        ) from None
    try:
        _check_file(path, os.fstat(fd))
        data = os.read(fd, MAX_TOKEN_LENGTH + 2)
    except OSError as exc:
        raise errors.InvalidArgument(
            f"REST token file {path} cannot be read: {exc.strerror}"
        ) from None
    finally:
        os.close(fd)
    return BearerToken(_parse_token(path, data))


def _check_file(path: Path, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise errors.InvalidArgument(f"REST token file {path} is not a regular file")
    if info.st_uid not in (0, os.geteuid()):
        raise errors.InvalidArgument(
            f"REST token file {path} is owned by uid {info.st_uid}; it must be owned by root "
            "or by the user that runs pxd-sidecar"
        )
    if info.st_mode & 0o077:
        raise errors.InvalidArgument(
            f"REST token file {path} has mode {stat.S_IMODE(info.st_mode):04o}, so other users "
            "may read or change it; chmod 600 it"
        )


def _parse_token(path: Path, data: bytes) -> str:
    # The messages give lengths and rules, never the file's contents.
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise errors.InvalidArgument(
            f"REST token file {path} contains bytes that are not ASCII"
        ) from None
    if not token:
        raise errors.InvalidArgument(f"REST token file {path} is empty")
    if len(token) > MAX_TOKEN_LENGTH:
        raise errors.InvalidArgument(
            f"REST token file {path} is over the maximum of {MAX_TOKEN_LENGTH} characters"
        )
    if not _TOKEN_FORM.fullmatch(token):
        raise errors.InvalidArgument(
            f"REST token file {path} has characters that a bearer token cannot contain: use "
            "letters, digits and -._~+/ only, such as the output of openssl rand -hex 32"
        )
    if len(token) < MIN_TOKEN_LENGTH:
        raise errors.InvalidArgument(
            f"REST token file {path} has a token of {len(token)} characters; the minimum is "
            f"{MIN_TOKEN_LENGTH}"
        )
    return token


def check_authorization(header: str | None, token: BearerToken) -> tuple[int, str] | None:
    """Return None when `header` carries `token`, else the status and message of the reply.

    No header, another scheme (such as Basic) or an empty credential is 401; a bearer
    credential that is not the token is 403. The scheme matches case-insensitively (RFC 7235).
    """
    if header is None:
        return 401, MISSING_TOKEN
    scheme, _, credential = header.strip().partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential:
        return 401, MISSING_TOKEN
    if not token.matches(credential):
        return 403, INVALID_TOKEN
    return None
