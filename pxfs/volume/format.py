"""The on-volume format: its constants, the geometry of the regions and the superblock.

Block 0 holds the superblock. The journal ring, two checkpoint slots and the data region follow.
The metadata model is in pxfs/volume/inodes.py and pxfs/volume/tree.py, the free-block bitmap in
pxfs/volume/allocator.py. docs/volume-format.md describes the layout byte by byte.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import msgpack

from pxfs.errors import Corrupted, InvalidArgument, NotFound
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
        if not is_int(fields["version"]) or fields["version"] != FORMAT_VERSION:
            raise Corrupted(f"unsupported volume format version {fields['version']!r:.40}")
        if not is_int(fields["block_size"]) or fields["block_size"] != BLOCK_SIZE:
            raise Corrupted(f"unsupported block size {fields['block_size']!r:.40}")
        geometry = _stored_geometry(fields)
        size = fields["size"]
        if not is_int(size) or -(-size // BLOCK_SIZE) != geometry.data_blocks:
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


def is_int(value: Any) -> bool:
    """Tell whether `value` is an int; bool, an int subclass, is not."""
    return type(value) is int


def _stored_geometry(fields: dict[str, Any]) -> Geometry:
    """Return the geometry the superblock fields describe; raises Corrupted if it is invalid."""
    sizes = [fields[name] for name in ("journal_blocks", "checkpoint_blocks", "data_blocks")]
    if not all(is_int(value) for value in sizes):
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
