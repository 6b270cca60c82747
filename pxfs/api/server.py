"""An aiohttp AppRunner whose replies to unparsable requests are short plain-text errors.

aiohttp replies to a request that its HTTP parser rejects (a request line or header over 8190
bytes, too many headers, bytes that are not HTTP) before any middleware runs. It logs each
one at ERROR with a traceback and replies with the parser's message, which contains the repr
of the raw bytes. Any client could fill the log that way. This runner logs one DEBUG line per
such request and replies with the status and message of Go's net/http where there is one.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

log = logging.getLogger(__name__)


class SidecarRunner(web.AppRunner):
    """An AppRunner that serves each connection with a _PlainErrorHandler."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return _PlainErrorServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )


class _PlainErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _PlainErrorHandler(self, loop=self._loop, **self._kwargs)


class _PlainErrorHandler(RequestHandler):
    __slots__ = ()

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
