"""Length-prefixed msgpack RPC: the handshake, a trio server and a trio client.

The frames and messages are those of pxfs.frames, and the blocking client of the control socket
is in pxfs.blockingclient. A client sends nothing after its RESPONSE until the WELCOME arrives.
Until then the server takes frames of at most HANDSHAKE_MAX_FRAME bytes, so a client without the
secret cannot make it buffer a large frame.

Over TCP the server and client can run TLS under these frames (pxfs.tls builds the contexts):
the TLS handshake comes first, then the secret handshake inside it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import inspect
import itertools
import logging
import os
import secrets
import socket
import ssl
import stat
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio

from pxfs import errors
from pxfs.frames import (
    CHALLENGE,
    MAX_FRAME,
    REPLY,
    RESPONSE,
    WELCOME,
    Buffer,
    FrameStream,
    encode_frame,
    encode_frame_parts,
    encode_reply,
    encode_request,
    error_from_payload,
    error_payload,
    parse_request,
    send_frame,
)

log = logging.getLogger(__name__)

#: Seconds that the server gives the TLS handshake, and then the secret handshake. The client
#: gives both together this long.
HANDSHAKE_TIMEOUT = 10.0
#: The largest frame the server accepts before a client has passed the secret handshake.
HANDSHAKE_MAX_FRAME = 1024
#: Seconds between two warnings about rejected connections of one kind; the rest are counted.
REJECTION_LOG_INTERVAL = 10.0
#: Requests one connection may have running on the server at once; more wait for a slot.
MAX_IN_FLIGHT = 64

Handler = Callable[..., Awaitable[Any]]


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


class _RejectionLog:
    """Warnings about rejected connections, at most one per reason and REJECTION_LOG_INTERVAL.

    A client that retries, or a scan of the port, would otherwise fill the log. The rejections
    in between go to DEBUG, and the next warning for the same reason states how many there were.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0
        #: By reason (a constant format string): when the next warning may come, and how many
        #: rejections went to DEBUG since the last one.
        self._quiet: dict[str, tuple[float, int]] = {}

    def record(self, reason: str, *args: object) -> None:
        """Log one rejected connection, `reason` being a %-format with `args`."""
        self.count += 1
        now = time.monotonic()
        quiet_until, suppressed = self._quiet.get(reason, (0.0, 0))
        if now < quiet_until:
            self._quiet[reason] = (quiet_until, suppressed + 1)
            log.debug("%s: " + reason, self.name, *args)
            return
        if suppressed:
            log.warning(
                "%s: " + reason + " (%d more rejected since the last warning)",
                self.name, *args, suppressed,
            )  # fmt: skip
        else:
            log.warning("%s: " + reason, self.name, *args)
        self._quiet[reason] = (now + REJECTION_LOG_INTERVAL, 0)


class RpcServer:
    """Serve a table of async handlers on unix or TCP sockets, one task per request."""

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        *,
        secret: bytes | None = None,
        name: str = "rpc",
        max_connections: int | None = None,
    ) -> None:
        self.handlers = dict(handlers)
        self.secret = secret
        self.name = name
        self.connections = 0
        #: Connections served at once; the server closes one beyond it at once. None: no bound.
        self.max_connections = max_connections
        self.rejections = _RejectionLog(name)
        # inspect.signature takes about 15 us a call, a cost on every small read and write.
        self._signatures: dict[Handler, inspect.Signature] = {}

    async def serve_unix(
        self,
        path: str | os.PathLike[str],
        *,
        mode: int = 0o600,
        group: int | None = None,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on a unix socket at `path` (replacing a stale one) until cancelled.

        The socket gets `mode` and, when `group` is a gid, that group.
        """
        path = os.fspath(path)
        _remove_stale_socket(path)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The socket is created with no group or other access, so it is never reachable by
        # others before the chmod below sets its final mode.
        old_umask = os.umask(0o177)
        try:
            await sock.bind(path)
        finally:
            os.umask(old_umask)
        if group is not None:
            os.chown(path, -1, group)
        os.chmod(path, mode)
        sock.listen(128)
        listener = trio.SocketListener(sock)
        log.info("%s listening on %s", self.name, path)
        try:
            await trio.serve_listeners(self._serve_connection, [listener], task_status=task_status)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)

    async def serve_tcp(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on TCP `host`:`port` until cancelled, over TLS when `ssl_context` is given."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        handler: Callable[[trio.SocketStream], Awaitable[None]] = self._serve_connection
        if ssl_context is not None:
            handler = functools.partial(self._serve_tls_connection, ssl_context)
        log.info(
            "%s listening on %s:%d%s", self.name, host, port, " with TLS" if ssl_context else ""
        )
        await trio.serve_listeners(handler, listeners, task_status=task_status)

    async def _serve_tls_connection(
        self, context: ssl.SSLContext, stream: trio.SocketStream
    ) -> None:
        tls = trio.SSLStream(stream, context, server_side=True)
        with trio.move_on_after(HANDSHAKE_TIMEOUT) as scope:
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError as exc:
                reason = _tls_failure(exc)
                self.rejections.record(
                    "rejected a TLS connection from %s: %s", _peer(stream), reason
                )
                await trio.aclose_forcefully(tls)
                return
            except Exception:
                # As in _serve_connection: an error here must not end the whole server.
                log.exception("%s: TLS handshake with %s failed", self.name, _peer(stream))
                await trio.aclose_forcefully(tls)
                return
        if scope.cancelled_caught:
            self.rejections.record(
                "rejected a TLS connection from %s: no TLS handshake within %g s",
                _peer(stream), HANDSHAKE_TIMEOUT,
            )  # fmt: skip
            await trio.aclose_forcefully(tls)
            return
        await self._serve_connection(tls)

    async def _serve_connection(self, stream: trio.abc.Stream) -> None:
        if self.max_connections is not None and self.connections >= self.max_connections:
            self.rejections.record(
                "closed a new connection: %d connections are open, the maximum", self.connections
            )
            await trio.aclose_forcefully(stream)
            return
        self.connections += 1
        conn = FrameStream(stream)
        try:
            if self.secret is not None and not await self._authenticate(conn):
                return
            await self._serve_requests(conn)
        except (errors.Unavailable, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except errors.ProtocolError as exc:
            log.warning("%s: dropping connection: %s", self.name, exc.message)
        except Exception:
            # trio.serve_listeners lets a handler's exception end the whole server, so a defect
            # that one peer's bytes reach must cost only that peer its connection.
            log.exception("%s: dropping connection after an unexpected error", self.name)
        finally:
            self.connections -= 1
            await trio.aclose_forcefully(stream)

    async def _authenticate(self, conn: FrameStream) -> bool:
        assert self.secret is not None
        nonce = secrets.token_bytes(32)
        conn.max_frame = HANDSHAKE_MAX_FRAME
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            await conn.stream.send_all(encode_frame([CHALLENGE, nonce]))
            try:
                message = await conn.receive()
            except errors.ProtocolError as exc:
                self.rejections.record(
                    "rejected a connection that failed the handshake: %s", exc.message
                )
                return False
            expected = handshake_digest(self.secret, nonce)
            if (
                isinstance(message, list)
                and len(message) == 2
                and message[0] == RESPONSE
                and isinstance(message[1], bytes)
                and hmac.compare_digest(message[1], expected)
            ):
                conn.max_frame = MAX_FRAME
                await conn.stream.send_all(encode_frame([WELCOME, True]))
                return True
            self.rejections.record("rejected a connection that failed the handshake")
            return False
        self.rejections.record("rejected a connection that did not finish the handshake")
        return False

    async def _serve_requests(self, conn: FrameStream) -> None:
        send_lock = trio.Lock()
        limiter = trio.CapacityLimiter(MAX_IN_FLIGHT)
        async with trio.open_nursery() as nursery:
            # Errors of the connection itself end the loop here, inside the nursery, so that
            # they do not reach the caller wrapped in an ExceptionGroup. Handlers that are
            # still running are cancelled: their peer is gone.
            try:
                while True:
                    request_id, method, args = parse_request(await conn.receive())
                    token = object()
                    await limiter.acquire_on_behalf_of(token)
                    nursery.start_soon(
                        self._answer, conn, send_lock, limiter, token, request_id, method, args
                    )
            except (errors.Unavailable, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            except errors.ProtocolError as exc:
                log.warning("%s: dropping connection: %s", self.name, exc.message)
            except Exception:
                log.exception("%s: dropping connection after an unexpected error", self.name)
            nursery.cancel_scope.cancel()

    async def _answer(
        self,
        conn: FrameStream,
        send_lock: trio.Lock,
        limiter: trio.CapacityLimiter,
        token: object,
        request_id: int,
        method: str,
        args: list[Any],
    ) -> None:
        try:
            reply = [REPLY, request_id, None, await self._call(method, args)]
        except errors.PxfsError as exc:
            reply = [REPLY, request_id, error_payload(exc), None]
        finally:
            limiter.release_on_behalf_of(token)
        try:
            frame = encode_reply(reply)
        except errors.PxfsError as exc:
            log.exception("%s: reply to %s could not be encoded", self.name, method)
            failure = errors.InternalError(f"reply to {method} could not be encoded: {exc}")
            frame = encode_frame_parts([REPLY, request_id, error_payload(failure), None])
        async with send_lock:
            try:
                await send_frame(conn.stream, frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _call(self, method: str, args: list[Any]) -> Any:
        handler = self.handlers.get(method)
        if handler is None:
            raise errors.NotSupported(f"unknown method {method!r}")
        signature = self._signatures.get(handler)
        if signature is None:
            signature = self._signatures[handler] = inspect.signature(handler)
        try:
            signature.bind(*args)
        except TypeError as exc:
            raise errors.InvalidArgument(f"bad arguments for {method}: {exc}") from None
        try:
            return await handler(*args)
        except errors.PxfsError:
            raise
        except Exception as exc:
            log.exception("%s: %s failed", self.name, method)
            raise errors.InternalError(f"{method} failed: {exc}") from None


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "a peer that left"
    return f"{host}:{port}"


def _tls_failure(exc: BaseException) -> str:
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
                f"TLS handshake with {self.description} failed: {_tls_failure(exc)}"
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
            reason = f": {_tls_failure(exc)}" if isinstance(exc.__cause__, ssl.SSLError) else ""
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


def _remove_stale_socket(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise errors.AlreadyExists(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        # No server accepts connections on it: a socket left behind by a server that died.
        os.unlink(path)
        return
    finally:
        probe.close()
    raise errors.Busy(f"another server is listening on {path}")
