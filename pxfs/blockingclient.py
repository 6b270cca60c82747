"""The blocking RPC client of pxd's control socket.

The frames and messages are those of pxfs.frames. The control socket has no secret handshake,
because its file mode is the access check.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import stat
from typing import Any

from pxfs import errors
from pxfs.frames import REQUEST, FrameDecoder, encode_frame, error_from_payload


class BlockingClient:
    """A one-call-at-a-time client for the control socket, for pxctl and tests."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = 120.0) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._decoder = FrameDecoder()
        self._ids = itertools.count(1)

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except FileNotFoundError:
            sock.close()
            raise errors.Unavailable(f"pxd is not running: no socket at {self.path}") from None
        except PermissionError:
            sock.close()
            raise errors.PermissionDenied(
                f"permission denied on {self.path}: run as root or as a member of its group"
            ) from None
        except ConnectionRefusedError:
            sock.close()
            # connect() gives ECONNREFUSED for a file that is not a socket, too.
            if _exists_and_is_not_socket(self.path):
                raise errors.Unavailable(
                    f"pxd is not running: {self.path} is not a socket"
                ) from None
            raise errors.Unavailable(
                f"pxd is not running: {self.path} refuses connections"
            ) from None
        self._sock = sock
        return sock

    def call(self, method: str, *args: Any) -> Any:
        """Call `method` and return its result, or raise the PxfsError it sent."""
        request_id = next(self._ids)
        # Encoded before connecting, so that an argument with no wire form fails on its own.
        frame = encode_frame([REQUEST, request_id, method, list(args)])
        sock = self._connect()
        try:
            sock.sendall(frame)
            reply = self._receive(sock)
        except TimeoutError:
            self.close()
            raise errors.Unavailable(
                f"pxd did not reply to {method} within {self.timeout:g} s"
            ) from None
        except OSError as exc:
            self.close()
            raise errors.Unavailable(f"connection to pxd at {self.path} failed: {exc}") from None
        except errors.ProtocolError:
            self.close()
            raise self._not_pxd() from None
        if not (isinstance(reply, list) and len(reply) == 4 and reply[1] == request_id):
            self.close()
            raise self._not_pxd()
        if reply[2] is not None:
            raise error_from_payload(reply[2])
        return reply[3]

    def _not_pxd(self) -> errors.ProtocolError:
        # The decoder's own message is left out: another server, such as an HTTP server, sends
        # bytes whose first four read as an absurd frame length, which would only confuse.
        return errors.ProtocolError(f"the socket at {self.path} does not speak the pxd protocol")

    def _receive(self, sock: socket.socket) -> Any:
        # One call at a time, so exactly one message is expected.
        while True:
            data = sock.recv(1024 * 1024)
            if not data:
                raise ConnectionResetError(errno.ECONNRESET, "connection closed by pxd")
            messages = self._decoder.feed(data)
            if messages:
                return messages[0]

    def close(self) -> None:
        """Close the connection; the next call reconnects."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._decoder = FrameDecoder()

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _exists_and_is_not_socket(path: str) -> bool:
    try:
        return not stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False
