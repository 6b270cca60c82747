"""An asyncio client of pxd's control socket, for the sidecar.

It speaks the frames of pxfs.frames over one unix-socket connection and multiplexes concurrent
calls on it. The connection opens on the first call and again on the next call after pxd
closes it, so the sidecar may start before pxd and outlive a pxd restart.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from pxfs import errors, frames

log = logging.getLogger(__name__)

#: Seconds that a read-only call may take. These return what pxd has in memory or in its
#: catalog, so a pxd that needs longer is hung, and the client should get the 503 soon rather
#: than give up on a timeout of its own.
READ_TIMEOUT = 10.0
#: Seconds that any other call may take. volume.create formats the new volume, volume.attach
#: and volume.mount start a mount child, and volume.update may grow a volume.
OPERATION_TIMEOUT = 60.0
#: The calls that only read state, which get READ_TIMEOUT.
READ_METHODS = frozenset(
    {
        "node.status",
        "cluster.nodes",
        "volume.inspect",
        "volume.list",
        "volume.stats",
        "volume.stats_live",
        "volume.stats_history",
    }
)
_READ_SIZE = 1024 * 1024


class NewVolume(Protocol):
    """A parsed Create request of the REST API or of the Docker plugin."""

    @property
    def name(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def ha_level(self) -> int: ...
    @property
    def labels(self) -> Mapping[str, str]: ...
    @property
    def nodes(self) -> Sequence[str] | None: ...


def volume_create_argument(volume: NewVolume) -> dict[str, Any]:
    """Build the argument of pxd's volume.create from a parsed Create request.

    The argument gets its own copies of the labels and nodes, so a change to it leaves the
    request unchanged. Without nodes in the request it has no `nodes` key, and pxd places
    the replicas.
    """
    argument: dict[str, Any] = {
        "name": volume.name,
        "size": volume.size,
        "ha_level": volume.ha_level,
        "labels": dict(volume.labels),
    }
    if volume.nodes is not None:
        argument["nodes"] = list(volume.nodes)
    return argument


class _Connection:
    """One open connection: its writer, a reader task and the replies still expected."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str
    ) -> None:
        self.writer = writer
        self.path = path
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.closed = False
        self.task = asyncio.get_running_loop().create_task(self._read_replies(reader))

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        decoder = frames.FrameDecoder()
        failure: errors.PxfsError = errors.Unavailable(f"pxd closed the connection on {self.path}")
        try:
            while data := await reader.read(_READ_SIZE):
                for message in decoder.feed(data):
                    self._deliver(message)
        except errors.ProtocolError as exc:
            # The stream cannot be resynchronised after a broken frame, so the connection goes
            # and the next call opens a new one.
            log.warning("dropping the connection to pxd on %s: %s", self.path, exc.message)
            failure = errors.Unavailable(f"pxd on {self.path} sent an invalid frame: {exc.message}")
        except OSError as exc:
            failure = errors.Unavailable(f"connection to pxd on {self.path} failed: {exc}")
        except Exception as exc:
            log.exception("reading replies from pxd on %s failed", self.path)
            failure = errors.InternalError(f"reading replies from pxd failed: {exc}")
        finally:
            self.fail(failure)

    def _deliver(self, message: Any) -> None:
        if not (isinstance(message, list) and len(message) == 4 and message[0] == frames.REPLY):
            raise errors.ProtocolError("pxd sent a frame that is not a reply")
        future = self.pending.pop(message[1], None)
        if future is None or future.done():
            # The caller gave up (timeout or cancellation) before the reply came.
            return
        if message[2] is not None:
            future.set_exception(frames.error_from_payload(message[2]))
        else:
            future.set_result(message[3])

    def fail(self, error: errors.PxfsError) -> None:
        """Close the connection and fail every call still waiting with `error`."""
        self.closed = True
        self.writer.close()
        pending, self.pending = self.pending, {}
        for future in pending.values():
            if not future.done():
                # A fresh instance per caller, so that no two tasks raise one exception object.
                future.set_exception(type(error)(error.message))


class ControlClient:
    """Call pxd's control RPC methods from asyncio; raises the PxfsError that pxd sent."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        read_timeout: float = READ_TIMEOUT,
        operation_timeout: float = OPERATION_TIMEOUT,
    ) -> None:
        self.path = os.fspath(path)
        self.read_timeout = read_timeout
        self.operation_timeout = operation_timeout
        self._ids = itertools.count(1)
        self._connection: _Connection | None = None
        self._connect_lock = asyncio.Lock()

    def timeout(self, method: str) -> float:
        """Return the seconds that a call of `method` may take before it fails with 503."""
        return self.read_timeout if method in READ_METHODS else self.operation_timeout

    async def call(self, method: str, *args: Any) -> Any:
        """Call `method` with `args` and return its result; raises Unavailable on timeout."""
        timeout = self.timeout(method)
        connection = await self._connected()
        request_id = next(self._ids)
        frame = frames.encode_frame([frames.REQUEST, request_id, method, list(args)])
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        connection.pending[request_id] = future
        try:
            connection.writer.write(frame)
            await connection.writer.drain()
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise errors.Unavailable(
                f"pxd did not respond to {method} within {timeout:g} s"
            ) from None
        except (ConnectionError, BrokenPipeError) as exc:
            connection.fail(errors.Unavailable(f"connection to pxd on {self.path} lost"))
            raise errors.Unavailable(f"connection to pxd on {self.path} lost: {exc}") from None
        finally:
            connection.pending.pop(request_id, None)
            future.cancel()

    async def _connected(self) -> _Connection:
        async with self._connect_lock:
            if self._connection is None or self._connection.closed:
                reader, writer = await self._open()
                self._connection = _Connection(reader, writer, self.path)
                log.info("connected to pxd on %s", self.path)
            return self._connection

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.open_unix_connection(self.path, limit=_READ_SIZE)
        except FileNotFoundError:
            raise errors.Unavailable(f"pxd is not running: no socket at {self.path}") from None
        except ConnectionRefusedError:
            raise errors.Unavailable(
                f"pxd is not running: {self.path} refuses connections"
            ) from None
        except PermissionError:
            raise errors.PermissionDenied(
                f"permission denied on {self.path}: run as root or as a member of its group"
            ) from None
        except OSError as exc:
            raise errors.Unavailable(f"cannot connect to pxd on {self.path}: {exc}") from None

    async def close(self) -> None:
        """Close the connection; calls still waiting fail with Unavailable."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        connection.fail(errors.Unavailable(f"connection to pxd on {self.path} closed"))
        connection.task.cancel()
        # asyncio.wait neither raises the task's own cancellation nor hides a cancellation of
        # this call.
        await asyncio.wait([connection.task])
        try:
            await connection.writer.wait_closed()
        except OSError:
            pass
