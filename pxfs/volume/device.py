"""Block devices: the BlockDevice protocol, an in-memory device and a sparse-file device.

A volume is an array of `nblocks` blocks of BLOCK_SIZE bytes and every I/O moves whole blocks.
The replication client implements the same protocol over RPC; MemoryDevice serves the unit tests
(it can also replay a crash that keeps only part of the unflushed writes) and FileDevice serves
tools, tests and single-node use.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import trio

from pxfs.errors import (
    ChecksumMismatch,
    InternalError,
    InvalidArgument,
    NoSpace,
    NotFound,
    PxfsError,
    Unavailable,
)

log = logging.getLogger(__name__)

BLOCK_SIZE = 65536
ZERO_BLOCK = bytes(BLOCK_SIZE)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_MAX_IOV = 256


class BlockDevice(Protocol):
    """An array of `nblocks` blocks of BLOCK_SIZE bytes."""

    nblocks: int

    async def read_blocks(self, blocknos: Sequence[int]) -> list[bytes]:
        """Read blocks; a block never written reads as zeros."""
        ...

    async def write_blocks(
        self,
        blocks: Sequence[tuple[int, BlockData]],
        changes: Mapping[int, BlockChange] | None = None,
    ) -> None:
        """Write whole blocks.

        `changes` may tell, for some of the blocks, the only bytes that differ from the block
        the device holds. A device may then send only those bytes; it must still store the
        whole block given.
        """
        ...

    async def trim_blocks(self, blocknos: Sequence[int]) -> None:
        """Release blocks; later reads return zeros."""
        ...

    async def flush(self) -> None:
        """Return once every completed write is durable."""
        ...

    async def grow(self, nblocks: int) -> None:
        """Make the device `nblocks` blocks long, durably; equal is a no-op, smaller raises.

        The new blocks read as zeros. Raises NoSpace, with the size unchanged, when the storage
        under the device cannot hold the larger size.
        """
        ...


#: The bytes of one block as a write gets them: a bytearray that the caller does not change
#: until the write returns, or bytes.
BlockData = bytes | bytearray


def _crc32_combine_function() -> Callable[[int, int, int], int] | None:
    """Return zlib's crc32_combine from the C library, or None where it cannot be loaded."""
    # The soname, not ctypes.util.find_library, which runs ldconfig in a subprocess.
    try:
        function = ctypes.CDLL("libz.so.1").crc32_combine
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_ulong, ctypes.c_ulong, ctypes.c_long]
    function.restype = ctypes.c_ulong
    return function


_CRC32_COMBINE = _crc32_combine_function()


@functools.lru_cache(maxsize=256)
def _zeros_crc32(length: int) -> int:
    return zlib.crc32(bytes(length))


def crc32_after_change(base: int, start: int, old: bytes, block: BlockData) -> int:
    """Return the crc32 of `block`, given the crc32 `base` it had with `old` at `start`.

    crc32 is affine over XOR: for blocks a and b of one length n, crc(a ^ b) = crc(a) ^ crc(b)
    ^ crc(zeros(n)). So the crc32 of the change (old ^ new) comes from the crc32 of the old and
    of the new bytes, and crc32_combine places it at `start`. This reads about 8 KiB for a
    4 KiB write instead of the whole block, and builds no XOR of the bytes.
    """
    end = start + len(old)
    if _CRC32_COMBINE is None:
        return zlib.crc32(block)
    new = memoryview(block)[start:end]
    delta = zlib.crc32(old) ^ zlib.crc32(new) ^ _zeros_crc32(len(old))
    tail = len(block) - end
    spread = _CRC32_COMBINE(_zeros_crc32(start), delta, len(old))
    spread = _CRC32_COMBINE(spread, _zeros_crc32(tail), tail)
    return int(base ^ spread ^ _zeros_crc32(len(block)))


class BlockChange(NamedTuple):
    """The bytes [start, end) that a write changes in a block whose stored crc32 is `base`.

    `crc` is the crc32 of the whole block after the write.
    """

    start: int
    end: int
    base: int
    crc: int


@dataclass
class DeviceStats:
    """Counts of device calls and of the blocks they moved."""

    read_calls: int = 0
    write_calls: int = 0
    trim_calls: int = 0
    flush_calls: int = 0
    blocks_read: int = 0
    blocks_written: int = 0
    blocks_changed: int = 0


def check_blocknos(nblocks: int, blocknos: Sequence[int]) -> None:
    """Raise InvalidArgument unless every block number lies in 0..nblocks-1."""
    for blockno in blocknos:
        if not 0 <= blockno < nblocks:
            raise InvalidArgument(f"block {blockno} is outside the device of {nblocks} blocks")


def check_block_data(nblocks: int, blocks: Sequence[tuple[int, BlockData]]) -> None:
    """Raise InvalidArgument unless every block is in range and exactly BLOCK_SIZE bytes long."""
    check_blocknos(nblocks, [blockno for blockno, _ in blocks])
    for blockno, data in blocks:
        if len(data) != BLOCK_SIZE:
            raise InvalidArgument(f"block {blockno} has {len(data)} bytes, not {BLOCK_SIZE}")


def check_grow(nblocks: int, new_nblocks: int) -> bool:
    """Return whether growing from `nblocks` to `new_nblocks` changes anything; raise to shrink."""
    if isinstance(new_nblocks, bool) or not isinstance(new_nblocks, int):
        raise InvalidArgument(f"invalid device size {new_nblocks!r}: expected a block count")
    if new_nblocks < nblocks:
        raise InvalidArgument(
            f"cannot shrink the device from {nblocks} to {new_nblocks} blocks: devices only grow"
        )
    return new_nblocks > nblocks


def block_runs(blocknos: Sequence[int]) -> Iterator[tuple[int, int]]:
    """Yield (first, count) for each run of consecutive numbers in a sorted sequence."""
    first = previous = -2
    count = 0
    for blockno in blocknos:
        if blockno == previous + 1:
            count += 1
        else:
            if count:
                yield first, count
            first, count = blockno, 1
        previous = blockno
    if count:
        yield first, count


class MemoryDevice:
    """A device held in a dict, with durability tracking and injectable bad blocks.

    Writes since the last flush are kept in order, so that `crashed()` can build the device that a
    power loss would leave behind: the flushed state plus any chosen subset of later writes.
    """

    def __init__(self, nblocks: int) -> None:
        if nblocks < 1:
            raise InvalidArgument(f"a device needs at least one block, not {nblocks}")
        self.nblocks = nblocks
        self.stats = DeviceStats()
        self.bad_blocks: set[int] = set()
        self._blocks: dict[int, bytes] = {}
        self._durable: dict[int, bytes] = {}
        self._unflushed: list[tuple[int, bytes | None]] = []

    async def read_blocks(self, blocknos: Sequence[int]) -> list[bytes]:
        """Read blocks; raises ChecksumMismatch for a block marked bad."""
        check_blocknos(self.nblocks, blocknos)
        await trio.lowlevel.checkpoint()
        self.stats.read_calls += 1
        self.stats.blocks_read += len(blocknos)
        for blockno in blocknos:
            if blockno in self.bad_blocks:
                raise ChecksumMismatch(f"block {blockno} failed its checksum")
        return [self._blocks.get(blockno, ZERO_BLOCK) for blockno in blocknos]

    async def write_blocks(
        self,
        blocks: Sequence[tuple[int, BlockData]],
        changes: Mapping[int, BlockChange] | None = None,
    ) -> None:
        """Store whole blocks; raises InternalError for a change that misdescribes its block."""
        check_block_data(self.nblocks, blocks)
        if changes:
            self._check_changes(blocks, changes)
        await trio.lowlevel.checkpoint()
        self.stats.write_calls += 1
        self.stats.blocks_written += len(blocks)
        for blockno, data in blocks:
            self._blocks[blockno] = bytes(data)
            self._unflushed.append((blockno, bytes(data)))
            self.bad_blocks.discard(blockno)

    def _check_changes(
        self, blocks: Sequence[tuple[int, BlockData]], changes: Mapping[int, BlockChange]
    ) -> None:
        """Check each change against the stored block, as a replica's store.patch relies on."""
        for blockno, data in blocks:
            change = changes.get(blockno)
            if change is None:
                continue
            stored = self._blocks.get(blockno, ZERO_BLOCK)
            if zlib.crc32(stored) != change.base:
                raise InternalError(f"block {blockno}: change from a base the device does not hold")
            if zlib.crc32(data) != change.crc:
                raise InternalError(f"block {blockno}: change with a wrong crc32 of the result")
            if stored[: change.start] != data[: change.start] or (
                stored[change.end :] != data[change.end :]
            ):
                raise InternalError(f"block {blockno}: bytes outside the change differ")
            self.stats.blocks_changed += 1

    async def trim_blocks(self, blocknos: Sequence[int]) -> None:
        """Forget blocks."""
        check_blocknos(self.nblocks, blocknos)
        await trio.lowlevel.checkpoint()
        self.stats.trim_calls += 1
        for blockno in blocknos:
            self._blocks.pop(blockno, None)
            self._unflushed.append((blockno, None))

    async def flush(self) -> None:
        """Make every completed write durable."""
        await trio.lowlevel.checkpoint()
        self.stats.flush_calls += 1
        self._apply(self._durable, self._unflushed)
        self._unflushed.clear()

    async def grow(self, nblocks: int) -> None:
        """Add zero blocks at the end; the new size counts as durable at once."""
        if check_grow(self.nblocks, nblocks):
            await trio.lowlevel.checkpoint()
            self.nblocks = nblocks

    @property
    def unflushed_writes(self) -> int:
        """The number of writes and trims made since the last flush."""
        return len(self._unflushed)

    def unflushed_blocks(self) -> list[int]:
        """Return the block numbers written or trimmed since the last flush, in order."""
        return [blockno for blockno, _ in self._unflushed]

    def stored_blocks(self) -> list[int]:
        """Return the numbers of the blocks that hold data, sorted."""
        return sorted(self._blocks)

    def peek(self, blockno: int) -> bytes:
        """Return the current content of a block without counting a read."""
        return self._blocks.get(blockno, ZERO_BLOCK)

    def poke(self, blockno: int, data: bytes) -> None:
        """Overwrite a block behind the back of its user, to inject damage in tests."""
        if len(data) != BLOCK_SIZE:
            raise InvalidArgument(f"block {blockno} must be {BLOCK_SIZE} bytes")
        self._blocks[blockno] = bytes(data)
        self._durable[blockno] = bytes(data)

    def crashed(self, keep: Sequence[int] = ()) -> MemoryDevice:
        """Return the device a power loss leaves: flushed state plus the unflushed writes `keep`.

        `keep` contains indexes into the writes made since the last flush. They are applied in
        their order, as a disk cache may persist any subset of them.
        """
        survivor = MemoryDevice(self.nblocks)
        survivor._blocks = dict(self._durable)
        kept = [self._unflushed[index] for index in sorted(set(keep))]
        self._apply(survivor._blocks, kept)
        survivor._durable = dict(survivor._blocks)
        return survivor

    @staticmethod
    def _apply(target: dict[int, bytes], writes: Sequence[tuple[int, bytes | None]]) -> None:
        for blockno, data in writes:
            if data is None:
                target.pop(blockno, None)
            else:
                target[blockno] = data


class FileDevice:
    """A device on a sparse file: pread/pwrite in worker threads, fdatasync on flush."""

    def __init__(self, path: str, fd: int, nblocks: int) -> None:
        self.path = path
        self.nblocks = nblocks
        self.stats = DeviceStats()
        self._fd = fd
        self._punch_holes = True

    @classmethod
    def open(cls, path: str, *, create_blocks: int | None = None) -> FileDevice:
        """Open a device file; with `create_blocks`, create it sparse at that size if missing."""
        flags = os.O_RDWR | os.O_CLOEXEC
        if create_blocks is not None:
            flags |= os.O_CREAT
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            raise NotFound(f"device file {path} does not exist") from None
        except OSError as exc:
            raise InvalidArgument(f"cannot open device file {path}: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size == 0 and create_blocks is not None:
                os.ftruncate(fd, create_blocks * BLOCK_SIZE)
                size = create_blocks * BLOCK_SIZE
            if size < BLOCK_SIZE or size % BLOCK_SIZE:
                raise InvalidArgument(
                    f"device file {path} has {size} bytes, not a positive multiple of {BLOCK_SIZE}"
                )
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, size // BLOCK_SIZE)

    def close(self) -> None:
        """Close the file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    async def read_blocks(self, blocknos: Sequence[int]) -> list[bytes]:
        """Read blocks, one pread per run of consecutive blocks."""
        check_blocknos(self.nblocks, blocknos)
        self.stats.read_calls += 1
        self.stats.blocks_read += len(blocknos)
        return await trio.to_thread.run_sync(self._read_sync, list(blocknos))

    async def write_blocks(
        self,
        blocks: Sequence[tuple[int, BlockData]],
        changes: Mapping[int, BlockChange] | None = None,
    ) -> None:
        """Write blocks, one pwritev per run of consecutive blocks; `changes` is not used."""
        check_block_data(self.nblocks, blocks)
        self.stats.write_calls += 1
        self.stats.blocks_written += len(blocks)
        latest = dict(blocks)
        await trio.to_thread.run_sync(self._write_sync, latest)

    async def trim_blocks(self, blocknos: Sequence[int]) -> None:
        """Punch holes for blocks, or write zeros where the file system cannot punch."""
        check_blocknos(self.nblocks, blocknos)
        self.stats.trim_calls += 1
        await trio.to_thread.run_sync(self._trim_sync, sorted(set(blocknos)))

    async def flush(self) -> None:
        """fdatasync the file."""
        self.stats.flush_calls += 1
        await trio.to_thread.run_sync(self._flush_sync)

    async def grow(self, nblocks: int) -> None:
        """Extend the sparse file to `nblocks` blocks and fsync it."""
        if check_grow(self.nblocks, nblocks):
            await trio.to_thread.run_sync(self._grow_sync, nblocks)
            self.nblocks = nblocks

    def _grow_sync(self, nblocks: int) -> None:
        try:
            os.ftruncate(self._fd, nblocks * BLOCK_SIZE)
            # fsync, not fdatasync: the new file size is the change to make durable.
            os.fsync(self._fd)
        except OSError as exc:
            # Undo a size change that did reach the file, so the device matches `nblocks`.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self.nblocks * BLOCK_SIZE)
            if exc.errno == errno.EFBIG:
                raise NoSpace(
                    f"device file {self.path} cannot grow to {nblocks * BLOCK_SIZE} bytes: "
                    "the file system's maximum file size is smaller"
                ) from None
            raise _io_error(self.path, "grow", exc) from None

    def _read_sync(self, blocknos: list[int]) -> list[bytes]:
        found: dict[int, bytes] = {}
        for first, count in block_runs(sorted(set(blocknos))):
            data = self._pread(count * BLOCK_SIZE, first * BLOCK_SIZE)
            for index in range(count):
                found[first + index] = data[index * BLOCK_SIZE : (index + 1) * BLOCK_SIZE]
        return [found[blockno] for blockno in blocknos]

    def _pread(self, size: int, offset: int) -> bytes:
        try:
            data = os.pread(self._fd, size, offset)
        except OSError as exc:
            raise _io_error(self.path, "read", exc) from None
        if len(data) < size:
            data += bytes(size - len(data))
        return data

    def _write_sync(self, latest: dict[int, BlockData]) -> None:
        for first, count in block_runs(sorted(latest)):
            # pwritev takes at most IOV_MAX (1024 on Linux) buffers per call.
            for start in range(first, first + count, _MAX_IOV):
                end = min(start + _MAX_IOV, first + count)
                buffers = [latest[blockno] for blockno in range(start, end)]
                self._pwritev(buffers, start * BLOCK_SIZE)

    def _pwritev(self, buffers: list[BlockData], offset: int) -> None:
        total = len(buffers) * BLOCK_SIZE
        try:
            written = os.pwritev(self._fd, buffers, offset)
            if written != total:
                # A short write only happens on a full disk or a signal: finish with plain writes.
                joined = b"".join(buffers)
                while written < total:
                    written += os.pwrite(self._fd, joined[written:], offset + written)
        except OSError as exc:
            raise _io_error(self.path, "write", exc) from None

    def _trim_sync(self, blocknos: list[int]) -> None:
        for first, count in block_runs(blocknos):
            offset, length = first * BLOCK_SIZE, count * BLOCK_SIZE
            if self._punch_holes and self._punch(offset, length):
                continue
            for start in range(first, first + count, _MAX_IOV):
                end = min(start + _MAX_IOV, first + count)
                self._pwritev([ZERO_BLOCK] * (end - start), start * BLOCK_SIZE)

    def _punch(self, offset: int, length: int) -> bool:
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        if _libc.fallocate(self._fd, mode, offset, length) == 0:
            return True
        code = ctypes.get_errno()
        if code in (errno.EOPNOTSUPP, errno.ENOSYS):
            log.info("%s: cannot punch holes, trimming by writing zeros", self.path)
            self._punch_holes = False
            return False
        raise _io_error(self.path, "trim", OSError(code, os.strerror(code)))

    def _flush_sync(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise _io_error(self.path, "flush", exc) from None


def _io_error(path: str, what: str, exc: OSError) -> PxfsError:
    message = f"{what} of device file {path} failed: {exc.strerror}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(message)
    return Unavailable(message)


def _load_libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    libc.fallocate.restype = ctypes.c_int
    return libc


_libc = _load_libc()
