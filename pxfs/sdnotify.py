"""The sd_notify(3) protocol of systemd, by hand: state datagrams to the socket in NOTIFY_SOCKET.

A service of Type=notify reports its state to systemd by sending one datagram of newline-separated
assignments ("READY=1", "STOPPING=1", "STATUS=text") to the AF_UNIX datagram socket named in
the NOTIFY_SOCKET environment variable. An address that starts with "@" is in the abstract
namespace: the "@" stands for a leading NUL byte. Without NOTIFY_SOCKET every call does nothing,
so the daemons run the same way outside systemd.

A failed send never raises into the daemon: systemd then times the start out or reports the
state late, which is better than a daemon that stops over a status message. The first failure
is logged as a warning and later ones at debug level.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

ENVIRONMENT_VARIABLE = "NOTIFY_SOCKET"


class Notifier:
    """A sender of state datagrams to one notify socket, or to none."""

    def __init__(self, address: str | None) -> None:
        self.address = address or None
        self._failure_logged = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """Build the notifier for the socket named in NOTIFY_SOCKET (none if it is unset)."""
        return cls(environ.get(ENVIRONMENT_VARIABLE))

    @property
    def enabled(self) -> bool:
        """True when a notify socket is configured."""
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send the assignments in one datagram and return True if it was sent.

        Returns False without sending when no socket is configured, and False after logging
        when the address is invalid or the send fails.
        """
        if self.address is None:
            return False
        try:
            address = socket_address(self.address)
            message = "\n".join(assignments).encode()
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # A full receive queue must not block the event loop of the daemon.
                sock.setblocking(False)
                sock.sendto(message, address)
        except (OSError, ValueError) as exc:
            self._log_failure(assignments, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd that start-up is complete, with an optional status line."""
        return self.notify("READY=1", *_status(status))

    def stopping(self, status: str | None = None) -> bool:
        """Tell systemd that the service has begun to stop, with an optional status line."""
        return self.notify("STOPPING=1", *_status(status))

    def _log_failure(self, assignments: tuple[str, ...], exc: Exception) -> None:
        level = logging.DEBUG if self._failure_logged else logging.WARNING
        self._failure_logged = True
        log.log(
            level,
            "sending %s to the systemd notify socket %s failed: %s",
            " ".join(assignments),
            self.address,
            exc,
        )


def socket_address(address: str) -> str | bytes:
    """Convert a NOTIFY_SOCKET value into an AF_UNIX address, or raise ValueError if invalid.

    An absolute path is used as it is, and "@name" becomes the abstract address "\\0name".
    Any other form, such as an AF_VSOCK address, is rejected.
    """
    if address.startswith("/"):
        return address
    if address.startswith("@") and len(address) > 1:
        return b"\0" + address[1:].encode()
    raise ValueError(f"unsupported address {address!r}: expected an absolute path or @name")


def _status(status: str | None) -> list[str]:
    if status is None:
        return []
    # A newline would end the assignment and start another one.
    return ["STATUS=" + " ".join(status.splitlines())]
