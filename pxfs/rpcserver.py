"""The trio RPC server: a table of async handlers served on unix and TCP sockets.

The frames and messages are those of pxfs.frames, and the secret handshake is that of pxfs.rpc.
Until a client has passed the handshake, the server takes frames of at most HANDSHAKE_MAX_FRAME
bytes, so a client without the secret cannot make it buffer a large frame.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import inspect
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
    FrameStream,
    encode_frame,
    encode_frame_parts,
    encode_reply,
    error_payload,
    parse_request,
    send_frame,
)
from pxfs.rpc import HANDSHAKE_TIMEOUT, describe_tls_failure, handshake_digest

log = logging.getLogger(__name__)

#: The largest frame the server accepts before a client has passed the secret handshake.
HANDSHAKE_MAX_FRAME = 1024
#: Seconds between two warnings about rejected connections of one kind; the rest are counted.
REJECTION_LOG_INTERVAL = 10.0
#: Requests one connection may have running on the server at once; more wait for a slot.
MAX_IN_FLIGHT = 64

Handler = Callable[..., Awaitable[Any]]


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
                reason = describe_tls_failure(exc)
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
