"""Tree.decode of checkpoint images: what it checks, and that it rebuilds the tree exactly."""

from __future__ import annotations

import stat
from typing import Any

import msgpack
import pytest

from pxfs.errors import Corrupted
from pxfs.volume.format import NAME_MAX, ROOT_INO, Geometry
from pxfs.volume.inodes import MAP_BLOCKS, SET_ENTRY, SET_XATTR, new_inode_record
from pxfs.volume.tree import Tree

GEOMETRY = Geometry.for_size(1 << 30)
FIELD_NAMES = ["ino", "mode", "nlink", "uid", "gid", "rdev", "size", "atime_ns", "mtime_ns",
               "ctime_ns", "generation"]  # fmt: skip


def nested_tree(files: int = 0) -> Tree:
    """Return root/a/b (directories) with `files` files in b and one file in a."""
    tree = Tree.new(0)
    tree.apply(new_inode_record(2, stat.S_IFDIR | 0o755, 0, 0, 1))
    tree.apply([SET_ENTRY, ROOT_INO, b"a", 2])
    tree.apply(new_inode_record(3, stat.S_IFDIR | 0o755, 0, 0, 2))
    tree.apply([SET_ENTRY, 2, b"b", 3])
    tree.apply(new_inode_record(4, stat.S_IFREG | 0o644, 0, 0, 3))
    tree.apply([SET_ENTRY, 2, b"file", 4])
    tree.apply([MAP_BLOCKS, 4, [0, GEOMETRY.data_start, 2]])
    tree.apply([SET_XATTR, 4, b"user.k", b"v"])
    for number in range(files):
        ino = 5 + number
        tree.apply(new_inode_record(ino, stat.S_IFREG | 0o600, 7, 8, 10 + number))
        tree.apply([SET_ENTRY, 3, b"f%06d" % number, ino])
    return tree


def image_with(change: Any) -> bytes:
    """Return the image of nested_tree() after `change(fields)` edited its decoded map."""
    fields = msgpack.unpackb(nested_tree().encode(), strict_map_key=False)
    change(fields)
    return bytes(msgpack.packb(fields))


def test_decode_rebuilds_the_same_tree() -> None:
    tree = nested_tree(files=5000)
    image = tree.encode()
    again = Tree.decode(image, GEOMETRY)
    assert again.encode() == image
    assert list(again.inodes) == list(tree.inodes)
    assert again.mapped_blocks == 2
    assert again.next_ino == tree.next_ino


def test_decode_sets_parent_of_each_directory() -> None:
    again = Tree.decode(nested_tree(files=3).encode(), GEOMETRY)
    assert again.inodes[2].parent == ROOT_INO
    assert again.inodes[3].parent == 2
    assert again.inodes[3].entries is not None
    assert len(again.inodes[3].entries) == 3
    assert again.inodes[4].blocks == {0: GEOMETRY.data_start, 1: GEOMETRY.data_start + 1}
    assert again.inodes[4].xattrs == {b"user.k": b"v"}


@pytest.mark.parametrize("index", range(len(FIELD_NAMES)))
def test_decode_rejects_bool_in_any_integer(index: int) -> None:
    def change(fields: dict[str, Any]) -> None:
        fields["inodes"][-1][index] = True

    with pytest.raises(Corrupted, match=f"invalid inode {FIELD_NAMES[index]} True"):
        Tree.decode(image_with(change), GEOMETRY)


@pytest.mark.parametrize(
    ("index", "value", "message"),
    [
        pytest.param(0, 0, "invalid inode ino 0", id="ino-zero"),
        pytest.param(3, 2**32, "invalid inode uid", id="uid-over-32-bits"),
        pytest.param(6, 2**63, "invalid inode size", id="size-over-off-t"),
        pytest.param(7, 1.5, "invalid inode atime_ns 1.5", id="atime-float"),
        pytest.param(1, 0o644, "no known file type", id="mode-without-type"),
        pytest.param(11, b"t" * 4096, "invalid symlink target", id="target-too-long"),
    ],
)
def test_decode_names_the_invalid_field(index: int, value: Any, message: str) -> None:
    def change(fields: dict[str, Any]) -> None:
        fields["inodes"][-1][index] = value

    with pytest.raises(Corrupted, match=message):
        Tree.decode(image_with(change), GEOMETRY)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        pytest.param("text", "invalid entry name 'text'", id="string"),
        pytest.param(b"", "invalid entry name b''", id="empty"),
        pytest.param(b"n" * (NAME_MAX + 1), "expected 1 to 255 bytes", id="too-long"),
        pytest.param(7, "invalid entry name 7", id="integer"),
    ],
)
def test_decode_rejects_invalid_entry_name(name: Any, message: str) -> None:
    def change(fields: dict[str, Any]) -> None:
        for ino, flat in fields["entries"]:
            if ino == 2:
                flat[0] = name

    with pytest.raises(Corrupted, match=message):
        Tree.decode(image_with(change), GEOMETRY)


def test_decode_rejects_entry_to_missing_inode() -> None:
    def change(fields: dict[str, Any]) -> None:
        for ino, flat in fields["entries"]:
            if ino == 2:
                flat += [b"ghost", 999]

    with pytest.raises(Corrupted, match="entry b'ghost' in directory 2 points to missing inode"):
        Tree.decode(image_with(change), GEOMETRY)


def test_decode_rejects_unpaired_entries() -> None:
    def change(fields: dict[str, Any]) -> None:
        for ino, flat in fields["entries"]:
            if ino == 2:
                flat.append(b"lonely")

    with pytest.raises(Corrupted, match="not \\(name, inode\\) pairs"):
        Tree.decode(image_with(change), GEOMETRY)


def test_decode_rejects_entries_of_a_file() -> None:
    def change(fields: dict[str, Any]) -> None:
        fields["entries"].append([4, [b"x", 3]])

    with pytest.raises(Corrupted, match="inode 4 is not a directory"):
        Tree.decode(image_with(change), GEOMETRY)
