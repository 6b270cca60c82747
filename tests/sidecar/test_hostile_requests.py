"""Bad requests to the sidecar: each gets an error in the documented shape, and it keeps serving.

The first part drives the REST app in process. The last part runs the pxd-sidecar process and
speaks raw bytes to its REST port and plugin socket, for clients that hang up mid-request.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from sidecarproc import signal_child

from pxfs.api.app import MAX_BODY

pytestmark = pytest.mark.asyncio

GIB = 1 << 30
REPO = Path(__file__).resolve().parent.parent.parent
START_TIMEOUT = 20.0
Client = TestClient[Any, Any]
FakePxd = Any


async def create(client: Client, name: str) -> str:
    """Create a 1 GiB volume and return its id."""
    body = {"locator": {"name": name}, "spec": {"size": GIB}}
    response = await client.post("/v1/osd-volumes", json=body)
    assert response.status == 200
    return str((await response.json())["id"])


async def assert_still_serving(client: Client, name: str) -> None:
    """Check that the app still serves requests and that volume `name` is still 1 GiB."""
    response = await client.get(f"/v1/osd-volumes/{name}")
    assert response.status == 200
    volumes = await response.json()
    assert len(volumes) == 1
    assert volumes[0]["spec"]["size"] == GIB
    assert "attached_on" not in volumes[0]


# --- bodies -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"{not json", "request body is not valid JSON"),
        (b"", "request body is empty"),
        (b"[]", "request body must be a JSON object, got a list"),
        (b'"spec"', 'request body must be a JSON object, got "spec"'),
        (b"\xff\xfe{}", "request body is not valid JSON"),
        (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
        (
            b'{"spec": {"size": ' + b"1" * (sys.get_int_max_str_digits() + 1) + b"}}",
            f"a number has more than {sys.get_int_max_str_digits()} digits",
        ),
        (b'{"spec": []}', "spec must be a JSON object, got a list"),
        (b'{"locator": "vol1"}', 'locator must be a JSON object, got "vol1"'),
        (b'{"spec": {"size": "1G"}}', 'spec.size must be a non-negative integer, got "1G"'),
        (b'{"spec": {"size": 1e9}}', "spec.size must be a non-negative integer"),
        (b'{"spec": {"size": true}}', "spec.size must be a non-negative integer, got true"),
        (b'{"spec": {"ha_level": -1}}', "spec.ha_level must be a non-negative integer"),
        (b'{"spec": {"volume_labels": [1]}}', "spec.volume_labels must be a JSON object"),
        (b'{"locator": {"volume_labels": {"a": 1}}}', "locator.volume_labels['a']"),
        (b'{"action": {"attach": 2.0}}', "action.attach must be a non-negative integer"),
        (b'{"options": []}', "options must be a JSON object of strings"),
    ],
)
async def test_put_bad_body_400(
    rest_client: Client, fake_pxd: FakePxd, body: bytes, expected: str
) -> None:
    await create(rest_client, "vol1")
    response = await rest_client.put("/v1/osd-volumes/vol1", data=body)
    assert response.status == 400
    text = await response.text()
    assert expected in text
    assert text.endswith("\n")
    assert text.count("\n") == 1
    assert "volume.update" not in [name for name, _ in fake_pxd.calls]
    await assert_still_serving(rest_client, "vol1")


async def test_put_body_over_limit_413(rest_client: Client, fake_pxd: FakePxd) -> None:
    await create(rest_client, "vol1")
    body = {"spec": {"size": 2 * GIB}, "padding": "x" * (MAX_BODY + 1)}
    response = await rest_client.put("/v1/osd-volumes/vol1", json=body)
    assert response.status == 413
    text = await response.text()
    assert text.startswith("request body is too large: ")
    assert text.endswith("\n")
    assert "volume.update" not in [name for name, _ in fake_pxd.calls]
    await assert_still_serving(rest_client, "vol1")


# --- routes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/v1/osd-volumes/vol1/extra",
        "/v1/osd-volumes/stats/vol1/extra",
        "/v1/osd-volumes/usedsize/vol1/extra",
        "/v1/cluster",
        "/v1/cluster/inspect",
        "/statslive/vol1",
        "/metrics/extra",
        "/v2/osd-volumes",
        "/",
    ],
)
async def test_unknown_route_404(rest_client: Client, path: str) -> None:
    await create(rest_client, "vol1")
    response = await rest_client.get(path)
    assert response.status == 404
    assert await response.text() == "404 page not found\n"
    await assert_still_serving(rest_client, "vol1")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/metrics"),
        ("DELETE", "/v1/cluster/enumerate"),
        ("PUT", "/v1/osd-volumes"),
        ("POST", "/statslive"),
        ("PUT", "/v1/osd-volumes/stats/vol1"),
    ],
)
async def test_wrong_method_405(rest_client: Client, method: str, path: str) -> None:
    response = await rest_client.request(method, path)
    assert response.status == 405
    assert await response.text() == "405 method not allowed\n"


# --- unknown volumes on every route -------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "reply"),
    [
        ("GET", "/v1/osd-volumes/ghost", None, 200, []),
        ("GET", "/v1/osd-volumes?Name=ghost", None, 200, []),
        ("DELETE", "/v1/osd-volumes/ghost", None, 200, {}),
        ("PUT", "/v1/osd-volumes/ghost", {"spec": {"size": GIB}}, 404, "volume ghost not found\n"),
        ("PUT", "/v1/osd-volumes/ghost", {"action": {"attach": 1}}, 200,
         {"volume": {}, "volume_response": {}}),
        ("PUT", "/v1/osd-volumes/ghost", {"action": {"attach": 2}}, 200,
         {"volume": {}, "volume_response": {"error": "volume ghost not found"}}),
        ("GET", "/v1/osd-volumes/stats/ghost", None, 404, "volume ghost not found\n"),
        ("GET", "/v1/osd-volumes/stats/ghost?Cumulative=false", None, 404,
         "volume ghost not found\n"),
        ("GET", "/v1/osd-volumes/usedsize/ghost", None, 404, "volume ghost not found\n"),
        ("GET", "/statslive?volumeid=42&stattype=volstat", None, 404, "volume 42 not found\n"),
        ("GET", "/statshistory?volumeid=42&stattype=volstat", None, 404,
         "volume 42 not found\n"),
    ],
)  # fmt: skip
async def test_unknown_volume_every_route(
    rest_client: Client, method: str, path: str, body: Any, status: int, reply: Any
) -> None:
    await create(rest_client, "vol1")
    response = await rest_client.request(method, path, json=body)
    assert response.status == status
    if isinstance(reply, str):
        assert await response.text() == reply
    else:
        assert json.loads(await response.read()) == reply
    await assert_still_serving(rest_client, "vol1")


async def test_unknown_volume_metrics_unaffected(rest_client: Client) -> None:
    await create(rest_client, "vol1")
    await rest_client.get("/v1/osd-volumes/stats/ghost")
    response = await rest_client.get("/metrics")
    assert response.status == 200
    assert "pxfs_up 1.0" in await response.text()


# --- clients that hang up, against the pxd-sidecar process --------------------------------------


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Sidecar:
    """A pxd-sidecar process in front of a fake pxd, on a private port and plugin socket."""

    def __init__(self, fake: FakePxd, tmp_path: Path) -> None:
        self.port = free_port()
        self.plugin_socket = tmp_path / "plugin.sock"
        self.args = [
            sys.executable, "-m", "daemon.sidecar",
            "--socket", str(fake.socket),
            "--rest", f"127.0.0.1:{self.port}",
            "--plugin-socket", str(self.plugin_socket),
            "--docker-mount-base", str(tmp_path / "mounts"),
            "--state-dir", str(tmp_path / "state"),
        ]  # fmt: skip
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start the process and wait until both listeners respond."""
        self.process = await asyncio.create_subprocess_exec(
            *self.args, cwd=REPO, stderr=asyncio.subprocess.PIPE
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process.returncode is None, "pxd-sidecar exited at start"
            try:
                await self.rest_versions()
                await self.plugin("Plugin.Activate", {})
                return
            except (aiohttp.ClientConnectionError, FileNotFoundError):
                await asyncio.sleep(0.05)
        raise AssertionError("pxd-sidecar did not start")

    async def stop(self) -> bytes:
        """Stop the process with SIGTERM and return what it wrote to stderr."""
        assert self.process is not None and self.process.stderr is not None
        signal_child(self.process, signal.SIGTERM)
        stderr = await asyncio.wait_for(self.process.stderr.read(), START_TIMEOUT)
        await asyncio.wait_for(self.process.wait(), START_TIMEOUT)
        return stderr

    async def rest_versions(self) -> Any:
        """GET /osd-volumes/versions over TCP."""
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{self.port}/osd-volumes/versions"
            async with session.get(url) as response:
                assert response.status == 200
                return await response.json()

    async def plugin(self, endpoint: str, body: Any) -> Any:
        """POST one plugin request over the plugin socket."""
        connector = aiohttp.UnixConnector(path=str(self.plugin_socket))
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.post(f"http://plugin/{endpoint}", json=body) as response:
                assert response.status == 200
                return json.loads(await response.read())


async def send_and_close(connect: Any, data: bytes) -> None:
    """Open a connection, send `data`, and close it without reading a reply."""
    reader, writer = await connect()
    writer.write(data)
    await writer.drain()
    writer.close()
    await writer.wait_closed()


TRUNCATED = [
    b'POST /VolumeDriver.Create HTTP/1.1\r\nHost: x\r\nContent-Length: 400\r\n\r\n{"Na',
    b"POST /VolumeDriver.Create HTTP/1.1\r\nHost: x\r\nContent-Le",
    b'PUT /v1/osd-volumes/vol1 HTTP/1.1\r\nHost: x\r\nContent-Length: 90\r\n\r\n{"spec"',
    b"GET /v1/osd-volumes HTTP/1.1\r\n",
    b"\x00\xff\x16\x03\x01 not http at all\r\n\r\n",
]


async def test_truncated_requests_then_serving(fake_pxd: FakePxd, tmp_path: Path) -> None:
    sidecar = Sidecar(fake_pxd, tmp_path)
    await sidecar.start()
    try:
        fake_pxd.create({"name": "vol1", "size": GIB, "ha_level": 1, "labels": {}})
        path = str(sidecar.plugin_socket)
        for data in TRUNCATED * 4:
            await send_and_close(lambda: asyncio.open_unix_connection(path), data)
            await send_and_close(lambda: asyncio.open_connection("127.0.0.1", sidecar.port), data)

        assert await sidecar.rest_versions() == ["v1"]
        assert await sidecar.plugin("VolumeDriver.Create", {"Name": "after"}) == {"Err": ""}
        assert sorted(record["name"] for record in fake_pxd.volumes.values()) == ["after", "vol1"]
        assert fake_pxd.find("vol1")["size"] == GIB
    finally:
        stderr = await sidecar.stop()
    assert b"Traceback" not in stderr


async def test_hang_up_after_full_request(fake_pxd: FakePxd, tmp_path: Path) -> None:
    sidecar = Sidecar(fake_pxd, tmp_path)
    await sidecar.start()
    try:
        body = json.dumps({"Name": "gone", "Opts": {"size": "2"}}).encode()
        request = (
            b"POST /VolumeDriver.Create HTTP/1.1\r\nHost: x\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        path = str(sidecar.plugin_socket)
        await send_and_close(lambda: asyncio.open_unix_connection(path), request)

        # The handler runs to the end although its client is gone, so the volume exists.
        deadline = time.monotonic() + 10
        while not fake_pxd.volumes and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert [record["name"] for record in fake_pxd.volumes.values()] == ["gone"]
        assert fake_pxd.find("gone")["size"] == 2 * GIB
        reply = await sidecar.plugin("VolumeDriver.Get", {"Name": "gone"})
        assert reply["Volume"]["Name"] == "gone"
    finally:
        stderr = await sidecar.stop()
    assert b"Traceback" not in stderr


async def send_raw(connect: Any, data: bytes) -> bytes:
    """Send `data` on a new connection and return everything the server sends back."""
    reader, writer = await connect()
    writer.write(data)
    await writer.drain()
    reply: bytes = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    return reply


LONG = b"x" * 9000
OVERSIZED = [
    b"GET /v1/osd-volumes/" + LONG + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/osd-volumes HTTP/1.1\r\nHost: x\r\nX-Big: " + LONG + b"\r\n\r\n",
    b"GET /v1/osd-volumes HTTP/1.1\r\nHost: x\r\nX-" + LONG + b": 1\r\n\r\n",
    b"GET /v1/osd-volumes HTTP/1.1\r\nHost: x\r\n"
    + b"".join(b"X-%d: 1\r\n" % i for i in range(200))
    + b"\r\n",
]


async def test_oversized_request_plain_431(fake_pxd: FakePxd, tmp_path: Path) -> None:
    sidecar = Sidecar(fake_pxd, tmp_path)
    await sidecar.start()
    path = str(sidecar.plugin_socket)
    connections = [
        lambda: asyncio.open_connection("127.0.0.1", sidecar.port),
        lambda: asyncio.open_unix_connection(path),
    ]
    try:
        for connect in connections:
            for data in OVERSIZED:
                reply = await send_raw(connect, data)
                head, _, body = reply.partition(b"\r\n\r\n")
                # aiohttp replies as HTTP/1.0 because it never parsed the request's version.
                assert head.split(b" ")[1] == b"431", head
                assert body.startswith(b"request header fields are too large: "), body
                assert body.endswith(b"\n")
                assert b"xxxx" not in body
        assert await sidecar.rest_versions() == ["v1"]
    finally:
        stderr = await sidecar.stop()
    assert b"Traceback" not in stderr
    assert b"ERROR" not in stderr
    assert b"WARNING" not in stderr


async def send_for_reply(connect: Any, data: bytes) -> tuple[bytes, bytes]:
    """Send `data` and return the head and body of the reply, without waiting for EOF."""
    reader, writer = await connect()
    writer.write(data)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lengths = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    body = await asyncio.wait_for(reader.readexactly(int(lengths[0].split(b":")[1])), 5)
    writer.close()
    await writer.wait_closed()
    return head, body


async def test_huge_content_length_rejected_at_once(fake_pxd: FakePxd, tmp_path: Path) -> None:
    sidecar = Sidecar(fake_pxd, tmp_path)
    await sidecar.start()
    path = str(sidecar.plugin_socket)
    rest_request = (
        b"PUT /v1/osd-volumes/vol1 HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999999\r\n\r\n{}"
    )
    plugin_request = (
        b"POST /VolumeDriver.Create HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999999\r\n\r\n{}"
    )
    expected = b"request body is too large: Content-Length 999999999999 is over the limit of "
    try:
        started = time.monotonic()
        # aiohttp keeps reading the unread body for a while before it closes the connection,
        # so only the reply itself has to come at once.
        head, body = await send_for_reply(
            lambda: asyncio.open_connection("127.0.0.1", sidecar.port), rest_request
        )
        assert head.split(b" ")[1] == b"413", head
        assert body == expected + b"%d bytes\n" % MAX_BODY

        head, body = await send_for_reply(
            lambda: asyncio.open_unix_connection(path), plugin_request
        )
        assert head.split(b" ")[1] == b"200", head
        assert json.loads(body) == {"Err": (expected + b"%d bytes" % MAX_BODY).decode()}
        assert time.monotonic() - started < 5
        assert fake_pxd.volumes == {}
    finally:
        stderr = await sidecar.stop()
    assert b"Traceback" not in stderr
