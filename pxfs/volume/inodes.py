"""The changes of the metadata model, and the inodes in memory with their record validation.

Every metadata change is a msgpack list whose first item is its tag. Only `Tree.apply`
(pxfs/volume/tree.py) applies them, and each SET_INODE change carries an inode record that the
checks here validate. docs/volume-format.md lists the changes.
"""

from __future__ import annotations

import itertools
import operator
import stat
import struct
from collections import deque
from typing import Any

from pxfs.volume.format import ROOT_INO, SYMLINK_MAX, is_int

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


def inode_record_valid(record: list[Any]) -> bool:
    """Tell whether one record is a valid inode record, as each SET_INODE change carries one.

    A change is applied at every operation, and this loop over one record takes a fraction of
    the time of the column checks of `check_inode_records`, which are made for whole images.
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


def check_inode_records(records: list[Any]) -> None:
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
            value = next(item for item in column if not is_int(item) or not low <= item < high)
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
