"""pxfs/orphanchild.py: finding and stopping a mount child that a killed pxd left running."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import trio

from pxfs.orphanchild import is_mount_child, socket_server_pid, stop_orphan_child

#: A process that listens on the unix socket of its last argument and sleeps. The arguments
#: before that may make it look like a mount child.
LISTENER = """
import socket, sys, time
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(sys.argv[-1])
server.listen()
print("listening", flush=True)
time.sleep(60)
"""


@contextlib.contextmanager
def listener(path: Path, *argv: str) -> Iterator[subprocess.Popen[str]]:
    """Run LISTENER on `path` with `argv` before the path; kill it at the end if it still runs."""
    with subprocess.Popen(
        [sys.executable, "-c", LISTENER, *argv, str(path)], stdout=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout is not None
            assert process.stdout.readline() == "listening\n"
            yield process
        finally:
            if process.poll() is None:
                process.kill()


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


def test_server_pid_does_not_wait_on_full_backlog(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    clients = []
    try:
        # Fill the backlog of a server that never accepts, as a stopped process would.
        for _ in range(100):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            clients.append(client)
            try:
                client.connect(str(path))
            except BlockingIOError:
                break
        started = time.monotonic()
        assert socket_server_pid(str(path)) is None
        assert time.monotonic() - started < 1
    finally:
        for client in clients:
            client.close()
        server.close()


def test_other_listener_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    with listener(path) as process:
        assert not is_mount_child(process.pid, str(path))
        trio.run(stop_orphan_child, "41", str(path))
        assert process.poll() is None


def test_orphaned_mount_child_is_stopped(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    with listener(path, "daemon.mount", "--control-socket") as process:
        assert is_mount_child(process.pid, str(path))
        assert not is_mount_child(process.pid, str(tmp_path / "other.sock"))
        trio.run(stop_orphan_child, "41", str(path))
        assert process.wait(timeout=5) == -signal.SIGTERM
