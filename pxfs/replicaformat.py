"""The on-disk format of a volume replica: its constants, block table records and meta file.

A replica lives in ROOT/<vol_id>/ as three files. `data` is a sparse file of nblocks * BLOCK_SIZE
bytes. `table` has one 16-byte record per block with the version that last wrote or trimmed it
and the crc32 of its data. `meta` is a msgpack map with the volume id, nblocks and the highest
epoch seen.
docs/store-format.md describes the layout and what a crash or a full disk leaves behind.

pxfs/replica.py does the block I/O of an open replica, and pxfs/replicafiles.py creates, opens
and deletes replica directories. The functions that touch files block, and pxfs/store.py calls
them in worker threads.
"""

from __future__ import annotations

import array
import errno
import os
import struct
import sys
from pathlib import Path

import msgpack

from pxfs.errors import Corrupted

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
# makes each version an aligned u64, which count_unwritten relies on.
RECORD = struct.Struct("<QII")
RECORD_SIZE = RECORD.size
#: Flag of a record that a versioned trim left: the block reads as unwritten, but the record keeps
#: the trim's version so that replicas can tell an old trim from a newer one. Its crc32 is 0.
TRIMMED = 1
#: Flag bit that `store.checksums` sets, in its reply only, on a written block whose data fails
#: its crc32. It is never stored in the table.
DATA_BAD = 2
# The second u64 word of a trimmed record: crc32 0 in the low half, TRIMMED in the high half.
_TRIMMED_WORD = TRIMMED << 32
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)

DATA_FILE = "data"
TABLE_FILE = "table"
META_FILE = "meta"


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of `data` at `offset`, calling os.pwrite again after a short write."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.EIO, f"pwrite stored nothing at offset {offset}")
        view = view[written:]
        offset += written


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` durable, after a create, rename or unlink in it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_no_space(exc: OSError) -> bool:
    """Return whether `exc` reports a full disk or an exceeded quota."""
    return exc.errno in _NO_SPACE_ERRNOS


def _record_words(records: bytes) -> array.array[int]:
    words = array.array("Q")
    words.frombytes(records)
    if sys.byteorder == "big":
        words.byteswap()
    return words


def count_unwritten(records: bytes) -> int:
    """Count the records of `records` that are unwritten: version 0, or trimmed."""
    words = _record_words(records)
    # Each record is two u64 words, the version first. A trimmed record has a non-zero version,
    # so no record is counted twice. array.count runs in C, which keeps the scan of a large
    # table at load time fast.
    return words[0::2].count(0) + words[1::2].count(_TRIMMED_WORD)


def versions_of(records: bytes) -> bytes:
    """Return the versions of `records` as little-endian u64s, 8 bytes per block."""
    words = _record_words(records)[0::2]
    if sys.byteorder == "big":
        words.byteswap()
    return words.tobytes()


def is_unwritten(version: int, flags: int) -> bool:
    """Return whether a record of `version` and `flags` reads as unwritten: version 0 or trimmed."""
    return version == 0 or bool(flags & TRIMMED)


def write_meta(directory: Path, vol_id: str, nblocks: int, epoch: int) -> None:
    """Replace the meta file of a replica atomically: temporary file, fsync, rename."""
    meta = {"format": FORMAT_VERSION, "vol_id": vol_id, "nblocks": nblocks, "epoch": epoch}
    payload = msgpack.packb(meta, use_bin_type=True)
    temporary = directory / (META_FILE + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            pwrite_all(fd, payload, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, directory / META_FILE)
    except BaseException:
        # A full disk fails the write; the partial temporary file must not stay behind.
        temporary.unlink(missing_ok=True)
        raise
    fsync_dir(directory)


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
