"""The REST API's bearer token: the token file, the loopback rule, the replies and the log.

The first part tests pxfs/api/auth.py on its own, the middle part the REST app in front of the
fake pxd, and the last part the pxd-sidecar process: its start-up checks and its log. Only the
middle part is async, so its tests carry the asyncio marker one by one.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient
from sidecarproc import REPO, SidecarProcess

from pxfs import errors
from pxfs.api import auth
from pxfs.api.app import make_app
from pxfs.api.control import ControlClient

TOKEN = "8f14e45fceea167a5a36dedd4bea2543"
WRONG = "c9f0f895fb98ab9159f51fd0297e236d"
Client = TestClient[Any, Any]
FakePxd = Any


def write_token(path: Path, text: str, mode: int = 0o600) -> Path:
    """Write `text` to the token file `path` with `mode` and return the path."""
    path.write_text(text)
    os.chmod(path, mode)
    return path


# --- the loopback rule --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("192.168.1.20", False),
        ("128.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("fe80::1", False),
        ("::2", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert auth.is_loopback(host) is loopback


def test_rest_token_not_needed_on_loopback() -> None:
    assert auth.rest_token("127.0.0.1", None) is None
    assert auth.rest_token("::1", None) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.1"])
def test_rest_token_required_elsewhere(host: str) -> None:
    with pytest.raises(errors.InvalidArgument, match="needs a bearer token") as caught:
        auth.rest_token(host, None)
    assert "rest_token_file" in caught.value.message
    assert host in caught.value.message


def test_rest_token_file_on_loopback_enforced(tmp_path: Path) -> None:
    path = write_token(tmp_path / "token", TOKEN + "\n")
    token = auth.rest_token("127.0.0.1", path)
    assert token is not None
    assert token.matches(TOKEN)


# --- the token file -----------------------------------------------------------------------------


def test_load_token_strips_newline(tmp_path: Path) -> None:
    token = auth.load_token(write_token(tmp_path / "token", f"  {TOKEN}\r\n\n"))
    assert token.matches(TOKEN)
    assert not token.matches(TOKEN + "\n")
    assert not token.matches(WRONG)
    assert not token.matches(TOKEN[:-1])
    assert not token.matches("")


def test_load_token_through_symlink(tmp_path: Path) -> None:
    target = write_token(tmp_path / "token", TOKEN)
    link = tmp_path / "link"
    link.symlink_to(target)
    assert auth.load_token(link).matches(TOKEN)


def test_token_repr_hides_value(tmp_path: Path) -> None:
    token = auth.load_token(write_token(tmp_path / "token", TOKEN))
    assert TOKEN not in repr(token)
    assert TOKEN not in str(token)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (0o640, "mode 0640"),
        (0o604, "mode 0604"),
        (0o620, "mode 0620"),
        (0o602, "mode 0602"),
        (0o644, "mode 0644"),
        (0o666, "mode 0666"),
    ],
)
def test_load_token_rejects_open_modes(tmp_path: Path, mode: int, expected: str) -> None:
    path = write_token(tmp_path / "token", TOKEN, mode)
    with pytest.raises(errors.InvalidArgument, match=expected) as caught:
        auth.load_token(path)
    assert "chmod 600" in caught.value.message
    assert TOKEN not in caught.value.message


def test_load_token_accepts_owner_only_modes(tmp_path: Path) -> None:
    for mode in (0o600, 0o400):
        path = write_token(tmp_path / f"token{mode:o}", TOKEN, mode)
        assert auth.load_token(path).matches(TOKEN)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "is empty"),
        (" \n\t\n", "is empty"),
        ("short", "token of 5 characters; the minimum is 16"),
        ("x" * 15, "token of 15 characters"),
        ("secret value with spaces 123456", "characters that a bearer token cannot contain"),
        ("secretsecret\x00secret", "characters that a bearer token cannot contain"),
        ("secretsecret\nsecretsecret", "characters that a bearer token cannot contain"),
        ("sécrètsécrètsécrèt", "bytes that are not ASCII"),
        ("x" * (auth.MAX_TOKEN_LENGTH + 1), "over the maximum of 4096 characters"),
    ],
)
def test_load_token_rejects_bad_contents(tmp_path: Path, text: str, expected: str) -> None:
    path = write_token(tmp_path / "token", text)
    with pytest.raises(errors.InvalidArgument, match=expected) as caught:
        auth.load_token(path)
    assert "secret" not in caught.value.message


def test_load_token_longest_allowed(tmp_path: Path) -> None:
    value = "a" * auth.MAX_TOKEN_LENGTH
    assert auth.load_token(write_token(tmp_path / "token", value + "\n")).matches(value)


def test_load_token_missing(tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidArgument, match="does not exist"):
        auth.load_token(tmp_path / "missing")


def test_load_token_not_regular(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    for path in (fifo, directory):
        with pytest.raises(errors.InvalidArgument, match="is not a regular file"):
            auth.load_token(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file to another user")
def test_load_token_rejects_other_owner(tmp_path: Path) -> None:
    path = write_token(tmp_path / "token", TOKEN)
    os.chown(path, 65534, 65534)
    with pytest.raises(errors.InvalidArgument, match="is owned by uid 65534"):
        auth.load_token(path)


# --- the Authorization header -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "status"),
    [
        (None, 401),
        ("", 401),
        ("Bearer", 401),
        ("Bearer    ", 401),
        (f"Basic {TOKEN}", 401),
        (TOKEN, 401),
        (f"Bearer {WRONG}", 403),
        (f"Bearer {TOKEN}x", 403),
        (f"Bearer {TOKEN} {TOKEN}", 403),
        (f"Bearer {TOKEN[:-1]}", 403),
        (f"Bearer {TOKEN}", None),
        (f"bearer {TOKEN}", None),
        (f"BEARER   {TOKEN}  ", None),
    ],
)
def test_check_authorization(header: str | None, status: int | None) -> None:
    failure = auth.check_authorization(header, auth.BearerToken(TOKEN))
    if status is None:
        assert failure is None
    else:
        assert failure is not None
        assert failure[0] == status


# --- the REST app -------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def token_client(fake_pxd: FakePxd, aiohttp_client: Any) -> Client:
    """A test client of the REST app that requires TOKEN."""
    control = ControlClient(fake_pxd.socket)
    client: Client = await aiohttp_client(make_app(control, token=auth.BearerToken(TOKEN)))
    return client


def bearer(token: str) -> dict[str, str]:
    """The Authorization header that carries `token`."""
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "path", ["/v1/osd-volumes", "/osd-volumes/versions", "/metrics", "/v1/cluster/enumerate"]
)
async def test_app_without_token_401(token_client: Client, fake_pxd: FakePxd, path: str) -> None:
    response = await token_client.get(path)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="pxfs"'
    assert await response.text() == auth.MISSING_TOKEN + "\n"
    assert fake_pxd.calls == []


@pytest.mark.asyncio
@pytest.mark.parametrize("path", ["/v1/osd-volumes", "/metrics"])
async def test_app_wrong_token_403(token_client: Client, fake_pxd: FakePxd, path: str) -> None:
    response = await token_client.get(path, headers=bearer(WRONG))
    assert response.status == 403
    assert "WWW-Authenticate" not in response.headers
    text = await response.text()
    assert text == auth.INVALID_TOKEN + "\n"
    assert WRONG not in text
    assert fake_pxd.calls == []


@pytest.mark.asyncio
async def test_app_right_token_serves(token_client: Client, fake_pxd: FakePxd) -> None:
    body = {"locator": {"name": "vol1"}, "spec": {"size": 1 << 30}}
    response = await token_client.post("/v1/osd-volumes", json=body, headers=bearer(TOKEN))
    assert response.status == 200
    assert "id" in await response.json()

    response = await token_client.get("/v1/osd-volumes/vol1", headers=bearer(TOKEN))
    assert response.status == 200
    assert [volume["locator"]["name"] for volume in await response.json()] == ["vol1"]

    response = await token_client.get("/metrics", headers=bearer(TOKEN))
    assert response.status == 200
    assert "pxfs_up 1.0" in await response.text()


@pytest.mark.asyncio
async def test_app_unknown_route_needs_token(token_client: Client) -> None:
    # The token comes before routing, so a client without it learns nothing about the routes.
    response = await token_client.get("/no/such/route")
    assert response.status == 401
    response = await token_client.get("/no/such/route", headers=bearer(TOKEN))
    assert response.status == 404


@pytest.mark.asyncio
async def test_app_rejected_body_closes_connection(token_client: Client, fake_pxd: FakePxd) -> None:
    body = {"locator": {"name": "vol1"}, "spec": {"size": 1 << 30}}
    response = await token_client.post("/v1/osd-volumes", json=body, headers=bearer(WRONG))
    assert response.status == 403
    assert response.headers["Connection"] == "close"
    assert fake_pxd.volumes == {}


@pytest.mark.asyncio
async def test_app_without_token_configured_is_open(rest_client: Client) -> None:
    response = await rest_client.get("/v1/osd-volumes")
    assert response.status == 200
    response = await rest_client.get("/v1/osd-volumes", headers=bearer(WRONG))
    assert response.status == 200


# --- the pxd-sidecar process --------------------------------------------------------------------


def run_sidecar(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run pxd-sidecar with `args` and a private plugin socket, expecting it to exit at once."""
    command = [
        sys.executable, "-m", "daemon.sidecar",
        "--socket", str(tmp_path / "pxd.sock"),
        "--plugin-socket", str(tmp_path / "plugin.sock"),
        "--state-dir", str(tmp_path / "state"),
        *args,
    ]  # fmt: skip
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)


def assert_start_failed(result: subprocess.CompletedProcess[str], expected: str) -> None:
    """Check that pxd-sidecar exited 1 with one `pxd-sidecar: ...` line containing `expected`."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pxd-sidecar: ")
    assert expected in lines[0]


@pytest.mark.parametrize("address", ["0.0.0.0:9", "[::]:9", "10.1.2.3:9", "[::ffff:10.1.2.3]:9"])
def test_sidecar_open_address_needs_token(tmp_path: Path, address: str) -> None:
    # The check comes before the listener, so nothing binds to these addresses.
    result = run_sidecar(tmp_path, "--rest", address)
    assert_start_failed(result, "needs a bearer token: set rest_token_file in pxd.toml")
    assert not (tmp_path / "plugin.sock").exists()


def test_sidecar_open_address_from_config(tmp_path: Path) -> None:
    config = tmp_path / "pxd.toml"
    config.write_text('rest_host = "0.0.0.0"\nrest_port = 9\n')
    result = run_sidecar(tmp_path, "--config", str(config))
    assert_start_failed(result, "the REST API address 0.0.0.0 is not a loopback address")


@pytest.mark.parametrize(
    ("text", "mode", "expected"),
    [
        (TOKEN, 0o640, "has mode 0640"),
        (TOKEN, 0o644, "has mode 0644"),
        (TOKEN, 0o604, "has mode 0604"),
        ("", 0o600, "is empty"),
        ("\n", 0o600, "is empty"),
        (None, 0o600, "does not exist"),
    ],
)
def test_sidecar_bad_token_file_exits(
    tmp_path: Path, text: str | None, mode: int, expected: str
) -> None:
    path = tmp_path / "token"
    if text is not None:
        write_token(path, text, mode)
    for host in ("0.0.0.0", "127.0.0.1"):
        result = run_sidecar(tmp_path, "--rest", f"{host}:9", "--rest-token-file", str(path))
        assert_start_failed(result, expected)
        assert TOKEN not in result.stderr

    config = tmp_path / "pxd.toml"
    config.write_text(f'rest_host = "0.0.0.0"\nrest_token_file = "{path}"\n')
    assert_start_failed(run_sidecar(tmp_path, "--config", str(config)), expected)


def request(port: int, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], str]:
    """Send one GET to the sidecar on `port`; return the status, headers and body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path, headers=headers)
        reply = connection.getresponse()
        return reply.status, dict(reply.getheaders()), reply.read().decode()
    finally:
        connection.close()


def test_sidecar_token_never_logged(
    tmp_path: Path, sidecar_process: Callable[..., SidecarProcess]
) -> None:
    path = write_token(tmp_path / "token", TOKEN + "\n")
    config = tmp_path / "pxd.toml"
    config.write_text(f'rest_token_file = "{path}"\n')
    sidecar = sidecar_process("--config", str(config), "-v")
    replies = []

    for headers, expected in [
        ({}, 401),
        (bearer(WRONG), 403),
        ({"Authorization": f"Basic {TOKEN}"}, 401),
        (bearer(TOKEN), 200),
    ]:
        for route in ("/v1/osd-volumes", "/metrics", "/v1/osd-volumes/ghost?x=1"):
            status, reply_headers, body = request(sidecar.port, route, headers)
            assert status == expected, (route, headers, body)
            replies.append(repr(reply_headers) + body)

    # A request that aiohttp's parser rejects, with a credential on one of its header lines.
    with socket.create_connection(("127.0.0.1", sidecar.port), timeout=10) as sock:
        sock.sendall(
            f"GET /v1/osd-volumes HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n".encode()
            + b"X-Long: " + b"y" * 9000 + b"\r\n\r\n"
        )  # fmt: skip
        replies.append(sock.recv(65536).decode(errors="replace"))

    assert sidecar.stop() == 0
    log = sidecar.log()
    # The log must show the requests, or the absence of the tokens in it proves nothing.
    assert "GET /v1/osd-volumes -> 401" in log
    assert "GET /v1/osd-volumes -> 403" in log
    assert "GET /v1/osd-volumes -> 200" in log
    assert "requiring a bearer token" in log
    for secret in (TOKEN, WRONG, TOKEN[:8], WRONG[:8]):
        assert secret not in log
        assert all(secret not in reply for reply in replies)
    assert "Traceback" not in log
