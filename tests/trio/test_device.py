"""Tests of pxfs.volume.device: MemoryDevice and FileDevice."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pxfs.errors import ChecksumMismatch, InvalidArgument, NotFound
from pxfs.volume.device import BLOCK_SIZE, ZERO_BLOCK, FileDevice, MemoryDevice, block_runs


def _block(fill: int) -> bytes:
    return bytes([fill]) * BLOCK_SIZE


def test_block_runs_groups_consecutive() -> None:
    assert list(block_runs([1, 2, 3, 7, 9, 10])) == [(1, 3), (7, 1), (9, 2)]
    assert list(block_runs([])) == []


async def test_memory_unwritten_reads_zeros() -> None:
    device = MemoryDevice(8)
    assert await device.read_blocks([0, 7]) == [ZERO_BLOCK, ZERO_BLOCK]


async def test_memory_write_read_trim() -> None:
    device = MemoryDevice(8)
    await device.write_blocks([(2, _block(1)), (3, _block(2))])
    assert await device.read_blocks([3, 2]) == [_block(2), _block(1)]
    await device.trim_blocks([2])
    assert await device.read_blocks([2]) == [ZERO_BLOCK]
    assert device.stats.write_calls == 1
    assert device.stats.blocks_written == 2


async def test_memory_rejects_bad_requests() -> None:
    device = MemoryDevice(4)
    with pytest.raises(InvalidArgument):
        await device.read_blocks([4])
    with pytest.raises(InvalidArgument):
        await device.write_blocks([(-1, _block(0))])
    with pytest.raises(InvalidArgument):
        await device.write_blocks([(1, b"short")])


async def test_memory_bad_block_fails_checksum() -> None:
    device = MemoryDevice(4)
    await device.write_blocks([(1, _block(9))])
    device.bad_blocks.add(1)
    with pytest.raises(ChecksumMismatch):
        await device.read_blocks([0, 1])
    await device.write_blocks([(1, _block(8))])
    assert await device.read_blocks([1]) == [_block(8)]


async def test_memory_crash_keeps_flushed_and_chosen() -> None:
    device = MemoryDevice(4)
    await device.write_blocks([(0, _block(1))])
    await device.flush()
    await device.write_blocks([(0, _block(2)), (1, _block(3)), (2, _block(4))])
    assert device.unflushed_writes == 3
    nothing = device.crashed()
    assert await nothing.read_blocks([0, 1, 2]) == [_block(1), ZERO_BLOCK, ZERO_BLOCK]
    some = device.crashed(keep=[2])
    assert await some.read_blocks([0, 1, 2]) == [_block(1), ZERO_BLOCK, _block(4)]


async def test_file_device_roundtrip_and_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "dev")
    device = FileDevice.open(path, create_blocks=1000)
    assert device.nblocks == 1000
    assert os.stat(path).st_blocks == 0
    blocks = [(blockno, _block(blockno % 251)) for blockno in range(10, 310)]
    blocks.append((999, _block(7)))
    await device.write_blocks(blocks)
    await device.flush()
    device.close()

    reopened = FileDevice.open(path)
    wanted = [999, 10, 309, 500]
    expected = [_block(7), _block(10), _block(309 % 251), ZERO_BLOCK]
    assert await reopened.read_blocks(wanted) == expected
    reopened.close()


async def test_file_device_trim_punches_holes(tmp_path: Path) -> None:
    path = str(tmp_path / "dev")
    device = FileDevice.open(path, create_blocks=64)
    await device.write_blocks([(blockno, _block(5)) for blockno in range(32)])
    await device.flush()
    before = os.stat(path).st_blocks
    await device.trim_blocks(list(range(8, 24)))
    assert await device.read_blocks([8, 23, 24]) == [ZERO_BLOCK, ZERO_BLOCK, _block(5)]
    assert os.stat(path).st_blocks < before
    device.close()


def test_file_device_open_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        FileDevice.open(str(tmp_path / "missing"))
    odd = tmp_path / "odd"
    odd.write_bytes(b"x" * 1000)
    with pytest.raises(InvalidArgument):
        FileDevice.open(str(odd))
