"""Tests of pxfs.volume.blockcache: batching, concurrency, limits and failures."""

from __future__ import annotations

import contextlib
import random
import zlib
from collections.abc import Mapping, Sequence

import hypothesis
import hypothesis.strategies as st
import pytest
import trio

from pxfs.errors import InternalError, Unavailable
from pxfs.volume.blockcache import BlockCache
from pxfs.volume.device import (
    BLOCK_SIZE,
    ZERO_BLOCK,
    BlockChange,
    MemoryDevice,
    crc32_after_change,
)

MIB = 1024 * 1024


def _block(fill: int) -> bytes:
    return bytes([fill]) * BLOCK_SIZE


class GatedDevice(MemoryDevice):
    """A MemoryDevice whose reads and writes wait until their gate opens."""

    def __init__(self, nblocks: int) -> None:
        super().__init__(nblocks)
        self.read_gate = trio.Event()
        self.write_gate = trio.Event()
        self.read_gate.set()
        self.write_gate.set()
        self.fail_writes = 0

    async def read_blocks(self, blocknos: Sequence[int]) -> list[bytes]:
        await self.read_gate.wait()
        return await super().read_blocks(blocknos)

    async def write_blocks(
        self,
        blocks: Sequence[tuple[int, bytes]],
        changes: Mapping[int, BlockChange] | None = None,
    ) -> None:
        await self.write_gate.wait()
        if self.fail_writes:
            self.fail_writes -= 1
            raise Unavailable("replica down")
        await super().write_blocks(blocks, changes)


async def test_one_mib_becomes_one_device_write() -> None:
    device = MemoryDevice(64)
    cache = BlockCache(device)
    for blockno in range(16):
        cache.put(blockno, _block(blockno))
    await cache.flush()
    assert device.stats.write_calls == 1
    assert device.stats.blocks_written == 16
    assert cache.dirty_blocks == 0


async def test_write_back_batches_large_sets() -> None:
    device = MemoryDevice(1024)
    cache = BlockCache(device, batch_blocks=64)
    for blockno in range(640):
        cache.put_zero(blockno)
    await cache.flush()
    assert device.stats.write_calls == 10
    assert device.stats.blocks_written == 640


async def test_load_reads_misses_in_one_call() -> None:
    device = MemoryDevice(64)
    await device.write_blocks([(blockno, _block(blockno)) for blockno in range(8)])
    cache = BlockCache(device)
    await cache.load([0, 1])
    await cache.load(list(range(8)))
    assert device.stats.read_calls == 2
    assert device.stats.blocks_read == 8
    peeked = cache.peek(5)
    assert peeked is not None
    assert bytes(peeked) == _block(5)


async def test_concurrent_loads_read_once() -> None:
    device = GatedDevice(8)
    await device.write_blocks([(3, _block(3))])
    device.read_gate = trio.Event()
    cache = BlockCache(device)
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(cache.load, [3])
        await trio.testing.wait_all_tasks_blocked()
        device.read_gate.set()
    assert device.stats.read_calls == 1


async def test_put_during_load_keeps_new_bytes() -> None:
    device = GatedDevice(8)
    await device.write_blocks([(2, _block(1))])
    device.read_gate = trio.Event()
    cache = BlockCache(device)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cache.load, [2])
        await trio.testing.wait_all_tasks_blocked()
        cache.put(2, _block(9))
        device.read_gate.set()
    peeked = cache.peek(2)
    assert peeked is not None
    assert bytes(peeked) == _block(9)


async def test_fresh_block_needs_no_read() -> None:
    device = MemoryDevice(8)
    cache = BlockCache(device)
    cache.put_zero(4)
    cache.patch(4, 100, b"abc")
    await cache.flush()
    assert device.stats.read_calls == 0
    assert device.peek(4)[100:103] == b"abc"
    assert device.peek(4)[:100] == bytes(100)


async def test_patch_of_uncached_block_fails() -> None:
    cache = BlockCache(MemoryDevice(8))
    with pytest.raises(InternalError):
        cache.patch(1, 0, b"x")


async def test_rewrite_during_write_is_written_again() -> None:
    device = GatedDevice(8)
    cache = BlockCache(device)
    cache.put(1, _block(1))
    device.write_gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cache.flush)
        await trio.testing.wait_all_tasks_blocked()
        cache.patch(1, 0, b"\x02")
        device.write_gate.set()
    assert device.peek(1)[0] == 1
    assert cache.dirty_blocks == 1
    await cache.flush()
    assert device.peek(1)[:2] == b"\x02\x01"
    assert device.stats.write_calls == 2


async def test_flush_waits_for_writes_in_flight() -> None:
    device = GatedDevice(8)
    cache = BlockCache(device)
    cache.put(1, _block(7))
    device.write_gate = trio.Event()
    flushed = []

    async def flush(label: str) -> None:
        await cache.flush()
        flushed.append(label)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flush, "first")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(flush, "second")
        await trio.testing.wait_all_tasks_blocked()
        assert flushed == []
        device.write_gate.set()
    assert sorted(flushed) == ["first", "second"]
    assert device.stats.write_calls == 1


async def test_clean_blocks_are_evicted_lru() -> None:
    device = MemoryDevice(512)
    cache = BlockCache(device, capacity_bytes=4 * MIB, batch_blocks=16)
    await cache.load(list(range(64)))
    assert cache.cached_blocks == 64
    await cache.load([0])
    await cache.load(list(range(64, 80)))
    assert cache.cached_blocks == 64
    assert cache.has(0)
    assert not cache.has(1)


async def test_dirty_blocks_are_not_evicted() -> None:
    device = MemoryDevice(512)
    cache = BlockCache(device, capacity_bytes=2 * MIB, dirty_limit_bytes=64 * MIB, batch_blocks=16)
    for blockno in range(100):
        cache.put_zero(blockno)
    await cache.load(list(range(100, 200)))
    assert all(cache.has(blockno) for blockno in range(100))


async def test_discarded_blocks_are_not_written() -> None:
    device = MemoryDevice(8)
    cache = BlockCache(device)
    cache.put(1, _block(1))
    cache.put(2, _block(2))
    cache.discard([1])
    await cache.flush()
    assert device.stored_blocks() == [2]


async def test_failed_write_keeps_blocks_dirty() -> None:
    device = GatedDevice(8)
    cache = BlockCache(device)
    cache.put(3, _block(3))
    device.fail_writes = 1
    with pytest.raises(Unavailable):
        await cache.flush()
    assert cache.dirty_blocks == 1
    await cache.flush()
    assert device.peek(3) == _block(3)


async def test_writers_wait_at_dirty_limit() -> None:
    device = GatedDevice(1024)
    cache = BlockCache(device, dirty_limit_bytes=4 * MIB, batch_blocks=16)
    highest = 0
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        for blockno in range(512):
            await cache.throttle()
            cache.put_zero(blockno)
            highest = max(highest, cache.dirty_blocks)
        await cache.flush()
        nursery.cancel_scope.cancel()
    assert highest <= 64
    assert device.stats.blocks_written >= 512
    assert device.stats.write_calls < 512 // 4
    assert device.peek(511) == ZERO_BLOCK


async def test_throttle_writes_back_without_background_task() -> None:
    device = MemoryDevice(1024)
    cache = BlockCache(device, dirty_limit_bytes=2 * MIB, batch_blocks=16)
    with trio.fail_after(5):
        for blockno in range(200):
            await cache.throttle()
            cache.put_zero(blockno)
    assert cache.dirty_blocks <= 32
    assert device.stats.blocks_written >= 200 - 32


async def test_background_write_back_retries_failures(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    device = GatedDevice(1024)
    device.fail_writes = 3
    cache = BlockCache(device, dirty_limit_bytes=4 * MIB, batch_blocks=64)
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        for blockno in range(40):
            cache.put_zero(blockno)
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert cache.dirty_blocks <= 16
    assert device.stats.blocks_written >= 24
    warnings = [record for record in caplog.records if "write-back failed" in record.message]
    assert len(warnings) == 1


async def _cache_with_clean_block(device: MemoryDevice) -> BlockCache:
    """Return a cache over `device` whose block 0 is _block(1), written and clean."""
    cache = BlockCache(device)
    cache.put(0, _block(1))
    await cache.flush()
    return cache


async def test_partial_write_sends_change_of_clean_block() -> None:
    device = MemoryDevice(8)
    cache = BlockCache(device)
    cache.put(2, _block(1))
    await cache.flush()
    cache.patch(2, 4096, b"\x07" * 4096)
    cache.patch(2, 100, b"\x08" * 10)
    await cache.flush()
    # MemoryDevice checks the base crc32 and the bytes outside [100, 8192).
    assert device.stats.blocks_changed == 1
    stored = (await device.read_blocks([2]))[0]
    assert (
        stored
        == _block(1)[:100]
        + b"\x08" * 10
        + _block(1)[110:4096]
        + b"\x07" * 4096
        + (_block(1)[8192:])
    )


async def test_large_or_unknown_changes_go_whole() -> None:
    device = MemoryDevice(8)
    cache = BlockCache(device)
    cache.put(0, _block(1))
    cache.put(1, _block(1))
    await cache.flush()
    # More than half a block changed.
    cache.patch(0, 0, b"\x02" * (BLOCK_SIZE // 2 + 1))
    # Dirty before its partial write: the device has none of it.
    cache.put_zero(3)
    cache.patch(3, 0, b"\x03")
    await cache.flush()
    assert device.stats.blocks_changed == 0
    assert (await device.read_blocks([3]))[0] == b"\x03" + bytes(BLOCK_SIZE - 1)


async def test_change_during_write_goes_whole() -> None:
    device = GatedDevice(8)
    cache = await _cache_with_clean_block(device)
    cache.patch(0, 0, b"\x02")
    device.write_gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cache.flush)
        await trio.testing.wait_all_tasks_blocked()
        # The device has neither the old block nor the one in flight yet.
        cache.patch(0, 1, b"\x03")
        device.write_gate.set()
    await cache.flush()
    assert device.stats.blocks_changed == 1
    assert (await device.read_blocks([0]))[0][:3] == b"\x02\x03" + _block(1)[:1]


async def test_failed_write_resends_whole() -> None:
    device = GatedDevice(8)
    cache = await _cache_with_clean_block(device)
    cache.patch(0, 0, b"\x02")
    device.fail_writes = 1
    with pytest.raises(Unavailable):
        await cache.flush()
    await cache.flush()
    assert device.stats.blocks_changed == 0
    assert (await device.read_blocks([0]))[0][:2] == b"\x02" + _block(1)[:1]


async def test_second_change_starts_from_first() -> None:
    device = MemoryDevice(8)
    cache = await _cache_with_clean_block(device)
    for round_ in range(3):
        cache.patch(0, round_ * 10, bytes([round_ + 5]) * 10)
        await cache.flush()
    # MemoryDevice checked each base crc32 against the block it held.
    assert device.stats.blocks_changed == 3
    stored = (await device.read_blocks([0]))[0]
    assert stored[:30] == b"\x05" * 10 + b"\x06" * 10 + b"\x07" * 10


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(
    seed=st.integers(0, 2**32 - 1), start=st.integers(0, BLOCK_SIZE - 1), size=st.integers(1, 9000)
)
def test_crc32_after_change_equals_crc32(seed: int, start: int, size: int) -> None:
    size = min(size, BLOCK_SIZE - start)
    old_block = random.Random(seed).randbytes(BLOCK_SIZE)
    new_piece = random.Random(seed + 1).randbytes(size)
    new_block = old_block[:start] + new_piece + old_block[start + size :]
    old = old_block[start : start + size]
    crc = crc32_after_change(zlib.crc32(old_block), start, old, bytearray(new_block))
    assert crc == zlib.crc32(new_block)


async def test_widened_change_keeps_device_bytes() -> None:
    device = MemoryDevice(8)
    cache = await _cache_with_clean_block(device)
    # Each patch widens the change to one side, and the last one overlaps the first.
    cache.patch(0, 1000, b"\x01" * 100)
    cache.patch(0, 5000, b"\x02" * 100)
    cache.patch(0, 10, b"\x03" * 1500)
    await cache.flush()
    # MemoryDevice checked the crc32 of the result and the bytes outside [10, 5100).
    assert device.stats.blocks_changed == 1
    stored = (await device.read_blocks([0]))[0]
    assert stored[10:1510] == b"\x03" * 1500
    assert stored[5000:5100] == b"\x02" * 100


class CheckingDevice(MemoryDevice):
    """A MemoryDevice that fails some writes, before or after storing, and records bad changes.

    A write that fails after storing is a replicated write that reached some replicas only.
    MemoryDevice raises InternalError for a change that misdescribes its block. Background
    write-back would retry such an error, so it is recorded here for the test to check.
    """

    def __init__(self, nblocks: int, rng: random.Random) -> None:
        super().__init__(nblocks)
        self.rng = rng
        self.bad_changes: list[str] = []

    async def write_blocks(
        self,
        blocks: Sequence[tuple[int, bytes | bytearray]],
        changes: Mapping[int, BlockChange] | None = None,
    ) -> None:
        sent = [(blockno, bytes(data)) for blockno, data in blocks]
        for _ in range(self.rng.randrange(3)):
            await trio.lowlevel.checkpoint()
        # The cache lends its bytearrays: they must not change while the write is in flight.
        assert [(blockno, bytes(data)) for blockno, data in blocks] == sent
        fate = self.rng.random()
        if fate < 0.1:
            raise Unavailable("write failed before storing")
        try:
            await super().write_blocks(blocks, changes)
        except InternalError as exc:
            self.bad_changes.append(exc.message)
            raise
        if fate < 0.15:
            raise Unavailable("write failed after storing")


async def _random_cache_ops(
    cache: BlockCache, first: int, model: dict[int, bytes], rng: random.Random
) -> None:
    """Apply random writes, frees and flushes to blocks [first, first + 12) and to `model`."""
    for _ in range(150):
        blockno = first + rng.randrange(12)
        action = rng.random()
        if blockno not in model:
            if action < 0.5:
                cache.put_zero(blockno)
                model[blockno] = ZERO_BLOCK
            else:
                data = rng.randbytes(BLOCK_SIZE)
                cache.put(blockno, data)
                model[blockno] = data
        elif action < 0.6:
            if not cache.has(blockno):
                await cache.load([blockno])
            if rng.random() < 0.8:
                offset = rng.randrange(BLOCK_SIZE)
                size = rng.randint(1, min(BLOCK_SIZE - offset, rng.choice([16, 4096, 40000])))
                piece = rng.randbytes(size)
                cache.patch(blockno, offset, piece)
            else:
                offset = rng.randrange(1, BLOCK_SIZE)
                piece = bytes(BLOCK_SIZE - offset)
                cache.zero_from(blockno, offset)
            old = model[blockno]
            model[blockno] = old[:offset] + piece + old[offset + len(piece) :]
        elif action < 0.7:
            data = rng.randbytes(BLOCK_SIZE)
            cache.put(blockno, data)
            model[blockno] = data
        elif action < 0.75:
            cache.discard([blockno])
            del model[blockno]
        elif action < 0.8:
            cache.resize(rng.choice([0, 8, 64]) * BLOCK_SIZE)
        elif action < 0.9:
            with contextlib.suppress(Unavailable):
                await cache.flush()
        if cache.has(blockno) and blockno in model:
            assert bytes(cache.peek(blockno) or b"") == model[blockno]
        with contextlib.suppress(Unavailable):
            await cache.throttle()
        for _ in range(rng.randrange(3)):
            await trio.lowlevel.checkpoint()


@pytest.mark.parametrize("seed", range(12))
async def test_random_partial_writes_match_device(
    seed: int, autojump_clock: trio.abc.Clock
) -> None:
    rng = random.Random(seed)
    device = CheckingDevice(32, rng)
    cache = BlockCache(device, capacity_bytes=0, dirty_limit_bytes=0, batch_blocks=4)
    model: dict[int, bytes] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        # Two writers on disjoint blocks, so that the model of each block stays exact.
        async with trio.open_nursery() as writers:
            for first in (0, 12):
                writers.start_soon(_random_cache_ops, cache, first, model, rng)
        for _ in range(20):
            try:
                await cache.flush()
                break
            except Unavailable:
                pass
        nursery.cancel_scope.cancel()
    assert device.bad_changes == []
    assert device.stats.blocks_changed > 0
    assert cache.dirty_blocks == 0
    for blockno, data in model.items():
        assert device.peek(blockno) == data, blockno
