"""A watch of etcd v3's JSON gateway: its create request, its stream of events, compaction.

The gateway streams a watch as the reply to one POST to /v3/watch, one JSON message per line.
`EtcdClient.watch` (pxfs/etcd.py) opens the stream on one of its endpoints and hands it to Watch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from pxfs.errors import NotFound, ProtocolError, Unavailable
from pxfs.etcdmessages import (
    KeyValue,
    decode_key_value,
    decode_revision,
    describe_transport_error,
    encode_range_request,
    error_from_body,
)

_MAX_LINES_AFTER_CLOSE = 1000


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


def encode_create_request(
    key: bytes, range_end: bytes | None, start_revision: int, prev_kv: bool
) -> dict[str, Any]:
    """Encode the WatchCreateRequest of `key`, or of [key, range_end) when range_end is set."""
    request = encode_range_request(key, range_end)
    if start_revision:
        request["start_revision"] = str(start_revision)
    if prev_kv:
        request["prev_kv"] = True
    return {"create_request": request}


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
        events = [_decode_event(item) for item in result.get("events", [])]
        # While a watch catches up on old revisions, etcd sends them in batches whose header
        # carries the current store revision (syncWatchers in etcd's mvcc/watchable_store.go),
        # so only the events show how far delivery has come. A response without events is
        # up to date.
        if events:
            self.revision = max(self.revision, events[-1].kv.mod_revision)
        else:
            self.revision = max(self.revision, decode_revision(result))
        return events

    async def _next_result(self) -> dict[str, Any]:
        try:
            line = await anext(self._lines)
        except StopAsyncIteration:
            raise self._broken("the server closed it") from None
        except httpx.TransportError as exc:
            raise self._broken(describe_transport_error(exc)) from None
        try:
            message = json.loads(line)
        except ValueError:
            raise ProtocolError(
                f"etcd at {self.endpoint} sent invalid JSON: {line!r:.200}"
            ) from None
        if "error" in message:
            error = error_from_body(message["error"], "/v3/watch")
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


def _decode_event(item: dict[str, Any]) -> WatchEvent:
    prev = item.get("prev_kv")
    # The gateway leaves out the type of a PUT event, because PUT is the enum's zero value.
    return WatchEvent(
        item.get("type", "PUT"),
        decode_key_value(item["kv"]),
        decode_key_value(prev) if prev else None,
    )
