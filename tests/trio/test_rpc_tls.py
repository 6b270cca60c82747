"""Mutual TLS on the peer RPC over TCP: pxfs.tls contexts with the RpcServer and RpcClient."""

from __future__ import annotations

import functools
import logging
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from tlscerts import make_ca, make_node_cert, openssl

from pxfs import errors, frames, rpc, rpcserver
from pxfs.tls import PeerTls, TlsFiles

SECRET = b"tls test secret"


async def _echo(*args: Any) -> list[Any]:
    return list(args)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A cluster CA with a server and a client certificate, and a stranger CA with one."""
    root = tmp_path_factory.mktemp("certs")
    ca = make_ca(root / "ca")
    other = make_ca(root / "other", "another CA")
    yield {
        "ca": ca,
        "server": make_node_cert(ca, root / "server", "server", "127.0.0.1"),
        "client": make_node_cert(ca, root / "client", "client", "127.0.0.1"),
        "stranger": make_node_cert(other, root / "stranger", "stranger", "127.0.0.1"),
        "server_only": make_node_cert(ca, root / "srvonly", "srvonly", "127.0.0.1", "serverAuth"),
    }


async def _serve(
    nursery: trio.Nursery, files: TlsFiles, **kwargs: Any
) -> tuple[rpcserver.RpcServer, int]:
    server = rpcserver.RpcServer({"echo": _echo}, secret=SECRET, name="tls test", **kwargs)
    serve = functools.partial(
        server.serve_tcp, "127.0.0.1", 0, ssl_context=PeerTls.load(files).server
    )
    listeners = await nursery.start(serve)
    return server, listeners[0].socket.getsockname()[1]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def _wait_for_warning(caplog: pytest.LogCaptureFixture, text: str) -> str:
    with trio.fail_after(5):
        while True:
            for message in _warnings(caplog):
                if text in message:
                    return message
            await trio.sleep(0.01)


async def test_round_trip_over_tls(nursery, certs):
    server, port = await _serve(nursery, certs["server"])
    client_tls = PeerTls.load(certs["client"]).client
    client = await rpc.RpcClient.connect_tcp("127.0.0.1", port, SECRET, ssl_context=client_tls)
    try:
        assert await client.call("echo", b"x" * 100_000, 7) == [b"x" * 100_000, 7]
        assert isinstance(client._conn.stream, trio.SSLStream)
        assert server.connections == 1
    finally:
        await client.aclose()


async def test_wrong_secret_inside_tls_rejected(nursery, certs, caplog):
    _, port = await _serve(nursery, certs["server"])
    client_tls = PeerTls.load(certs["client"]).client
    with pytest.raises(errors.AuthenticationFailed, match="rejected the handshake"):
        await rpc.RpcClient.connect_tcp("127.0.0.1", port, b"wrong", ssl_context=client_tls)
    await _wait_for_warning(caplog, "failed the handshake")


@pytest.mark.parametrize(
    "first_bytes",
    [
        frames.encode_frame([frames.RESPONSE, b"x" * 32]),
        frames.encode_frame([frames.REQUEST, 1, "echo", []]),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x00\x05\x01\x00",
    ],
    ids=["response", "request", "http", "cut-client-hello"],
)
async def test_plain_client_rejected(nursery, certs, caplog, first_bytes):
    server, port = await _serve(nursery, certs["server"])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(first_bytes)
    await stream.send_eof()
    with trio.fail_after(5):
        received = b""
        while data := await stream.receive_some(65536):
            received += data
    await stream.aclose()
    # A TLS alert at most: no CHALLENGE, which would mean the RPC layer saw these bytes.
    assert frames.encode_frame([frames.CHALLENGE, b""])[:5] not in received
    assert "rejected a TLS connection from 127.0.0.1:" in await _wait_for_warning(
        caplog, "rejected a TLS connection"
    )
    assert server.connections == 0


async def test_plain_rpc_client_times_out(nursery, certs, monkeypatch, caplog):
    # The client reads the timeout from pxfs.rpc, and the server its copy in pxfs.rpcserver.
    monkeypatch.setattr(rpc, "HANDSHAKE_TIMEOUT", 0.5)
    monkeypatch.setattr(rpcserver, "HANDSHAKE_TIMEOUT", 0.5)
    _, port = await _serve(nursery, certs["server"])
    # Each side waits for the other's first message. The server's timeout started first, so
    # it usually closes the connection just before the client's own timeout ends the wait.
    with trio.fail_after(5):
        with pytest.raises((errors.AuthenticationFailed, errors.Unavailable)):
            await rpc.RpcClient.connect_tcp("127.0.0.1", port, SECRET)
    await _wait_for_warning(caplog, "no TLS handshake within 0.5 s")


@pytest.mark.parametrize("client_files", ["stranger", "server_only", None])
async def test_client_certificate_rejected(nursery, certs, caplog, client_files):
    server, port = await _serve(nursery, certs["server"])
    if client_files is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.load_verify_locations(cafile=certs["ca"].cert)
    else:
        context = PeerTls.load(certs[client_files]).client
        if client_files == "stranger":
            # It trusts the cluster's CA, so only the server's check of its certificate fails.
            context.load_verify_locations(cafile=certs["ca"].cert)
    with pytest.raises(errors.AuthenticationFailed):
        await rpc.RpcClient.connect_tcp("127.0.0.1", port, SECRET, ssl_context=context)
    message = await _wait_for_warning(caplog, "rejected a TLS connection")
    assert "certificate" in message.lower()
    assert server.connections == 0


async def test_server_of_another_ca_rejected(nursery, certs):
    _, port = await _serve(nursery, certs["stranger"])
    client_tls = PeerTls.load(certs["client"]).client
    with pytest.raises(errors.AuthenticationFailed, match="TLS handshake with 127.0.0.1:.*failed"):
        await rpc.RpcClient.connect_tcp("127.0.0.1", port, SECRET, ssl_context=client_tls)


async def test_silent_tls_server_times_out(nursery, certs, monkeypatch):
    monkeypatch.setattr(rpc, "HANDSHAKE_TIMEOUT", 0.5)
    accepted: list[trio.SocketStream] = []

    async def hold(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await trio.sleep_forever()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, hold, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    client_tls = PeerTls.load(certs["client"]).client
    with trio.fail_after(5):
        with pytest.raises(errors.Unavailable, match="did not finish the handshake within 0.5 s"):
            await rpc.RpcClient.connect_tcp("127.0.0.1", port, SECRET, ssl_context=client_tls)
    assert len(accepted) == 1


async def _stalled_peer(
    context: ssl.SSLContext | None, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve one connection: pass both handshakes, then never read again, like a hung node."""

    async def stall(tcp: trio.SocketStream) -> None:
        stream: trio.abc.Stream = tcp
        if context is not None:
            stream = trio.SSLStream(tcp, context, server_side=True)
        await stream.send_all(frames.encode_frame([frames.CHALLENGE, b"n" * 32]))
        decoder = frames.FrameDecoder()
        while not decoder.feed(await stream.receive_some(4096)):
            pass
        await stream.send_all(frames.encode_frame([frames.WELCOME, True]))
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, stall, 0, host="127.0.0.1")
        )
        task_status.started(listeners[0].socket.getsockname()[1])


@pytest.mark.parametrize("use_tls", [True, False], ids=["tls", "plain"])
async def test_close_frees_send_to_stalled_peer(nursery, certs, use_tls):
    # The replication client closes the connection of a replica that timed out. A send to a
    # peer that stopped reading is shielded from cancellation, so only the close frees it.
    server_tls = PeerTls.load(certs["server"]).server if use_tls else None
    client_tls = PeerTls.load(certs["client"]).client if use_tls else None
    port = await nursery.start(_stalled_peer, server_tls)
    client = await rpc.RpcClient.connect_tcp("127.0.0.1", port, SECRET, ssl_context=client_tls)
    outcome: list[BaseException] = []

    async def big_call() -> None:
        try:
            await client.call("store.write", b"w" * (8 * 1024 * 1024))
        except errors.PxfsError as exc:
            outcome.append(exc)

    # Three frames of 8 MiB are more than the socket buffers of both ends take, so one send
    # stays blocked; the send lock shows it.
    async with trio.open_nursery() as calls:
        for _ in range(3):
            calls.start_soon(big_call)
        await trio.sleep(1.0)
        assert outcome == []
        assert client._send_lock.locked()
        closed_at = trio.current_time()
        await client.aclose()
    assert trio.current_time() - closed_at < 2.0
    assert len(outcome) == 3
    assert all(isinstance(exc, errors.Unavailable) for exc in outcome)


def _files(certs: dict[str, Any], **changes: Path) -> TlsFiles:
    good: TlsFiles = certs["client"]
    return TlsFiles(
        changes.get("cert", good.cert), changes.get("key", good.key), changes.get("ca", good.ca)
    )


def test_load_reports_missing_file(tmp_path, certs):
    for option in ("cert", "key", "ca"):
        missing = tmp_path / f"missing-{option}.pem"
        with pytest.raises(errors.NotFound, match=f"ssl_{option} file {missing} does not exist"):
            PeerTls.load(_files(certs, **{option: missing}))


def test_load_reports_directory(tmp_path, certs):
    with pytest.raises(errors.InvalidArgument, match="ssl_ca .* is a directory"):
        PeerTls.load(_files(certs, ca=tmp_path))


def test_load_reports_bad_contents(tmp_path, certs):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    other_key = certs["stranger"].key
    cases = [
        ({"cert": garbage}, "are not a PEM certificate and its private key"),
        ({"key": garbage}, "are not a PEM certificate and its private key"),
        ({"key": other_key}, "is not the private key of ssl_cert"),
        ({"ca": garbage}, "ssl_ca .* contains no PEM certificate"),
        ({"ca": certs["client"].key}, "ssl_ca .* contains no PEM certificate"),
    ]
    for changes, reason in cases:
        with pytest.raises(errors.InvalidArgument, match=reason):
            PeerTls.load(_files(certs, **changes))


def test_load_refuses_encrypted_key(tmp_path, certs):
    encrypted = tmp_path / "encrypted.key"
    openssl(
        "pkey", "-in", str(certs["client"].key), "-aes256", "-passout", "pass:x",
        "-out", str(encrypted),
    )  # fmt: skip
    with pytest.raises(errors.InvalidArgument, match="the key is encrypted"):
        PeerTls.load(_files(certs, key=encrypted))


async def test_rejections_logged_once_per_interval(nursery, certs, caplog, monkeypatch):
    monkeypatch.setattr(rpcserver, "REJECTION_LOG_INTERVAL", 1.0)
    server, port = await _serve(nursery, certs["server"])

    async def reject_one() -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"\x00" * 16)
        with trio.fail_after(5):
            while await stream.receive_some(1024):
                pass
        await stream.aclose()

    async def wait_count(count: int) -> None:
        with trio.fail_after(5):
            while server.rejections.count < count:
                await trio.sleep(0.01)

    for _ in range(5):
        await reject_one()
    await wait_count(5)
    assert sum("rejected a TLS connection" in m for m in _warnings(caplog)) == 1
    await trio.sleep(1.1)
    await reject_one()
    await wait_count(6)
    assert "(4 more rejected since the last warning)" in _warnings(caplog)[-1]
