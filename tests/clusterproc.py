"""A cluster of real pxd processes on 127.0.0.2, 127.0.0.3, ... sharing one real etcd."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from etcdproc import EtcdProcess, start_etcd
from nodeproc import is_mountpoint, mount_child_pids

from pxfs import errors
from pxfs.rpc import BlockingClient

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0
STOP_TIMEOUT = 60.0
#: Bytes per record of a replica's block table; the version is its first 8 (docs/store-format.md).
TABLE_RECORD = 16


def wait_until(condition: Callable[[], Any], timeout: float, message: str) -> Any:
    """Poll `condition` every 0.2 s until it returns a true value, which is returned.

    Raises AssertionError with `message` once `timeout` seconds have passed.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} (waited {timeout} s)")
        time.sleep(0.2)


def free_port_on(ip: str) -> int:
    """Return a TCP port on `ip` that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((ip, 0))
        return int(sock.getsockname()[1])


def write_secret(path: Path) -> Path:
    """Write a new random cluster secret to `path` (mode 0600) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return path


def lazy_unmount(path: Path) -> bool:
    """Lazily unmount `path` if the mount table lists it; return whether it did.

    The mount table is read rather than stat, because stat of a FUSE mount whose daemon was
    just killed can still succeed from the kernel's attribute cache.
    """
    with open("/proc/self/mounts", encoding="utf-8") as table:
        listed = any(line.split()[1] == str(path) for line in table)
    if listed:
        subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False)
    return listed


class ClusterNode:
    """One pxd of a cluster: its own address, data dir, sockets and configuration file."""

    def __init__(self, root: Path, ip: str, etcd_endpoint: str, secret_file: Path) -> None:
        self.root = root
        self.ip = ip
        self.etcd_endpoint = etcd_endpoint
        self.secret_file = secret_file
        self.data_dir = root / "data"
        self.socket = root / "run" / "pxd.sock"
        self.config_file = root / "pxd.toml"
        self.log_path = root / "pxd.log"
        self.peer_port = free_port_on(ip)
        self.pxd: subprocess.Popen[bytes] | None = None
        self.node_id = ""

    def write_config(self) -> None:
        """Write the pxd.toml that places this node on its address and in the cluster."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(
            f'node_ip = "{self.ip}"\n'
            f'listen = "{self.ip}:{self.peer_port}"\n'
            f'etcd_endpoints = ["{self.etcd_endpoint}"]\n'
        )

    def launch(self) -> None:
        """Start pxd without waiting for it."""
        self.write_config()
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.pxd = subprocess.Popen(
                [sys.executable, "-m", "daemon.pxd", "--config", str(self.config_file),
                 "--data-dir", str(self.data_dir), "--socket", str(self.socket),
                 "--secret-file", str(self.secret_file)],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def start(self) -> None:
        """Start pxd and wait until node.status reports "up"; raises AssertionError if not."""
        self.launch()
        assert self.pxd is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(errors.Unavailable, errors.ProtocolError):
                status = self.call("node.status")
                if status["status"] == "up":
                    self.node_id = status["node_id"]
                    return
            if self.pxd.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"pxd on {self.ip} did not start:\n{self.log_text()}")

    def call(self, method: str, *args: Any) -> Any:
        """One control RPC call to this node's pxd."""
        with BlockingClient(self.socket) as client:
            return client.call(method, *args)

    def replica_dir(self, vol_id: str) -> Path:
        """The directory of this node's replica of `vol_id` (which may not exist)."""
        return self.data_dir / "replicas" / vol_id

    def versions(self, vol_id: str) -> list[int]:
        """Read the version of every block from this node's replica table on disk."""
        table = (self.replica_dir(vol_id) / "table").read_bytes()
        count = len(table) // TABLE_RECORD
        return [struct.unpack_from("<Q", table, n * TABLE_RECORD)[0] for n in range(count)]

    def child_pids(self) -> list[int]:
        """Pids of the mount children that this node's pxd started."""
        return mount_child_pids(str(self.root))

    def kill_children(self) -> list[int]:
        """SIGKILL every mount child of this node, wait up to 10 s for them to go, return pids."""
        pids = self.child_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in pids):
            if time.monotonic() > deadline:
                raise AssertionError(f"mount children {pids} did not exit after SIGKILL")
            time.sleep(0.05)
        return pids

    def stop(self) -> int | None:
        """SIGTERM pxd and wait for it; return its exit status."""
        process, self.pxd = self.pxd, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def kill(self) -> None:
        """SIGKILL pxd, as a crash would."""
        assert self.pxd is not None
        self.pxd.kill()
        self.pxd.wait()
        self.pxd = None

    def pause(self) -> None:
        """SIGSTOP pxd: it keeps its connections open but replies to nothing, like a hung node."""
        assert self.pxd is not None
        self.pxd.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused pxd."""
        assert self.pxd is not None
        self.pxd.send_signal(signal.SIGCONT)

    def log_text(self) -> str:
        """What pxd wrote to its log."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def cleanup(self) -> None:
        """Stop pxd, kill its mount children that are left and unmount their mounts."""
        if self.pxd is not None:
            self.resume()
        self.stop()
        self.kill_children()
        mounts = self.data_dir / "mnt"
        if mounts.is_dir():
            for entry in mounts.iterdir():
                lazy_unmount(entry)


class Cluster:
    """One etcd and `size` pxd nodes under `root`, all with the same cluster secret."""

    def __init__(self, root: Path, size: int) -> None:
        self.root = root
        self.size = size
        self.etcd: EtcdProcess | None = None
        self.secret_file = root / "cluster.secret"
        self.nodes: list[ClusterNode] = []

    def start(self) -> None:
        """Start etcd, then every node; skips the test when etcd is not installed."""
        self.etcd = start_etcd(self.root / "etcd")
        write_secret(self.secret_file)
        for index in range(self.size):
            node = self.new_node(f"127.0.0.{index + 2}", f"node{index + 1}")
            node.start()

    def new_node(self, ip: str, name: str, secret_file: Path | None = None) -> ClusterNode:
        """Add a node (not started) at `ip`, with the cluster secret unless another is given."""
        assert self.etcd is not None
        node = ClusterNode(
            self.root / name, ip, self.etcd.endpoint, secret_file or self.secret_file
        )
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        """Stop every node, then etcd."""
        for node in self.nodes:
            node.cleanup()
        if self.etcd is not None:
            self.etcd.stop()


def sha256_file(path: Path) -> str:
    """Return the sha256 hex digest of the file at `path`, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def mount_on(node: ClusterNode, name: str, path: Path) -> None:
    """Attach volume `name` on `node` and mount it at `path`, creating the directory."""
    path.mkdir(exist_ok=True)
    node.call("volume.attach", name)
    node.call("volume.mount", name, str(path))


def release_on(node: ClusterNode, name: str, path: Path) -> None:
    """Unmount volume `name` from `path` if it is mounted there, then detach it from `node`."""
    if is_mountpoint(path):
        node.call("volume.unmount", name, str(path))
    node.call("volume.detach", name)
