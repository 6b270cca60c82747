"""Tests of geometry, superblock, inodes, the metadata tree and the allocator."""

from __future__ import annotations

import stat

import pytest

from pxfs.errors import Corrupted, InvalidArgument, NoSpace, NotFound
from pxfs.volume.allocator import Allocator
from pxfs.volume.device import BLOCK_SIZE, ZERO_BLOCK
from pxfs.volume.format import ROOT_INO, Geometry, Superblock, device_blocks
from pxfs.volume.inodes import (
    DROP_INODE,
    MAP_BLOCKS,
    SET_ENTRY,
    SET_XATTR,
    UNMAP_FROM,
    new_inode_record,
)
from pxfs.volume.tree import Tree, encode_runs

GIB = 1024**3


def test_geometry_default_regions() -> None:
    geometry = Geometry.for_size(GIB)
    assert geometry.journal_start == 1
    assert geometry.journal_blocks == 512
    assert geometry.checkpoint_starts == (513, 513 + 4096)
    assert geometry.data_start == 513 + 2 * 4096
    assert geometry.data_blocks == GIB // BLOCK_SIZE
    assert device_blocks(GIB) == 1 + 512 + 2 * 4096 + GIB // BLOCK_SIZE


def test_geometry_rounds_size_up() -> None:
    geometry = Geometry.for_size(2 * 10**6)
    assert geometry.data_blocks == 31


def test_geometry_rejects_tiny_volume() -> None:
    with pytest.raises(InvalidArgument):
        Geometry.for_size(BLOCK_SIZE)


def test_superblock_roundtrip() -> None:
    sb = Superblock("uuid-1", GIB, Geometry.for_size(GIB), b"f" * 16)
    block = sb.encode()
    assert len(block) == BLOCK_SIZE
    assert Superblock.decode(block) == sb


def test_superblock_blank_and_damaged() -> None:
    with pytest.raises(NotFound):
        Superblock.decode(ZERO_BLOCK)
    block = bytearray(Superblock("u", GIB, Geometry.for_size(GIB), b"f" * 16).encode())
    block[20] ^= 0xFF
    with pytest.raises(Corrupted):
        Superblock.decode(bytes(block))
    with pytest.raises(Corrupted):
        Superblock.decode(b"garbage!" + bytes(BLOCK_SIZE - 8))


def _sample_tree() -> Tree:
    tree = Tree.new(1000)
    tree.apply(new_inode_record(2, stat.S_IFDIR | 0o755, 0, 0, 1001))
    tree.apply([SET_ENTRY, ROOT_INO, b"dir", 2])
    tree.apply(new_inode_record(3, stat.S_IFREG | 0o644, 1000, 1000, 1002))
    tree.apply([SET_ENTRY, 2, b"file", 3])
    tree.apply([MAP_BLOCKS, 3, [0, 500, 3, 10, 900, 1]])
    tree.apply([SET_XATTR, 3, b"user.k", b"v"])
    tree.apply(new_inode_record(4, stat.S_IFLNK | 0o777, 0, 0, 1003, target=b"../x"))
    tree.apply([SET_ENTRY, ROOT_INO, b"link", 4])
    return tree


def test_tree_encode_decode_roundtrip() -> None:
    tree = _sample_tree()
    again = Tree.decode(tree.encode())
    assert again.encode() == tree.encode()
    assert again.inodes[2].parent == ROOT_INO
    assert again.inodes[3].blocks == {0: 500, 1: 501, 2: 502, 10: 900}
    assert again.inodes[4].target == b"../x"
    assert again.inodes[4].size == 4
    assert again.next_ino == 5


def test_tree_unmap_and_drop_return_blocks() -> None:
    tree = _sample_tree()
    assert sorted(tree.apply([UNMAP_FROM, 3, 2])) == [502, 900]
    assert tree.inodes[3].blocks == {0: 500, 1: 501}
    tree.apply([SET_ENTRY, 2, b"file", 0])
    assert sorted(tree.apply([DROP_INODE, 3])) == [500, 501]
    assert 3 not in tree.inodes


def test_tree_rejects_invalid_changes() -> None:
    tree = _sample_tree()
    with pytest.raises(Corrupted):
        tree.apply(["?", 1])
    with pytest.raises(Corrupted):
        tree.apply([SET_ENTRY, 99, b"x", 3])
    with pytest.raises(Corrupted):
        tree.apply([DROP_INODE, 2])
    with pytest.raises(Corrupted):
        tree.apply([MAP_BLOCKS, 2, [0, 1, 1]])
    with pytest.raises(Corrupted):
        tree.apply(new_inode_record(3, stat.S_IFDIR | 0o755, 0, 0, 1))


@pytest.mark.parametrize(
    "index, value",
    [
        (0, 0),  # ino below the root's
        (0, True),  # bool is no inode number
        (1, 0o170644),  # no known file type
        (1, 2**16),  # mode wider than 16 bits
        (3, -1),  # negative uid
        (6, 2**63),  # size past an off_t
        (7, 2**63),  # atime past a signed 64-bit time
        (7, 1.5),  # a float time
        (11, "target"),  # target not bytes
        (11, b"x" * 4096),  # target past SYMLINK_MAX
    ],
)
def test_tree_rejects_invalid_inode_record(index: int, value: object) -> None:
    tree = _sample_tree()
    change = new_inode_record(3, stat.S_IFREG | 0o644, 0, 0, 1)
    change[index + 1] = value
    with pytest.raises(Corrupted):
        tree.apply(change)
    assert tree.inodes[3].mode == stat.S_IFREG | 0o644


def test_tree_rejects_short_inode_record() -> None:
    tree = _sample_tree()
    with pytest.raises(Corrupted):
        tree.apply(new_inode_record(7, stat.S_IFREG | 0o644, 0, 0, 1)[:-1])
    assert 7 not in tree.inodes


def test_tree_decode_rejects_garbage() -> None:
    with pytest.raises(Corrupted):
        Tree.decode(b"\x93\x01")


def test_encode_runs_merges_extents() -> None:
    assert encode_runs({0: 10, 1: 11, 2: 12, 5: 13, 6: 20}) == [0, 10, 3, 5, 13, 1, 6, 20, 1]


def test_allocator_allocates_and_reuses_after_durable() -> None:
    geometry = Geometry(2, 2, 16)
    allocator = Allocator(geometry)
    blocks = allocator.allocate(16)
    assert blocks == list(range(geometry.data_start, geometry.data_start + 16))
    with pytest.raises(NoSpace):
        allocator.allocate(1)
    allocator.release_later(blocks[:4], seq=7)
    allocator.release_later(blocks[4:6], seq=9)
    assert allocator.pending_blocks == 6
    assert allocator.take_releasable(8) == blocks[:4]
    allocator.mark_free(blocks[:4])
    assert allocator.free_blocks == 4
    assert allocator.pending_blocks == 2
    assert sorted(allocator.allocate(4)) == blocks[:4]


def test_allocator_failed_allocation_takes_nothing() -> None:
    allocator = Allocator(Geometry(2, 2, 16))
    allocator.allocate(10)
    with pytest.raises(NoSpace):
        allocator.allocate(7)
    assert allocator.free_blocks == 6
    assert len(allocator.allocate(6)) == 6


def test_allocator_from_tree_rejects_shared_or_outside_blocks() -> None:
    geometry = Geometry(2, 2, 2000)
    tree = _sample_tree()
    tree.inodes[3].blocks = {0: geometry.data_start, 1: geometry.data_start + 1}
    allocator = Allocator.from_tree(geometry, tree)
    assert allocator.free_blocks == 1998
    tree.inodes[3].blocks[2] = geometry.data_start
    with pytest.raises(Corrupted):
        Allocator.from_tree(geometry, tree)
    tree.inodes[3].blocks = {0: 1}
    with pytest.raises(Corrupted):
        Allocator.from_tree(geometry, tree)
