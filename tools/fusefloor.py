"""A pyfuse3 filesystem that stores nothing, to measure what the FUSE binding alone costs.

    python tools/fusefloor.py MOUNTPOINT [--size-mib 1024] [--no-poller]

It serves one regular file, `fio.data`, of --size-mib: a write is accepted and dropped, a read
returns zeros, and getxattr returns ENODATA, as on a file with no extended attributes. Requests go
through the same path as in a pxfs mount child: pyfuse3.main with pxfs's request poller and
mount options, and entry and attribute timeouts of a minute. So a job's rate on it is an upper
bound for a pxfs mount on the same machine, and tools/bench.py prints it beside pxfs.

It runs until the mount is unmounted (fusermount3 -u MOUNTPOINT), SIGINT or SIGTERM, and prints
"ready" on stdout once the mount is up.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
import sys
from pathlib import Path

import pyfuse3
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pxfs.fuseops import MOUNT_OPTIONS, POLLER  # noqa: E402

FILE_NAME = b"fio.data"
FILE_INODE = pyfuse3.ROOT_INODE + 1
TIMEOUT = 60.0
#: The largest size whose bytes fit in a file offset (off_t, 63 bits).
MAX_SIZE_MIB = (2**63 - 1) >> 20


class FloorOperations(pyfuse3.Operations):
    """The handlers of a root directory that contains one file, whose writes are dropped."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self._size = size

    def _attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.entry_timeout = entry.attr_timeout = TIMEOUT
        entry.st_nlink = 1
        entry.st_blksize = 4096
        if inode == pyfuse3.ROOT_INODE:
            entry.st_mode = stat.S_IFDIR | 0o755
        else:
            entry.st_mode = stat.S_IFREG | 0o644
            entry.st_size = self._size
            entry.st_blocks = self._size // 512
        return entry

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attributes(inode)

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == pyfuse3.ROOT_INODE and name == FILE_NAME:
            return self._attributes(FILE_INODE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        return self._attributes(inode)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return bytes(max(0, min(size, self._size - off)))

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return len(buf)

    async def fsync(self, fh: int, datasync: bool) -> None:
        pass

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, FILE_NAME, self._attributes(FILE_INODE), 1)


async def serve(mountpoint: Path, size: int, poller: bool) -> None:
    """Mount the filesystem on `mountpoint` and serve it until it is unmounted or signalled."""
    pyfuse3.init(FloorOperations(size), str(mountpoint), set(MOUNT_OPTIONS) | {"fsname=fusefloor"})
    try:
        async with trio.open_nursery() as nursery:
            if poller:
                nursery.start_soon(POLLER.run)
            nursery.start_soon(_cancel_on_signal, nursery.cancel_scope)
            print("ready", flush=True)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)


async def _cancel_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("--size-mib", type=int, default=1024, help="size of fio.data (1024)")
    parser.add_argument(
        "--no-poller", action="store_true", help="sleep in epoll between requests, as plain pyfuse3"
    )
    args = parser.parse_args(argv)
    if not args.mountpoint.is_dir():
        parser.error(f"{args.mountpoint} is not a directory")
    if not 1 <= args.size_mib <= MAX_SIZE_MIB:
        parser.error(f"--size-mib must be between 1 and {MAX_SIZE_MIB}")
    if os.path.ismount(args.mountpoint):
        parser.error(f"{args.mountpoint} is already a mountpoint; unmount it first")
    try:
        trio.run(serve, args.mountpoint, args.size_mib << 20, not args.no_poller)
    except RuntimeError as exc:
        print(f"fusefloor: mount on {args.mountpoint} failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
