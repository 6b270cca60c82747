"""The sidecar's aiohttp applications and the server loop.

Two applications share one control connection to pxd: the REST API on TCP, with its error
middleware, bearer token, request and body limits and Prometheus /metrics, and Docker's volume
plugin protocol on a unix socket that only root may use. Both listeners bound their open
connections (pxfs.api.server).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import signal
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from aiohttp import web

from pxfs import errors
from pxfs.api import auth, docker, metrics, rest, server
from pxfs.api.control import ControlClient
from pxfs.api.dockerrefs import RefStore
from pxfs.api.server import ConnectionGate, ConnectionLimits, SidecarRunner
from pxfs.config import Config

log = logging.getLogger(__name__)

#: Largest request body accepted, in bytes. OSD request bodies are a few hundred bytes; larger
#: ones get 413 before any of them is parsed.
MAX_BODY = 256 * 1024

#: Seconds in the Retry-After header of a 503, sent when pxd is down, restarting or too slow.
RETRY_AFTER = 1

INCOMPLETE_BODY = "request body is incomplete: the client closed the connection"

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

#: Seconds to wait at start-up for pxd's first reply before serving without it.
_PROBE_TIMEOUT = 10.0

#: Seconds that a connection may stay open without a request, before its first request
#: included: aiohttp's own default of an hour would let idle clients keep their places at the
#: connection bounds that long.
IDLE_TIMEOUT = 75.0

#: Seconds between two warnings about the same server-side error.
_WARNING_INTERVAL = 60.0
_MAX_WARNING_KEYS = 256
_last_warning: dict[tuple[type[errors.PxfsError], str], float] = {}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RequestLimit:
    """The count of REST requests in flight and its bound."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.in_flight = 0


TOKEN: web.AppKey[auth.BearerToken | None] = web.AppKey("token")
TOKEN_WARNING: web.AppKey[server.RepeatedWarning] = web.AppKey(
    "token_warning", server.RepeatedWarning
)
REQUESTS: web.AppKey[RequestLimit] = web.AppKey("requests", RequestLimit)


def make_app(
    control: ControlClient,
    *,
    max_body: int = MAX_BODY,
    scrape_timeout: float = metrics.DEFAULT_SCRAPE_TIMEOUT,
    token: auth.BearerToken | None = None,
    max_requests: int = Config.rest_max_requests,
) -> web.Application:
    """Build the REST application that calls pxd through `control` and closes it at cleanup.

    `scrape_timeout` is how many seconds a /metrics scrape waits for pxd. With `token`, every
    request must carry it as a bearer token. At most `max_requests` requests run at once.
    """
    middlewares = [error_middleware, token_middleware, request_limit_middleware]
    app = web.Application(
        middlewares=[*middlewares, body_limit_middleware], client_max_size=max_body
    )
    app[TOKEN] = token
    app[TOKEN_WARNING] = server.RepeatedWarning(log)
    app[REQUESTS] = RequestLimit(max_requests)
    app[rest.CONTROL] = control
    app[metrics.SCRAPE_TIMEOUT] = scrape_timeout
    app.add_routes(rest.routes)
    app.add_routes(metrics.routes)
    app.on_cleanup.append(_close_control)
    return app


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Translate PxfsError into plain-text error replies and log unexpected exceptions."""
    started = time.monotonic()
    try:
        response = await handler(request)
    except errors.PxfsError as exc:
        _log_failure(request, exc)
        response = plain_error(exc.message, exc.http_status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _http_error(request, exc)
    except ConnectionResetError:
        # aiohttp raises this from request.read() when the client hangs up before the end of
        # the body; nobody reads the reply, but the request must not count as a server fault.
        log.debug("%s %s: the client closed the connection mid-request", request.method,
                  request.path_qs)  # fmt: skip
        response = plain_error(INCOMPLETE_BODY, 400)
    except Exception:
        log.exception("%s %s failed", request.method, request.path_qs)
        response = plain_error("internal error; the pxd-sidecar log has the details", 500)
    elapsed_ms = (time.monotonic() - started) * 1000
    log.debug("%s %s -> %d (%.1f ms)", request.method, request.path_qs, response.status, elapsed_ms)
    return response


@web.middleware
async def token_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Reply 401 to a request without the bearer token and 403 to one with another token."""
    token = request.app[TOKEN]
    if token is None:
        return await handler(request)
    failure = auth.check_authorization(request.headers.get("Authorization"), token)
    if failure is None:
        return await handler(request)
    status, message = failure
    if status == 403:
        # The client's address only: the header would give away a credential.
        request.app[TOKEN_WARNING].warning(
            "rejected a request with an invalid bearer token from %s", request.remote
        )
    response = plain_error(message, status)
    if status == 401:
        response.headers["WWW-Authenticate"] = auth.CHALLENGE
    if request.body_exists:
        # The body stays unread, so the connection cannot carry another request.
        response.force_close()
    return response


@web.middleware
async def request_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Reply 503 with Retry-After when the bound on requests in flight is reached."""
    limit = request.app[REQUESTS]
    if limit.in_flight >= limit.maximum:
        raise errors.Unavailable(
            f"the sidecar is busy: {limit.in_flight} requests are in flight, the maximum "
            "(rest_max_requests); retry later"
        )
    limit.in_flight += 1
    try:
        return await handler(request)
    finally:
        limit.in_flight -= 1


@web.middleware
async def body_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Reply 413 from the Content-Length header alone when it is over the body limit.

    aiohttp checks the limit only while it reads the body, so a client that announces a large
    body and sends a few bytes would hold the request until it gives up.
    """
    error = server.oversized_body(request)
    if error is None:
        return await handler(request)
    log.debug("%s %s failed: %s", request.method, request.path_qs, error)
    response = plain_error(error, 413)
    # The body stays unread, so the connection cannot carry another request.
    response.force_close()
    return response


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    """Turn an error that aiohttp raised into the plain-text shape of every other hard error."""
    if exc.status == 404 and request.match_info.http_exception is not None:
        # The router found no route, so reply with the text of Go's net/http.
        message = "404 page not found"
    elif exc.status == 405:
        message = "405 method not allowed"
    elif exc.status == 413:
        message = f"request body is too large: {exc.text}"
    else:
        message = exc.text or f"{exc.status} {exc.reason}"
    log.debug("%s %s failed: %s", request.method, request.path_qs, message)
    response = plain_error(message, exc.status)
    if "Allow" in exc.headers:
        response.headers["Allow"] = exc.headers["Allow"]
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
    """Build an error reply in the shape of Go's http.Error: the message and a newline.

    A 503 carries Retry-After, because openstorage's Go client retries only a 503 that has it.
    """
    response = web.Response(status=status, text=message + "\n")
    if status == 503:
        response.headers["Retry-After"] = str(RETRY_AFTER)
    return response


async def _close_control(app: web.Application) -> None:
    await app[rest.CONTROL].close()


def make_plugin_app(plugin: docker.DockerPlugin, *, max_body: int = MAX_BODY) -> web.Application:
    """Build the Docker volume plugin application; the caller closes the plugin's control."""
    app = web.Application(client_max_size=max_body)
    app[docker.PLUGIN] = plugin
    docker.add_routes(app)
    return app


@dataclass(frozen=True)
class SidecarSettings:
    """The sidecar's sockets, listeners, Docker state, REST bearer token and bounds.

    `token` None means that REST requires no token. The bounds on connections and requests
    default to those of pxfs.config.Config.
    """

    control_socket: str
    host: str
    port: int
    plugin_socket: str
    mount_base: str = str(docker.DEFAULT_MOUNT_BASE)
    state_dir: str = str(docker.DEFAULT_STATE_DIR)
    token: auth.BearerToken | None = None
    rest_limits: ConnectionLimits = ConnectionLimits(
        Config.rest_max_connections, Config.rest_max_connections_per_client
    )
    max_requests: int = Config.rest_max_requests
    plugin_limits: ConnectionLimits = ConnectionLimits(Config.plugin_max_connections)
    #: The mode of the plugin socket and the gid it gets (None: root's group).
    plugin_mode: int = 0o600
    plugin_group: int | None = None


async def run_sidecar(
    settings: SidecarSettings, *, notify: Callable[[str], object] | None = None
) -> int:
    """Serve the REST API and the Docker plugin until SIGINT or SIGTERM; return the exit code.

    `notify`, when given, is called with "READY=1" once the REST port and the plugin socket
    listen and with "STOPPING=1" when a signal starts the shutdown (the sd_notify states).
    """
    stop = _stop_on_signals()
    refs = RefStore.load(Path(settings.state_dir) / docker.REFS_FILE)
    control = ControlClient(settings.control_socket)
    plugin = docker.DockerPlugin(control, Path(settings.mount_base), refs)
    rest_app = make_app(control, token=settings.token, max_requests=settings.max_requests)
    runner = SidecarRunner(
        rest_app,
        gate=ConnectionGate("REST API", settings.rest_limits),
        access_log=None,
        handle_signals=False,
        keepalive_timeout=IDLE_TIMEOUT,
    )
    plugin_runner = SidecarRunner(
        make_plugin_app(plugin),
        gate=ConnectionGate("Docker plugin socket", settings.plugin_limits),
        access_log=None,
        handle_signals=False,
        keepalive_timeout=IDLE_TIMEOUT,
    )
    await runner.setup()
    await plugin_runner.setup()
    plugin_socket: _PluginSocket | None = None
    try:
        await _start_site(runner, settings.host, settings.port, settings.token is not None)
        plugin_socket = await _start_plugin_site(
            plugin_runner,
            Path(settings.plugin_socket),
            mode=settings.plugin_mode,
            group=settings.plugin_group,
        )
        if notify is not None:
            notify("READY=1")
        await _log_pxd(control)
        await stop.wait()
        log.info("stopping")
        if notify is not None:
            notify("STOPPING=1")
    finally:
        await plugin_runner.cleanup()
        if plugin_socket is not None:
            plugin_socket.remove()
        await runner.cleanup()
    return 0


async def _start_site(runner: web.AppRunner, host: str, port: int, with_token: bool) -> None:
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        raise errors.Unavailable(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    access = "a bearer token" if with_token else "no token"
    log.info("REST API listening on http://%s:%d, requiring %s", host, port, access)


@dataclass(frozen=True)
class _PluginSocket:
    """The plugin socket this sidecar bound, identified so that shutdown removes only its own."""

    path: Path
    device: int
    inode: int

    def remove(self) -> None:
        """Remove the socket file unless another process has replaced it meanwhile."""
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (info.st_dev, info.st_ino) == (self.device, self.inode):
            self.path.unlink()


async def _start_plugin_site(
    runner: web.AppRunner, path: Path, *, mode: int, group: int | None
) -> _PluginSocket:
    sock = _bind_plugin_socket(path, mode=mode, group=group)
    site = web.SockSite(runner, sock)
    await site.start()
    info = os.lstat(path)
    log.info("Docker volume plugin %s listening on %s", docker.DRIVER_NAME, path)
    return _PluginSocket(path, info.st_dev, info.st_ino)


def _bind_plugin_socket(
    path: Path, *, mode: int = 0o600, group: int | None = None
) -> socket.socket:
    """Bind a unix socket at `path` with `mode` and `group`, replacing a stale socket file."""
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        _remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Bound under a temporary name and renamed once it has its mode and group, so that no
        # other user ever sees the socket with the default mode.
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        try:
            sock.bind(str(temporary))
            os.chmod(temporary, 0o600)
            if group is not None:
                os.chown(temporary, -1, group)
            os.chmod(temporary, mode)
            os.rename(temporary, path)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
    except OSError as exc:
        raise errors.Unavailable(
            f"cannot listen on the plugin socket {path}: {exc.strerror or exc}"
        ) from None
    sock.listen(128)
    return sock


def _remove_stale_socket(path: Path) -> None:
    """Unlink a socket file that nobody listens on; raise Busy when a server owns it."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise errors.Unavailable(f"cannot listen on {path}: it exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            log.info("removing the stale plugin socket %s", path)
            path.unlink()
            return
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
            return
    raise errors.Busy(f"cannot listen on {path}: another process serves it")


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
    """Set the returned event at the first SIGINT or SIGTERM, and ignore the signals after it.

    Ctrl-C sends SIGINT to the whole process group and a supervisor may send SIGTERM right
    after it, so a second signal must not kill the sidecar while it shuts down. The handlers
    are not loop.add_signal_handler, because loop.close() restores the default actions. The
    first signal blocks both in the main thread, because interpreter shutdown also restores
    them, and a blocked signal stays pending until the process exits.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if stopping:
            # A signal that arrived before the mask was set, or in a worker thread.
            return
        stopping = True
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        # Python runs this handler in the main thread between bytecodes, maybe inside a loop
        # callback, so it only schedules the stop.
        loop.call_soon_threadsafe(stop.set)

    for signum in _STOP_SIGNALS:
        signal.signal(signum, on_signal)
    return stop
