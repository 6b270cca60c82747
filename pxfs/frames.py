"""The frames of pxfs RPC: the msgpack codec and a trio stream of frames.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack. Messages:

    [REQUEST, id, method, args]          client -> server
    [REPLY, id, None, result]            server -> client, success
    [REPLY, id, [code, message], None]   server -> client, a PxfsError (see pxfs.errors)
    [CHALLENGE, nonce]                   server -> client, first frame on an authenticated socket
    [RESPONSE, hmac]                     client -> server, HMAC-SHA256 of the nonce with the secret
    [WELCOME, True]                      server -> client, the handshake succeeded

The codec (encode_frame, FrameDecoder) does no I/O, so the trio server and client (pxfs.rpcserver,
pxfs.rpc), the blocking client (pxfs.blockingclient) and the asyncio client of the sidecar share
it. FrameStream sends and receives frames on a trio stream.
"""

from __future__ import annotations

import contextlib
import errno
import struct
from collections.abc import Iterator
from typing import Any

import msgpack
import trio

from pxfs import errors

REQUEST, REPLY, CHALLENGE, RESPONSE, WELCOME = range(5)

#: The largest frame either side accepts: a 4 MiB batch of blocks plus its envelope fits easily.
MAX_FRAME = 16 * 1024 * 1024
_LENGTH = struct.Struct(">I")
#: Frame bodies of at least this many bytes are sent apart from their length prefix.
_SEPARATE_BODY = 64 * 1024
#: Byte strings of at least this many bytes in PackedArgs and in list replies are sent from
#: their own buffers instead of being copied into the frame.
_GATHER_MIN = 4096
#: Lists nested deeper than this in a gathered message are packed whole.
_GATHER_DEPTH = 3
#: Buffers that one sendmsg call takes at most (the kernel's UIO_MAXIOV).
_IOV_MAX = 1024
#: Bytes received per system call; a frame larger than this is received into its own buffer.
_RECEIVE_BUFFER = 64 * 1024

#: A buffer of a frame to send.
Buffer = bytes | bytearray


def encode_frame(message: Any) -> bytes:
    """Pack `message` into one length-prefixed frame; raises InvalidArgument if it cannot."""
    return b"".join(encode_frame_parts(message))


def encode_frame_parts(message: Any) -> list[Buffer]:
    """Pack `message` as encode_frame does, into the buffers to send one after the other.

    A large body is returned apart from its length prefix, because joining them would copy
    a frame of block data once more.
    """
    return _frame_parts([_pack(message)])


def encode_reply(reply: list[Any]) -> list[Buffer]:
    result = reply[3]
    if isinstance(result, list) and any(map(_holds_large_bytes, result)):
        # Blocks read are sent from their own buffers.
        return _frame_parts(pack_gather(reply))
    return encode_frame_parts(reply)


def _holds_large_bytes(item: Any) -> bool:
    """Return whether `item`, or an element of it, is a byte string that pack_gather keeps."""
    if isinstance(item, (list, tuple)):
        return any(_is_large_bytes(element) for element in item)
    return _is_large_bytes(item)


def _is_large_bytes(item: Any) -> bool:
    return isinstance(item, (bytes, bytearray)) and len(item) >= _GATHER_MIN


class PackedArgs:
    """The arguments of a call, packed once to send the same call to several servers.

    RpcClient.call sends them as they are, so a write of a frame of blocks to three replicas
    packs its data once instead of three times. Large byte strings are not copied: they are
    sent from the caller's buffers, which must not change until every call that sends them
    has returned.
    """

    __slots__ = ("parts",)

    def __init__(self, *args: Any) -> None:
        self.parts = pack_gather(list(args))


def encode_request(request_id: int, method: str, args: tuple[Any, ...]) -> list[Buffer]:
    if len(args) == 1 and isinstance(args[0], PackedArgs):
        # A msgpack array of 4 is its header byte and its 4 items, one after the other.
        head = b"\x94" + _pack(REQUEST) + _pack(request_id) + _pack(method)
        return _frame_parts([head, *args[0].parts])
    return encode_frame_parts([REQUEST, request_id, method, list(args)])


def pack_gather(message: Any) -> list[Buffer]:
    """Pack `message` into buffers whose concatenation is its msgpack form.

    Lists and tuples down to _GATHER_DEPTH are walked, and each bytes or bytearray of at least
    _GATHER_MIN bytes in them is returned as it is, not copied. Raises InvalidArgument as
    _pack does.
    """
    parts: list[Buffer] = []
    head = bytearray()

    def add(item: Any, depth: int) -> None:
        nonlocal head
        if isinstance(item, (list, tuple)) and depth < _GATHER_DEPTH:
            head += _array_header(len(item))
            for element in item:
                add(element, depth + 1)
        elif _is_large_bytes(item):
            head += _bin_header(len(item))
            parts.append(bytes(head))
            parts.append(item)
            head = bytearray()
        else:
            head += _pack(item)

    add(message, 0)
    if head or not parts:
        parts.append(bytes(head))
    return parts


def _array_header(count: int) -> bytes:
    if count < 16:
        return bytes((0x90 | count,))
    if count <= 0xFFFF:
        return b"\xdc" + count.to_bytes(2, "big")
    return b"\xdd" + count.to_bytes(4, "big")


def _bin_header(size: int) -> bytes:
    # Only sizes of at least _GATHER_MIN come here, so the 1-byte length form is never needed.
    if size <= 0xFFFF:
        return b"\xc5" + size.to_bytes(2, "big")
    if size > 0xFFFFFFFF:
        raise errors.InvalidArgument(f"RPC message cannot be encoded: {size} bytes in one string")
    return b"\xc6" + size.to_bytes(4, "big")


def _pack(message: Any) -> bytes:
    """Pack `message` with msgpack; raises InvalidArgument if it cannot."""
    try:
        body: bytes = msgpack.packb(message, use_bin_type=True)
    except UnicodeEncodeError as exc:
        # A str with a lone surrogate, such as a non-UTF-8 command-line argument that Python
        # decoded with surrogateescape, has no UTF-8 form, so msgpack cannot send it.
        bad = exc.object[exc.start : exc.end]
        raise errors.InvalidArgument(
            f"invalid string {bad!r} in RPC message: not valid UTF-8"
        ) from None
    except (TypeError, ValueError, OverflowError) as exc:
        # msgpack raises TypeError for a type it has no form for (a set, an arbitrary object),
        # OverflowError for an integer outside int64 and uint64, ValueError for deep nesting.
        raise errors.InvalidArgument(f"RPC message cannot be encoded: {exc}") from None
    return body


def _frame_parts(body: list[Buffer]) -> list[Buffer]:
    """Return the buffers of the frame whose body is the concatenation of `body`."""
    length = sum(len(part) for part in body)
    if length > MAX_FRAME:
        raise errors.InvalidArgument(f"RPC message of {length} bytes exceeds {MAX_FRAME}")
    prefix = _LENGTH.pack(length)
    if len(body) == 1 and length < _SEPARATE_BODY:
        # One small buffer costs one copy less to send than two.
        return [prefix + body[0]]
    return [prefix, *body]


async def send_frame(stream: trio.abc.SendStream, parts: list[Buffer]) -> None:
    """Send the buffers of one frame from encode_frame_parts.

    A socket stream gets them with sendmsg, so large buffers go to the kernel without a copy
    into one frame first. A TLS stream encrypts what it sends anyway, so it gets one buffer.
    """
    if not isinstance(stream, trio.SocketStream):
        await stream.send_all(parts[0] if len(parts) == 1 else b"".join(parts))
        return
    if stream.socket.did_shutdown_SHUT_WR:
        raise trio.ClosedResourceError("cannot send after sending EOF")
    pending: list[Buffer | memoryview] = list(parts)
    with _translated_socket_errors():
        while pending:
            sent = await stream.socket.sendmsg(pending[:_IOV_MAX])
            while sent:
                size = len(pending[0])
                if sent < size:
                    pending[0] = memoryview(pending[0])[sent:]
                    break
                sent -= size
                del pending[0]
            while pending and not len(pending[0]):
                del pending[0]


class FrameDecoder:
    """Split a byte stream into decoded messages; raises ProtocolError on a broken stream."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buffer = bytearray()
        #: The largest frame accepted; a longer length prefix raises ProtocolError at once.
        self.max_frame = max_frame

    def feed(self, data: bytes | bytearray) -> list[Any]:
        """Add received bytes and return the messages that are now complete."""
        self._buffer += data
        messages = []
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length > self.max_frame:
                raise errors.ProtocolError(f"frame of {length} bytes exceeds {self.max_frame}")
            end = _LENGTH.size + length
            if len(self._buffer) < end:
                break
            # Unpack straight from the buffer: a 1 MiB frame is not copied before decoding.
            view = memoryview(self._buffer)
            try:
                messages.append(_unpack(view[_LENGTH.size : end]))
            finally:
                view.release()
            del self._buffer[:end]
        return messages

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole frame."""
        return len(self._buffer)


def _unpack(body: bytes | memoryview) -> Any:
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=False)
    # TypeError comes from a map whose key is an array or a map, which Python cannot hash.
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        raise errors.ProtocolError(f"undecodable frame: {exc}") from None


def error_payload(exc: errors.PxfsError) -> list[str]:
    """Return the wire form of a PxfsError: [code, message]."""
    return [exc.code, exc.message]


def error_from_payload(payload: Any) -> errors.PxfsError:
    """Rebuild the PxfsError that a reply carried."""
    if isinstance(payload, list) and len(payload) == 2:
        return errors.from_code(str(payload[0]), str(payload[1]))
    return errors.ProtocolError(f"malformed error in reply: {payload!r}")


def parse_request(message: Any) -> tuple[int, str, list[Any]]:
    """Validate a request message and return (id, method, args)."""
    if not (isinstance(message, list) and len(message) == 4 and message[0] == REQUEST):
        raise errors.ProtocolError("expected a request frame")
    _, request_id, method, args = message
    if not isinstance(request_id, int) or not isinstance(method, str):
        raise errors.ProtocolError("request id must be an integer and method a string")
    if not isinstance(args, list):
        raise errors.ProtocolError("request arguments must be a list")
    return request_id, method, args


class FrameStream:
    """A trio stream that sends and receives frames.

    From a socket, frames are received with recv_into: small frames through one buffer, many
    per system call, and a large frame straight into a buffer of its size, with no copy before
    it is decoded. Other streams (TLS) go through a FrameDecoder.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        #: The largest frame accepted; a longer length prefix raises ProtocolError at once.
        self.max_frame = MAX_FRAME
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._decoder = FrameDecoder()
        self._ready: list[Any] = []
        # Received bytes not yet decoded are self._buffer[self._start : self._end].
        self._buffer = bytearray(_RECEIVE_BUFFER) if self._socket is not None else bytearray()
        self._start = self._end = 0
        # A frame body too large for the buffer, of which the first bytes have arrived.
        self._large: bytearray | None = None
        self._large_filled = 0

    async def receive(self) -> Any:
        """Return the next message; raises Unavailable at end of stream.

        A receive cancelled part-way keeps what it received, so the next one goes on from there.
        """
        if self._socket is None:
            return await self._receive_decoded()
        with _translated_socket_errors():
            if self._large is None:
                await self._fill(_LENGTH.size)
                (length,) = _LENGTH.unpack_from(self._buffer, self._start)
                if length > self.max_frame:
                    raise errors.ProtocolError(f"frame of {length} bytes exceeds {self.max_frame}")
                size = _LENGTH.size + length
                if size <= len(self._buffer):
                    await self._fill(size)
                    body = self._start + _LENGTH.size
                    with memoryview(self._buffer) as view:
                        message = _unpack(view[body : body + length])
                    self._start += size
                    return message
                self._start_large(length)
            return await self._receive_large()

    async def _receive_decoded(self) -> Any:
        self._decoder.max_frame = self.max_frame
        while not self._ready:
            data = await self.stream.receive_some(_RECEIVE_BUFFER)
            if not data:
                raise errors.Unavailable("connection closed by peer")
            self._ready.extend(self._decoder.feed(data))
        return self._ready.pop(0)

    async def _fill(self, count: int) -> None:
        """Receive until `count` bytes are buffered; `count` must fit in the buffer."""
        assert self._socket is not None
        if self._end - self._start >= count:
            return
        if self._start + count > len(self._buffer):
            # Move what is buffered to the front, to make room for the rest.
            self._buffer[: self._end - self._start] = self._buffer[self._start : self._end]
            self._end -= self._start
            self._start = 0
        with memoryview(self._buffer) as view:
            while self._end - self._start < count:
                received = await self._socket.recv_into(view[self._end :])
                if not received:
                    raise errors.Unavailable("connection closed by peer")
                self._end += received

    def _start_large(self, length: int) -> None:
        """Move the buffered start of a frame body larger than the buffer to its own buffer."""
        body = self._start + _LENGTH.size
        self._large = bytearray(length)
        self._large_filled = self._end - body
        self._large[: self._large_filled] = self._buffer[body : self._end]
        self._start = self._end = 0

    async def _receive_large(self) -> Any:
        """Receive the rest of the large frame body and decode it."""
        assert self._socket is not None and self._large is not None
        with memoryview(self._large) as view:
            while self._large_filled < len(view):
                received = await self._socket.recv_into(view[self._large_filled :])
                if not received:
                    raise errors.Unavailable("connection closed by peer")
                self._large_filled += received
            self._large = None
            return _unpack(view)


@contextlib.contextmanager
def _translated_socket_errors() -> Iterator[None]:
    """Raise what trio.SocketStream raises for the errors of its socket."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise trio.ClosedResourceError("this socket was already closed") from None
        raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
