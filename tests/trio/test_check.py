"""Tests of pxfs.volume.check: a clean volume passes and injected damage is found."""

from __future__ import annotations

import stat
from collections.abc import Callable

import pytest

from pxfs.volume.check import check_volume
from pxfs.volume.device import BLOCK_SIZE, MemoryDevice
from pxfs.volume.format import ROOT_INO, Geometry
from pxfs.volume.inodes import SET_ENTRY
from pxfs.volume.journal import Journal, load_metadata, write_checkpoint
from pxfs.volume.namespace import Volume
from pxfs.volume.tree import Tree

SIZE = 4 * 1024 * 1024
JOURNAL = 8 * BLOCK_SIZE
SLOT = 8 * BLOCK_SIZE
GEOMETRY = Geometry.for_size(SIZE, JOURNAL, SLOT)
FILE = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755


@pytest.fixture
async def device() -> MemoryDevice:
    """A volume with a directory, a file of three blocks and a symlink, closed cleanly."""
    device = MemoryDevice(GEOMETRY.nblocks)
    await Volume.format(device, "check-uuid", SIZE, journal_bytes=JOURNAL, checkpoint_bytes=SLOT)
    volume = await Volume.open(device)
    directory = volume.mkdir(ROOT_INO, b"dir", DIR, 0, 0)
    f = volume.create(directory.ino, b"file", FILE, 0, 0)
    await volume.write(f.ino, 0, b"\x42" * (2 * BLOCK_SIZE + 100))
    volume.symlink(ROOT_INO, b"link", b"dir/file", 0, 0)
    await volume.close()
    return device


async def _rewrite(device: MemoryDevice, damage: Callable[[Tree], None]) -> None:
    """Write a newer checkpoint holding the tree after `damage`."""
    loaded = await load_metadata(device)
    damage(loaded.tree)
    slot, counter = 1 - loaded.checkpoint.slot, loaded.checkpoint.counter + 1
    image = loaded.tree.encode()
    await write_checkpoint(device, loaded.superblock, slot, counter, loaded.replay.end, image)


def _file(tree: Tree) -> int:
    entries = tree.inodes[ROOT_INO].entries
    assert entries is not None
    directory = tree.inodes[entries[b"dir"]]
    assert directory.entries is not None
    return directory.entries[b"file"]


async def test_clean_volume_has_no_problems(device: MemoryDevice) -> None:
    assert await check_volume(device) == []


async def test_blank_device_is_reported() -> None:
    problems = await check_volume(MemoryDevice(GEOMETRY.nblocks))
    assert len(problems) == 1
    assert "no pxfs volume" in problems[0]


async def test_damaged_superblock_is_reported(device: MemoryDevice) -> None:
    block = bytearray(device.peek(0))
    block[40] ^= 0xFF
    device.poke(0, bytes(block))
    problems = await check_volume(device)
    assert problems == ["the superblock fails its checksum"]


async def test_lost_checkpoints_are_reported(device: MemoryDevice) -> None:
    for start in GEOMETRY.checkpoint_starts:
        device.poke(start, bytes(BLOCK_SIZE))
    assert await check_volume(device) == ["neither checkpoint slot contains a valid checkpoint"]


async def test_unreadable_block_is_reported(device: MemoryDevice) -> None:
    tree = (await load_metadata(device)).tree
    blocks = tree.inodes[_file(tree)].blocks
    assert blocks is not None
    device.bad_blocks.add(blocks[1])
    problems = await check_volume(device)
    assert len(problems) == 1
    assert f"block {blocks[1]}" in problems[0]
    assert "unreadable" in problems[0]


async def test_bytes_past_eof_are_no_problem(device: MemoryDevice) -> None:
    tree = (await load_metadata(device)).tree
    blocks = tree.inodes[_file(tree)].blocks
    assert blocks is not None
    device.poke(blocks[2], b"\x01" * BLOCK_SIZE)
    assert await check_volume(device) == []


async def test_wrong_link_counts_are_reported(device: MemoryDevice) -> None:
    def damage(tree: Tree) -> None:
        tree.inodes[_file(tree)].nlink = 3
        tree.inodes[ROOT_INO].nlink = 7

    await _rewrite(device, damage)
    problems = await check_volume(device)
    assert len(problems) == 2
    assert any("nlink 3 but 1 directory entries" in problem for problem in problems)
    assert any("directory 1 has nlink 7, expected 3" in problem for problem in problems)


async def test_unreachable_inode_is_reported(device: MemoryDevice) -> None:
    def damage(tree: Tree) -> None:
        entries = tree.inodes[ROOT_INO].entries
        assert entries is not None
        del entries[b"link"]

    await _rewrite(device, damage)
    problems = await check_volume(device)
    assert len(problems) == 1
    assert "not reachable from the root" in problems[0]


async def test_dangling_entry_is_reported(device: MemoryDevice) -> None:
    def damage(tree: Tree) -> None:
        entries = tree.inodes[ROOT_INO].entries
        assert entries is not None
        entries[b"ghost"] = 999

    await _rewrite(device, damage)
    problems = await check_volume(device)
    assert len(problems) == 1
    assert "points to missing inode 999" in problems[0]


async def test_bad_dotdot_is_reported(device: MemoryDevice) -> None:
    loaded = await load_metadata(device)
    entries = loaded.tree.inodes[ROOT_INO].entries
    assert entries is not None
    directory = loaded.tree.inodes[entries[b"dir"]]
    # A second entry for the directory, inside itself: it has two parents, '..' names one.
    journal = Journal(device, loaded)
    journal.append(journal.encode([[SET_ENTRY, directory.ino, b"alias", directory.ino]]))
    records, last = journal.take_records()
    await journal.write_records(records, last)
    problems = await check_volume(device)
    assert any("its '..' is" in problem for problem in problems)
    assert any(f"directory {directory.ino} has 2 entries" in problem for problem in problems)


async def test_shared_and_stray_blocks_are_reported(device: MemoryDevice) -> None:
    def damage(tree: Tree) -> None:
        blocks = tree.inodes[_file(tree)].blocks
        assert blocks is not None
        blocks[5] = blocks[0]
        blocks[6] = 3
        blocks[1000] = GEOMETRY.data_start + 50

    await _rewrite(device, damage)
    problems = await check_volume(device)
    assert any("is mapped by inode" in problem for problem in problems)
    assert any("block 3 outside the data region" in problem for problem in problems)
    assert any("past its size" in problem for problem in problems)


async def test_record_that_does_not_apply_is_reported(device: MemoryDevice) -> None:
    loaded = await load_metadata(device)
    journal = Journal(device, loaded)
    journal.append(journal.encode([[SET_ENTRY, ROOT_INO, b"ghost", 4242]]))
    records, last = journal.take_records()
    await journal.write_records(records, last)
    problems = await check_volume(device)
    assert len(problems) == 1
    assert problems[0].startswith(f"journal record {last} does not apply")


async def test_orphan_of_a_crash_is_no_problem(device: MemoryDevice) -> None:
    volume = await Volume.open(device)
    f = volume.create(ROOT_INO, b"orphan", FILE, 0, 0)
    volume.opened(f.ino)
    await volume.write(f.ino, 0, b"o" * 1000)
    volume.unlink(ROOT_INO, b"orphan")
    await volume.sync()
    assert await check_volume(device.crashed()) == []


async def test_unreadable_superblock_is_reported(device: MemoryDevice) -> None:
    device.bad_blocks.add(0)
    problems = await check_volume(device)
    assert len(problems) == 1
    assert "block 0" in problems[0]
