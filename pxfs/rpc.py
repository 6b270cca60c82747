"""pxfs RPC: the secret handshake and the multiplexed trio client.

The frames and messages are those of pxfs.frames. The server is in pxfs.rpcserver and the blocking
client of the control socket in pxfs.blockingclient. A client sends nothing after its RESPONSE
until the WELCOME arrives, because until then the server takes frames of at most
pxfs.rpcserver.HANDSHAKE_MAX_FRAME bytes.

Over TCP the server and client can run TLS under these frames (pxfs.tls builds the contexts):
the TLS handshake comes first, then the secret handshake inside it.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import logging
import os
import ssl
from typing import Any

import trio

from pxfs import errors
from pxfs.frames import (
    CHALLENGE,
    REPLY,
    RESPONSE,
    WELCOME,
    Buffer,
    FrameStream,
    encode_frame,
    encode_request,
    error_from_payload,
    send_frame,
)

log = logging.getLogger(__name__)

#: Seconds that the server gives the TLS handshake, and then the secret handshake. The client
#: gives both together this long.
HANDSHAKE_TIMEOUT = 10.0


def handshake_digest(secret: bytes, nonce: bytes) -> bytes:
    """Return the client's proof that it has `secret`, for the server's `nonce`."""
    return hmac.new(secret, b"pxfs-rpc-v1" + nonce, hashlib.sha256).digest()


def read_secret(path: str | os.PathLike[str]) -> bytes:
    """Read a cluster secret file; raises PermissionDenied or NotFound with the path."""
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except FileNotFoundError:
        raise errors.NotFound(f"secret file {path} does not exist") from None
    except PermissionError:
        raise errors.PermissionDenied(f"secret file {path} is not readable") from None
    if not secret:
        raise errors.InvalidArgument(f"secret file {path} is empty")
    return secret


def describe_tls_failure(exc: BaseException) -> str:
    """Return why a TLS handshake failed, from the ssl error that trio wraps."""
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLError):
        return str(cause.reason or cause)
    if cause is not None:
        return str(cause) or type(cause).__name__
    return "connection closed during the TLS handshake"


class RpcClient:
    """A multiplexed trio client: many calls may be in flight on one connection.

    There is no reader task. Whichever caller is waiting takes the receive lock, reads one
    message and hands it to its owner, so the client needs no nursery. trio's receive_some
    consumes nothing when cancelled and the decoder keeps partial frames, so a cancelled
    reader leaves the stream intact.
    """

    def __init__(self, stream: trio.abc.Stream, description: str) -> None:
        self._conn = FrameStream(stream)
        self.description = description
        self._ids = itertools.count(1)
        self._replies: dict[int, Any] = {}
        self._waiting: set[int] = set()
        self._send_lock = trio.Lock()
        self._receive_lock = trio.Lock()
        self._broken: errors.PxfsError | None = None
        self._arrived = trio.Event()

    @classmethod
    async def connect_unix(
        cls, path: str | os.PathLike[str], secret: bytes | None = None
    ) -> RpcClient:
        """Connect to a unix socket server and pass its handshake when `secret` is given."""
        try:
            stream = await trio.open_unix_socket(os.fspath(path))
        except FileNotFoundError:
            raise errors.Unavailable(f"no server is listening on {path}") from None
        except PermissionError:
            raise errors.PermissionDenied(f"permission denied on socket {path}") from None
        except OSError as exc:
            raise errors.Unavailable(f"cannot connect to {path}: {exc.strerror}") from None
        return await cls._start(stream, os.fspath(path), secret)

    @classmethod
    async def connect_tcp(
        cls,
        host: str,
        port: int,
        secret: bytes | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> RpcClient:
        """Connect to a TCP server, over TLS when `ssl_context` is given, and pass its handshake.

        Raises Unavailable when the server cannot be reached or does not finish the handshakes
        within HANDSHAKE_TIMEOUT, and AuthenticationFailed when TLS or the secret fails.
        """
        try:
            tcp = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            raise errors.Unavailable(f"cannot connect to {host}:{port}: {exc}") from None
        stream: trio.abc.Stream = tcp
        if ssl_context is not None:
            stream = trio.SSLStream(tcp, ssl_context, server_hostname=host)
        return await cls._start(stream, f"{host}:{port}", secret)

    @classmethod
    async def _start(
        cls, stream: trio.abc.Stream, description: str, secret: bytes | None
    ) -> RpcClient:
        client = cls(stream, description)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                if isinstance(stream, trio.SSLStream):
                    await client._tls_handshake(stream)
                if secret is not None:
                    await client._handshake(secret)
        except trio.TooSlowError:
            await trio.aclose_forcefully(stream)
            raise errors.Unavailable(
                f"{description} did not finish the handshake within {HANDSHAKE_TIMEOUT:g} s"
            ) from None
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return client

    async def _tls_handshake(self, stream: trio.SSLStream[trio.abc.Stream]) -> None:
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            raise errors.AuthenticationFailed(
                f"TLS handshake with {self.description} failed: {describe_tls_failure(exc)}"
            ) from None

    async def _handshake(self, secret: bytes) -> None:
        try:
            challenge = await self._conn.receive()
            # The nonce must be bytes: bytes() of an integer would allocate that many.
            if not (
                isinstance(challenge, list)
                and len(challenge) == 2
                and challenge[0] == CHALLENGE
                and isinstance(challenge[1], bytes)
            ):
                raise errors.ProtocolError(f"{self.description} sent no handshake challenge")
            digest = handshake_digest(secret, challenge[1])
            await self._conn.stream.send_all(encode_frame([RESPONSE, digest]))
            welcome = await self._conn.receive()
        except trio.BrokenResourceError as exc:
            # Over TLS 1.3 the server checks the client's certificate after the client has
            # finished its side of the handshake, so its rejection arrives here.
            reason = (
                f": {describe_tls_failure(exc)}" if isinstance(exc.__cause__, ssl.SSLError) else ""
            )
            raise errors.AuthenticationFailed(
                f"{self.description} rejected the handshake{reason}"
            ) from None
        except errors.Unavailable:
            raise errors.AuthenticationFailed(
                f"{self.description} rejected the handshake"
            ) from None
        if welcome != [WELCOME, True]:
            raise errors.AuthenticationFailed(f"{self.description} rejected the handshake")

    async def call(self, method: str, *args: Any) -> Any:
        """Call `method` on the server and return its result, or raise the error it sent.

        A single PackedArgs argument is sent as the packed arguments of the call.
        """
        if self._broken is not None:
            raise self._broken
        request_id = next(self._ids)
        frame = encode_request(request_id, method, args)
        self._waiting.add(request_id)
        try:
            await self._send(frame)
            reply = await self._wait_for(request_id)
        finally:
            self._waiting.discard(request_id)
            self._replies.pop(request_id, None)
        error, result = reply[2], reply[3]
        if error is not None:
            raise error_from_payload(error)
        return result

    async def _send(self, frame: list[Buffer]) -> None:
        async with self._send_lock:
            # A send cut off half-way would leave a partial frame on the stream, so it is
            # shielded from cancellation, with a timeout of its own against a stalled peer.
            with trio.CancelScope(shield=True):
                with trio.move_on_after(60) as scope:
                    try:
                        await send_frame(self._conn.stream, frame)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        self._fail(errors.Unavailable(f"connection to {self.description} lost"))
                if scope.cancelled_caught:
                    self._fail(errors.Unavailable(f"sending to {self.description} timed out"))
            if self._broken is not None:
                raise self._broken

    async def _wait_for(self, request_id: int) -> Any:
        while request_id not in self._replies:
            if self._broken is not None:
                raise self._broken
            if self._receive_lock.locked():
                arrived = self._arrived
                await arrived.wait()
                continue
            async with self._receive_lock:
                await self._receive_one()
        return self._replies[request_id]

    async def _receive_one(self) -> None:
        try:
            message = await self._conn.receive()
        except (errors.Unavailable, trio.BrokenResourceError, trio.ClosedResourceError):
            self._fail(errors.Unavailable(f"connection to {self.description} lost"))
            return
        except errors.ProtocolError as exc:
            self._fail(exc)
            return
        finally:
            # Wake every waiter so one of them takes over reading.
            self._arrived.set()
            self._arrived = trio.Event()
        if (
            isinstance(message, list)
            and len(message) == 4
            and message[0] == REPLY
            and message[1] in self._waiting
        ):
            self._replies[message[1]] = message
        else:
            # Usually the reply to a call whose caller was cancelled.
            log.debug("%s sent a reply nobody waits for; ignored", self.description)

    def _fail(self, error: errors.PxfsError) -> None:
        if self._broken is None:
            self._broken = error
        self._arrived.set()

    @property
    def broken(self) -> bool:
        """True once the connection is lost; every later call raises Unavailable."""
        return self._broken is not None

    async def aclose(self) -> None:
        """Close the connection; pending calls fail with Unavailable."""
        self._fail(errors.Unavailable(f"connection to {self.description} closed"))
        await trio.aclose_forcefully(self._conn.stream)
