"""The metadata journal ring, the two checkpoint slots, and loading the metadata at open.

Each operation appends one record: the msgpack list of the changes it made to the tree. Records
are packed back to back into the ring. Each record's digest covers the digest of the record
before it, so replay follows one chain and stops at the first record that is torn, stale or
from another history. Every open writes under a new random session number, which keeps records
left behind by an earlier crash from joining the new chain.

A checkpoint is a full image of the tree together with its anchor: the sequence number of the
last record it covers, the ring offset of the record after it and that record's chain digest.
The records still buffered when a checkpoint is taken are covered by the image and never reach
the ring. Open reads the newest valid checkpoint and replays the chain from its anchor.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from pxfs.errors import ChecksumMismatch, Corrupted, InvalidArgument, NoSpace
from pxfs.volume.device import BLOCK_SIZE, BlockDevice
from pxfs.volume.format import FORMAT_ID_BYTES, Geometry, Superblock
from pxfs.volume.inodes import Change
from pxfs.volume.tree import Tree

log = logging.getLogger(__name__)

RECORD_MAGIC = b"PJ"
#: magic, flags, body length, sequence number, session, chain digest
RECORD_HEADER = struct.Struct("<2sHIQQ8s")
CHECKPOINT_MAGIC = b"PXFS-CP\x00"
_CHAIN_DIGEST = 8
_IMAGE_DIGEST = 16
#: Blocks per device call when a checkpoint is written or read.
_CHECKPOINT_CHUNK = 64
#: Ring blocks past the head kept written, so that records still fit when the disk under a
#: thin device is full: the record that frees space must never need new space itself.
#: NOTE: more than this many blocks of records that free nothing, queued on a full disk ahead of
#: a delete, still hold the delete back.
RESERVE_BLOCKS = 64


def _chain(previous: bytes, header: bytes, body: bytes) -> bytes:
    digest = hashlib.blake2b(previous, digest_size=_CHAIN_DIGEST)
    digest.update(header)
    digest.update(body)
    return digest.digest()


@dataclass(frozen=True)
class Anchor:
    """A point in the record chain: the last sequence number, the next offset, its digest."""

    seq: int
    position: int
    digest: bytes


@dataclass(frozen=True)
class Checkpoint:
    """A valid checkpoint read from a slot."""

    slot: int
    counter: int
    anchor: Anchor
    image: bytes


# Checkpoint slots


def _checkpoint_header(sb: Superblock, counter: int, anchor: Anchor, image: bytes) -> bytes:
    body: bytes = msgpack.packb(
        {
            "uuid": sb.uuid,
            "counter": counter,
            "seq": anchor.seq,
            "position": anchor.position,
            "digest": anchor.digest,
            "image_len": len(image),
            "image_digest": hashlib.blake2b(image, digest_size=_IMAGE_DIGEST).digest(),
        }
    )
    header = CHECKPOINT_MAGIC + len(body).to_bytes(4, "little") + body
    header += hashlib.blake2b(body, digest_size=_IMAGE_DIGEST).digest()
    return header + bytes(BLOCK_SIZE - len(header))


def checkpoint_capacity(sb: Superblock) -> int:
    """Return the size in bytes of the largest image that fits in a checkpoint slot."""
    return (sb.geometry.checkpoint_blocks - 1) * BLOCK_SIZE


async def write_checkpoint(
    device: BlockDevice, sb: Superblock, slot: int, counter: int, anchor: Anchor, image: bytes
) -> None:
    """Write a checkpoint into `slot` and flush the device; raises NoSpace if it is too big."""
    if len(image) > checkpoint_capacity(sb):
        raise NoSpace(
            f"the metadata image of {len(image)} bytes exceeds the checkpoint slot of "
            f"{checkpoint_capacity(sb)} bytes"
        )
    start = sb.geometry.checkpoint_starts[slot]
    blocks = [(start, _checkpoint_header(sb, counter, anchor, image))]
    for index, offset in enumerate(range(0, len(image), BLOCK_SIZE)):
        chunk = image[offset : offset + BLOCK_SIZE]
        blocks.append((start + 1 + index, chunk + bytes(BLOCK_SIZE - len(chunk))))
    # The header goes last: a torn write leaves a header whose image digest does not match.
    ordered = blocks[1:] + blocks[:1]
    for first in range(0, len(ordered), _CHECKPOINT_CHUNK):
        await device.write_blocks(ordered[first : first + _CHECKPOINT_CHUNK])
    await device.flush()


async def erase_checkpoint(device: BlockDevice, sb: Superblock, slot: int) -> None:
    """Overwrite the header of a slot, so that the slot has no valid checkpoint."""
    await device.write_blocks([(sb.geometry.checkpoint_starts[slot], bytes(BLOCK_SIZE))])


async def read_checkpoint(device: BlockDevice, sb: Superblock, slot: int) -> Checkpoint | None:
    """Return the checkpoint in `slot`, or None when the slot has no valid one."""
    start = sb.geometry.checkpoint_starts[slot]
    try:
        (block,) = await device.read_blocks([start])
        fields = _parse_checkpoint_header(block, sb)
        if fields is None:
            return None
        image = await _read_image(device, start + 1, fields["image_len"])
    except ChecksumMismatch as exc:
        log.warning("checkpoint slot %d is unreadable: %s", slot, exc.message)
        return None
    if hashlib.blake2b(image, digest_size=_IMAGE_DIGEST).digest() != fields["image_digest"]:
        log.info("checkpoint slot %d has a torn image (counter %d)", slot, fields["counter"])
        return None
    anchor = Anchor(fields["seq"], fields["position"], fields["digest"])
    return Checkpoint(slot, fields["counter"], anchor, image)


def _parse_checkpoint_header(block: bytes, sb: Superblock) -> dict[str, Any] | None:
    if not block.startswith(CHECKPOINT_MAGIC):
        return None
    start = len(CHECKPOINT_MAGIC) + 4
    length = int.from_bytes(block[start - 4 : start], "little")
    body = block[start : start + length]
    expected = hashlib.blake2b(body, digest_size=_IMAGE_DIGEST).digest()
    if block[start + length : start + length + _IMAGE_DIGEST] != expected:
        return None
    try:
        fields = msgpack.unpackb(body)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        log.warning("a checkpoint header passed its digest but does not decode: %s", exc)
        return None
    if not isinstance(fields, dict) or fields.get("uuid") != sb.uuid:
        return None
    problem = _checkpoint_header_problem(fields, sb)
    if problem is not None:
        log.warning("a checkpoint header passed its digest but %s", problem)
        return None
    return fields


def _checkpoint_header_problem(fields: dict[str, Any], sb: Superblock) -> str | None:
    """Return what is wrong with the fields of a checkpoint header, or None if nothing is."""
    limits = {
        "image_len": checkpoint_capacity(sb),
        "counter": 2**64 - 1,
        "seq": 2**64 - 1,
        "position": sb.geometry.journal_bytes,
    }
    for name, high in limits.items():
        value = fields.get(name)
        if type(value) is not int or not 0 <= value <= high:
            return f"has an invalid {name} {value!r:.40}: expected 0 to {high}"
    for name, length in (("digest", _CHAIN_DIGEST), ("image_digest", _IMAGE_DIGEST)):
        value = fields.get(name)
        if type(value) is not bytes or len(value) != length:
            return f"has an invalid {name} {value!r:.40}: expected {length} bytes"
    return None


async def _read_image(device: BlockDevice, first: int, length: int) -> bytes:
    count = -(-length // BLOCK_SIZE)
    parts: list[bytes] = []
    for offset in range(0, count, _CHECKPOINT_CHUNK):
        blocknos = range(first + offset, first + min(count, offset + _CHECKPOINT_CHUNK))
        parts += await device.read_blocks(list(blocknos))
    return b"".join(parts)[:length]


# Replay


@dataclass
class Replay:
    """The records found after an anchor and where the chain ends."""

    records: list[tuple[int, list[Change]]]
    end: Anchor
    used_bytes: int
    head_block: bytes


class _RingReader:
    """Reads ring bytes, fetching blocks in chunks and keeping them."""

    def __init__(self, device: BlockDevice, sb: Superblock) -> None:
        self._device = device
        self._start = sb.geometry.journal_start
        self._nblocks = sb.geometry.journal_blocks
        self._blocks: dict[int, bytes] = {}

    async def read(self, position: int, length: int) -> bytes:
        first, last = position // BLOCK_SIZE, (position + length - 1) // BLOCK_SIZE
        missing = [index for index in range(first, last + 1) if index not in self._blocks]
        if missing:
            end = min(self._nblocks, max(last + 1, missing[0] + 16))
            wanted = [index for index in range(missing[0], end) if index not in self._blocks]
            data = await self._device.read_blocks([self._start + index for index in wanted])
            self._blocks.update(zip(wanted, data, strict=True))
        joined = b"".join(self._blocks[index] for index in range(first, last + 1))
        offset = position - first * BLOCK_SIZE
        return joined[offset : offset + length]


async def _read_record(
    reader: _RingReader, ring_bytes: int, position: int, seq: int, previous: bytes
) -> tuple[bytes, bytes, int] | None:
    """Return (body, digest, total length) of record `seq` at `position`, or None."""
    if position + RECORD_HEADER.size > ring_bytes:
        return None
    header = await reader.read(position, RECORD_HEADER.size)
    magic, _, length, found_seq, _, digest = RECORD_HEADER.unpack(header)
    total = RECORD_HEADER.size + length
    if magic != RECORD_MAGIC or found_seq != seq or position + total > ring_bytes:
        return None
    body = await reader.read(position + RECORD_HEADER.size, length) if length else b""
    if _chain(previous, header[:-_CHAIN_DIGEST], body) != digest:
        return None
    return body, digest, total


async def replay_journal(device: BlockDevice, sb: Superblock, anchor: Anchor) -> Replay:
    """Read the chain of records that follows `anchor` until it breaks."""
    reader = _RingReader(device, sb)
    ring_bytes = sb.geometry.journal_bytes
    records: list[tuple[int, list[Change]]] = []
    position, seq, digest, used = anchor.position, anchor.seq, anchor.digest, 0
    while True:
        try:
            found = await _read_record(reader, ring_bytes, position, seq + 1, digest)
            skipped = 0
            if found is None and position != 0:
                # The writer starts over at offset 0 when a record does not fit before the end.
                found = await _read_record(reader, ring_bytes, 0, seq + 1, digest)
                skipped = ring_bytes - position
        except ChecksumMismatch as exc:
            log.error("journal replay stops at record %d: %s", seq + 1, exc.message)
            found = None
        if found is None:
            break
        body, digest, total = found
        if skipped:
            position = 0
        seq += 1
        records.append((seq, _decode_body(seq, body)))
        used += skipped + total
        position += total
    head_block = await _head_block(reader, position, ring_bytes, bool(records))
    return Replay(records, Anchor(seq, position, digest), used, head_block)


def _decode_body(seq: int, body: bytes) -> list[Change]:
    try:
        changes = msgpack.unpackb(body)
    # TypeError comes from a map whose key is an array or a map, which Python cannot hash.
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise Corrupted(
            f"journal record {seq} passed its digest but does not decode: {exc}"
        ) from None
    if not isinstance(changes, list):
        raise Corrupted(f"journal record {seq} does not contain a list of changes")
    return changes


async def _head_block(reader: _RingReader, position: int, ring_bytes: int, replayed: bool) -> bytes:
    """Return the ring block that contains `position`, zeroed from `position` on."""
    offset = position % BLOCK_SIZE
    if offset == 0 or position >= ring_bytes:
        return bytes(BLOCK_SIZE)
    try:
        block = await reader.read(position - offset, BLOCK_SIZE)
    except ChecksumMismatch:
        if replayed:
            raise
        # With no record replayed, the bytes before `position` belong to records that the
        # checkpoint covers, so zeros serve as well.
        return bytes(BLOCK_SIZE)
    return block[:offset] + bytes(BLOCK_SIZE - offset)


# Loading


@dataclass
class Loaded:
    """The metadata of a volume as open finds it."""

    superblock: Superblock
    tree: Tree
    checkpoint: Checkpoint
    replay: Replay


async def read_superblock(device: BlockDevice) -> Superblock:
    """Read and check block 0; raises NotFound for a blank device, Corrupted for a bad one."""
    (block,) = await device.read_blocks([0])
    sb = Superblock.decode(block)
    if device.nblocks < sb.geometry.nblocks:
        raise Corrupted(
            f"the device has {device.nblocks} blocks but the volume needs {sb.geometry.nblocks}"
        )
    return sb


async def newest_checkpoint(device: BlockDevice, sb: Superblock) -> Checkpoint:
    """Return the valid checkpoint with the highest counter; raises Corrupted if none is."""
    found = [await read_checkpoint(device, sb, slot) for slot in (0, 1)]
    valid = [checkpoint for checkpoint in found if checkpoint is not None]
    if not valid:
        raise Corrupted("neither checkpoint slot contains a valid checkpoint")
    return max(valid, key=lambda checkpoint: checkpoint.counter)


async def load_metadata(device: BlockDevice) -> Loaded:
    """Read the superblock and newest checkpoint and replay the journal onto its tree."""
    sb = await read_superblock(device)
    checkpoint = await newest_checkpoint(device, sb)
    tree = Tree.decode(checkpoint.image, sb.geometry)
    replay = await replay_journal(device, sb, checkpoint.anchor)
    for seq, changes in replay.records:
        try:
            for change in changes:
                tree.apply(change, sb.geometry)
        except Corrupted as exc:
            raise Corrupted(f"journal record {seq}: {exc.message}") from None
    log.debug(
        "loaded checkpoint %d (slot %d) and %d journal records",
        checkpoint.counter,
        checkpoint.slot,
        len(replay.records),
    )
    return Loaded(sb, tree, checkpoint, replay)


async def format_volume(
    device: BlockDevice, uuid: str, size: int, journal_bytes: int, checkpoint_bytes: int
) -> Superblock:
    """Write the superblock and a first checkpoint holding an empty root directory."""
    geometry = Geometry.for_size(size, journal_bytes, checkpoint_bytes)
    if device.nblocks < geometry.nblocks:
        raise InvalidArgument(
            f"a volume of {size} bytes needs {geometry.nblocks} device blocks, "
            f"the device has {device.nblocks}"
        )
    sb = Superblock(uuid, size, geometry, secrets.token_bytes(FORMAT_ID_BYTES))
    image = Tree.new(time.time_ns()).encode()
    await erase_checkpoint(device, sb, 1)
    await write_checkpoint(device, sb, 0, 1, Anchor(0, 0, sb.chain_seed), image)
    # The superblock goes last, so a format cut short leaves a device that reads as blank.
    await device.write_blocks([(0, sb.encode())])
    await device.flush()
    log.info("formatted volume %s: %d bytes, %d device blocks", uuid, size, geometry.nblocks)
    return sb


# The live journal


class Journal:
    """Appends records, writes them in batches and writes checkpoints.

    The caller serialises `write_records` and `write_checkpoint` (the volume's flush lock) and
    writes every dirty data block before either, so no record or image on the device refers to
    data that is not there yet.
    """

    def __init__(self, device: BlockDevice, loaded: Loaded) -> None:
        self._device = device
        self._sb = loaded.superblock
        self._ring_bytes = self._sb.geometry.journal_bytes
        self._start = self._sb.geometry.journal_start
        end = loaded.replay.end
        self.seq = end.seq
        self.durable_seq = end.seq
        self._digest = end.digest
        self._head = end.position
        self._head_block = bytearray(loaded.replay.head_block)
        self._used = loaded.replay.used_bytes
        self._buffer: list[bytes] = []
        self._buffer_bytes = 0
        self._session = secrets.randbits(64)
        self._slot = loaded.checkpoint.slot
        self._counter = loaded.checkpoint.counter
        self._checkpoint_required = False
        self.image_bytes = len(loaded.checkpoint.image)
        ring_blocks = self._ring_bytes // BLOCK_SIZE
        # Live records span at most half the ring, so the reserve never overwrites one of them.
        self._reserve = min(RESERVE_BLOCKS, max(0, ring_blocks // 8))
        # Ring blocks known to hold written bytes on the device, so they cost no new space.
        self._allocated = bytearray(ring_blocks)
        if self._head % BLOCK_SIZE:
            self._allocated[self._head // BLOCK_SIZE] = 1

    def set_superblock(self, sb: Superblock) -> None:
        """Take the superblock of the grown volume; the ring and slots stay where they are."""
        if sb.geometry.checkpoint_starts != self._sb.geometry.checkpoint_starts:
            raise InvalidArgument("a new superblock must keep the journal and checkpoint slots")
        self._sb = sb

    @property
    def buffered_bytes(self) -> int:
        """Bytes of records appended but not yet written."""
        return self._buffer_bytes

    @property
    def max_record_bytes(self) -> int:
        """The largest record body the ring accepts."""
        return self._ring_bytes // 4 - RECORD_HEADER.size

    def encode(self, changes: Sequence[Change]) -> bytes:
        """Return the record body for `changes`; raises NoSpace if it exceeds the ring."""
        body: bytes = msgpack.packb(list(changes))
        if len(body) > self.max_record_bytes:
            raise NoSpace(
                f"a metadata record of {len(body)} bytes exceeds the journal limit of "
                f"{self.max_record_bytes}"
            )
        return body

    def append(self, body: bytes) -> int:
        """Append a record body from `encode`; return its sequence number."""
        seq = self.seq + 1
        header = RECORD_HEADER.pack(RECORD_MAGIC, 0, len(body), seq, self._session, b"")
        header = header[:-_CHAIN_DIGEST]
        digest = _chain(self._digest, header, body)
        self._buffer.append(header + digest + body)
        self._buffer_bytes += RECORD_HEADER.size + len(body)
        self.seq, self._digest = seq, digest
        return seq

    def needs_checkpoint(self) -> bool:
        """Tell whether writing the buffer would fill more than half of the ring."""
        if self._checkpoint_required:
            return True
        return self._used + self._buffer_bytes > self._ring_bytes // 2

    def take_records(self) -> tuple[list[bytes], int]:
        """Remove the buffered records for `write_records`; return them and their last seq."""
        records, self._buffer, self._buffer_bytes = self._buffer, [], 0
        return records, self.seq

    def restore_records(self, records: list[bytes]) -> None:
        """Put records back at the front of the buffer after a failed write."""
        self._buffer[:0] = records
        self._buffer_bytes += sum(len(record) for record in records)

    async def write_records(self, records: list[bytes], last_seq: int) -> None:
        """Write records at the head of the ring and flush the device."""
        if records:
            position, blocks, head_block, placed = self._place(records)
            await self._device.write_blocks(blocks)
        await self._device.flush()
        if records:
            self._head, self._head_block = position, head_block
            self._used += placed
            for blockno, _ in blocks:
                self._allocated[blockno - self._start] = 1
        self.durable_seq = max(self.durable_seq, last_seq)

    def allocated_prefix(self, records: list[bytes]) -> int:
        """Return how many of `records`, from the first, fit in ring blocks already written.

        Writing them takes no new space on the device, so they can be written on a full disk.
        """
        position = self._head
        for count, record in enumerate(records):
            if position + len(record) > self._ring_bytes:
                position = 0
            end = position + len(record)
            if not all(self._allocated[position // BLOCK_SIZE : (end - 1) // BLOCK_SIZE + 1]):
                return count
            position = end
        return len(records)

    async def reserve(self) -> None:
        """Write zeros into the ring blocks past the head that were never written.

        They hold no live record: those lie behind the head. A failure is harmless, since
        the blocks are tried again after the next write.
        """
        ring_blocks = len(self._allocated)
        first = -(-self._head // BLOCK_SIZE)
        missing = [
            index % ring_blocks
            for index in range(first, first + self._reserve)
            if not self._allocated[index % ring_blocks]
        ]
        if not missing:
            return
        try:
            await self._device.write_blocks(
                [(self._start + index, bytes(BLOCK_SIZE)) for index in missing]
            )
        except NoSpace as exc:
            log.debug("cannot reserve %d journal blocks: %s", len(missing), exc.message)
            return
        for index in missing:
            self._allocated[index] = 1

    def _place(self, records: list[bytes]) -> tuple[int, list[tuple[int, bytes]], bytearray, int]:
        """Lay records out from the head; return the new head, blocks, head block, bytes used.

        The first block written is the current head block: its bytes before the head are the
        same as on the device, so a torn write of it cannot damage the records already there.
        """
        position, placed = self._head, 0
        block = bytearray(self._head_block)
        index = position // BLOCK_SIZE
        blocks: dict[int, bytes] = {}
        for record in records:
            if position + len(record) > self._ring_bytes:
                if position % BLOCK_SIZE:
                    blocks[index] = bytes(block)
                placed += self._ring_bytes - position
                position, index, block = 0, 0, bytearray(BLOCK_SIZE)
            offset = 0
            while offset < len(record):
                start = position % BLOCK_SIZE
                chunk = record[offset : offset + BLOCK_SIZE - start]
                block[start : start + len(chunk)] = chunk
                offset += len(chunk)
                position += len(chunk)
                if position % BLOCK_SIZE == 0:
                    blocks[index] = bytes(block)
                    index, block = index + 1, bytearray(BLOCK_SIZE)
            placed += len(record)
        if position % BLOCK_SIZE:
            blocks[index] = bytes(block)
        device_blocks = [(self._start + ring_index, data) for ring_index, data in blocks.items()]
        return position, device_blocks, block, placed

    def capture(self) -> tuple[Anchor, list[bytes]]:
        """Start a checkpoint of the tree as it is now; the buffered records join the image.

        Call it in the same step as the tree is encoded, with no await in between. Hand the
        returned records to `restore_records` if the checkpoint fails.
        """
        records, self._buffer, self._buffer_bytes = self._buffer, [], 0
        return Anchor(self.seq, self._head, self._digest), records

    async def write_checkpoint(self, image: bytes, anchor: Anchor) -> None:
        """Write a captured image to the slot not holding the newest checkpoint, and flush."""
        slot = 1 - self._slot
        try:
            await write_checkpoint(self._device, self._sb, slot, self._counter + 1, anchor, image)
        except BaseException:
            # The slot may now hold a valid image whose anchor no record follows yet: only a
            # new checkpoint may come next, into this same slot.
            self._checkpoint_required = True
            raise
        self._slot, self._counter = slot, self._counter + 1
        self._checkpoint_required = False
        self._used = 0
        self.image_bytes = len(image)
        self.durable_seq = max(self.durable_seq, anchor.seq)
        log.debug("checkpoint %d written to slot %d at record %d", self._counter, slot, anchor.seq)

    def image_room(self) -> int:
        """Return an estimate of the bytes the tree can still grow before a checkpoint fails.

        Records since the last checkpoint are counted in full. A record carries the same fields
        as the image entries it adds, plus its own tags, so the estimate errs on the safe side.
        """
        grown = self._used + self._buffer_bytes
        return checkpoint_capacity(self._sb) - self.image_bytes - grown

    def statistics(self) -> dict[str, int]:
        """Return counters for monitoring."""
        return {
            "seq": self.seq,
            "durable_seq": self.durable_seq,
            "buffered_bytes": self._buffer_bytes,
            "ring_used_bytes": self._used,
            "ring_bytes": self._ring_bytes,
            "checkpoint_counter": self._counter,
            "image_bytes": self.image_bytes,
        }
