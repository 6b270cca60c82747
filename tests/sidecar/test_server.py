"""The connection and request bounds of the sidecar (pxfs/api/server.py and the REST app).

The gate is tested on its own first. Then a pxd-sidecar process with small bounds in its
pxd.toml gets more connections than it allows, over real sockets from several loopback
addresses. It must close the extra ones at once and serve a normal client once they are closed.
Afterwards it must have the file descriptors it started with.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sidecarproc import SidecarProcess, open_fds

from pxfs.api.server import ConnectionGate, ConnectionLimits

FakePxd = Any
Connection = TypeVar("Connection", bound=http.client.HTTPConnection)
FD_TIMEOUT = 10.0
#: Seconds within which a rejected connection must be closed, far below the idle timeout.
CLOSE_TIMEOUT = 2.0

LIMITS = """\
rest_max_connections = 6
rest_max_connections_per_client = 4
rest_max_requests = 2
plugin_max_connections = 3
"""


# --- the gate -----------------------------------------------------------------------------------


def test_gate_counts_per_client_and_total() -> None:
    gate = ConnectionGate("test", ConnectionLimits(total=3, per_client=2))
    assert gate.admit("10.0.0.1")
    assert gate.admit("10.0.0.1")
    assert not gate.admit("10.0.0.1")
    assert gate.admit("10.0.0.2")
    assert not gate.admit("10.0.0.3")
    assert gate.open == 3

    gate.release("10.0.0.1")
    assert gate.open == 2
    assert gate.admit("10.0.0.3")
    assert not gate.admit("10.0.0.1")


def test_gate_release_frees_every_place() -> None:
    gate = ConnectionGate("test", ConnectionLimits(total=2, per_client=1))
    for _ in range(5):
        assert gate.admit("a")
        assert gate.admit("b")
        assert not gate.admit("c")
        gate.release("a")
        gate.release("b")
    assert gate.open == 0


def test_gate_without_per_client_bound() -> None:
    gate = ConnectionGate("test", ConnectionLimits(total=3))
    assert all(gate.admit("") for _ in range(3))
    assert not gate.admit("")


def test_gate_rejections_warn_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    gate = ConnectionGate("test", ConnectionLimits(total=1))
    assert gate.admit("10.0.0.1")
    with caplog.at_level("DEBUG", logger="pxfs.api.server"):
        for _ in range(5):
            assert not gate.admit("10.0.0.1")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        "test: closed a connection from 10.0.0.1: 1 connections are open, the maximum"
    ]
    debug = [r for r in caplog.records if r.levelname == "DEBUG"]
    assert len(debug) == 4


# --- helpers for the process tests --------------------------------------------------------------


@pytest.fixture
def limited_sidecar(
    tmp_path: Path, sidecar_process: Callable[..., SidecarProcess]
) -> SidecarProcess:
    """A sidecar process whose pxd.toml sets the small bounds of LIMITS."""
    config = tmp_path / "pxd.toml"
    config.write_text(LIMITS)
    return sidecar_process("--config", str(config))


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTPConnection over a unix socket."""

    def __init__(self, path: Path) -> None:
        super().__init__("plugin", timeout=10)
        self.path = path

    def connect(self) -> None:
        """Connect to the unix socket."""
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self.path))


def rest_connection(port: int, source: str) -> http.client.HTTPConnection:
    """An open HTTP connection to 127.0.0.1:`port` from the loopback address `source`."""
    connection = http.client.HTTPConnection(
        "127.0.0.1", port, timeout=10, source_address=(source, 0)
    )
    connection.connect()
    return connection


def get(connection: http.client.HTTPConnection, path: str = "/osd-volumes/versions") -> int:
    """Send one GET on `connection`, keeping it open; return the status."""
    connection.request("GET", path)
    reply = connection.getresponse()
    reply.read()
    return reply.status


def activate(connection: http.client.HTTPConnection) -> int:
    """POST /Plugin.Activate on `connection`, keeping it open; return the status."""
    connection.request("POST", "/Plugin.Activate", body=b"{}")
    reply = connection.getresponse()
    reply.read()
    return reply.status


def assert_closed_at_once(connection: http.client.HTTPConnection, send: Callable[..., int]) -> None:
    """Check that the server closes `connection` without a reply, and soon."""
    started = time.monotonic()
    try:
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
            send(connection)
    finally:
        connection.close()
    assert time.monotonic() - started < CLOSE_TIMEOUT


def wait_for_fds(pid: int, expected: int) -> None:
    """Wait until process `pid` has at most `expected` open descriptors."""
    deadline = time.monotonic() + FD_TIMEOUT
    while open_fds(pid) > expected:
        assert time.monotonic() < deadline, f"{open_fds(pid)} descriptors open, {expected} at start"
        time.sleep(0.05)


def baseline_fds(sidecar: SidecarProcess, port: int) -> int:
    """Serve one request, then return the number of descriptors of the idle sidecar."""
    connection = rest_connection(port, "127.0.0.1")
    assert get(connection) == 200
    connection.close()
    # The closed connection's descriptor goes once the sidecar's event loop notices.
    time.sleep(0.2)
    return open_fds(sidecar.pid)


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    """An ExitStack for connections, closed at the end of the test whatever happens."""
    with ExitStack() as connections:
        yield connections


def keep(stack: ExitStack, connection: Connection) -> Connection:
    """Close `connection` when `stack` closes, and return it."""
    stack.callback(connection.close)
    return connection


# --- the REST port ------------------------------------------------------------------------------


def test_rest_bound_per_client(limited_sidecar: SidecarProcess, stack: ExitStack) -> None:
    port = limited_sidecar.port
    start = baseline_fds(limited_sidecar, port)

    held = [keep(stack, rest_connection(port, "127.0.0.1")) for _ in range(4)]
    assert [get(connection) for connection in held] == [200] * 4
    assert_closed_at_once(rest_connection(port, "127.0.0.1"), get)
    # Another client still gets in: the bound is per address.
    other = keep(stack, rest_connection(port, "127.0.0.2"))
    assert get(other) == 200
    # The connections that were admitted keep working.
    assert [get(connection) for connection in held] == [200] * 4

    for connection in [*held, other]:
        connection.close()
    wait_for_fds(limited_sidecar.pid, start)
    again = [keep(stack, rest_connection(port, "127.0.0.1")) for _ in range(4)]
    assert [get(connection) for connection in again] == [200] * 4
    for connection in again:
        connection.close()
    wait_for_fds(limited_sidecar.pid, start)

    assert limited_sidecar.stop() == 0
    log = limited_sidecar.log()
    assert "REST API: closed a connection from 127.0.0.1: 4 connections from it are open" in log
    assert "Traceback" not in log


def test_rest_bound_total(limited_sidecar: SidecarProcess, stack: ExitStack) -> None:
    port = limited_sidecar.port
    start = baseline_fds(limited_sidecar, port)

    sources = ["127.0.0.1", "127.0.0.1", "127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.4"]
    held = [keep(stack, rest_connection(port, source)) for source in sources]
    assert [get(connection) for connection in held] == [200] * 6
    for source in ("127.0.0.5", "127.0.0.1"):
        assert_closed_at_once(rest_connection(port, source), get)

    held.pop().close()
    wait_for_fds(limited_sidecar.pid, start + 5)
    assert get(keep(stack, rest_connection(port, "127.0.0.5"))) == 200

    stack.close()
    wait_for_fds(limited_sidecar.pid, start)
    connection = rest_connection(port, "127.0.0.6")
    assert get(connection, "/v1/osd-volumes") == 200
    connection.close()
    wait_for_fds(limited_sidecar.pid, start)
    assert limited_sidecar.stop() == 0
    assert "REST API: closed a connection from 127.0.0.5: 6 connections are open" in (
        limited_sidecar.log()
    )


def test_rejected_connections_hold_nothing(
    limited_sidecar: SidecarProcess, stack: ExitStack
) -> None:
    port = limited_sidecar.port
    start = baseline_fds(limited_sidecar, port)
    held = [keep(stack, rest_connection(port, "127.0.0.1")) for _ in range(4)]
    assert [get(connection) for connection in held] == [200] * 4

    # Many rejections in a row, each closed at once, leave no descriptor behind.
    for _ in range(50):
        assert_closed_at_once(rest_connection(port, "127.0.0.1"), get)
    wait_for_fds(limited_sidecar.pid, start + 4)

    stack.close()
    wait_for_fds(limited_sidecar.pid, start)
    assert get(keep(stack, rest_connection(port, "127.0.0.1"))) == 200
    assert limited_sidecar.stop() == 0
    log = limited_sidecar.log()
    # The warnings are rate-limited: 50 rejections within a few seconds give one.
    assert log.count("closed a connection from 127.0.0.1") == 1


# --- requests in flight -------------------------------------------------------------------------


def send_request(port: int, path: str) -> socket.socket:
    """Send a GET on a new connection without reading the reply; return the socket."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    return sock


def read_reply(sock: socket.socket) -> bytes:
    """Read the whole reply of a `Connection: close` request and close the socket."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    sock.close()
    return b"".join(chunks)


def wait_for_calls(fake: FakePxd, method: str, count: int) -> None:
    """Wait until the fake pxd has received `count` calls of `method`."""
    deadline = time.monotonic() + FD_TIMEOUT
    while sum(1 for name, _ in fake.calls if name == method) < count:
        assert time.monotonic() < deadline, f"pxd did not get {count} {method} calls"
        time.sleep(0.02)


def test_requests_in_flight_bound(
    limited_sidecar: SidecarProcess, fake_pxd: FakePxd, stack: ExitStack
) -> None:
    port = limited_sidecar.port
    start = baseline_fds(limited_sidecar, port)
    fake_pxd.hold = threading.Event()
    stack.callback(fake_pxd.hold.set)

    waiting = [send_request(port, "/v1/osd-volumes") for _ in range(2)]
    for sock in waiting:
        stack.callback(sock.close)
    wait_for_calls(fake_pxd, "volume.list", 2)

    for path in ("/v1/osd-volumes", "/osd-volumes/versions", "/metrics"):
        started = time.monotonic()
        reply = read_reply(send_request(port, path))
        assert time.monotonic() - started < CLOSE_TIMEOUT
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 "), head
        assert b"\r\nRetry-After: 1\r\n" in head
        assert body == (
            b"the sidecar is busy: 2 requests are in flight, the maximum (rest_max_requests); "
            b"retry later\n"
        )
    assert sum(1 for name, _ in fake_pxd.calls if name == "volume.list") == 2

    fake_pxd.hold.set()
    for sock in waiting:
        assert read_reply(sock).startswith(b"HTTP/1.1 200 ")
    assert read_reply(send_request(port, "/v1/osd-volumes")).startswith(b"HTTP/1.1 200 ")
    wait_for_fds(limited_sidecar.pid, start)


# --- the plugin socket --------------------------------------------------------------------------


def test_plugin_socket_bound(limited_sidecar: SidecarProcess, stack: ExitStack) -> None:
    path = limited_sidecar.plugin_socket
    start = baseline_fds(limited_sidecar, limited_sidecar.port)

    held = []
    for _ in range(3):
        connection = keep(stack, UnixHTTPConnection(path))
        connection.connect()
        held.append(connection)
    assert [activate(connection) for connection in held] == [200] * 3
    rejected = UnixHTTPConnection(path)
    rejected.connect()
    assert_closed_at_once(rejected, activate)
    # The REST port has bounds of its own.
    assert get(keep(stack, rest_connection(limited_sidecar.port, "127.0.0.1"))) == 200

    stack.close()
    wait_for_fds(limited_sidecar.pid, start)
    for _ in range(3):
        connection = UnixHTTPConnection(path)
        assert activate(connection) == 200
        connection.close()
    wait_for_fds(limited_sidecar.pid, start)
    assert limited_sidecar.stop() == 0
    log = limited_sidecar.log()
    assert "Docker plugin socket: closed a connection from a client: 3 connections are open" in log
