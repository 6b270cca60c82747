"""LocalCatalog only: retries of its transactions and the file on disk.

The cases every backend shares are in test_catalog_backends.py.
"""

import json
import os
from pathlib import Path
from typing import Any

import pytest

from pxfs.catalog import CATALOG_FILE, LocalCatalog, VolumeRecord
from pxfs.errors import Corrupted, Unavailable


def make_record(vol_id: str, name: str, ctime_ns: int = 1, **fields: Any) -> VolumeRecord:
    record: VolumeRecord = {"id": vol_id, "name": name, "ctime_ns": ctime_ns, "epoch": 1}
    record.update(fields)
    return record


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


@pytest.mark.parametrize("leftovers", [[], {"n1": "7"}, {"n1": [7]}, {"n1": None}])
def test_load_rejects_malformed_leftovers(tmp_path: Path, leftovers: Any) -> None:
    state = {"format": 1, "revision": 1, "volumes": {}, "nodes": {}, "leftovers": leftovers}
    (tmp_path / "catalog.json").write_text(json.dumps(state))
    with pytest.raises(Corrupted, match="'leftovers' is not a map"):
        LocalCatalog(tmp_path)
