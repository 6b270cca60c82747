"""pxd's bounds from pxd.toml: connections to the control socket and volumes per node.

One real pxd serves the module, started with a pxd.toml that sets control_max_connections = 3
and max_volumes = 2, and a sidecar in front of it for the REST create.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from nodeproc import REPO, START_TIMEOUT, Node

from pxfs import errors
from pxfs.frames import REPLY, REQUEST

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="pxd runs as root")

MAX_CONNECTIONS = 3
MAX_VOLUMES = 2
SIZE = 16 << 20
FD_TIMEOUT = 10.0
CLOSE_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    root = tmp_path_factory.mktemp("limits") / "node"
    root.mkdir()
    config = root / "pxd.toml"
    config.write_text(f"control_max_connections = {MAX_CONNECTIONS}\nmax_volumes = {MAX_VOLUMES}\n")
    node = Node(root)
    node.socket.parent.mkdir(parents=True)
    with open(node.log_path, "ab") as log:
        node.pxd = subprocess.Popen(
            [sys.executable, "-m", "daemon.pxd", "--data-dir", str(node.data_dir),
             "--socket", str(node.socket), "--config", str(config)],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    wait_until_up(node)
    node.start_sidecar()
    yield node
    node.cleanup([])


def wait_until_up(node: Node) -> None:
    """Wait until pxd returns "up" from node.status."""
    assert node.pxd is not None
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(errors.Unavailable, errors.ProtocolError):
            if node.call("node.status")["status"] == "up":
                return
        assert node.pxd.poll() is None, node.log_text()
        time.sleep(0.1)
    raise AssertionError(f"pxd did not start:\n{node.log_text()}")


def open_fds(pid: int) -> int:
    """Count the open file descriptors of process `pid`."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_for_fds(pid: int, expected: int) -> None:
    """Wait until process `pid` has at most `expected` open descriptors."""
    deadline = time.monotonic() + FD_TIMEOUT
    while open_fds(pid) > expected:
        assert time.monotonic() < deadline, f"{open_fds(pid)} descriptors open, {expected} at start"
        time.sleep(0.05)


def connect(path: Path) -> socket.socket:
    """A unix socket connection to `path` with a timeout."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    return sock


def call(sock: socket.socket, request_id: int, method: str) -> Any:
    """Send one request frame on `sock` and return the reply frame; None when it closed."""
    body = msgpack.packb([REQUEST, request_id, method, []], use_bin_type=True)
    try:
        sock.sendall(struct.pack(">I", len(body)) + body)
        header = receive_exactly(sock, 4)
        if header is None:
            return None
        data = receive_exactly(sock, struct.unpack(">I", header)[0])
    except ConnectionError:
        return None
    return None if data is None else msgpack.unpackb(data, raw=False)


def receive_exactly(sock: socket.socket, count: int) -> bytes | None:
    """Read `count` bytes; None when the peer closes first."""
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def test_control_socket_bound(node: Node) -> None:
    assert node.pxd is not None
    node.call("node.status")
    start = open_fds(node.pxd.pid)
    # The sidecar keeps one connection open to pxd, so the test may open the rest.
    free = MAX_CONNECTIONS - 1

    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(connect(node.socket)) for _ in range(free)]
        for number, sock in enumerate(held):
            reply = call(sock, number, "node.status")
            assert reply is not None
            assert reply[0] == REPLY
            assert reply[3]["status"] == "up"

        for _ in range(10):
            started = time.monotonic()
            with connect(node.socket) as rejected:
                assert call(rejected, 99, "node.status") is None
            assert time.monotonic() - started < CLOSE_TIMEOUT
        result = node.pxctl("status")
        assert result.returncode == errors.Unavailable.exit_code, result.stderr
        assert result.stderr.startswith("pxctl: ")
        assert "Traceback" not in result.stderr

        # The admitted connections still work.
        for number, sock in enumerate(held):
            assert call(sock, 100 + number, "node.status") is not None

    wait_for_fds(node.pxd.pid, start)
    assert node.pxctl("status").returncode == 0
    for _ in range(3):
        with connect(node.socket) as sock:
            assert call(sock, 1, "node.status") is not None
    wait_for_fds(node.pxd.pid, start)
    log = node.log_text()
    assert f"control rpc: closed a new connection: {MAX_CONNECTIONS} connections are open" in log
    assert "Traceback" not in log


def create(node: Node, name: str) -> dict[str, Any]:
    """Create a volume of SIZE bytes through the control socket."""
    result: dict[str, Any] = node.call(
        "volume.create", {"name": name, "size": SIZE, "ha_level": 1, "labels": {}}
    )
    return result


def test_max_volumes(node: Node) -> None:
    names = [f"limit{number}" for number in range(MAX_VOLUMES)]
    ids = [create(node, name)["id"] for name in names]
    try:
        with pytest.raises(errors.NoSpace) as caught:
            create(node, "one-too-many")
        assert caught.value.errno == errno.ENOSPC
        assert f"and max_volumes in pxd.toml is {MAX_VOLUMES}" in caught.value.message
        assert "delete a volume or raise max_volumes" in caught.value.message

        result = node.pxctl("volume", "create", "one-too-many", "--size", "16M")
        assert result.returncode == errors.NoSpace.exit_code
        assert result.stderr.startswith("pxctl: node ")
        assert "max_volumes" in result.stderr

        body = {"locator": {"name": "one-too-many"}, "spec": {"size": SIZE}}
        status, reply = node.rest("POST", "/v1/osd-volumes", body)
        assert status == 200
        assert "max_volumes" in reply["volume_response"]["error"]
        assert "id" not in reply

        # A create that names an existing volume still returns it.
        assert create(node, names[0])["id"] == ids[0]
        assert sorted(record["name"] for record in node.call("volume.list", {})) == names

        node.call("volume.delete", names[0])
        ids[0] = create(node, "after-delete")["id"]
        names[0] = "after-delete"
    finally:
        for name in names:
            with contextlib.suppress(errors.NotFound):
                node.call("volume.delete", name)
    assert json.dumps(node.call("volume.list", {})) == "[]"
