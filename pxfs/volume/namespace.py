"""The Volume: a POSIX namespace and file data on top of the tree, journal and block cache.

Every operation checks its arguments, builds the list of tree changes it makes, and commits them
as one journal record. The commit is a single step with no await in it, so an operation is
either wholly in the tree and the journal or not at all. Asynchronous operations (read, write,
truncate) first await what they need (cached blocks, write-back room) and then re-check the
state before they commit. docs/volume-format.md gives the durability rules.
"""

from __future__ import annotations

import logging
import stat
import time
from dataclasses import dataclass
from typing import Any

import trio

from pxfs.errors import (
    AlreadyExists,
    FileTooLarge,
    InvalidArgument,
    IsADirectory,
    NameTooLong,
    NoAttribute,
    NoSpace,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    NotSupported,
    PxfsError,
    RangeError,
    TooManyLinks,
)
from pxfs.volume import journal as journal_io
from pxfs.volume.allocator import Allocator
from pxfs.volume.blockcache import DEFAULT_CACHE_BYTES, DEFAULT_DIRTY_BYTES, BlockCache
from pxfs.volume.device import BLOCK_SIZE, ZERO_BLOCK, BlockDevice
from pxfs.volume.format import (
    DEFAULT_CHECKPOINT_BYTES,
    DEFAULT_JOURNAL_BYTES,
    NAME_MAX,
    ROOT_INO,
    SYMLINK_MAX,
    Geometry,
    Superblock,
)
from pxfs.volume.inodes import (
    DROP_INODE,
    MAP_BLOCKS,
    SET_ENTRY,
    SET_XATTR,
    UNMAP_FROM,
    Change,
    Inode,
    new_inode_record,
)
from pxfs.volume.journal import Journal
from pxfs.volume.tree import Tree, encode_runs

log = logging.getLogger(__name__)

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_CREATE = 1
XATTR_REPLACE = 2
LINK_MAX = 65000
XATTR_VALUE_MAX = 65536
#: The total size of the xattr names and values of one inode.
XATTR_INODE_MAX = 256 * 1024
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")
#: Checkpoint slot bytes kept free, so that operations which add no inode still fit.
IMAGE_RESERVE = 64 * 1024
#: Seconds between background journal flushes.
FLUSH_INTERVAL = 1.0
#: Buffered record bytes that wake the background flush early.
FLUSH_BYTES = 1024 * 1024
DIRECTORY_SIZE = 4096
#: The readahead window of sequential reads, in blocks: 4 MiB after the last block read.
READ_AHEAD_BLOCKS = 64
#: Blocks read along with a sequential read that misses the cache, and the least number of
#: absent blocks in the window that starts a background read.
READ_AHEAD_STEP = 16
#: Files whose last read end is remembered to detect sequential reads.
_READ_AHEAD_FILES = 1024
_RELATIME_NS = 24 * 3600 * 10**9


@dataclass(slots=True)
class Attr:
    """The attributes of an inode, as stat(2) reports them."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    generation: int


def _now() -> int:
    return time.time_ns()


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise NameTooLong(f"name of {len(name)} bytes exceeds {NAME_MAX}")
    if not name or b"/" in name or b"\0" in name:
        raise InvalidArgument(f"invalid file name {name!r}")


class Volume:
    """A mounted volume: the in-memory tree, its journal, the block cache and the allocator."""

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
    ) -> Volume:
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
            await self._journal.write_records(records, last_seq)
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
        """Write every dirty block before the metadata that refers to it (invariant 1).

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

    def _dir(self, ino: int) -> Inode:
        inode = self._tree.get(ino)
        if not inode.is_dir:
            raise NotADirectory(f"inode {ino} is not a directory")
        return inode

    def _live_dir(self, ino: int) -> Inode:
        inode = self._dir(ino)
        if inode.nlink == 0:
            raise NotFound(f"directory {ino} has been removed")
        return inode

    def _entry(self, parent: Inode, name: bytes) -> Inode:
        assert parent.entries is not None
        child = parent.entries.get(name)
        if child is None:
            raise NotFound(f"{name!r} does not exist in directory {parent.ino}")
        return self._tree.inodes[child]

    def attr(self, inode: Inode) -> Attr:
        """Return the attributes of an inode."""
        if inode.is_dir:
            size = DIRECTORY_SIZE
        else:
            size = inode.size
        blocks = len(inode.blocks) * (BLOCK_SIZE // 512) if inode.blocks else 0
        return Attr(
            inode.ino,
            inode.mode,
            inode.nlink,
            inode.uid,
            inode.gid,
            inode.rdev,
            size,
            blocks,
            inode.atime_ns,
            inode.mtime_ns,
            inode.ctime_ns,
            inode.generation,
        )

    def getattr(self, ino: int) -> Attr:
        """Return the attributes of inode `ino`."""
        return self.attr(self._inode(ino))

    def lookup(self, parent: int, name: bytes) -> Attr:
        """Return the attributes of `name` in `parent` and count one kernel lookup of it."""
        directory = self._dir(parent)
        if name == b".":
            inode = directory
        elif name == b"..":
            inode = self._inode(directory.parent)
        else:
            _check_name(name)
            inode = self._entry(directory, name)
        self.remember(inode.ino)
        return self.attr(inode)

    def remember(self, ino: int) -> None:
        """Count one kernel lookup of `ino` (a readdirplus entry, a new entry)."""
        self._lookups[ino] = self._lookups.get(ino, 0) + 1

    def forget(self, ino: int, nlookup: int) -> None:
        """Drop `nlookup` kernel lookups, and an unlinked inode when none is left."""
        left = self._lookups.get(ino, 0) - nlookup
        if left > 0:
            self._lookups[ino] = left
            return
        self._lookups.pop(ino, None)
        inode = self._tree.inodes.get(ino)
        if inode is not None and inode.nlink == 0 and ino != ROOT_INO:
            self._commit([[DROP_INODE, ino]])

    def _unless_used(self, inode: Inode, nlink: int, now: int) -> list[Change]:
        """Return the changes that release an inode left with `nlink` links.

        An inode the kernel no longer knows is dropped. One that it still knows but nobody has
        open loses its data now, as on ext4, rather than when the kernel's forget comes.
        """
        if nlink:
            return []
        if inode.ino not in self._lookups:
            return [[DROP_INODE, inode.ino]]
        if inode.blocks and inode.ino not in self._open:
            return [[UNMAP_FROM, inode.ino, 0], inode.record(nlink=0, size=0, ctime_ns=now)]
        return []

    def opened(self, ino: int) -> None:
        """Count one open file handle of `ino`."""
        self._inode(ino)
        self._open[ino] = self._open.get(ino, 0) + 1

    def released(self, ino: int) -> None:
        """Drop one open file handle; an unlinked file loses its data with the last one."""
        left = self._open.get(ino, 0) - 1
        if left > 0:
            self._open[ino] = left
            return
        self._open.pop(ino, None)
        inode = self._tree.inodes.get(ino)
        if inode is not None and inode.nlink == 0 and inode.blocks:
            self._commit([[UNMAP_FROM, ino, 0], inode.record(size=0)])

    # Creating entries

    def create(
        self, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0
    ) -> Attr:
        """Create a regular file, fifo, socket or device node."""
        kind = stat.S_IFMT(mode) or stat.S_IFREG
        if kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
            raise InvalidArgument(f"create cannot make a file of type {kind:o}")
        if kind not in (stat.S_IFCHR, stat.S_IFBLK):
            rdev = 0
        return self._make(parent, name, kind | (mode & 0o7777), uid, gid, rdev=rdev)

    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        """Create a directory."""
        return self._make(parent, name, stat.S_IFDIR | (mode & 0o7777), uid, gid)

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Attr:
        """Create a symbolic link to `target`."""
        if len(target) > SYMLINK_MAX:
            raise NameTooLong(f"symlink target of {len(target)} bytes exceeds {SYMLINK_MAX}")
        if not target or b"\0" in target:
            raise InvalidArgument("a symlink target must be non-empty and contain no NUL")
        return self._make(parent, name, stat.S_IFLNK | 0o777, uid, gid, target=target)

    def _make(
        self,
        parent: int,
        name: bytes,
        mode: int,
        uid: int,
        gid: int,
        *,
        rdev: int = 0,
        target: bytes = b"",
    ) -> Attr:
        directory = self._live_dir(parent)
        _check_name(name)
        assert directory.entries is not None
        if name in (b".", b"..") or name in directory.entries:
            raise AlreadyExists(f"{name!r} already exists in directory {parent}")
        if len(self._tree.inodes) >= self._geometry.max_inodes:
            raise NoSpace(f"the volume has reached its limit of {self._geometry.max_inodes} inodes")
        self._check_image_room()
        if directory.mode & stat.S_ISGID:
            gid = directory.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        now = _now()
        ino = self._tree.next_ino
        subdir = 1 if stat.S_ISDIR(mode) else 0
        self._commit(
            [
                new_inode_record(ino, mode, uid, gid, now, rdev=rdev, target=target),
                [SET_ENTRY, parent, name, ino],
                directory.record(nlink=directory.nlink + subdir, mtime_ns=now, ctime_ns=now),
            ]
        )
        self.remember(ino)
        return self.getattr(ino)

    def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        """Add a hard link `new_name` in `new_parent` to inode `ino`."""
        inode = self._inode(ino)
        if inode.is_dir:
            raise NotPermitted("hard links to directories are not allowed")
        directory = self._live_dir(new_parent)
        _check_name(new_name)
        assert directory.entries is not None
        if new_name in directory.entries:
            raise AlreadyExists(f"{new_name!r} already exists in directory {new_parent}")
        if inode.nlink == 0:
            raise NotFound(f"inode {ino} has no links left to add to")
        if inode.nlink >= LINK_MAX:
            raise TooManyLinks(f"inode {ino} already has {inode.nlink} links")
        self._check_image_room()
        now = _now()
        self._commit(
            [
                inode.record(nlink=inode.nlink + 1, ctime_ns=now),
                [SET_ENTRY, new_parent, new_name, ino],
                directory.record(mtime_ns=now, ctime_ns=now),
            ]
        )
        self.remember(ino)
        return self.getattr(ino)

    # Removing entries

    def unlink(self, parent: int, name: bytes) -> None:
        """Remove a non-directory entry; the inode stays while the kernel looks it up."""
        directory = self._dir(parent)
        child = self._entry(directory, name)
        if child.is_dir:
            raise IsADirectory(f"{name!r} is a directory")
        now = _now()
        nlink = child.nlink - 1
        self._commit(
            [
                [SET_ENTRY, parent, name, 0],
                directory.record(mtime_ns=now, ctime_ns=now),
                child.record(nlink=nlink, ctime_ns=now),
                *self._unless_used(child, nlink, now),
            ]
        )

    def rmdir(self, parent: int, name: bytes) -> None:
        """Remove an empty directory."""
        if name == b".":
            raise InvalidArgument("cannot remove '.'")
        if name == b"..":
            raise NotEmpty("cannot remove '..'")
        directory = self._dir(parent)
        child = self._entry(directory, name)
        if not child.is_dir:
            raise NotADirectory(f"{name!r} is not a directory")
        if child.entries:
            raise NotEmpty(f"directory {name!r} is not empty")
        now = _now()
        self._commit(
            [
                [SET_ENTRY, parent, name, 0],
                directory.record(nlink=directory.nlink - 1, mtime_ns=now, ctime_ns=now),
                child.record(nlink=0, ctime_ns=now),
                *self._unless_used(child, 0, now),
            ]
        )

    # Renaming

    def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int = 0
    ) -> None:
        """Rename an entry; flags RENAME_NOREPLACE or RENAME_EXCHANGE as in renameat2(2)."""
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (
            RENAME_NOREPLACE | RENAME_EXCHANGE
        ):
            raise InvalidArgument(f"invalid rename flags {flags:#x}")
        source_dir = self._dir(old_parent)
        target_dir = self._dir(new_parent)
        _check_name(new_name)
        if old_name in (b".", b"..") or new_name in (b".", b".."):
            raise InvalidArgument("cannot rename '.' or '..'")

        moved = self._entry(source_dir, old_name)
        assert target_dir.entries is not None
        target_ino = target_dir.entries.get(new_name)
        target = self._tree.inodes[target_ino] if target_ino is not None else None

        if flags & RENAME_EXCHANGE:
            if target is None:
                raise NotFound(f"{new_name!r} does not exist in directory {new_parent}")
            self._exchange(source_dir, old_name, moved, target_dir, new_name, target)
            return
        if target is not None and flags & RENAME_NOREPLACE:
            raise AlreadyExists(f"{new_name!r} already exists in directory {new_parent}")
        if target is not None and target.ino == moved.ino:
            return

        self._check_replace(moved, target)
        if moved.is_dir:
            self._check_not_inside(moved, target_dir)
        if target_dir.nlink == 0:
            raise NotFound(f"directory {new_parent} has been removed")
        self._commit(
            self._rename_changes(source_dir, old_name, moved, target_dir, new_name, target)
        )

    def _check_replace(self, moved: Inode, target: Inode | None) -> None:
        if target is None:
            return
        if moved.is_dir and not target.is_dir:
            raise NotADirectory("cannot replace a non-directory with a directory")
        if not moved.is_dir and target.is_dir:
            raise IsADirectory("cannot replace a directory with a non-directory")
        if target.entries:
            raise NotEmpty("the directory to replace is not empty")

    def _check_not_inside(self, directory: Inode, destination: Inode) -> None:
        """Raise InvalidArgument if `destination` is `directory` or lies below it."""
        ino, steps = destination.ino, 0
        while True:
            if ino == directory.ino:
                raise InvalidArgument("cannot move a directory into itself")
            if ino == ROOT_INO or steps > len(self._tree.inodes):
                return
            ino = self._tree.inodes[ino].parent
            steps += 1

    def _rename_changes(
        self,
        source_dir: Inode,
        old_name: bytes,
        moved: Inode,
        target_dir: Inode,
        new_name: bytes,
        target: Inode | None,
    ) -> list[Change]:
        now = _now()
        links = {source_dir.ino: source_dir.nlink, target_dir.ino: target_dir.nlink}
        if moved.is_dir:
            links[source_dir.ino] -= 1
            links[target_dir.ino] += 1
        changes: list[Change] = [
            [SET_ENTRY, source_dir.ino, old_name, 0],
            [SET_ENTRY, target_dir.ino, new_name, moved.ino],
            moved.record(ctime_ns=now),
        ]
        if target is not None:
            nlink = 0 if target.is_dir else target.nlink - 1
            if target.is_dir:
                links[target_dir.ino] -= 1
            changes.append(target.record(nlink=nlink, ctime_ns=now))
            changes += self._unless_used(target, nlink, now)
        for directory in {source_dir.ino: source_dir, target_dir.ino: target_dir}.values():
            changes.append(directory.record(nlink=links[directory.ino], mtime_ns=now, ctime_ns=now))
        return changes

    def _exchange(
        self,
        source_dir: Inode,
        old_name: bytes,
        first: Inode,
        target_dir: Inode,
        new_name: bytes,
        second: Inode,
    ) -> None:
        if first.ino == second.ino:
            return
        if source_dir.ino != target_dir.ino:
            if first.is_dir:
                self._check_not_inside(first, target_dir)
            if second.is_dir:
                self._check_not_inside(second, source_dir)
        now = _now()
        links = {source_dir.ino: source_dir.nlink, target_dir.ino: target_dir.nlink}
        if source_dir.ino != target_dir.ino:
            shift = int(first.is_dir) - int(second.is_dir)
            links[source_dir.ino] -= shift
            links[target_dir.ino] += shift
        changes: list[Change] = [
            [SET_ENTRY, source_dir.ino, old_name, second.ino],
            [SET_ENTRY, target_dir.ino, new_name, first.ino],
            first.record(ctime_ns=now),
            second.record(ctime_ns=now),
        ]
        for directory in {source_dir.ino: source_dir, target_dir.ino: target_dir}.values():
            changes.append(directory.record(nlink=links[directory.ino], mtime_ns=now, ctime_ns=now))
        self._commit(changes)

    # Attributes

    async def setattr(
        self,
        ino: int,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        ctime_ns: int | None = None,
    ) -> Attr:
        """Change attributes. A smaller size frees the blocks past it and zeroes the tail."""
        inode = self._inode(ino)
        if size is not None:
            self._check_resize(inode, size)
            inode = await self._load_tail(ino, size)
        now = _now()
        fields: dict[str, Any] = {"ctime_ns": now if ctime_ns is None else ctime_ns}
        if mode is not None:
            fields["mode"] = stat.S_IFMT(inode.mode) | (mode & 0o7777)
        if uid is not None:
            fields["uid"] = uid
        if gid is not None:
            fields["gid"] = gid
        if atime_ns is not None:
            fields["atime_ns"] = atime_ns
        if mtime_ns is not None:
            fields["mtime_ns"] = mtime_ns
        changes: list[Change] = []
        if size is not None:
            # Like ext4, a truncate sets mtime even when the size stays the same.
            if mtime_ns is None:
                fields["mtime_ns"] = now
            exposed = self._exposed_tail(inode, size)
            if exposed is not None:
                self._zero_exposed_tail(inode, exposed)
            fields["size"] = size
            changes += self._truncate_changes(inode, size)
        changes.insert(0, inode.record(**fields))
        self._commit(changes)
        return self.attr(inode)

    def _check_resize(self, inode: Inode, size: int) -> None:
        if inode.is_dir:
            raise IsADirectory(f"inode {inode.ino} is a directory")
        if not inode.is_reg:
            raise InvalidArgument(f"inode {inode.ino} is not a regular file")
        if size < 0:
            raise InvalidArgument(f"invalid size {size}")
        if size > self._max_file_size:
            raise FileTooLarge(f"size {size} exceeds the volume size {self._max_file_size}")

    async def _load_tail(self, ino: int, size: int) -> Inode:
        """Return the inode once the block whose tail a resize to `size` zeroes is cached."""
        while True:
            inode = self._inode(ino)
            assert inode.blocks is not None
            if size < inode.size:
                blockno = inode.blocks.get(size // BLOCK_SIZE) if size % BLOCK_SIZE else None
            else:
                blockno = self._exposed_tail(inode, size)
            if blockno is None or self._cache.has(blockno):
                return inode
            await self._cache.load([blockno])

    def _exposed_tail(self, inode: Inode, new_end: int) -> int | None:
        """Return the last block if growing the file to `new_end` brings its tail inside EOF.

        Data reaches the device before the record that grows a file, so a crash can leave bytes
        past EOF in the last block. They must read as zeros once the file grows over them.
        """
        assert inode.blocks is not None
        if new_end <= inode.size or not inode.size % BLOCK_SIZE:
            return None
        return inode.blocks.get(inode.size // BLOCK_SIZE)

    def _zero_exposed_tail(self, inode: Inode, blockno: int) -> None:
        offset = inode.size % BLOCK_SIZE
        block = self._cache.peek(blockno)
        assert block is not None
        if block.count(0, offset) != BLOCK_SIZE - offset:
            self._cache.zero_from(blockno, offset)
            # The zeros must be durable before the record that makes them part of the file.
            self._ordered = True

    def _truncate_changes(self, inode: Inode, size: int) -> list[Change]:
        """Zero the tail of the new last block and return the change that unmaps the rest."""
        assert inode.blocks is not None
        if size >= inode.size:
            return []
        if size % BLOCK_SIZE:
            blockno = inode.blocks.get(size // BLOCK_SIZE)
            if blockno is not None:
                # Bytes past EOF in the last block stay zero, so growing the file reads zeros.
                self._cache.zero_from(blockno, size % BLOCK_SIZE)
                self._ordered = True
        keep = -(-size // BLOCK_SIZE)
        if any(findex >= keep for findex in inode.blocks):
            return [[UNMAP_FROM, inode.ino, keep]]
        return []

    def readlink(self, ino: int) -> bytes:
        """Return the target of a symbolic link."""
        inode = self._inode(ino)
        if not stat.S_ISLNK(inode.mode):
            raise InvalidArgument(f"inode {ino} is not a symbolic link")
        target: bytes = inode.target
        return target

    def opendir(self, ino: int) -> list[tuple[bytes, int]]:
        """Return a snapshot of a directory's entries, `.` and `..` first."""
        directory = self._dir(ino)
        assert directory.entries is not None
        return [(b".", ino), (b"..", directory.parent), *directory.entries.items()]

    # Extended attributes

    def _check_xattr_name(self, name: bytes) -> None:
        if not name.startswith(XATTR_NAMESPACES):
            raise NotSupported(f"xattr namespace of {name!r} is not supported")
        if len(name) > NAME_MAX:
            raise RangeError(f"xattr name of {len(name)} bytes exceeds {NAME_MAX}")
        if name.endswith(b".") and name.count(b".") == 1:
            raise InvalidArgument(f"xattr name {name!r} has no name after its namespace")

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        """Set an extended attribute; flags XATTR_CREATE or XATTR_REPLACE as in setxattr(2)."""
        inode = self._inode(ino)
        self._check_xattr_name(name)
        if len(value) > XATTR_VALUE_MAX:
            raise RangeError(f"xattr value of {len(value)} bytes exceeds {XATTR_VALUE_MAX}")
        current = inode.xattrs or {}
        if flags & XATTR_CREATE and name in current:
            raise AlreadyExists(f"xattr {name!r} already exists")
        if flags & XATTR_REPLACE and name not in current:
            raise NoAttribute(f"xattr {name!r} does not exist")
        total = sum(len(key) + len(data) for key, data in current.items() if key != name)
        if total + len(name) + len(value) > XATTR_INODE_MAX:
            raise NoSpace(f"the xattrs of inode {ino} would exceed {XATTR_INODE_MAX} bytes")
        self._check_image_room()
        self._commit([[SET_XATTR, ino, name, bytes(value)], inode.record(ctime_ns=_now())])

    def getxattr(self, ino: int, name: bytes) -> bytes:
        """Return the value of an extended attribute."""
        inode = self._inode(ino)
        self._check_xattr_name(name)
        value = (inode.xattrs or {}).get(name)
        if value is None:
            raise NoAttribute(f"xattr {name!r} does not exist")
        return value

    def listxattr(self, ino: int, *, privileged: bool = True) -> list[bytes]:
        """Return the xattr names; trusted.* only to a privileged caller, as ext4 does."""
        names = list((self._inode(ino).xattrs or {}).keys())
        if not privileged:
            names = [name for name in names if not name.startswith(b"trusted.")]
        return names

    def removexattr(self, ino: int, name: bytes) -> None:
        """Remove an extended attribute."""
        inode = self._inode(ino)
        self._check_xattr_name(name)
        if name not in (inode.xattrs or {}):
            raise NoAttribute(f"xattr {name!r} does not exist")
        self._commit([[SET_XATTR, ino, name, None], inode.record(ctime_ns=_now())])

    # Space

    def statfs(self) -> dict[str, int]:
        """Return file system statistics of the data region."""
        free = self._alloc.free_blocks + self._alloc.pending_blocks
        max_inodes = self._geometry.max_inodes
        return {
            "block_size": BLOCK_SIZE,
            "blocks": self._geometry.data_blocks,
            "free": free,
            "files": max_inodes,
            "free_files": max(0, max_inodes - len(self._tree.inodes)),
            "name_max": NAME_MAX,
        }

    # File data

    def _regular(self, ino: int) -> Inode:
        inode = self._inode(ino)
        if inode.is_dir:
            raise IsADirectory(f"inode {ino} is a directory")
        if not inode.is_reg:
            raise InvalidArgument(f"inode {ino} is not a regular file")
        return inode

    async def read(self, ino: int, offset: int, size: int) -> bytes:
        """Read up to `size` bytes at `offset`. Holes read as zeros."""
        return bytes(await self.read_buffer(ino, offset, size))

    async def read_buffer(self, ino: int, offset: int, size: int) -> bytes | memoryview:
        """Read as `read` does, but a read inside one block returns a view of the cached block.

        The view is valid only until the caller's next await, because a later write may
        change the cached block in place.
        """
        if offset < 0 or size < 0:
            raise InvalidArgument(f"invalid read of {size} bytes at {offset}")
        sequential = self._is_sequential(ino, offset)
        while True:
            inode = self._regular(ino)
            end = min(offset + size, inode.size)
            if end <= offset:
                return b""
            assert inode.blocks is not None
            first, last = offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
            mapped = [inode.blocks.get(findex) for findex in range(first, last + 1)]
            wanted = [blockno for blockno in mapped if blockno is not None]
            if any(not self._cache.has(blockno) for blockno in wanted):
                ahead = self._blocks_ahead(inode, last, READ_AHEAD_STEP) if sequential else []
                await self._cache.load(wanted + ahead)
                # The file may have changed while the blocks were read: start over.
                continue
            data = self._gather(mapped, offset - first * BLOCK_SIZE, end - offset)
            if data is None:
                continue
            if sequential:
                self._prefetch_ahead(inode, last)
            self._note_read(ino, end)
            self._touch_atime(inode)
            return data

    def _is_sequential(self, ino: int, offset: int) -> bool:
        """Tell whether a read at `offset` continues the last read of the file, or nearly."""
        previous = self._read_ends.get(ino)
        return previous is not None and 0 <= offset - previous <= READ_AHEAD_BLOCKS * BLOCK_SIZE

    def _note_read(self, ino: int, end: int) -> None:
        self._read_ends.pop(ino, None)
        self._read_ends[ino] = end
        if len(self._read_ends) > _READ_AHEAD_FILES:
            del self._read_ends[next(iter(self._read_ends))]

    def _blocks_ahead(self, inode: Inode, last: int, count: int) -> list[int]:
        """Return the mapped blocks of the `count` file blocks after `last` that are absent."""
        assert inode.blocks is not None
        limit = min(last + 1 + count, -(-inode.size // BLOCK_SIZE))
        ahead = (inode.blocks.get(findex) for findex in range(last + 1, limit))
        return self._cache.absent(blockno for blockno in ahead if blockno is not None)

    def _prefetch_ahead(self, inode: Inode, last: int) -> None:
        """Queue a background read of the readahead window once a step of it is absent.

        Waiting for a whole step makes each read call to the replicas move at least
        READ_AHEAD_STEP blocks. The end of the file starts the read of what is left.
        """
        absent = self._blocks_ahead(inode, last, READ_AHEAD_BLOCKS)
        reaches_end = (last + 1 + READ_AHEAD_BLOCKS) * BLOCK_SIZE >= inode.size
        if len(absent) >= READ_AHEAD_STEP or (absent and reaches_end):
            self._cache.prefetch(absent)

    def _gather(
        self, mapped: list[int | None], skip: int, length: int
    ) -> bytes | memoryview | None:
        if len(mapped) == 1:
            single = ZERO_BLOCK if mapped[0] is None else self._cache.peek(mapped[0])
            if single is None:
                return None
            return memoryview(single)[skip : skip + length]
        parts: list[memoryview] = []
        for blockno in mapped:
            block = ZERO_BLOCK if blockno is None else self._cache.peek(blockno)
            if block is None:
                return None
            parts.append(memoryview(block))
        # Only the requested bytes of the first and last block are copied.
        parts[0] = parts[0][skip:]
        parts[-1] = parts[-1][: skip + length - (len(parts) - 1) * BLOCK_SIZE]
        return b"".join(parts)

    def _touch_atime(self, inode: Inode) -> None:
        """Update atime the way relatime does: once after each change, else once a day."""
        now = _now()
        if (
            inode.atime_ns <= inode.mtime_ns
            or inode.atime_ns <= inode.ctime_ns
            or now - inode.atime_ns > _RELATIME_NS
        ):
            self._commit([inode.record(atime_ns=now)])

    async def write(self, ino: int, offset: int, data: bytes) -> int:
        """Write `data` at `offset`, allocating blocks. NoSpace leaves the file unchanged."""
        if offset < 0:
            raise InvalidArgument(f"invalid write offset {offset}")
        if not data:
            self._regular(ino)
            return 0
        end = offset + len(data)
        if end > self._max_file_size:
            raise FileTooLarge(f"a write up to {end} exceeds the volume size {self._max_file_size}")
        await self._cache.throttle()
        flushed = False
        while True:
            inode = self._regular(ino)
            assert inode.blocks is not None
            first, last = offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
            needed = self._partial_blocks(inode, offset, end)
            exposed = self._exposed_tail(inode, offset)
            if exposed is not None and not self._cache.has(exposed):
                needed.append(exposed)
            if needed:
                await self._cache.load(needed)
                continue
            fresh = [f for f in range(first, last + 1) if f not in inode.blocks]
            if len(fresh) > self._alloc.free_blocks and self._alloc.pending_blocks and not flushed:
                # Freed blocks become usable once the records that freed them are durable.
                await self._flush()
                flushed = True
                continue
            if exposed is not None:
                self._zero_exposed_tail(inode, exposed)
            self._write_now(inode, offset, memoryview(data), fresh)
            return len(data)

    def _partial_blocks(self, inode: Inode, offset: int, end: int) -> list[int]:
        """Return the mapped, uncached blocks that the write covers only in part."""
        assert inode.blocks is not None
        needed = []
        for findex in {offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE}:
            start = findex * BLOCK_SIZE
            if offset <= start and end >= start + BLOCK_SIZE:
                continue
            blockno = inode.blocks.get(findex)
            if blockno is not None and not self._cache.has(blockno):
                needed.append(blockno)
        return needed

    def _write_now(self, inode: Inode, offset: int, data: memoryview, fresh: list[int]) -> None:
        """Allocate, copy the data into the cache and commit, in one step."""
        assert inode.blocks is not None
        allocated = dict(zip(fresh, self._alloc.allocate(len(fresh)), strict=True))
        end = offset + len(data)
        for findex in range(offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE + 1):
            start = findex * BLOCK_SIZE
            low, high = max(offset, start), min(end, start + BLOCK_SIZE)
            chunk = data[low - offset : high - offset]
            blockno = allocated.get(findex)
            if blockno is None:
                blockno = inode.blocks[findex]
            elif high - low < BLOCK_SIZE:
                self._cache.put_zero(blockno)
            if high - low == BLOCK_SIZE:
                self._cache.put(blockno, chunk)
            else:
                self._cache.patch(blockno, low - start, chunk)
        now = _now()
        changes: list[Change] = []
        if allocated:
            changes.append([MAP_BLOCKS, inode.ino, encode_runs(allocated)])
            self._ordered = True
        changes.append(inode.record(size=max(inode.size, end), mtime_ns=now, ctime_ns=now))
        self._commit(changes)

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
