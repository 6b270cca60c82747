"""A real etcd on 127.0.0.1 with free ports and a private data dir, for the etcd tests."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_stopped(pid: int, timeout: float = 10.0) -> None:
    """Wait until every thread of process `pid` is stopped by a signal.

    kill(SIGSTOP) returns before each thread has stopped, and a thread still running may send
    one more response.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):
                # The state follows the command name, which is in parentheses.
                states.append(task.joinpath("stat").read_text().rpartition(")")[2].split()[0])
        if states and all(state in ("T", "t") for state in states):
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not stop within {timeout} s of SIGSTOP")


class EtcdProcess:
    """One etcd member whose data lives in `root`. It keeps its ports across restarts.

    Alone it is a single-member cluster. `start_etcd_cluster` makes several members know each
    other through `initial_cluster`.
    """

    def __init__(self, root: Path, name: str = "test") -> None:
        self.root = root
        self.name = name
        self.initial_cluster = ""
        self.data_dir = root / "data"
        self.log_path = root / "etcd.log"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def endpoint(self) -> str:
        """The client URL of this etcd."""
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        """The URL on which this member talks to the other members."""
        return f"http://127.0.0.1:{self.peer_port}"

    def start(self) -> None:
        """Start etcd and wait until it serves reads; raises AssertionError if it does not."""
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Start the etcd process without waiting for it to serve."""
        assert self.process is None, "etcd is already running"
        self.root.mkdir(parents=True, exist_ok=True)
        peer = self.peer_url
        command = [
            ETCD,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.endpoint,
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", self.initial_cluster or f"{self.name}={peer}",
            "--log-outputs", "stderr",
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        """Wait until etcd serves reads; raises AssertionError (and stops it) if it does not."""
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._serves_reads():
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"etcd did not start:\n{self.log_text()}")

    def stop(self) -> None:
        """SIGTERM this etcd (by its pid) and wait for it to exit; SIGKILL it if it hangs."""
        process = self.process
        if process is None:
            return
        if self.paused:
            self.resume()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.process = None

    def restart(self) -> None:
        """Stop etcd and start it again on the same ports and data."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP etcd: its sockets still accept connections, but it sends no responses."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        wait_until_stopped(self.process.pid)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT a paused etcd."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)
        self.paused = False

    def log_text(self) -> str:
        """Return what etcd wrote to its log."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _serves_reads(self) -> bool:
        # A range read needs a leader, so a response means the member is ready for every call.
        request = urllib.request.Request(
            f"{self.endpoint}/v3/kv/range", data=b'{"key": "AA=="}', method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=1) as reply:
                return bool(reply.status == 200)
        except (OSError, urllib.error.URLError):
            return False


def start_etcd_cluster(root: Path, size: int = 3) -> list[EtcdProcess]:
    """Start a cluster of `size` etcd members under `root`, or skip when etcd is missing."""
    if not Path(ETCD).exists():
        pytest.skip("etcd is not installed")
    members = [EtcdProcess(root / f"member{index}", f"member{index}") for index in range(size)]
    initial_cluster = ",".join(f"{member.name}={member.peer_url}" for member in members)
    try:
        # A member serves only once a majority runs, so all start before the wait on any.
        for member in members:
            member.initial_cluster = initial_cluster
            member.launch()
        for member in members:
            member.wait_ready()
    except BaseException:
        for member in members:
            member.stop()
        raise
    return members


def start_etcd(root: Path) -> EtcdProcess:
    """Start an etcd under `root`, or skip the test when etcd is not installed."""
    if not Path(ETCD).exists():
        pytest.skip("etcd is not installed")
    etcd = EtcdProcess(root)
    etcd.start()
    return etcd
