"""A cluster of real pxd processes sharing one real etcd.

`Cluster` runs the nodes on 127.0.0.2, 127.0.0.3, ... and etcd on 127.0.0.1. `NetnsCluster`
runs etcd and each node in a network namespace of its own, joined by veth pairs to a bridge in
a hub namespace, so that a test can cut one node off the network and heal it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import random
import re
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

import pytest
from etcdproc import ETCD, EtcdProcess, start_etcd, wait_until_stopped
from nodeproc import is_mountpoint, mount_child_pids

from pxfs import errors
from pxfs.blockingclient import BlockingClient

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0
STOP_TIMEOUT = 60.0
#: Bytes per record of a replica's block table; the version is its first 8 (docs/store-format.md).
TABLE_RECORD = 16
#: The private /24 of a NetnsCluster: the hub's bridge has .1, node I has .I+1. Addresses in
#: namespaces of one run are invisible to every other run, so runs in parallel can share it.
DEFAULT_SUBNET = "10.213.0.0/24"
#: Every namespace and link name starts with this, then a tag of the run.
NETNS_PREFIX = "pxt"
#: The peer RPC port of a node in its own namespace, and the ports of etcd in the hub.
NETNS_PEER_PORT = 9002
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
#: How long one `ip` command may take.
IP_TIMEOUT = 10.0
#: The size of the volumes that create_volume makes by default: 64 MiB.
DEFAULT_VOLUME_SIZE = 64 * 1024 * 1024
#: How long a replica that returns (restarted, or healed after a network cut) may take to rejoin
#: the write set. The mount child tries every 5 s, and an attempt that started during a cut may
#: wait out its 10 s connect. Copying what the tests write during an outage takes a few seconds.
RESYNC_DEADLINE = 45.0
#: How long a copy to a new replica of a volume of at most 256 MiB may take on a loaded machine.
COPY_DEADLINE = 120.0


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


def in_netns(netns: str, command: list[str]) -> list[str]:
    """Return `command` run in the network namespace `netns` and the mount namespace of ours.

    `ip netns exec` would unshare the mount namespace too, so the FUSE mounts of the processes
    it starts would be invisible outside. nsenter execs the command in place, so its pid is the
    pid of the command.
    """
    return ["nsenter", f"--net=/run/netns/{netns}", *command]


def private_subnet(text: str) -> ipaddress.IPv4Network:
    """Parse a private IPv4 /24 such as 10.213.0.0/24; raises ValueError for anything else."""
    network = ipaddress.ip_network(text, strict=True)
    if not isinstance(network, ipaddress.IPv4Network) or network.prefixlen != 24:
        raise ValueError(f"{text} is not an IPv4 /24")
    if not network.is_private or network.is_loopback:
        raise ValueError(f"{text} is not a private network")
    return network


def _ip(*args: str) -> None:
    result = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")


class Netns:
    """A hub namespace with a bridge, and one namespace per node joined to it by a veth pair.

    Nothing is added to the network namespace of the caller: each veth pair is created in the
    hub with its other end in the node's namespace. Every name starts with NETNS_PREFIX and a
    random tag, so parallel runs never clash. `destroy` deletes what `add_hub` and `add_node`
    made, also after a failure half-way.
    """

    def __init__(self, subnet: str = DEFAULT_SUBNET) -> None:
        self.network = private_subnet(subnet)
        self.tag = NETNS_PREFIX + secrets.token_hex(3)
        self.hub = self.tag + "h"
        self.bridge = self.tag + "b"
        #: The namespaces and the hub ends of the veth pairs made so far, in order.
        self.namespaces: list[str] = []
        self.links: list[str] = []

    def address(self, index: int) -> str:
        """The address of host `index`: 0 is the hub, 1 the first node."""
        return str(self.network.network_address + index + 1)

    def node_netns(self, index: int) -> str:
        """The name of the namespace of node `index` (1, 2, ...)."""
        return f"{self.tag}n{index}"

    def hub_link(self, index: int) -> str:
        """The hub end of the veth pair of node `index`, the end that cut and heal switch."""
        return f"{self.tag}v{index}"

    def add_hub(self) -> None:
        """Create the hub namespace and its bridge, which has the address .1."""
        _ip("netns", "add", self.hub)
        self.namespaces.append(self.hub)
        _ip("-n", self.hub, "link", "set", "lo", "up")
        _ip("-n", self.hub, "link", "add", self.bridge, "type", "bridge")
        _ip("-n", self.hub, "addr", "add", f"{self.address(0)}/24", "dev", self.bridge)
        _ip("-n", self.hub, "link", "set", self.bridge, "up")

    def add_node(self, index: int) -> str:
        """Create the namespace of node `index`, join it to the bridge, return its address."""
        netns, link, peer = self.node_netns(index), self.hub_link(index), f"{self.tag}e{index}"
        _ip("netns", "add", netns)
        self.namespaces.append(netns)
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-n", self.hub, "link", "add", link, "type", "veth", "peer", "name", peer,
            "netns", netns)  # fmt: skip
        self.links.append(link)
        _ip("-n", self.hub, "link", "set", link, "master", self.bridge, "up")
        _ip("-n", netns, "addr", "add", f"{self.address(index)}/24", "dev", peer)
        _ip("-n", netns, "link", "set", peer, "up")
        return self.address(index)

    def cut(self, index: int) -> None:
        """Take node `index` off the network: its packets are dropped, as by a failed switch."""
        _ip("-n", self.hub, "link", "set", self.hub_link(index), "down")

    def heal(self, index: int) -> None:
        """Put node `index` back on the network."""
        _ip("-n", self.hub, "link", "set", self.hub_link(index), "up")

    def destroy(self) -> None:
        """Delete every link and namespace made, the processes inside them stopped first."""
        problems = []
        for link in reversed(self.links):
            # Deleting one end of a veth pair deletes the other, even while a process that
            # failed to stop still runs in the node's namespace.
            with contextlib.suppress(RuntimeError):
                _ip("-n", self.hub, "link", "delete", link)
        self.links.clear()
        for netns in reversed(self.namespaces):
            try:
                _ip("netns", "delete", netns)
            except RuntimeError as exc:
                problems.append(str(exc))
        self.namespaces.clear()
        if problems:
            raise RuntimeError("; ".join(problems))


class HubEtcd:
    """A single-member etcd in the hub namespace of `netns`, on the bridge's address."""

    def __init__(self, root: Path, netns: Netns) -> None:
        self.root = root
        self.netns = netns
        self.ip = netns.address(0)
        self.log_path = root / "etcd.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """The client URL of this etcd, reachable from the node namespaces only."""
        return f"http://{self.ip}:{ETCD_CLIENT_PORT}"

    def start(self) -> None:
        """Start etcd and wait until it serves reads; raises AssertionError if it does not."""
        self.root.mkdir(parents=True, exist_ok=True)
        peer = f"http://{self.ip}:{ETCD_PEER_PORT}"
        command = [
            ETCD, "--name", "hub", "--data-dir", str(self.root / "data"),
            "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"hub={peer}", "--log-outputs", "stderr",
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                in_netns(self.netns.hub, command), stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if serves_etcd_reads(self.netns.hub, self.endpoint):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"etcd did not start in {self.netns.hub}:\n{self.log_text()}")

    def stop(self) -> None:
        """SIGTERM etcd by its pid and wait for it; SIGKILL it if it hangs."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def log_text(self) -> str:
        """What etcd wrote to its log."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


#: Run in a namespace: exit 0 when the etcd at argv[1] responds to a range read within 1 s.
_ETCD_PROBE = """
import sys, urllib.request
request = urllib.request.Request(sys.argv[1] + "/v3/kv/range", data=b'{"key": "AA=="}')
try:
    with urllib.request.urlopen(request, timeout=1) as reply:
        sys.exit(0 if reply.status == 200 else 1)
except OSError:
    sys.exit(1)
"""


def serves_etcd_reads(netns: str, endpoint: str) -> bool:
    """Tell whether the etcd at `endpoint`, seen from namespace `netns`, serves reads."""
    try:
        result = subprocess.run(
            in_netns(netns, [sys.executable, "-c", _ETCD_PROBE, endpoint]),
            capture_output=True, timeout=10, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


class ClusterNode:
    """One pxd of a cluster: its own address, data dir, sockets and configuration file.

    With `netns`, pxd runs in that network namespace, where it has the port 9002 to itself.
    """

    def __init__(
        self,
        root: Path,
        ip: str,
        etcd_endpoint: str,
        secret_file: Path,
        *,
        netns: str | None = None,
    ) -> None:
        self.root = root
        self.ip = ip
        self.etcd_endpoint = etcd_endpoint
        self.secret_file = secret_file
        self.netns = netns
        self.data_dir = root / "data"
        self.socket = root / "run" / "pxd.sock"
        self.config_file = root / "pxd.toml"
        self.log_path = root / "pxd.log"
        self.peer_port = NETNS_PEER_PORT if netns else free_port_on(ip)
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
        command = [
            sys.executable, "-m", "daemon.pxd", "--config", str(self.config_file),
            "--data-dir", str(self.data_dir), "--socket", str(self.socket),
            "--secret-file", str(self.secret_file),
        ]  # fmt: skip
        if self.netns:
            command = in_netns(self.netns, command)
        with open(self.log_path, "ab") as log:
            self.pxd = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

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

    def call(self, method: str, *args: Any, timeout: float = 120.0) -> Any:
        """One control RPC call to this node's pxd, which may take `timeout` seconds."""
        with BlockingClient(self.socket, timeout=timeout) as client:
            return client.call(method, *args)

    def pxctl(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run pxctl against this node's control socket and return what it did."""
        return subprocess.run(
            [sys.executable, "-m", "pxfs.cli", "--socket", str(self.socket), *args],
            cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip

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
        wait_until_stopped(self.pxd.pid)

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


class NetnsCluster(Cluster):
    """etcd and `size` nodes, each in a network namespace of its own (see Netns).

    Node I (1, 2, ...) is `nodes[I - 1]`. The control sockets are files, so tests call every
    pxd from here as usual; only TCP (etcd and the peer RPC) crosses the bridge.
    """

    def __init__(self, root: Path, size: int, subnet: str = DEFAULT_SUBNET) -> None:
        super().__init__(root, size)
        self.netns = Netns(subnet)
        self.hub_etcd: HubEtcd | None = None

    def start(self) -> None:
        """Create the namespaces, start etcd in the hub and every node in its namespace."""
        if not Path(ETCD).exists():
            pytest.skip("etcd is not installed")
        self.netns.add_hub()
        self.hub_etcd = HubEtcd(self.root / "etcd", self.netns)
        self.hub_etcd.start()
        write_secret(self.secret_file)
        for index in range(1, self.size + 1):
            ip = self.netns.add_node(index)
            node = ClusterNode(
                self.root / f"node{index}", ip, self.hub_etcd.endpoint, self.secret_file,
                netns=self.netns.node_netns(index),
            )  # fmt: skip
            self.nodes.append(node)
            node.start()

    def index(self, node: ClusterNode) -> int:
        """The number of `node` in the cluster, from 1."""
        return self.nodes.index(node) + 1

    def cut(self, node: ClusterNode) -> None:
        """Drop every packet to and from `node`: etcd and the other nodes no longer reach it."""
        self.netns.cut(self.index(node))

    def heal(self, node: ClusterNode) -> None:
        """Put `node` back on the network."""
        self.netns.heal(self.index(node))

    def stop(self) -> None:
        """Heal every node, stop the nodes and etcd, then delete the namespaces and links."""
        try:
            for index in range(1, len(self.netns.links) + 1):
                with contextlib.suppress(RuntimeError):
                    self.netns.heal(index)
            for node in self.nodes:
                node.cleanup()
            if self.hub_etcd is not None:
                self.hub_etcd.stop()
        finally:
            self.netns.destroy()


#: A writer process: python -c WRITER PATH SECONDS CHUNK MAX_BYTES. It appends chunks of seeded
#: random data to PATH, fsyncs each one and then prints "END_OFFSET MONOTONIC_TIME". At the
#: first OSError it prints "error ERRNO MONOTONIC_TIME" and exits 3. It stops by itself after
#: SECONDS or MAX_BYTES.
WRITER = """
import os, random, sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
chunk, max_bytes = int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(path)
deadline = time.monotonic() + seconds
offset = 0
with open(path, "wb") as f:
    while offset + chunk <= max_bytes:
        if time.monotonic() > deadline:
            break
        try:
            f.write(rng.randbytes(chunk))
            f.flush()
            os.fsync(f.fileno())
        except OSError as exc:
            print("error", exc.errno, time.monotonic(), flush=True)
            sys.exit(3)
        offset += chunk
        print(offset, time.monotonic(), flush=True)
"""


class Writer:
    """A WRITER process on `path` and what it reported once it is done."""

    def __init__(self, path: Path, seconds: float, chunk: int, max_bytes: int) -> None:
        self.path = path
        self.chunk = chunk
        self.process = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(seconds), str(chunk), str(max_bytes)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        #: (end offset, monotonic time) of each fsync that returned.
        self.synced: list[tuple[int, float]] = []
        #: The errno of the call that failed and when it failed, or None.
        self.failed: tuple[int, float] | None = None

    def finish(self, timeout: float) -> Writer:
        """Wait up to `timeout` s for the writer to end; raises AssertionError if it hangs."""
        try:
            out, err = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, err = self.process.communicate()
            raise AssertionError(f"the writer hung:\n{out}\n{err}") from None
        for line in out.splitlines():
            words = line.split()
            if words[0] == "error":
                self.failed = (int(words[1]), float(words[2]))
            else:
                self.synced.append((int(words[0]), float(words[1])))
        return self

    @property
    def length(self) -> int:
        """The bytes that the last fsync that returned made durable."""
        return self.synced[-1][0] if self.synced else 0

    def expected(self, length: int | None = None) -> bytes:
        """The bytes the writer wrote to the first `length` bytes (default: all fsync'd)."""
        count = (self.length if length is None else length) // self.chunk
        rng = random.Random(str(self.path))
        return b"".join(rng.randbytes(self.chunk) for _ in range(count))

    def longest_gap(self, start: float, end: float) -> float:
        """The maximum time without a returning fsync between the monotonic `start` and `end`."""
        moments = [start] + [at for _, at in self.synced if start < at < end] + [end]
        return max(later - earlier for earlier, later in zip(moments, moments[1:], strict=False))


def sha256_prefix(path: Path, length: int) -> str:
    """Return the sha256 hex digest of the first `length` bytes of the file at `path`."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while length > 0 and (chunk := f.read(min(length, 1024 * 1024))):
            digest.update(chunk)
            length -= len(chunk)
    return digest.hexdigest()


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


def assert_file_reads(node: ClusterNode, name: str, path: Path, file: str, digest: str) -> None:
    """Mount volume `name` on `node` at `path`, assert the sha256 of `file` in it, release it."""
    try:
        mount_on(node, name, path)
        assert sha256_file(path / file) == digest
    finally:
        release_on(node, name, path)


def create_volume(
    node: ClusterNode,
    name: str,
    ha_level: int,
    nodes: list[ClusterNode],
    size: int = DEFAULT_VOLUME_SIZE,
) -> str:
    """Create volume `name` through `node` with its replicas on `nodes`, and return its id."""
    spec = {
        "name": name,
        "size": size,
        "ha_level": ha_level,
        "labels": {},
        "nodes": [member.node_id for member in nodes],
    }
    return str(node.call("volume.create", spec)["id"])


def write_synced(path: Path, payload: bytes) -> None:
    """Replace the content of the file at `path` with `payload` and fsync it."""
    with open(path, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())


def read_runtime_state(node: ClusterNode, name: str) -> dict[str, str]:
    """Return the runtime state that `node` reports for volume `name`."""
    state: dict[str, str] = node.call("volume.inspect", name)["runtime_state"]
    return state


def parse_pairs(text: str) -> dict[int, int]:
    """Parse a runtime state list such as "[{0 12} {1 3}]" into {0: 12, 1: 3}."""
    return {int(key): int(value) for key, value in re.findall(r"\{(\d+) (\d+)\}", text)}


def count_differing(old: list[int], new: list[int]) -> int:
    """Count the blocks whose version differs between two block tables."""
    length = max(len(old), len(new))
    old = old + [0] * (length - len(old))
    new = new + [0] * (length - len(new))
    return sum(1 for before, after in zip(old, new, strict=True) if before != after)


def wait_in_sync(node: ClusterNode, name: str, *, clean: bool = False) -> dict[str, Any]:
    """Wait until `node` lists no replica of volume `name` out of sync, and return the record.

    With `clean`, also wait until the runtime state on `node` is "clean". Use it only where the
    volume is mounted on `node`, because pxd reports an empty runtime state for a volume that is
    not. Raises AssertionError after RESYNC_DEADLINE seconds.
    """

    def in_sync() -> dict[str, Any] | None:
        record: dict[str, Any] = node.call("volume.inspect", name)
        if record["out_of_sync"]:
            return None
        if clean and record["runtime_state"].get("RuntimeState") != "clean":
            return None
        return record

    found: dict[str, Any] = wait_until(in_sync, RESYNC_DEADLINE, f"{name} did not resync")
    return found


def wait_for_ha_level(node: ClusterNode, name: str, ha_level: int) -> dict[str, Any]:
    """Wait until volume `name` has `ha_level` and no ha change runs, and return the record.

    Raises AssertionError, with the last record, after COPY_DEADLINE seconds.
    """
    deadline = time.monotonic() + COPY_DEADLINE
    while True:
        record: dict[str, Any] = node.call("volume.inspect", name)
        if record["ha_level"] == ha_level and "replica_nodes_next" not in record:
            return record
        assert time.monotonic() < deadline, f"ha level {ha_level} not reached: {record}"
        time.sleep(0.2)


def assert_replicas_identical(nodes: list[ClusterNode], vol_id: str) -> None:
    """Assert that the replicas on `nodes` have the same block table and data file.

    The block table contains the version and crc32 of every block. Call it once the volume is
    unmounted, so that no write is in flight.
    """
    tables = [(node.replica_dir(vol_id) / "table").read_bytes() for node in nodes]
    for node, table in zip(nodes[1:], tables[1:], strict=True):
        assert table == tables[0], f"block table of {node.ip} differs from {nodes[0].ip}"
    data = [sha256_file(node.replica_dir(vol_id) / "data") for node in nodes]
    for node, digest in zip(nodes[1:], data[1:], strict=True):
        assert digest == data[0], f"data file of {node.ip} differs from {nodes[0].ip}"
