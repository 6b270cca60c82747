"""The files of one volume replica on disk, and the blocking I/O on them.

A replica lives in ROOT/<vol_id>/ as three files. `data` is a sparse file of nblocks * BLOCK_SIZE
bytes. `table` has one 16-byte record per block with the version that last wrote or trimmed it
and the crc32 of its data. `meta` is a msgpack map with the volume id, nblocks and the highest
epoch seen.
docs/store-format.md describes the layout and what a crash or a full disk leaves behind.

Everything here blocks. pxfs/store.py runs it in worker threads, one call at a time per replica.
"""

from __future__ import annotations

import array
import ctypes
import errno
import hashlib
import logging
import os
import shutil
import struct
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import msgpack
import trio

from pxfs.errors import (
    AlreadyExists,
    ChecksumMismatch,
    Corrupted,
    InvalidArgument,
    NoSpace,
    StaleEpoch,
)

log = logging.getLogger(__name__)

BLOCK_SIZE = 65536
FORMAT_VERSION = 1
#: 2**32 blocks of 64 KiB is 256 TiB, and keeps a block table below 64 GiB.
MAX_NBLOCKS = 2**32
#: The version of a write is (epoch << 32) | counter, so an epoch must fit in 32 bits.
MAX_EPOCH = 2**32 - 1
MAX_VERSION = 2**64 - 1
#: Blocks that one digest of `store.digests` covers: 64 MiB of volume, 8 KiB of versions.
DIGEST_BLOCKS = 1024
#: Bytes of one digest: blake2b-128 of the versions of its blocks.
DIGEST_SIZE = 16

# One table record: version (u64), crc32 (u32) and flags (u32), little-endian. The flags word
# makes each version an aligned u64, which _count_unwritten relies on.
_RECORD = struct.Struct("<QII")
RECORD_SIZE = _RECORD.size
#: Flag of a record that a versioned trim left: the block reads as unwritten, but the record keeps
#: the trim's version so that replicas can tell an old trim from a newer one. Its crc32 is 0.
TRIMMED = 1
#: Flag bit that `store.checksums` sets, in its reply only, on a written block whose data fails
#: its crc32. It is never stored in the table.
DATA_BAD = 2
# The second u64 word of a trimmed record: crc32 0 in the low half, TRIMMED in the high half.
_TRIMMED_WORD = TRIMMED << 32
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_SCAN_BLOCKS = 65536

_DATA = "data"
_TABLE = "table"
_META = "meta"
_CREATING = ".creating-"
_DELETING = ".deleting-"

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


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.EIO, f"pwrite stored nothing at offset {offset}")
        view = view[written:]
        offset += written


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _record_words(records: bytes) -> array.array[int]:
    words = array.array("Q")
    words.frombytes(records)
    if sys.byteorder == "big":
        words.byteswap()
    return words


def _count_unwritten(records: bytes) -> int:
    """Count the records of `records` that are unwritten: version 0, or trimmed."""
    words = _record_words(records)
    # Each record is two u64 words, the version first. A trimmed record has a non-zero version,
    # so no record is counted twice. array.count runs in C, which keeps the scan of a large
    # table at load time fast.
    return words[0::2].count(0) + words[1::2].count(_TRIMMED_WORD)


def _versions_of(records: bytes) -> bytes:
    """Return the versions of `records` as little-endian u64s, 8 bytes per block."""
    words = _record_words(records)[0::2]
    if sys.byteorder == "big":
        words.byteswap()
    return words.tobytes()


def _unwritten(version: int, flags: int) -> bool:
    return version == 0 or bool(flags & TRIMMED)


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


def _no_space(exc: OSError) -> bool:
    return exc.errno in _NO_SPACE_ERRNOS


def write_meta(directory: Path, vol_id: str, nblocks: int, epoch: int) -> None:
    """Replace the meta file of a replica atomically: temporary file, fsync, rename."""
    meta = {"format": FORMAT_VERSION, "vol_id": vol_id, "nblocks": nblocks, "epoch": epoch}
    payload = msgpack.packb(meta, use_bin_type=True)
    temporary = directory / (_META + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            _pwrite_all(fd, payload, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, directory / _META)
    except BaseException:
        # A full disk fails the write; the partial temporary file must not stay behind.
        temporary.unlink(missing_ok=True)
        raise
    _fsync_dir(directory)


def parse_meta(raw: bytes, vol_id: str, path: Path) -> tuple[int, int]:
    """Parse a meta file into (nblocks, epoch), or raise Corrupted naming the file."""
    try:
        meta = msgpack.unpackb(raw, raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise Corrupted(f"replica metadata {path} cannot be decoded: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise Corrupted(f"replica metadata {path} is not format {FORMAT_VERSION}")
    if meta.get("vol_id") != vol_id:
        raise Corrupted(f"replica metadata {path} names volume {meta.get('vol_id')!r}")
    nblocks, epoch = meta.get("nblocks"), meta.get("epoch")
    if not isinstance(nblocks, int) or not 0 < nblocks <= MAX_NBLOCKS:
        raise Corrupted(f"replica metadata {path} has an invalid nblocks {nblocks!r}")
    if not isinstance(epoch, int) or not 0 <= epoch <= MAX_EPOCH:
        raise Corrupted(f"replica metadata {path} has an invalid epoch {epoch!r}")
    return nblocks, epoch


#: A block as `store.read_versioned` returns it: (version, data). data is None for an unwritten


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

    def count_used(self, first: int, stop: int) -> int:
        """Count the written blocks in [first, stop) by scanning the table."""
        used = 0
        for start in range(first, stop, _SCAN_BLOCKS):
            count = min(_SCAN_BLOCKS, stop - start)
            records = self._read_records(start, count)
            used += count - _count_unwritten(records)
        return used

    def _read_records(self, first: int, count: int) -> bytes:
        records = os.pread(self.table_fd, count * RECORD_SIZE, first * RECORD_SIZE)
        if len(records) != count * RECORD_SIZE:
            raise Corrupted(
                f"block table of volume {self.vol_id} ends before block {first + count}"
            )
        return records

    def _read_record(self, blockno: int) -> tuple[int, int, int]:
        version, crc, flags = _RECORD.unpack(self._read_records(blockno, 1))
        return version, crc, flags

    def save_meta(self, nblocks: int, epoch: int) -> None:
        """Write the meta file, raising NoSpace when the disk is full."""
        try:
            write_meta(self.directory, self.vol_id, nblocks, epoch)
        except OSError as exc:
            if not _no_space(exc):
                raise
            raise NoSpace(f"no space left to update the metadata of volume {self.vol_id}") from None

    def read_blocks(self, blocknos: Sequence[int]) -> list[bytes | None]:
        """Read blocks (None for a never-written one), raising ChecksumMismatch on a bad one."""
        result: list[bytes | None] = []
        for blockno in blocknos:
            version, crc, flags = self._read_record(blockno)
            if _unwritten(version, flags):
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
            if _unwritten(version, flags):
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
        return list(_RECORD.iter_unpack(self._read_records(first, len(blocknos))))

    def versions(self, first: int, count: int) -> bytes:
        """Return the versions of blocks [first, first + count) as little-endian u64s."""
        self.check_data_file()
        return _versions_of(self._read_records(first, count))

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
                versions = _versions_of(self._read_records(start, length))
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
            on_disk = os.stat(self.directory / _DATA)
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
        for index, (blockno, data) in enumerate(blocks):
            old = records[index] if records is not None else self._read_record(blockno)
            try:
                self._write_block(blockno, data, version, old)
            except NoSpace as exc:
                raise NoSpace(
                    f"{exc.message} ({index} of the {len(blocks)} blocks of the write were stored)"
                ) from None

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
            if flags or _unwritten(old_version, flags) or old_crc != patch.base:
                left.append(patch.blockno)
                continue
            try:
                _pwrite_all(self.data_fd, patch.data, patch.blockno * BLOCK_SIZE + patch.offset)
            except OSError as exc:
                if not _no_space(exc):
                    raise
                raise NoSpace(
                    f"no space left on this node for block {patch.blockno} of volume {self.vol_id}"
                ) from None
            self._changed(patch.blockno)
            record = _RECORD.pack(version, patch.crc, 0)
            _pwrite_all(self.table_fd, record, patch.blockno * RECORD_SIZE)
        return left

    def _write_block(
        self, blockno: int, data: bytes, version: int, old: tuple[int, int, int]
    ) -> None:
        """Write one block's data and then its record; `old` is the record it replaces."""
        old_version, _, old_flags = old
        try:
            _pwrite_all(self.data_fd, data, blockno * BLOCK_SIZE)
        except OSError as exc:
            if not _no_space(exc):
                raise
            self._release_failed_block(blockno, _unwritten(old_version, old_flags))
            raise NoSpace(
                f"no space left on this node for block {blockno} of volume {self.vol_id}"
            ) from None
        # NOTE: an overwrite cut short here (kill -9 inside the pwrite, or a power loss
        # before the next flush) leaves new data under the old record. The block then reads
        # as ChecksumMismatch rather than as its old content.
        record = _RECORD.pack(version, zlib.crc32(data), 0)
        self._changed(blockno)
        _pwrite_all(self.table_fd, record, blockno * RECORD_SIZE)
        if _unwritten(old_version, old_flags):
            self.used_blocks += 1

    def _release_failed_block(self, blockno: int, was_unwritten: bool) -> None:
        # A failed write into an unwritten block may have allocated part of it. The table
        # still marks the block unwritten, so that space is given back. On filesystems that
        # overwrite in place, a written block is fully allocated and cannot fail this way.
        if was_unwritten:
            self._punch(blockno, 1)

    def trim_blocks(self, blocknos: Sequence[int], version: int = 0) -> None:
        """Mark blocks unwritten, as trimmed by `version` when it is not 0, and free their space."""
        record = _RECORD.pack(version, 0, TRIMMED) if version else bytes(RECORD_SIZE)
        for first, count in _runs(sorted(set(blocknos))):
            records = self._read_records(first, count)
            written = count - _count_unwritten(records)
            # The table is cleared before the hole is punched. A crash in between then leaves
            # an unwritten block with stale bytes, never a written block whose data is gone.
            self._changed(first, count)
            _pwrite_all(self.table_fd, record * count, first * RECORD_SIZE)
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
            if not _no_space(exc):
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
        for index, (version, crc, flags) in enumerate(_RECORD.iter_unpack(records)):
            if _unwritten(version, flags):
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
            version, crc, flags = _RECORD.unpack_from(marked, offset)
            _RECORD.pack_into(marked, offset, version, crc, flags | DATA_BAD)
        return bytes(marked)

    def close(self) -> None:
        """Close the files, so that later operations raise NotFound."""
        if not self.closed:
            self.closed = True
            os.close(self.data_fd)
            os.close(self.table_fd)


def open_replica(root: Path, vol_id: str) -> Replica | None:
    """Open the replica of `vol_id` under `root`, or return None when there is none."""
    directory = root / vol_id
    meta_path = directory / _META
    try:
        raw = meta_path.read_bytes()
    except FileNotFoundError:
        if directory.exists():
            raise Corrupted(f"replica directory {directory} has no meta file") from None
        return None
    nblocks, epoch = parse_meta(raw, vol_id, meta_path)
    data_fd = _open_file(directory / _DATA, vol_id)
    try:
        table_fd = _open_file(directory / _TABLE, vol_id)
    except BaseException:
        os.close(data_fd)
        raise
    replica = Replica(vol_id, directory, nblocks, epoch, data_fd, table_fd)
    try:
        _check_file_sizes(replica)
        replica.used_blocks = replica.count_used(0, nblocks)
    except BaseException:
        replica.close()
        raise
    return replica


def _open_file(path: Path, vol_id: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise Corrupted(f"replica of volume {vol_id} has no {path.name} file") from None


def _check_file_sizes(replica: Replica) -> None:
    # Files longer than nblocks are what a crash during a resize leaves, and are harmless.
    if os.fstat(replica.data_fd).st_size < replica.nblocks * BLOCK_SIZE:
        raise Corrupted(f"data file of volume {replica.vol_id} is shorter than its nblocks")
    if os.fstat(replica.table_fd).st_size < replica.nblocks * RECORD_SIZE:
        raise Corrupted(f"block table of volume {replica.vol_id} is shorter than its nblocks")


def _remove_leftovers(root: Path) -> None:
    """Remove what a crash during a create or a delete left under `root`."""
    for entry in root.iterdir():
        if entry.name.startswith((_CREATING, _DELETING)):
            log.info("removing %s, left by an interrupted create or delete", entry)
            shutil.rmtree(entry, ignore_errors=True)


def create_replica(root: Path, vol_id: str, nblocks: int) -> None:
    """Create the files of a new replica in a staging directory, then rename it into place."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / vol_id
    if final.exists():
        raise AlreadyExists(f"volume {vol_id} already has a replica on this node")
    _remove_leftovers(root)
    staging = root / (_CREATING + vol_id)
    staging.mkdir(mode=0o700)
    try:
        _create_files(staging, vol_id, nblocks)
        os.rename(staging, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _create_files(directory: Path, vol_id: str, nblocks: int) -> None:
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    data_fd = os.open(directory / _DATA, flags, 0o600)
    try:
        os.ftruncate(data_fd, nblocks * BLOCK_SIZE)
        os.fsync(data_fd)
    except OSError as exc:
        if exc.errno != errno.EFBIG:
            raise
        raise InvalidArgument(
            f"volume {vol_id} of {nblocks} blocks is larger than a file under {directory.parent} "
            "can be"
        ) from None
    finally:
        os.close(data_fd)
    table_fd = os.open(directory / _TABLE, flags, 0o600)
    try:
        # The table is allocated up front so that updating a record never needs new space.
        os.posix_fallocate(table_fd, 0, nblocks * RECORD_SIZE)
        os.fsync(table_fd)
    except OSError as exc:
        if not _no_space(exc):
            raise
        raise NoSpace(
            f"no space left on this node for the {nblocks * RECORD_SIZE} byte block table "
            f"of volume {vol_id}"
        ) from None
    finally:
        os.close(table_fd)
    try:
        write_meta(directory, vol_id, nblocks, 0)
    except OSError as exc:
        if not _no_space(exc):
            raise
        raise NoSpace(f"no space left on this node for the metadata of volume {vol_id}") from None


def check_reset_epoch(root: Path, vol_id: str, epoch: int) -> None:
    """Raise StaleEpoch when the meta file of the replica, if readable, has a higher epoch."""
    meta_path = root / vol_id / _META
    try:
        _, seen = parse_meta(meta_path.read_bytes(), vol_id, meta_path)
    except (FileNotFoundError, Corrupted):
        return
    if epoch < seen:
        raise StaleEpoch(
            f"volume {vol_id}: epoch {epoch} is older than epoch {seen} seen by this replica; "
            "the volume was attached again since"
        )


def delete_replica(root: Path, vol_id: str) -> bool:
    """Remove the replica directory and return whether there was one."""
    doomed = root / (_DELETING + vol_id)
    shutil.rmtree(doomed, ignore_errors=True)
    try:
        # Renamed first, so that a crash half-way through the removal cannot leave a replica
        # directory with some of its files gone.
        os.rename(root / vol_id, doomed)
    except FileNotFoundError:
        return False
    _fsync_dir(root)
    shutil.rmtree(doomed)
    return True


def sync_and_close(handles: tuple[int, int]) -> None:
    """Make the writes completed through `handles` durable (fdatasync) and close them."""
    try:
        for fd in handles:
            os.fdatasync(fd)
    finally:
        for fd in handles:
            os.close(fd)
