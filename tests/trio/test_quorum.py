"""Write quorum, the write set and its reports, against real stores behind real RPC servers."""

import collections
import errno
import functools
import struct

import pytest
import trio
import trio.testing

from pxfs import errors
from pxfs.replication import ReplicationClient
from pxfs.rpc import RpcClient
from pxfs.rpcserver import RpcServer
from pxfs.store import BLOCK_SIZE, RECORD_SIZE, ReplicaStore

SECRET = b"quorum-test-secret"
VOL = "5551234567890"
NBLOCKS = 1024


def block(seed: int) -> bytes:
    """A block whose content depends on `seed`."""
    pattern = seed.to_bytes(4, "little") + b"quorum!!"
    return pattern * (BLOCK_SIZE // len(pattern)) + bytes(BLOCK_SIZE % len(pattern))


class Replica:
    """A replica store behind an RPC server that a test can stop, restart or hold up.

    A method named in `gates` waits for its event before it runs, so a gate that is never set
    makes a replica that accepts calls and never replies.
    """

    def __init__(self, nursery: trio.Nursery, root, name: str) -> None:
        self.nursery = nursery
        self.name = name
        self.store = ReplicaStore(root / name)
        self.socket_path = root / f"{name}.sock"
        self.calls: collections.Counter[str] = collections.Counter()
        self.gates: dict[str, trio.Event] = {}
        self.scope = trio.CancelScope()
        self.server = RpcServer(
            {key: self._wrap(key, handler) for key, handler in self.store.handlers().items()},
            secret=SECRET,
            name=f"store {name}",
        )

    def _wrap(self, method, handler):
        @functools.wraps(handler)
        async def wrapped(*args):
            self.calls[method] += 1
            gate = self.gates.get(method)
            if gate is not None:
                await gate.wait()
            return await handler(*args)

        return wrapped

    async def start(self) -> None:
        self.scope = trio.CancelScope()
        await self.nursery.start(self._serve)

    async def _serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with self.scope:
            await self.server.serve_unix(self.socket_path, task_status=task_status)

    def stop(self) -> None:
        """Stop the server and drop its connections, as when the node goes away."""
        self.scope.cancel()

    async def connect(self) -> RpcClient:
        return await RpcClient.connect_unix(self.socket_path, SECRET)

    def version(self, blockno: int) -> int:
        with open(self.store.root / VOL / "table", "rb") as f:
            f.seek(blockno * RECORD_SIZE)
            return struct.unpack("<Q", f.read(8))[0]

    async def block(self, blockno: int) -> bytes | None:
        return (await self.store.read(VOL, [blockno]))[0]

    async def call_apart(self, method: str, *args: object) -> object:
        """Call `method` over a connection of its own, as a frame delayed on another arrives."""
        client = await self.connect()
        try:
            return await client.call(method, *args)
        finally:
            await client.aclose()


class Catalog:
    """Records the write set changes that the client reports, as the node's catalog would."""

    def __init__(self) -> None:
        self.changes: list[tuple[list[str], list[str]]] = []
        self.failing = False

    async def record(self, write_set: list[str], out_of_sync: list[str]) -> None:
        await trio.lowlevel.checkpoint()
        if self.failing:
            raise OSError(errno.ECONNREFUSED, "catalog unreachable")
        self.changes.append((write_set, out_of_sync))


class Harness:
    """Replicas, the connections opened to them, and the clients built over them."""

    def __init__(self, nursery, root) -> None:
        self.nursery = nursery
        self.root = root
        self.replicas: list[Replica] = []
        self.clients: list[RpcClient] = []
        self.catalog = Catalog()

    async def start(self, *names: str, nblocks: int = NBLOCKS) -> list[Replica]:
        for name in names:
            replica = Replica(self.nursery, self.root, name)
            await replica.start()
            await replica.store.create(VOL, nblocks)
            self.replicas.append(replica)
        return self.replicas

    async def connect(self, replica: Replica) -> RpcClient:
        client = await replica.connect()
        self.clients.append(client)
        return client

    async def device(
        self, replicas, ha_level: int, epoch: int = 1, nblocks: int = NBLOCKS, **options
    ) -> ReplicationClient:
        clients = [await self.connect(replica) for replica in replicas]
        device = ReplicationClient(
            VOL,
            epoch,
            nblocks,
            clients,
            ha_level=ha_level,
            replica_ids=[replica.name for replica in replicas],
            on_write_set_change=self.catalog.record,
            **options,
        )
        await device.open()
        return device

    async def close(self) -> None:
        for client in self.clients:
            await client.aclose()
        for replica in self.replicas:
            replica.stop()
            await replica.store.aclose()


@pytest.fixture
async def harness(nursery, tmp_path):
    harness = Harness(nursery, tmp_path)
    yield harness
    await harness.close()


async def test_ha1_needs_its_replica(harness):
    (a,) = await harness.start("a")
    device = await harness.device([a], ha_level=1)
    await device.write_blocks([(1, block(1))])
    a.stop()
    with pytest.raises(errors.Unavailable, match="reached 0 replicas, 1 needed") as caught:
        await device.write_blocks([(2, block(2))])
    assert caught.value.errno == errno.EIO
    assert device.write_set == ["a"]
    assert harness.catalog.changes == []


async def test_ha2_degrades_to_one_replica(harness):
    a, b = await harness.start("a", "b")
    device = await harness.device([a, b], ha_level=2)
    assert device.runtime_state()["WriteQuorum"] == "2"
    b.stop()
    await device.write_blocks([(3, block(3))])
    assert device.write_set == ["a"]
    assert device.out_of_sync == ["b"]
    assert harness.catalog.changes == [(["a"], ["b"])]
    state = device.runtime_state()
    assert state["RuntimeState"] == "degraded"
    assert state["WriteQuorum"] == "1"
    assert state["WriteSet"] == "[0]"
    assert state["ReadSet"] == "[0]"
    assert state["ReplicaSetCurr"] == "[0 1]"
    assert await device.read_blocks([3]) == [block(3)]


async def test_ha2_both_down_fails(harness):
    a, b = await harness.start("a", "b")
    device = await harness.device([a, b], ha_level=2)
    a.stop()
    b.stop()
    with pytest.raises(errors.Unavailable, match="reached 0 replicas"):
        await device.write_blocks([(3, block(3))])
    assert device.write_set == ["a", "b"]
    assert harness.catalog.changes == []


async def test_ha3_needs_two(harness):
    a, b, c = await harness.start("a", "b", "c")
    device = await harness.device([a, b, c], ha_level=3)
    c.stop()
    await device.write_blocks([(4, block(4))])
    assert device.write_set == ["a", "b"]
    assert harness.catalog.changes == [(["a", "b"], ["c"])]
    b.stop()
    with pytest.raises(errors.Unavailable, match="reached 1 replicas, 2 needed"):
        await device.write_blocks([(5, block(5))])
    # The write set never shrinks below the quorum: b must come back before writes go on.
    assert device.write_set == ["a", "b"]
    assert len(harness.catalog.changes) == 1
    with pytest.raises(errors.Unavailable, match="reached 1 replicas, 2 needed"):
        await device.flush()


async def test_change_reported_before_write_returns(harness):
    a, b = await harness.start("a", "b")
    device = await harness.device([a, b], ha_level=2)
    seen: list[tuple[list[str], int]] = []

    async def record(write_set, out_of_sync):
        seen.append((write_set, a.version(6)))

    device._on_change = record
    b.stop()
    await device.write_blocks([(6, block(6))])
    assert len(seen) == 1
    write_set, version_on_a = seen[0]
    assert write_set == ["a"]
    # The block was stored on a, but the write had not returned when the report ran.
    assert version_on_a == (1 << 32) | 1


async def test_failed_report_fails_the_write(harness):
    a, b = await harness.start("a", "b")
    device = await harness.device([a, b], ha_level=2)
    harness.catalog.failing = True
    b.stop()
    with pytest.raises(errors.Unavailable, match="recording the write set"):
        await device.write_blocks([(7, block(7))])
    with pytest.raises(errors.Unavailable, match="recording the write set"):
        await device.write_blocks([(8, block(8))])
    harness.catalog.failing = False
    await device.write_blocks([(9, block(9))])
    assert harness.catalog.changes == [(["a"], ["b"])]


async def test_hung_replica_times_out(harness):
    a, b, c = await harness.start("a", "b", "c")
    device = await harness.device([a, b, c], ha_level=3, timeout=0.5)
    c.gates["store.write"] = trio.Event()
    start = trio.current_time()
    with trio.fail_after(5):
        await device.write_blocks([(10, block(10))])
    elapsed = trio.current_time() - start
    assert 0.4 < elapsed < 3
    assert device.write_set == ["a", "b"]
    assert harness.catalog.changes == [(["a", "b"], ["c"])]
    start = trio.current_time()
    await device.write_blocks([(11, block(11))])
    assert trio.current_time() - start < 0.4
    assert c.calls["store.write"] == 1


async def test_flush_durable_on_quorum(harness):
    a, b, c = await harness.start("a", "b", "c")
    device = await harness.device([a, b, c], ha_level=3)
    await device.write_blocks([(12, block(12))])
    c.stop()
    await device.flush()
    assert [replica.calls["store.flush"] for replica in (a, b)] == [1, 1]
    assert device.write_set == ["a", "b"]


async def test_write_below_quorum_leaves_no_trace(harness):
    a, b, c = await harness.start("a", "b", "c")
    device = await harness.device([a, b, c], ha_level=3)
    await device.write_blocks([(13, block(13))])
    acked = a.version(13)
    b.stop()
    c.stop()
    with pytest.raises(errors.Unavailable, match="reached 1 replicas"):
        await device.write_blocks([(13, block(99)), (14, block(98))])
    # a stored the write that failed; nothing may read it as if it had been acknowledged.
    assert await a.block(13) == block(99)
    with pytest.raises(errors.Unavailable, match="fewer replicas than the write quorum"):
        await device.read_blocks([13])
    with pytest.raises(errors.Unavailable, match="fewer replicas than the write quorum"):
        await device.write_blocks([(15, block(15))])
    await b.start()
    await c.start()
    assert await device.resync("b", await harness.connect(b)) == 0
    assert await device.resync("c", await harness.connect(c)) == 0
    for replica in (a, b, c):
        assert await replica.block(13) == block(13)
        assert replica.version(13) == acked
        assert await replica.block(14) is None
    assert await device.read_blocks([13, 14]) == [block(13), bytes(BLOCK_SIZE)]
    await device.write_blocks([(15, block(15))])
    assert device.write_set == ["a", "b", "c"]


async def _write_failed_below_quorum(harness) -> tuple[ReplicationClient, Replica, Replica, int]:
    """Time out a write of block 16 on b, which keeps b in the write set of quorum 2.

    Returns the device, a, b and the version of the failed write, which a stored.
    """
    a, b = await harness.start("a", "b")
    device = await harness.device([a, b], ha_level=2, write_quorum=2, timeout=0.3)
    await device.write_blocks([(16, block(16))])
    b.gates["store.write"] = trio.Event()
    with pytest.raises(errors.Unavailable, match="timed out"):
        await device.write_blocks([(16, block(61))])
    del b.gates["store.write"]
    return device, a, b, a.version(16)


async def test_write_below_quorum_reconciled_once_reachable(harness):
    device, a, b, _ = await _write_failed_below_quorum(harness)
    await device.resync("b", await harness.connect(b))
    assert await device.read_blocks([16]) == [block(16)]
    assert a.version(16) == b.version(16)


async def test_delayed_write_after_reconnect_rejected(harness):
    device, a, b, failed = await _write_failed_below_quorum(harness)
    await device.resync("b", await harness.connect(b))
    assert device.write_set == ["a", "b"]

    # The frame of the write that timed out reaches b only after the reconcile, as a network
    # cut can delay it in a socket.
    with pytest.raises(errors.StaleWrite):
        await b.call_apart("store.write", VOL, 1, failed, [[16, block(61)]])
    assert await b.block(16) == block(16)
    assert a.version(16) == b.version(16)


async def test_open_reconciles_a_minority_write(harness):
    a, b, c = await harness.start("a", "b", "c")
    first = await harness.device([a, b, c], ha_level=3)
    await first.write_blocks([(20, block(20)), (21, block(21))])
    acked = b.version(20)
    # What a coordinator that stopped right after sending to one replica leaves behind.
    await a.store.write(VOL, 1, acked + 5, [[20, block(77)]])
    await a.store.trim(VOL, 1, [21], acked + 6)
    second = await harness.device([a, b, c], ha_level=3, epoch=2)
    for replica in (a, b, c):
        assert await replica.block(20) == block(20)
        assert await replica.block(21) == block(21)
        assert replica.version(20) == acked
    assert await second.read_blocks([20, 21]) == [block(20), block(21)]


async def test_stale_epoch_stops_the_client(harness):
    a, b = await harness.start("a", "b")
    old = await harness.device([a, b], ha_level=2, epoch=1)
    await harness.device([a, b], ha_level=2, epoch=2)
    with pytest.raises(errors.StaleEpoch):
        await old.write_blocks([(0, block(0))])
    reads = a.calls["store.read_versioned"] + b.calls["store.read_versioned"]
    with pytest.raises(errors.StaleEpoch):
        await old.read_blocks([0])
    with pytest.raises(errors.StaleEpoch):
        await old.flush()
    assert a.calls["store.read_versioned"] + b.calls["store.read_versioned"] == reads
    assert old.write_set == ["a", "b"]


async def test_runtime_state_when_clean(harness):
    a, b, c = await harness.start("a", "b", "c")
    device = await harness.device([a, b, c], ha_level=3, local="b")
    assert device.runtime_state() == {
        "RuntimeState": "clean",
        "ReadQuorum": "1",
        "WriteQuorum": "2",
        "ReadSet": "[1 0 2]",
        "WriteSet": "[0 1 2]",
        "ReplicaSetCurr": "[0 1 2]",
        "ReplicaSetNext": "[0 1 2]",
        "ResyncBlocks": "[{0 0} {1 0} {2 0}]",
        "FullResyncBlocks": "[]",
        "ResyncProgress": "[]",
        "RepairedBlocks": "0",
    }


async def test_reads_prefer_local_replica(harness):
    a, b, c = await harness.start("a", "b", "c")
    device = await harness.device([a, b, c], ha_level=3, local="c")
    await device.write_blocks([(1, block(1))])
    await device.read_blocks([1])
    calls = [replica.calls["store.read_versioned"] for replica in (a, b, c)]
    assert calls == [0, 0, 1]


async def test_out_of_sync_replica_gets_no_io(harness):
    a, b = await harness.start("a", "b")
    device = await harness.device([a, b], ha_level=2, out_of_sync=["b"])
    await device.write_blocks([(1, block(1))])
    await device.read_blocks([1])
    await device.flush()
    assert sum(b.calls.values()) == 0
    assert device.runtime_state()["RuntimeState"] == "degraded"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ha_level": 4}, "invalid ha level 4"),
        ({"replica_ids": ["a"]}, "not one distinct id per replica"),
        ({"replica_ids": ["a", "a"]}, "not one distinct id per replica"),
        ({"out_of_sync": ["z"]}, "are not replicas"),
        ({"out_of_sync": ["a", "b"]}, "write quorum 1 is not between 1 and the 0"),
        ({"local": "z"}, "local replica 'z'"),
        ({"timeout": 0}, "invalid timeout"),
    ],
)
async def test_constructor_rejects_bad_options(harness, options, message):
    a, b = await harness.start("a", "b")
    clients = [await harness.connect(replica) for replica in (a, b)]
    options = {"replica_ids": ["a", "b"], **options}
    with pytest.raises(errors.InvalidArgument, match=message):
        ReplicationClient(VOL, 1, NBLOCKS, clients, **options)


async def test_single_replica_waits_without_timeout(harness):
    (a,) = await harness.start("a")
    device = await harness.device([a], ha_level=1, timeout=0.2)
    a.gates["store.write"] = trio.Event()

    async def open_gate_later() -> None:
        # Everything idles for more than twice the timeout before the replica replies.
        await trio.testing.wait_all_tasks_blocked(cushion=0.5)
        a.gates["store.write"].set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(open_gate_later)
        await device.write_blocks([(1, block(1))])
    assert await a.block(1) == block(1)
    assert device.write_set == ["a"]
