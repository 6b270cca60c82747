import os
import random
import struct

import msgpack
import pytest
import trio

from pxfs import blockingclient, errors, frames, rpc, rpcserver

SECRET = b"s3cret"


async def _echo(*args):
    return list(args)


async def _fail_not_found(name):
    raise errors.NotFound(f"volume {name} not found")


async def _crash():
    raise RuntimeError("boom")


async def _slow(seconds):
    await trio.sleep(seconds)
    return seconds


HANDLERS = {"echo": _echo, "missing": _fail_not_found, "crash": _crash, "slow": _slow}


@pytest.fixture
async def server_path(nursery, tmp_path):
    path = tmp_path / "rpc.sock"
    server = rpcserver.RpcServer(HANDLERS, secret=SECRET, name="test")
    await nursery.start(server.serve_unix, path)
    return path


def test_decoder_splits_and_joins_frames():
    stream = frames.encode_frame([1, 2]) + frames.encode_frame({"a": b"x"})
    decoder = frames.FrameDecoder()
    first = decoder.feed(stream[:3])
    rest = decoder.feed(stream[3:])
    assert first == []
    assert rest == [[1, 2], {"a": b"x"}]
    assert decoder.pending == 0


def test_decoder_rejects_oversized_length():
    decoder = frames.FrameDecoder(max_frame=100)
    with pytest.raises(errors.ProtocolError, match="exceeds"):
        decoder.feed(struct.pack(">I", 101))


def test_decoder_rejects_garbage_body():
    decoder = frames.FrameDecoder()
    with pytest.raises(errors.ProtocolError, match="undecodable"):
        decoder.feed(struct.pack(">I", 1) + b"\xc1")


async def test_call_round_trip(server_path):
    client = await rpc.RpcClient.connect_unix(server_path, SECRET)
    assert await client.call("echo", 1, b"\x00" * 10, "x") == [1, b"\x00" * 10, "x"]
    await client.aclose()


@pytest.mark.parametrize("size", [10, 3 * 64 * 1024])
async def test_packed_args_round_trip(server_path, size):
    packed = frames.PackedArgs("vol", 7, [(1, b"x" * size)])
    client = await rpc.RpcClient.connect_unix(server_path, SECRET)
    first = await client.call("echo", packed)
    second = await client.call("echo", packed)
    plain = await client.call("echo", "vol", 7, [(1, b"x" * size)])
    await client.aclose()
    assert first == ["vol", 7, [[1, b"x" * size]]]
    assert second == first
    assert plain == first


# Sizes around the gather threshold, the receive buffer and the 16-bit msgpack length.
FRAME_SIZES = [0, 10, 4095, 4096, 65535, 65536, 65537, 200_000, 3 * 1024 * 1024]


@pytest.mark.parametrize("size", FRAME_SIZES)
async def test_packed_args_every_size(server_path, size):
    blocks = [(index, os.urandom(size)) for index in range(3)]
    client = await rpc.RpcClient.connect_unix(server_path, SECRET)
    with trio.fail_after(10):
        echoed = await client.call("echo", frames.PackedArgs("vol", blocks, bytearray(b"z" * size)))
        assert await client.call("echo", blocks) == [[list(block) for block in blocks]]
    await client.aclose()
    assert echoed == ["vol", [list(block) for block in blocks], b"z" * size]


async def test_concurrent_mixed_sizes_arrive_whole(server_path):
    # Small replies share system calls and large ones do not, on one connection.
    payloads = [os.urandom(size) for size in FRAME_SIZES * 3]
    client = await rpc.RpcClient.connect_unix(server_path, SECRET)
    results: dict[int, object] = {}

    async def call(index: int) -> None:
        results[index] = await client.call("echo", index, payloads[index])

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for index in range(len(payloads)):
                nursery.start_soon(call, index)
    await client.aclose()
    assert results == {index: [index, payload] for index, payload in enumerate(payloads)}


@pytest.mark.parametrize("seed", range(4))
async def test_client_decodes_replies_cut_anywhere(seed):
    # A peer that writes its replies in pieces of random sizes, across frame boundaries.
    chance = random.Random(seed)
    ours, theirs = trio.socket.socketpair()
    client = rpc.RpcClient(trio.SocketStream(ours), "test peer")
    peer = trio.SocketStream(theirs)
    # Mostly frames that fit the receive buffer, so that it fills and moves its remaining bytes
    # to the front often.
    sizes = [chance.choice([0, 10, 4095, 4096, 20_000] * 8 + FRAME_SIZES) for _ in range(60)]
    payloads = [chance.randbytes(size) for size in sizes]
    results: list[object] = [None] * len(sizes)

    async def serve() -> None:
        decoder = frames.FrameDecoder()
        requests = []
        while len(requests) < len(sizes):
            requests += decoder.feed(await peer.receive_some(65536))
        stream = b"".join(
            frames.encode_frame([frames.REPLY, request[1], None, payloads[request[3][0]]])
            for request in requests
        )
        offset = 0
        while offset < len(stream):
            step = chance.choice([1, 3, 4, 5, 1000, 65536, 300_000])
            await peer.send_all(stream[offset : offset + step])
            offset += step
            if chance.random() < 0.2:
                await trio.sleep(0.001)

    async def call(index: int) -> None:
        results[index] = await client.call("echo", index)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            for index in range(len(sizes)):
                nursery.start_soon(call, index)
    await client.aclose()
    await peer.aclose()
    assert results == payloads


@pytest.mark.parametrize(
    ("size", "cut"), [(100, 2), (100, 50), (200_000, 2), (200_000, 5000), (200_000, 150_000)]
)
async def test_cancelled_receive_keeps_stream_in_step(size, cut):
    # A call cancelled while its reader has part of a frame leaves the rest to the next reader.
    ours, theirs = trio.socket.socketpair()
    client = rpc.RpcClient(trio.SocketStream(ours), "test peer")
    peer = trio.SocketStream(theirs)
    decoder = frames.FrameDecoder()
    first_payload = os.urandom(size)
    second_payload = os.urandom(size)

    async def next_request() -> list:
        while True:
            requests = decoder.feed(await peer.receive_some(65536))
            if requests:
                return requests[0]

    first_call = trio.CancelScope()

    async def cancelled_call() -> None:
        with first_call:
            await client.call("echo")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cancelled_call)
        first = await next_request()
        first_reply = frames.encode_frame([frames.REPLY, first[1], None, first_payload])
        await peer.send_all(first_reply[:cut])
        await trio.sleep(0.05)
        first_call.cancel()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            result: list[object] = []

            async def second_call() -> None:
                result.append(await client.call("echo"))

            nursery.start_soon(second_call)
            second = await next_request()
            await peer.send_all(first_reply[cut:])
            await peer.send_all(
                frames.encode_frame([frames.REPLY, second[1], None, second_payload])
            )
    await client.aclose()
    await peer.aclose()
    assert result == [second_payload]


async def test_client_reports_cut_in_large_frame():
    ours, theirs = trio.socket.socketpair()
    client = rpc.RpcClient(trio.SocketStream(ours), "test peer")
    peer = trio.SocketStream(theirs)

    async def serve() -> None:
        decoder = frames.FrameDecoder()
        (request,) = decoder.feed(await peer.receive_some(65536))
        frame = frames.encode_frame([frames.REPLY, request[1], None, bytes(1024 * 1024)])
        await peer.send_all(frame[: len(frame) // 2])
        await peer.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        with pytest.raises(errors.Unavailable, match="lost"):
            with trio.fail_after(5):
                await client.call("echo")
    await client.aclose()


async def test_packed_args_over_frame_limit(server_path):
    packed = frames.PackedArgs(b"x" * frames.MAX_FRAME)
    client = await rpc.RpcClient.connect_unix(server_path, SECRET)
    with pytest.raises(errors.InvalidArgument, match="exceeds"):
        await client.call("echo", packed)
    assert await client.call("echo", 1) == [1]
    await client.aclose()


async def test_error_keeps_its_class(server_path):
    client = await rpc.RpcClient.connect_unix(server_path, SECRET)
    with pytest.raises(errors.NotFound, match="volume v1 not found"):
        await client.call("missing", "v1")
    with pytest.raises(errors.NotSupported, match="unknown method"):
        await client.call("nope")
    with pytest.raises(errors.InvalidArgument, match="bad arguments"):
        await client.call("missing")
    await client.aclose()


async def test_unexpected_exception_is_internal(server_path, caplog):
    client = await rpc.RpcClient.connect_unix(server_path, SECRET)
    with pytest.raises(errors.InternalError, match="boom"):
        await client.call("crash")
    assert "crash failed" in caplog.text
    caplog.clear()
    await client.aclose()


async def test_calls_run_concurrently(server_path):
    client = await rpc.RpcClient.connect_unix(server_path, SECRET)
    results = []

    async def one(seconds):
        results.append(await client.call("slow", seconds))

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(one, 0.2)
    assert len(results) == 20
    assert trio.current_time() - start < 2
    await client.aclose()


async def test_wrong_secret_rejected(server_path, caplog):
    with pytest.raises(errors.AuthenticationFailed):
        await rpc.RpcClient.connect_unix(server_path, b"wrong")
    await trio.sleep(0.05)
    assert "failed the handshake" in caplog.text
    caplog.clear()


async def test_request_before_handshake_rejected(server_path, caplog):
    stream = await trio.open_unix_socket(os.fspath(server_path))
    await stream.send_all(frames.encode_frame([frames.REQUEST, 1, "echo", []]))
    received = b""
    with trio.fail_after(5):
        while True:
            data = await stream.receive_some(65536)
            if not data:
                break
            received += data
    challenge = msgpack.unpackb(received[4:])
    assert challenge[0] == frames.CHALLENGE
    assert len(received) == 4 + len(msgpack.packb(challenge))
    await stream.aclose()
    caplog.clear()


async def test_server_survives_truncated_frame(server_path, caplog):
    raw = await trio.open_unix_socket(os.fspath(server_path))
    await raw.send_all(struct.pack(">I", 1000) + b"abc")
    await raw.aclose()
    client = await rpc.RpcClient.connect_unix(server_path, SECRET)
    assert await client.call("echo", "still") == ["still"]
    await client.aclose()
    caplog.clear()


async def test_lost_connection_fails_pending_calls(nursery, tmp_path):
    path = tmp_path / "plain.sock"
    cancel = trio.CancelScope()

    async def serve(task_status=trio.TASK_STATUS_IGNORED):
        with cancel:
            await rpcserver.RpcServer(HANDLERS).serve_unix(path, task_status=task_status)

    await nursery.start(serve)
    client = await rpc.RpcClient.connect_unix(path)
    assert await client.call("echo", 1) == [1]
    cancel.cancel()
    with pytest.raises(errors.Unavailable):
        with trio.fail_after(5):
            await client.call("slow", 10)
    await client.aclose()


def test_blocking_client_reports_missing_socket(tmp_path):
    client = blockingclient.BlockingClient(tmp_path / "absent.sock")
    with pytest.raises(errors.Unavailable, match="pxd is not running"):
        client.call("node.status")


async def test_socket_of_live_server_not_replaced(server_path):
    second = rpcserver.RpcServer(HANDLERS, name="second")
    with pytest.raises(errors.Busy, match="another server is listening"):
        await second.serve_unix(server_path)


async def test_stale_socket_replaced(nursery, tmp_path):
    path = tmp_path / "stale.sock"
    import socket as socket_module

    stale = socket_module.socket(socket_module.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    await nursery.start(rpcserver.RpcServer(HANDLERS).serve_unix, path)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    client = await rpc.RpcClient.connect_unix(path)
    assert await client.call("echo", 2) == [2]
    await client.aclose()


def test_encode_frame_rejects_lone_surrogate():
    with pytest.raises(errors.InvalidArgument, match="not valid UTF-8"):
        frames.encode_frame([frames.REQUEST, 1, "volume.inspect", ["vol\udcff"]])


def test_blocking_client_rejects_lone_surrogate(tmp_path):
    # The argument is checked before the client connects, so no server is needed.
    client = blockingclient.BlockingClient(tmp_path / "absent.sock")
    with pytest.raises(errors.InvalidArgument, match="not valid UTF-8"):
        client.call("volume.inspect", "\udcff")


async def test_large_frame_before_handshake_rejected_at_once(server_path, caplog):
    # Without the secret a client may not make the server buffer more than a handshake frame.
    stream = await trio.open_unix_socket(os.fspath(server_path))
    await stream.send_all(struct.pack(">I", rpcserver.HANDSHAKE_MAX_FRAME + 1) + b"x" * 100)
    received = b""
    with trio.fail_after(2):
        while data := await stream.receive_some(65536):
            received += data
    await stream.aclose()
    assert msgpack.unpackb(received[4:])[0] == frames.CHALLENGE
    assert "failed the handshake: frame of 1025 bytes exceeds 1024" in caplog.text
    caplog.clear()


async def test_client_rejects_challenge_without_bytes(nursery, tmp_path):
    # bytes() of an integer nonce would allocate that many bytes.
    path = tmp_path / "fake.sock"

    async def fake_server(stream):
        await stream.send_all(frames.encode_frame([frames.CHALLENGE, 2**40]))
        await trio.sleep_forever()

    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(os.fspath(path))
    sock.listen()
    nursery.start_soon(trio.serve_listeners, fake_server, [trio.SocketListener(sock)])
    with trio.fail_after(5):
        with pytest.raises(errors.ProtocolError, match="sent no handshake challenge"):
            await rpc.RpcClient.connect_unix(path, SECRET)
