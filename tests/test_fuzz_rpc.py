"""Property and fuzz tests of the RPC frame codec of pxfs.frames (encode_frame, FrameDecoder).

The documented errors are InvalidArgument from encode_frame and ProtocolError from
FrameDecoder.feed, parse_request and error_from_payload. Any other exception, or a decoder that
waits for more bytes than a frame can hold, is a failure.
"""

from __future__ import annotations

import os
import random
import struct
import tempfile
from typing import Any

import msgpack
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pxfs import errors, frames, rpc, rpcserver

# No example database, so a fuzz run leaves no files in the working tree and each run draws new
# inputs. The deadline catches a decoder that loops, because a frame here takes well under 1 ms.
FUZZ = settings(database=None, deadline=1000, suppress_health_check=[HealthCheck.too_slow])


def fuzz(examples: int) -> settings:
    """Return the fuzz settings with `examples` inputs per run."""
    return settings(FUZZ, max_examples=examples)


LENGTH = struct.Struct(">I")

# Values that msgpack round-trips unchanged with use_bin_type=True and raw=False: no NaN (it is
# not equal to itself) and no tuples (they come back as lists).
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
keys = st.text(max_size=6) | st.integers(min_value=-(2**63), max_value=2**64 - 1)
messages = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
    max_leaves=10,
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """Split `data` at the offsets `cuts` (taken modulo its length) into consecutive chunks."""
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    bounds = [0, *points, len(data)]
    return [data[start:stop] for start, stop in zip(bounds, bounds[1:], strict=False)]


def feed_all(decoder: frames.FrameDecoder, chunks: list[bytes]) -> list[Any]:
    """Feed every chunk and return all the messages that came out."""
    out: list[Any] = []
    for chunk in chunks:
        out.extend(decoder.feed(chunk))
    return out


@fuzz(150)
@given(st.lists(messages, min_size=1, max_size=5), st.lists(st.integers(0, 1 << 20), max_size=12))
def test_round_trip_split_anywhere(batch: list[Any], cuts: list[int]) -> None:
    """150 batches of 1-5 valid messages, cut at up to 12 random points, decode unchanged."""
    stream = b"".join(frames.encode_frame(message) for message in batch)
    decoder = frames.FrameDecoder()
    assert feed_all(decoder, split(stream, cuts)) == batch
    assert decoder.pending == 0


# Byte strings on both sides of the size from which pack_gather leaves them in their own buffers.
large_binaries = st.integers(4000, 70_000).map(lambda size: (bytes(range(256)) * 274)[:size])
gathered_messages = st.recursive(
    scalars | large_binaries | large_binaries.map(bytearray),
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(keys, children, max_size=3)
    ),
    max_leaves=12,
)


@fuzz(150)
@given(gathered_messages)
def test_pack_gather_matches_msgpack(message: Any) -> None:
    """150 messages with large byte strings at any depth pack to msgpack's bytes exactly."""
    parts = frames.pack_gather(message)
    assert b"".join(parts) == msgpack.packb(message, use_bin_type=True)


def test_pack_gather_keeps_large_buffers() -> None:
    block = os.urandom(65536)
    patch = bytearray(4096)
    small = os.urandom(4095)
    parts = frames.pack_gather(["vol", 7, [(1, block), (2, patch)], [small]])
    assert [part for part in parts if part is block or part is patch] == [block, patch]
    assert not any(part is small for part in parts)
    assert b"".join(parts) == msgpack.packb(["vol", 7, [(1, block), (2, patch)], [small]])


@fuzz(150)
@given(messages)
def test_truncated_frame_waits(message: Any) -> None:
    """150 valid frames, each cut short at every one of its bytes, yield nothing."""
    frame = frames.encode_frame(message)
    for cut in range(len(frame)):
        decoder = frames.FrameDecoder()
        assert decoder.feed(frame[:cut]) == []
        assert decoder.pending == cut


@fuzz(200)
@given(st.integers(0, 1 << 16), st.integers(1, 2**32 - 1), st.binary(max_size=64))
def test_oversized_length_rejected_at_once(max_frame: int, excess: int, tail: bytes) -> None:
    """200 length prefixes above max_frame raise ProtocolError before any body byte arrives."""
    length = min(max_frame + excess, 2**32 - 1)
    decoder = frames.FrameDecoder(max_frame=max_frame)
    with pytest.raises(errors.ProtocolError):
        decoder.feed(LENGTH.pack(length) + tail)


def test_default_limit_rejects_every_prefix_above_it() -> None:
    """The default decoder rejects a prefix of MAX_FRAME + 1 and accepts MAX_FRAME as pending."""
    decoder = frames.FrameDecoder()
    assert decoder.feed(LENGTH.pack(frames.MAX_FRAME)) == []
    with pytest.raises(errors.ProtocolError):
        frames.FrameDecoder().feed(LENGTH.pack(frames.MAX_FRAME + 1))


@fuzz(400)
@given(st.binary(max_size=256), st.lists(st.integers(0, 1 << 10), max_size=6))
def test_random_stream_only_protocol_error(stream: bytes, cuts: list[int]) -> None:
    """400 random byte streams in random chunks: messages or ProtocolError, nothing else."""
    decoder = frames.FrameDecoder(max_frame=1024)
    try:
        feed_all(decoder, split(stream, cuts))
    except errors.ProtocolError:
        return
    assert decoder.pending < LENGTH.size + 1024


MUTATIONS = 20


def mutants(body: bytes, seed: int) -> list[bytes]:
    """Return MUTATIONS copies of `body` with 1 to 4 bytes overwritten, cut or inserted."""
    rng = random.Random(seed)
    out = []
    for _ in range(MUTATIONS):
        mutant = bytearray(body)
        for _ in range(rng.randint(1, 4)):
            action = rng.randrange(3)
            index = rng.randrange(len(mutant) + 1)
            if action == 0 and index < len(mutant):
                mutant[index] = rng.randrange(256)
            elif action == 1:
                del mutant[index:]
            else:
                mutant[index:index] = bytes([rng.randrange(256)])
        out.append(bytes(mutant))
    return out


@fuzz(150)
@given(messages, st.integers(0, 2**32))
def test_framed_garbage_only_protocol_error(message: Any, seed: int) -> None:
    """150 valid bodies, 20 mutants each (3000 frames) with a right prefix: a message or
    ProtocolError."""
    body = msgpack.packb(message, use_bin_type=True)
    for mutant in mutants(body, seed):
        decoder = frames.FrameDecoder()
        try:
            out = decoder.feed(LENGTH.pack(len(mutant)) + mutant)
        except errors.ProtocolError:
            continue
        assert len(out) == 1
        assert decoder.pending == 0


# msgpack's unpacker raises TypeError, not ValueError, when a map key is an array or a map,
# because Python cannot hash a list or dict.
UNHASHABLE_KEY_BODIES = [b"\x81\x90\x00", b"\x81\x80\x00", b"\x91\x81\x91\x00\x00"]


@pytest.mark.parametrize("body", UNHASHABLE_KEY_BODIES)
def test_unhashable_map_key_is_protocol_error(body: bytes) -> None:
    decoder = frames.FrameDecoder()
    with pytest.raises(errors.ProtocolError):
        decoder.feed(LENGTH.pack(len(body)) + body)


SECRET = b"fuzz-secret"


async def echo(*args: Any) -> list[Any]:
    """Return the call's arguments."""
    return list(args)


async def call_after_bad_peer(path: str, secret: bytes | None, bad_body: bytes) -> Any:
    """Let one peer send `bad_body` as a frame, then return a second peer's echo reply."""
    server = rpcserver.RpcServer({"echo": echo}, secret=secret, name="fuzz")
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve_unix, path)
        with trio.fail_after(5):
            async with await trio.open_unix_socket(path) as bad:
                await bad.send_all(LENGTH.pack(len(bad_body)) + bad_body)
                # The server closes the bad connection: the peer reads end of stream,
                # after the challenge when the server authenticates.
                while await bad.receive_some(4096):
                    pass
            client = await rpc.RpcClient.connect_unix(path, secret)
            try:
                reply = await client.call("echo", 7)
            finally:
                await client.aclose()
        nursery.cancel_scope.cancel()
    return reply


@pytest.mark.parametrize("secret", [None, SECRET], ids=["open", "authenticated"])
def test_server_survives_unhashable_map_key(secret: bytes | None) -> None:
    """A peer that sends one 7-byte frame must lose its connection, not stop the server."""
    with tempfile.TemporaryDirectory(dir="/tmp") as directory:
        path = os.path.join(directory, "rpc.sock")
        reply = trio.run(call_after_bad_peer, path, secret, b"\x81\x90\x00")
    assert reply == [7]


@pytest.mark.parametrize("secret", [None, SECRET], ids=["open", "authenticated"])
def test_server_survives_decoder_defect(
    secret: bytes | None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception the decoder does not document closes that connection and is logged."""
    trigger = b"\x92\x01\x02"
    unpack = frames._unpack

    def defective_unpack(body: bytes | memoryview) -> Any:
        if bytes(body) == trigger:
            raise RuntimeError("injected decoder defect")
        return unpack(body)

    monkeypatch.setattr(frames, "_unpack", defective_unpack)
    with tempfile.TemporaryDirectory(dir="/tmp") as directory:
        path = os.path.join(directory, "rpc.sock")
        reply = trio.run(call_after_bad_peer, path, secret, trigger)
    assert reply == [7]
    logged = [record for record in caplog.records if "unexpected error" in record.getMessage()]
    assert len(logged) == 1
    assert logged[0].exc_info is not None
    assert "injected decoder defect" in str(logged[0].exc_info[1])


# --- wrong message types -----------------------------------------------------------------------


@fuzz(100)
@given(messages | st.lists(messages, min_size=4, max_size=4))
def test_parse_request_any_value(message: Any) -> None:
    """100 decoded values: parse_request returns a typed triple or raises ProtocolError."""
    try:
        request_id, method, args = frames.parse_request(message)
    except errors.ProtocolError:
        return
    assert isinstance(request_id, int)
    assert isinstance(method, str)
    assert isinstance(args, list)
    assert message[0] == frames.REQUEST


@fuzz(100)
@given(st.integers() | messages, st.text(max_size=20) | messages, messages)
def test_parse_request_four_items(request_id: Any, method: Any, args: Any) -> None:
    """100 four-item REQUEST lists with random fields: accepted only with the documented types."""
    message = [frames.REQUEST, request_id, method, args]
    field_types_ok = (
        isinstance(request_id, int) and isinstance(method, str) and isinstance(args, list)
    )
    try:
        frames.parse_request(message)
    except errors.ProtocolError:
        assert not field_types_ok
        return
    assert field_types_ok


@fuzz(100)
@given(messages)
def test_error_from_payload_any_value(payload: Any) -> None:
    """100 reply error payloads of any type give a PxfsError and never raise."""
    error = frames.error_from_payload(payload)
    assert isinstance(error, errors.PxfsError)
    assert isinstance(error.message, str)


@fuzz(200)
@given(st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1))
def test_encode_lone_surrogate_invalid_argument(text: str) -> None:
    """200 strings of lone surrogates make encode_frame raise InvalidArgument."""
    with pytest.raises(errors.InvalidArgument):
        frames.encode_frame([frames.REQUEST, 1, "volume.inspect", [text]])


def test_encode_over_max_frame_invalid_argument() -> None:
    with pytest.raises(errors.InvalidArgument):
        frames.encode_frame(b"x" * frames.MAX_FRAME)


# msgpack raises OverflowError or TypeError for these, which encode_frame turns into
# InvalidArgument.
UNPACKABLE = [
    pytest.param(2**64, id="int-over-64-bits"),
    pytest.param(-(2**63) - 1, id="int-under-int64"),
    pytest.param({1, 2}, id="set"),
    pytest.param(object(), id="object"),
]


@pytest.mark.parametrize("value", UNPACKABLE)
def test_encode_unpackable_invalid_argument(value: Any) -> None:
    with pytest.raises(errors.InvalidArgument):
        frames.encode_frame([frames.REQUEST, 1, "echo", [value]])
