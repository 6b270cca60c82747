"""LocalCatalog: records, compare-and-set, transactions and the file on disk."""

import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from pxfs.catalog import CATALOG_FILE, LocalCatalog, VolumeRecord
from pxfs.errors import AlreadyExists, Busy, Corrupted, InvalidArgument, NotFound, Unavailable


def make_record(vol_id: str, name: str, ctime_ns: int = 1, **fields: Any) -> VolumeRecord:
    record: VolumeRecord = {"id": vol_id, "name": name, "ctime_ns": ctime_ns, "epoch": 1}
    record.update(fields)
    return record


async def test_create_get_list(tmp_path: Path) -> None:
    catalog = LocalCatalog(tmp_path)
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


async def test_returned_records_are_copies(tmp_path: Path) -> None:
    catalog = LocalCatalog(tmp_path)
    await catalog.create_volume(make_record("1", "vol", labels={"a": "b"}))
    found = await catalog.get_volume("1")
    assert found is not None
    found.record["labels"]["a"] = "changed"
    (await catalog.list_volumes())[0]["name"] = "changed"

    again = await catalog.get_volume("1")
    assert again is not None
    assert again.record["labels"] == {"a": "b"}
    assert again.record["name"] == "vol"


async def test_create_rejects_taken_id_and_name(tmp_path: Path) -> None:
    catalog = LocalCatalog(tmp_path)
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


async def test_find_volume_by_id_or_name(tmp_path: Path) -> None:
    catalog = LocalCatalog(tmp_path)
    await catalog.create_volume(make_record("100", "vol"))

    assert (await catalog.find_volume("100"))["name"] == "vol"
    assert (await catalog.find_volume("vol"))["id"] == "100"
    with pytest.raises(NotFound, match="volume nothing not found"):
        await catalog.find_volume("nothing")
    with pytest.raises(NotFound):
        await catalog.find_volume("")


@pytest.mark.parametrize("ref", [None, 1.5, 100, b"100", ["100"], {"id": "100"}])
async def test_find_volume_rejects_non_string_ref(tmp_path: Path, ref: object) -> None:
    catalog = LocalCatalog(tmp_path)
    await catalog.create_volume(make_record("100", "vol"))
    with pytest.raises(InvalidArgument, match="expected a volume name or id"):
        await catalog.find_volume(ref)  # type: ignore[arg-type]


async def test_compare_and_set(tmp_path: Path) -> None:
    catalog = LocalCatalog(tmp_path)
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


async def test_compare_and_set_delete(tmp_path: Path) -> None:
    catalog = LocalCatalog(tmp_path)
    first = await catalog.create_volume(make_record("1", "vol"))
    await catalog.put_node({"id": "n1"})

    assert await catalog.compare_and_set("1", first.revision + 1, None) is None
    removed = await catalog.compare_and_set("1", first.revision, None)
    assert removed is not None
    assert removed.record["name"] == "vol"
    assert await catalog.get_volume("1") is None


async def test_update_volume_applies_change(tmp_path: Path) -> None:
    catalog = LocalCatalog(tmp_path)
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


async def test_update_volume_aborts_on_error(tmp_path: Path) -> None:
    catalog = LocalCatalog(tmp_path)
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


async def test_concurrent_transactions_serialize(tmp_path: Path) -> None:
    catalog = LocalCatalog(tmp_path)
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
    assert (
        json.loads((tmp_path / CATALOG_FILE).read_text())["volumes"]["1"]["record"]["counter"] == 20
    )


async def test_generic_update_retries_after_conflict(tmp_path: Path) -> None:
    """The interface's CAS loop, which an etcd backend inherits, retries a lost race."""

    class Interfering(LocalCatalog):
        interfere = 2

        async def update_volume(self, vol_id: str, change: Any) -> VolumeRecord:
            # Skip the lock-holding override to exercise the base class loop.
            return await super(LocalCatalog, self).update_volume(vol_id, change)

        async def compare_and_set(
            self, vol_id: str, revision: int, record: VolumeRecord | None
        ) -> Any:
            if self.interfere:
                self.interfere -= 1
                current = await self.get_volume(vol_id)
                assert current is not None
                bumped = dict(current.record, counter=current.record["counter"] + 10)
                await super().compare_and_set(vol_id, current.revision, bumped)
            return await super().compare_and_set(vol_id, revision, record)

    catalog = Interfering(tmp_path)
    await catalog.create_volume(make_record("1", "vol", counter=0))
    calls = 0

    def increment(record: VolumeRecord) -> VolumeRecord:
        nonlocal calls
        calls += 1
        record["counter"] += 1
        return record

    result = await catalog.update_volume("1", increment)
    assert result["counter"] == 21
    assert calls == 3


async def test_generic_update_gives_up(tmp_path: Path) -> None:
    class AlwaysConflicting(LocalCatalog):
        async def update_volume(self, vol_id: str, change: Any) -> VolumeRecord:
            return await super(LocalCatalog, self).update_volume(vol_id, change)

        async def compare_and_set(self, *args: Any) -> None:
            return None

    catalog = AlwaysConflicting(tmp_path)
    await catalog.create_volume(make_record("1", "vol"))
    with pytest.raises(Unavailable, match="kept changing"):
        await catalog.update_volume("1", lambda record: record)


async def test_delete_volume_with_check(tmp_path: Path) -> None:
    catalog = LocalCatalog(tmp_path)
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


async def test_nodes(tmp_path: Path) -> None:
    catalog = LocalCatalog(tmp_path)
    await catalog.put_node({"id": "a", "hostname": "h1"})
    await catalog.put_node({"id": "a", "hostname": "h2"})
    await catalog.put_node({"id": "b", "hostname": "h3"})
    nodes = sorted(await catalog.list_nodes(), key=lambda node: node["id"])
    assert nodes == [{"id": "a", "hostname": "h2"}, {"id": "b", "hostname": "h3"}]


async def test_state_survives_reopen(tmp_path: Path) -> None:
    catalog = LocalCatalog(tmp_path)
    await catalog.create_volume(make_record("1", "vol", labels={"k": "v"}))
    await catalog.create_volume(make_record("2", "gone"))
    await catalog.delete_volume("2")
    await catalog.put_node({"id": "n"})
    before = await catalog.get_volume("1")

    reopened = LocalCatalog(tmp_path)
    after = await reopened.get_volume("1")
    assert after == before
    assert await reopened.get_volume("2") is None
    assert await reopened.list_nodes() == [{"id": "n"}]
    # Revisions keep growing across a reopen, so old revisions can never match again.
    created = await reopened.create_volume(make_record("3", "new"))
    assert before is not None
    assert created.revision > before.revision


async def test_file_is_private_and_no_temp_left(tmp_path: Path) -> None:
    catalog = LocalCatalog(tmp_path)
    await catalog.create_volume(make_record("1", "vol"))
    path = tmp_path / CATALOG_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(os.listdir(tmp_path)) == [CATALOG_FILE]


async def test_failed_write_changes_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    catalog = LocalCatalog(data_dir)
    await catalog.create_volume(make_record("1", "vol"))
    # A directory where the temporary file goes makes the next write fail.
    (data_dir / (CATALOG_FILE + ".tmp")).mkdir()

    with pytest.raises(Unavailable, match="writing the catalog"):
        await catalog.create_volume(make_record("2", "other"))
    assert await catalog.get_volume("2") is None
    assert [record["id"] for record in await catalog.list_volumes()] == ["1"]


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[]", b'{"format": 99}', b'{"format": 1, "revision": 0, "volumes": []}'],
)
async def test_corrupt_file_is_reported(tmp_path: Path, content: bytes) -> None:
    (tmp_path / CATALOG_FILE).write_bytes(content)
    with pytest.raises(Corrupted, match="catalog"):
        LocalCatalog(tmp_path)
    # The damaged file is left for the operator, not replaced.
    assert (tmp_path / CATALOG_FILE).read_bytes() == content


@pytest.mark.parametrize(
    "volumes, reason",
    [
        ({"100": {}}, "is not a map with a revision"),
        ({"100": 5}, "is not a map with a revision"),
        ({"100": {"revision": 1, "record": {}}}, "missing or invalid 'id'"),
        ({"100": {"revision": 1, "record": 5}}, "has no record"),
        ({"100": {"revision": 1, "record": {**make_record("100", "v"), "size": "1"}}}, "'size'"),
        ({"100": {"revision": 1, "record": make_record("200", "v")}}, "with id '200'"),
    ],
)
def test_load_rejects_malformed_volume(tmp_path: Path, volumes: object, reason: str) -> None:
    path = tmp_path / "catalog.json"
    text = json.dumps({"format": 1, "revision": 1, "volumes": volumes, "nodes": {}})
    path.write_text(text)
    with pytest.raises(Corrupted, match=reason) as caught:
        LocalCatalog(tmp_path)
    assert str(path) in caught.value.message
    assert path.read_text() == text


def test_load_rejects_malformed_node(tmp_path: Path) -> None:
    (tmp_path / "catalog.json").write_text(
        json.dumps({"format": 1, "revision": 1, "volumes": {}, "nodes": {"n1": {}}})
    )
    with pytest.raises(Corrupted, match="node 'n1' has no matching id"):
        LocalCatalog(tmp_path)
