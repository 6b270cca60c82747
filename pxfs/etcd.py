"""A trio client for the JSON gateway of etcd v3 (the `/v3/` paths of etcd 3.4).

etcd's own clients speak gRPC. Its gateway accepts the same requests as JSON over HTTP POST.
pxfs/etcdmessages.py encodes the requests and decodes the replies, and pxfs/etcdwatch.py reads
the stream of a watch. This client covers what the catalog needs: ranges, puts, deletes,
transactions, leases and watches.

Every call is bounded by the client's timeout and tries the endpoints in turn, starting with the
one that responded last. A request that never reached a server (connection refused, connect
timeout) always moves on to the next endpoint. A request that was sent but got no reply moves on
only when repeating it is harmless (reads, lease keepalives). For a write, the outcome is then
unknown, so the call raises Unavailable instead of risking a second application.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import trio

from pxfs.errors import InvalidArgument, Unavailable
from pxfs.etcdmessages import (
    Compare,
    DeleteResult,
    Get,
    KeyValue,
    Lease,
    Op,
    PutResult,
    RangeResult,
    TxnResult,
    decode_delete_response,
    decode_put_response,
    decode_range_response,
    decode_reply,
    decode_txn_response,
    describe_transport_error,
    encode_delete_request,
    encode_put_request,
    encode_range_request,
    error_from_body,
    error_from_response,
    prefix_range,
)
from pxfs.etcdwatch import Watch, encode_create_request

#: Seconds that one call may take in all, over every endpoint it tries.
DEFAULT_TIMEOUT = 5.0
#: Seconds to wait for a TCP connection to one endpoint before trying the next.
DEFAULT_CONNECT_TIMEOUT = 2.0


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
            key, range_end = prefix_range(key)
        body = encode_range_request(key, range_end)
        if limit:
            body["limit"] = str(limit)
        return decode_range_response(await self._post("/v3/kv/range", body, idempotent=True))

    async def get(self, key: bytes) -> KeyValue | None:
        """Return `key`, or None if it does not exist."""
        result = await self.range(key)
        return result.kvs[0] if result.kvs else None

    async def put(
        self, key: bytes, value: bytes, *, lease: int = 0, prev_kv: bool = False
    ) -> PutResult:
        """Set `key` to `value`, attached to `lease` unless it is 0."""
        body = encode_put_request(key, value, lease, prev_kv)
        return decode_put_response(await self._post("/v3/kv/put", body, idempotent=False))

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
            key, range_end = prefix_range(key)
        body = encode_delete_request(key, range_end, prev_kv)
        reply = await self._post("/v3/kv/deleterange", body, idempotent=False)
        return decode_delete_response(reply)

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
        return decode_txn_response(reply)

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
            raise error_from_body(reply["error"], "/v3/lease/keepalive")
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
            key, range_end = prefix_range(key)
        body = encode_create_request(key, range_end, start_revision, prev_kv)
        async with contextlib.AsyncExitStack() as stack:
            endpoint, response = await self._open_stream(body)
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
                    tried.append(f"{endpoint} ({describe_transport_error(exc)})")
                    continue
                except httpx.TransportError as exc:
                    if not idempotent:
                        raise _unknown_outcome(
                            path, endpoint, describe_transport_error(exc)
                        ) from None
                    tried.append(f"{endpoint} ({describe_transport_error(exc)})")
                    continue
                reply = decode_reply(response, path, endpoint)
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
                    tried.append(f"{endpoint} ({describe_transport_error(exc)})")
                    continue
                if response.status_code != 200:
                    await response.aread()
                    await response.aclose()
                    raise error_from_response(response, "/v3/watch", endpoint)
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


def _unknown_outcome(path: str, endpoint: str, reason: str) -> Unavailable:
    return Unavailable(
        f"etcd at {endpoint} sent no response to {path} ({reason}); "
        "the write may or may not have been applied"
    )
