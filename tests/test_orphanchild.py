"""socket_server_pid: the pid behind a unix socket, which pxd uses to stop an orphaned child."""

import os
import socket
from pathlib import Path

from pxfs.orphanchild import socket_server_pid


def test_server_pid_of_a_listening_socket(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(path))
        server.listen()
        assert socket_server_pid(str(path)) == os.getpid()
    finally:
        server.close()


def test_server_pid_none_without_server(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.close()
    # The socket file stays, but nothing accepts connections on it.
    assert socket_server_pid(str(path)) is None
    assert socket_server_pid(str(tmp_path / "missing.sock")) is None
    (tmp_path / "plain").write_text("not a socket")
    assert socket_server_pid(str(tmp_path / "plain")) is None
