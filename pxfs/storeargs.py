"""The replica store's limits per call, and the checks of the arguments that callers send it.

The `store.*` methods of pxfs/store.py check what a caller sends with these functions. They raise
InvalidArgument naming the invalid value, except check_fence, which raises StaleWrite for a
version below the replica's fence. check_entries checks a reply of `store.read_versioned` for the
clients of other nodes' stores.
"""

from __future__ import annotations

import re
from typing import Any

from pxfs.errors import InvalidArgument, ProtocolError, StaleWrite
from pxfs.replica import Patch, Replica
from pxfs.replicaformat import BLOCK_SIZE, MAX_VERSION

#: Blocks per read or write call: 240 blocks are 15 MiB, which leaves room for the msgpack
#: framing inside one RPC frame (pxfs.frames.MAX_FRAME, 16 MiB).
MAX_BLOCKS_PER_CALL = 240
#: Block numbers per trim call. A trim sends no data back, so this only bounds the work of one
#: call; 2**20 block numbers take at most 9 MiB of msgpack.
MAX_TRIMS_PER_CALL = 2**20
#: Blocks per versions call: 2**20 versions are an 8 MiB reply, half of an RPC frame.
MAX_VERSIONS_PER_CALL = 2**20
#: Blocks per checksums call that reads only the table: 2**19 records are an 8 MiB reply.
MAX_CHECKSUMS_PER_CALL = 2**19
#: Blocks per checksums call that also reads the data: 1024 blocks are 64 MiB read from disk
#: under the replica's lock, as one slice of a verify scan is.
MAX_CHECKED_PER_CALL = 1024
#: Digests per digests call: 16384 digests are a 256 KiB reply and cover 1 TiB of volume.
MAX_DIGESTS_PER_CALL = 16384

_VOL_ID = re.compile(r"[0-9]{1,20}")


#: A block as `store.read_versioned` returns it: (version, data). data is None for an unwritten
#: block and False for a copy that fails its checksum.
Entry = tuple[int, bytes | None | bool]


def check_entries(reply: object, count: int, source: str) -> list[Entry]:
    """Check the shape of a `store.read_versioned` reply of `count` blocks from `source`.

    Raises ProtocolError naming `source` for a reply of another shape.
    """
    if not isinstance(reply, list) or len(reply) != count:
        raise ProtocolError(f"replica {source} sent a malformed read reply")
    entries: list[Entry] = []
    for item in reply:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ProtocolError(f"replica {source} sent a malformed block entry")
        version, data = item
        if isinstance(version, bool) or not isinstance(version, int):
            raise ProtocolError(f"replica {source} sent a malformed block version")
        good_data = isinstance(data, bytes) and len(data) == BLOCK_SIZE
        if not (good_data or data is None or data is False):
            raise ProtocolError(f"replica {source} sent a malformed block")
        entries.append((version, data))
    return entries


def check_vol_id(vol_id: object) -> str:
    """Return `vol_id`, or raise InvalidArgument unless it is 1 to 20 decimal digits."""
    if not isinstance(vol_id, str) or not _VOL_ID.fullmatch(vol_id):
        raise InvalidArgument(f"invalid volume id {vol_id!r}: expected a decimal string")
    return vol_id


def check_int(name: str, value: object, low: int, high: int) -> int:
    """Return `value`, or raise InvalidArgument naming `name` unless it is an int in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"invalid {name} {value!r}: expected an integer")
    if not low <= value <= high:
        raise InvalidArgument(f"invalid {name} {value}: expected {low} to {high}")
    return value


def _check_list(name: str, value: object) -> list[Any] | tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise InvalidArgument(f"invalid {name}: expected a list, got {type(value).__name__}")
    return value


def _check_count(name: str, items: list[Any] | tuple[Any, ...], limit: int) -> None:
    if len(items) > limit:
        raise InvalidArgument(f"too many {name}: {len(items)}, at most {limit} per call")


def check_blocknos(replica: Replica, blocknos: object, limit: int) -> list[int]:
    """Check a list of at most `limit` block numbers of `replica`, and return it."""
    items = _check_list("block numbers", blocknos)
    _check_count("block numbers", items, limit)
    checked = []
    for blockno in items:
        checked.append(check_int("block number", blockno, 0, replica.nblocks - 1))
    return checked


def check_blocks(replica: Replica, blocks: object) -> list[tuple[int, bytes]]:
    """Check the [block number, data] entries of a write to `replica`, and return them."""
    items = _check_list("blocks", blocks)
    _check_count("blocks", items, MAX_BLOCKS_PER_CALL)
    checked = []
    for entry in items:
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise InvalidArgument("invalid block entry: expected [block number, data]")
        blockno = check_int("block number", entry[0], 0, replica.nblocks - 1)
        checked.append((blockno, _check_data(blockno, entry[1])))
    return checked


def _check_data(blockno: int, data: object) -> bytes:
    if not isinstance(data, (bytes, bytearray)):
        raise InvalidArgument(f"invalid data for block {blockno}: expected bytes")
    if len(data) != BLOCK_SIZE:
        raise InvalidArgument(
            f"invalid data for block {blockno}: {len(data)} bytes, expected {BLOCK_SIZE}"
        )
    return bytes(data)


def check_patches(replica: Replica, patches: object) -> list[Patch]:
    """Check the [block number, offset, data, base crc32, crc32] entries of a patch."""
    items = _check_list("patches", patches)
    _check_count("patches", items, MAX_BLOCKS_PER_CALL)
    checked = []
    for entry in items:
        if not isinstance(entry, (list, tuple)) or len(entry) != 5:
            raise InvalidArgument(
                "invalid patch entry: expected [block number, offset, data, base crc32, crc32]"
            )
        blockno = check_int("block number", entry[0], 0, replica.nblocks - 1)
        offset = check_int("patch offset", entry[1], 0, BLOCK_SIZE - 1)
        data = entry[2]
        if not isinstance(data, (bytes, bytearray)) or not 0 < len(data) <= BLOCK_SIZE - offset:
            raise InvalidArgument(
                f"invalid patch data for block {blockno}: expected 1 to {BLOCK_SIZE - offset} bytes"
            )
        base = check_int("base crc32", entry[3], 0, 0xFFFFFFFF)
        crc = check_int("crc32", entry[4], 0, 0xFFFFFFFF)
        checked.append(Patch(blockno, offset, bytes(data), base, crc))
    return checked


def check_pulls(replica: Replica, blocks: object) -> list[tuple[int, int]]:
    """Check the [block number, expected version] entries of a pull into `replica`."""
    items = _check_list("blocks", blocks)
    _check_count("blocks", items, MAX_BLOCKS_PER_CALL)
    checked = []
    for entry in items:
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise InvalidArgument("invalid pull entry: expected [block number, expected version]")
        blockno = check_int("block number", entry[0], 0, replica.nblocks - 1)
        checked.append((blockno, check_int("expected version", entry[1], 0, MAX_VERSION)))
    return checked


def check_copies(replica: Replica, blocks: object) -> list[tuple[int, int, int, bytes | None]]:
    """Check the [block number, expected version, version, data] entries of a copy."""
    items = _check_list("blocks", blocks)
    _check_count("blocks", items, MAX_BLOCKS_PER_CALL)
    checked: list[tuple[int, int, int, bytes | None]] = []
    for entry in items:
        if not isinstance(entry, (list, tuple)) or len(entry) != 4:
            raise InvalidArgument(
                "invalid copy entry: expected [block number, expected version, version, data]"
            )
        blockno = check_int("block number", entry[0], 0, replica.nblocks - 1)
        expected = check_int("expected version", entry[1], 0, MAX_VERSION)
        version = check_int("version", entry[2], 0, MAX_VERSION)
        data = None if entry[3] is None else _check_data(blockno, entry[3])
        if data is not None and version == 0:
            raise InvalidArgument(f"invalid copy of block {blockno}: data needs a version")
        checked.append((blockno, expected, version, data))
    return checked


def check_fence(replica: Replica, version: int) -> None:
    """Raise StaleWrite for a version below the replica's fence (ReplicaStore.fence)."""
    if version < replica.fence:
        raise StaleWrite(
            f"volume {replica.vol_id}: version {version:x} was sent before the resync of this "
            f"replica from version {replica.fence:x} started"
        )
