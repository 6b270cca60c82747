import errno
import hashlib
import os
import struct
import threading
import zlib

import msgpack
import pytest
import trio

from pxfs import errors, replicaformat
from pxfs.frames import MAX_FRAME
from pxfs.replica import Replica
from pxfs.replication import BLOCKS_PER_FRAME, TRIMS_PER_FRAME
from pxfs.store import BLOCK_SIZE, DIGEST_BLOCKS, DIGEST_SIZE, RECORD_SIZE, ReplicaStore
from pxfs.storeargs import (
    MAX_BLOCKS_PER_CALL,
    MAX_DIGESTS_PER_CALL,
    MAX_TRIMS_PER_CALL,
    MAX_VERSIONS_PER_CALL,
)

VOL = "4817263540921"


def block(seed: int) -> bytes:
    """A block whose content depends on `seed`, so that blocks differ from each other."""
    return (seed.to_bytes(4, "little") + b"pxfs-block") * (BLOCK_SIZE // 14) + bytes(
        BLOCK_SIZE % 14
    )


@pytest.fixture
async def store(tmp_path):
    store = ReplicaStore(tmp_path / "replicas")
    yield store
    await store.aclose()


@pytest.fixture
async def volume(store):
    await store.create(VOL, 1024)
    return store


def data_path(store: ReplicaStore, vol_id: str = VOL):
    return store.root / vol_id / "data"


async def test_create_starts_empty(volume):
    info = await volume.info(VOL)
    assert info == {"nblocks": 1024, "used_blocks": 0, "epoch": 0}
    assert await volume.read(VOL, [0, 1023]) == [None, None]


async def test_write_read_round_trip(volume):
    await volume.write(VOL, 0, 1, [[5, block(5)], [6, block(6)]])
    assert await volume.read(VOL, [6, 5, 7]) == [block(6), block(5), None]


def _patch_of(old: bytes, offset: int, piece: bytes) -> tuple[list[object], bytes]:
    new = old[:offset] + piece + old[offset + len(piece) :]
    return [5, offset, piece, zlib.crc32(old), zlib.crc32(new)], new


async def test_patch_changes_part_of_block(volume):
    await volume.write(VOL, 0, 1, [[5, block(5)]])
    patch, new = _patch_of(block(5), 4096, b"\x01" * 4096)
    assert await volume.patch(VOL, 0, 2, [patch]) == []
    assert await volume.read(VOL, [5]) == [new]
    assert (await volume.versions(VOL, 5, 1)) == struct.pack("<Q", 2)


async def test_patch_leaves_block_of_other_crc(volume):
    await volume.write(VOL, 0, 1, [[5, block(6)]])
    patch, _ = _patch_of(block(5), 0, b"\x01")
    assert await volume.patch(VOL, 0, 2, [patch]) == [5]
    assert await volume.read(VOL, [5]) == [block(6)]
    assert (await volume.versions(VOL, 5, 1)) == struct.pack("<Q", 1)


async def test_patch_leaves_unwritten_block(volume):
    patch, _ = _patch_of(bytes(BLOCK_SIZE), 0, b"\x01")
    assert await volume.patch(VOL, 0, 2, [patch]) == [5]
    assert await volume.read(VOL, [5]) == [None]


async def test_patch_keeps_checksum_failure_of_rotten_block(volume):
    await volume.write(VOL, 0, 1, [[5, block(5)]])
    with open(data_path(volume), "r+b") as f:
        f.seek(5 * BLOCK_SIZE + 60000)
        f.write(b"rot")
    patch, _ = _patch_of(block(5), 0, b"\x01")
    assert await volume.patch(VOL, 0, 2, [patch]) == []
    with pytest.raises(errors.ChecksumMismatch):
        await volume.read(VOL, [5])


@pytest.mark.parametrize(
    "entry",
    [
        [5, 0, b"x"],
        [5, BLOCK_SIZE, b"x", 0, 0],
        [5, BLOCK_SIZE - 1, b"xy", 0, 0],
        [5, 0, b"", 0, 0],
        [5, 0, "text", 0, 0],
        [5, 0, b"x", -1, 0],
        [5, 0, b"x", 0, 2**32],
        [1024, 0, b"x", 0, 0],
    ],
)
async def test_patch_rejects_invalid_entry(volume, entry):
    with pytest.raises(errors.InvalidArgument):
        await volume.patch(VOL, 0, 2, [entry])


async def test_write_same_block_twice_counts_once(volume):
    await volume.write(VOL, 0, 1, [[9, block(1)]])
    await volume.write(VOL, 0, 2, [[9, block(2)], [9, block(3)]])
    info = await volume.info(VOL)
    assert info["used_blocks"] == 1
    assert await volume.read(VOL, [9]) == [block(3)]


async def test_usage_decreases_after_trim(volume):
    await volume.write(VOL, 0, 1, [[n, block(n)] for n in range(10, 20)])
    assert (await volume.info(VOL))["used_blocks"] == 10
    await volume.trim(VOL, 0, [12, 13, 14, 500])
    assert (await volume.info(VOL))["used_blocks"] == 7
    assert await volume.read(VOL, [11, 12, 14, 15]) == [block(11), None, None, block(15)]


async def test_data_file_is_sparse(volume):
    path = data_path(volume)
    assert os.stat(path).st_size == 1024 * BLOCK_SIZE
    await volume.write(VOL, 0, 1, [[100, block(1)], [700, block(2)]])
    await volume.flush(VOL)
    allocated = os.stat(path).st_blocks * 512
    assert allocated <= 4 * BLOCK_SIZE


async def test_trim_frees_space(volume):
    path = data_path(volume)
    await volume.write(VOL, 0, 1, [[n, block(n)] for n in range(32)])
    await volume.flush(VOL)
    before = os.stat(path).st_blocks * 512
    await volume.trim(VOL, 0, list(range(32)))
    after = os.stat(path).st_blocks * 512
    assert before >= 32 * BLOCK_SIZE
    assert after <= BLOCK_SIZE


async def test_flipped_byte_raises_checksum_mismatch(volume):
    await volume.write(VOL, 0, 1, [[2, block(2)], [3, block(3)]])
    with open(data_path(volume), "r+b") as f:
        f.seek(3 * BLOCK_SIZE + 777)
        original = f.read(1)
        f.seek(3 * BLOCK_SIZE + 777)
        f.write(bytes([original[0] ^ 0x01]))
    with pytest.raises(errors.ChecksumMismatch, match=f"volume {VOL} block 3"):
        await volume.read(VOL, [2, 3])
    assert await volume.read(VOL, [2]) == [block(2)]
    assert await volume.verify(VOL) == [3]


async def test_verify_clean_volume(volume):
    await volume.write(VOL, 0, 1, [[n, block(n)] for n in range(0, 1024, 100)])
    assert await volume.verify(VOL) == []


async def test_stale_epoch_rejected(volume):
    assert await volume.open(VOL, 5) == 5
    with pytest.raises(errors.StaleEpoch, match="epoch 3 is older than epoch 5"):
        await volume.open(VOL, 3)
    with pytest.raises(errors.StaleEpoch):
        await volume.write(VOL, 4, 1, [[0, block(0)]])
    with pytest.raises(errors.StaleEpoch):
        await volume.trim(VOL, 4, [0])
    assert await volume.read(VOL, [0]) == [None]
    await volume.write(VOL, 5, (5 << 32) | 1, [[0, block(0)]])
    assert await volume.read(VOL, [0]) == [block(0)]


async def test_fence_rejects_older_versions(volume):
    await volume.write(VOL, 1, (1 << 32) | 3, [[5, block(5)], [6, block(6)]])
    await volume.fence(VOL, 1, (1 << 32) | 10)
    with pytest.raises(errors.StaleWrite, match="version 100000009 was sent before the resync"):
        await volume.write(VOL, 1, (1 << 32) | 9, [[5, block(50)]])
    patch, _ = _patch_of(block(5), 0, b"\x01")
    with pytest.raises(errors.StaleWrite):
        await volume.patch(VOL, 1, (1 << 32) | 9, [patch])
    with pytest.raises(errors.StaleWrite):
        await volume.trim(VOL, 1, [6], (1 << 32) | 9)
    with pytest.raises(errors.StaleWrite):
        await volume.trim(VOL, 1, [6])
    assert await volume.read(VOL, [5, 6]) == [block(5), block(6)]
    assert await volume.versions(VOL, 5, 2) == struct.pack("<QQ", (1 << 32) | 3, (1 << 32) | 3)

    # A copy is how a resync stores older versions, so the fence leaves it alone.
    assert await volume.copy(VOL, 1, [[6, (1 << 32) | 3, (1 << 32) | 4, block(60)]]) == 1
    await volume.write(VOL, 1, (1 << 32) | 10, [[5, block(51)]])
    assert await volume.read(VOL, [5, 6]) == [block(51), block(60)]


async def test_fence_never_moves_down(volume):
    await volume.fence(VOL, 1, (1 << 32) | 10)
    await volume.fence(VOL, 1, (1 << 32) | 2)
    with pytest.raises(errors.StaleWrite):
        await volume.write(VOL, 1, (1 << 32) | 5, [[5, block(5)]])
    # A later epoch writes above every version of the earlier ones.
    await volume.write(VOL, 2, 2 << 32, [[5, block(5)]])
    assert await volume.read(VOL, [5]) == [block(5)]


async def test_fence_rejects_bad_arguments(volume):
    await volume.open(VOL, 3)
    with pytest.raises(errors.StaleEpoch):
        await volume.fence(VOL, 2, 1)
    for floor in (-1, "1", 2**64):
        with pytest.raises(errors.InvalidArgument):
            await volume.fence(VOL, 3, floor)
    with pytest.raises(errors.NotFound):
        await volume.fence("99", 3, 1)
    await volume.write(VOL, 3, 1, [[0, block(0)]])


async def test_higher_epoch_in_write_is_remembered(volume):
    await volume.open(VOL, 2)
    await volume.write(VOL, 7, (7 << 32) | 1, [[0, block(0)]])
    assert (await volume.info(VOL))["epoch"] == 7
    with pytest.raises(errors.StaleEpoch):
        await volume.write(VOL, 2, (2 << 32) | 2, [[0, block(1)]])


async def test_state_survives_reopen(tmp_path):
    first = ReplicaStore(tmp_path / "replicas")
    await first.create(VOL, 64)
    await first.open(VOL, 9)
    await first.write(VOL, 9, 1, [[1, block(1)], [63, block(63)]])
    await first.flush(VOL)
    await first.aclose()

    second = ReplicaStore(tmp_path / "replicas")
    info = await second.info(VOL)
    assert info == {"nblocks": 64, "used_blocks": 2, "epoch": 9}
    assert await second.read(VOL, [1, 2, 63]) == [block(1), None, block(63)]
    with pytest.raises(errors.StaleEpoch):
        await second.open(VOL, 8)
    await second.aclose()


async def test_create_twice_raises_already_exists(volume):
    with pytest.raises(errors.AlreadyExists, match=VOL):
        await volume.create(VOL, 10)
    assert (await volume.info(VOL))["nblocks"] == 1024


async def test_delete_removes_replica(volume):
    await volume.write(VOL, 0, 1, [[0, block(0)]])
    await volume.delete(VOL)
    assert not (volume.root / VOL).exists()
    with pytest.raises(errors.NotFound, match=f"volume {VOL} has no replica"):
        await volume.read(VOL, [0])
    await volume.delete(VOL)
    await volume.create(VOL, 8)
    assert await volume.read(VOL, [0]) == [None]


async def test_unknown_volume_not_found(store):
    with pytest.raises(errors.NotFound):
        await store.info("42")
    with pytest.raises(errors.NotFound):
        await store.open("42", 1)


async def test_create_removes_leftover_staging(store):
    await store.create("1", 4)
    leftover = store.root / ".creating-77"
    leftover.mkdir()
    (leftover / "data").write_bytes(b"x")
    await store.create("2", 4)
    assert not leftover.exists()
    assert sorted(p.name for p in store.root.iterdir()) == ["1", "2"]


async def test_resize_grow_and_shrink(volume):
    await volume.write(VOL, 0, 1, [[10, block(10)], [1000, block(1000)], [1023, block(1)]])
    await volume.resize(VOL, 2048)
    await volume.write(VOL, 0, 2, [[2047, block(2047)]])
    assert await volume.read(VOL, [1000, 2047, 2000]) == [block(1000), block(2047), None]
    assert (await volume.info(VOL))["used_blocks"] == 4

    await volume.resize(VOL, 512)
    info = await volume.info(VOL)
    assert info["nblocks"] == 512
    assert info["used_blocks"] == 1
    assert os.stat(data_path(volume)).st_size == 512 * BLOCK_SIZE
    with pytest.raises(errors.InvalidArgument, match="block number"):
        await volume.read(VOL, [512])

    await volume.resize(VOL, 1024)
    assert await volume.read(VOL, [1000, 1023]) == [None, None]
    assert (await volume.info(VOL))["used_blocks"] == 1


async def test_grow_keeps_blocks_and_adds_unwritten(tmp_path):
    store = ReplicaStore(tmp_path / "replicas")
    await store.create(VOL, 1024)
    await store.write(VOL, 3, 1, [[1023, block(1023)]])
    await store.grow(VOL, 3, 2048)
    info = await store.info(VOL)
    assert info == {"nblocks": 2048, "used_blocks": 1, "epoch": 3}
    assert await store.read(VOL, [1023, 1024, 2047]) == [block(1023), None, None]
    await store.write(VOL, 3, 2, [[2047, block(2047)]])
    await store.aclose()

    reopened = ReplicaStore(tmp_path / "replicas")
    assert (await reopened.info(VOL))["nblocks"] == 2048
    assert await reopened.read(VOL, [1023, 2047]) == [block(1023), block(2047)]
    assert await reopened.verify(VOL) == []
    await reopened.aclose()


async def test_grow_to_same_size_changes_nothing(volume):
    await volume.grow(VOL, 0, 1024)
    assert (await volume.info(VOL))["nblocks"] == 1024
    assert os.stat(data_path(volume)).st_size == 1024 * BLOCK_SIZE


async def test_grow_rejects_shrink(volume):
    await volume.write(VOL, 0, 1, [[1000, block(1000)]])
    with pytest.raises(errors.InvalidArgument, match="does not shrink"):
        await volume.grow(VOL, 0, 512)
    info = await volume.info(VOL)
    assert info["nblocks"] == 1024
    assert info["used_blocks"] == 1
    assert await volume.read(VOL, [1000]) == [block(1000)]


async def test_grow_with_stale_epoch_raises(volume):
    await volume.open(VOL, 5)
    with pytest.raises(errors.StaleEpoch, match="epoch 4 is older than epoch 5"):
        await volume.grow(VOL, 4, 2048)
    assert (await volume.info(VOL))["nblocks"] == 1024


async def test_grow_remembers_higher_epoch(volume):
    await volume.grow(VOL, 7, 2048)
    assert (await volume.info(VOL))["epoch"] == 7


@pytest.mark.parametrize("nblocks", [0, -1, 2**32 + 1, "2048", True])
async def test_grow_rejects_bad_nblocks(volume, nblocks):
    with pytest.raises(errors.InvalidArgument, match="nblocks"):
        await volume.grow(VOL, 0, nblocks)
    assert (await volume.info(VOL))["nblocks"] == 1024


async def test_grow_unknown_volume_not_found(store):
    with pytest.raises(errors.NotFound):
        await store.grow(VOL, 0, 2048)


async def test_corrupted_meta_raises(store):
    await store.create(VOL, 4)
    await store.aclose()
    (store.root / VOL / "meta").write_bytes(msgpack.packb({"format": 1, "vol_id": "9"}))
    with pytest.raises(errors.Corrupted, match="names volume"):
        await store.info(VOL)


async def test_short_table_raises_corrupted(store):
    await store.create(VOL, 4)
    await store.aclose()
    os.truncate(store.root / VOL / "table", 3 * RECORD_SIZE)
    with pytest.raises(errors.Corrupted, match="shorter"):
        await store.info(VOL)


async def test_concurrent_writes_count_exactly(volume):
    async with trio.open_nursery() as nursery:
        for n in range(40):
            nursery.start_soon(volume.write, VOL, 0, n + 1, [[n % 20, block(n)]])
    assert (await volume.info(VOL))["used_blocks"] == 20


BAD_VOLUME_IDS = ["../etc", "", "12a", " 12", "1" * 21, 12, None, b"12"]


@pytest.mark.parametrize("vol_id", BAD_VOLUME_IDS)
async def test_bad_volume_id_rejected(store, vol_id):
    with pytest.raises(errors.InvalidArgument, match="volume id"):
        await store.create(vol_id, 4)
    with pytest.raises(errors.InvalidArgument, match="volume id"):
        await store.read(vol_id, [0])


@pytest.mark.parametrize("nblocks", [0, -1, True, "4", 4.0, 2**32 + 1])
async def test_bad_nblocks_rejected(store, nblocks):
    with pytest.raises(errors.InvalidArgument, match="nblocks"):
        await store.create(VOL, nblocks)


BAD_WRITES = [
    ([[1024, block(0)]], "block number 1024"),
    ([[-1, block(0)]], "block number -1"),
    ([["1", block(0)]], "block number"),
    ([[0, b"short"]], "5 bytes, expected 65536"),
    ([[0, block(0) + b"x"]], "65537 bytes"),
    ([[0, "text" * 16384]], "expected bytes"),
    ([[0]], "block entry"),
    ("blocks", "expected a list"),
    ({0: block(0)}, "expected a list"),
]


@pytest.mark.parametrize(("blocks", "message"), BAD_WRITES)
async def test_bad_write_rejected(volume, blocks, message):
    with pytest.raises(errors.InvalidArgument, match=message):
        await volume.write(VOL, 0, 1, blocks)
    assert (await volume.info(VOL))["used_blocks"] == 0


@pytest.mark.parametrize(
    ("epoch", "version", "message"),
    [
        ("1", 1, "epoch"),
        (-1, 1, "epoch"),
        (2**32, 1, "epoch"),
        (0, 0, "version"),
        (0, 2**64, "version"),
        (0, None, "version"),
    ],
)
async def test_bad_epoch_or_version_rejected(volume, epoch, version, message):
    with pytest.raises(errors.InvalidArgument, match=message):
        await volume.write(VOL, epoch, version, [[0, block(0)]])
    assert (await volume.info(VOL))["epoch"] == 0


@pytest.mark.parametrize("blocknos", [[1024], [-5], [0, "1"], "0", None, [0.0]])
async def test_bad_block_numbers_rejected(volume, blocknos):
    with pytest.raises(errors.InvalidArgument):
        await volume.read(VOL, blocknos)
    with pytest.raises(errors.InvalidArgument):
        await volume.trim(VOL, 0, blocknos)


def test_handlers_cover_the_rpc_table(tmp_path):
    names = set(ReplicaStore(tmp_path).handlers())
    expected = {
        "create",
        "delete",
        "open",
        "read",
        "write",
        "patch",
        "trim",
        "fence",
        "flush",
        "info",
        "resize",
        "grow",
        "verify",
        "versions",
        "digests",
        "checksums",
        "read_versioned",
        "copy",
        "pull",
        "reset",
    }
    assert names == {f"store.{name}" for name in expected}


@pytest.fixture
async def tiny_store(tiny_fs):
    store = ReplicaStore(tiny_fs / "replicas")
    await store.create(VOL, 64)
    yield store
    await store.aclose()


async def fill_until_full(store: ReplicaStore) -> int:
    """Write blocks one by one until NoSpace; return how many were stored."""
    for n in range(64):
        try:
            await store.write(VOL, 0, n + 1, [[n, block(n)]])
        except errors.NoSpace as exc:
            assert f"block {n} of volume {VOL}" in exc.message
            return n
    pytest.fail("a 1 MiB filesystem took 4 MiB of blocks")


async def test_disk_full_raises_no_space(tiny_store):
    stored = await fill_until_full(tiny_store)
    assert 0 < stored < 16
    assert (await tiny_store.info(VOL))["used_blocks"] == stored
    expected = [block(n) for n in range(stored)] + [None]
    assert await tiny_store.read(VOL, list(range(stored + 1))) == expected
    assert await tiny_store.verify(VOL) == []


async def test_disk_full_keeps_overwrites_working(tiny_store):
    stored = await fill_until_full(tiny_store)
    await tiny_store.write(VOL, 0, 100, [[0, block(1000)]])
    assert await tiny_store.read(VOL, [0]) == [block(1000)]
    assert (await tiny_store.info(VOL))["used_blocks"] == stored


async def test_disk_full_partial_batch(tiny_store):
    with pytest.raises(errors.NoSpace, match="blocks of the write were stored"):
        await tiny_store.write(VOL, 0, 1, [[n, block(n)] for n in range(32)])
    used = (await tiny_store.info(VOL))["used_blocks"]
    assert 0 < used < 32
    assert await tiny_store.read(VOL, list(range(used + 1))) == [block(n) for n in range(used)] + [
        None
    ]


async def test_space_returns_after_trim(tiny_store):
    stored = await fill_until_full(tiny_store)
    await tiny_store.trim(VOL, 0, list(range(stored)))
    assert (await tiny_store.info(VOL))["used_blocks"] == 0
    await tiny_store.write(VOL, 0, 200, [[40, block(40)], [41, block(41)]])
    assert await tiny_store.read(VOL, [40, 41]) == [block(40), block(41)]


async def test_grow_without_space_keeps_old_size(tiny_store):
    await tiny_store.write(VOL, 0, 1, [[63, block(63)]])
    table = tiny_store.root / VOL / "table"
    # A table of 2**20 blocks takes 16 MiB, more than the 1 MiB disk holds.
    with pytest.raises(errors.NoSpace, match="grow the block table"):
        await tiny_store.grow(VOL, 0, 2**20)
    assert (await tiny_store.info(VOL))["nblocks"] == 64
    assert os.stat(table).st_size == 64 * RECORD_SIZE
    assert await tiny_store.read(VOL, [63]) == [block(63)]
    await tiny_store.write(VOL, 0, 2, [[0, block(0)]])


async def test_create_without_space_leaves_nothing(tiny_fs):
    store = ReplicaStore(tiny_fs / "replicas")
    # A 2**20-block volume needs a 16 MiB block table, which a 1 MiB filesystem cannot hold.
    with pytest.raises(errors.NoSpace, match="block table"):
        await store.create("5", 2**20)
    assert list(store.root.iterdir()) == []
    await store.aclose()


async def test_trim_longer_than_one_run(store):
    await store.create(VOL, 70000)
    await store.write(VOL, 0, 1, [[0, block(0)], [65536, block(1)], [69999, block(2)]])
    await store.trim(VOL, 0, list(range(70000)))
    assert (await store.info(VOL))["used_blocks"] == 0
    assert await store.read(VOL, [0, 65536, 69999]) == [None, None, None]


async def test_read_rejects_more_blocks_than_a_reply_frame(volume):
    await volume.write(VOL, 1, 1, [(0, block(0))])
    full = await volume.read(VOL, [0] * MAX_BLOCKS_PER_CALL)
    assert len(full) == MAX_BLOCKS_PER_CALL
    # 300 copies of one block made a 19 MiB reply, larger than any RPC frame.
    with pytest.raises(errors.InvalidArgument, match="too many block numbers: 300"):
        await volume.read(VOL, [0] * 300)


async def test_write_and_trim_reject_oversized_calls(volume):
    blocks = [(i, block(i)) for i in range(MAX_BLOCKS_PER_CALL + 1)]
    with pytest.raises(errors.InvalidArgument, match="too many blocks"):
        await volume.write(VOL, 1, 1, blocks)
    with pytest.raises(errors.InvalidArgument, match="too many block numbers"):
        await volume.trim(VOL, 1, [0] * (MAX_TRIMS_PER_CALL + 1))
    assert (await volume.info(VOL))["used_blocks"] == 0


def test_call_limits_fit_rpc_and_replication_frames():
    packed = msgpack.packb([1, 2**32, None, [bytes(BLOCK_SIZE)] * MAX_BLOCKS_PER_CALL])
    assert len(packed) <= MAX_FRAME
    assert BLOCKS_PER_FRAME <= MAX_BLOCKS_PER_CALL
    assert TRIMS_PER_FRAME <= MAX_TRIMS_PER_CALL


def unpack_versions(raw: bytes) -> list[int]:
    return [version for (version,) in struct.iter_unpack("<Q", raw)]


def flip_byte(store: ReplicaStore, blockno: int) -> None:
    with open(data_path(store), "r+b") as f:
        f.seek(blockno * BLOCK_SIZE + 99)
        byte = f.read(1)
        f.seek(blockno * BLOCK_SIZE + 99)
        f.write(bytes([byte[0] ^ 0x5A]))


async def test_versions_of_a_block_range(volume):
    await volume.write(VOL, 0, 7, [[2, block(2)], [4, block(4)]])
    await volume.write(VOL, 0, 9, [[4, block(5)]])
    raw = await volume.versions(VOL, 1, 5)
    assert isinstance(raw, bytes)
    assert unpack_versions(raw) == [0, 7, 0, 9, 0]


async def test_versions_range_is_checked(volume):
    with pytest.raises(errors.InvalidArgument, match="first block"):
        await volume.versions(VOL, 1024, 1)
    with pytest.raises(errors.InvalidArgument, match="block count"):
        await volume.versions(VOL, 1000, 25)
    assert await volume.versions(VOL, 1000, 24) == bytes(24 * 8)
    assert MAX_VERSIONS_PER_CALL * 8 < MAX_FRAME


async def test_versioned_trim_keeps_its_version(volume):
    await volume.write(VOL, 0, 3, [[n, block(n)] for n in range(4)])
    await volume.trim(VOL, 0, [1, 2], 8)
    assert unpack_versions(await volume.versions(VOL, 0, 4)) == [3, 8, 8, 3]
    assert await volume.read(VOL, [1, 2, 3]) == [None, None, block(3)]
    assert (await volume.info(VOL))["used_blocks"] == 2
    await volume.write(VOL, 0, 9, [[1, block(9)]])
    assert (await volume.info(VOL))["used_blocks"] == 3
    assert await volume.verify(VOL) == []


async def test_trimmed_blocks_counted_after_reopen(store):
    await store.create(VOL, 64)
    await store.write(VOL, 0, 1, [[n, block(n)] for n in range(10)])
    await store.trim(VOL, 0, [0, 1, 2], 2)
    await store.aclose()
    assert (await store.info(VOL))["used_blocks"] == 7


async def test_read_versioned_marks_bad_copy(volume):
    await volume.write(VOL, 0, 5, [[1, block(1)], [2, block(2)]])
    await volume.trim(VOL, 0, [3], 6)
    flip_byte(volume, 2)
    result = await volume.read_versioned(VOL, [1, 2, 3, 4])
    assert result == [(5, block(1)), (5, False), (6, None), (0, None)]


async def test_copy_applies_only_at_expected_version(volume):
    await volume.write(VOL, 0, 4, [[0, block(0)], [1, block(1)]])
    stored = await volume.copy(
        VOL, 0, [[0, 4, 10, block(10)], [1, 3, 11, block(11)], [2, 0, 12, block(12)]]
    )
    assert stored == 2
    assert await volume.read(VOL, [0, 1, 2]) == [block(10), block(1), block(12)]
    assert unpack_versions(await volume.versions(VOL, 0, 3)) == [10, 4, 12]
    assert (await volume.info(VOL))["used_blocks"] == 3


async def test_copy_can_lower_a_version_and_trim(volume):
    await volume.write(VOL, 0, 20, [[0, block(0)], [1, block(1)]])
    stored = await volume.copy(VOL, 0, [[0, 20, 6, block(6)], [1, 20, 7, None]])
    assert stored == 2
    assert await volume.read(VOL, [0, 1]) == [block(6), None]
    assert unpack_versions(await volume.versions(VOL, 0, 2)) == [6, 7]
    assert (await volume.info(VOL))["used_blocks"] == 1


async def test_copy_rewrites_bad_copy_at_same_version(volume):
    await volume.write(VOL, 0, 5, [[2, block(2)]])
    flip_byte(volume, 2)
    assert await volume.verify(VOL) == [2]
    assert await volume.copy(VOL, 0, [[2, 5, 5, block(2)]]) == 1
    assert await volume.verify(VOL) == []
    assert await volume.read(VOL, [2]) == [block(2)]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ([0, 1, 2], "invalid copy entry"),
        ([0, 0, 0, block(0)], "data needs a version"),
        ([0, -1, 2, None], "expected version"),
        ([5000, 0, 2, None], "block number"),
        ([0, 0, 2, b"short"], "5 bytes"),
    ],
)
async def test_bad_copy_rejected(volume, entry, message):
    with pytest.raises(errors.InvalidArgument, match=message):
        await volume.copy(VOL, 0, [entry])
    assert (await volume.info(VOL))["used_blocks"] == 0


async def test_copy_checks_epoch(volume):
    await volume.open(VOL, 3)
    with pytest.raises(errors.StaleEpoch):
        await volume.copy(VOL, 2, [[0, 0, 1, block(1)]])
    assert await volume.read(VOL, [0]) == [None]


async def test_versions_report_missing_data_file(volume):
    await volume.write(VOL, 0, 1, [[0, block(0)]])
    data_path(volume).unlink()
    with pytest.raises(errors.Corrupted, match="missing"):
        await volume.versions(VOL, 0, 8)


async def test_versions_report_truncated_data_file(volume):
    os.truncate(data_path(volume), 100 * BLOCK_SIZE)
    with pytest.raises(errors.Corrupted, match="shorter"):
        await volume.versions(VOL, 0, 8)


async def test_missing_data_file_at_open_is_corrupted(store):
    await store.create(VOL, 16)
    await store.aclose()
    data_path(store).unlink()
    with pytest.raises(errors.Corrupted, match="no data file"):
        await store.info(VOL)


async def test_reset_replaces_damaged_replica(store):
    await store.create(VOL, 16)
    await store.open(VOL, 4)
    await store.write(VOL, 4, 1, [[3, block(3)]])
    data_path(store).unlink()
    await store.reset(VOL, 5, 32)
    assert await store.info(VOL) == {"nblocks": 32, "used_blocks": 0, "epoch": 5}
    assert await store.read(VOL, [3]) == [None]


async def test_reset_rejects_stale_epoch(store):
    await store.create(VOL, 16)
    await store.open(VOL, 4)
    await store.write(VOL, 4, 1, [[3, block(3)]])
    with pytest.raises(errors.StaleEpoch):
        await store.reset(VOL, 3, 16)
    assert await store.read(VOL, [3]) == [block(3)]


def split_digests(raw: bytes) -> list[bytes]:
    return [raw[offset : offset + DIGEST_SIZE] for offset in range(0, len(raw), DIGEST_SIZE)]


async def expected_digest(store: ReplicaStore, first: int, count: int) -> bytes:
    """The digest of a region computed from its versions, as the store documents it."""
    versions = await store.versions(VOL, first, count)
    return hashlib.blake2b(versions, digest_size=DIGEST_SIZE).digest()


@pytest.fixture
async def regions(store):
    """A replica of two and a half regions."""
    await store.create(VOL, 2 * DIGEST_BLOCKS + DIGEST_BLOCKS // 2)
    return store


async def test_digests_are_blake2b_of_versions(regions):
    nblocks = 2 * DIGEST_BLOCKS + DIGEST_BLOCKS // 2
    await regions.write(VOL, 0, 7, [[5, block(5)], [2 * DIGEST_BLOCKS + 3, block(6)]])
    digests = split_digests(await regions.digests(VOL, 0, nblocks))
    assert len(digests) == 3
    assert digests[0] == await expected_digest(regions, 0, DIGEST_BLOCKS)
    assert digests[1] == hashlib.blake2b(bytes(8 * DIGEST_BLOCKS), digest_size=16).digest()
    last = 2 * DIGEST_BLOCKS
    assert digests[2] == await expected_digest(regions, last, nblocks - last)


async def test_digest_follows_every_change(regions):
    async def first_region() -> bytes:
        return await regions.digests(VOL, 0, DIGEST_BLOCKS)

    seen = [await first_region()]
    await regions.write(VOL, 0, 3, [[10, block(1)]])
    seen.append(await first_region())
    await regions.trim(VOL, 0, [10], 4)
    seen.append(await first_region())
    await regions.copy(VOL, 0, [[10, 4, 5, block(2)]])
    seen.append(await first_region())
    await regions.copy(VOL, 0, [[11, 0, 6, None]])
    seen.append(await first_region())
    assert len(set(seen)) == len(seen)
    assert seen[-1] == await expected_digest(regions, 0, DIGEST_BLOCKS)
    # The other region saw none of it.
    untouched = await regions.digests(VOL, DIGEST_BLOCKS, DIGEST_BLOCKS)
    assert untouched == hashlib.blake2b(bytes(8 * DIGEST_BLOCKS), digest_size=16).digest()


async def test_digest_of_last_region_follows_grow(regions):
    nblocks = 2 * DIGEST_BLOCKS + DIGEST_BLOCKS // 2
    before = await regions.digests(VOL, 2 * DIGEST_BLOCKS, nblocks - 2 * DIGEST_BLOCKS)
    await regions.grow(VOL, 0, 3 * DIGEST_BLOCKS)
    after = await regions.digests(VOL, 2 * DIGEST_BLOCKS, DIGEST_BLOCKS)
    assert after != before
    assert after == await expected_digest(regions, 2 * DIGEST_BLOCKS, DIGEST_BLOCKS)


async def test_equal_versions_give_equal_digests(tmp_path):
    stores = [ReplicaStore(tmp_path / name) for name in ("a", "b")]
    try:
        for replica in stores:
            await replica.create(VOL, 4 * DIGEST_BLOCKS)
            await replica.write(VOL, 0, 9, [[n * 700, block(n)] for n in range(5)])
        await stores[1].write(VOL, 0, 10, [[3 * DIGEST_BLOCKS + 1, block(99)]])
        digests = [split_digests(await s.digests(VOL, 0, 4 * DIGEST_BLOCKS)) for s in stores]
        assert digests[0][:3] == digests[1][:3]
        assert digests[0][3] != digests[1][3]
    finally:
        for replica in stores:
            await replica.aclose()


@pytest.mark.parametrize(
    ("first", "count", "message"),
    [
        (1, DIGEST_BLOCKS, "multiple of"),
        (0, DIGEST_BLOCKS + 1, "multiple of"),
        (0, 0, "block count"),
        (0, 3 * DIGEST_BLOCKS, "block count"),
        (3 * DIGEST_BLOCKS, 1, "first block"),
    ],
)
async def test_digests_range_is_checked(regions, first, count, message):
    with pytest.raises(errors.InvalidArgument, match=message):
        await regions.digests(VOL, first, count)
    assert MAX_DIGESTS_PER_CALL * DIGEST_SIZE < MAX_FRAME


async def test_digests_report_missing_data_file(regions):
    await regions.digests(VOL, 0, DIGEST_BLOCKS)
    data_path(regions).unlink()
    with pytest.raises(errors.Corrupted, match="missing"):
        await regions.digests(VOL, 0, DIGEST_BLOCKS)


async def test_flush_reports_checked_data_file(volume):
    await volume.write(VOL, 0, 1, [[0, block(0)]])
    assert await volume.flush(VOL) == {"data_file_checked": True}


async def test_writes_go_on_during_flush(volume, monkeypatch):
    released = threading.Event()
    syncing = threading.Event()
    synced: list[int] = []

    def slow_fdatasync(fd: int) -> None:
        syncing.set()
        released.wait(timeout=10)
        synced.append(fd)

    monkeypatch.setattr(os, "fdatasync", slow_fdatasync)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(volume.flush, VOL)
        await trio.to_thread.run_sync(syncing.wait, 10)
        with trio.fail_after(5):
            await volume.write(VOL, 0, 1, [[3, block(3)]])
        assert synced == []
        released.set()
    assert len(synced) == 2
    assert await volume.read(VOL, [3]) == [block(3)]
    # The flush closed the descriptors it synced.
    for fd in synced:
        with pytest.raises(OSError):
            os.fstat(fd)


async def test_cancelled_flush_closes_descriptors(volume, monkeypatch):
    entered = threading.Event()
    released = threading.Event()
    handed_out: list[int] = []
    flush_handles = Replica.flush_handles

    def slow_flush_handles(replica: Replica) -> tuple[int, int]:
        entered.set()
        released.wait(timeout=10)
        handles = flush_handles(replica)
        handed_out.extend(handles)
        return handles

    monkeypatch.setattr(Replica, "flush_handles", slow_flush_handles)
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(volume.flush, VOL)
            await trio.to_thread.run_sync(entered.wait, 10)
            # As when the peer's connection closes while the store takes the descriptors.
            scope.cancel()
            released.set()
    assert len(handed_out) == 2
    for fd in handed_out:
        with pytest.raises(OSError):
            os.fstat(fd)


@pytest.mark.parametrize("damage", ["delete", "truncate", "replace"])
async def test_flush_raises_for_damaged_data_file(volume, damage):
    await volume.write(VOL, 0, 1, [[0, block(0)]])
    path = data_path(volume)
    if damage == "delete":
        path.unlink()
    elif damage == "truncate":
        os.truncate(path, BLOCK_SIZE)
    else:
        path.rename(path.with_name("old-data"))
        path.write_bytes(bytes(1024 * BLOCK_SIZE))
    with pytest.raises(errors.Corrupted, match="data file"):
        await volume.flush(VOL)


async def test_read_versioned_in_any_order(volume):
    await volume.write(VOL, 0, 5, [[n, block(n)] for n in range(4)])
    await volume.trim(VOL, 0, [2], 6)
    consecutive = await volume.read_versioned(VOL, [0, 1, 2, 3])
    assert consecutive == [(5, block(0)), (5, block(1)), (6, None), (5, block(3))]
    shuffled = await volume.read_versioned(VOL, [3, 1, 2, 0, 1])
    assert shuffled == [(5, block(3)), (5, block(1)), (6, None), (5, block(0)), (5, block(1))]


async def test_pull_without_peers_not_supported(volume):
    with pytest.raises(errors.NotSupported, match="cannot connect to other nodes"):
        await volume.pull(VOL, 0, "node-b", [[0, 0]])


@pytest.mark.parametrize(
    ("source", "entries", "message"),
    [
        ("", [[0, 0]], "invalid source node"),
        ("b", [[0]], "invalid pull entry"),
        ("b", [[1024, 0]], "block number"),
        ("b", [[0, -1]], "expected version"),
        ("b", [[n, 0] for n in range(MAX_BLOCKS_PER_CALL + 1)], "too many blocks"),
    ],
)
async def test_bad_pull_rejected(tmp_path, source, entries, message):
    store = ReplicaStore(tmp_path / "replicas", peers=NoPeers())
    try:
        await store.create(VOL, 1024)
        with pytest.raises(errors.InvalidArgument, match=message):
            await store.pull(VOL, 0, source, entries)
    finally:
        await store.aclose()


async def test_pull_with_stale_epoch_reads_nothing(tmp_path):
    peers = NoPeers()
    store = ReplicaStore(tmp_path / "replicas", peers=peers)
    try:
        await store.create(VOL, 16)
        await store.open(VOL, 5)
        with pytest.raises(errors.StaleEpoch):
            await store.pull(VOL, 4, "b", [[0, 0]])
        assert peers.requested == []
    finally:
        await store.aclose()


class NoPeers:
    """A peer connector that reaches no node, and records the node ids it was asked for."""

    def __init__(self) -> None:
        self.requested: list[str] = []

    def connect(self, node_ids):
        self.requested += node_ids
        raise errors.Unavailable(f"nodes {node_ids} are unreachable")


async def test_pull_from_unreachable_node_unavailable(tmp_path):
    store = ReplicaStore(tmp_path / "replicas", peers=NoPeers())
    try:
        await store.create(VOL, 16)
        with pytest.raises(errors.Unavailable, match="unreachable"):
            await store.pull(VOL, 0, "b", [[0, 0]])
        assert await store.read(VOL, [0]) == [None]
    finally:
        await store.aclose()


def test_failed_meta_write_leaves_no_temporary(tmp_path, monkeypatch):
    def no_space(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(replicaformat, "pwrite_all", no_space)
    with pytest.raises(OSError):
        replicaformat.write_meta(tmp_path, VOL, 64, 3)
    assert list(tmp_path.iterdir()) == []
