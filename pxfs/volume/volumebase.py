"""The state of a mounted volume, its lifecycle, and the commit and flushing of its changes.

Volume is built from layers, each a class that extends the one before: `VolumeBase` (this
module), `FileData` (pxfs/volume/filedata.py) and `Volume` (pxfs/volume/namespace.py). Every
operation that changes metadata ends in `_commit`, which applies its changes to the tree and
appends them as one journal record, with no await in between. A flush then writes the data
blocks before the records that refer to them. docs/volume-format.md gives the durability rules.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Self

import trio

from pxfs.errors import InvalidArgument, NoSpace, PxfsError
from pxfs.volume import journal as journal_io
from pxfs.volume.allocator import Allocator
from pxfs.volume.blockcache import DEFAULT_CACHE_BYTES, DEFAULT_DIRTY_BYTES, BlockCache
from pxfs.volume.device import BLOCK_SIZE, BlockDevice
from pxfs.volume.format import (
    DEFAULT_CHECKPOINT_BYTES,
    DEFAULT_JOURNAL_BYTES,
    ROOT_INO,
    Geometry,
    Superblock,
)
from pxfs.volume.inodes import DROP_INODE, Change, Inode
from pxfs.volume.journal import Journal
from pxfs.volume.tree import Tree

log = logging.getLogger(__name__)

#: Checkpoint slot bytes kept free, so that operations which add no inode still fit.
IMAGE_RESERVE = 64 * 1024
#: Seconds between background journal flushes.
FLUSH_INTERVAL = 1.0
#: Buffered record bytes that wake the background flush early.
FLUSH_BYTES = 1024 * 1024


def now_ns() -> int:
    """Return the current time in nanoseconds, the clock of every inode timestamp."""
    return time.time_ns()


class VolumeBase:
    """The state, lifecycle and flushing of a mounted volume, the base of every Volume layer."""

    def __init__(
        self,
        device: BlockDevice,
        loaded: journal_io.Loaded,
        *,
        cache_bytes: int,
        dirty_bytes: int,
    ) -> None:
        self._device = device
        self.superblock: Superblock = loaded.superblock
        self._geometry: Geometry = loaded.superblock.geometry
        self._tree: Tree = loaded.tree
        self._journal = Journal(device, loaded)
        self._cache = BlockCache(device, capacity_bytes=cache_bytes, dirty_limit_bytes=dirty_bytes)
        self._alloc = Allocator.from_tree(self._geometry, self._tree)
        self._max_file_size = self._geometry.data_blocks * BLOCK_SIZE
        self._lookups: dict[int, int] = {}
        self._open: dict[int, int] = {}
        self._read_ends: dict[int, int] = {}
        self._flush_lock = trio.Lock()
        self._grow_lock = trio.Lock()
        self._flush_wanted = trio.Event()
        self._background: trio.CancelScope | None = None
        self._closed = False
        # True while buffered records depend on data that must be durable before them: newly
        # mapped blocks, or the zeroed tail of a truncated block.
        self._ordered = False

    # Lifecycle

    @classmethod
    async def format(
        cls,
        device: BlockDevice,
        uuid: str,
        size: int,
        *,
        journal_bytes: int = DEFAULT_JOURNAL_BYTES,
        checkpoint_bytes: int = DEFAULT_CHECKPOINT_BYTES,
    ) -> None:
        """Write an empty volume of `size` bytes onto the device."""
        await journal_io.format_volume(device, uuid, size, journal_bytes, checkpoint_bytes)

    @classmethod
    async def open(
        cls,
        device: BlockDevice,
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        dirty_bytes: int = DEFAULT_DIRTY_BYTES,
        nursery: trio.Nursery | None = None,
    ) -> Self:
        """Load the volume, drop its orphans, and start background flushing in `nursery`."""
        loaded = await journal_io.load_metadata(device)
        volume = cls(device, loaded, cache_bytes=cache_bytes, dirty_bytes=dirty_bytes)
        volume._drop_orphans()
        if nursery is not None:
            volume._background = trio.CancelScope()
            await nursery.start(volume._run_background)
        log.info(
            "opened volume %s: %d inodes, %d journal records replayed",
            volume.superblock.uuid,
            len(volume._tree.inodes),
            len(loaded.replay.records),
        )
        return volume

    async def close(self) -> None:
        """Flush everything, write a checkpoint and stop the background tasks."""
        if self._closed:
            return
        if self._background is not None:
            self._background.cancel()
        self._lookups.clear()
        self._drop_orphans()
        try:
            await self._flush(checkpoint=True)
        except NoSpace as exc:
            lost = self._journal.seq - self._journal.durable_seq
            raise NoSpace(
                f"{lost} metadata records and {self._cache.dirty_blocks} data blocks of volume "
                f"{self.superblock.uuid} could not be written: {exc.message}"
            ) from None
        self._closed = True
        log.info("closed volume %s", self.superblock.uuid)

    async def grow(self, new_size: int) -> None:
        """Grow the volume to `new_size` bytes while it is in use.

        The device grows first, then the new superblock is written and flushed, and only then
        do statfs and allocation see the new blocks. The superblock is the authority on the
        size: a crash before it is durable leaves the old size on a larger device, which open
        accepts and a later grow reuses, so no block of the new region is mapped before then.
        Raises InvalidArgument for a size that is not larger, not a multiple of BLOCK_SIZE or
        over the format's maximum, and NoSpace, with the volume unchanged, from the device.
        """
        async with self._grow_lock:
            grown = self._grown_superblock(new_size)
            needed = grown.geometry.nblocks
            if self._device.nblocks < needed:
                await self._device.grow(needed)
            # The encoded superblock fits in the first 512-byte sector and the rest of block 0
            # is zeros in both versions, so a torn write leaves either the old or the new one.
            # NOTE: a replica stores the data before its table record, so a crash between the two
            # leaves block 0 failing its checksum on that replica.
            await self._device.write_blocks([(0, grown.encode())])
            await self._device.flush()
            old_size = self.superblock.size
            self.superblock = grown
            self._geometry = grown.geometry
            self._alloc.grow(grown.geometry)
            self._journal.set_superblock(grown)
            self._max_file_size = grown.geometry.data_blocks * BLOCK_SIZE
        log.info("grew volume %s from %d to %d bytes", grown.uuid, old_size, new_size)

    def _grown_superblock(self, new_size: int) -> Superblock:
        """Return the superblock for `new_size`, or raise InvalidArgument naming the problem."""
        uuid, size = self.superblock.uuid, self.superblock.size
        if self._closed:
            raise InvalidArgument(f"volume {uuid} is closed and cannot grow")
        if isinstance(new_size, bool) or not isinstance(new_size, int):
            raise InvalidArgument(f"invalid volume size {new_size!r}: expected bytes")
        if new_size % BLOCK_SIZE:
            raise InvalidArgument(
                f"invalid volume size {new_size}: it must be a multiple of {BLOCK_SIZE} (64 KiB)"
            )
        if new_size == size:
            raise InvalidArgument(f"volume {uuid} is already {size} bytes")
        if new_size < size:
            raise InvalidArgument(
                f"volume {uuid} is {size} bytes; shrinking to {new_size} is not supported"
            )
        return self.superblock.grown(new_size)

    async def sync(self) -> None:
        """Return once all data written so far and its metadata are durable."""
        target = self._journal.seq
        while self._journal.durable_seq < target:
            await self._flush(target=target)

    async def _run_background(self, *, task_status: trio.TaskStatus[None]) -> None:
        assert self._background is not None
        with self._background:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._cache.run)
                task_status.started()
                await self._run_flusher()

    async def _run_flusher(self) -> None:
        failures = 0
        while True:
            with trio.move_on_after(FLUSH_INTERVAL):
                await self._flush_wanted.wait()
            self._flush_wanted = trio.Event()
            if self._journal.durable_seq == self._journal.seq and not self._cache.dirty_blocks:
                continue
            try:
                # A flush cut short by close would leave its batch half placed.
                with trio.CancelScope(shield=True):
                    await self._flush()
            except PxfsError as exc:
                failures += 1
                # The flush runs every second: log the first failure and then one in a minute.
                if failures % 60 == 1:
                    log.warning(
                        "background flush failed %d times, retrying: %s", failures, exc.message
                    )
                continue
            if failures:
                log.info("background flush succeeded after %d failures", failures)
                failures = 0

    # Flushing

    async def _flush(self, *, target: int | None = None, checkpoint: bool = False) -> None:
        async with self._flush_lock:
            if target is not None and self._journal.durable_seq >= target:
                return
            if checkpoint or self._journal.needs_checkpoint():
                await self._write_checkpoint()
            else:
                await self._write_records()
            await self._release_freed()
            await self._journal.reserve()

    async def _write_records(self) -> None:
        records, last_seq = self._journal.take_records()
        ordered, self._ordered = self._ordered, False
        try:
            await self._write_data(ordered)
            try:
                await self._journal.write_records(records, last_seq)
            except NoSpace as exc:
                # On a full disk, the records of a delete may need ring blocks that take new
                # space, and the delete frees its blocks only once its records are written.
                # The records that fit in ring blocks already written break that circle.
                count = self._journal.allocated_prefix(records)
                if count:
                    prefix_seq = last_seq - len(records) + count
                    await self._journal.write_records(records[:count], prefix_seq)
                    records = records[count:]
                    log.debug(
                        "wrote %d of %d metadata records on a full disk (%s)",
                        count,
                        count + len(records),
                        exc.message,
                    )
                    await self._release_freed()
                    await self._journal.reserve()
                raise
        except BaseException:
            self._journal.restore_records(records)
            self._ordered = self._ordered or ordered
            raise

    async def _write_checkpoint(self) -> None:
        image = self._tree.encode()
        anchor, records = self._journal.capture()
        ordered, self._ordered = self._ordered, False
        try:
            await self._write_data(ordered)
            await self._journal.write_checkpoint(image, anchor)
        except BaseException:
            self._journal.restore_records(records)
            self._ordered = self._ordered or ordered
            raise

    async def _write_data(self, ordered: bool) -> None:
        """Write every dirty block before the metadata that refers to it.

        A device may persist unflushed writes in any order. So when the metadata maps newly
        allocated blocks or shrinks a file, the data is flushed first. Otherwise a crash could
        keep the record and lose the data: the file would show what a new block held before,
        or old bytes past its new end.
        """
        await self._cache.flush()
        if ordered:
            await self._device.flush()

    async def _release_freed(self) -> None:
        freed = self._alloc.take_releasable(self._journal.durable_seq)
        if not freed:
            return
        try:
            await self._device.trim_blocks(sorted(freed))
        except PxfsError as exc:
            # The blocks are free either way, and only their space on the device stays taken.
            log.warning("trim of %d freed blocks failed: %s", len(freed), exc.message)
        self._alloc.mark_free(freed)

    def _commit(self, changes: list[Change]) -> int:
        """Apply changes to the tree and append them as one record, returning its seq."""
        body = self._journal.encode(changes)
        freed: list[int] = []
        for change in changes:
            freed += self._tree.apply(change)
        seq = self._journal.append(body)
        if freed:
            self._cache.discard(freed)
            self._alloc.release_later(freed, seq)
        if self._journal.buffered_bytes > FLUSH_BYTES:
            self._flush_wanted.set()
        return seq

    def _check_image_room(self) -> None:
        """Raise NoSpace when new metadata might no longer fit in a checkpoint slot."""
        if self._journal.image_room() < IMAGE_RESERVE:
            raise NoSpace("the volume's metadata space is full; remove files to free it")

    def _drop_orphans(self) -> None:
        orphans = [
            ino
            for ino, inode in self._tree.inodes.items()
            if inode.nlink == 0 and ino != ROOT_INO and ino not in self._lookups
        ]
        if orphans:
            log.info("dropping %d unlinked inodes", len(orphans))
            self._commit([[DROP_INODE, ino] for ino in orphans])

    # Lookups

    def _inode(self, ino: int) -> Inode:
        return self._tree.get(ino)

    # Durability and monitoring

    async def fsync(self, ino: int, datasync: bool) -> None:
        """Make the file's data and metadata durable, by flushing the whole journal."""
        self._inode(ino)
        await self.sync()

    @property
    def block_cache(self) -> BlockCache:
        """The cache of the volume's data blocks, for sizing it to the host's memory."""
        return self._cache

    def statistics(self) -> dict[str, Any]:
        """Return counters for monitoring."""
        return {
            "inodes": len(self._tree.inodes),
            "free_blocks": self._alloc.free_blocks,
            "pending_blocks": self._alloc.pending_blocks,
            "journal": self._journal.statistics(),
            "cache": self._cache.statistics(),
        }
