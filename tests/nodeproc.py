"""Real pxd and pxd-sidecar processes on private sockets, for the end-to-end tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pxfs import errors
from pxfs.blockingclient import BlockingClient

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def is_mountpoint(path: Path) -> bool:
    """os.path.ismount that treats a dead FUSE mount ("not connected") as mounted."""
    try:
        return os.path.ismount(path)
    except OSError:
        return True


def mount_child_pids(marker: str, *, whole_argument: bool = False) -> list[int]:
    """Pids of running mount children whose command line contains `marker`.

    With `whole_argument`, one argument must equal `marker`; otherwise any substring matches.
    """
    marker_bytes = marker.encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"daemon.mount" not in cmdline:
            continue
        if marker_bytes in cmdline if whole_argument else marker_bytes in b" ".join(cmdline):
            pids.append(int(entry.name))
    return pids


class Node:
    """One pxd (and optionally its sidecar) with state under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.socket = root / "run" / "pxd.sock"
        self.log_path = root / "pxd.log"
        self.pxd: subprocess.Popen[bytes] | None = None
        self.sidecar: subprocess.Popen[bytes] | None = None
        self.rest_port = 0

    def start(self, *, stderr_pipe: bool = False) -> None:
        """Start pxd and wait until node.status reports "up", with its volumes remounted.

        With `stderr_pipe`, pxd's stderr is a pipe (self.pxd.stderr) instead of the log file.
        """
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.pxd = subprocess.Popen(
            [sys.executable, "-m", "daemon.pxd", "--data-dir", str(self.data_dir),
             "--socket", str(self.socket)],
            cwd=REPO, stdout=log, stderr=subprocess.PIPE if stderr_pipe else subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(errors.Unavailable, errors.ProtocolError):
                if self.call("node.status")["status"] == "up":
                    return
            if self.pxd.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"pxd did not start:\n{self.log_text()}")

    def start_sidecar(self) -> None:
        """Start pxd-sidecar on a free port and wait until REST answers."""
        self.rest_port = free_port()
        log = open(self.root / "sidecar.log", "ab")
        self.sidecar = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "daemon.sidecar",
                "--socket",
                str(self.socket),
                "--rest",
                f"127.0.0.1:{self.rest_port}",
                "--plugin-socket",
                str(self.root / "run" / "plugin.sock"),
            ],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                self.rest("GET", "/osd-volumes/versions")
                return
            if self.sidecar.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(
            "pxd-sidecar did not start:\n" + (self.root / "sidecar.log").read_text(errors="replace")
        )

    def call(self, method: str, *args: Any) -> Any:
        """One control RPC call to this node's pxd."""
        with BlockingClient(self.socket) as client:
            return client.call(method, *args)

    def rest(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One REST request to the sidecar: (status, decoded JSON or text)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.rest_port}{path}", data=data, method=method
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as reply:
                status, raw = reply.status, reply.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def pxctl(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run pxctl against this node."""
        return subprocess.run(
            [sys.executable, "-m", "pxfs.cli", "--socket", str(self.socket), *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            check=check,
        )

    def mount_volume(self, name: str, mountpoint: Path, size: int = 1 << 30) -> str:
        """Create (if needed), attach and mount a volume; return its id."""
        record = self.call(
            "volume.create", {"name": name, "size": size, "ha_level": 1, "labels": {}}
        )
        mountpoint.mkdir(parents=True, exist_ok=True)
        self.call("volume.attach", name)
        self.call("volume.mount", name, str(mountpoint))
        return str(record["id"])

    def stop(self) -> int | None:
        """SIGTERM the sidecar and pxd; return pxd's exit status."""
        status = None
        for process in (self.sidecar, self.pxd):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        if self.pxd is not None:
            status = self.pxd.returncode
        self.sidecar = None
        self.pxd = None
        return status

    def kill_pxd(self) -> None:
        """SIGKILL pxd, as a crash would."""
        assert self.pxd is not None
        self.pxd.kill()
        self.pxd.wait()
        self.pxd = None

    def mount_child_pids(self) -> list[int]:
        """Pids of the running mount children of this node (by their command line)."""
        return mount_child_pids(str(self.root))

    def log_text(self) -> str:
        """What pxd wrote to its log."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def cleanup(self, mountpoints: list[Path]) -> None:
        """Stop everything this node started and unmount what is left."""
        self.stop()
        for pid in self.mount_child_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for mountpoint in mountpoints:
            if is_mountpoint(mountpoint):
                subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
