"""Hostile clients on every socket of a running node, with memory, descriptor and data checks.

One node of a cluster on a real etcd, so that it serves the peer RPC over TCP too, with its
sidecar and one mounted volume. The test sends each socket a bounded number of rounds of
hostile input of seven kinds. They are truncated frames, oversized lengths, wrong types (msgpack
on the RPC sockets, JSON on the HTTP ones), unknown methods, replayed handshakes, requests
before the handshake and connections closed in the middle of a request. The HTTP sockets
(REST and the Docker plugin) get the HTTP form of each kind. They have no handshake, so the
two kinds about handshakes do not apply to them.

Afterwards every socket must still serve a normal client, each process (pxd, the sidecar, the
mount child) must hold as many descriptors as before and an RSS within RSS_MARGIN of where it
was after the warm-up round, and every volume must hold the same data (sha256). The counts of
inputs by socket and kind are printed; run with `-s` to see them.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from clusterproc import REPO, Cluster, ClusterNode, mount_on, release_on, sha256_file, wait_until
from rawrpc import GARBAGE, TIMEOUT, frame, receive_frame

from pxfs.frames import CHALLENGE, MAX_FRAME, REQUEST, RESPONSE, WELCOME
from pxfs.rpc import RpcClient, handshake_digest, read_secret
from pxfs.rpcserver import HANDSHAKE_MAX_FRAME

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"
)

MIB = 1 << 20
#: Rounds of every hostile input after the warm-up round.
ROUNDS = 3
#: How much each process's RSS may grow from the end of the warm-up round to the end. The
#: warm-up round runs every code path once, so what remains is growth per round. The margin
#: leaves room for allocator noise, but a leak of 16 KiB per input (about 400 inputs in each of
#: the three rounds) would exceed it.
RSS_MARGIN = 16 * MIB
#: Seconds to wait after the last input before reading RSS, for closed connections to be reaped.
SETTLE_SECONDS = 2.0
KINDS = (
    "truncated frames",
    "oversized lengths",
    "wrong types",
    "unknown methods",
    "replayed handshakes",
    "requests before handshake",
    "closes mid-request",
)
ERROR_CODES = {"invalid_argument", "not_found", "not_supported", "stale_epoch"}
LIST_REQUEST = b"GET /v1/osd-volumes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


# The node


@dataclass
class HostileNode:
    """The node under attack, its sidecar, its mount child and the volumes' known contents."""

    cluster: Cluster
    node: ClusterNode
    sidecar: subprocess.Popen[bytes]
    sidecar_log: Path
    rest_port: int
    plugin_socket: Path
    mountpoint: Path
    child_pid: int
    child_socket: Path
    idle_id: str
    secret: bytes

    def pids(self) -> dict[str, int]:
        """The processes that own the sockets."""
        assert self.node.pxd is not None
        return {"pxd": self.node.pxd.pid, "sidecar": self.sidecar.pid, "mount": self.child_pid}

    def data_digests(self) -> dict[str, str]:
        """sha256 of each file on the mounted volume and of the idle volume's replica files."""
        digests = {
            f"mounted:{path.name}": sha256_file(path) for path in sorted(self.mountpoint.iterdir())
        }
        replica = self.node.replica_dir(self.idle_id)
        for name in ("data", "table"):
            digests[f"idle:{name}"] = sha256_file(replica / name)
        return digests


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_sidecar(root: Path, node: ClusterNode) -> tuple[subprocess.Popen[bytes], int, Path]:
    """Start pxd-sidecar for `node`, without waiting for it; return it, its port and socket."""
    port, plugin = _free_port(), root / "plugin.sock"
    log_path = root / "sidecar.log"
    with open(log_path, "ab") as log:
        sidecar = subprocess.Popen(
            [sys.executable, "-m", "daemon.sidecar", "--socket", str(node.socket),
             "--rest", f"127.0.0.1:{port}", "--plugin-socket", str(plugin),
             "--docker-mount-base", str(root / "docker"), "--state-dir", str(root / "state")],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    return sidecar, port, plugin


def _wait_for_sidecar(port: int) -> None:
    def answers() -> bool:
        with contextlib.suppress(OSError):
            return _http(("127.0.0.1", port), LIST_REQUEST)[0] == 200
        return False

    wait_until(answers, 30, "the sidecar did not start")


def _write_files(directory: Path, count: int) -> None:
    for index in range(count):
        with open(directory / f"file{index}", "wb") as f:
            f.write(os.urandom(MIB + 4097 * index))
            f.flush()
            os.fsync(f.fileno())


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileNode]:
    root = tmp_path_factory.mktemp("hostile-sockets")
    cluster = Cluster(root, 1)
    sidecar = None
    mountpoint = root / "mnt"
    try:
        cluster.start()
        node = cluster.nodes[0]
        spec = {"size": 64 * MIB, "ha_level": 1, "labels": {}}
        idle_id = node.call("volume.create", {"name": "idle", **spec})["id"]
        mount_on(node, "idle", root / "idle")
        _write_files(root / "idle", 2)
        release_on(node, "idle", root / "idle")
        mounted_id = node.call("volume.create", {"name": "mounted", **spec})["id"]
        mount_on(node, "mounted", mountpoint)
        _write_files(mountpoint, 3)
        (child_pid,) = node.child_pids()
        sidecar, rest_port, plugin = _start_sidecar(root, node)
        _wait_for_sidecar(rest_port)
        yield HostileNode(
            cluster, node, sidecar, root / "sidecar.log", rest_port, plugin, mountpoint,
            child_pid, node.data_dir / "mnt" / f"{mounted_id}.sock", idle_id,
            read_secret(cluster.secret_file),
        )  # fmt: skip
    finally:
        if sidecar is not None:
            sidecar.terminate()
            sidecar.wait(30)
        with contextlib.suppress(Exception):
            release_on(cluster.nodes[0], "mounted", mountpoint)
        cluster.stop()


# Measurements


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _fd_targets(pid: int) -> list[str]:
    """What each open descriptor of `pid` refers to, for a failure message."""
    targets = []
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        with contextlib.suppress(OSError):
            targets.append(f"{fd}:{os.readlink(f'/proc/{pid}/fd/{fd}')}")
    return targets


class Counts:
    """Hostile inputs sent, by socket and kind."""

    def __init__(self) -> None:
        self.sent: collections.Counter[tuple[str, str]] = collections.Counter()
        self.kinds_of: dict[str, set[str]] = collections.defaultdict(set)

    def add(self, target: str, kind: str, count: int = 1) -> None:
        """Count `count` inputs of `kind` sent to `target`."""
        self.sent[target, kind] += count
        self.kinds_of[target].add(kind)

    def table(self, targets: list[str]) -> str:
        """Return the counts as a table, kinds down and sockets across, with totals."""
        width = max(len(kind) for kind in KINDS) + 2
        lines = ["".ljust(width) + "".join(t.rjust(15) for t in targets) + "total".rjust(9)]
        for kind in KINDS:
            cells = []
            for target in targets:
                applies = kind in self.kinds_of[target]
                cells.append(str(self.sent[target, kind]) if applies else "n/a")
            total = sum(self.sent[target, kind] for target in targets)
            lines.append(kind.ljust(width) + "".join(c.rjust(15) for c in cells) + f"{total:9}")
        totals = [sum(self.sent[target, kind] for kind in KINDS) for target in targets]
        lines.append("total".ljust(width) + "".join(f"{t:15}" for t in totals)
                     + f"{sum(totals):9}")  # fmt: skip
        return "\n".join(lines)


# The RPC sockets


@dataclass
class RpcSocket:
    """One msgpack RPC socket: where it is, its secret, a read-only call and wrong calls."""

    name: str
    address: Path | tuple[str, int]
    secret: bytes | None
    probe: tuple[str, list[Any]]
    #: Calls with arguments of the wrong msgpack type, each rejected with an error reply.
    wrong_calls: list[tuple[str, list[Any]]]
    #: Methods of the other sockets, unknown on this one.
    foreign_methods: list[str]

    def connect(self) -> socket.socket:
        """Open a blocking connection with a timeout."""
        return _connect(self.address)

    @contextlib.contextmanager
    def session(self, authenticated: bool) -> Iterator[socket.socket]:
        """A connection that has read the CHALLENGE, and passed the handshake if asked to."""
        sock = self.connect()
        try:
            if self.secret is not None:
                challenge = receive_frame(sock)
                assert challenge is not None and challenge[0] == CHALLENGE, challenge
                if authenticated:
                    digest = handshake_digest(self.secret, challenge[1])
                    sock.sendall(frame([RESPONSE, digest]))
                    assert receive_frame(sock) == [WELCOME, True]
            yield sock
        finally:
            sock.close()

    def phases(self) -> list[bool]:
        """Whether each pass of an input is after the handshake: before it too, with a secret."""
        return [False, True] if self.secret is not None else [True]


def _rpc_sockets(hostile: HostileNode) -> list[RpcSocket]:
    node, idle = hostile.node, hostile.idle_id
    store_wrong = [
        ("store.info", [1]), ("store.info", [None]), ("store.info", [[idle]]),
        ("store.read", [idle, "x"]), ("store.read", [idle, [1.5]]), ("store.read", [idle, {}]),
        ("store.write", [idle, "1", 1, []]), ("store.trim", [idle, "1", {"a": 1}]),
        ("store.versions", [idle, "a", "b"]),
        ("store.delete", [None]), ("volume.report_write_set", [1, 2, 3, 4]),
    ]  # fmt: skip
    peer = {
        "probe": ("store.info", [idle]),
        "wrong_calls": store_wrong,
        "foreign_methods": ["volume.create", "node.status", "mount.stats", "mount.grow"],
    }
    return [
        RpcSocket(
            "control",
            node.socket,
            None,
            ("node.status", []),
            [
                ("volume.inspect", [1.5]),
                ("volume.inspect", [{}]),
                ("volume.inspect", [None]),
                ("volume.delete", [b"idle"]),
                ("volume.mount", ["idle", None]),
                ("volume.create", [[]]),
                ("volume.create", [{"name": 5, "size": "x"}]),
                ("volume.update", ["idle", []]),
            ],
            ["store.read", "store.write", "mount.grow", "volume.report_write_set"],
        ),  # fmt: skip
        RpcSocket("peer-unix", node.socket.parent / "peer.sock", hostile.secret, **peer),
        RpcSocket("peer-tcp", (node.ip, node.peer_port), hostile.secret, **peer),
        RpcSocket(
            "mount-control",
            hostile.child_socket,
            hostile.secret,
            ("mount.stats", []),
            [
                ("mount.grow", ["x"]),
                ("mount.grow", [None]),
                ("mount.grow", [1.5]),
                ("mount.grow", [True]),
                ("mount.add_replica", [1, 2, 3]),
                ("mount.add_replica", ["n", 5, 1]),
                ("mount.remove_replica", [5, 1]),
            ],
            ["store.write", "volume.create", "node.status"],
        ),  # fmt: skip
    ]


def _closed_without_reply(sock: socket.socket) -> bool:
    """True when the server closes the connection without sending a frame."""
    try:
        return receive_frame(sock) is None
    except ConnectionResetError:
        return True


def _rst_close(sock: socket.socket) -> None:
    """Close with a TCP reset (or a plain close on a unix socket), as a crashed client would."""
    if sock.family == socket.AF_INET:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _call(sock: socket.socket, request_id: int, method: str, args: list[Any]) -> Any:
    sock.sendall(frame([REQUEST, request_id, method, args]))
    reply = receive_frame(sock)
    assert reply is not None and reply[1] == request_id, (method, args, reply)
    return reply


def _assert_probe_works(target: RpcSocket, sock: socket.socket) -> None:
    reply = _call(sock, 999_999, *target.probe)
    assert reply[2] is None, (target.name, reply)


def rpc_truncated(target: RpcSocket, counts: Counts) -> None:
    """Send a valid request cut at several points, then end the stream."""
    valid = frame([REQUEST, 1, *target.probe])
    for authenticated in target.phases():
        for cut in sorted({1, 2, 3, 4, 5, len(valid) // 2, len(valid) - 1}):
            with target.session(authenticated) as sock:
                sock.sendall(valid[:cut])
                sock.shutdown(socket.SHUT_WR)
                assert _closed_without_reply(sock), (target.name, cut)
            counts.add(target.name, "truncated frames")


def rpc_oversized(target: RpcSocket, counts: Counts) -> None:
    """Send length prefixes beyond the limits; the server must close at once, unasked."""
    lengths = [MAX_FRAME + 1, 0x7FFFFFFF, 0xFFFFFFFF]
    for authenticated in target.phases():
        limits = lengths if authenticated else [HANDSHAKE_MAX_FRAME + 1, *lengths]
        for length in limits:
            with target.session(authenticated) as sock:
                sock.sendall(struct.pack(">I", length) + b"x" * 1000)
                assert _closed_without_reply(sock), (target.name, length)
            counts.add(target.name, "oversized lengths")
    # A frame of the maximum size is allowed after the handshake; the client leaves after
    # sending part of it, which must free what the server buffered.
    with target.session(True) as sock:
        sock.sendall(struct.pack(">I", MAX_FRAME) + b"\x00" * (2 * MIB))
        _rst_close(sock)
    counts.add(target.name, "oversized lengths")


def _kind_of(garbage: bytes) -> str:
    """Return the kind of hostile input that a byte string of GARBAGE is."""
    if not garbage:
        return "closes mid-request"
    if len(garbage) < 4:
        return "truncated frames"
    (length,) = struct.unpack_from(">I", garbage)
    if length > MAX_FRAME:
        return "oversized lengths"
    return "truncated frames" if len(garbage) < 4 + length else "wrong types"


def rpc_garbage(target: RpcSocket, counts: Counts) -> None:
    """Send each byte string of GARBAGE, and a few more wrong shapes, then end the stream."""
    extra = [frame([REQUEST, 1, "x", [], "extra"]), frame({"id": 1}), frame([REQUEST, 1.5])]
    for authenticated in target.phases():
        for item in GARBAGE + extra:
            with target.session(authenticated) as sock:
                sock.sendall(item)
                sock.shutdown(socket.SHUT_WR)
                assert _closed_without_reply(sock), (target.name, item[:40])
            counts.add(target.name, _kind_of(item))


def rpc_wrong_types(target: RpcSocket, counts: Counts) -> None:
    """Call methods with arguments of wrong types; each gets an error, the connection stays."""
    with target.session(True) as sock:
        for request_id, (method, args) in enumerate(target.wrong_calls, start=1):
            reply = _call(sock, request_id, method, args)
            assert reply[2] is not None and reply[2][0] in ERROR_CODES, (method, args, reply)
            counts.add(target.name, "wrong types")
        _assert_probe_works(target, sock)


def rpc_unknown_methods(target: RpcSocket, counts: Counts) -> None:
    """Call methods the socket does not have; each gets NotSupported on a connection that stays."""
    names = ["nope", "", "__init__", "handlers", "_call", "x" * 65536, "störe.info",
             f"{target.probe[0]}\x00", f" {target.probe[0]}", *target.foreign_methods]  # fmt: skip
    with target.session(True) as sock:
        for request_id, name in enumerate(names, start=1):
            reply = _call(sock, request_id, name, [])
            assert reply[2] is not None and reply[2][0] == "not_supported", (name, reply)
            counts.add(target.name, "unknown methods")
        _assert_probe_works(target, sock)


def _capture_handshake(target: RpcSocket) -> tuple[bytes, bytes, socket.socket]:
    """Pass a real handshake; return the CHALLENGE and RESPONSE frames and the open socket."""
    assert target.secret is not None
    sock = target.connect()
    challenge = receive_frame(sock)
    response = frame([RESPONSE, handshake_digest(target.secret, challenge[1])])
    sock.sendall(response)
    assert receive_frame(sock) == [WELCOME, True]
    return frame(challenge), response, sock


def rpc_replayed_handshake(
    target: RpcSocket, counts: Counts, other_response: bytes | None
) -> bytes | None:
    """Replay a captured handshake on new connections and on the one that passed it.

    `other_response` is a RESPONSE captured on another socket with the same secret. Returns
    this socket's captured RESPONSE.
    """
    if target.secret is None:
        return other_response
    challenge, response, live = _capture_handshake(target)
    try:
        replays = [response, response + response, challenge, challenge + response]
        if other_response is not None:
            replays.append(other_response)
        for replay in replays:
            with target.session(False) as sock:
                sock.sendall(replay)
                assert _closed_without_reply(sock), (target.name, replay[:20])
            counts.add(target.name, "replayed handshakes")
        # On the connection that passed it, the RESPONSE again is not a request.
        live.sendall(response)
        assert _closed_without_reply(live)
        counts.add(target.name, "replayed handshakes")
    finally:
        live.close()
    return response


def rpc_before_handshake(target: RpcSocket, counts: Counts) -> None:
    """Send requests, and handshake frames of the wrong form, in place of the RESPONSE."""
    if target.secret is None:
        return
    attempts = [
        frame([REQUEST, 1, *target.probe]),
        b"".join(frame([REQUEST, n, *target.probe]) for n in range(10)),
        frame([REQUEST, 1, *target.wrong_calls[0]]),
        frame([RESPONSE, b"x" * 32]),
        frame([RESPONSE, "not bytes"]),
        frame([RESPONSE, 12345]),
        frame([RESPONSE, handshake_digest(b"wrong secret", b"")]),
        frame([WELCOME, True]),
        frame([RESPONSE]),
    ]
    for attempt in attempts:
        with target.session(False) as sock:
            sock.sendall(attempt)
            assert _closed_without_reply(sock), (target.name, attempt[:40])
        counts.add(target.name, "requests before handshake")


def rpc_close_mid_request(target: RpcSocket, counts: Counts) -> None:
    """Leave in the middle: before the challenge, mid-frame, and before reading replies."""
    valid = frame([REQUEST, 1, *target.probe])
    if target.secret is not None:
        _rst_close(target.connect())
        counts.add(target.name, "closes mid-request")
        sock = target.connect()
        sock.recv(2)
        _rst_close(sock)
        counts.add(target.name, "closes mid-request")
    sends = [
        valid[: len(valid) // 2],
        valid,
        valid * 50,
        valid + valid[:3],
        frame([REQUEST, 1, *target.wrong_calls[0]]) + valid,
    ]
    for data in sends:
        with target.session(True) as sock:
            sock.sendall(data)
            _rst_close(sock)
        counts.add(target.name, "closes mid-request")


def attack_rpc_sockets(targets: list[RpcSocket], counts: Counts) -> None:
    """One round of every hostile RPC input on every RPC socket."""
    other_response = None
    for target in targets:
        rpc_garbage(target, counts)
        rpc_truncated(target, counts)
        rpc_oversized(target, counts)
        rpc_wrong_types(target, counts)
        rpc_unknown_methods(target, counts)
        other_response = rpc_replayed_handshake(target, counts, other_response)
        rpc_before_handshake(target, counts)
        rpc_close_mid_request(target, counts)


# The HTTP sockets


def _connect(address: Path | tuple[str, int]) -> socket.socket:
    """Open a blocking unix or TCP connection with a timeout."""
    family = socket.AF_UNIX if isinstance(address, Path) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    try:
        sock.connect(str(address) if isinstance(address, Path) else address)
    except OSError:
        sock.close()
        raise
    return sock


def _http(
    address: Path | tuple[str, int], request: bytes, shutdown: bool = False
) -> tuple[int, bytes]:
    """Send raw bytes; return the status of the first response (0 if none) and its body."""
    sock = _connect(address)
    received = b""
    try:
        # The server may reply and close before it has read all of a request it rejects.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
            if shutdown:
                sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
                if _complete(received):
                    break
    finally:
        sock.close()
    if not received.startswith(b"HTTP/1."):
        return 0, received
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def _complete(received: bytes) -> bool:
    head, separator, body = received.partition(b"\r\n\r\n")
    if not separator:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def _post(path: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body  # fmt: skip


@dataclass
class HttpSocket:
    """One HTTP socket: where it is, a path that takes a JSON body, and its wrong bodies."""

    name: str
    address: Path | tuple[str, int]
    post_path: str
    #: A body for post_path that creates a volume.
    valid_create: bytes
    #: A whole request that changes nothing.
    read_only: bytes
    wrong_bodies: list[bytes]
    unknown: list[bytes]


def _http_sockets(hostile: HostileNode) -> list[HttpSocket]:
    create = "/v1/osd-volumes"
    return [
        HttpSocket(
            "rest",
            ("127.0.0.1", hostile.rest_port),
            create,
            b'{"locator": {"name": "never"}, "spec": {"size": 1073741824}}',
            LIST_REQUEST,
            [
                b"[]",
                b"null",
                b'{"locator": "r", "spec": {"size": 1}}',
                b'{"locator": {"name": 5}, "spec": {"size": 1}}',
                b'{"locator": {"name": "r"}, "spec": {"size": "10G"}}',
                b'{"locator": {"name": "r"}, "spec": {"size": 1.5e9, "ha_level": "1"}}',
                b"\xff\xfe",
            ],
            [
                b"BREW /v1/osd-volumes HTTP/1.1\r\nHost: x\r\n\r\n",
                b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\n\r\n",
                b"DELETE / HTTP/1.1\r\nHost: x\r\n\r\n",
                b"GET /v2/osd-volumes HTTP/1.1\r\n\r\n",
            ],
        ),  # fmt: skip
        HttpSocket(
            "plugin",
            hostile.plugin_socket,
            "/VolumeDriver.Create",
            b'{"Name": "never"}',
            _post("/VolumeDriver.List", b"{}"),
            [
                b'{"Name": 5}',
                b'{"Name": "x", "Opts": [1]}',
                b'{"Name": null}',
                b"[]",
                b'{"Name": {"a": 1}}',
                b"\xff\xfe",
                b'{"Name": "x", "Opts": {"size": []}}',
            ],
            [
                b"POST /VolumeDriver.Nope HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
                b"POST /Plugin.Deactivate HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
                b"GET /VolumeDriver.List HTTP/1.1\r\nHost: x\r\n\r\n",
                b"PUT /VolumeDriver.Create HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
            ],
        ),  # fmt: skip
    ]


def _rejected(name: str, status: int, reply: bytes) -> bool:
    """True when a reply is no success: the Docker protocol puts errors in Err of a 200."""
    if name == "plugin" and status == 200:
        return bool(json.loads(reply)["Err"])
    return not 200 <= status < 300


def attack_http_socket(target: HttpSocket, counts: Counts) -> None:
    """One round of every hostile HTTP input on one HTTP socket."""
    name, address = target.name, target.address
    truncated = [
        f"POST {target.post_path} HTT".encode(),
        b"GET /v1/osd-volumes HTTP/1.1\r\nHost: x\r\n",
        _post(target.post_path, b'{"Name": "trunc"}')[:-5],
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc",
    ]
    for request in truncated:
        status, reply = _http(address, request, shutdown=True)
        assert _rejected(name, status, reply), (name, request, status, reply)
        counts.add(name, "truncated frames")

    oversized = [
        f"POST {target.post_path} HTTP/1.1\r\nContent-Length: {10**12}\r\n\r\n{{}}".encode(),
        b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n",
        _post(target.post_path, b" " * (300 * 1024)),
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n",
    ]  # fmt: skip
    for request in oversized:
        status, reply = _http(address, request, shutdown=True)
        assert _rejected(name, status, reply), (name, request[:60], status, reply)
        counts.add(name, "oversized lengths")

    for body in target.wrong_bodies:
        status, reply = _http(address, _post(target.post_path, body))
        assert status in (200, 400), (body, status, reply)
        assert _rejected(name, status, reply), (body, status, reply)
        counts.add(name, "wrong types")

    for request in target.unknown:
        status, _ = _http(address, request)
        assert status in (404, 405, 400), (name, request, status)
        counts.add(name, "unknown methods")

    # A create that would succeed, cut off before its end, and a read-only request whose
    # reply nobody reads.
    create = _post(target.post_path, target.valid_create)
    for request in (create[: len(create) // 3], create[:-1], target.read_only):
        sock = _connect(address)
        sock.sendall(request)
        _rst_close(sock)
        counts.add(name, "closes mid-request")


# The test


def _normal_clients_work(hostile: HostileNode, rpc_targets: list[RpcSocket]) -> None:
    assert hostile.node.call("node.status")["status"] == "up"
    names = sorted(record["name"] for record in hostile.node.call("volume.list", {}))
    assert names == ["idle", "mounted"]
    for target in rpc_targets[1:]:
        with target.session(True) as sock:
            _assert_probe_works(target, sock)

    async def clients() -> None:
        peer = await RpcClient.connect_tcp(hostile.node.ip, hostile.node.peer_port, hostile.secret)
        child = await RpcClient.connect_unix(hostile.child_socket, hostile.secret)
        try:
            assert (await peer.call("store.info", hostile.idle_id))["nblocks"] > 0
            assert "boot_id" in await child.call("mount.stats")
        finally:
            await peer.aclose()
            await child.aclose()

    trio.run(clients)
    status, body = _http(("127.0.0.1", hostile.rest_port), LIST_REQUEST)
    assert status == 200
    assert b"mounted" in body
    status, body = _http(hostile.plugin_socket, _post("/VolumeDriver.List", b"{}"))
    assert status == 200
    assert json.loads(body)["Err"] == ""
    with open(hostile.mountpoint / "after", "wb") as f:
        f.write(b"still writable")
        f.flush()
        os.fsync(f.fileno())
    (hostile.mountpoint / "after").unlink()


def _snapshot(hostile: HostileNode) -> dict[str, tuple[int, int]]:
    time.sleep(SETTLE_SECONDS)
    return {name: (_rss(pid), _fds(pid)) for name, pid in hostile.pids().items()}


def test_hostile_clients_on_every_socket(hostile: HostileNode) -> None:
    rpc_targets = _rpc_sockets(hostile)
    http_targets = _http_sockets(hostile)
    digests = hostile.data_digests()
    cold = _snapshot(hostile)
    cold_targets = {name: _fd_targets(pid) for name, pid in hostile.pids().items()}
    counts = Counts()

    def one_round() -> None:
        attack_rpc_sockets(rpc_targets, counts)
        for target in http_targets:
            attack_http_socket(target, counts)

    one_round()
    warm = _snapshot(hostile)
    for _ in range(ROUNDS):
        one_round()
    _normal_clients_work(hostile, rpc_targets)

    def descriptors_back() -> bool:
        return all(_fds(pid) <= cold[name][1] for name, pid in hostile.pids().items())

    with contextlib.suppress(AssertionError):
        wait_until(descriptors_back, 30, "the processes did not close their descriptors")
    end = _snapshot(hostile)
    targets = [t.name for t in rpc_targets] + [t.name for t in http_targets]
    print(f"\nhostile inputs over {ROUNDS + 1} rounds (the first a warm-up):")
    print(counts.table(targets))
    for name in hostile.pids():
        print(f"{name}: RSS {cold[name][0] / MIB:.1f} MiB at the start, "
              f"{warm[name][0] / MIB:.1f} after the warm-up, {end[name][0] / MIB:.1f} at the end; "
              f"descriptors {cold[name][1]}, {warm[name][1]}, {end[name][1]}")  # fmt: skip
    for name in hostile.pids():
        assert end[name][0] <= warm[name][0] + RSS_MARGIN, (name, warm[name], end[name])
        pid = hostile.pids()[name]
        assert end[name][1] <= cold[name][1], (name, cold_targets[name], _fd_targets(pid))
    assert hostile.data_digests() == digests
    assert "Traceback" not in hostile.node.log_text()
    assert "Traceback" not in hostile.sidecar_log.read_text(errors="replace")
    assert hostile.node.pxd is not None and hostile.node.pxd.poll() is None
    assert hostile.sidecar.poll() is None
    assert hostile.node.child_pids() == [hostile.child_pid]
