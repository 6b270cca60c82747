"""EtcdClient against a real etcd: keys, transactions, leases, watches, endpoints and outages."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator

import httpx
import pytest
import trio
from etcdproc import EtcdProcess, free_port

from pxfs.errors import InvalidArgument, NotFound, ProtocolError, Unavailable
from pxfs.etcd import EtcdClient
from pxfs.etcdmessages import (
    Compare,
    Delete,
    Get,
    Put,
    PutResult,
    RangeResult,
    key_missing,
    mod_revision_is,
    prefix_end,
)
from pxfs.etcdwatch import RevisionCompacted

TIMEOUT = 2.0


@pytest.fixture
async def client(
    shared_etcd: EtcdProcess, request: pytest.FixtureRequest
) -> AsyncIterator[EtcdClient]:
    async with EtcdClient([shared_etcd.endpoint], timeout=TIMEOUT) as opened:
        # Each test works under a prefix of its own in the shared etcd.
        await opened.delete(_prefix(request), prefix=True)
        yield opened


def _prefix(request: pytest.FixtureRequest) -> bytes:
    return f"/test/{request.node.name}/".encode()


def test_prefix_end() -> None:
    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\0"


@pytest.mark.parametrize("endpoints", [[], "http://127.0.0.1:2379", ["127.0.0.1:2379"], [None]])
def test_client_rejects_bad_endpoints(endpoints: object) -> None:
    with pytest.raises(InvalidArgument, match="invalid etcd endpoint"):
        EtcdClient(endpoints)  # type: ignore[arg-type]


def test_client_rejects_bad_timeout() -> None:
    with pytest.raises(InvalidArgument, match="expected seconds > 0"):
        EtcdClient(["http://127.0.0.1:1"], timeout=0)


async def test_put_get_range_delete(client: EtcdClient, request: pytest.FixtureRequest) -> None:
    base = _prefix(request)
    assert await client.get(base + b"missing") is None

    first = await client.put(base + b"a", b"1")
    await client.put(base + b"b", b"2")
    kv = await client.get(base + b"a")
    assert kv is not None
    assert kv.value == b"1"
    assert kv.mod_revision == first.revision
    assert kv.create_revision == first.revision
    assert kv.version == 1

    second = await client.put(base + b"a", b"3", prev_kv=True)
    assert second.prev_kv is not None
    assert second.prev_kv.value == b"1"
    result = await client.range(base, prefix=True)
    assert [(item.key, item.value) for item in result.kvs] == [
        (base + b"a", b"3"),
        (base + b"b", b"2"),
    ]
    assert result.count == 2
    assert result.revision >= second.revision

    deleted = await client.delete(base, prefix=True, prev_kv=True)
    assert deleted.deleted == 2
    assert sorted(item.value for item in deleted.prev_kvs) == [b"2", b"3"]
    assert (await client.range(base, prefix=True)).kvs == []


async def test_range_limit_reports_more(client: EtcdClient, request: pytest.FixtureRequest) -> None:
    base = _prefix(request)
    for index in range(5):
        await client.put(base + str(index).encode(), b"")
    result = await client.range(base, prefix=True, limit=2)
    assert len(result.kvs) == 2
    assert result.count == 5
    assert result.more


async def test_binary_keys_and_values(client: EtcdClient, request: pytest.FixtureRequest) -> None:
    key = _prefix(request) + b"\x00\xff\xfe"
    value = bytes(range(256))
    await client.put(key, value)
    kv = await client.get(key)
    assert kv is not None
    assert kv.key == key
    assert kv.value == value
    await client.put(key, b"")
    emptied = await client.get(key)
    assert emptied is not None
    assert emptied.value == b""


async def test_txn_compare_and_set(client: EtcdClient, request: pytest.FixtureRequest) -> None:
    key = _prefix(request) + b"cas"
    created = await client.txn([key_missing(key)], [Put(key, b"v1")], [Get(key)])
    assert created.succeeded
    assert isinstance(created.responses[0], PutResult)

    again = await client.txn([key_missing(key)], [Put(key, b"other")], [Get(key)])
    assert not again.succeeded
    assert isinstance(again.responses[0], RangeResult)
    assert again.responses[0].kvs[0].value == b"v1"

    swapped = await client.txn([mod_revision_is(key, created.revision)], [Put(key, b"v2")])
    assert swapped.succeeded
    stale = await client.txn([mod_revision_is(key, created.revision)], [Put(key, b"v3")])
    assert not stale.succeeded
    assert stale.responses == []
    kv = await client.get(key)
    assert kv is not None
    assert kv.value == b"v2"


async def test_txn_value_compare_and_delete(
    client: EtcdClient, request: pytest.FixtureRequest
) -> None:
    key = _prefix(request) + b"k"
    await client.put(key, b"yes")
    miss = await client.txn([Compare(key, "VALUE", "EQUAL", b"no")], [Delete(key)])
    assert not miss.succeeded
    hit = await client.txn([Compare(key, "VALUE", "EQUAL", b"yes")], [Delete(key, prev_kv=True)])
    assert hit.succeeded
    assert await client.get(key) is None


async def test_txn_error_maps_to_invalid_argument(
    client: EtcdClient, request: pytest.FixtureRequest
) -> None:
    key = _prefix(request) + b"dup"
    with pytest.raises(InvalidArgument, match="duplicate key"):
        await client.txn([], [Put(key, b"1"), Put(key, b"2")])


async def test_lease_keepalive_and_revoke(
    client: EtcdClient, request: pytest.FixtureRequest
) -> None:
    key = _prefix(request) + b"leased"
    lease = await client.lease_grant(30)
    assert lease.ttl == 30
    await client.put(key, b"", lease=lease.id)
    kv = await client.get(key)
    assert kv is not None
    assert kv.lease == lease.id
    assert await client.lease_keepalive(lease.id) == 30

    await client.lease_revoke(lease.id)
    assert await client.get(key) is None
    assert await client.lease_keepalive(lease.id) == 0
    with pytest.raises(NotFound, match="lease not found"):
        await client.lease_revoke(lease.id)
    with pytest.raises(NotFound, match="lease not found"):
        await client.put(key, b"", lease=lease.id)


async def test_lease_expiry_deletes_keys(
    client: EtcdClient, request: pytest.FixtureRequest
) -> None:
    key = _prefix(request) + b"short"
    lease = await client.lease_grant(2)
    await client.put(key, b"", lease=lease.id)
    with trio.fail_after(10):
        while await client.get(key) is not None:
            await trio.sleep(0.2)
    assert await client.lease_keepalive(lease.id) == 0


async def test_watch_sees_change_by_other_client(
    client: EtcdClient, shared_etcd: EtcdProcess, request: pytest.FixtureRequest
) -> None:
    base = _prefix(request)
    async with EtcdClient([shared_etcd.endpoint]) as other:
        async with client.watch(base, prefix=True, prev_kv=True) as watch:
            put = await other.put(base + b"x", b"1")
            await other.put(base + b"x", b"2")
            await other.delete(base + b"x")
            with trio.fail_after(TIMEOUT):
                events = [await anext(watch) for _ in range(3)]

    assert [event.type for event in events] == ["PUT", "PUT", "DELETE"]
    assert [event.kv.key for event in events] == [base + b"x"] * 3
    assert events[0].kv.value == b"1"
    assert events[0].kv.mod_revision == put.revision
    assert events[1].prev_kv is not None
    assert events[1].prev_kv.value == b"1"
    assert events[2].kv.value == b""
    assert watch.revision == events[2].kv.mod_revision


async def test_watch_from_revision_replays_history(
    client: EtcdClient, request: pytest.FixtureRequest
) -> None:
    key = _prefix(request) + b"h"
    first = await client.put(key, b"1")
    await client.put(key, b"2")
    async with client.watch(key, start_revision=first.revision) as watch:
        with trio.fail_after(TIMEOUT):
            values = [(await anext(watch)).kv.value for _ in range(2)]
    assert values == [b"1", b"2"]


async def test_watch_of_compacted_revision_raises(
    client: EtcdClient, shared_etcd: EtcdProcess, request: pytest.FixtureRequest
) -> None:
    key = _prefix(request) + b"c"
    first = await client.put(key, b"1")
    latest = await client.put(key, b"2")
    # Compaction is an operator's call, so the client has no method for it.
    body = {"revision": str(latest.revision)}
    async with httpx.AsyncClient() as http:
        reply = await http.post(shared_etcd.endpoint + "/v3/kv/compaction", json=body)
    assert reply.status_code == 200

    async with client.watch(key, start_revision=first.revision) as watch:
        with pytest.raises(RevisionCompacted) as caught, trio.fail_after(TIMEOUT):
            await anext(watch)
    assert caught.value.compact_revision == latest.revision


async def test_failover_to_next_endpoint(shared_etcd: EtcdProcess) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    async with EtcdClient([dead, shared_etcd.endpoint], timeout=TIMEOUT) as client:
        await client.put(b"/test/failover", b"1")
        kv = await client.get(b"/test/failover")
        assert kv is not None
        assert kv.value == b"1"
        async with client.watch(b"/test/failover") as watch:
            await client.put(b"/test/failover", b"2")
            with trio.fail_after(TIMEOUT):
                assert (await anext(watch)).kv.value == b"2"
        assert watch.endpoint == shared_etcd.endpoint


async def test_no_endpoint_responds() -> None:
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    async with EtcdClient(dead, timeout=TIMEOUT) as client:
        with pytest.raises(Unavailable, match="etcd is unavailable") as caught:
            await client.get(b"k")
        for endpoint in dead:
            assert endpoint in caught.value.message
        with pytest.raises(Unavailable, match="etcd is unavailable"):
            await client.put(b"k", b"v")
        with pytest.raises(Unavailable, match="etcd is unavailable"):
            async with client.watch(b"k"):
                pass


async def test_stopped_etcd_then_restarted(own_etcd: EtcdProcess) -> None:
    async with EtcdClient([own_etcd.endpoint], timeout=TIMEOUT) as client:
        await client.put(b"k", b"before")
        own_etcd.stop()

        started = trio.current_time()
        with pytest.raises(Unavailable, match=own_etcd.endpoint):
            await client.get(b"k")
        with pytest.raises(Unavailable):
            await client.put(b"k", b"during")
        assert trio.current_time() - started < 2 * TIMEOUT

        own_etcd.start()
        kv = await client.get(b"k")
        assert kv is not None
        assert kv.value == b"before"
        await client.put(b"k", b"after")


async def test_hung_etcd_times_out(own_etcd: EtcdProcess) -> None:
    async with EtcdClient([own_etcd.endpoint], timeout=TIMEOUT) as client:
        await client.put(b"k", b"v")
        own_etcd.pause()
        try:
            started = trio.current_time()
            with pytest.raises(Unavailable, match="timed out after") as read_error:
                await client.get(b"k")
            elapsed = trio.current_time() - started
            with pytest.raises(Unavailable, match="may or may not have been applied"):
                await client.put(b"k", b"w")
            with pytest.raises(Unavailable, match="timed out after"):
                async with client.watch(b"k"):
                    pass
        finally:
            own_etcd.resume()
        assert "/v3/kv/range" in read_error.value.message
        assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + 1.0
        kv = await client.get(b"k")
        assert kv is not None


async def test_watch_breaks_when_etcd_stops(own_etcd: EtcdProcess) -> None:
    async with EtcdClient([own_etcd.endpoint], timeout=TIMEOUT) as client:
        async with client.watch(b"k") as watch:
            own_etcd.stop()
            with pytest.raises(Unavailable, match="watch again from revision"):
                with trio.fail_after(10):
                    await anext(watch)


async def test_garbage_reply_is_protocol_error() -> None:
    async def answer(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, answer, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        async with EtcdClient([f"http://127.0.0.1:{port}"], timeout=TIMEOUT) as client:
            with pytest.raises(ProtocolError, match="invalid JSON"):
                await client.get(b"k")
        nursery.cancel_scope.cancel()
