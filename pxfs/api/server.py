"""An aiohttp AppRunner with bounded connections and plain-text replies to unparsable requests.

aiohttp replies to a request that its HTTP parser rejects (a request line or header over 8190
bytes, too many headers, bytes that are not HTTP) before any middleware runs. It logs each
one at ERROR with a traceback and replies with the parser's message, which contains the repr
of the raw bytes. Any client could fill the log that way. This runner logs one DEBUG line per
such request and replies with the status and message of Go's net/http where there is one.

aiohttp also accepts every connection that arrives. The runner's ConnectionGate bounds the
open connections, in total and per client address, and closes a connection beyond a bound at
once, before aiohttp reads from it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

log = logging.getLogger(__name__)


#: Seconds between two warnings of one kind; the repeats between them go to DEBUG.
WARNING_INTERVAL = 10.0


class RepeatedWarning:
    """A warning that a client can cause at will, logged at most once per WARNING_INTERVAL.

    The repeats in between go to DEBUG, and the next warning says how many there were, so a
    client that retries at once cannot fill the log.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._quiet_until = 0.0
        self._suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        """Log `message` % `args` at WARNING, or at DEBUG within the interval of the last one."""
        now = time.monotonic()
        if now < self._quiet_until:
            self._suppressed += 1
            self._log.debug(message, *args)
            return
        if self._suppressed:
            message += " (%d more since the last warning)"
            args = (*args, self._suppressed)
        self._log.warning(message, *args)
        self._suppressed = 0
        self._quiet_until = now + WARNING_INTERVAL


@dataclass(frozen=True)
class ConnectionLimits:
    """Bounds on the open connections of one listener; `per_client` None means no such bound."""

    total: int
    per_client: int | None = None


class ConnectionGate:
    """Count the open connections of one listener and admit a new one only within the limits.

    A client is identified by its IP address, without the port. Every client of a unix socket
    has the address "", so there only the total bound applies.
    """

    def __init__(self, name: str, limits: ConnectionLimits) -> None:
        self.name = name
        self.limits = limits
        self.open = 0
        self._per_client: dict[str, int] = {}
        self._rejections = RepeatedWarning(log)

    def admit(self, client: str) -> bool:
        """Count a new connection from `client` and return True, or return False over a bound."""
        if self.open >= self.limits.total:
            self._log_rejection(client, f"{self.open} connections are open, the maximum")
            return False
        per_client = self.limits.per_client
        count = self._per_client.get(client, 0)
        if per_client is not None and count >= per_client:
            self._log_rejection(client, f"{count} connections from it are open, the maximum")
            return False
        self.open += 1
        self._per_client[client] = count + 1
        return True

    def release(self, client: str) -> None:
        """Forget one admitted connection from `client`."""
        self.open -= 1
        remaining = self._per_client[client] - 1
        if remaining:
            self._per_client[client] = remaining
        else:
            del self._per_client[client]

    def _log_rejection(self, client: str, reason: str) -> None:
        source = client or "a client"
        self._rejections.warning("%s: closed a connection from %s: %s", self.name, source, reason)


class SidecarRunner(web.AppRunner):
    """An AppRunner that serves each connection with a _PlainErrorHandler, behind `gate`."""

    def __init__(
        self, app: web.Application, *, gate: ConnectionGate | None = None, **kwargs: Any
    ) -> None:
        super().__init__(app, **kwargs)
        self.gate = gate

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return _PlainErrorServer(
            server.request_handler,
            self.gate,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )


class _PlainErrorServer(web.Server):
    def __init__(self, handler: Any, gate: ConnectionGate | None, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.gate = gate

    def __call__(self) -> RequestHandler:
        return _PlainErrorHandler(self, loop=self._loop, **self._kwargs)


def _client_address(transport: asyncio.BaseTransport) -> str:
    """Return the IP address of the peer of a TCP connection, or "" for a unix socket."""
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return ""


class _PlainErrorHandler(RequestHandler):
    __slots__ = ("_gate", "_client")

    def __init__(self, manager: _PlainErrorServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._gate = manager.gate
        #: The address under which the gate counts this connection; None until admitted.
        self._client: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Admit the connection through the gate, or close it before anything is set up."""
        if self._gate is not None:
            client = _client_address(transport)
            if not self._gate.admit(client):
                # aiohttp has neither a request task nor a timer for it yet, and the loop reads
                # nothing from a closed transport, so the connection costs nothing more.
                transport.close()
                return
            self._client = client
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        """Free the connection's place in the gate."""
        super().connection_lost(exc)
        client, self._client = self._client, None
        if client is not None and self._gate is not None:
            self._gate.release(client)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Reply to a request that the parser rejected; other errors go to aiohttp."""
        if not isinstance(exc, HttpProcessingError) or status >= 500:
            return super().handle_error(request, status, exc, message)
        status, text = parse_error_reply(exc)
        # The parser's message quotes the start of the line, which may be a credential header.
        log.debug("rejected a malformed request from %s: %s", request.remote, text)
        if request.writer.output_size > 0:
            raise ConnectionError("the reply has already started; closing the connection")
        response = web.Response(status=status, text=text + "\n")
        response.force_close()
        return response


def parse_error_reply(exc: HttpProcessingError) -> tuple[int, str]:
    """Return the status and message of the reply to a request that aiohttp could not parse."""
    # Go's net/http counts the request line as part of the header, so it rejects a long URL
    # and a long header alike with 431.
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else "the limit of"
        return 431, (
            "request header fields are too large: the request line and each header may have "
            f"at most {limit} bytes"
        )
    if isinstance(exc, BadHttpMessage) and "too many headers" in str(exc.message).lower():
        return 431, "request header fields are too large: too many header fields"
    return 400, "400 Bad Request: the request is not valid HTTP"


def oversized_body(request: web.BaseRequest) -> str | None:
    """Return the error message for a Content-Length over the body limit, or None."""
    length = request.content_length
    limit = request.client_max_size
    if length is None or length <= limit:
        return None
    return f"request body is too large: Content-Length {length} is over the limit of {limit} bytes"
