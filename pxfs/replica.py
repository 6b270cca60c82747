"""One open volume replica: the blocking I/O on its data file and block table.

pxfs/replicaformat.py defines the files and their records, and pxfs/replicafiles.py opens a
replica. Everything here blocks. pxfs/store.py runs it in worker threads, one call at a time per
replica.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import trio

from pxfs.directwrite import MIN_RUN_BLOCKS, DirectWriter
from pxfs.errors import ChecksumMismatch, Corrupted, InvalidArgument, NoSpace
from pxfs.replicaformat import (
    BLOCK_SIZE,
    DATA_BAD,
    DATA_FILE,
    DIGEST_BLOCKS,
    DIGEST_SIZE,
    RECORD,
    RECORD_SIZE,
    TRIMMED,
    count_unwritten,
    is_no_space,
    is_unwritten,
    pwrite_all,
    versions_of,
    write_meta,
)

log = logging.getLogger(__name__)

_SCAN_BLOCKS = 65536

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_libc, "fallocate64", _libc.fallocate)
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


class Patch(NamedTuple):
    """A change of part of one block: `data` from `offset`, on a block whose crc32 is `base`.

    `crc` is the crc32 of the whole block after the change.
    """

    blockno: int
    offset: int
    data: bytes
    base: int
    crc: int


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free a byte range of `fd`, or return False if the filesystem cannot punch holes."""
    # os.posix_fallocate has no mode argument, so the hole is punched through libc directly.
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(code, os.strerror(code))


def _runs(blocknos: Sequence[int]) -> list[tuple[int, int]]:
    """Split sorted, distinct block numbers into (first, count) runs of consecutive blocks.

    A run has at most _SCAN_BLOCKS blocks, which bounds the table bytes handled at once.
    """
    runs: list[tuple[int, int]] = []
    for blockno in blocknos:
        if runs and runs[-1][0] + runs[-1][1] == blockno and runs[-1][1] < _SCAN_BLOCKS:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((blockno, 1))
    return runs


class Replica:
    """The open files and the counters of one volume replica.

    The methods do blocking I/O. They run in worker threads, and the caller holds `lock`, so no
    two of them run at once.
    """

    def __init__(
        self, vol_id: str, directory: Path, nblocks: int, epoch: int, data_fd: int, table_fd: int
    ) -> None:
        self.vol_id = vol_id
        self.directory = directory
        self.nblocks = nblocks
        self.epoch = epoch
        self.data_fd = data_fd
        self.table_fd = table_fd
        self.used_blocks = 0
        self.closed = False
        self.lock = trio.Lock()
        self._warned_no_punch = False
        #: The floor of the latest resync of this replica: writes, patches and trims at a lower
        #: version were sent before that resync started, and the store rejects them.
        self.fence = 0
        #: The digest of each region of DIGEST_BLOCKS blocks, by region index, as computed from
        #: the table. Every change of a record drops the digest of its region.
        self._digests: dict[int, bytes] = {}
        #: Opened by the first write of a run of blocks (pxfs/directwrite.py).
        self._direct: DirectWriter | None = None

    def count_used(self, first: int, stop: int) -> int:
        """Count the written blocks in [first, stop) by scanning the table."""
        used = 0
        for start in range(first, stop, _SCAN_BLOCKS):
            count = min(_SCAN_BLOCKS, stop - start)
            records = self._read_records(start, count)
            used += count - count_unwritten(records)
        return used

    def _read_records(self, first: int, count: int) -> bytes:
        records = os.pread(self.table_fd, count * RECORD_SIZE, first * RECORD_SIZE)
        if len(records) != count * RECORD_SIZE:
            raise Corrupted(
                f"block table of volume {self.vol_id} ends before block {first + count}"
            )
        return records

    def _read_record(self, blockno: int) -> tuple[int, int, int]:
        version, crc, flags = RECORD.unpack(self._read_records(blockno, 1))
        return version, crc, flags

    def save_meta(self, nblocks: int, epoch: int) -> None:
        """Write the meta file, raising NoSpace when the disk is full."""
        try:
            write_meta(self.directory, self.vol_id, nblocks, epoch)
        except OSError as exc:
            if not is_no_space(exc):
                raise
            raise NoSpace(f"no space left to update the metadata of volume {self.vol_id}") from None

    def read_blocks(self, blocknos: Sequence[int]) -> list[bytes | None]:
        """Read blocks (None for a never-written one), raising ChecksumMismatch on a bad one."""
        result: list[bytes | None] = []
        for blockno in blocknos:
            version, crc, flags = self._read_record(blockno)
            if is_unwritten(version, flags):
                result.append(None)
                continue
            data = os.pread(self.data_fd, BLOCK_SIZE, blockno * BLOCK_SIZE)
            self._check_block(blockno, data, crc)
            result.append(data)
        return result

    def read_versioned(self, blocknos: Sequence[int]) -> list[tuple[int, bytes | None | bool]]:
        """Read blocks as (version, data): data None when unwritten, False when its crc32 fails."""
        result: list[tuple[int, bytes | None | bool]] = []
        records = self._records_of(blocknos)
        for blockno, (version, crc, flags) in zip(blocknos, records, strict=True):
            if is_unwritten(version, flags):
                result.append((version, None))
                continue
            data = os.pread(self.data_fd, BLOCK_SIZE, blockno * BLOCK_SIZE)
            try:
                self._check_block(blockno, data, crc)
            except ChecksumMismatch:
                result.append((version, False))
            else:
                result.append((version, data))
        return result

    def _records_of(self, blocknos: Sequence[int]) -> list[tuple[int, int, int]]:
        """Return the (version, crc32, flags) records of `blocknos`, in their order."""
        records = self._consecutive_records(blocknos)
        if records is not None:
            return records
        return [self._read_record(blockno) for blockno in blocknos]

    def _consecutive_records(self, blocknos: Sequence[int]) -> list[tuple[int, int, int]] | None:
        """Return the records of `blocknos` read in one pread, or None if they are not a run.

        Resync, sequential reads and sequential writes ask for runs of consecutive blocks.
        """
        first = blocknos[0] if blocknos else 0
        if list(blocknos) != list(range(first, first + len(blocknos))):
            return None
        return list(RECORD.iter_unpack(self._read_records(first, len(blocknos))))

    def versions(self, first: int, count: int) -> bytes:
        """Return the versions of blocks [first, first + count) as little-endian u64s."""
        self.check_data_file()
        return versions_of(self._read_records(first, count))

    def digests(self, first: int, count: int) -> bytes:
        """Return the digest of each region of [first, first + count), DIGEST_SIZE bytes each.

        The range starts and ends at region boundaries: a region has DIGEST_BLOCKS blocks,
        except the last one of the replica, which ends at nblocks.
        """
        self.check_data_file()
        parts = []
        for region in range(first // DIGEST_BLOCKS, -(-(first + count) // DIGEST_BLOCKS)):
            digest = self._digests.get(region)
            if digest is None:
                start = region * DIGEST_BLOCKS
                length = min(DIGEST_BLOCKS, self.nblocks - start)
                versions = versions_of(self._read_records(start, length))
                digest = hashlib.blake2b(versions, digest_size=DIGEST_SIZE).digest()
                self._digests[region] = digest
            parts.append(digest)
        return b"".join(parts)

    def _changed(self, first: int, count: int = 1) -> None:
        """Drop the cached digests of the regions that blocks [first, first + count) are in."""
        for region in range(first // DIGEST_BLOCKS, (first + count - 1) // DIGEST_BLOCKS + 1):
            self._digests.pop(region, None)

    def check_data_file(self) -> None:
        """Raise Corrupted when the data file was removed, replaced or truncated while open."""
        try:
            on_disk = os.stat(self.directory / DATA_FILE)
        except FileNotFoundError:
            raise Corrupted(f"data file of volume {self.vol_id} is missing") from None
        opened = os.fstat(self.data_fd)
        if (on_disk.st_dev, on_disk.st_ino) != (opened.st_dev, opened.st_ino):
            raise Corrupted(f"data file of volume {self.vol_id} was replaced")
        if opened.st_size < self.nblocks * BLOCK_SIZE:
            raise Corrupted(f"data file of volume {self.vol_id} is shorter than its nblocks")

    def _check_block(self, blockno: int, data: bytes, crc: int) -> None:
        if len(data) != BLOCK_SIZE:
            message = f"volume {self.vol_id} block {blockno}: data file ends inside the block"
        else:
            actual = zlib.crc32(data)
            if actual == crc:
                return
            message = (
                f"volume {self.vol_id} block {blockno}: checksum mismatch "
                f"(table has {crc:08x}, data has {actual:08x})"
            )
        log.error("%s", message)
        raise ChecksumMismatch(message)

    def write_blocks(self, version: int, blocks: Sequence[tuple[int, bytes]]) -> None:
        """Write blocks in order, each data first and then its table record.

        Raises NoSpace when the disk fills. The blocks before the failing one are stored, and
        the failing block keeps its old content.
        """
        # Read ahead only for a run: a block given twice must see its first write's record.
        records = self._consecutive_records([blockno for blockno, _ in blocks])
        # Only a run of unwritten blocks goes direct. Its data is on the disk before any of its
        # records, and a crash in between must not leave written blocks with new data under
        # their old records, which would read as checksum failures.
        if (
            records is not None
            and len(blocks) >= MIN_RUN_BLOCKS
            and all(is_unwritten(old, flags) for old, _, flags in records)
            and self._write_direct(version, blocks)
        ):
            return
        for index, (blockno, data) in enumerate(blocks):
            old = records[index] if records is not None else self._read_record(blockno)
            try:
                self._write_block(blockno, data, version, old)
            except NoSpace as exc:
                raise NoSpace(
                    f"{exc.message} ({index} of the {len(blocks)} blocks of the write were stored)"
                ) from None

    def _write_direct(self, version: int, blocks: Sequence[tuple[int, bytes]]) -> bool:
        """Write consecutive unwritten blocks with O_DIRECT and then their records in one pwrite.

        Returns False when that is not possible, so that the caller writes them one by one. A
        full disk returns False as well: the writes one by one then store the blocks that fit
        and raise NoSpace at the first one that does not.
        """
        if self._direct is None:
            # The file of data_fd opened again, even if the path now names another file.
            self._direct = DirectWriter.open(Path(f"/proc/self/fd/{self.data_fd}"), BLOCK_SIZE)
        first = blocks[0][0]
        try:
            if not self._direct.write(first, [data for _, data in blocks]):
                return False
        except OSError as exc:
            if not is_no_space(exc):
                raise
            return False
        table = b"".join(RECORD.pack(version, zlib.crc32(data), 0) for _, data in blocks)
        self._changed(first, len(blocks))
        pwrite_all(self.table_fd, table, first * RECORD_SIZE)
        self.used_blocks += len(blocks)
        return True

    def patch_blocks(self, version: int, patches: Sequence[Patch]) -> list[int]:
        """Write parts of blocks in order, and return the blocks left alone.

        A patch changes only the block whose record has the crc32 `base`. That block holds the
        bytes that the writer patched, so its new record takes the writer's `crc` of the whole
        block without reading it back. A block that is unwritten, marked, or has another crc32
        is left alone and returned, for the writer to send whole. Raises NoSpace as
        write_blocks does.
        """
        left: list[int] = []
        for patch in patches:
            old_version, old_crc, flags = self._read_record(patch.blockno)
            if flags or is_unwritten(old_version, flags) or old_crc != patch.base:
                left.append(patch.blockno)
                continue
            try:
                pwrite_all(self.data_fd, patch.data, patch.blockno * BLOCK_SIZE + patch.offset)
            except OSError as exc:
                if not is_no_space(exc):
                    raise
                raise NoSpace(
                    f"no space left on this node for block {patch.blockno} of volume {self.vol_id}"
                ) from None
            self._changed(patch.blockno)
            record = RECORD.pack(version, patch.crc, 0)
            pwrite_all(self.table_fd, record, patch.blockno * RECORD_SIZE)
        return left

    def _write_block(
        self, blockno: int, data: bytes, version: int, old: tuple[int, int, int]
    ) -> None:
        """Write one block's data and then its record; `old` is the record it replaces."""
        old_version, _, old_flags = old
        try:
            pwrite_all(self.data_fd, data, blockno * BLOCK_SIZE)
        except OSError as exc:
            if not is_no_space(exc):
                raise
            self._release_failed_block(blockno, is_unwritten(old_version, old_flags))
            raise NoSpace(
                f"no space left on this node for block {blockno} of volume {self.vol_id}"
            ) from None
        # NOTE: an overwrite cut short here (kill -9 inside the pwrite, or a power loss
        # before the next flush) leaves new data under the old record. The block then reads
        # as ChecksumMismatch rather than as its old content.
        record = RECORD.pack(version, zlib.crc32(data), 0)
        self._changed(blockno)
        pwrite_all(self.table_fd, record, blockno * RECORD_SIZE)
        if is_unwritten(old_version, old_flags):
            self.used_blocks += 1

    def _release_failed_block(self, blockno: int, was_unwritten: bool) -> None:
        # A failed write into an unwritten block may have allocated part of it. The table
        # still marks the block unwritten, so that space is given back. On filesystems that
        # overwrite in place, a written block is fully allocated and cannot fail this way.
        if was_unwritten:
            self._punch(blockno, 1)

    def trim_blocks(self, blocknos: Sequence[int], version: int = 0) -> None:
        """Mark blocks unwritten, as trimmed by `version` when it is not 0, and free their space."""
        record = RECORD.pack(version, 0, TRIMMED) if version else bytes(RECORD_SIZE)
        for first, count in _runs(sorted(set(blocknos))):
            records = self._read_records(first, count)
            written = count - count_unwritten(records)
            # The table is cleared before the hole is punched. A crash in between then leaves
            # an unwritten block with stale bytes, never a written block whose data is gone.
            self._changed(first, count)
            pwrite_all(self.table_fd, record * count, first * RECORD_SIZE)
            self.used_blocks -= written
            self._punch(first, count)

    def copy_blocks(self, blocks: Sequence[tuple[int, int, int, bytes | None]]) -> int:
        """Store (blockno, expected, version, data) where the block's version is `expected`.

        data None trims the block under `version`. Returns how many blocks were stored; the
        others had changed since their version was read, and are left alone.
        """
        stored = 0
        records = self._consecutive_records([blockno for blockno, _, _, _ in blocks])
        for index, (blockno, expected, version, data) in enumerate(blocks):
            current = records[index] if records is not None else self._read_record(blockno)
            if current[0] != expected:
                continue
            if data is None:
                self.trim_blocks([blockno], version)
            else:
                self._write_block(blockno, data, version, current)
            stored += 1
        return stored

    def _punch(self, first: int, count: int) -> None:
        if _punch_hole(self.data_fd, first * BLOCK_SIZE, count * BLOCK_SIZE):
            return
        if not self._warned_no_punch:
            self._warned_no_punch = True
            log.warning(
                "filesystem under %s cannot punch holes: trimmed blocks of volume %s keep "
                "their disk space",
                self.directory,
                self.vol_id,
            )

    def flush_handles(self) -> tuple[int, int]:
        """Check the data file (`check_data_file`) and return new descriptors of the two files.

        The caller syncs and closes them. A duplicate shares the open file of the original, so
        its sync makes the writes completed through the original durable too. The caller can
        then sync without the replica's lock, and writes continue during the sync.
        """
        self.check_data_file()
        data_fd = os.dup(self.data_fd)
        try:
            return data_fd, os.dup(self.table_fd)
        except OSError:
            os.close(data_fd)
            raise

    def resize(self, nblocks: int) -> None:
        """Grow or shrink the replica to `nblocks` blocks."""
        # The last region ends at nblocks, so its digest covers other blocks afterwards.
        self._digests.clear()
        if nblocks > self.nblocks:
            self._grow(nblocks)
        elif nblocks < self.nblocks:
            self._shrink(nblocks)

    def _grow(self, nblocks: int) -> None:
        old = self.nblocks
        # A crash during an earlier shrink can leave bytes past the old end. They are dropped,
        # so that the new blocks start unwritten.
        os.ftruncate(self.table_fd, old * RECORD_SIZE)
        os.ftruncate(self.data_fd, old * BLOCK_SIZE)
        try:
            os.posix_fallocate(self.table_fd, old * RECORD_SIZE, (nblocks - old) * RECORD_SIZE)
        except OSError as exc:
            os.ftruncate(self.table_fd, old * RECORD_SIZE)
            if not is_no_space(exc):
                raise
            raise NoSpace(
                f"no space left on this node to grow the block table of volume {self.vol_id}"
            ) from None
        try:
            os.ftruncate(self.data_fd, nblocks * BLOCK_SIZE)
        except OSError as exc:
            if exc.errno != errno.EFBIG:
                raise
            raise InvalidArgument(
                f"volume {self.vol_id} cannot grow to {nblocks} blocks: that is larger than a "
                f"file under {self.directory.parent} can be"
            ) from None
        os.fsync(self.table_fd)
        os.fsync(self.data_fd)
        # The meta file is the authority on nblocks, so it changes only once the files fit.
        self.save_meta(nblocks, self.epoch)
        self.nblocks = nblocks

    def _shrink(self, nblocks: int) -> None:
        dropped = self.count_used(nblocks, self.nblocks)
        self.save_meta(nblocks, self.epoch)
        self.nblocks = nblocks
        self.used_blocks -= dropped
        os.ftruncate(self.table_fd, nblocks * RECORD_SIZE)
        os.ftruncate(self.data_fd, nblocks * BLOCK_SIZE)

    def verify(self, first: int, stop: int) -> list[int]:
        """Return the written blocks in [first, stop) whose data fails its checksum."""
        bad = []
        records = self._read_records(first, stop - first)
        for index, (version, crc, flags) in enumerate(RECORD.iter_unpack(records)):
            if is_unwritten(version, flags):
                continue
            blockno = first + index
            data = os.pread(self.data_fd, BLOCK_SIZE, blockno * BLOCK_SIZE)
            if len(data) != BLOCK_SIZE or zlib.crc32(data) != crc:
                bad.append(blockno)
        return bad

    def checksums(self, first: int, count: int, check_data: bool) -> bytes:
        """Return the table records of [first, first + count), DATA_BAD set on bad data."""
        self.check_data_file()
        records = self._read_records(first, count)
        if not check_data:
            return records
        marked = bytearray(records)
        for blockno in self.verify(first, first + count):
            offset = (blockno - first) * RECORD_SIZE
            version, crc, flags = RECORD.unpack_from(marked, offset)
            RECORD.pack_into(marked, offset, version, crc, flags | DATA_BAD)
        return bytes(marked)

    def close(self) -> None:
        """Close the files, so that later operations raise NotFound."""
        if not self.closed:
            self.closed = True
            if self._direct is not None:
                self._direct.close()
            os.close(self.data_fd)
            os.close(self.table_fd)


def sync_and_close(handles: tuple[int, int]) -> None:
    """Make the writes completed through `handles` durable (fdatasync) and close them."""
    try:
        for fd in handles:
            os.fdatasync(fd)
    finally:
        for fd in handles:
            os.close(fd)
