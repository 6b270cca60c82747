"""Property and fuzz tests of the on-volume metadata: superblock, checkpoint header, journal ring.

docs/volume-format.md fixes the outcomes. A damaged superblock is Corrupted, a blank one NotFound.
A damaged checkpoint slot is skipped. Replay stops at the first record that fails its magic,
sequence number or chain digest, so a mutated ring must load as exactly the records before the
first damaged one. Anything else, including an exception other than these, is a failure.
"""

from __future__ import annotations

import hashlib
import random
import stat
from dataclasses import dataclass
from functools import cache
from typing import Any

import msgpack
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pxfs.errors import Corrupted, NotFound
from pxfs.volume.device import BLOCK_SIZE, MemoryDevice
from pxfs.volume.format import (
    MAP_BLOCKS,
    ROOT_INO,
    SET_ENTRY,
    SET_XATTR,
    Geometry,
    Superblock,
    Tree,
    new_inode_record,
)
from pxfs.volume.journal import (
    CHECKPOINT_MAGIC,
    RECORD_HEADER,
    Journal,
    _parse_checkpoint_header,
    format_volume,
    load_metadata,
)

# No example database, so a run leaves no files behind. The deadline catches a decoder that loops.
FUZZ = settings(database=None, deadline=2000, suppress_health_check=[HealthCheck.too_slow])

SIZE = 1024 * 1024
RING = 4 * BLOCK_SIZE
SLOT = 4 * BLOCK_SIZE
GEOMETRY = Geometry.for_size(SIZE, RING, SLOT)
UUID = "fuzz-uuid"
OPERATIONS = 40
#: Flush after these operations, so the ring holds several batches that share head blocks.
FLUSH_AFTER = {9, 10, 25}


def fuzz(examples: int) -> settings:
    """Return the fuzz settings with `examples` inputs per run."""
    return settings(FUZZ, max_examples=examples)


def digest16(data: bytes) -> bytes:
    """Return the blake2b-128 digest that the superblock and checkpoint header carry."""
    return hashlib.blake2b(data, digest_size=16).digest()


def canonical(tree: Tree) -> dict[int, Any]:
    """Return the tree as plain sorted data, independent of dict insertion order."""
    return {
        ino: (
            inode.fields(),
            sorted((inode.entries or {}).items()),
            sorted((inode.blocks or {}).items()),
            sorted((inode.xattrs or {}).items()),
        )
        for ino, inode in sorted(tree.inodes.items())
    }


def operation(index: int) -> list[list[Any]]:
    """Return the changes of operation `index`: creates, xattrs, block maps and unlinks."""
    ino = ROOT_INO + 1 + index
    name = b"f%d" % index
    changes: list[list[Any]] = [
        new_inode_record(ino, stat.S_IFREG | 0o644, 0, 0, index),
        [SET_ENTRY, ROOT_INO, name, ino],
    ]
    if index % 3 == 0:
        changes.append([SET_XATTR, ino, b"user.k", b"v" * index])
    if index % 4 == 1:
        changes.append([MAP_BLOCKS, ino, [0, GEOMETRY.data_start + index, 1]])
    if index % 5 == 4:
        changes.append([SET_ENTRY, ROOT_INO, b"f%d" % (index - 1), 0])
    return changes


@dataclass(frozen=True)
class Image:
    """A formatted device after OPERATIONS records, with the tree after each prefix of them."""

    blocks: dict[int, bytes]
    nblocks: int
    #: (start, end) ring offsets of each record, in order.
    spans: list[tuple[int, int]]
    #: canonical(tree) after the first k records, for k from 0 to OPERATIONS.
    states: list[dict[int, Any]]

    def device(self) -> MemoryDevice:
        """Return a fresh device with these blocks."""
        device = MemoryDevice(self.nblocks)
        for blockno, data in self.blocks.items():
            device.poke(blockno, data)
        return device


async def _build_image() -> Image:
    device = MemoryDevice(GEOMETRY.nblocks)
    await format_volume(device, UUID, SIZE, RING, SLOT)
    loaded = await load_metadata(device)
    tree, journal = loaded.tree, Journal(device, loaded)
    spans: list[tuple[int, int]] = []
    states = [canonical(tree)]
    position = 0
    for index in range(OPERATIONS):
        changes = operation(index)
        body = journal.encode(changes)
        for change in changes:
            tree.apply(change)
        journal.append(body)
        spans.append((position, position + RECORD_HEADER.size + len(body)))
        position = spans[-1][1]
        states.append(canonical(tree))
        if index in FLUSH_AFTER or index == OPERATIONS - 1:
            assert not journal.needs_checkpoint()
            records, last = journal.take_records()
            await journal.write_records(records, last)
    blocks = {blockno: device.peek(blockno) for blockno in device.stored_blocks()}
    return Image(blocks, device.nblocks, spans, states)


@cache
def image() -> Image:
    """Build the shared image once per run."""
    return trio.run(_build_image)


def test_clean_image_replays_every_record() -> None:
    built = image()
    loaded = trio.run(load_metadata, built.device())
    assert len(loaded.replay.records) == OPERATIONS
    assert canonical(loaded.tree) == built.states[-1]


# --- the journal ring -----------------------------------------------------------------------------


def records_before(spans: list[tuple[int, int]], offset: int) -> int:
    """Return how many records end at or before ring byte `offset`."""
    return sum(1 for _, end in spans if end <= offset)


@fuzz(200)
@given(st.data())
def test_mutated_ring_replays_prefix(data: st.DataObject) -> None:
    """200 rings with 1-8 bytes changed: the load equals the records before the first change."""
    built = image()
    ring_end = built.spans[-1][1]
    first = data.draw(st.integers(0, ring_end + 64), label="first changed byte")
    later = data.draw(st.sets(st.integers(first, RING - 1), max_size=7), label="later bytes")
    device = built.device()
    ring = bytearray(b"".join(device.peek(GEOMETRY.journal_start + i) for i in range(4)))
    for offset in {first} | later:
        ring[offset] ^= data.draw(st.integers(1, 255), label="xor")
    for index in range(4):
        chunk = bytes(ring[index * BLOCK_SIZE : (index + 1) * BLOCK_SIZE])
        device.poke(GEOMETRY.journal_start + index, chunk)

    loaded = trio.run(load_metadata, device)
    expected = records_before(built.spans, first)
    assert len(loaded.replay.records) == expected
    assert canonical(loaded.tree) == built.states[expected]


@fuzz(150)
@given(st.integers(0, 2**32), st.integers(1, OPERATIONS - 1))
def test_ring_cut_or_zeroed_replays_prefix(seed: int, keep: int) -> None:
    """150 rings zeroed from a random byte inside a record: the records before it load."""
    built = image()
    start, end = built.spans[keep]
    device = built.device()
    ring = bytearray(b"".join(device.peek(GEOMETRY.journal_start + i) for i in range(4)))
    # Zeroing must change the record: a cut after its last non-zero byte would leave it intact.
    last_nonzero = max(offset for offset in range(start, end) if ring[offset])
    cut = random.Random(seed).randrange(start, last_nonzero + 1)
    ring[cut:] = bytes(len(ring) - cut)
    for index in range(4):
        chunk = bytes(ring[index * BLOCK_SIZE : (index + 1) * BLOCK_SIZE])
        device.poke(GEOMETRY.journal_start + index, chunk)

    loaded = trio.run(load_metadata, device)
    assert len(loaded.replay.records) == keep
    assert canonical(loaded.tree) == built.states[keep]


# --- the superblock -------------------------------------------------------------------------------


def superblock_block() -> bytes:
    """Return block 0 of the shared image."""
    return image().blocks[0]


@fuzz(400)
@given(st.data())
def test_mutated_superblock_corrupted_or_same(data: st.DataObject) -> None:
    """400 superblocks with 1-6 bytes changed: Corrupted, or the same superblock."""
    block = bytearray(superblock_block())
    original = Superblock.decode(bytes(block))
    # Most changes go into the magic, length, body and digest, the rest anywhere in the block.
    for _ in range(data.draw(st.integers(1, 6), label="changes")):
        offset = data.draw(st.integers(0, 400) | st.integers(0, BLOCK_SIZE - 1), label="offset")
        block[offset] ^= data.draw(st.integers(1, 255), label="xor")
    try:
        decoded = Superblock.decode(bytes(block))
    except (Corrupted, NotFound):
        return
    assert decoded == original


def superblock_fields() -> dict[str, Any]:
    """Return the decoded body of the shared superblock."""
    block = superblock_block()
    length = int.from_bytes(block[8:12], "little")
    fields: dict[str, Any] = msgpack.unpackb(block[12 : 12 + length])
    return fields


def signed_superblock(body: bytes) -> bytes:
    """Return a block 0 that carries `body` with a correct digest."""
    block = b"PXFS-SB\x00" + len(body).to_bytes(4, "little") + body + digest16(body)
    return block + bytes(BLOCK_SIZE - len(block))


# Small integers only: format_id goes through bytes(), which allocates that many bytes.
field_values = (
    st.none()
    | st.booleans()
    | st.integers(-(2**16), 2**16)
    | st.text(max_size=6)
    | st.binary(max_size=20)
    | st.lists(st.integers(-4, 4000), max_size=3)
)


@fuzz(300)
@given(st.data())
def test_resigned_superblock_fields_only_corrupted(data: st.DataObject) -> None:
    """300 superblock bodies with fields changed, dropped or retyped and a valid digest:
    a Superblock or Corrupted, no other exception."""
    fields = superblock_fields()
    for _ in range(data.draw(st.integers(1, 3), label="changes")):
        key = data.draw(st.sampled_from(sorted(fields)) | st.text(max_size=4), label="key")
        if data.draw(st.booleans(), label="drop"):
            fields.pop(key, None)
        else:
            fields[key] = data.draw(field_values, label="value")
    body = msgpack.packb(fields) if data.draw(st.booleans()) else data.draw(st.binary(max_size=64))
    try:
        Superblock.decode(signed_superblock(body))
    except Corrupted:
        return


# A superblock whose digest matches but whose fields make no sense is accepted: _from_fields
# checks the version, block size and region offsets, but not the types or ranges of the sizes,
# the uuid or the format_id.
NONSENSE_FIELDS = [
    pytest.param({"data_blocks": 0}, id="no-data-blocks"),
    pytest.param({"data_blocks": -5}, id="negative-data-blocks"),
    pytest.param({"size": -1}, id="negative-size"),
    pytest.param({"size": "1G"}, id="size-string"),
    pytest.param({"uuid": 5}, id="uuid-int"),
    pytest.param({"format_id": b""}, id="format-id-empty"),
]


@pytest.mark.xfail(strict=True, reason="Superblock.decode accepts nonsense sizes, uuid, format_id")
@pytest.mark.parametrize("change", NONSENSE_FIELDS)
def test_resigned_nonsense_superblock_corrupted(change: dict[str, Any]) -> None:
    fields = {**superblock_fields(), **change}
    with pytest.raises(Corrupted):
        Superblock.decode(signed_superblock(msgpack.packb(fields)))


# --- the checkpoint header ------------------------------------------------------------------------


def checkpoint_block() -> bytes:
    """Return the header block of checkpoint slot 0 of the shared image."""
    return image().blocks[GEOMETRY.checkpoint_starts[0]]


def shared_superblock() -> Superblock:
    """Return the decoded superblock of the shared image."""
    return Superblock.decode(superblock_block())


@fuzz(300)
@given(st.data())
def test_mutated_checkpoint_header_skipped_or_same(data: st.DataObject) -> None:
    """300 checkpoint headers with 1-6 bytes changed: skipped (None) or the same fields."""
    sb = shared_superblock()
    block = bytearray(checkpoint_block())
    original = _parse_checkpoint_header(bytes(block), sb)
    assert original is not None
    for _ in range(data.draw(st.integers(1, 6), label="changes")):
        offset = data.draw(st.integers(0, 300) | st.integers(0, BLOCK_SIZE - 1), label="offset")
        block[offset] ^= data.draw(st.integers(1, 255), label="xor")
    assert _parse_checkpoint_header(bytes(block), sb) in (None, original)


@fuzz(200)
@given(st.integers(0, 2**32), st.integers(0, SLOT - 1))
def test_mutated_checkpoint_slot_loads_or_corrupted(seed: int, offset: int) -> None:
    """200 devices with one byte of the only checkpoint slot changed: Corrupted or a full load."""
    built = image()
    device = built.device()
    blockno = GEOMETRY.checkpoint_starts[0] + offset // BLOCK_SIZE
    block = bytearray(device.peek(blockno))
    block[offset % BLOCK_SIZE] ^= random.Random(seed).randrange(1, 256)
    device.poke(blockno, bytes(block))
    try:
        loaded = trio.run(load_metadata, device)
    except Corrupted:
        return
    # Only the zero padding after the header and image is outside the digests.
    assert canonical(loaded.tree) == built.states[-1]


def signed_checkpoint(fields: Any) -> bytes:
    """Return a checkpoint header block that carries `fields` with a correct digest."""
    body = msgpack.packb(fields)
    block = CHECKPOINT_MAGIC + len(body).to_bytes(4, "little") + body + digest16(body)
    return block + bytes(BLOCK_SIZE - len(block))


# _parse_checkpoint_header indexes the decoded header without checking its type or keys. So a
# header whose digest matches but lacks image_len, is not a map, or has a string image_len
# escapes as KeyError, AttributeError or TypeError instead of making the slot invalid.
BROKEN_HEADERS = [
    pytest.param({"uuid": UUID}, id="no-image-len"),
    pytest.param([UUID], id="not-a-map"),
    pytest.param({"uuid": UUID, "image_len": "x"}, id="image-len-string"),
]


@pytest.mark.xfail(
    strict=True,
    raises=(KeyError, AttributeError, TypeError),
    reason="a re-signed bad checkpoint header escapes, not None",
)
@pytest.mark.parametrize("fields", BROKEN_HEADERS)
def test_resigned_broken_checkpoint_header_skipped(fields: Any) -> None:
    assert _parse_checkpoint_header(signed_checkpoint(fields), shared_superblock()) is None


# --- the checkpoint image and single changes ------------------------------------------------------


def is_known_mode_bug(exc: OverflowError) -> bool:
    """Tell whether `exc` is the negative-mode bug that the xfail tests below record."""
    return "negative value to unsigned int" in str(exc)


@fuzz(300)
@given(st.integers(0, 2**32))
def test_mutated_image_decode_only_corrupted(seed: int) -> None:
    """300 seeds, 10 mutants each (3000 images): Tree.decode gives a tree or Corrupted."""
    rng = random.Random(seed)
    good = Tree.new(0)
    for index in range(6):
        for change in operation(index):
            good.apply(change)
    encoded = good.encode()
    for _ in range(10):
        mutant = bytearray(encoded)
        for _ in range(rng.randint(1, 4)):
            mutant[rng.randrange(len(mutant))] = rng.randrange(256)
        try:
            Tree.decode(bytes(mutant))
        except Corrupted:
            continue
        except OverflowError as exc:
            # NOTE: remove this branch once Tree.decode maps OverflowError to Corrupted.
            if is_known_mode_bug(exc):
                continue
            raise


change_items = st.none() | st.booleans() | st.integers(-3, 70) | st.binary(max_size=4)
changes = st.tuples(
    st.sampled_from(["i", "e", "m", "t", "x", "d", "?", ""]),
    st.lists(change_items | st.lists(st.integers(-2, 40), max_size=6), max_size=13),
).map(lambda parts: [parts[0], *parts[1]])


@fuzz(200)
@given(st.lists(changes, min_size=1, max_size=6))
def test_apply_random_changes_only_corrupted(batch: list[list[Any]]) -> None:
    """200 batches of random changes on a small tree: applied or Corrupted, nothing else."""
    tree = Tree.new(0)
    for index in range(3):
        for change in operation(index):
            tree.apply(change)
    for change in batch:
        try:
            tree.apply(change)
        except Corrupted:
            continue
        except OverflowError as exc:
            # NOTE: remove this branch once Tree.apply maps OverflowError to Corrupted.
            if is_known_mode_bug(exc):
                continue
            raise


# stat.S_ISREG and S_ISDIR raise OverflowError for a negative mode, and neither Tree.decode nor
# Tree.apply counts OverflowError among the errors that they turn into Corrupted.
NEGATIVE_MODE = [ROOT_INO + 4, -1, 1, 0, 0, 0, 0, 0, 0, 0, 0, b""]


@pytest.mark.xfail(
    strict=True,
    raises=OverflowError,
    reason="Tree.apply lets OverflowError out for a negative mode",
)
def test_apply_negative_mode_corrupted() -> None:
    tree = Tree.new(0)
    with pytest.raises(Corrupted):
        tree.apply(["i", *NEGATIVE_MODE])


@pytest.mark.xfail(
    strict=True,
    raises=OverflowError,
    reason="Tree.decode lets OverflowError out for a negative mode",
)
def test_decode_negative_mode_corrupted() -> None:
    fields = msgpack.unpackb(Tree.new(0).encode(), strict_map_key=False)
    fields["inodes"].append(NEGATIVE_MODE)
    with pytest.raises(Corrupted):
        Tree.decode(msgpack.packb(fields))
