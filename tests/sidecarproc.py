"""A pxd-sidecar process for tests, on a free port and a private plugin socket.

tests/sidecar runs it in front of the fake pxd of tests/sidecar/conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def signal_child(process: asyncio.subprocess.Process, signum: int) -> None:
    """Send `signum` to an asyncio child process unless it has exited, without reaping it.

    asyncio's Process.send_signal, kill and terminate poll the child first (bpo-38630), and
    that poll reaps a child that has just exited. asyncio's child watcher thread then finds no
    child to wait for, and reports exit status 255 instead of the real one.
    """
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signum)


def open_fds(pid: int) -> int:
    """Count the open file descriptors of process `pid`."""
    return len(os.listdir(f"/proc/{pid}/fd"))


class SidecarProcess:
    """A pxd-sidecar process on a private port and plugin socket, calling pxd on `control_socket`.

    Its stderr goes to `log_path`, so that a test can read everything it logged. Stop it with
    stop(), which returns its exit status.
    """

    def __init__(self, control_socket: Path, tmp_path: Path, *extra: str) -> None:
        self.port = free_port()
        self.plugin_socket = short_socket_path(tmp_path, "plugin.sock")
        self.log_path = tmp_path / "sidecar.log"
        self.args = [
            sys.executable, "-m", "daemon.sidecar",
            "--socket", str(control_socket),
            "--rest", f"127.0.0.1:{self.port}",
            "--plugin-socket", str(self.plugin_socket),
            "--docker-mount-base", str(tmp_path / "mounts"),
            "--state-dir", str(tmp_path / "state"),
            *extra,
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The process id."""
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        """Start the process and wait until REST and the plugin socket accept connections."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.args, cwd=REPO, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"pxd-sidecar exited at start:\n{self.log()}"
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                with socket.socket(socket.AF_UNIX) as plugin:
                    plugin.connect(str(self.plugin_socket))
                return
            time.sleep(0.05)
        raise AssertionError(f"pxd-sidecar did not start:\n{self.log()}")

    def log(self) -> str:
        """Everything the process wrote to stderr so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """Stop the process with SIGTERM and return its exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.wait(timeout=START_TIMEOUT)


def short_socket_path(tmp_path: Path, name: str) -> Path:
    """Return a socket path under `tmp_path`, or under /tmp when that one is too long."""
    # A unix socket path must fit in sun_path, 108 bytes on Linux.
    path = tmp_path / name
    if len(os.fsencode(path)) < 100:
        return path
    return Path("/tmp") / f"pxfs-{secrets.token_hex(6)}-{name}"
