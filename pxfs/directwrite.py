"""Writes of runs of whole blocks that bypass the page cache (O_DIRECT).

A buffered write makes the kernel allocate a page-cache page for every 4 KiB, and on the
virtual machines of docs/benchmarks.md a new page costs 3 to 12 us. With buffered writes, a
1 GiB write to a volume with three replicas on one host took 0.8 to 3.6 s of system time in
each pxd. With O_DIRECT the data goes from pxd's buffer to the disk without the page cache, and
the same write took 0.2 to 0.4 s.

Only runs of at least MIN_RUN_BLOCKS consecutive blocks are written this way, because a direct
write waits for the disk and a buffered write of one scattered block does not. The replica
gives it only unwritten blocks (pxfs/replica.py). Reads stay buffered. Before a direct write,
the kernel writes back and drops the cached pages of its range, so a later buffered read
returns the new bytes. An fdatasync through any descriptor of the file makes the direct writes
durable too.

O_DIRECT needs the buffer, the offset and the length aligned to the disk's logical block size.
Offsets and lengths are multiples of the 64 KiB block, and the buffer is an anonymous mmap,
which starts on a page boundary. Where the filesystem rejects O_DIRECT with EINVAL, at the open
or at a write, the writer turns itself off and the blocks go through the page cache.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

#: The shortest run of consecutive blocks written with O_DIRECT.
MIN_RUN_BLOCKS = 8
#: The maximum run copied into the buffer at once. Longer runs take several writes.
MAX_RUN_BLOCKS = 64


class DirectWriter:
    """A writer of runs of consecutive blocks of one file, with O_DIRECT and one aligned buffer.

    Not safe for two threads at once. The replica's lock keeps its calls one at a time.
    """

    def __init__(self, fd: int | None, block_size: int) -> None:
        self._fd = fd
        self._block_size = block_size
        self._buffer: mmap.mmap | None = None

    @classmethod
    def open(cls, path: Path, block_size: int) -> DirectWriter:
        """Open `path` for direct writes. Where the filesystem rejects them, `write` returns False.

        `path` may be /proc/self/fd/N, which opens the file of descriptor N again.
        """
        try:
            fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            log.info(
                "O_DIRECT open of %s failed with EINVAL, writing through the page cache",
                os.path.realpath(path),
            )
            return cls(None, block_size)
        return cls(fd, block_size)

    @property
    def enabled(self) -> bool:
        """Whether writes still bypass the page cache."""
        return self._fd is not None

    def write(self, first: int, blocks: Sequence[bytes | bytearray | memoryview]) -> bool:
        """Write `blocks`, whole and consecutive from block `first`, and return True.

        Returns False when direct writes are off or the filesystem rejects them, and after a
        short write. The caller then writes every block through the page cache. Raises OSError
        for other failures, ENOSPC among them, after which a prefix of the blocks may be written.
        """
        if not self.enabled or not blocks:
            return False
        size = self._block_size
        for start in range(0, len(blocks), MAX_RUN_BLOCKS):
            run = blocks[start : start + MAX_RUN_BLOCKS]
            if not self._write_run((first + start) * size, run):
                return False
        return True

    def _write_run(self, offset: int, blocks: Sequence[bytes | bytearray | memoryview]) -> bool:
        if self._fd is None:
            return False
        size = self._block_size
        length = len(blocks) * size
        if self._buffer is None or len(self._buffer) < length:
            if self._buffer is not None:
                self._buffer.close()
            self._buffer = mmap.mmap(-1, max(length, MIN_RUN_BLOCKS * size))
        with memoryview(self._buffer) as view:
            for index, data in enumerate(blocks):
                view[index * size : (index + 1) * size] = data
            try:
                written = os.pwrite(self._fd, view[:length], offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                written = -1
        if written < 0:
            log.info("O_DIRECT write rejected with EINVAL, writing through the page cache")
            self.close()
            return False
        return written == length

    def close(self) -> None:
        """Close the descriptor and free the buffer; later writes return False."""
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None
