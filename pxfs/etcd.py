"""A trio client for the JSON gateway of etcd v3 (the `/v3/` paths of etcd 3.4).

etcd's own clients speak gRPC. Its gateway accepts the same requests as JSON over HTTP POST, with
bytes fields in base64 and 64-bit integers as decimal strings, and leaves out every field that
has its zero value. This client covers what the catalog needs: ranges, puts, deletes,
transactions, leases and watches.

Every call is bounded by the client's timeout and tries the endpoints in turn, starting with the
one that responded last. A request that never reached a server (connection refused, connect
timeout) always moves on to the next endpoint. A request that was sent but got no reply moves on
only when repeating it is harmless (reads, lease keepalives). For a write, the outcome is then
unknown, so the call raises Unavailable instead of risking a second application.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from pxfs.errors import (
    AuthenticationFailed,
    InternalError,
    InvalidArgument,
    NoSpace,
    NotFound,
    PermissionDenied,
    ProtocolError,
    PxfsError,
    Unavailable,
)

log = logging.getLogger(__name__)

#: Seconds that one call may take in all, over every endpoint it tries.
DEFAULT_TIMEOUT = 5.0
#: Seconds to wait for a TCP connection to one endpoint before trying the next.
DEFAULT_CONNECT_TIMEOUT = 2.0

#: gRPC status codes in the gateway's error bodies, and the pxfs error for each.
_GRPC_ERRORS: dict[int, type[PxfsError]] = {
    1: Unavailable,  # CANCELLED: "the client connection is closing" while etcd shuts down
    3: InvalidArgument,  # INVALID_ARGUMENT, such as a duplicate key in a transaction
    4: Unavailable,  # DEADLINE_EXCEEDED
    5: NotFound,  # NOT_FOUND: an unknown or expired lease
    7: PermissionDenied,  # PERMISSION_DENIED
    8: NoSpace,  # RESOURCE_EXHAUSTED: "mvcc: database space exceeded"
    11: InvalidArgument,  # OUT_OF_RANGE: a compacted or future revision
    14: Unavailable,  # UNAVAILABLE: no leader, or the request timed out inside etcd
    16: AuthenticationFailed,  # UNAUTHENTICATED
}
#: The codes that mean this member cannot serve now, though another member may.
_GRPC_TRY_ANOTHER_MEMBER = {1, 14}
_MAX_LINES_AFTER_CLOSE = 1000


@dataclass(frozen=True)
class KeyValue:
    """One key as etcd stores it, with its revisions and lease."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(frozen=True)
class RangeResult:
    """The keys of a range read and the store revision it was served at."""

    kvs: list[KeyValue]
    revision: int
    count: int
    more: bool


@dataclass(frozen=True)
class PutResult:
    """The store revision after a put, and the previous value when it was requested."""

    revision: int
    prev_kv: KeyValue | None


@dataclass(frozen=True)
class DeleteResult:
    """The number of keys a delete removed, and their values when they were requested."""

    revision: int
    deleted: int
    prev_kvs: list[KeyValue]


OpResult = RangeResult | PutResult | DeleteResult


@dataclass(frozen=True)
class TxnResult:
    """Whether a transaction's comparisons held, and the result of each operation it ran."""

    succeeded: bool
    revision: int
    responses: list[OpResult]


@dataclass(frozen=True)
class Lease:
    """A granted lease, with its id and the TTL in seconds that etcd chose."""

    id: int
    ttl: int


@dataclass(frozen=True)
class WatchEvent:
    """One change that a watch reports: "PUT" or "DELETE", with the key after and before it."""

    type: str
    kv: KeyValue
    prev_kv: KeyValue | None


class RevisionCompacted(NotFound):
    """The error of a watch that requests revisions etcd has already compacted away."""

    def __init__(self, message: str, compact_revision: int) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


@dataclass(frozen=True)
class Compare:
    """One comparison of a transaction: `target` of `key` compared with `value`.

    `target` is "VERSION", "CREATE", "MOD", "VALUE" or "LEASE" (which revision or field of the
    key). `result` is "EQUAL", "NOT_EQUAL", "GREATER" or "LESS".
    """

    key: bytes
    target: str
    result: str
    value: int | bytes

    def to_json(self) -> dict[str, Any]:
        """Encode the comparison for the gateway."""
        fields = {"VERSION": "version", "CREATE": "create_revision", "MOD": "mod_revision"}
        body: dict[str, Any] = {"key": _b64(self.key), "target": self.target}
        body["result"] = self.result
        if self.target == "VALUE":
            assert isinstance(self.value, bytes)
            body["value"] = _b64(self.value)
        elif self.target == "LEASE":
            body["lease"] = str(self.value)
        else:
            body[fields[self.target]] = str(self.value)
        return body


def mod_revision_is(key: bytes, revision: int) -> Compare:
    """Build a comparison that `key` was last modified at `revision` (0 matches a missing key)."""
    return Compare(key, "MOD", "EQUAL", revision)


def key_missing(key: bytes) -> Compare:
    """Build a comparison that `key` does not exist, which etcd tests as create revision 0."""
    return Compare(key, "CREATE", "EQUAL", 0)


def prefix_end(prefix: bytes) -> bytes:
    """Return the range end that selects every key starting with `prefix`."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    # For an empty prefix or one of only 0xff bytes, the range end "\0" makes etcd select every
    # key from the start key on.
    return b"\0"


@dataclass(frozen=True)
class Get:
    """A range read inside a transaction: `key`, or [key, range_end) when range_end is set."""

    key: bytes
    range_end: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        """Encode the operation for the gateway."""
        return {"request_range": _range_body(self.key, self.range_end)}


@dataclass(frozen=True)
class Put:
    """A put inside a transaction, attached to `lease` unless it is 0."""

    key: bytes
    value: bytes
    lease: int = 0

    def to_json(self) -> dict[str, Any]:
        """Encode the operation for the gateway."""
        return {"request_put": _put_body(self.key, self.value, self.lease, False)}


@dataclass(frozen=True)
class Delete:
    """A delete inside a transaction, returning the removed values when `prev_kv` is set."""

    key: bytes
    range_end: bytes | None = None
    prev_kv: bool = False

    def to_json(self) -> dict[str, Any]:
        """Encode the operation for the gateway."""
        return {"request_delete_range": _delete_body(self.key, self.range_end, self.prev_kv)}


Op = Get | Put | Delete


class EtcdClient:
    """A client of one etcd cluster, reached through any of `endpoints` ("http://host:port").

    Use it as an async context manager, or call `aclose` when done.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        self.endpoints = _check_endpoints(endpoints)
        if not timeout > 0 or not connect_timeout > 0:
            raise InvalidArgument(
                f"invalid etcd timeouts {timeout!r}, {connect_timeout!r}: expected seconds > 0"
            )
        self.timeout = timeout
        self.connect_timeout = min(connect_timeout, timeout)
        # Only the connect has an httpx timeout. Each call bounds the rest with a trio deadline
        # over all its attempts, and a watch stream may sit idle while nothing changes.
        http_timeout = httpx.Timeout(None, connect=self.connect_timeout)
        self._http = httpx.AsyncClient(timeout=http_timeout)
        self._preferred = 0

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the client's connections."""
        with trio.CancelScope(shield=True):
            await self._http.aclose()

    async def range(
        self, key: bytes, range_end: bytes | None = None, *, prefix: bool = False, limit: int = 0
    ) -> RangeResult:
        """Read `key`, the keys in [key, range_end), or with `prefix` every key under `key`."""
        if prefix:
            key, range_end = _prefix_range(key)
        body = _range_body(key, range_end)
        if limit:
            body["limit"] = str(limit)
        return _range_result(await self._post("/v3/kv/range", body, idempotent=True))

    async def get(self, key: bytes) -> KeyValue | None:
        """Return `key`, or None if it does not exist."""
        result = await self.range(key)
        return result.kvs[0] if result.kvs else None

    async def put(
        self, key: bytes, value: bytes, *, lease: int = 0, prev_kv: bool = False
    ) -> PutResult:
        """Set `key` to `value`, attached to `lease` unless it is 0."""
        body = _put_body(key, value, lease, prev_kv)
        return _put_result(await self._post("/v3/kv/put", body, idempotent=False))

    async def delete(
        self,
        key: bytes,
        range_end: bytes | None = None,
        *,
        prefix: bool = False,
        prev_kv: bool = False,
    ) -> DeleteResult:
        """Delete `key`, the keys in [key, range_end), or with `prefix` every key under `key`."""
        if prefix:
            key, range_end = _prefix_range(key)
        body = _delete_body(key, range_end, prev_kv)
        reply = await self._post("/v3/kv/deleterange", body, idempotent=False)
        return _delete_result(reply)

    async def txn(
        self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        """Run `success` if every comparison holds, else `failure`, as one atomic step."""
        body = {
            "compare": [item.to_json() for item in compare],
            "success": [op.to_json() for op in success],
            "failure": [op.to_json() for op in failure],
        }
        reads_only = all(isinstance(op, Get) for op in (*success, *failure))
        reply = await self._post("/v3/kv/txn", body, idempotent=reads_only)
        responses = [_op_result(item) for item in reply.get("responses", [])]
        return TxnResult(bool(reply.get("succeeded")), _revision(reply), responses)

    async def lease_grant(self, ttl: int) -> Lease:
        """Grant a lease of `ttl` seconds. etcd may raise the TTL to its minimum."""
        # A grant repeated after a lost reply leaves an extra lease that nothing uses, and
        # etcd drops it once its TTL runs out, so a retry is harmless.
        reply = await self._post("/v3/lease/grant", {"TTL": str(ttl)}, idempotent=True)
        if not reply.get("ID"):
            message = reply.get("error") or f"no lease id in {reply!r:.200}"
            raise Unavailable(f"etcd failed /v3/lease/grant: {message}")
        return Lease(int(reply["ID"]), int(reply.get("TTL", 0)))

    async def lease_keepalive(self, lease_id: int) -> int:
        """Refresh a lease and return its new TTL in seconds, or 0 if it has expired."""
        reply = await self._post("/v3/lease/keepalive", {"ID": str(lease_id)}, idempotent=True)
        result = reply.get("result", {})
        if "error" in reply:
            raise _error_from_body(reply["error"], "/v3/lease/keepalive")
        return int(result.get("TTL", 0))

    async def lease_revoke(self, lease_id: int) -> None:
        """Revoke a lease and delete the keys attached to it. Raises NotFound for an unknown id."""
        await self._post("/v3/lease/revoke", {"ID": str(lease_id)}, idempotent=True)

    @contextlib.asynccontextmanager
    async def watch(
        self,
        key: bytes,
        range_end: bytes | None = None,
        *,
        prefix: bool = False,
        start_revision: int = 0,
        prev_kv: bool = False,
    ) -> AsyncIterator[Watch]:
        """Watch `key` (or a range or prefix) for changes from `start_revision` on.

        The server has created the watch by the time the context manager enters, so every later
        change is delivered. Without `start_revision`, only those later changes are.
        """
        if prefix:
            key, range_end = _prefix_range(key)
        request: dict[str, Any] = {"key": _b64(key)}
        if range_end is not None:
            request["range_end"] = _b64(range_end)
        if start_revision:
            request["start_revision"] = str(start_revision)
        if prev_kv:
            request["prev_kv"] = True
        async with contextlib.AsyncExitStack() as stack:
            endpoint, response = await self._open_stream({"create_request": request})
            watch = Watch(endpoint, response)
            stack.push_async_callback(watch.aclose)
            with trio.move_on_after(self.timeout):
                await watch.wait_created()
            if not watch.watch_created:
                raise Unavailable(
                    f"etcd at {endpoint} did not confirm the watch within {self.timeout:g} s"
                )
            yield watch

    async def _post(self, path: str, body: dict[str, Any], *, idempotent: bool) -> dict[str, Any]:
        tried: list[str] = []
        current = ""
        with trio.move_on_after(self.timeout):
            for index, endpoint in self._endpoint_order():
                current = endpoint
                try:
                    response = await self._http.post(endpoint + path, json=body)
                except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                    tried.append(f"{endpoint} ({_describe(exc)})")
                    continue
                except httpx.TransportError as exc:
                    if not idempotent:
                        raise _unknown_outcome(path, endpoint, _describe(exc)) from None
                    tried.append(f"{endpoint} ({_describe(exc)})")
                    continue
                reply = _decode_reply(response, path, endpoint)
                if reply is None:
                    # etcd reported that it cannot serve now, for example without a leader.
                    # Another member may serve it, but a write that failed this way may still
                    # be applied.
                    if not idempotent:
                        raise _unknown_outcome(path, endpoint, "etcd reported it is unavailable")
                    tried.append(f"{endpoint} (etcd reported it is unavailable)")
                    continue
                self._preferred = index
                return reply
            raise Unavailable(f"etcd is unavailable: {path} failed on {', '.join(tried)}")
        tried.append(f"{current} (no reply)")
        message = (
            f"etcd request {path} timed out after {self.timeout:g} s; tried {', '.join(tried)}"
        )
        if not idempotent:
            message += "; the write may or may not have been applied"
        raise Unavailable(message)

    async def _open_stream(self, body: dict[str, Any]) -> tuple[str, httpx.Response]:
        tried: list[str] = []
        current = ""
        with trio.move_on_after(self.timeout):
            for index, endpoint in self._endpoint_order():
                current = endpoint
                request = self._http.build_request("POST", endpoint + "/v3/watch", json=body)
                try:
                    response = await self._http.send(request, stream=True)
                except httpx.TransportError as exc:
                    tried.append(f"{endpoint} ({_describe(exc)})")
                    continue
                if response.status_code != 200:
                    await response.aread()
                    await response.aclose()
                    raise _error_from_response(response, "/v3/watch", endpoint)
                self._preferred = index
                return endpoint, response
            raise Unavailable(f"etcd is unavailable: /v3/watch failed on {', '.join(tried)}")
        tried.append(f"{current} (no reply)")
        raise Unavailable(
            f"etcd request /v3/watch timed out after {self.timeout:g} s; tried {', '.join(tried)}"
        )

    def _endpoint_order(self) -> list[tuple[int, str]]:
        count = len(self.endpoints)
        order = [(self._preferred + step) % count for step in range(count)]
        return [(index, self.endpoints[index]) for index in order]


class Watch:
    """An open watch stream, which yields its events in revision order.

    Iteration raises Unavailable when the stream breaks, and RevisionCompacted when etcd no
    longer has the requested revisions. `revision` is the store revision up to which every
    change has been delivered, so a new watch from `revision + 1` misses nothing.
    """

    def __init__(self, endpoint: str, response: httpx.Response) -> None:
        self.endpoint = endpoint
        self.watch_id = 0
        self.watch_created = False
        self.revision = 0
        self._response = response
        self._lines = response.aiter_lines()
        self._pending: list[WatchEvent] = []

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> WatchEvent:
        while not self._pending:
            self._pending = await self._next_events()
        return self._pending.pop(0)

    async def aclose(self) -> None:
        """Close the stream's connection, which ends the watch on the server too."""
        with trio.CancelScope(shield=True):
            await self._response.aclose()
            # aiter_lines sits on four nested httpx generators, and closing the outer one
            # leaves the inner ones open until garbage collection, where trio warns about
            # each. Reading from the closed stream raises through all of them, which ends
            # them in order. The bound only guards against lines still in httpx's buffer.
            for _ in range(_MAX_LINES_AFTER_CLOSE):
                try:
                    await anext(self._lines)
                except (StopAsyncIteration, httpx.HTTPError, httpx.StreamError):
                    return

    async def wait_created(self) -> None:
        """Wait for etcd's confirmation that the watch exists."""
        result = await self._next_result()
        if not result.get("created"):
            raise ProtocolError(f"etcd at {self.endpoint} did not confirm the watch: {result!r}")
        self.watch_id = int(result.get("watch_id", 0))
        self.watch_created = True
        # Compaction may already cancel the watch in the next message, which iteration reports.

    async def _next_events(self) -> list[WatchEvent]:
        result = await self._next_result()
        if result.get("canceled"):
            compact_revision = int(result.get("compact_revision", 0))
            if compact_revision:
                raise RevisionCompacted(
                    f"etcd has compacted the revisions this watch asked for; the oldest left "
                    f"is {compact_revision}, so read the keys again and watch from there",
                    compact_revision,
                )
            reason = result.get("cancel_reason") or "no reason given"
            raise Unavailable(f"etcd at {self.endpoint} canceled the watch: {reason}")
        events = [_watch_event(item) for item in result.get("events", [])]
        # While a watch catches up on old revisions, etcd sends them in batches whose header
        # carries the current store revision (syncWatchers in etcd's mvcc/watchable_store.go),
        # so only the events show how far delivery has come. A response without events is
        # up to date.
        if events:
            self.revision = max(self.revision, events[-1].kv.mod_revision)
        else:
            self.revision = max(self.revision, _revision(result))
        return events

    async def _next_result(self) -> dict[str, Any]:
        try:
            line = await anext(self._lines)
        except StopAsyncIteration:
            raise self._broken("the server closed it") from None
        except httpx.TransportError as exc:
            raise self._broken(_describe(exc)) from None
        try:
            message = json.loads(line)
        except ValueError:
            raise ProtocolError(
                f"etcd at {self.endpoint} sent invalid JSON: {line!r:.200}"
            ) from None
        if "error" in message:
            error = _error_from_body(message["error"], "/v3/watch")
            if isinstance(error, Unavailable):
                raise self._broken(error.message)
            raise error
        result = message.get("result")
        if not isinstance(result, dict):
            raise ProtocolError(f"etcd at {self.endpoint} sent no watch result: {line!r:.200}")
        return result

    def _broken(self, reason: str) -> Unavailable:
        return Unavailable(
            f"etcd watch stream from {self.endpoint} broke ({reason}); "
            f"watch again from revision {self.revision + 1}"
        )


def _prefix_range(prefix: bytes) -> tuple[bytes, bytes]:
    # etcd rejects an empty key, so an empty prefix becomes the range of every key from "\0" on.
    return (prefix or b"\0"), prefix_end(prefix)


def _check_endpoints(endpoints: Sequence[str]) -> list[str]:
    if isinstance(endpoints, str) or not endpoints:
        raise InvalidArgument(f"invalid etcd endpoints {endpoints!r}: expected a list of URLs")
    checked = []
    for endpoint in endpoints:
        if not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
            raise InvalidArgument(
                f"invalid etcd endpoint {endpoint!r}: expected a URL such as http://127.0.0.1:2379"
            )
        checked.append(endpoint.rstrip("/"))
    return checked


def _decode_reply(response: httpx.Response, path: str, endpoint: str) -> dict[str, Any] | None:
    """Return the JSON body of a success, or None when another member may serve it.

    Raises the matching PxfsError for any other failure.
    """
    if response.status_code == 200:
        try:
            reply = response.json()
        except ValueError:
            raise ProtocolError(
                f"etcd at {endpoint} sent invalid JSON for {path}: {response.text!r:.200}"
            ) from None
        if not isinstance(reply, dict):
            raise ProtocolError(f"etcd at {endpoint} sent {reply!r:.200} for {path}")
        return reply
    error = _error_from_response(response, path, endpoint)
    if _grpc_code(response) in _GRPC_TRY_ANOTHER_MEMBER:
        log.warning("etcd at %s: %s", endpoint, error.message)
        return None
    raise error


def _grpc_code(response: httpx.Response) -> int | None:
    try:
        body = response.json()
    except ValueError:
        return None
    code = body.get("code") if isinstance(body, dict) else None
    return code if isinstance(code, int) else None


def _error_from_response(response: httpx.Response, path: str, endpoint: str) -> PxfsError:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("code"), int):
        return ProtocolError(
            f"etcd at {endpoint} returned HTTP {response.status_code} for {path}: "
            f"{response.text!r:.200}"
        )
    return _error_from_body(body, path)


def _error_from_body(body: dict[str, Any], path: str) -> PxfsError:
    # Unary calls report {"code": ..., "message": ...}. Streams report their error as
    # {"grpc_code": ..., "http_code": ..., "message": ...}.
    code = body.get("code", body.get("grpc_code"))
    message = body.get("message") or body.get("error") or "no message"
    cls = _GRPC_ERRORS.get(code, InternalError) if isinstance(code, int) else InternalError
    if cls is InternalError:
        log.error("etcd failed %s with gRPC code %r: %s", path, code, message)
    return cls(f"etcd failed {path}: {message}")


def _unknown_outcome(path: str, endpoint: str, reason: str) -> Unavailable:
    return Unavailable(
        f"etcd at {endpoint} sent no response to {path} ({reason}); "
        "the write may or may not have been applied"
    )


def _describe(exc: httpx.TransportError) -> str:
    return str(exc) or type(exc).__name__


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def _revision(reply: dict[str, Any]) -> int:
    return int(reply.get("header", {}).get("revision", 0))


def _range_body(key: bytes, range_end: bytes | None) -> dict[str, Any]:
    body = {"key": _b64(key)}
    if range_end is not None:
        body["range_end"] = _b64(range_end)
    return body


def _put_body(key: bytes, value: bytes, lease: int, prev_kv: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease:
        body["lease"] = str(lease)
    if prev_kv:
        body["prev_kv"] = True
    return body


def _delete_body(key: bytes, range_end: bytes | None, prev_kv: bool) -> dict[str, Any]:
    body: dict[str, Any] = _range_body(key, range_end)
    if prev_kv:
        body["prev_kv"] = True
    return body


def _key_value(item: dict[str, Any]) -> KeyValue:
    return KeyValue(
        key=_unb64(item.get("key")),
        value=_unb64(item.get("value")),
        create_revision=int(item.get("create_revision", 0)),
        mod_revision=int(item.get("mod_revision", 0)),
        version=int(item.get("version", 0)),
        lease=int(item.get("lease", 0)),
    )


def _range_result(reply: dict[str, Any]) -> RangeResult:
    kvs = [_key_value(item) for item in reply.get("kvs", [])]
    count = int(reply.get("count", 0))
    return RangeResult(kvs, _revision(reply), count, bool(reply.get("more")))


def _put_result(reply: dict[str, Any]) -> PutResult:
    prev = reply.get("prev_kv")
    return PutResult(_revision(reply), _key_value(prev) if prev else None)


def _delete_result(reply: dict[str, Any]) -> DeleteResult:
    prev_kvs = [_key_value(item) for item in reply.get("prev_kvs", [])]
    return DeleteResult(_revision(reply), int(reply.get("deleted", 0)), prev_kvs)


def _op_result(item: dict[str, Any]) -> OpResult:
    if "response_range" in item:
        return _range_result(item["response_range"])
    if "response_put" in item:
        return _put_result(item["response_put"])
    if "response_delete_range" in item:
        return _delete_result(item["response_delete_range"])
    raise ProtocolError(f"etcd sent an unknown transaction response: {item!r:.200}")


def _watch_event(item: dict[str, Any]) -> WatchEvent:
    prev = item.get("prev_kv")
    # The gateway leaves out the type of a PUT event, because PUT is the enum's zero value.
    return WatchEvent(
        item.get("type", "PUT"), _key_value(item["kv"]), _key_value(prev) if prev else None
    )
