"""The sidecar's aiohttp application: routes, error middleware, body limit and the server loop."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from pxfs import errors
from pxfs.api import rest
from pxfs.api.control import ControlClient

log = logging.getLogger(__name__)

#: Largest request body accepted, in bytes. OSD request bodies are a few hundred bytes; larger
#: ones get 413 before any of them is parsed.
MAX_BODY = 256 * 1024

#: Seconds to wait at start-up for pxd's first reply before serving without it.
_PROBE_TIMEOUT = 10.0

#: Seconds between two warnings about the same server-side error.
_WARNING_INTERVAL = 60.0
_MAX_WARNING_KEYS = 256
_last_warning: dict[tuple[type[errors.PxfsError], str], float] = {}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_app(control: ControlClient, *, max_body: int = MAX_BODY) -> web.Application:
    """Build the REST application that calls pxd through `control` and closes it at cleanup."""
    app = web.Application(middlewares=[error_middleware], client_max_size=max_body)
    app[rest.CONTROL] = control
    app.add_routes(rest.routes)
    app.on_cleanup.append(_close_control)
    return app


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Translate PxfsError into plain-text error replies and log unexpected exceptions."""
    started = time.monotonic()
    try:
        response = await handler(request)
    except web.HTTPNotFound:
        if request.match_info.http_exception is None:
            raise
        # The router found no route, so reply with the text of Go's net/http.
        response = plain_error("404 page not found", 404)
    except errors.PxfsError as exc:
        _log_failure(request, exc)
        response = plain_error(exc.message, exc.http_status)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("%s %s failed", request.method, request.path_qs)
        response = plain_error("internal error; the pxd-sidecar log has the details", 500)
    elapsed_ms = (time.monotonic() - started) * 1000
    log.debug("%s %s -> %d (%.1f ms)", request.method, request.path_qs, response.status, elapsed_ms)
    return response


def _log_failure(request: web.Request, exc: errors.PxfsError) -> None:
    """Log a failed request: client errors at DEBUG, server errors at WARNING, rate-limited."""
    level = logging.DEBUG
    if exc.http_status >= 500:
        # A client polling while pxd is down would repeat the same warning many times a second.
        now = time.monotonic()
        key = (type(exc), exc.message)
        if now - _last_warning.get(key, -_WARNING_INTERVAL) >= _WARNING_INTERVAL:
            if len(_last_warning) >= _MAX_WARNING_KEYS:
                _last_warning.clear()
            _last_warning[key] = now
            level = logging.WARNING
    log.log(level, "%s %s failed: %s", request.method, request.path_qs, exc.message)


def plain_error(message: str, status: int) -> web.Response:
    """Build an error reply in the shape of Go's http.Error: the message and a newline."""
    return web.Response(status=status, text=message + "\n")


async def _close_control(app: web.Application) -> None:
    await app[rest.CONTROL].close()


async def run_sidecar(control_socket: str, host: str, port: int, plugin_socket: str) -> int:
    """Serve the REST API on `host`:`port` until SIGINT or SIGTERM; return the exit code."""
    stop = _stop_on_signals()
    control = ControlClient(control_socket)
    runner = web.AppRunner(make_app(control), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await _start_site(runner, host, port)
        # NOTE: the Docker volume plugin protocol is not served yet, so dockerd cannot use
        # pxfs volumes through this socket. Until it is, the REST API is the only interface.
        log.warning("Docker volume plugin not served yet; %s stays unused", plugin_socket)
        await _log_pxd(control)
        await stop.wait()
        log.info("stopping")
    finally:
        await runner.cleanup()
    return 0


async def _start_site(runner: web.AppRunner, host: str, port: int) -> None:
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        raise errors.Unavailable(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    log.info("REST API listening on http://%s:%d", host, port)


async def _log_pxd(control: ControlClient) -> None:
    """Log whether pxd responds. The sidecar serves either way, with 503 until pxd is up."""
    try:
        status = await asyncio.wait_for(control.call("node.status"), _PROBE_TIMEOUT)
    except TimeoutError:
        log.warning("pxd did not respond within %g s; REST calls wait for it", _PROBE_TIMEOUT)
        return
    except errors.PxfsError as exc:
        log.warning("pxd is not reachable yet (%s); REST calls get 503 until it is", exc.message)
        return
    log.info("pxd responds on %s as node %s", control.path, status.get("node_id"))


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    return stop
