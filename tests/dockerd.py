"""A private dockerd for the tests: its own data, exec root, pidfile and API socket under /tmp.

The daemon runs without networking (no bridge, no iptables) on the vfs storage driver, so it
changes nothing of the machine's own Docker. Plugin discovery is the one shared path: dockerd
looks for plugin sockets in /run/docker/plugins whatever its other directories are.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
CLI_TIMEOUT = 120.0
BUSYBOX_PATHS = (Path("/bin/busybox"), Path("/usr/bin/busybox"))

_PT_INTERP = 3


def find_busybox() -> Path | None:
    """Return a statically linked busybox (Debian's busybox-static), or None."""
    for path in BUSYBOX_PATHS:
        if path.is_file() and is_static_elf(path):
            return path
    return None


def is_static_elf(path: Path) -> bool:
    """Return True for a 64-bit ELF executable with no program interpreter (PT_INTERP)."""
    with open(path, "rb") as file:
        header = file.read(64)
        if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2:
            return False
        phoff, phentsize, phnum = (
            struct.unpack_from("<Q", header, 32)[0],
            *struct.unpack_from("<HH", header, 54),
        )
        file.seek(phoff)
        table = file.read(phentsize * phnum)
    types = [struct.unpack_from("<I", table, i * phentsize)[0] for i in range(phnum)]
    return _PT_INTERP not in types


class _UnixConnection(http.client.HTTPConnection):
    """An HTTP connection over a unix socket, for Docker's Engine API."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(str(self.socket_path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def unix_request(
    path: Path, method: str, url: str, body: Any = None, timeout: float = CLI_TIMEOUT
) -> tuple[int, Any]:
    """Send one HTTP request over the unix socket `path`; return the status and the body.

    The body is decoded as JSON when it is JSON, else returned as text.
    """
    connection = _UnixConnection(path, timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        connection.request(method, url, body=data, headers=headers)
        response = connection.getresponse()
        status, raw = response.status, response.read()
    finally:
        connection.close()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


class Dockerd:
    """One dockerd with everything it writes under `root`; use start() and stop()."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "docker.sock"
        self.log_path = root / "dockerd.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        """The value of `docker -H` for this daemon."""
        return f"unix://{self.socket}"

    def start(self) -> None:
        """Start dockerd and wait until its API responds to /_ping; raises AssertionError."""
        for name in ("data", "exec"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    "dockerd",
                    "--iptables=false", "--ip6tables=false", "--bridge=none",
                    "--storage-driver=vfs",
                    "--data-root", str(self.root / "data"),
                    "--exec-root", str(self.root / "exec"),
                    "--pidfile", str(self.root / "dockerd.pid"),
                    "-H", self.host,
                ],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            with contextlib.suppress(OSError):
                if self.api("GET", "/_ping", timeout=5) == (200, "OK"):
                    return
            time.sleep(0.2)
        raise AssertionError(f"dockerd did not start:\n{self.log_tail()}")

    def api(self, method: str, url: str, body: Any = None, timeout: float = 60) -> tuple[int, Any]:
        """One Engine API request on this daemon's socket."""
        return unix_request(self.socket, method, url, body, timeout)

    def cli(
        self, *args: str, check: bool = True, timeout: float = CLI_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run the docker CLI against this daemon; with `check`, fail on a non-zero exit."""
        result = subprocess.run(
            ["docker", "-H", self.host, *args],
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args)} exited with {result.returncode}:\n{result.stderr}"
            )
        return result

    def import_busybox(self, busybox: Path, tag: str) -> None:
        """Build image `tag` from a busybox binary and its applet links with docker import."""
        staging = self.root / "image"
        (staging / "bin").mkdir(parents=True)
        (staging / "tmp").mkdir()
        shutil.copy2(busybox, staging / "bin" / "busybox")
        applets = subprocess.run(
            [str(busybox), "--list"], capture_output=True, text=True, check=True
        ).stdout.split()
        for applet in applets:
            if applet != "busybox":
                (staging / "bin" / applet).symlink_to("busybox")
        archive = self.root / "image.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(staging, arcname=".")
        self.cli("import", str(archive), tag)

    def remove_containers(self) -> None:
        """Force-remove every container of this daemon, so that their volumes are unmounted."""
        listed = self.cli("ps", "-aq", check=False)
        ids = listed.stdout.split()
        if ids:
            self.cli("rm", "-f", *ids, check=False)

    def stop(self) -> None:
        """Stop dockerd with SIGTERM (SIGKILL after STOP_TIMEOUT) and unmount what it left."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired, OSError, AssertionError):
                self.remove_containers()
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None
        for mountpoint in mounts_under(self.root):
            subprocess.run(["umount", "-l", mountpoint], check=False)

    def log_tail(self, lines: int = 40) -> str:
        """Return the last lines of dockerd's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def mounts_under(root: Path) -> list[str]:
    """Return the mountpoints under `root`, deepest first."""
    prefix = str(root).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            point = line.split()[4].encode().decode("unicode_escape")
            if point.startswith(prefix):
                found.append(point)
    return sorted(found, key=len, reverse=True)
