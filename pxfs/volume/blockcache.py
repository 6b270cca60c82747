"""The block cache: 64 KiB device blocks in memory, with batched write-back.

Clean blocks sit in an LRU bounded by `capacity_bytes`, which `resize` changes. Dirty blocks
stay until written. While dirty bytes exceed `dirty_limit_bytes`, writers wait in `throttle`
and write back the oldest dirty blocks themselves. Write-back sends batches of up to
`batch_blocks` blocks per `write_blocks` call, with at most `max_in_flight` calls outstanding
for the whole cache. A background task (`run`) starts writing back at half the limit, so that
writers seldom wait.

Concurrency rules, all relying on trio running one task at a time between awaits:
- A block is read from the device by one task at a time; the others wait for its event.
- A block has at most one write in flight, so two writes of one block never race on the device.
  A block changed while its write is in flight is dirty again and is written after it.
- A block that is replaced while its read is in flight keeps the new bytes.
- `flush` writes every block that was dirty when it started, and waits for the writes that were
  in flight then. Blocks dirtied later may be written too, but are not waited for.

`prefetch` queues blocks for a background read, so that a sequential reader finds the blocks
ahead of it in memory. It is a hint: a queue that is full drops the request, and a failed
background read leaves the blocks to the foreground read, which raises the error.

A block is held as immutable bytes, and only a partial write turns it into a bytearray to
patch. Write-back lends a bytearray to the device as it is, and a partial write to a block that
is lent patches a copy, so a write in flight never sees later changes. So a block that was read
or written whole moves to and from the device with no copy in the cache, and a block patched
again and again is copied only when a write catches it in flight.
"""

from __future__ import annotations

import logging
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import trio

from pxfs.errors import InternalError, PxfsError
from pxfs.volume.device import (
    BLOCK_SIZE,
    BlockChange,
    BlockData,
    BlockDevice,
    crc32_after_change,
)

log = logging.getLogger(__name__)

MIB = 1024 * 1024
DEFAULT_CACHE_BYTES = 256 * MIB
DEFAULT_DIRTY_BYTES = 64 * MIB
DEFAULT_BATCH_BLOCKS = 64
DEFAULT_MAX_IN_FLIGHT = 4
#: A retry delay after a background write-back failed, in seconds.
_RETRY_DELAY = 1.0
#: Prefetch requests waiting for a background reader; further requests are dropped.
_PREFETCH_QUEUE = 8
#: Background reads in flight at once, so that the store reads one batch while the reply to
#: the other one is decoded.
_PREFETCH_READERS = 2


@dataclass
class CacheStats:
    """Counters of cache activity."""

    hits: int = 0
    misses: int = 0
    write_calls: int = 0
    blocks_written: int = 0
    write_errors: int = 0


class _Change:
    """Bytes [start, end) of a block changed by partial writes, with what the device holds.

    `base` is the crc32 of the block on the device and `old` its bytes [start, end).
    """

    __slots__ = ("base", "end", "old", "start")

    def __init__(self, start: int, end: int, base: int, old: bytes) -> None:
        self.start = start
        self.end = end
        self.base = base
        self.old = old

    def widen(self, block: BlockData, start: int, end: int) -> bool:
        """Cover [start, end) too, before `block` gets it; False once over half a block."""
        if min(start, self.start) < self.start or max(end, self.end) > self.end:
            new_start, new_end = min(start, self.start), max(end, self.end)
            if new_end - new_start > BLOCK_SIZE // 2:
                return False
            # Bytes outside [self.start, self.end) are still the device's.
            self.old = (
                bytes(block[new_start : self.start]) + self.old + bytes(block[self.end : new_end])
            )
            self.start, self.end = new_start, new_end
        return True


class BlockCache:
    """A write-back cache of device blocks."""

    def __init__(
        self,
        device: BlockDevice,
        *,
        capacity_bytes: int = DEFAULT_CACHE_BYTES,
        dirty_limit_bytes: int = DEFAULT_DIRTY_BYTES,
        batch_blocks: int = DEFAULT_BATCH_BLOCKS,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        self._device = device
        self._batch = max(1, batch_blocks)
        # A load must be able to keep a whole batch of blocks until its caller uses them.
        self._capacity = max(2 * self._batch, capacity_bytes // BLOCK_SIZE)
        self._dirty_limit = max(self._batch, dirty_limit_bytes // BLOCK_SIZE)
        self._limiter = trio.CapacityLimiter(max(1, max_in_flight))
        self._blocks: dict[int, bytes | bytearray] = {}
        self._clean: OrderedDict[int, None] = OrderedDict()
        # Dirty block -> generation at which it became dirty; 0 marks a failed write.
        self._dirty: dict[int, int] = {}
        self._generation = 0
        self._writing: dict[int, trio.Event] = {}
        # Each write in flight -> the oldest dirty generation among its blocks, so that flush
        # can wait for the writes that carry blocks dirtied before it started.
        self._oldest_in_write: dict[trio.Event, int] = {}
        self._loading: dict[int, trio.Event] = {}
        # Dirty block -> what partial writes changed in it, for a block that was clean when the
        # first one came, so write-back may send only those bytes. A dirty block without an
        # entry is sent whole.
        self._changes: dict[int, _Change] = {}
        # Clean block -> the crc32 that the device stored for it with its last change, so the
        # next partial write of the block need not compute it again.
        self._known_crc: dict[int, int] = {}
        # Block -> the bytearray that a write in flight sends, which must not change.
        self._lent: dict[int, bytearray] = {}
        self._write_done = trio.Event()
        self._wakeup = trio.Event()
        # Each queued prefetch carries the event that its blocks wait on in _loading.
        self._prefetch_send, self._prefetch_receive = trio.open_memory_channel[
            tuple[trio.Event, list[int]]
        ](_PREFETCH_QUEUE)
        self._prefetching = False
        self.stats = CacheStats()

    @property
    def dirty_blocks(self) -> int:
        """The number of blocks waiting for write-back."""
        return len(self._dirty)

    @property
    def cached_blocks(self) -> int:
        """The number of blocks held in memory."""
        return len(self._blocks)

    @property
    def cached_bytes(self) -> int:
        """The bytes of the blocks held in memory, clean or dirty."""
        return len(self._blocks) * BLOCK_SIZE

    @property
    def capacity_bytes(self) -> int:
        """The bytes of clean blocks kept before the least recently used ones are dropped."""
        return self._capacity * BLOCK_SIZE

    def resize(self, capacity_bytes: int) -> None:
        """Change the bytes of clean blocks kept, dropping the least recently used ones now."""
        self._capacity = max(2 * self._batch, capacity_bytes // BLOCK_SIZE)
        self._evict()

    def has(self, blockno: int) -> bool:
        """Tell whether a block is in memory."""
        return blockno in self._blocks

    def peek(self, blockno: int) -> bytes | bytearray | None:
        """Return the cached bytes of a block, or None; the caller must not keep them."""
        data = self._blocks.get(blockno)
        if data is not None and blockno in self._clean:
            self._clean.move_to_end(blockno)
        return data

    async def load(self, blocknos: Sequence[int]) -> None:
        """Bring blocks into memory, reading the missing ones in one device call."""
        while True:
            missing = [
                blockno for blockno in dict.fromkeys(blocknos) if blockno not in self._blocks
            ]
            if not missing:
                self.stats.hits += len(blocknos)
                self._touch(blocknos)
                return
            waiting = {self._loading[blockno] for blockno in missing if blockno in self._loading}
            mine = [blockno for blockno in missing if blockno not in self._loading]
            if mine:
                await self._read(mine)
                if not waiting:
                    return
            for event in waiting:
                await event.wait()

    def absent(self, blocknos: Iterable[int]) -> list[int]:
        """Return the blocks of `blocknos` that are neither in memory nor being read."""
        return [b for b in blocknos if b not in self._blocks and b not in self._loading]

    def prefetch(self, blocknos: Sequence[int]) -> None:
        """Queue absent blocks for a background read, without waiting; a hint only."""
        wanted = self.absent(dict.fromkeys(blocknos))
        if not self._prefetching or not wanted:
            return
        event = trio.Event()
        try:
            self._prefetch_send.send_nowait((event, wanted))
        except trio.WouldBlock:
            return
        # Registered at once, so a foreground load of these blocks waits for this read rather
        # than reading them a second time.
        for blockno in wanted:
            self._loading[blockno] = event

    def _touch(self, blocknos: Sequence[int]) -> None:
        for blockno in blocknos:
            if blockno in self._clean:
                self._clean.move_to_end(blockno)

    async def _read(self, blocknos: list[int], event: trio.Event | None = None) -> None:
        """Read blocks into memory; `event` is set when done, registered already if given."""
        if event is None:
            event = trio.Event()
            for blockno in blocknos:
                self._loading[blockno] = event
        try:
            self.stats.misses += len(blocknos)
            found = await self._device.read_blocks(blocknos)
        finally:
            for blockno in blocknos:
                del self._loading[blockno]
            event.set()
        for blockno, data in zip(blocknos, found, strict=True):
            if blockno not in self._blocks:
                self._blocks[blockno] = bytes(data)
                self._clean[blockno] = None
        self._evict(protect=set(blocknos))

    def put(self, blockno: int, data: bytes | memoryview) -> None:
        """Replace a whole block with `data` and mark it dirty."""
        if len(data) != BLOCK_SIZE:
            raise InternalError(f"block {blockno}: put of {len(data)} bytes")
        self._blocks[blockno] = bytes(data)
        self._changes.pop(blockno, None)
        self._known_crc.pop(blockno, None)
        self._mark_dirty(blockno)

    def put_zero(self, blockno: int) -> None:
        """Start a freshly allocated block as zeros, without reading it."""
        self._blocks[blockno] = bytearray(BLOCK_SIZE)
        self._changes.pop(blockno, None)
        self._known_crc.pop(blockno, None)
        self._mark_dirty(blockno)

    def patch(self, blockno: int, offset: int, data: bytes | memoryview) -> None:
        """Overwrite part of a cached block and mark it dirty."""
        current = self._blocks.get(blockno)
        if current is None:
            raise InternalError(f"block {blockno} is not cached for a partial write")
        end = offset + len(data)
        change = self._changes.get(blockno)
        if change is not None:
            if not change.widen(current, offset, end):
                del self._changes[blockno]
        elif blockno not in self._dirty and blockno not in self._writing:
            # A clean block is what the device holds.
            base = self._known_crc.pop(blockno, None)
            if base is None:
                base = zlib.crc32(current)
            self._changes[blockno] = _Change(offset, end, base, bytes(current[offset:end]))
        else:
            self._known_crc.pop(blockno, None)
        if not isinstance(current, bytearray) or self._lent.get(blockno) is current:
            current = self._blocks[blockno] = bytearray(current)
        current[offset:end] = data
        self._mark_dirty(blockno)

    def zero_from(self, blockno: int, offset: int) -> None:
        """Zero a cached block from `offset` to its end and mark it dirty."""
        self.patch(blockno, offset, bytes(BLOCK_SIZE - offset))

    def discard(self, blocknos: Iterable[int]) -> None:
        """Forget freed blocks, dirty or not; a write already in flight still completes."""
        for blockno in blocknos:
            self._blocks.pop(blockno, None)
            self._clean.pop(blockno, None)
            self._dirty.pop(blockno, None)
            self._changes.pop(blockno, None)
            self._known_crc.pop(blockno, None)

    def _mark_dirty(self, blockno: int) -> None:
        self._clean.pop(blockno, None)
        if blockno not in self._dirty:
            self._generation += 1
            self._dirty[blockno] = self._generation
            if len(self._dirty) > self._dirty_limit // 2:
                self._wakeup.set()

    def _evict(self, protect: frozenset[int] | set[int] = frozenset()) -> None:
        protected: list[int] = []
        while len(self._clean) > self._capacity:
            blockno, _ = self._clean.popitem(last=False)
            if blockno in protect:
                protected.append(blockno)
            else:
                del self._blocks[blockno]
                self._known_crc.pop(blockno, None)
        for blockno in protected:
            self._clean[blockno] = None

    async def throttle(self) -> None:
        """Wait while dirty bytes exceed the limit, writing back the oldest dirty blocks."""
        while len(self._dirty) >= self._dirty_limit:
            # Dicts keep insertion order, so the first entries became dirty first.
            due = [blockno for blockno in self._dirty if blockno not in self._writing]
            if due:
                await self._write_all(due[: self._batch])
            else:
                await self._write_done.wait()

    async def flush(self) -> None:
        """Write every block dirty now, and wait for the writes in flight now."""
        snapshot = self._generation
        while True:
            # Another task may take due blocks into a write of its own at any await below, so
            # both sets are computed again on every pass.
            waiting = [
                event for event, oldest in self._oldest_in_write.items() if oldest <= snapshot
            ]
            due = [blockno for blockno, gen in self._dirty.items() if gen <= snapshot]
            if not due and not waiting:
                return
            ready = [blockno for blockno in due if blockno not in self._writing]
            if ready:
                await self._write_all(ready)
            for event in waiting:
                await event.wait()

    async def _write_all(self, blocknos: list[int]) -> None:
        ordered = sorted(blocknos)
        batches = [ordered[i : i + self._batch] for i in range(0, len(ordered), self._batch)]
        if len(batches) == 1:
            await self._write_batch(batches[0])
            return
        failures: list[PxfsError] = []

        async def write(batch: list[int]) -> None:
            try:
                await self._write_batch(batch)
            except PxfsError as exc:
                failures.append(exc)

        async with trio.open_nursery() as nursery:
            for batch in batches:
                nursery.start_soon(write, batch)
        if failures:
            raise failures[0]

    async def _write_batch(self, blocknos: list[int]) -> None:
        async with self._limiter:
            batch = [b for b in blocknos if b in self._dirty and b not in self._writing]
            if not batch:
                return
            payload = [(blockno, self._lend(blockno)) for blockno in batch]
            changes = self._take_changes(payload)
            event = trio.Event()
            self._oldest_in_write[event] = min(self._dirty[blockno] for blockno in batch)
            for blockno in batch:
                del self._dirty[blockno]
                self._writing[blockno] = event
            try:
                self.stats.write_calls += 1
                if changes:
                    await self._device.write_blocks(payload, changes)
                else:
                    await self._device.write_blocks(payload)
            except BaseException:
                self.stats.write_errors += 1
                for blockno in batch:
                    if blockno in self._blocks:
                        self._dirty[blockno] = 0
                raise
            finally:
                for blockno in batch:
                    del self._writing[blockno]
                    self._lent.pop(blockno, None)
                del self._oldest_in_write[event]
                event.set()
                self._write_done.set()
                self._write_done = trio.Event()
        self.stats.blocks_written += len(batch)
        for blockno in batch:
            if blockno in self._blocks and blockno not in self._dirty:
                self._clean[blockno] = None
                if blockno in changes:
                    self._known_crc[blockno] = changes[blockno].crc
        self._evict()

    def _take_changes(self, payload: list[tuple[int, BlockData]]) -> dict[int, BlockChange]:
        """Remove the change records of `payload` and return those worth sending as parts.

        A change of more than half a block is sent whole, which costs about as much.
        """
        changes = {}
        for blockno, data in payload:
            change = self._changes.pop(blockno, None)
            if change is not None and change.end - change.start <= BLOCK_SIZE // 2:
                crc = crc32_after_change(change.base, change.start, change.old, data)
                changes[blockno] = BlockChange(change.start, change.end, change.base, crc)
        return changes

    def _lend(self, blockno: int) -> BlockData:
        """Return the block for a write, recording a bytearray as lent until the write ends."""
        data = self._blocks[blockno]
        if isinstance(data, bytearray):
            self._lent[blockno] = data
        return data

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write back whenever dirty bytes pass half the limit, and serve prefetches."""
        async with trio.open_nursery() as nursery:
            for _ in range(_PREFETCH_READERS):
                nursery.start_soon(self._run_prefetch)
            self._prefetching = True
            task_status.started()
            await self._run_write_back()

    async def _run_prefetch(self) -> None:
        try:
            async for event, blocknos in self._prefetch_receive:
                try:
                    await self._read(blocknos, event)
                except PxfsError as exc:
                    log.debug("prefetch of %d blocks failed: %s", len(blocknos), exc.message)
        finally:
            self._prefetching = False
            self._drop_prefetches()

    def _drop_prefetches(self) -> None:
        """Release the blocks of queued prefetches that no reader will serve any more."""
        while True:
            try:
                event, blocknos = self._prefetch_receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            for blockno in blocknos:
                if self._loading.get(blockno) is event:
                    del self._loading[blockno]
            event.set()

    async def _run_write_back(self) -> None:
        failures = 0
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            while len(self._dirty) > self._dirty_limit // 4:
                due = [blockno for blockno in self._dirty if blockno not in self._writing]
                if not due:
                    break
                try:
                    await self._write_all(due)
                except PxfsError as exc:
                    failures += 1
                    # Failures repeat every second while a device is down: log one a minute.
                    if failures % 60 == 1:
                        log.warning(
                            "block write-back failed %d times, retrying: %s", failures, exc.message
                        )
                    await trio.sleep(_RETRY_DELAY)
                    self._wakeup.set()
                    break
                failures = 0

    def statistics(self) -> dict[str, int]:
        """Return counters for monitoring."""
        return {
            "cached_blocks": len(self._blocks),
            "capacity_blocks": self._capacity,
            "dirty_blocks": len(self._dirty),
            "writing_blocks": len(self._writing),
            "hits": self.stats.hits,
            "misses": self.stats.misses,
            "write_calls": self.stats.write_calls,
            "blocks_written": self.stats.blocks_written,
            "write_errors": self.stats.write_errors,
        }
