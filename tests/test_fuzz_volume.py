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
from pxfs.volume.format import ROOT_INO, Geometry, Superblock
from pxfs.volume.inodes import MAP_BLOCKS, SET_ENTRY, SET_XATTR, new_inode_record
from pxfs.volume.journal import (
    CHECKPOINT_MAGIC,
    RECORD_HEADER,
    Journal,
    _parse_checkpoint_header,
    format_volume,
    load_metadata,
)
from pxfs.volume.tree import Tree

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
        # index // 4 stays below the 16 blocks of the data region for all OPERATIONS.
        changes.append([MAP_BLOCKS, ino, [0, GEOMETRY.data_start + index // 4, 1]])
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


field_values = (
    st.none()
    | st.booleans()
    | st.integers(-(2**16), 2**16)
    # The whole range that msgpack encodes: a signed 64-bit low end, an unsigned 64-bit top.
    | st.integers(-(2**63), 2**64 - 1)
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
        decoded = Superblock.decode(signed_superblock(body))
    except Corrupted:
        return
    check_superblock(decoded)


def check_superblock(sb: Superblock) -> None:
    """Assert what Superblock.decode promises about a superblock that it returns."""
    geometry = sb.geometry
    assert isinstance(sb.uuid, str)
    assert sb.uuid
    assert isinstance(sb.format_id, bytes)
    assert len(sb.format_id) == 16
    assert geometry.journal_blocks >= 2
    assert geometry.checkpoint_blocks >= 2
    assert 16 <= geometry.data_blocks <= geometry.max_data_blocks
    assert geometry.nblocks <= 2**32
    assert -(-sb.size // BLOCK_SIZE) == geometry.data_blocks


# Superblocks whose digest matches but whose fields are of the wrong type, out of range or do
# not agree with the geometry. A huge integer format_id must not reach bytes(), which would
# allocate that many bytes.
NONSENSE_FIELDS = [
    pytest.param({"data_blocks": 0}, id="no-data-blocks"),
    pytest.param({"data_blocks": -5}, id="negative-data-blocks"),
    pytest.param({"data_blocks": 2**40}, id="data-blocks-over-slot-limit"),
    pytest.param({"journal_blocks": 1}, id="one-journal-block"),
    pytest.param({"checkpoint_blocks": 2**40}, id="checkpoint-blocks-huge"),
    pytest.param({"size": -1}, id="negative-size"),
    pytest.param({"size": "1G"}, id="size-string"),
    pytest.param({"size": SIZE * 2}, id="size-over-data-blocks"),
    pytest.param({"uuid": 5}, id="uuid-int"),
    pytest.param({"uuid": ""}, id="uuid-empty"),
    pytest.param({"format_id": b""}, id="format-id-empty"),
    pytest.param({"format_id": 10**12}, id="format-id-huge-int"),
    pytest.param({"version": True}, id="version-bool"),
    pytest.param({"checkpoint_starts": "ab"}, id="checkpoint-starts-string"),
]


@pytest.mark.parametrize("change", NONSENSE_FIELDS)
def test_resigned_nonsense_superblock_corrupted(change: dict[str, Any]) -> None:
    fields = {**superblock_fields(), **change}
    with pytest.raises(Corrupted):
        Superblock.decode(signed_superblock(msgpack.packb(fields)))


def test_resigned_list_superblock_corrupted() -> None:
    body = msgpack.packb(list(superblock_fields().values()))
    with pytest.raises(Corrupted):
        Superblock.decode(signed_superblock(body))


def test_shared_superblock_passes_checks() -> None:
    check_superblock(shared_superblock())


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


def checkpoint_fields() -> dict[str, Any]:
    """Return the decoded header of checkpoint slot 0 of the shared image."""
    block = checkpoint_block()
    length = int.from_bytes(block[8:12], "little")
    fields: dict[str, Any] = msgpack.unpackb(block[12 : 12 + length])
    return fields


# Headers whose digest matches but that lack a field, are not a map or have a field of the wrong
# type or range: each makes the slot invalid.
BROKEN_HEADERS = [
    pytest.param({"uuid": UUID}, id="no-image-len"),
    pytest.param([UUID], id="not-a-map"),
    pytest.param({"uuid": UUID, "image_len": "x"}, id="image-len-string"),
    pytest.param({"image_len": -1}, id="image-len-negative"),
    pytest.param({"image_len": SLOT}, id="image-len-over-slot"),
    pytest.param({"counter": "1"}, id="counter-string"),
    pytest.param({"counter": -1}, id="counter-negative"),
    pytest.param({"seq": None}, id="seq-null"),
    pytest.param({"position": RING + 1}, id="position-past-ring"),
    pytest.param({"digest": b"short"}, id="digest-short"),
    pytest.param({"image_digest": 5}, id="image-digest-int"),
]


@pytest.mark.parametrize("fields", BROKEN_HEADERS)
def test_resigned_broken_checkpoint_header_skipped(fields: Any) -> None:
    if isinstance(fields, dict) and "uuid" not in fields:
        fields = {**checkpoint_fields(), **fields}
    assert _parse_checkpoint_header(signed_checkpoint(fields), shared_superblock()) is None


def test_resigned_checkpoint_header_unchanged_accepted() -> None:
    block = signed_checkpoint(checkpoint_fields())
    assert _parse_checkpoint_header(block, shared_superblock()) == checkpoint_fields()


def test_resigned_unhashable_key_header_skipped() -> None:
    body = b"\x81\x90\x00"
    block = CHECKPOINT_MAGIC + len(body).to_bytes(4, "little") + body + digest16(body)
    block += bytes(BLOCK_SIZE - len(block))
    assert _parse_checkpoint_header(block, shared_superblock()) is None


# --- the checkpoint image and single changes ------------------------------------------------------


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
            Tree.decode(bytes(mutant), GEOMETRY)
        except Corrupted:
            continue


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
            tree.apply(change, GEOMETRY)
        except Corrupted:
            continue


# stat.S_ISREG and S_ISDIR raise OverflowError for a negative mode, so the mode and every other
# field of an inode record is checked before it is used.
NEGATIVE_MODE = [ROOT_INO + 4, -1, 1, 0, 0, 0, 0, 0, 0, 0, 0, b""]
VALID_INODE = new_inode_record(ROOT_INO + 4, stat.S_IFREG | 0o644, 0, 0, 0)[1:]
#: (field index, value) pairs that make VALID_INODE invalid.
BAD_INODE_FIELDS = [
    pytest.param(0, 0, id="ino-zero"),
    pytest.param(0, 2**64, id="ino-over-64-bits"),
    pytest.param(1, -1, id="mode-negative"),
    pytest.param(1, 2**40, id="mode-huge"),
    pytest.param(1, 0o644, id="mode-without-type"),
    pytest.param(1, "rw", id="mode-string"),
    pytest.param(2, -1, id="nlink-negative"),
    pytest.param(3, 2**32, id="uid-over-32-bits"),
    pytest.param(4, None, id="gid-null"),
    pytest.param(5, -1, id="rdev-negative"),
    pytest.param(6, -1, id="size-negative"),
    pytest.param(6, 2**63, id="size-over-off-t"),
    pytest.param(7, 1.5, id="atime-float"),
    pytest.param(8, 2**63, id="mtime-over-int64"),
    pytest.param(9, True, id="ctime-bool"),
    pytest.param(10, -1, id="generation-negative"),
    pytest.param(11, "target", id="target-string"),
    pytest.param(11, b"t" * 4096, id="target-too-long"),
]


def test_apply_negative_mode_corrupted() -> None:
    tree = Tree.new(0)
    with pytest.raises(Corrupted):
        tree.apply(["i", *NEGATIVE_MODE])


def test_decode_negative_mode_corrupted() -> None:
    fields = msgpack.unpackb(Tree.new(0).encode(), strict_map_key=False)
    fields["inodes"].append(NEGATIVE_MODE)
    with pytest.raises(Corrupted):
        Tree.decode(msgpack.packb(fields))


def test_valid_inode_record_applies() -> None:
    tree = Tree.new(0)
    tree.apply(["i", *VALID_INODE])
    assert tree.get(VALID_INODE[0]).is_reg


@pytest.mark.parametrize(("index", "value"), BAD_INODE_FIELDS)
def test_apply_bad_inode_field_corrupted(index: int, value: Any) -> None:
    record = list(VALID_INODE)
    record[index] = value
    tree = Tree.new(0)
    with pytest.raises(Corrupted):
        tree.apply(["i", *record])
    assert VALID_INODE[0] not in tree.inodes


# msgpack has no form for an integer of 2**64 or more, so no image can carry one.
PACKABLE_BAD_INODE_FIELDS = [param for param in BAD_INODE_FIELDS if param.id != "ino-over-64-bits"]


@pytest.mark.parametrize(("index", "value"), PACKABLE_BAD_INODE_FIELDS)
def test_decode_bad_inode_field_corrupted(index: int, value: Any) -> None:
    record = list(VALID_INODE)
    record[index] = value
    fields = msgpack.unpackb(Tree.new(0).encode(), strict_map_key=False)
    fields["inodes"].append(record)
    with pytest.raises(Corrupted):
        Tree.decode(msgpack.packb(fields))


def test_update_bad_inode_field_keeps_inode() -> None:
    tree = Tree.new(0)
    tree.apply(["i", *VALID_INODE])
    record = list(VALID_INODE)
    record[2] = -1
    with pytest.raises(Corrupted):
        tree.apply(["i", *record])
    assert tree.get(VALID_INODE[0]).nlink == 1


@pytest.mark.parametrize(
    "change",
    [
        pytest.param([SET_ENTRY, ROOT_INO, "name", ROOT_INO], id="entry-name-string"),
        pytest.param([SET_ENTRY, ROOT_INO, b"", ROOT_INO], id="entry-name-empty"),
        pytest.param([SET_ENTRY, ROOT_INO, b"n" * 256, ROOT_INO], id="entry-name-too-long"),
        pytest.param([SET_XATTR, ROOT_INO, "user.k", b"v"], id="xattr-name-string"),
        pytest.param([SET_XATTR, ROOT_INO, b"user.k", 5], id="xattr-value-int"),
    ],
)
def test_apply_bad_name_or_value_corrupted(change: list[Any]) -> None:
    tree = Tree.new(0)
    with pytest.raises(Corrupted):
        tree.apply(change)
    assert tree.get(ROOT_INO).entries == {}
    assert tree.get(ROOT_INO).xattrs is None


# --- block runs -----------------------------------------------------------------------------------

# Tree expands a run into one dict entry per block, so a digest-valid run with a huge count,
# such as [file index 0, block 0, 10**12 blocks], would take hours and more memory than a
# machine has. The geometry bounds every run before any is expanded.
FILE_INO = ROOT_INO + 1
DATA = GEOMETRY.data_start
HUGE_RUNS = [
    pytest.param([0, 0, 10**12], id="count-10-to-12-from-block-0"),
    pytest.param([0, DATA, 10**12], id="count-10-to-12-in-data-region"),
    pytest.param([0, DATA, GEOMETRY.data_blocks + 1], id="count-one-past-region"),
    pytest.param([0, DATA - 1, 1], id="block-before-region"),
    pytest.param([0, GEOMETRY.nblocks, 1], id="block-past-region"),
    pytest.param([-1, DATA, 1], id="negative-file-index"),
    pytest.param([0, DATA, 0], id="count-zero"),
    pytest.param([2**63, DATA, 1], id="file-index-past-off-t"),
    pytest.param([0, DATA, 1, 5], id="not-triples"),
    pytest.param([0, DATA, True], id="count-bool"),
    pytest.param(
        [0, DATA, GEOMETRY.data_blocks, GEOMETRY.data_blocks, DATA, 1],
        id="runs-together-past-region",
    ),
]


def tree_with_file() -> Tree:
    """Return a tree with one empty regular file, FILE_INO."""
    tree = Tree.new(0)
    tree.apply(new_inode_record(FILE_INO, stat.S_IFREG | 0o644, 0, 0, 0))
    return tree


@pytest.mark.parametrize("runs", HUGE_RUNS)
def test_apply_out_of_bounds_run_corrupted(runs: list[int]) -> None:
    tree = tree_with_file()
    with pytest.raises(Corrupted):
        tree.apply([MAP_BLOCKS, FILE_INO, runs], GEOMETRY)
    assert tree.get(FILE_INO).blocks == {}
    assert tree.mapped_blocks == 0


@pytest.mark.parametrize("runs", HUGE_RUNS)
def test_decode_out_of_bounds_run_corrupted(runs: list[int]) -> None:
    fields = msgpack.unpackb(tree_with_file().encode(), strict_map_key=False)
    fields["maps"].append([FILE_INO, runs])
    with pytest.raises(Corrupted):
        Tree.decode(msgpack.packb(fields), GEOMETRY)


def test_apply_huge_run_without_geometry_corrupted() -> None:
    tree = tree_with_file()
    with pytest.raises(Corrupted):
        tree.apply([MAP_BLOCKS, FILE_INO, [0, 0, 10**12]])


def test_apply_whole_data_region_maps() -> None:
    tree = tree_with_file()
    tree.apply([MAP_BLOCKS, FILE_INO, [0, DATA, GEOMETRY.data_blocks]], GEOMETRY)
    assert len(tree.get(FILE_INO).blocks or {}) == GEOMETRY.data_blocks
    assert tree.mapped_blocks == GEOMETRY.data_blocks


def test_apply_maps_past_region_total_corrupted() -> None:
    """Two files that each map the whole data region hold more blocks than it has."""
    tree = tree_with_file()
    tree.apply(new_inode_record(FILE_INO + 1, stat.S_IFREG | 0o644, 0, 0, 0))
    whole = [0, DATA, GEOMETRY.data_blocks]
    tree.apply([MAP_BLOCKS, FILE_INO, whole], GEOMETRY)
    with pytest.raises(Corrupted):
        tree.apply([MAP_BLOCKS, FILE_INO + 1, whole], GEOMETRY)


def test_decode_maps_past_region_total_corrupted() -> None:
    tree = tree_with_file()
    tree.apply(new_inode_record(FILE_INO + 1, stat.S_IFREG | 0o644, 0, 0, 0))
    fields = msgpack.unpackb(tree.encode(), strict_map_key=False)
    whole = [0, DATA, GEOMETRY.data_blocks]
    fields["maps"] += [[FILE_INO, whole], [FILE_INO + 1, whole]]
    with pytest.raises(Corrupted):
        Tree.decode(msgpack.packb(fields), GEOMETRY)


def test_mapped_blocks_follow_unmap_and_drop() -> None:
    tree = tree_with_file()
    tree.apply([MAP_BLOCKS, FILE_INO, [0, DATA, 4]], GEOMETRY)
    tree.apply([MAP_BLOCKS, FILE_INO, [2, DATA + 8, 4]], GEOMETRY)
    assert tree.mapped_blocks == 6
    tree.apply(["t", FILE_INO, 4])
    assert tree.mapped_blocks == 4
    tree.apply(["d", FILE_INO])
    assert tree.mapped_blocks == 0


def test_decode_counts_mapped_blocks() -> None:
    tree = tree_with_file()
    tree.apply([MAP_BLOCKS, FILE_INO, [0, DATA, 3, 10, DATA + 5, 1]], GEOMETRY)
    assert Tree.decode(tree.encode(), GEOMETRY).mapped_blocks == 4


async def _load_after_huge_run() -> None:
    device = MemoryDevice(GEOMETRY.nblocks)
    await format_volume(device, UUID, SIZE, RING, SLOT)
    loaded = await load_metadata(device)
    journal = Journal(device, loaded)
    changes = [
        new_inode_record(FILE_INO, stat.S_IFREG | 0o644, 0, 0, 0),
        [MAP_BLOCKS, FILE_INO, [0, DATA, 10**12]],
    ]
    # The record goes into the ring with a valid chain digest, as a writer with a defect or a
    # forger would put it there, without being applied to a tree first.
    journal.append(journal.encode(changes))
    records, last = journal.take_records()
    await journal.write_records(records, last)
    await load_metadata(device)


def test_replay_huge_run_corrupted() -> None:
    with pytest.raises(Corrupted, match="journal record 1"):
        trio.run(_load_after_huge_run)
