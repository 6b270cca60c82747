"""The on-volume format: superblock and geometry, the metadata model and the block allocator.

Block 0 holds the superblock. The journal ring, two checkpoint slots and the data region follow.
The metadata of a mounted volume lives in memory as a `Tree` of `Inode` objects. The tree changes
only through `Tree.apply`, one change at a time, both while mounted and during journal replay,
so the replayed state is exactly the state that the journal records describe.
docs/volume-format.md describes the layout byte by byte.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import logging
import operator
import stat
import struct
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import msgpack

from pxfs.errors import Corrupted, InvalidArgument, NoSpace, NotFound
from pxfs.volume.device import BLOCK_SIZE, ZERO_BLOCK

log = logging.getLogger(__name__)

SUPERBLOCK_MAGIC = b"PXFS-SB\x00"
FORMAT_VERSION = 1
MIB = 1024 * 1024
DEFAULT_JOURNAL_BYTES = 32 * MIB
DEFAULT_CHECKPOINT_BYTES = 256 * MIB
MIN_DATA_BLOCKS = 16
ROOT_INO = 1
NAME_MAX = 255
SYMLINK_MAX = 4095
#: Checkpoint bytes set aside per inode; the slot size divided by it is the inode limit.
INODE_BUDGET = 256
#: Block numbers stay below 2**32, the replica store's limit, which also keeps each one at five
#: bytes of msgpack.
MAX_DEVICE_BLOCKS = 2**32
#: The maximum image bytes of one mapped block: a run of its own, [file index, block, 1], is a
#: uint32, a uint32 and a fixint in msgpack.
MAP_BYTES_PER_BLOCK = 11
#: A file index past this would put the file's size beyond the 2**63 - 1 bytes of an off_t.
MAX_FILE_BLOCKS = 2**63 // BLOCK_SIZE
#: The length of the random id that format gives each volume, which seeds its journal chain.
FORMAT_ID_BYTES = 16

_DIGEST_SIZE = 16


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=_DIGEST_SIZE).digest()


# Geometry and superblock


@dataclass(frozen=True)
class Geometry:
    """The size in blocks of each region of a volume, and where each one starts."""

    journal_blocks: int
    checkpoint_blocks: int
    data_blocks: int

    journal_start = 1

    @property
    def checkpoint_starts(self) -> tuple[int, int]:
        """The first block of each of the two checkpoint slots."""
        first = self.journal_start + self.journal_blocks
        return first, first + self.checkpoint_blocks

    @property
    def data_start(self) -> int:
        """The first block of the data region."""
        return self.checkpoint_starts[1] + self.checkpoint_blocks

    @property
    def nblocks(self) -> int:
        """The number of blocks the device needs."""
        return self.data_start + self.data_blocks

    @property
    def journal_bytes(self) -> int:
        """The size of the journal ring in bytes."""
        return self.journal_blocks * BLOCK_SIZE

    @property
    def max_inodes(self) -> int:
        """The inode limit that keeps a checkpoint inside its slot."""
        return self.checkpoint_blocks * BLOCK_SIZE // INODE_BUDGET

    @property
    def max_data_blocks(self) -> int:
        """The data region limit: every block mapped in a run of its own fills one slot."""
        image_bytes = (self.checkpoint_blocks - 1) * BLOCK_SIZE
        return min(image_bytes // MAP_BYTES_PER_BLOCK, MAX_DEVICE_BLOCKS - self.data_start)

    @property
    def max_size(self) -> int:
        """The largest volume size in bytes that this geometry's checkpoint slots allow."""
        return self.max_data_blocks * BLOCK_SIZE

    def grown(self, size: int) -> Geometry:
        """Return this geometry with a data region of `size` bytes; raises over `max_size`."""
        data_blocks = -(-size // BLOCK_SIZE)
        if data_blocks > self.max_data_blocks:
            raise InvalidArgument(
                f"volume size {size} exceeds the maximum of {self.max_size} bytes for "
                f"checkpoint slots of {self.checkpoint_blocks * BLOCK_SIZE} bytes"
            )
        return Geometry(self.journal_blocks, self.checkpoint_blocks, data_blocks)

    def is_data(self, blockno: int) -> bool:
        """Tell whether a block number lies in the data region."""
        return self.data_start <= blockno < self.nblocks

    @classmethod
    def for_size(
        cls,
        size: int,
        journal_bytes: int = DEFAULT_JOURNAL_BYTES,
        checkpoint_bytes: int = DEFAULT_CHECKPOINT_BYTES,
    ) -> Geometry:
        """Return the geometry of a volume of `size` bytes, rounded up to whole blocks."""
        if size < MIN_DATA_BLOCKS * BLOCK_SIZE:
            raise InvalidArgument(
                f"volume size {size} is below the minimum of {MIN_DATA_BLOCKS * BLOCK_SIZE} bytes"
            )
        journal_blocks = -(-journal_bytes // BLOCK_SIZE)
        checkpoint_blocks = -(-checkpoint_bytes // BLOCK_SIZE)
        if journal_blocks < 2 or checkpoint_blocks < 2:
            raise InvalidArgument("the journal and each checkpoint slot need at least two blocks")
        return cls(journal_blocks, checkpoint_blocks, MIN_DATA_BLOCKS).grown(size)


def device_blocks(size: int) -> int:
    """Return the number of device blocks that a volume of `size` bytes needs by default."""
    return Geometry.for_size(size).nblocks


@dataclass(frozen=True)
class Superblock:
    """The contents of block 0."""

    uuid: str
    size: int
    geometry: Geometry
    format_id: bytes
    version: int = FORMAT_VERSION

    def encode(self) -> bytes:
        """Return the superblock as one block."""
        body: bytes = msgpack.packb(
            {
                "version": self.version,
                "uuid": self.uuid,
                "format_id": self.format_id,
                "size": self.size,
                "block_size": BLOCK_SIZE,
                "journal_start": self.geometry.journal_start,
                "journal_blocks": self.geometry.journal_blocks,
                "checkpoint_starts": list(self.geometry.checkpoint_starts),
                "checkpoint_blocks": self.geometry.checkpoint_blocks,
                "data_start": self.geometry.data_start,
                "data_blocks": self.geometry.data_blocks,
            }
        )
        block = SUPERBLOCK_MAGIC + len(body).to_bytes(4, "little") + body + _digest(body)
        return block + bytes(BLOCK_SIZE - len(block))

    @classmethod
    def decode(cls, block: bytes) -> Superblock:
        """Parse block 0; raises NotFound for a blank block and Corrupted for a damaged one."""
        if block == ZERO_BLOCK:
            raise NotFound("the device holds no pxfs volume (block 0 is blank)")
        if not block.startswith(SUPERBLOCK_MAGIC):
            raise Corrupted("block 0 holds no pxfs superblock (bad magic)")
        start = len(SUPERBLOCK_MAGIC) + 4
        length = int.from_bytes(block[start - 4 : start], "little")
        body = block[start : start + length]
        if start + length + _DIGEST_SIZE > len(block) or block[
            start + length : start + length + _DIGEST_SIZE
        ] != _digest(body):
            raise Corrupted("the superblock fails its checksum")
        try:
            return cls._from_fields(msgpack.unpackb(body))
        except (KeyError, TypeError, ValueError) as exc:
            raise Corrupted(f"the superblock has invalid fields: {exc}") from None

    @classmethod
    def _from_fields(cls, fields: dict[str, Any]) -> Superblock:
        if not isinstance(fields, dict):
            raise Corrupted("the superblock body is not a map")
        if not _is_int(fields["version"]) or fields["version"] != FORMAT_VERSION:
            raise Corrupted(f"unsupported volume format version {fields['version']!r:.40}")
        if not _is_int(fields["block_size"]) or fields["block_size"] != BLOCK_SIZE:
            raise Corrupted(f"unsupported block size {fields['block_size']!r:.40}")
        geometry = _stored_geometry(fields)
        size = fields["size"]
        if not _is_int(size) or -(-size // BLOCK_SIZE) != geometry.data_blocks:
            raise Corrupted(
                f"the superblock's size {size!r:.40} does not match its "
                f"{geometry.data_blocks} data blocks"
            )
        uuid, format_id = fields["uuid"], fields["format_id"]
        if not isinstance(uuid, str) or not uuid:
            raise Corrupted(f"the superblock's uuid {uuid!r:.40} is not a non-empty string")
        if not isinstance(format_id, bytes) or len(format_id) != FORMAT_ID_BYTES:
            raise Corrupted(
                f"the superblock's format_id {format_id!r:.40} is not {FORMAT_ID_BYTES} bytes"
            )
        return cls(uuid, size, geometry, format_id)

    def grown(self, size: int) -> Superblock:
        """Return the superblock of this volume grown to `size` bytes."""
        return Superblock(self.uuid, size, self.geometry.grown(size), self.format_id, self.version)

    @property
    def chain_seed(self) -> bytes:
        """The digest that the first journal record of this volume chains from."""
        return _digest(b"pxfs journal " + self.format_id)[:8]


def _is_int(value: Any) -> bool:
    """Tell whether `value` is an int; bool, an int subclass, is not."""
    return type(value) is int


def _stored_geometry(fields: dict[str, Any]) -> Geometry:
    """Return the geometry the superblock fields describe; raises Corrupted if it is invalid."""
    sizes = [fields[name] for name in ("journal_blocks", "checkpoint_blocks", "data_blocks")]
    if not all(_is_int(value) for value in sizes):
        raise Corrupted(f"the superblock's region sizes {sizes!r:.80} are not all integers")
    geometry = Geometry(*sizes)
    if geometry.journal_blocks < 2 or geometry.checkpoint_blocks < 2:
        raise Corrupted("the superblock's journal or a checkpoint slot is under two blocks")
    # max_data_blocks is negative when the other regions alone pass MAX_DEVICE_BLOCKS.
    if not MIN_DATA_BLOCKS <= geometry.data_blocks <= geometry.max_data_blocks:
        raise Corrupted(
            f"the superblock's {geometry.data_blocks} data blocks are outside "
            f"{MIN_DATA_BLOCKS}..{geometry.max_data_blocks} for its checkpoint slots"
        )
    stored = (fields["journal_start"], fields["checkpoint_starts"], fields["data_start"])
    if stored != (geometry.journal_start, list(geometry.checkpoint_starts), geometry.data_start):
        raise Corrupted("the superblock's region offsets do not match its region sizes")
    return geometry


# Metadata model

SET_INODE = "i"
SET_ENTRY = "e"
MAP_BLOCKS = "m"
UNMAP_FROM = "t"
SET_XATTR = "x"
DROP_INODE = "d"

Change = list[Any]


class Inode:
    """One inode in memory; containers exist only for the types that use them."""

    __slots__ = (
        "ino",
        "mode",
        "nlink",
        "uid",
        "gid",
        "rdev",
        "size",
        "atime_ns",
        "mtime_ns",
        "ctime_ns",
        "generation",
        "target",
        "blocks",
        "entries",
        "parent",
        "xattrs",
    )

    def __init__(self, record: list[Any]) -> None:
        self.ino: int = record[0]
        self.set_record(record)
        self.blocks: dict[int, int] | None = {} if stat.S_ISREG(self.mode) else None
        self.entries: dict[bytes, int] | None = {} if stat.S_ISDIR(self.mode) else None
        self.parent = ROOT_INO
        self.xattrs: dict[bytes, bytes] | None = None

    def set_record(self, record: list[Any]) -> None:
        """Set every attribute from a record made by `record()`."""
        (
            _,
            self.mode,
            self.nlink,
            self.uid,
            self.gid,
            self.rdev,
            self.size,
            self.atime_ns,
            self.mtime_ns,
            self.ctime_ns,
            self.generation,
            self.target,
        ) = record

    def fields(self) -> list[Any]:
        """Return the attributes in SET_INODE order, the inode number first."""
        return [
            self.ino,
            self.mode,
            self.nlink,
            self.uid,
            self.gid,
            self.rdev,
            self.size,
            self.atime_ns,
            self.mtime_ns,
            self.ctime_ns,
            self.generation,
            self.target,
        ]

    def record(self, **changes: Any) -> list[Any]:
        """Return the attributes as a SET_INODE change, with `changes` applied."""
        fields = self.fields()
        for name, value in changes.items():
            fields[_FIELD_INDEX[name]] = value
        return [SET_INODE, *fields]

    @property
    def is_dir(self) -> bool:
        """True for a directory."""
        return self.entries is not None

    @property
    def is_reg(self) -> bool:
        """True for a regular file."""
        return self.blocks is not None


#: The name and valid range [low, high) of each integer of an inode record, in record order.
#: nlink, uid and gid are 32-bit in the FUSE attributes and rdev is a 64-bit dev_t. The size is
#: an off_t, and the times are signed 64-bit nanoseconds.
_INODE_INTEGERS = (
    ("ino", ROOT_INO, 2**64),
    ("mode", 0, 2**16),
    ("nlink", 0, 2**32),
    ("uid", 0, 2**32),
    ("gid", 0, 2**32),
    ("rdev", 0, 2**64),
    ("size", 0, 2**63),
    ("atime_ns", -(2**63), 2**63),
    ("mtime_ns", -(2**63), 2**63),
    ("ctime_ns", -(2**63), 2**63),
    ("generation", 0, 2**64),
)
_FILE_TYPES = frozenset(
    {
        stat.S_IFREG,
        stat.S_IFDIR,
        stat.S_IFLNK,
        stat.S_IFCHR,
        stat.S_IFBLK,
        stat.S_IFIFO,
        stat.S_IFSOCK,
    }
)


_INODE_RECORD_FIELDS = len(_INODE_INTEGERS) + 1
#: The integers of an inode record at the widths of _INODE_INTEGERS, then the target as a bytes
#: field of length 0. Packing a record checks the type and range of each integer, and that the
#: target is bytes, in one call that runs in C. Only bool passes as an int, and the ino's low
#: bound and the size's high bound are narrower than these codes.
_INODE_STRUCT = struct.Struct("<QHIIIQQqqqQ0s")
_INO, _MODE, _SIZE, _TARGET = 0, 1, 6, 11


_INODE_BOUNDS = tuple((low, high) for _, low, high in _INODE_INTEGERS)


def _inode_record_valid(record: list[Any]) -> bool:
    """Tell whether one record is a valid inode record, as each SET_INODE change carries one.

    A change is applied at every operation, and this loop over one record takes a fraction of
    the time of the column checks of `_check_inode_records`, which are made for whole images.
    """
    if len(record) != _INODE_RECORD_FIELDS:
        return False
    # The target, the last field, has no bounds, so zip stops before it.
    for value, (low, high) in zip(record, _INODE_BOUNDS, strict=False):
        if type(value) is not int or not low <= value < high:
            return False
    target = record[-1]
    return (
        type(target) is bytes
        and len(target) <= SYMLINK_MAX
        and stat.S_IFMT(record[1]) in _FILE_TYPES
    )


def _check_inode_records(records: list[Any]) -> None:
    """Raise ValueError unless every record is an inode record with valid types and ranges."""
    if not records:
        return
    if set(map(type, records)) != {list} or set(map(len, records)) != {_INODE_RECORD_FIELDS}:
        raise ValueError(f"an inode record is not a list of {_INODE_RECORD_FIELDS} fields")
    # An image may hold a million inodes, so every check is a builtin that loops in C. Building
    # a tuple per field of all the records instead (zip(*records)) took twice as long.
    if not _inode_records_valid(records):
        _raise_for_inode_records(records)


def _inode_records_valid(records: list[Any]) -> bool:
    try:
        deque(itertools.starmap(_INODE_STRUCT.pack, records), maxlen=0)
    except struct.error:
        return False
    # Rejects bool, which passed as an int above.
    if not set(map(type, itertools.chain.from_iterable(records))) <= {int, bytes}:
        return False
    if min(map(operator.itemgetter(_INO), records)) < ROOT_INO:
        return False
    if max(map(operator.itemgetter(_SIZE), records)) >= _INODE_INTEGERS[_SIZE][2]:
        return False
    if not set(map(stat.S_IFMT, map(operator.itemgetter(_MODE), records))) <= _FILE_TYPES:
        return False
    return max(map(len, map(operator.itemgetter(_TARGET), records))) <= SYMLINK_MAX


def _raise_for_inode_records(records: list[Any]) -> None:
    """Raise a ValueError that names the first invalid field found in `records`."""
    columns = list(zip(*records, strict=True))
    for (name, low, high), column in zip(_INODE_INTEGERS, columns, strict=False):
        if set(map(type, column)) != {int} or min(column) < low or max(column) >= high:
            value = next(item for item in column if not _is_int(item) or not low <= item < high)
            raise ValueError(f"invalid inode {name} {value!r:.40}: expected {low} to {high - 1}")
    modes = columns[_MODE]
    if not set(map(stat.S_IFMT, modes)) <= _FILE_TYPES:
        mode = next(item for item in modes if stat.S_IFMT(item) not in _FILE_TYPES)
        raise ValueError(f"invalid inode mode {mode:#o}: no known file type")
    targets = columns[_TARGET]
    if set(map(type, targets)) != {bytes} or max(map(len, targets)) > SYMLINK_MAX:
        target = next(
            item for item in targets if type(item) is not bytes or len(item) > SYMLINK_MAX
        )
        raise ValueError(
            f"invalid symlink target {target!r:.40}: expected at most {SYMLINK_MAX} bytes"
        )
    raise ValueError("an inode record has a field of an invalid type or range")


def _check_name(name: Any) -> None:
    if type(name) is not bytes or not 0 < len(name) <= NAME_MAX:
        raise ValueError(f"invalid entry name {name!r:.40}: expected 1 to {NAME_MAX} bytes")


_FIELD_INDEX = {
    name: index
    for index, name in enumerate(
        ["mode", "nlink", "uid", "gid", "rdev", "size", "atime_ns", "mtime_ns", "ctime_ns"], 1
    )
}


def new_inode_record(
    ino: int, mode: int, uid: int, gid: int, now_ns: int, *, rdev: int = 0, target: bytes = b""
) -> list[Any]:
    """Return the SET_INODE change that creates an inode with one link."""
    nlink = 2 if stat.S_ISDIR(mode) else 1
    size = len(target)
    return [SET_INODE, ino, mode, nlink, uid, gid, rdev, size, now_ns, now_ns, now_ns, 0, target]


class Tree:
    """The metadata of a volume: inodes, directory entries, block maps and xattrs."""

    def __init__(self) -> None:
        self.inodes: dict[int, Inode] = {}
        self.next_ino = ROOT_INO + 1
        #: The entries of all block maps together: mapped file blocks, not device blocks.
        self.mapped_blocks = 0

    @classmethod
    def new(cls, now_ns: int, uid: int = 0, gid: int = 0) -> Tree:
        """Return the tree of a fresh volume: an empty root directory."""
        tree = cls()
        tree.apply(new_inode_record(ROOT_INO, stat.S_IFDIR | 0o755, uid, gid, now_ns))
        return tree

    def get(self, ino: int) -> Inode:
        """Return inode `ino`; raises NotFound."""
        try:
            return self.inodes[ino]
        except KeyError:
            raise NotFound(f"inode {ino} does not exist") from None

    def apply(self, change: Change, geometry: Geometry | None = None) -> list[int]:
        """Apply one change; return the device blocks that it unmapped.

        With `geometry`, as when replaying the journal, a block map must stay inside its data
        region. Raises Corrupted for a change that does not apply, which may leave the tree
        half changed.
        """
        try:
            handler = _APPLY[change[0]]
        except (KeyError, IndexError, TypeError):
            raise Corrupted(f"unknown metadata change {change!r:.80}") from None
        try:
            # The runs are checked before any is expanded into the map: one digest-valid run
            # of 10**12 blocks must not take that long or that much memory.
            if change[0] == MAP_BLOCKS:
                _check_runs(change[2], geometry)
            freed = handler(self, change)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise Corrupted(
                f"metadata change {change!r:.80} does not apply: {type(exc).__name__}: {exc}"
            ) from None
        _check_mapped_total(self, geometry)
        return freed

    def _set_inode(self, change: Change) -> list[int]:
        record = change[1:]
        if not _inode_record_valid(record):
            _check_inode_records([record])
            raise ValueError(f"invalid inode record {record!r:.80}")
        inode = self.inodes.get(record[0])
        if inode is None:
            self.inodes[record[0]] = Inode(record)
            self.next_ino = max(self.next_ino, record[0] + 1)
        elif stat.S_IFMT(record[1]) != stat.S_IFMT(inode.mode):
            raise ValueError("the change would alter the inode's type")
        else:
            inode.set_record(record)
        return []

    def _set_entry(self, change: Change) -> list[int]:
        _, parent_ino, name, child_ino = change
        _check_name(name)
        entries = self.inodes[parent_ino].entries
        if entries is None:
            raise ValueError(f"inode {parent_ino} is not a directory")
        if child_ino == 0:
            del entries[name]
            return []
        child = self.inodes.get(child_ino)
        if child is None:
            raise ValueError(
                f"entry {name!r} in directory {parent_ino} points to missing inode {child_ino}"
            )
        entries[name] = child_ino
        if child.is_dir:
            child.parent = parent_ino
        return []

    def _map_blocks(self, change: Change) -> list[int]:
        _, ino, runs = change
        blocks = self.inodes[ino].blocks
        if blocks is None:
            raise ValueError(f"inode {ino} is not a regular file")
        before = len(blocks)
        replaced = []
        for findex, blockno, count in _triples(runs):
            for offset in range(count):
                old = blocks.get(findex + offset)
                if old is not None:
                    replaced.append(old)
                blocks[findex + offset] = blockno + offset
        self.mapped_blocks += len(blocks) - before
        return replaced

    def _unmap_from(self, change: Change) -> list[int]:
        _, ino, first = change
        blocks = self.inodes[ino].blocks
        if blocks is None:
            raise ValueError(f"inode {ino} is not a regular file")
        doomed = [findex for findex in blocks if findex >= first]
        self.mapped_blocks -= len(doomed)
        return [blocks.pop(findex) for findex in doomed]

    def _set_xattr(self, change: Change) -> list[int]:
        _, ino, name, value = change
        if type(name) is not bytes or not (value is None or type(value) is bytes):
            raise ValueError(f"invalid xattr {name!r:.40}: the name and value must be bytes")
        inode = self.inodes[ino]
        if value is None:
            if inode.xattrs is not None:
                del inode.xattrs[name]
                if not inode.xattrs:
                    inode.xattrs = None
            return []
        if inode.xattrs is None:
            inode.xattrs = {}
        inode.xattrs[name] = value
        return []

    def _drop_inode(self, change: Change) -> list[int]:
        inode = self.inodes[change[1]]
        if inode.entries:
            raise ValueError(f"directory {inode.ino} still has entries")
        if inode.ino == ROOT_INO:
            raise ValueError("the root directory cannot be dropped")
        del self.inodes[inode.ino]
        if not inode.blocks:
            return []
        self.mapped_blocks -= len(inode.blocks)
        return list(inode.blocks.values())

    def encode(self) -> bytes:
        """Return the whole tree as a msgpack image for a checkpoint."""
        with _collector_paused():
            return self._encode()

    def _encode(self) -> bytes:
        inodes, entries, maps, xattrs = [], [], [], []
        for inode in self.inodes.values():
            inodes.append(inode.fields())
            if inode.entries:
                entries.append(
                    [inode.ino, [item for pair in inode.entries.items() for item in pair]]
                )
            if inode.blocks:
                maps.append([inode.ino, encode_runs(inode.blocks)])
            if inode.xattrs:
                xattrs.append([inode.ino, [item for pair in inode.xattrs.items() for item in pair]])
        image = {
            "version": FORMAT_VERSION,
            "next_ino": self.next_ino,
            "inodes": inodes,
            "entries": entries,
            "maps": maps,
            "xattrs": xattrs,
        }
        encoded: bytes = msgpack.packb(image)
        return encoded

    @classmethod
    def decode(cls, image: bytes, geometry: Geometry | None = None) -> Tree:
        """Rebuild a tree from `encode()` output; raises Corrupted.

        With `geometry`, every block map must lie inside its data region.
        """
        # NOTE: without a geometry, only MAX_DEVICE_BLOCKS bounds the block maps, which is more
        # entries than memory holds, so a reader of an untrusted device passes its geometry.
        try:
            with _collector_paused():
                fields = msgpack.unpackb(image, strict_map_key=False)
                return cls._from_fields(fields, geometry)
        except (KeyError, IndexError, TypeError, ValueError, msgpack.UnpackException) as exc:
            raise Corrupted(
                f"the checkpoint image is invalid: {type(exc).__name__}: {exc}"
            ) from None

    @classmethod
    def _from_fields(cls, fields: dict[str, Any], geometry: Geometry | None) -> Tree:
        if fields["version"] != FORMAT_VERSION:
            raise Corrupted(f"unsupported checkpoint version {fields['version']!r:.40}")
        tree = cls()
        tree._load_inodes(fields["inodes"])
        directories = {ino for ino, inode in tree.inodes.items() if inode.entries is not None}
        for ino, flat in fields["entries"]:
            tree._load_entries(ino, flat[0::2], flat[1::2], directories)
        maps = fields["maps"]
        if not all(type(runs) is list and len(runs) % 3 == 0 for _, runs in maps):
            raise ValueError("a block map is not a list of triples")
        # One check of all runs together, before any is expanded, also bounds the total.
        _check_runs(list(itertools.chain.from_iterable(runs for _, runs in maps)), geometry)
        for ino, runs in maps:
            tree._load_map(ino, runs)
        for ino, flat in fields["xattrs"]:
            for index in range(0, len(flat), 2):
                tree._set_xattr([SET_XATTR, ino, flat[index], flat[index + 1]])
        next_ino = fields["next_ino"]
        if not _is_int(next_ino) or not ROOT_INO < next_ino <= 2**64:
            raise Corrupted(f"the checkpoint's next_ino {next_ino!r:.40} is invalid")
        tree.next_ino = max(next_ino, max(tree.inodes, default=0) + 1)
        if ROOT_INO not in tree.inodes or not tree.inodes[ROOT_INO].is_dir:
            raise Corrupted("the checkpoint has no root directory")
        return tree

    def _load_inodes(self, records: list[Any]) -> None:
        """Add the inodes of a checkpoint, emptying `records` as it goes."""
        _check_inode_records(records)
        # Each record is dropped once its inode exists, so the memory of the records is reused
        # for the inodes. With a million inodes that lowers the peak by about 150 MiB. Popping
        # from the end of the reversed list keeps the order of the image.
        records.reverse()
        inodes = self.inodes
        pop = records.pop
        while records:
            record = pop()
            inodes[record[0]] = Inode(record)

    def _load_entries(
        self, ino: int, names: list[bytes], children: list[int], directories: set[int]
    ) -> None:
        """Fill a directory from a checkpoint, checking what `_set_entry` checks.

        `directories` holds the inode numbers of every directory of the tree.
        """
        entries = self.inodes[ino].entries
        if entries is None:
            raise ValueError(f"inode {ino} is not a directory")
        if len(names) != len(children):
            raise ValueError(f"the entries of directory {ino} are not (name, inode) pairs")
        if not names:
            return
        # Checked with builtins that loop in C, as the inode records are. The loop over each
        # name runs only to name the first invalid one.
        if (
            not set(map(type, names)) <= {bytes}
            or min(map(len, names)) < 1
            or max(map(len, names)) > NAME_MAX
        ):
            for name in names:
                _check_name(name)
        inodes = self.inodes
        if not all(map(inodes.__contains__, children)):
            name, child_ino = next(
                pair for pair in zip(names, children, strict=True) if pair[1] not in inodes
            )
            raise ValueError(
                f"entry {name!r} in directory {ino} points to missing inode {child_ino}"
            )
        for child_ino in directories.intersection(children):
            inodes[child_ino].parent = ino
        entries.update(zip(names, children, strict=True))

    def _load_map(self, ino: int, runs: list[int]) -> None:
        blocks = self.inodes[ino].blocks
        if blocks is None:
            raise ValueError(f"inode {ino} is not a regular file")
        before = len(blocks)
        for index in range(0, len(runs), 3):
            findex, blockno, count = runs[index : index + 3]
            if count == 1:
                blocks[findex] = blockno
            else:
                blocks.update(
                    zip(range(findex, findex + count), range(blockno, blockno + count), strict=True)
                )
        self.mapped_blocks += len(blocks) - before


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector.

    An image of a million inodes makes millions of lists, and the collector would scan them
    all again and again: pausing it more than halves encode and decode times. Neither creates
    reference cycles, so nothing is left for the collector afterwards.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


_APPLY = {
    SET_INODE: Tree._set_inode,
    SET_ENTRY: Tree._set_entry,
    MAP_BLOCKS: Tree._map_blocks,
    UNMAP_FROM: Tree._unmap_from,
    SET_XATTR: Tree._set_xattr,
    DROP_INODE: Tree._drop_inode,
}


def _check_runs(runs: Any, geometry: Geometry | None) -> None:
    """Raise ValueError unless `runs` are flat (file index, block, count) triples that fit.

    The blocks must lie in the data region of `geometry`, or below MAX_DEVICE_BLOCKS without
    one, and the counts together must not exceed the region, since no block is mapped twice.
    """
    if type(runs) is not list or len(runs) % 3:
        raise ValueError("a block map is not a list of integer triples")
    if not runs:
        return
    if set(map(type, runs)) != {int}:
        raise ValueError("a block map is not a list of integer triples")
    first, end = (geometry.data_start, geometry.nblocks) if geometry else (0, MAX_DEVICE_BLOCKS)
    findexes, blocknos, counts = runs[0::3], runs[1::3], runs[2::3]
    if min(counts) < 1 or min(findexes) < 0 or min(blocknos) < first:
        raise ValueError("a block run has a count below 1 or a negative or non-data block")
    if max(map(operator.add, findexes, counts)) > MAX_FILE_BLOCKS:
        raise ValueError(f"a block run ends past file block {MAX_FILE_BLOCKS}")
    if max(map(operator.add, blocknos, counts)) > end:
        raise ValueError(f"a block run ends past block {end}, the end of the data region")
    if sum(counts) > end - first:
        raise ValueError(f"the block runs map {sum(counts)} blocks, more than {end - first}")


def _check_mapped_total(tree: Tree, geometry: Geometry | None) -> None:
    """Raise Corrupted if the tree maps more file blocks than the data region has."""
    if geometry is not None and tree.mapped_blocks > geometry.data_blocks:
        raise Corrupted(
            f"the block maps hold {tree.mapped_blocks} blocks, more than the "
            f"{geometry.data_blocks} of the data region"
        )


def _triples(flat: list[int]) -> Iterator[tuple[int, int, int]]:
    for index in range(0, len(flat), 3):
        yield flat[index], flat[index + 1], flat[index + 2]


def encode_runs(mapping: dict[int, int]) -> list[int]:
    """Return a block map as flat (file index, device block, count) triples of runs."""
    if len(mapping) == 1:
        ((findex, blockno),) = mapping.items()
        return [findex, blockno, 1]
    flat: list[int] = []
    first_index = first_block = count = -1
    for findex, blockno in sorted(mapping.items()):
        if findex == first_index + count and blockno == first_block + count:
            count += 1
            continue
        if count > 0:
            flat += (first_index, first_block, count)
        first_index, first_block, count = findex, blockno, 1
    if count > 0:
        flat += (first_index, first_block, count)
    return flat


# Allocation


class Allocator:
    """The free-block bitmap of the data region, derived from the block maps at open.

    A freed block waits on a pending list, tagged with the sequence number of the journal record
    that freed it, until that record is durable. Only then may it be trimmed and reused.
    """

    def __init__(self, geometry: Geometry) -> None:
        self.start = geometry.data_start
        self._used = bytearray(geometry.data_blocks)
        self._free = geometry.data_blocks
        self._pending: deque[tuple[int, list[int]]] = deque()
        self._pending_count = 0
        self._hint = 0

    @classmethod
    def from_tree(cls, geometry: Geometry, tree: Tree) -> Allocator:
        """Build the bitmap from the block maps; raises Corrupted on a bad or shared block."""
        allocator = cls(geometry)
        for inode in tree.inodes.values():
            for blockno in (inode.blocks or {}).values():
                allocator._claim(inode.ino, blockno, geometry)
        return allocator

    def _claim(self, ino: int, blockno: int, geometry: Geometry) -> None:
        if not geometry.is_data(blockno):
            raise Corrupted(f"inode {ino} maps block {blockno} outside the data region")
        index = blockno - self.start
        if self._used[index]:
            raise Corrupted(f"block {blockno} is mapped twice (once by inode {ino})")
        self._used[index] = 1
        self._free -= 1

    @property
    def free_blocks(self) -> int:
        """Blocks that can be allocated now."""
        return self._free

    @property
    def pending_blocks(self) -> int:
        """Freed blocks waiting for their record to become durable."""
        return self._pending_count

    def allocate(self, count: int) -> list[int]:
        """Allocate `count` blocks, consecutive where possible; raises NoSpace, taking none."""
        if count > self._free:
            raise NoSpace(f"the volume has {self._free} free blocks, {count} needed")
        found: list[int] = []
        index = self._hint
        while len(found) < count:
            index = self._used.find(0, index)
            if index < 0:
                index = self._used.find(0)
            self._used[index] = 1
            found.append(self.start + index)
            index += 1
        self._free -= count
        self._hint = index if index < len(self._used) else 0
        return found

    def grow(self, geometry: Geometry) -> None:
        """Add the blocks that a larger data region of `geometry` brings, all free."""
        if geometry.data_start != self.start or geometry.data_blocks < len(self._used):
            raise InvalidArgument("the allocator grows only at the end of its data region")
        added = geometry.data_blocks - len(self._used)
        self._used += bytes(added)
        self._free += added

    def release_later(self, blocks: list[int], seq: int) -> None:
        """Queue blocks freed by journal record `seq`."""
        if blocks:
            self._pending.append((seq, blocks))
            self._pending_count += len(blocks)

    def take_releasable(self, durable_seq: int) -> list[int]:
        """Pop the pending blocks whose freeing record is durable, for trim and `mark_free`.

        They still count as pending until `mark_free`, so that a writer short of space while
        they are trimmed knows that space is coming.
        """
        ready: list[int] = []
        while self._pending and self._pending[0][0] <= durable_seq:
            ready += self._pending.popleft()[1]
        return ready

    def mark_free(self, blocks: list[int]) -> None:
        """Return blocks taken by `take_releasable` to the bitmap."""
        for blockno in blocks:
            self._used[blockno - self.start] = 0
        self._free += len(blocks)
        self._pending_count -= len(blocks)
