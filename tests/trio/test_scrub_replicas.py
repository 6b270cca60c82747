"""store.checksums and the verify and scrub of pxfs/scrub.py over real stores and RPC."""

import struct

import pytest
import trio

from pxfs import errors
from pxfs.rpc import RpcClient
from pxfs.rpcserver import RpcServer
from pxfs.scrub import (
    BAD,
    UNWRITTEN,
    WRITTEN,
    BlockCopy,
    decode_checksums,
    differing_blocks,
    is_due,
    plan_repairs,
    rate_delay,
    scrub_replicas,
    scrub_step,
    verify_replicas,
    written_count,
)
from pxfs.store import BLOCK_SIZE, DATA_BAD, TRIMMED, ReplicaStore
from pxfs.storeargs import MAX_CHECKED_PER_CALL

SECRET = b"scrub-test-secret"
VOL = "4711"
NBLOCKS = 2048
EPOCH = 1
RECORD = struct.Struct("<QII")


def block(seed: int) -> bytes:
    """A block whose content depends on `seed`."""
    pattern = seed.to_bytes(4, "little") + b"scrubbed...."
    return pattern * (BLOCK_SIZE // len(pattern))


def flip_byte(store: ReplicaStore, blockno: int) -> None:
    with open(store.root / VOL / "data", "r+b") as f:
        f.seek(blockno * BLOCK_SIZE + 999)
        byte = f.read(1)
        f.seek(blockno * BLOCK_SIZE + 999)
        f.write(bytes([byte[0] ^ 0x55]))


def stored_block(store: ReplicaStore, blockno: int) -> bytes:
    with open(store.root / VOL / "data", "rb") as f:
        f.seek(blockno * BLOCK_SIZE)
        return f.read(BLOCK_SIZE)


@pytest.fixture
async def replicas(nursery, tmp_path):
    """Three stores with a replica of VOL each, served over unix sockets, by node name."""
    stores: dict[str, ReplicaStore] = {}
    clients: dict[str, RpcClient] = {}
    for name in ("a", "b", "c"):
        store = ReplicaStore(tmp_path / name)
        await store.create(VOL, NBLOCKS)
        server = RpcServer(store.handlers(), secret=SECRET, name=f"store {name}")
        path = str(tmp_path / f"{name}.sock")
        await nursery.start(server.serve_unix, path)
        stores[name] = store
        clients[name] = await RpcClient.connect_unix(path, SECRET)
    yield stores, clients
    for client in clients.values():
        await client.aclose()
    for store in stores.values():
        await store.aclose()


async def write_all(stores: dict[str, ReplicaStore], version: int, blocknos: list[int]) -> None:
    for store in stores.values():
        await store.write(VOL, EPOCH, version, [(n, block(n)) for n in blocknos])


# store.checksums


async def test_checksums_returns_table_records(replicas):
    stores, _ = replicas
    store = stores["a"]
    await store.write(VOL, EPOCH, 7, [(3, block(3))])
    await store.trim(VOL, EPOCH, [4], version=8)
    raw = await store.checksums(VOL, 2, 4)
    assert len(raw) == 4 * 16
    records = list(RECORD.iter_unpack(raw))
    assert records[0] == (0, 0, 0)
    assert records[1][0] == 7
    assert records[1][2] == 0
    assert records[2] == (8, 0, TRIMMED)
    assert raw == (store.root / VOL / "table").read_bytes()[2 * 16 : 6 * 16]


async def test_checksums_marks_bad_data_only_when_asked(replicas):
    stores, _ = replicas
    store = stores["a"]
    await store.write(VOL, EPOCH, 7, [(3, block(3)), (5, block(5))])
    flip_byte(store, 3)
    plain = list(RECORD.iter_unpack(await store.checksums(VOL, 0, 8)))
    checked = list(RECORD.iter_unpack(await store.checksums(VOL, 0, 8, True)))
    assert plain[3][2] == 0
    assert checked[3][2] == DATA_BAD
    assert checked[5][2] == 0
    assert checked[3][:2] == plain[3][:2]
    # The flag is part of the reply only.
    assert list(RECORD.iter_unpack(await store.checksums(VOL, 0, 8))) == plain


async def test_checksums_rejects_bad_arguments(replicas):
    stores, _ = replicas
    store = stores["a"]
    with pytest.raises(errors.InvalidArgument, match="block count"):
        await store.checksums(VOL, 0, MAX_CHECKED_PER_CALL + 1, True)
    with pytest.raises(errors.InvalidArgument, match="block count"):
        await store.checksums(VOL, NBLOCKS - 1, 2)
    with pytest.raises(errors.InvalidArgument, match="first block"):
        await store.checksums(VOL, NBLOCKS, 1)
    with pytest.raises(errors.InvalidArgument, match="check_data"):
        await store.checksums(VOL, 0, 1, 1)
    with pytest.raises(errors.NotFound):
        await store.checksums("999", 0, 1)


# Pure parts


def test_decode_checksums_states():
    raw = RECORD.pack(0, 0, 0) + RECORD.pack(9, 5, TRIMMED) + RECORD.pack(3, 77, 0)
    raw += RECORD.pack(4, 88, DATA_BAD)
    assert decode_checksums(raw) == [
        BlockCopy(0, 0, UNWRITTEN),
        BlockCopy(9, 0, UNWRITTEN),
        BlockCopy(3, 77, WRITTEN),
        BlockCopy(4, 88, BAD),
    ]
    with pytest.raises(errors.InvalidArgument):
        decode_checksums(raw[:-1])


def test_written_count_matches_decode():
    raw = RECORD.pack(0, 0, 0) + RECORD.pack(9, 0, TRIMMED) + RECORD.pack(3, 77, 0)
    raw += RECORD.pack(4, 0, 0) + RECORD.pack(0, 0, 0)
    assert written_count(raw) == 2
    assert written_count(raw) == sum(copy.state != UNWRITTEN for copy in decode_checksums(raw))
    assert written_count(b"") == 0


def test_differing_blocks_cases():
    unwritten, trimmed = BlockCopy(0, 0, UNWRITTEN), BlockCopy(6, 0, UNWRITTEN)
    written, other = BlockCopy(3, 77, WRITTEN), BlockCopy(4, 78, WRITTEN)
    bad = BlockCopy(3, 77, BAD)
    copies = {
        "a": [unwritten, written, written, written, written],
        "b": [trimmed, written, other, bad, unwritten],
    }
    assert differing_blocks(100, copies) == [102, 103, 104]


def test_plan_repairs_outcomes():
    good, bad = BlockCopy(3, 77, WRITTEN), BlockCopy(3, 77, BAD)
    newer = BlockCopy(5, 90, WRITTEN)
    copies = {
        "a": [bad, bad, bad, good],
        "b": [good, newer, bad, bad],
        "c": [good, good, bad, good],
    }
    plans = plan_repairs(10, copies, write_set=["a", "b"])
    outcomes = [(plan.blockno, plan.target, plan.source, plan.outcome) for plan in plans]
    assert outcomes == [
        (10, "a", "b", "repair"),
        # c has a good copy at the same version, but it is not in the write set.
        (11, "a", None, "skip"),
        (12, "a", None, "lost"),
        (12, "b", None, "lost"),
        (12, "c", None, "lost"),
        (13, "b", "a", "repair"),
    ]


def test_is_due_cases():
    day = 86400 * 10**9
    record = {"id": "1", "replica_nodes": ["a", "b"], "ctime_ns": day}
    assert is_due(record, "a", {"a", "b"}, 86400, 2 * day) is True
    assert is_due(record, "a", {"a", "b"}, 86400, 2 * day - 1) is False
    # Only the first online replica node scrubs.
    assert is_due(record, "b", {"a", "b"}, 86400, 2 * day) is False
    assert is_due(record, "b", {"b"}, 86400, 2 * day) is True
    assert is_due(record, "c", {"a", "b", "c"}, 86400, 2 * day) is False
    scrubbed = {**record, "scrub": {"last_ns": 3 * day}}
    assert is_due(scrubbed, "a", {"a"}, 86400, 3 * day + day // 2) is False
    assert is_due(scrubbed, "a", {"a"}, 86400, 4 * day) is True
    assert is_due({**record, "deleting": True}, "a", {"a"}, 86400, 9 * day) is False


def test_scrub_step_follows_rate():
    assert scrub_step(None, 3) == MAX_CHECKED_PER_CALL
    # 4 MiB/s over 3 replicas is 21 blocks of 64 KiB per replica and second.
    assert scrub_step(4 << 20, 3) == 21
    assert scrub_step(64 << 10, 2) == 16
    assert scrub_step(1 << 40, 1) == MAX_CHECKED_PER_CALL


def test_rate_delay():
    assert rate_delay(4 << 20, None, 0.0) == 0.0
    assert rate_delay(4 << 20, 4 << 20, 0.25) == pytest.approx(0.75)
    assert rate_delay(4 << 20, 4 << 20, 2.0) == 0.0


# verify_replicas


async def test_verify_identical_replicas(replicas):
    stores, clients = replicas
    await write_all(stores, 5, [0, 1, 1500])
    result = await verify_replicas(VOL, clients, check_data=True, recheck=False)
    assert result["identical"] is True
    assert result["allocated_blocks"] == 3
    assert result["differing_blocks"] == 0
    assert result["blocks"] == NBLOCKS


async def test_verify_reports_rot_and_missed_write(replicas):
    stores, clients = replicas
    await write_all(stores, 5, [0, 1, 1500])
    flip_byte(stores["b"], 1500)
    await stores["c"].write(VOL, EPOCH, 6, [(1, block(100))])
    # The table alone shows the missed write but not the rot.
    plain = await verify_replicas(VOL, clients, check_data=False, recheck=False)
    assert plain["differing_blocks"] == 1
    assert plain["differences"][0]["block"] == 1
    checked = await verify_replicas(VOL, clients, check_data=True, recheck=False)
    assert checked["identical"] is False
    assert [entry["block"] for entry in checked["differences"]] == [1, 1500]
    assert "fails its checksum" in checked["differences"][1]["copies"]["b"]
    assert "fails" not in checked["differences"][1]["copies"]["a"]


async def test_verify_reports_size_mismatch(replicas):
    stores, clients = replicas
    await stores["c"].resize(VOL, NBLOCKS + 16)
    result = await verify_replicas(VOL, clients, check_data=False, recheck=False)
    assert result["identical"] is False
    assert result["blocks"] == NBLOCKS
    assert "different sizes" in result["problems"][0]


async def test_verify_names_failing_replica(replicas):
    stores, clients = replicas
    await stores["b"].delete(VOL)
    with pytest.raises(errors.NotFound, match="store.info on replica node b failed"):
        await verify_replicas(VOL, clients, check_data=False, recheck=False)


# scrub_replicas


async def test_scrub_repairs_rotten_copy(replicas, caplog):
    stores, clients = replicas
    await write_all(stores, 5, [0, 1025, 2047])
    flip_byte(stores["b"], 1025)
    result = await scrub_replicas(VOL, EPOCH, clients, ["a", "b", "c"])
    assert [(block_no, node) for block_no, node in result.repaired] == [(1025, "b")]
    assert result.lost == []
    assert result.checked_blocks == 9
    assert stored_block(stores["b"], 1025) == block(1025)
    assert await stores["b"].verify(VOL) == []
    messages = [record.getMessage() for record in caplog.records]
    assert any("scrub repaired block 1025 (version 5) on replica b" in m for m in messages)


async def test_scrub_reports_lost_block(replicas):
    stores, clients = replicas
    await write_all(stores, 5, [7])
    for store in stores.values():
        flip_byte(store, 7)
    before = {name: stored_block(store, 7) for name, store in stores.items()}
    result = await scrub_replicas(VOL, EPOCH, clients, ["a", "b", "c"])
    assert result.repaired == []
    assert sorted(result.lost) == [(7, "a"), (7, "b"), (7, "c")]
    assert result.lost_blocks == 1
    assert result.to_map()["lost_blocks"] == 1
    for name, store in stores.items():
        assert stored_block(store, 7) == before[name], name


async def test_scrub_skips_copy_a_newer_write_replaced(replicas):
    stores, clients = replicas
    await write_all(stores, 5, [7])
    flip_byte(stores["c"], 7)
    # a and b took a newer write that c missed: resync, not scrub, brings c up to date.
    for name in ("a", "b"):
        await stores[name].write(VOL, EPOCH, 6, [(7, block(70))])
    result = await scrub_replicas(VOL, EPOCH, clients, ["a", "b"])
    assert result.repaired == []
    assert result.lost == []
    assert result.skipped_blocks == 1
    assert await stores["c"].verify(VOL) == [7]


async def test_scrub_rate_bounds_duration(replicas):
    stores, clients = replicas
    await write_all(stores, 5, list(range(8)))
    # 24 blocks of 64 KiB are 1.5 MiB, which at 3 MiB/s take half a second.
    started = trio.current_time()
    await scrub_replicas(VOL, EPOCH, clients, ["a", "b", "c"], rate_bytes=3 << 20)
    assert trio.current_time() - started >= 0.45


async def test_scrub_takes_new_epoch_after_attach(replicas):
    stores, clients = replicas
    await write_all(stores, 5, [7])
    flip_byte(stores["b"], 7)
    # An attach since the scrub started raised the epoch of the replicas.
    for store in stores.values():
        await store.open(VOL, EPOCH + 1)
    with pytest.raises(errors.StaleEpoch):
        await scrub_replicas(VOL, EPOCH, clients, ["a", "b", "c"])

    async def current_epoch() -> int:
        return EPOCH + 1

    result = await scrub_replicas(VOL, EPOCH, clients, ["a", "b", "c"], refresh_epoch=current_epoch)
    assert result.repaired == [(7, "b")]
    assert stored_block(stores["b"], 7) == block(7)


async def test_verify_raises_replica_error_not_group(replicas):
    stores, clients = replicas
    await write_all(stores, 5, [7])
    # The data file is gone on two replicas: store.checksums raises Corrupted on both.
    for name in ("b", "c"):
        (stores[name].root / VOL / "data").unlink()
    with pytest.raises(errors.Corrupted, match="store.checksums on replica node [bc] failed"):
        await verify_replicas(VOL, clients, check_data=False, recheck=False)
