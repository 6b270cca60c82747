"""volume.update on a real pxd: online growth seen by statfs, labels, ha_level, bad input."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nodeproc import Node

from pxfs import errors

MIB = 1 << 20
BLOCK = 64 * 1024

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"
)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    """A running pxd on tmp_path, stopped and cleaned up afterwards."""
    node = Node(tmp_path / "n")
    node.start()
    yield node
    node.cleanup(sorted(tmp_path.glob("mnt*")))


def df_bytes(path: Path) -> int:
    """Total bytes of the filesystem at `path`, as df computes them."""
    fs = os.statvfs(path)
    return fs.f_blocks * fs.f_frsize


def create(node: Node, name: str, size: int = 64 * MIB, **fields: Any) -> dict[str, Any]:
    spec = {"name": name, "size": size, "ha_level": 1, "labels": {}, **fields}
    record: dict[str, Any] = node.call("volume.create", spec)
    return record


def fill(path: Path, nbytes: int) -> None:
    """Write `nbytes` of data to a new file at `path` and fsync it."""
    chunk = os.urandom(MIB)
    with open(path, "wb") as f:
        for _ in range(nbytes // MIB):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def test_grow_mounted_volume_online(node: Node, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    node.mount_volume("grow", mnt, size=64 * MIB)
    (mnt / "before").write_bytes(b"kept")
    small = df_bytes(mnt)
    child = node.mount_child_pids()

    record = node.call("volume.update", "grow", {"size": 256 * MIB})

    assert record["size"] == 256 * MIB
    grown = df_bytes(mnt)
    assert grown - small == 192 * MIB
    assert node.mount_child_pids() == child
    assert (mnt / "before").read_bytes() == b"kept"
    # More data than the old size fits, so allocation uses the new blocks.
    fill(mnt / "big", 128 * MIB)
    assert (mnt / "big").stat().st_size == 128 * MIB
    assert node.call("volume.inspect", "grow")["size"] == 256 * MIB


def test_grown_size_survives_remount(node: Node, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    node.mount_volume("again", mnt, size=64 * MIB)
    node.call("volume.update", "again", {"size": 128 * MIB})
    grown = df_bytes(mnt)
    node.call("volume.unmount", "again", str(mnt))
    node.call("volume.mount", "again", str(mnt))
    assert df_bytes(mnt) == grown
    node.stop()
    node.start()
    assert df_bytes(mnt) == grown


def test_unmounted_volume_grows_at_mount(node: Node, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    node.mount_volume("later", mnt, size=64 * MIB)
    small = df_bytes(mnt)
    node.call("volume.unmount", "later", str(mnt))
    node.call("volume.detach", "later")

    record = node.call("volume.update", "later", {"size": 128 * MIB})
    assert record["size"] == 128 * MIB

    node.call("volume.attach", "later")
    node.call("volume.mount", "later", str(mnt))
    assert df_bytes(mnt) - small == 64 * MIB


def test_size_rounded_up_to_block(node: Node) -> None:
    create(node, "round")
    record = node.call("volume.update", "round", {"size": 64 * MIB + 1})
    assert record["size"] == 64 * MIB + BLOCK


def test_same_size_changes_nothing(node: Node) -> None:
    before = create(node, "same")
    after = node.call("volume.update", "same", {"size": 64 * MIB})
    assert after == before
    assert node.call("volume.update", "same", {}) == before


def test_shrink_rejected(node: Node) -> None:
    create(node, "shrink")
    with pytest.raises(errors.InvalidArgument) as caught:
        node.call("volume.update", "shrink", {"size": 32 * MIB})
    assert str(caught.value) == (f"volume shrink is {64 * MIB} bytes; shrinking is not supported")
    assert node.call("volume.inspect", "shrink")["size"] == 64 * MIB


@pytest.mark.parametrize("size", [0, -MIB, "128M", 1.5e8, True, None, [1], 2 << 40])
def test_bad_size_rejected(node: Node, size: Any) -> None:
    create(node, "bad")
    with pytest.raises(errors.InvalidArgument):
        node.call("volume.update", "bad", {"size": size})
    assert node.call("volume.inspect", "bad")["size"] == 64 * MIB


def test_labels_replaced(node: Node) -> None:
    create(node, "labelled", labels={"a": "1", "b": "2"})
    record = node.call("volume.update", "labelled", {"labels": {"c": "3"}})
    assert record["labels"] == {"c": "3"}
    assert node.call("volume.inspect", "labelled")["labels"] == {"c": "3"}
    assert node.call("volume.update", "labelled", {"labels": {}})["labels"] == {}


@pytest.mark.parametrize("labels", [["a"], {"": "x"}, {"k": 5}, {"a/b\n": "v"}])
def test_bad_labels_change_nothing(node: Node, labels: Any) -> None:
    create(node, "strict", labels={"keep": "me"})
    with pytest.raises(errors.InvalidArgument):
        node.call("volume.update", "strict", {"size": 128 * MIB, "labels": labels})
    record = node.call("volume.inspect", "strict")
    assert record["labels"] == {"keep": "me"}
    assert record["size"] == 64 * MIB


def test_ha_level_same_is_accepted(node: Node) -> None:
    before = create(node, "ha")
    assert node.call("volume.update", "ha", {"ha_level": 1}) == before


def test_ha_level_above_nodes_rejected(node: Node) -> None:
    create(node, "ha2")
    with pytest.raises(errors.InvalidArgument) as caught:
        node.call("volume.update", "ha2", {"ha_level": 2, "size": 128 * MIB})
    assert str(caught.value) == "ha_level 2 needs 2 online nodes, but the cluster has 1 online"
    record = node.call("volume.inspect", "ha2")
    assert record["size"] == 64 * MIB
    assert record["ha_level"] == 1


@pytest.mark.parametrize("ha_level", [0, 4, "2", True, None])
def test_bad_ha_level_rejected(node: Node, ha_level: Any) -> None:
    create(node, "hab")
    with pytest.raises(errors.InvalidArgument):
        node.call("volume.update", "hab", {"ha_level": ha_level})


@pytest.mark.parametrize("changes", [None, [], "size", {"name": "new"}, {"size": MIB, "x": 1}])
def test_malformed_changes_rejected(node: Node, changes: Any) -> None:
    create(node, "shape")
    with pytest.raises(errors.InvalidArgument):
        node.call("volume.update", "shape", changes)


def test_update_unknown_volume(node: Node) -> None:
    with pytest.raises(errors.NotFound):
        node.call("volume.update", "nope", {"size": 128 * MIB})
