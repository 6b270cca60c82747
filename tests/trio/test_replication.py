import collections
import errno
import functools
import struct
import zlib

import pytest
import trio
import trio.testing

from pxfs import errors
from pxfs.replication import BLOCKS_PER_FRAME, ZERO_BLOCK, ReplicationClient
from pxfs.rpc import RpcClient
from pxfs.rpcserver import RpcServer
from pxfs.store import BLOCK_SIZE, RECORD_SIZE, ReplicaStore
from pxfs.volume.device import BlockChange

SECRET = b"replication-test-secret"
VOL = "7340029183746"
NBLOCKS = 1024


def block(seed: int) -> bytes:
    """A block whose content depends on `seed`."""
    pattern = seed.to_bytes(4, "little") + b"replica!"
    return pattern * (BLOCK_SIZE // len(pattern)) + bytes(BLOCK_SIZE % len(pattern))


class Node:
    """A replica store served over a unix socket, counting the calls of each method."""

    def __init__(self, root, socket_path) -> None:
        self.store = ReplicaStore(root)
        self.socket_path = socket_path
        self.calls: collections.Counter[str] = collections.Counter()
        self.active_writes = 0
        self.peak_writes = 0
        self.write_gate: trio.Event | None = None
        self.scope = trio.CancelScope()
        handlers = self.store.handlers()
        self.server = RpcServer(
            {name: self._counting(name, handler) for name, handler in handlers.items()},
            secret=SECRET,
            name=f"store {root.name}",
        )

    def _counting(self, name, handler):
        @functools.wraps(handler)
        async def counted(*args):
            self.calls[name] += 1
            if name != "store.write":
                return await handler(*args)
            self.active_writes += 1
            self.peak_writes = max(self.peak_writes, self.active_writes)
            try:
                if self.write_gate is not None:
                    await self.write_gate.wait()
                return await handler(*args)
            finally:
                self.active_writes -= 1

        return counted

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with self.scope:
            await self.server.serve_unix(self.socket_path, task_status=task_status)

    def data_path(self):
        return self.store.root / VOL / "data"

    def flip_byte(self, blockno: int) -> None:
        with open(self.data_path(), "r+b") as f:
            f.seek(blockno * BLOCK_SIZE + 1234)
            byte = f.read(1)
            f.seek(blockno * BLOCK_SIZE + 1234)
            f.write(bytes([byte[0] ^ 0xFF]))


class Cluster:
    """Replica nodes and the client connections a test opened to them."""

    def __init__(self, nursery, root) -> None:
        self.nursery = nursery
        self.root = root
        self.nodes: list[Node] = []
        self.clients: list[RpcClient] = []

    async def start_node(self, name: str, root=None) -> Node:
        root = root or self.root
        node = Node(root / name, root / f"{name}.sock")
        await self.nursery.start(node.serve)
        self.nodes.append(node)
        return node

    async def connect(self, node: Node, create: bool = True) -> RpcClient:
        client = await RpcClient.connect_unix(node.socket_path, SECRET)
        self.clients.append(client)
        if create:
            await client.call("store.create", VOL, NBLOCKS)
        return client

    async def device(self, nodes, epoch: int = 1, write_quorum: int = 1) -> ReplicationClient:
        clients = [await self.connect(node) for node in nodes]
        device = ReplicationClient(VOL, epoch, NBLOCKS, clients, write_quorum)
        await device.open()
        return device

    async def close(self) -> None:
        for client in self.clients:
            await client.aclose()
        for node in self.nodes:
            node.scope.cancel()
            await node.store.aclose()


@pytest.fixture
async def cluster(nursery, tmp_path):
    cluster = Cluster(nursery, tmp_path)
    yield cluster
    await cluster.close()


@pytest.fixture
async def nodes(cluster):
    return [await cluster.start_node(name) for name in ("a", "b")]


def table_version(node: Node, blockno: int) -> int:
    with open(node.store.root / VOL / "table", "rb") as f:
        f.seek(blockno * RECORD_SIZE)
        return struct.unpack("<Q", f.read(8))[0]


async def test_write_read_round_trip(cluster, nodes):
    device = await cluster.device(nodes)
    await device.write_blocks([(3, block(3)), (4, block(4))])
    assert await device.read_blocks([4, 3, 5]) == [block(4), block(3), ZERO_BLOCK]
    for node in nodes:
        assert await node.store.read(VOL, [3, 4]) == [block(3), block(4)]


def _patched(data: bytes, start: int, piece: bytes) -> bytes:
    return data[:start] + piece + data[start + len(piece) :]


async def test_changed_blocks_sent_as_patches(cluster, nodes):
    device = await cluster.device(nodes)
    await device.write_blocks([(3, block(3)), (4, block(4))])
    new3 = _patched(block(3), 4096, b"\xaa" * 4096)
    change = BlockChange(4096, 8192, zlib.crc32(block(3)), zlib.crc32(new3))
    await device.write_blocks([(3, new3), (4, block(44))], {3: change})
    for node in nodes:
        assert node.calls["store.patch"] == 1
        # Block 4 had no change: the first write and this one, nothing for block 3.
        assert node.calls["store.write"] == 2
        assert await node.store.read(VOL, [3, 4]) == [new3, block(44)]
    assert table_version(nodes[0], 3) == table_version(nodes[1], 3)


async def test_replica_without_base_gets_whole_block(cluster, nodes):
    device = await cluster.device(nodes)
    await device.write_blocks([(3, block(3))])
    # Node b has another copy of block 3, as a replica that missed writes would.
    version = table_version(nodes[0], 3)
    await nodes[1].store.write(VOL, device.epoch, version, [(3, block(30))])
    new3 = _patched(block(3), 0, b"\xbb" * 100)
    await device.write_blocks(
        [(3, new3)], {3: BlockChange(0, 100, zlib.crc32(block(3)), zlib.crc32(new3))}
    )
    assert [node.calls["store.patch"] for node in nodes] == [1, 1]
    assert [node.calls["store.write"] for node in nodes] == [1, 2]
    for node in nodes:
        assert await node.store.read(VOL, [3]) == [new3]
    assert device.write_set == [str(node.socket_path) for node in nodes]


async def test_replica_without_patch_method_gets_whole_blocks(cluster, nodes):
    rejected = []

    async def unknown_method(*args):
        rejected.append(args)
        raise errors.NotSupported("unknown method 'store.patch'")

    # A pxd from before store.patch rejects it as an unknown method.
    nodes[1].server.handlers["store.patch"] = unknown_method
    device = await cluster.device(nodes)
    await device.write_blocks([(3, block(3))])
    for round_ in range(2):
        old = await device.read_blocks([3])
        new = _patched(old[0], 10, bytes([round_]) * 10)
        await device.write_blocks(
            [(3, new)], {3: BlockChange(10, 20, zlib.crc32(old[0]), zlib.crc32(new))}
        )
        for node in nodes:
            assert await node.store.read(VOL, [3]) == [new]
    # The second round skipped the patch call to node b.
    assert nodes[0].calls["store.patch"] == 2
    assert len(rejected) == 1
    assert [node.calls["store.write"] for node in nodes] == [1, 3]
    assert device.write_set == [str(node.socket_path) for node in nodes]


async def test_trim_reads_zeros_everywhere(cluster, nodes):
    device = await cluster.device(nodes)
    await device.write_blocks([(n, block(n)) for n in range(8)])
    await device.trim_blocks([2, 3])
    assert await device.read_blocks([1, 2, 3, 4]) == [block(1), ZERO_BLOCK, ZERO_BLOCK, block(4)]
    for node in nodes:
        info = await node.store.info(VOL)
        assert info["used_blocks"] == 6


async def test_flush_reaches_every_replica(cluster, nodes):
    device = await cluster.device(nodes)
    await device.write_blocks([(0, block(0))])
    await device.flush()
    assert [node.calls["store.flush"] for node in nodes] == [1, 1]
    # The store's flush reply says that it checked the data file, so no versions call follows.
    assert [node.calls["store.versions"] for node in nodes] == [0, 0]


async def test_flush_checks_data_file_of_older_store(cluster, nodes):
    flush = nodes[1].server.handlers["store.flush"]

    async def flush_without_reply(*args):
        await flush(*args)

    # A store from before the flush reply: it returns None and checks nothing.
    nodes[1].server.handlers["store.flush"] = flush_without_reply
    device = await cluster.device(nodes, write_quorum=1)
    await device.write_blocks([(0, block(0))])
    await device.flush()
    assert [node.calls["store.versions"] for node in nodes] == [0, 1]
    nodes[1].data_path().unlink()
    await device.write_blocks([(1, block(1))])
    await device.flush()
    assert device.write_set == [str(nodes[0].socket_path)]


async def test_flush_drops_replica_whose_data_file_is_gone(cluster, nodes):
    device = await cluster.device(nodes, write_quorum=1)
    await device.write_blocks([(0, block(0))])
    nodes[1].data_path().unlink()
    await device.flush()
    assert device.write_set == [str(nodes[0].socket_path)]
    assert [node.calls["store.versions"] for node in nodes] == [0, 0]


async def test_unreachable_replica_dropped_when_idle(cluster, nodes):
    device = await cluster.device(nodes, write_quorum=1)
    first, second = (str(node.socket_path) for node in nodes)
    await cluster.clients[1].aclose()
    assert device.disconnected == [second]
    assert await device.drop_unreachable(second, errors.Unavailable("connection refused"))
    assert device.write_set == [first]
    assert device.out_of_sync == [second]
    assert device.runtime_state()["RuntimeState"] == "degraded"


async def test_probe_finds_lost_connection(cluster, nodes):
    device = await cluster.device(nodes, write_quorum=1)
    second = str(nodes[1].socket_path)
    await device.probe_write_set()
    assert device.disconnected == []
    # The server goes away while the client waits on nothing, as a killed pxd would.
    nodes[1].scope.cancel()
    await trio.sleep(0.1)
    await device.probe_write_set()
    assert device.disconnected == [second]


async def test_probe_closes_hung_connection(cluster, nodes):
    device = await cluster.device(nodes, write_quorum=1)
    second = str(nodes[1].socket_path)

    async def hang(*args):
        await trio.sleep_forever()

    # A replica that accepts calls and never replies, as a stopped pxd would.
    nodes[1].server.handlers["store.info"] = hang
    await device.probe_write_set()
    assert device.disconnected == [second]


async def test_stale_report_stops_client(cluster, nodes):
    clients = [await cluster.connect(node) for node in nodes]

    async def report(write_set, out_of_sync):
        raise errors.StaleEpoch("volume is at epoch 2, not 1; a newer attach owns its write set")

    device = ReplicationClient(VOL, 1, NBLOCKS, clients, 1, on_write_set_change=report)
    await device.open()
    await clients[1].aclose()
    with pytest.raises(errors.StaleEpoch):
        await device.drop_unreachable(str(nodes[1].socket_path), errors.Unavailable("gone"))
    with pytest.raises(errors.StaleEpoch):
        await device.write_blocks([(0, block(0))])


async def test_unreachable_replica_kept_for_quorum(cluster, nodes):
    device = await cluster.device(nodes, write_quorum=2)
    first, second = (str(node.socket_path) for node in nodes)
    await cluster.clients[1].aclose()
    assert not await device.drop_unreachable(second, errors.Unavailable("connection refused"))
    assert device.write_set == [first, second]
    assert device.out_of_sync == []


async def test_open_raises_epoch_on_replicas(cluster, nodes):
    await cluster.device(nodes, epoch=6)
    for node in nodes:
        assert (await node.store.info(VOL))["epoch"] == 6


async def test_one_mib_write_is_one_rpc(cluster, nodes):
    device = await cluster.device(nodes)
    blocks = [(n, block(n)) for n in range(16)]
    await device.write_blocks(blocks)
    assert [node.calls["store.write"] for node in nodes] == [1, 1]
    assert await device.read_blocks(list(range(16))) == [data for _, data in blocks]
    assert nodes[0].calls["store.read_versioned"] == 1
    assert nodes[1].calls["store.read_versioned"] == 0


async def test_large_write_split_into_frames(cluster, nodes):
    device = await cluster.device(nodes)
    count = 4 * BLOCKS_PER_FRAME + 10
    await device.write_blocks([(n, block(n)) for n in range(count)])
    assert [node.calls["store.write"] for node in nodes] == [5, 5]
    assert await device.read_blocks(list(range(count))) == [block(n) for n in range(count)]
    assert nodes[0].calls["store.read_versioned"] == 5


async def test_frames_in_flight_capped_at_four(cluster, nodes):
    device = await cluster.device(nodes[:1])
    node = nodes[0]
    node.write_gate = trio.Event()
    count = 6 * BLOCKS_PER_FRAME

    async def open_gate_once_all_wait() -> None:
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        node.write_gate.set()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(open_gate_once_all_wait)
            await device.write_blocks([(n, block(n)) for n in range(count)])
    assert node.peak_writes == 4
    assert node.calls["store.write"] == 6


async def test_versions_carry_epoch_and_counter(cluster, nodes):
    device = await cluster.device(nodes, epoch=3)
    await device.write_blocks([(10, block(1))])
    await device.write_blocks([(11, block(2))])
    await device.flush()
    for node in nodes:
        assert table_version(node, 10) == (3 << 32) | 1
        assert table_version(node, 11) == (3 << 32) | 2


async def test_corrupt_copy_read_from_other_replica(cluster, nodes):
    device = await cluster.device(nodes)
    await device.write_blocks([(7, block(7)), (8, block(8))])
    nodes[0].flip_byte(8)
    assert await device.read_blocks([7, 8]) == [block(7), block(8)]
    assert nodes[1].calls["store.read_versioned"] == 1


async def test_both_copies_corrupt_raises(cluster, nodes):
    device = await cluster.device(nodes)
    await device.write_blocks([(8, block(8))])
    for node in nodes:
        node.flip_byte(8)
    with pytest.raises(errors.ChecksumMismatch, match="no good copy left"):
        await device.read_blocks([8])


async def test_read_falls_back_when_replica_down(cluster, nodes):
    device = await cluster.device(nodes)
    await device.write_blocks([(1, block(1))])
    nodes[0].scope.cancel()
    assert await device.read_blocks([1]) == [block(1)]


async def test_write_with_replica_down_degrades(cluster, nodes):
    device = await cluster.device(nodes, write_quorum=1)
    nodes[0].scope.cancel()
    await device.write_blocks([(2, block(2))])
    remaining = [client.description for client in device.in_sync_replicas]
    assert remaining == [str(nodes[1].socket_path)]
    assert await device.read_blocks([2]) == [block(2)]
    assert nodes[1].calls["store.read_versioned"] == 1


async def test_write_below_quorum_raises(cluster, nodes):
    device = await cluster.device(nodes, write_quorum=2)
    nodes[1].scope.cancel()
    with pytest.raises(errors.Unavailable, match="reached 1 replicas, 2 needed"):
        await device.write_blocks([(2, block(2))])
    with pytest.raises(errors.Unavailable, match="reached 1 replicas, 2 needed"):
        await device.flush()


async def test_all_replicas_down_raises_unavailable(cluster, nodes):
    device = await cluster.device(nodes)
    for node in nodes:
        node.scope.cancel()
    with pytest.raises(errors.Unavailable):
        await device.write_blocks([(0, block(0))])
    with pytest.raises(errors.Unavailable, match="reached fewer replicas than the write quorum"):
        await device.read_blocks([0])
    assert len(device.in_sync_replicas) == 2


async def test_stale_epoch_after_newer_open(cluster, nodes):
    old = await cluster.device(nodes, epoch=1)
    clients = [await cluster.connect(node, create=False) for node in nodes]
    new = ReplicationClient(VOL, 2, NBLOCKS, clients)
    await new.open()
    with pytest.raises(errors.StaleEpoch):
        await old.write_blocks([(0, block(0))])
    with pytest.raises(errors.StaleEpoch):
        await old.trim_blocks([0])
    with pytest.raises(errors.StaleEpoch):
        await old.open()
    await new.write_blocks([(0, block(5))])
    assert await new.read_blocks([0]) == [block(5)]


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        ([(NBLOCKS, block(0))], "outside 0 to 1023"),
        ([(-1, block(0))], "outside"),
        ([("1", block(0))], "invalid block number"),
        ([(0, b"tiny")], "4 bytes, expected 65536"),
        ([(0, "text")], "not bytes"),
    ],
)
async def test_bad_write_rejected_before_rpc(cluster, nodes, blocks, message):
    device = await cluster.device(nodes)
    with pytest.raises(errors.InvalidArgument, match=message):
        await device.write_blocks(blocks)
    assert nodes[0].calls["store.write"] == 0


async def test_bad_read_rejected_before_rpc(cluster, nodes):
    device = await cluster.device(nodes)
    with pytest.raises(errors.InvalidArgument, match="outside"):
        await device.read_blocks([0, NBLOCKS])
    assert nodes[0].calls["store.read_versioned"] == 0


def test_constructor_rejects_no_replicas():
    with pytest.raises(errors.InvalidArgument, match="needs a replica"):
        ReplicationClient(VOL, 1, NBLOCKS, [])


async def test_quorum_above_replica_count_rejected(cluster, nodes):
    client = await cluster.connect(nodes[0])
    with pytest.raises(errors.InvalidArgument, match="write quorum 2"):
        ReplicationClient(VOL, 1, NBLOCKS, [client], write_quorum=2)


async def test_empty_calls_send_nothing(cluster, nodes):
    device = await cluster.device(nodes)
    assert await device.read_blocks([]) == []
    await device.write_blocks([])
    await device.trim_blocks([])
    assert nodes[0].calls["store.read_versioned"] == 0
    assert nodes[0].calls["store.write"] == 0
    assert nodes[0].calls["store.trim"] == 0


async def test_full_single_replica_raises_no_space_and_recovers(tiny_fs, cluster):
    node = await cluster.start_node("full", root=tiny_fs)
    device = await cluster.device([node])
    with pytest.raises(errors.NoSpace, match="no space left"):
        await device.write_blocks([(n, block(n)) for n in range(32)])
    assert len(device.in_sync_replicas) == 1
    used = (await node.store.info(VOL))["used_blocks"]
    assert 0 < used < 32
    await device.trim_blocks(list(range(used)))
    await device.write_blocks([(n, block(n + 100)) for n in range(4)])
    assert await device.read_blocks(list(range(4))) == [block(n + 100) for n in range(4)]


async def test_grow_reaches_every_replica(cluster, nodes):
    device = await cluster.device(nodes)
    await device.write_blocks([(NBLOCKS - 1, block(1))])
    await device.grow(2 * NBLOCKS)
    assert device.nblocks == 2 * NBLOCKS
    for node in nodes:
        assert (await node.store.info(VOL))["nblocks"] == 2 * NBLOCKS
    await device.write_blocks([(2 * NBLOCKS - 1, block(2))])
    read = await device.read_blocks([NBLOCKS - 1, NBLOCKS, 2 * NBLOCKS - 1])
    assert read == [block(1), ZERO_BLOCK, block(2)]


async def test_grow_same_size_sends_nothing(cluster, nodes):
    device = await cluster.device(nodes)
    await device.grow(NBLOCKS)
    assert nodes[0].calls["store.grow"] == 0


async def test_grow_rejects_shrink_before_rpc(cluster, nodes):
    device = await cluster.device(nodes)
    with pytest.raises(errors.InvalidArgument, match="cannot shrink the device"):
        await device.grow(NBLOCKS - 1)
    assert device.nblocks == NBLOCKS
    assert nodes[0].calls["store.grow"] == 0


async def test_grow_with_stale_epoch_raises(cluster, nodes):
    old = await cluster.device(nodes, epoch=1)
    clients = [await cluster.connect(node, create=False) for node in nodes]
    await ReplicationClient(VOL, 2, NBLOCKS, clients).open()
    with pytest.raises(errors.StaleEpoch):
        await old.grow(2 * NBLOCKS)
    assert old.nblocks == NBLOCKS
    for node in nodes:
        assert (await node.store.info(VOL))["nblocks"] == NBLOCKS


async def test_grow_with_replica_down_degrades(cluster, nodes):
    device = await cluster.device(nodes)
    nodes[1].scope.cancel()
    await device.grow(2 * NBLOCKS)
    assert device.nblocks == 2 * NBLOCKS
    assert device.in_sync_replicas == [cluster.clients[0]]
    assert (await nodes[0].store.info(VOL))["nblocks"] == 2 * NBLOCKS


async def test_grow_without_space_keeps_old_size(tiny_fs, cluster):
    node = await cluster.start_node("full", root=tiny_fs)
    device = await cluster.device([node])
    # A block table of 2**20 blocks takes 16 MiB, more than the 1 MiB disk holds.
    with pytest.raises(errors.NoSpace, match="grow the block table"):
        await device.grow(2**20)
    assert device.nblocks == NBLOCKS
    assert len(device.in_sync_replicas) == 1
    await device.write_blocks([(NBLOCKS - 1, block(3))])


async def test_grow_skips_replica_already_larger(cluster, nodes):
    device = await cluster.device(nodes)
    # As a grow whose superblock never became durable leaves it: one replica already larger.
    await nodes[0].store.grow(VOL, 1, 4 * NBLOCKS)
    await device.grow(2 * NBLOCKS)
    assert device.nblocks == 2 * NBLOCKS
    assert len(device.in_sync_replicas) == 2
    assert nodes[0].calls["store.grow"] == 0
    assert nodes[1].calls["store.grow"] == 1
    assert (await nodes[0].store.info(VOL))["nblocks"] == 4 * NBLOCKS
    assert (await nodes[1].store.info(VOL))["nblocks"] == 2 * NBLOCKS
    await device.write_blocks([(2 * NBLOCKS - 1, block(4))])
    assert await device.read_blocks([2 * NBLOCKS - 1]) == [block(4)]


async def test_bit_rot_repaired_on_read(cluster, nodes, caplog):
    device = await cluster.device(nodes)
    await device.write_blocks([(8, block(8)), (9, block(9))])
    version = table_version(nodes[0], 8)
    nodes[0].flip_byte(8)
    assert await nodes[0].store.verify(VOL) == [8]
    assert await device.read_blocks([8, 9]) == [block(8), block(9)]
    assert await nodes[0].store.verify(VOL) == []
    assert await nodes[0].store.read(VOL, [8]) == [block(8)]
    assert table_version(nodes[0], 8) == version
    assert device.repaired_blocks == 1
    assert device.runtime_state()["RepairedBlocks"] == "1"
    repairs = [record for record in caplog.records if "repaired block" in record.getMessage()]
    assert len(repairs) == 1
    assert f"repaired block 8 (version {version:x}) on replica" in repairs[0].getMessage()
    assert repairs[0].levelname == "WARNING"
    assert await device.read_blocks([8]) == [block(8)]
    assert nodes[1].calls["store.read_versioned"] == 1


async def test_two_bad_copies_repaired_from_third(cluster):
    nodes = [await cluster.start_node(name) for name in ("a", "b", "c")]
    device = await cluster.device(nodes)
    await device.write_blocks([(n, block(n)) for n in range(4)])
    nodes[0].flip_byte(2)
    nodes[1].flip_byte(2)
    # Block 3 is read from the first replica only, so its bad copy on the second stays bad.
    nodes[1].flip_byte(3)
    assert await device.read_blocks(list(range(4))) == [block(n) for n in range(4)]
    assert device.repaired_blocks == 2
    assert await nodes[0].store.verify(VOL) == []
    assert await nodes[1].store.verify(VOL) == [3]
    assert nodes[2].calls["store.read_versioned"] == 1


async def test_all_copies_rotten_raise_eio(cluster, nodes):
    device = await cluster.device(nodes)
    await device.write_blocks([(8, block(8)), (9, block(9))])
    for node in nodes:
        node.flip_byte(9)
    with pytest.raises(errors.ChecksumMismatch, match="no good copy left of blocks 9") as caught:
        await device.read_blocks([8, 9])
    assert caught.value.errno == errno.EIO
    assert device.repaired_blocks == 0
    for node in nodes:
        assert await node.store.verify(VOL) == [9]


@pytest.mark.parametrize("reply", [[99], "3", [3.0], None])
async def test_malformed_patch_reply_drops_replica(cluster, nodes, reply):
    async def bad_reply(*args):
        return reply

    nodes[1].server.handlers["store.patch"] = bad_reply
    device = await cluster.device(nodes)
    await device.write_blocks([(3, block(3))])
    new3 = _patched(block(3), 0, b"\xcc" * 100)
    await device.write_blocks(
        [(3, new3)], {3: BlockChange(0, 100, zlib.crc32(block(3)), zlib.crc32(new3))}
    )
    # A malformed reply is a ProtocolError of node b, which leaves the write set.
    assert device.write_set == [str(nodes[0].socket_path)]
    assert await nodes[0].store.read(VOL, [3]) == [new3]
    assert await device.read_blocks([3]) == [new3]
