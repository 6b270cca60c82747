"""Tests of pxfs.volume.journal: record chain, replay, checkpoints and format."""

from __future__ import annotations

import stat
from typing import Any

import msgpack
import pytest

from pxfs.errors import Corrupted, InvalidArgument, NoSpace, NotFound
from pxfs.volume.device import BLOCK_SIZE, MemoryDevice
from pxfs.volume.format import ROOT_INO, Geometry
from pxfs.volume.inodes import SET_ENTRY, SET_XATTR, new_inode_record
from pxfs.volume.journal import (
    RECORD_HEADER,
    Journal,
    Loaded,
    format_volume,
    load_metadata,
    read_superblock,
)

SIZE = 1024 * 1024
RING = 4 * BLOCK_SIZE
SLOT = 4 * BLOCK_SIZE
GEOMETRY = Geometry.for_size(SIZE, RING, SLOT)


class Writer:
    """A tree and its journal, changed the way the Volume changes them."""

    def __init__(self, device: MemoryDevice, loaded: Loaded) -> None:
        self.device = device
        self.tree = loaded.tree
        self.journal = Journal(device, loaded)

    def op(self, changes: list[list[Any]]) -> int:
        body = self.journal.encode(changes)
        for change in changes:
            self.tree.apply(change)
        return self.journal.append(body)

    def make_file(self, ino: int) -> int:
        return self.op(
            [
                new_inode_record(ino, stat.S_IFREG | 0o644, 0, 0, ino),
                [SET_ENTRY, ROOT_INO, b"f%d" % ino, ino],
            ]
        )

    async def flush(self) -> None:
        if self.journal.needs_checkpoint():
            await self.checkpoint()
            return
        records, last = self.journal.take_records()
        await self.journal.write_records(records, last)

    async def checkpoint(self) -> None:
        image = self.tree.encode()
        anchor, _ = self.journal.capture()
        await self.journal.write_checkpoint(image, anchor)


async def _formatted() -> MemoryDevice:
    device = MemoryDevice(GEOMETRY.nblocks)
    await format_volume(device, "vol-uuid", SIZE, RING, SLOT)
    return device


async def _writer(device: MemoryDevice) -> Writer:
    return Writer(device, await load_metadata(device))


async def _noop() -> None:
    return None


async def test_format_then_load_gives_empty_root() -> None:
    device = await _formatted()
    loaded = await load_metadata(device)
    assert list(loaded.tree.inodes) == [ROOT_INO]
    assert loaded.replay.records == []
    assert loaded.checkpoint.counter == 1


async def test_format_rejects_small_device() -> None:
    with pytest.raises(InvalidArgument):
        await format_volume(MemoryDevice(GEOMETRY.nblocks - 1), "u", SIZE, RING, SLOT)


async def test_load_blank_and_damaged_superblock() -> None:
    with pytest.raises(NotFound):
        await load_metadata(MemoryDevice(GEOMETRY.nblocks))
    device = await _formatted()
    block = bytearray(device.peek(0))
    block[30] ^= 1
    device.poke(0, bytes(block))
    with pytest.raises(Corrupted):
        await read_superblock(device)


async def test_records_replay_after_reopen() -> None:
    device = await _formatted()
    writer = await _writer(device)
    for ino in range(2, 12):
        writer.make_file(ino)
    await writer.flush()
    assert writer.journal.durable_seq == 10

    loaded = await load_metadata(device)
    assert [seq for seq, _ in loaded.replay.records] == list(range(1, 11))
    assert loaded.tree.encode() == writer.tree.encode()


async def test_unflushed_records_are_not_replayed() -> None:
    device = await _formatted()
    writer = await _writer(device)
    writer.make_file(2)
    await writer.flush()
    writer.make_file(3)
    loaded = await load_metadata(device)
    assert sorted(loaded.tree.inodes) == [1, 2]


async def test_corrupt_record_stops_replay_at_prefix() -> None:
    device = await _formatted()
    writer = await _writer(device)
    for ino in range(2, 6):
        writer.make_file(ino)
    await writer.flush()
    first_ring_block = GEOMETRY.journal_start
    # Flip one byte inside the body of record 2: record 1 survives, 2 and later do not.
    block = bytearray(device.peek(first_ring_block))
    first_length = int.from_bytes(block[4:8], "little")
    second_body = RECORD_HEADER.size + first_length + RECORD_HEADER.size + 3
    block[second_body] ^= 0x55
    device.poke(first_ring_block, bytes(block))

    loaded = await load_metadata(device)
    assert [seq for seq, _ in loaded.replay.records] == [1]
    assert sorted(loaded.tree.inodes) == [1, 2]


async def test_torn_write_keeps_earlier_records_in_same_block() -> None:
    device = await _formatted()
    writer = await _writer(device)
    writer.make_file(2)
    await writer.flush()
    writer.make_file(3)
    # The next batch rewrites the head block; a crash keeps none of that write.
    device.flush = _noop  # type: ignore[method-assign]
    await writer.flush()
    crashed = device.crashed()
    loaded = await load_metadata(crashed)
    assert sorted(loaded.tree.inodes) == [1, 2]


def _padded_xattr(size: int) -> list[list[Any]]:
    """Return a change list whose msgpack encoding is exactly `size` bytes."""
    for fill in range(size, 0, -1):
        changes: list[list[Any]] = [[SET_XATTR, ROOT_INO, b"user.pad", b"x" * fill]]
        if len(msgpack.packb(changes)) == size:
            return changes
    raise AssertionError(f"no padding gives {size} bytes")


async def test_stale_record_from_crashed_session_is_not_replayed() -> None:
    device = await _formatted()
    writer = await _writer(device)
    for ino in range(2, 5):
        writer.make_file(ino)
    await writer.flush()
    head = writer.journal._head
    # Record 4 ends exactly on a block boundary, so record 5 sits alone in the next block.
    padding = _padded_xattr(BLOCK_SIZE - head - RECORD_HEADER.size)
    device.flush = _noop  # type: ignore[method-assign]
    writer.op(padding)
    await writer.flush()
    writer.make_file(5)
    await writer.flush()
    # A crash keeps the block of record 5 but loses the blocks of record 4.
    crashed = device.crashed(keep=[device.unflushed_writes - 1])
    second = await _writer(crashed)
    assert second.journal.seq == 3
    second.op(padding)
    await second.flush()

    loaded = await load_metadata(crashed)
    assert [seq for seq, _ in loaded.replay.records] == [1, 2, 3, 4]
    assert 5 not in loaded.tree.inodes


async def test_ring_wraps_with_checkpoints() -> None:
    device = await _formatted()
    writer = await _writer(device)
    pad = b"p" * 9000
    for ino in range(2, 80):
        writer.make_file(ino)
        writer.op([[SET_XATTR, ROOT_INO, b"user.pad", pad + b"%d" % ino]])
        await writer.flush()
    assert writer.journal.statistics()["checkpoint_counter"] > 3

    loaded = await load_metadata(device)
    assert loaded.tree.encode() == writer.tree.encode()
    assert loaded.replay.records


async def test_checkpoints_alternate_slots() -> None:
    device = await _formatted()
    writer = await _writer(device)
    writer.make_file(2)
    await writer.checkpoint()
    first = await load_metadata(device)
    assert (first.checkpoint.slot, first.checkpoint.counter) == (1, 2)
    writer.make_file(3)
    await writer.checkpoint()
    second = await load_metadata(device)
    assert (second.checkpoint.slot, second.checkpoint.counter) == (0, 3)
    assert second.replay.records == []
    assert sorted(second.tree.inodes) == [1, 2, 3]


async def test_damaged_newest_checkpoint_falls_back() -> None:
    device = await _formatted()
    writer = await _writer(device)
    writer.make_file(2)
    await writer.flush()
    writer.make_file(3)
    await writer.checkpoint()
    writer.make_file(4)
    await writer.flush()
    newest_slot = (await load_metadata(device)).checkpoint.slot
    image_block = GEOMETRY.checkpoint_starts[newest_slot] + 1
    device.poke(image_block, b"\xff" * BLOCK_SIZE)

    loaded = await load_metadata(device)
    assert loaded.checkpoint.slot != newest_slot
    # Record 2 was absorbed into the damaged checkpoint and never reached the ring.
    assert sorted(loaded.tree.inodes) == [1, 2]


async def test_unreadable_checkpoints_raise_corrupted() -> None:
    device = await _formatted()
    for slot_start in GEOMETRY.checkpoint_starts:
        device.bad_blocks.add(slot_start)
    with pytest.raises(Corrupted):
        await load_metadata(device)


async def test_oversized_record_is_rejected() -> None:
    device = await _formatted()
    writer = await _writer(device)
    with pytest.raises(NoSpace):
        writer.journal.encode([[SET_XATTR, ROOT_INO, b"user.big", b"x" * RING]])


async def test_failed_write_restores_records() -> None:
    device = await _formatted()
    writer = await _writer(device)
    writer.make_file(2)
    records, last = writer.journal.take_records()

    async def broken(blocks: Any) -> None:
        raise NoSpace("store full")

    original = device.write_blocks
    device.write_blocks = broken  # type: ignore[method-assign]
    with pytest.raises(NoSpace):
        await writer.journal.write_records(records, last)
    writer.journal.restore_records(records)
    device.write_blocks = original  # type: ignore[method-assign]
    await writer.flush()
    loaded = await load_metadata(device)
    assert sorted(loaded.tree.inodes) == [1, 2]
