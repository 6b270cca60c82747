"""The Catalog contract, run against both backends: LocalCatalog and EtcdCatalog on a real etcd.

Each test gets a fresh, empty catalog. The etcd backend shares one etcd per module and gives
each test its own cluster id, so the tests see only their own keys.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from etcdproc import EtcdProcess

from pxfs.catalog import Catalog, LocalCatalog, VolumeRecord
from pxfs.errors import AlreadyExists, Busy, InvalidArgument, NotFound
from pxfs.etcd import EtcdClient
from pxfs.etcdcatalog import EtcdCatalog

_cluster_ids = itertools.count()

#: Opens a new catalog object on the state of the test's catalog, as a restarted process would.
Reopen = Callable[[], AbstractAsyncContextManager[Catalog]]


def make_record(vol_id: str, name: str, ctime_ns: int = 1, **fields: Any) -> VolumeRecord:
    record: VolumeRecord = {"id": vol_id, "name": name, "ctime_ns": ctime_ns, "epoch": 1}
    record.update(fields)
    return record


@pytest.fixture(params=["local", "etcd"])
def etcd_endpoint(request: pytest.FixtureRequest) -> str | None:
    """The endpoint of the module's etcd for the etcd backend, None for the local one."""
    if request.param == "local":
        return None
    etcd: EtcdProcess = request.getfixturevalue("shared_etcd")
    return etcd.endpoint


@pytest.fixture
async def reopen(etcd_endpoint: str | None, tmp_path: Path) -> AsyncIterator[Reopen]:
    if etcd_endpoint is None:

        @asynccontextmanager
        async def open_local() -> AsyncIterator[Catalog]:
            yield LocalCatalog(tmp_path)

        yield open_local
        return

    cluster_id = f"test-{next(_cluster_ids)}"
    async with EtcdClient([etcd_endpoint]) as client, trio.open_nursery() as nursery:

        @asynccontextmanager
        async def open_etcd() -> AsyncIterator[Catalog]:
            catalog = EtcdCatalog(client, cluster_id, nursery=nursery, node_ttl=5)
            try:
                yield catalog
            finally:
                await catalog.close()

        yield open_etcd


@pytest.fixture
async def catalog(reopen: Reopen) -> AsyncIterator[Catalog]:
    async with reopen() as opened:
        yield opened


async def test_create_get_list(catalog: Catalog) -> None:
    assert await catalog.list_volumes() == []
    assert await catalog.get_volume("1") is None

    created = await catalog.create_volume(make_record("2", "second", ctime_ns=20))
    await catalog.create_volume(make_record("1", "first", ctime_ns=10))

    assert created.record["name"] == "second"
    found = await catalog.get_volume("2")
    assert found is not None
    assert found.record == make_record("2", "second", ctime_ns=20)
    assert found.revision == created.revision
    names = [record["name"] for record in await catalog.list_volumes()]
    assert names == ["first", "second"]


async def test_list_orders_equal_ctime_by_id(catalog: Catalog) -> None:
    for vol_id in ("30", "10", "20"):
        await catalog.create_volume(make_record(vol_id, f"vol{vol_id}", ctime_ns=5))
    assert [record["id"] for record in await catalog.list_volumes()] == ["10", "20", "30"]


async def test_returned_records_are_copies(catalog: Catalog) -> None:
    created = await catalog.create_volume(make_record("1", "vol", labels={"a": "b"}))
    created.record["labels"]["a"] = "changed by the caller of create"
    found = await catalog.get_volume("1")
    assert found is not None
    found.record["labels"]["a"] = "changed"
    (await catalog.list_volumes())[0]["name"] = "changed"

    again = await catalog.get_volume("1")
    assert again is not None
    assert again.record["labels"] == {"a": "b"}
    assert again.record["name"] == "vol"


async def test_create_rejects_taken_id_and_name(catalog: Catalog) -> None:
    await catalog.create_volume(make_record("100", "vol"))

    with pytest.raises(AlreadyExists, match="id 100"):
        await catalog.create_volume(make_record("100", "other"))
    with pytest.raises(AlreadyExists, match="named 'vol'"):
        await catalog.create_volume(make_record("200", "vol"))
    with pytest.raises(AlreadyExists, match="is the id of another volume"):
        await catalog.create_volume(make_record("300", "100"))
    with pytest.raises(AlreadyExists, match="is the name of another volume"):
        await catalog.create_volume(make_record("vol", "fresh"))
    assert len(await catalog.list_volumes()) == 1


async def test_create_allows_name_equal_to_own_id(catalog: Catalog) -> None:
    await catalog.create_volume(make_record("7", "7"))
    assert (await catalog.find_volume("7"))["id"] == "7"
    with pytest.raises(AlreadyExists):
        await catalog.create_volume(make_record("8", "7"))


async def test_name_is_free_after_delete(catalog: Catalog) -> None:
    await catalog.create_volume(make_record("1", "vol"))
    await catalog.delete_volume("1")
    created = await catalog.create_volume(make_record("2", "vol"))
    assert created.record["id"] == "2"
    assert (await catalog.find_volume("vol"))["id"] == "2"


async def test_find_volume_by_id_or_name(catalog: Catalog) -> None:
    await catalog.create_volume(make_record("100", "vol"))

    assert (await catalog.find_volume("100"))["name"] == "vol"
    assert (await catalog.find_volume("vol"))["id"] == "100"
    with pytest.raises(NotFound, match="volume nothing not found"):
        await catalog.find_volume("nothing")
    with pytest.raises(NotFound):
        await catalog.find_volume("")


@pytest.mark.parametrize("ref", [None, 1.5, 100, b"100", ["100"], {"id": "100"}])
async def test_find_volume_rejects_non_string_ref(catalog: Catalog, ref: object) -> None:
    await catalog.create_volume(make_record("100", "vol"))
    with pytest.raises(InvalidArgument, match="expected a volume name or id"):
        await catalog.find_volume(ref)  # type: ignore[arg-type]


async def test_compare_and_set(catalog: Catalog) -> None:
    first = await catalog.create_volume(make_record("1", "vol"))

    updated = await catalog.compare_and_set("1", first.revision, make_record("1", "vol", epoch=2))
    assert updated is not None
    assert updated.revision > first.revision

    # A writer that read before the update must lose, even if it writes the same value.
    stale = await catalog.compare_and_set("1", first.revision, make_record("1", "vol", epoch=2))
    assert stale is None
    current = await catalog.get_volume("1")
    assert current is not None
    assert current.record["epoch"] == 2
    assert current.revision == updated.revision

    assert await catalog.compare_and_set("missing", 1, make_record("missing", "x")) is None


async def test_compare_and_set_rejects_other_id(catalog: Catalog) -> None:
    first = await catalog.create_volume(make_record("1", "vol"))
    with pytest.raises(ValueError, match="does not match"):
        await catalog.compare_and_set("1", first.revision, make_record("2", "vol"))
    assert await catalog.get_volume("2") is None


async def test_compare_and_set_delete(catalog: Catalog) -> None:
    first = await catalog.create_volume(make_record("1", "vol"))

    assert await catalog.compare_and_set("1", first.revision + 1, None) is None
    removed = await catalog.compare_and_set("1", first.revision, None)
    assert removed is not None
    assert removed.record["name"] == "vol"
    assert removed.revision > first.revision
    assert await catalog.get_volume("1") is None


async def test_revision_grows_after_record_returns(catalog: Catalog) -> None:
    """A record set back to an earlier value still gets a new revision."""
    first = await catalog.create_volume(make_record("1", "vol"))
    changed = await catalog.compare_and_set("1", first.revision, make_record("1", "vol", epoch=9))
    assert changed is not None
    back = await catalog.compare_and_set("1", changed.revision, make_record("1", "vol"))
    assert back is not None
    assert back.revision > changed.revision
    assert await catalog.compare_and_set("1", first.revision, make_record("1", "vol")) is None


async def test_update_volume_applies_change(catalog: Catalog) -> None:
    await catalog.create_volume(make_record("1", "vol"))

    def raise_epoch(record: VolumeRecord) -> VolumeRecord:
        record["epoch"] += 1
        return record

    result = await catalog.update_volume("1", raise_epoch)
    assert result["epoch"] == 2
    stored = await catalog.get_volume("1")
    assert stored is not None
    assert stored.record["epoch"] == 2

    with pytest.raises(NotFound):
        await catalog.update_volume("2", raise_epoch)


async def test_update_volume_aborts_on_error(catalog: Catalog) -> None:
    created = await catalog.create_volume(make_record("1", "vol", attached_on="other"))

    def attach(record: VolumeRecord) -> VolumeRecord:
        if record["attached_on"]:
            raise Busy("attached elsewhere")
        record["attached_on"] = "me"
        return record

    with pytest.raises(Busy):
        await catalog.update_volume("1", attach)
    stored = await catalog.get_volume("1")
    assert stored is not None
    assert stored.record["attached_on"] == "other"
    assert stored.revision == created.revision


async def test_concurrent_transactions_serialize(catalog: Catalog) -> None:
    await catalog.create_volume(make_record("1", "vol", counter=0))

    def increment(record: VolumeRecord) -> VolumeRecord:
        record["counter"] += 1
        return record

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(catalog.update_volume, "1", increment)

    stored = await catalog.get_volume("1")
    assert stored is not None
    assert stored.record["counter"] == 20


async def test_delete_volume_with_check(catalog: Catalog) -> None:
    await catalog.create_volume(make_record("1", "vol", attached_on="node"))

    def reject_attached(record: VolumeRecord) -> None:
        if record["attached_on"]:
            raise Busy("attached")

    with pytest.raises(Busy):
        await catalog.delete_volume("1", reject_attached)
    assert await catalog.get_volume("1") is not None

    removed = await catalog.delete_volume("1")
    assert removed["name"] == "vol"
    assert await catalog.get_volume("1") is None
    with pytest.raises(NotFound):
        await catalog.delete_volume("1")


async def test_nodes(catalog: Catalog) -> None:
    await catalog.put_node({"id": "a", "hostname": "h1"})
    await catalog.put_node({"id": "a", "hostname": "h2"})
    await catalog.put_node({"id": "b", "hostname": "h3"})
    nodes = sorted(await catalog.list_nodes(), key=lambda node: node["id"])
    # Only the etcd backend tracks liveness; its own tests check the flag.
    for node in nodes:
        node.pop("online", None)
    assert nodes == [{"id": "a", "hostname": "h2"}, {"id": "b", "hostname": "h3"}]


async def test_leftovers_by_node(catalog: Catalog) -> None:
    assert await catalog.list_leftovers("a") == []
    await catalog.add_leftovers("1", ["a", "b"])
    await catalog.add_leftovers("2", ["a"])
    await catalog.add_leftovers("2", ["a"])
    assert sorted(await catalog.list_leftovers("a")) == ["1", "2"]
    assert await catalog.list_leftovers("b") == ["1"]
    await catalog.remove_leftover("1", "a")
    await catalog.remove_leftover("1", "a")
    assert await catalog.list_leftovers("a") == ["2"]
    assert await catalog.list_leftovers("b") == ["1"]
    await catalog.remove_leftover("2", "a")
    assert await catalog.list_leftovers("a") == []


async def test_leftovers_survive_reopen(reopen: Reopen) -> None:
    async with reopen() as catalog:
        await catalog.add_leftovers("7", ["node"])
    async with reopen() as reopened:
        assert await reopened.list_leftovers("node") == ["7"]


async def test_state_survives_reopen(reopen: Reopen) -> None:
    async with reopen() as catalog:
        await catalog.create_volume(make_record("1", "vol", labels={"k": "v"}))
        await catalog.create_volume(make_record("2", "gone"))
        await catalog.delete_volume("2")
        before = await catalog.get_volume("1")

    async with reopen() as reopened:
        after = await reopened.get_volume("1")
        assert after == before
        assert await reopened.get_volume("2") is None
        # Revisions keep growing across a reopen, so old revisions can never match again.
        created = await reopened.create_volume(make_record("3", "new"))
        assert before is not None
        assert created.revision > before.revision
        with pytest.raises(AlreadyExists):
            await reopened.create_volume(make_record("4", "vol"))
