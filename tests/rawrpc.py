"""Raw RPC frames over blocking sockets, for tests that send what no pxfs client would."""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack

from pxfs.frames import CHALLENGE, REQUEST, RESPONSE, WELCOME
from pxfs.rpc import handshake_digest

#: Seconds that a test socket waits for the server.
TIMEOUT = 15.0


def frame(message: Any) -> bytes:
    """Encode one RPC frame, with no check of the message or its size."""
    body: bytes = msgpack.packb(message, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def receive_frame(sock: socket.socket) -> Any:
    """Read one frame; return None when the server closed the connection first."""
    header = _receive_exactly(sock, 4)
    if header is None:
        return None
    body = _receive_exactly(sock, struct.unpack(">I", header)[0])
    return None if body is None else msgpack.unpackb(body, raw=False, strict_map_key=False)


def _receive_exactly(sock: socket.socket, count: int) -> bytes | None:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            return None
        data += chunk
    return data


@contextlib.contextmanager
def connected(path: Path) -> Iterator[socket.socket]:
    """A unix socket connection with a timeout, closed at the end."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    try:
        sock.connect(str(path))
        yield sock
    finally:
        sock.close()


def authenticate(sock: socket.socket, secret: bytes) -> bytes:
    """Pass the secret handshake; return the RESPONSE frame that was sent."""
    challenge = receive_frame(sock)
    assert challenge[0] == CHALLENGE
    response = frame([RESPONSE, handshake_digest(secret, challenge[1])])
    sock.sendall(response)
    assert receive_frame(sock) == [WELCOME, True]
    return response


#: Byte strings that are not a valid request: broken frames, wrong msgpack, wrong shapes.
GARBAGE = [
    b"",
    b"\x00",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x00\x00\x00\x00",
    b"\x00\x00\x00\x01\xc1",
    b"\xff\xff\xff\xff",
    struct.pack(">I", 16 * 1024 * 1024 + 1) + b"x",
    struct.pack(">I", 3) + b"\x92\x01",
    struct.pack(">I", 4) + b"\xa3\xff\xfe\xfd",
    struct.pack(">I", 3000) + b"\x91" * 3000,
    frame("hello"),
    frame([REQUEST]),
    frame([REQUEST, "id", "node.status", []]),
    frame([REQUEST, 1, 5, []]),
    frame([REQUEST, 1, "node.status", "not a list"]),
    frame([1, 1, None, None]),
    frame(msgpack.ExtType(5, b"abc")),
]
