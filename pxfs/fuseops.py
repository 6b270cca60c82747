"""The pyfuse3 Operations of a volume: a thin adapter from FUSE requests to Volume calls.

Only pyfuse3.FUSEError may leave a handler. Any other exception would end pyfuse3.main(), and
every later access to the mountpoint would fail with "Transport endpoint is not connected".
So a PxfsError becomes its errno, and anything unexpected is logged once with its traceback and
answered with EIO. Cancellation (a BaseException) passes through untouched.

The kernel caches entries, negative entries and attributes for TIMEOUT seconds, because the
node that mounts a volume is its only writer. Handlers never call invalidate_inode or
invalidate_entry, because such a call can wait for the kernel to write back the inode's dirty
pages (of a shared mapping), and that writeback waits for a handler.

The kernel's writeback cache is off (see Operations), so a write reaches pxfs at write(2) and
its error, such as ENOSPC, is the result of the write(2). When a write fails with NoSpace or
FileTooLarge, the handler also queues the inode, and invalidate_stale_caches, a task of the
mount child, drops its cached pages and attributes from a worker thread. So neither a page nor
a size that the kernel kept from the failed write is read back.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from pxfs.errors import FileTooLarge, NoSpace, NotFound, PxfsError
from pxfs.fusepoll import RequestPoller
from pxfs.hostmounts import mount_devices
from pxfs.stats import IoMeter
from pxfs.volume.device import BLOCK_SIZE
from pxfs.volume.namespace import Attr, Volume

log = logging.getLogger(__name__)

#: Seconds the kernel may keep entries and attributes without asking again.
TIMEOUT = 60.0
MOUNT_OPTIONS = frozenset({"fsname=pxfs", "subtype=pxfs", "allow_other", "default_permissions"})
#: Max inodes waiting for their cache to be dropped. Past it, further inodes keep their cache.
STALE_QUEUE = 1024
#: The kernel's readahead for the mount, in KiB. A FUSE mount gets 128 KiB (kernel 6.18), so
#: the kernel reads ahead at most 128 KiB at a time, each a round trip through the daemon.
#: With 4 MiB, reads arrived as 256 KiB requests, up to two at once (libfuse 3.14).
READ_AHEAD_KB = 4096

#: pyfuse3 serves one FUSE session per process, so one poller serves every handler.
POLLER = RequestPoller()

P = ParamSpec("P")
R = TypeVar("R")


def _fuse_errors(
    handler: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """Translate what a handler raises into FUSEError, and record the request in POLLER."""

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        POLLER.request_started()
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except PxfsError as exc:
            log.debug("%s failed: %s", handler.__name__, exc.message)
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception:
            log.exception("unexpected error in FUSE handler %s", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            POLLER.request_replied()

    return wrapper


class DroppedReplyFilter(logging.Filter):
    """A log filter that lowers to DEBUG pyfuse3's error for a reply the kernel dropped.

    Writing a reply fails with ENOENT when the kernel has dropped the request: it was
    interrupted, or it was a RELEASE sent while the mount went away. The handler has run and
    the kernel no longer needs its reply, so an ERROR line would only alarm. Install it on the
    "pyfuse3" logger.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Return whether to emit the record, after lowering it if it is such an error."""
        dropped = (
            record.levelno == logging.ERROR
            and isinstance(record.msg, str)
            and record.msg.endswith("fuse_reply_* failed with %s")
            and record.args == (os.strerror(errno.ENOENT),)
        )
        if not dropped:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


def entry_attributes(attr: Attr) -> pyfuse3.EntryAttributes:
    """Return the pyfuse3 form of an Attr."""
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = attr.ino
    entry.generation = attr.generation
    entry.entry_timeout = TIMEOUT
    entry.attr_timeout = TIMEOUT
    entry.st_mode = attr.mode
    entry.st_nlink = attr.nlink
    entry.st_uid = attr.uid
    entry.st_gid = attr.gid
    entry.st_rdev = attr.rdev
    entry.st_size = attr.size
    entry.st_blksize = BLOCK_SIZE
    entry.st_blocks = attr.blocks
    entry.st_atime_ns = attr.atime_ns
    entry.st_mtime_ns = attr.mtime_ns
    entry.st_ctime_ns = attr.ctime_ns
    return entry


def _negative_entry() -> pyfuse3.EntryAttributes:
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = 0
    entry.entry_timeout = TIMEOUT
    return entry


def raise_read_ahead(mountpoint: str, kib: int = READ_AHEAD_KB) -> None:
    """Set the kernel's readahead of the FUSE mount at `mountpoint`, if it is lower, best effort.

    The device comes from /proc/self/mountinfo, because a stat of the mountpoint would wait for
    this process, which serves no request yet. For the same reason only the parent directory
    of the mountpoint is resolved.
    """
    absolute = os.path.abspath(mountpoint)
    parent = os.path.realpath(os.path.dirname(absolute))
    device = mount_devices().get(os.path.join(parent, os.path.basename(absolute)))
    if device is None:
        log.debug("readahead unchanged: %s is not in /proc/self/mountinfo", mountpoint)
        return
    path = f"/sys/class/bdi/{device}/read_ahead_kb"
    try:
        with open(path, "r+") as f:
            if int(f.read()) < kib:
                f.seek(0)
                f.write(str(kib))
    except (OSError, ValueError) as exc:
        # Without write access to sysfs (an unprivileged container) reads stay at 128 KiB.
        log.debug("readahead of %s unchanged: %s", mountpoint, exc)


class Operations(pyfuse3.Operations):
    """FUSE request handlers over one Volume."""

    # Off, because with the writeback cache every close drops the cached st_blocks of the file,
    # so the next stat of each closed file costs a request: stats of fresh files ran at about a
    # twentieth of the rate they reach without it. Writes then reach pxfs at write(2), up to
    # 1 MiB each, and an error such as ENOSPC is returned by the write itself.
    enable_writeback_cache = False
    supports_dot_lookup = True

    def __init__(
        self, volume: Volume, meter: IoMeter | None = None, mountpoint: str | None = None
    ) -> None:
        super().__init__()
        self._volume = volume
        # The kernel applies the readahead of the daemon's reply to FUSE_INIT to the mount, so
        # it is raised at the first read, which comes after that reply.
        self._read_ahead_mountpoint = mountpoint
        #: Counts the reads and writes served, for pxd's volume.stats.
        self.meter = meter if meter is not None else IoMeter()
        # Per directory handle: the snapshot taken at opendir (or at the last rewind) and the
        # directory's inode, to take a new snapshot when rewinddir restarts at offset 0.
        self._dirs: dict[int, list[tuple[bytes, int]]] = {}
        self._dir_inodes: dict[int, int] = {}
        self._served: set[int] = set()
        self._next_dir = 1
        # Inodes queued or being invalidated: a failing writeback sends many writes per inode.
        self._stale: set[int] = set()
        self._stale_send, self._stale_receive = trio.open_memory_channel[int](STALE_QUEUE)

    async def invalidate_stale_caches(self) -> None:
        """Drop the kernel's cache of each inode whose write failed for space, until cancelled."""
        async for ino in self._stale_receive:
            try:
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino, False)
            except OSError as exc:
                # ENOENT: the kernel has already forgotten the inode, and its pages with it.
                log.debug("invalidating inode %d failed: %s", ino, exc)
            finally:
                # Discarded only now, so the writes the invalidation itself flushes (and that
                # fail again) do not queue the inode once more.
                self._stale.discard(ino)

    def _queue_stale(self, ino: int, exc: PxfsError) -> None:
        if ino in self._stale:
            return
        try:
            self._stale_send.send_nowait(ino)
        except trio.WouldBlock:
            log.warning("invalidation queue full, so inode %d keeps its cached pages", ino)
            return
        self._stale.add(ino)
        log.warning("write to inode %d failed (%s), dropping its cached pages", ino, exc.message)

    # Entries

    @_fuse_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        try:
            return entry_attributes(self._volume.lookup(parent_inode, name))
        except NotFound:
            return _negative_entry()

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # forget has no reply, so it must not raise at all.
        for inode, nlookup in inode_list:
            try:
                self._volume.forget(inode, nlookup)
            except Exception:
                log.exception("forget of inode %d failed", inode)

    @_fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return entry_attributes(self._volume.getattr(inode))

    @_fuse_errors
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        changed = await self._volume.setattr(
            inode,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            ctime_ns=attr.st_ctime_ns if fields.update_ctime else None,
        )
        return entry_attributes(changed)

    @_fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self._volume.readlink(inode)

    @_fuse_errors
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        attr = self._volume.create(parent_inode, name, mode, ctx.uid, ctx.gid, rdev)
        return entry_attributes(attr)

    @_fuse_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return entry_attributes(self._volume.mkdir(parent_inode, name, mode, ctx.uid, ctx.gid))

    @_fuse_errors
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        attr = self._volume.symlink(parent_inode, name, target, ctx.uid, ctx.gid)
        return entry_attributes(attr)

    @_fuse_errors
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return entry_attributes(self._volume.link(inode, new_parent_inode, new_name))

    @_fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._volume.unlink(parent_inode, name)

    @_fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._volume.rmdir(parent_inode, name)

    @_fuse_errors
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        self._volume.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    # Files

    @_fuse_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        attr = self._volume.create(parent_inode, name, mode, ctx.uid, ctx.gid)
        self._volume.opened(attr.ino)
        return pyfuse3.FileInfo(fh=attr.ino, keep_cache=True), entry_attributes(attr)

    @_fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & os.O_TRUNC:
            # libfuse asks for atomic O_TRUNC, so without the writeback cache the kernel leaves
            # the truncation to the filesystem.
            await self._volume.setattr(inode, size=0)
        self._volume.opened(inode)
        # keep_cache: no other node writes this volume, so cached pages stay valid.
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    @_fuse_errors
    async def read(  # type: ignore[override]
        self, fh: int, off: int, size: int
    ) -> bytes | memoryview:
        # pyfuse3 (3.5) declares bytes but replies from any buffer, with no await after this
        # returns, so a view of a cached block reaches the kernel before a write can change it.
        if self._read_ahead_mountpoint is not None:
            raise_read_ahead(self._read_ahead_mountpoint)
            self._read_ahead_mountpoint = None
        with self.meter.measure("read") as request:
            data = await self._volume.read_buffer(fh, off, size)
            request.nbytes = len(data)
        return data

    @_fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        with self.meter.measure("write") as request:
            try:
                written = await self._volume.write(fh, off, buf)
            except (NoSpace, FileTooLarge) as exc:
                self._queue_stale(fh, exc)
                raise
            request.nbytes = written
        return written

    async def flush(self, fh: int) -> None:
        # The kernel writes back a file's dirty pages before it sends FLUSH, so nothing is left
        # to do here. ENOSYS makes the kernel stop sending FLUSH on every close().
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def release(self, fh: int) -> None:
        # The kernel ignores errors of release, so log them here.
        try:
            self._volume.released(fh)
        except Exception:
            log.exception("release of inode %d failed", fh)

    @_fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._volume.fsync(fh, datasync)

    # Directories

    @_fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        snapshot = self._volume.opendir(inode)
        fh = self._next_dir
        self._next_dir += 1
        self._dirs[fh] = snapshot
        self._dir_inodes[fh] = inode
        return fh

    @_fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dirs.get(fh)
        if entries is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if start_id == 0 and fh in self._served:
            # A rewinddir: POSIX wants it to show the directory as it is now, like ext4 does.
            entries = self._dirs[fh] = self._volume.opendir(self._dir_inodes[fh])
        self._served.add(fh)
        for index in range(start_id, len(entries)):
            name, inode = entries[index]
            try:
                attr = self._volume.getattr(inode)
            except NotFound:
                continue
            if not pyfuse3.readdir_reply(token, name, entry_attributes(attr), index + 1):
                return
            # The kernel takes no reference on "." and "..", so they count no lookup.
            if name not in (b".", b".."):
                self._volume.remember(inode)

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)
        self._dir_inodes.pop(fh, None)
        self._served.discard(fh)

    @_fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self._volume.sync()

    @_fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        stats = self._volume.statfs()
        data = pyfuse3.StatvfsData()
        data.f_bsize = stats["block_size"]
        data.f_frsize = stats["block_size"]
        data.f_blocks = stats["blocks"]
        data.f_bfree = stats["free"]
        data.f_bavail = stats["free"]
        data.f_files = stats["files"]
        data.f_ffree = stats["free_files"]
        data.f_favail = stats["free_files"]
        data.f_namemax = stats["name_max"]
        return data

    # Extended attributes

    @_fuse_errors
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        # pyfuse3 (3.5) checks XATTR_CREATE and XATTR_REPLACE itself with getxattr first.
        self._volume.setxattr(inode, name, value)

    @_fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return self._volume.getxattr(inode, name)

    @_fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return self._volume.listxattr(inode, privileged=ctx.uid == 0)

    @_fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._volume.removexattr(inode, name)
