"""Tests of online volume growth: Volume.grow and BlockDevice.grow on every device kind."""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path

import pytest
import trio

from pxfs.errors import InvalidArgument, NoSpace, StaleEpoch
from pxfs.replication import ReplicationClient
from pxfs.rpc import RpcClient
from pxfs.rpcserver import RpcServer
from pxfs.store import ReplicaStore
from pxfs.volume.check import check_volume
from pxfs.volume.device import BLOCK_SIZE, BlockChange, BlockDevice, FileDevice, MemoryDevice
from pxfs.volume.format import Geometry, Superblock, device_blocks
from pxfs.volume.namespace import Volume

MIB = 1024 * 1024
SIZE = 2 * MIB
NEW_SIZE = 8 * MIB
JOURNAL = 8 * BLOCK_SIZE
SLOT = 8 * BLOCK_SIZE
FILE = stat.S_IFREG | 0o644
ROOT = 1
SECRET = b"volume-grow-test-secret"
VOL = "9100200300"


def pattern(seed: int, length: int) -> bytes:
    """Bytes that depend on `seed` and on their offset, so misplaced blocks show."""
    unit = b"".join((seed * 1000 + n).to_bytes(4, "little") for n in range(BLOCK_SIZE // 4))
    return (unit * (-(-length // BLOCK_SIZE)))[:length]


async def write_file(volume: Volume, name: bytes, data: bytes) -> None:
    """Create `name` in the root and write `data` into it in 1 MiB calls."""
    ino = volume.create(ROOT, name, FILE, 0, 0).ino
    for offset in range(0, len(data), MIB):
        await volume.write(ino, offset, data[offset : offset + MIB])


async def read_file(volume: Volume, name: bytes) -> bytes:
    """Return the whole content of `name` in the root."""
    attr = volume.lookup(ROOT, name)
    return await volume.read(attr.ino, 0, attr.size)


async def assert_grown(device: BlockDevice, files: dict[bytes, bytes]) -> None:
    """Open DEVICE again and check its size, the contents of FILES and the checker's verdict."""
    volume = await Volume.open(device)
    assert volume.superblock.size == NEW_SIZE
    for name, data in files.items():
        assert await read_file(volume, name) == data
    await volume.close()
    assert await check_volume(device) == []


async def format_small(size: int = SIZE, nblocks: int | None = None) -> MemoryDevice:
    """Return a MemoryDevice holding a fresh volume with small metadata regions."""
    needed = Geometry.for_size(size, JOURNAL, SLOT).nblocks
    device = MemoryDevice(nblocks or needed)
    await Volume.format(device, "grow-uuid", size, journal_bytes=JOURNAL, checkpoint_bytes=SLOT)
    return device


# Growth on each kind of device


class Replicas:
    """A real ReplicaStore behind a real RpcServer on a unix socket, with client connections."""

    def __init__(self, nursery: trio.Nursery, root: Path) -> None:
        self.nursery = nursery
        self.store = ReplicaStore(root / "replicas")
        self.socket_path = str(root / "store.sock")
        self.scope = trio.CancelScope()
        self.clients: list[RpcClient] = []

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        server = RpcServer(self.store.handlers(), secret=SECRET, name="grow test store")
        with self.scope:
            await server.serve_unix(self.socket_path, task_status=task_status)

    async def device(self, epoch: int, nblocks: int) -> ReplicationClient:
        """Connect a new client at `epoch` that believes the device has `nblocks` blocks."""
        client = await RpcClient.connect_unix(self.socket_path, SECRET)
        self.clients.append(client)
        device = ReplicationClient(VOL, epoch, nblocks, [client])
        await device.open()
        return device

    async def close(self) -> None:
        for client in self.clients:
            await client.aclose()
        self.scope.cancel()
        await self.store.aclose()


@pytest.fixture
async def replicas(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Replicas]:
    replicas = Replicas(nursery, tmp_path)
    await nursery.start(replicas.serve)
    yield replicas
    await replicas.close()


# Each kind builds a device holding a fresh SIZE volume of the default geometry, and reopens
# it from scratch the way a new mount would: a new file handle, or a new client at a new epoch.
Opener = Callable[[], Awaitable[BlockDevice]]


async def memory_kind(tmp_path: Path, replicas: Replicas) -> tuple[BlockDevice, Opener]:
    device = MemoryDevice(device_blocks(SIZE))

    async def reopen() -> BlockDevice:
        return device

    return device, reopen


async def file_kind(tmp_path: Path, replicas: Replicas) -> tuple[BlockDevice, Opener]:
    path = str(tmp_path / "volume.img")
    device = FileDevice.open(path, create_blocks=device_blocks(SIZE))

    async def reopen() -> BlockDevice:
        device.close()
        return FileDevice.open(path)

    return device, reopen


async def replicated_kind(tmp_path: Path, replicas: Replicas) -> tuple[BlockDevice, Opener]:
    await replicas.store.create(VOL, device_blocks(SIZE))
    device = await replicas.device(1, device_blocks(SIZE))

    async def reopen() -> BlockDevice:
        return await replicas.device(2, device_blocks(NEW_SIZE))

    return device, reopen


@pytest.mark.parametrize("kind", [memory_kind, file_kind, replicated_kind])
async def test_grow_online_round_trip(kind, tmp_path: Path, replicas: Replicas) -> None:
    device, reopen = await kind(tmp_path, replicas)
    await Volume.format(device, "grow-uuid", SIZE)
    volume = await Volume.open(device)
    old = pattern(1, SIZE // 2 + 1000)
    await write_file(volume, b"old", old)
    before = volume.statfs()

    await volume.grow(NEW_SIZE)

    assert device.nblocks == device_blocks(NEW_SIZE)
    after = volume.statfs()
    added = (NEW_SIZE - SIZE) // BLOCK_SIZE
    assert after["blocks"] == NEW_SIZE // BLOCK_SIZE
    assert after["free"] == before["free"] + added
    # More than the old size could hold, so it must land in the new blocks.
    new = pattern(2, SIZE + MIB)
    await write_file(volume, b"new", new)
    await volume.close()

    device = await reopen()
    volume = await Volume.open(device)
    assert volume.superblock.size == NEW_SIZE
    assert volume.statfs()["blocks"] == NEW_SIZE // BLOCK_SIZE
    assert await read_file(volume, b"old") == old
    assert await read_file(volume, b"new") == new
    await volume.close()
    assert await check_volume(device) == []


async def test_grow_twice(tmp_path: Path) -> None:
    device = await format_small()
    volume = await Volume.open(device)
    await volume.grow(4 * MIB)
    await volume.grow(NEW_SIZE)
    data = pattern(3, 7 * MIB)
    await write_file(volume, b"f", data)
    await volume.close()
    await assert_grown(device, {b"f": data})


async def test_grow_full_volume_takes_writes(tmp_path: Path) -> None:
    device = await format_small()
    volume = await Volume.open(device)
    await write_file(volume, b"full", pattern(4, SIZE))
    with pytest.raises(NoSpace):
        await write_file(volume, b"more", pattern(5, BLOCK_SIZE))
    await volume.grow(NEW_SIZE)
    await volume.write(volume.lookup(ROOT, b"more").ino, 0, pattern(5, BLOCK_SIZE))
    assert volume.statfs()["free"] == (NEW_SIZE - SIZE) // BLOCK_SIZE - 1
    await volume.close()
    assert await check_volume(device) == []


async def test_grow_device_already_larger(tmp_path: Path) -> None:
    spare = Geometry.for_size(4 * NEW_SIZE, JOURNAL, SLOT).nblocks
    device = await format_small(nblocks=spare)
    volume = await Volume.open(device)
    await write_file(volume, b"a", pattern(6, MIB))
    await volume.grow(NEW_SIZE)
    assert device.nblocks == spare
    await write_file(volume, b"b", pattern(7, 5 * MIB))
    await volume.close()
    await assert_grown(device, {b"b": pattern(7, 5 * MIB)})


async def test_grow_replicas_already_larger(replicas: Replicas) -> None:
    # A new client after a crash: the replica grew, the superblock and catalog did not.
    await replicas.store.create(VOL, device_blocks(SIZE))
    await replicas.store.grow(VOL, 1, device_blocks(4 * NEW_SIZE))
    device = await replicas.device(1, device_blocks(SIZE))
    await Volume.format(device, "grow-uuid", SIZE)
    volume = await Volume.open(device)
    await volume.grow(NEW_SIZE)
    assert device.nblocks == device_blocks(NEW_SIZE)
    assert (await replicas.store.info(VOL))["nblocks"] == device_blocks(4 * NEW_SIZE)
    data = pattern(12, 5 * MIB)
    await write_file(volume, b"f", data)
    await volume.close()
    await assert_grown(device, {b"f": data})


async def test_grow_while_writers_and_flusher_run() -> None:
    device = await format_small()
    contents = {f"w{n}".encode(): pattern(20 + n, 8 * BLOCK_SIZE) for n in range(3)}
    async with trio.open_nursery() as nursery:
        volume = await Volume.open(device, nursery=nursery)

        async def write_slowly(name: bytes, data: bytes) -> None:
            ino = volume.create(ROOT, name, FILE, 0, 0).ino
            for offset in range(0, len(data), BLOCK_SIZE):
                await volume.write(ino, offset, data[offset : offset + BLOCK_SIZE])
                await volume.sync()

        async with trio.open_nursery() as writers:
            for name, data in contents.items():
                writers.start_soon(write_slowly, name, data)
            writers.start_soon(volume.grow, NEW_SIZE)
        contents[b"after"] = pattern(30, 5 * MIB)
        await write_file(volume, b"after", contents[b"after"])
        await volume.close()
    await assert_grown(device, contents)


# Crash safety


class PowerLoss(Exception):
    """Raised by StoppingDevice where the test cuts the power."""


class StoppingDevice(MemoryDevice):
    """A MemoryDevice that raises PowerLoss at one chosen step of a grow."""

    def __init__(self, nblocks: int) -> None:
        super().__init__(nblocks)
        self.stop_at: str | None = None

    def _reached(self, step: str) -> None:
        if self.stop_at == step:
            raise PowerLoss(step)

    async def grow(self, nblocks: int) -> None:
        await super().grow(nblocks)
        self._reached("device grown")

    async def write_blocks(
        self,
        blocks: Sequence[tuple[int, bytes]],
        changes: Mapping[int, BlockChange] | None = None,
    ) -> None:
        touches_superblock = any(blockno == 0 for blockno, _ in blocks)
        if touches_superblock:
            self._reached("before superblock write")
        await super().write_blocks(blocks, changes)
        if touches_superblock:
            self._reached("superblock written")

    async def flush(self) -> None:
        await super().flush()
        self._reached("flushed")


CRASH_CASES = [
    # (step where the power goes, keep the unflushed writes, size the volume reopens with)
    ("device grown", False, SIZE),
    ("before superblock write", False, SIZE),
    ("superblock written", False, SIZE),
    ("superblock written", True, NEW_SIZE),
    ("flushed", False, NEW_SIZE),
]


@pytest.mark.parametrize(("step", "keep", "expected_size"), CRASH_CASES)
async def test_crash_during_grow_keeps_old_or_new(
    step: str, keep: bool, expected_size: int
) -> None:
    device = StoppingDevice(Geometry.for_size(SIZE, JOURNAL, SLOT).nblocks)
    await Volume.format(device, "grow-uuid", SIZE, journal_bytes=JOURNAL, checkpoint_bytes=SLOT)
    volume = await Volume.open(device)
    old = pattern(8, SIZE - 3 * BLOCK_SIZE)
    await write_file(volume, b"old", old)
    await volume.sync()

    device.stop_at = step
    with pytest.raises(PowerLoss):
        await volume.grow(NEW_SIZE)
    kept_writes = range(device.unflushed_writes) if keep else ()
    survivor = device.crashed(kept_writes)

    assert await check_volume(survivor) == []
    volume = await Volume.open(survivor)
    assert volume.superblock.size == expected_size
    assert volume.statfs()["blocks"] == expected_size // BLOCK_SIZE
    assert await read_file(volume, b"old") == old
    # Whichever size survived, growing again finishes the job on the already larger device.
    if expected_size < NEW_SIZE:
        await volume.grow(NEW_SIZE)
    new = pattern(9, 4 * MIB)
    await write_file(volume, b"new", new)
    await volume.close()
    volume = await Volume.open(survivor)
    assert volume.superblock.size == NEW_SIZE
    assert await read_file(volume, b"old") == old
    assert await read_file(volume, b"new") == new
    await volume.close()
    assert await check_volume(survivor) == []


# Errors

MAX_SMALL = Geometry.for_size(SIZE, JOURNAL, SLOT).max_size


@pytest.mark.parametrize(
    ("new_size", "message"),
    [
        (SIZE, "already 2097152 bytes"),
        (SIZE - BLOCK_SIZE, "shrinking to 2031616 is not supported"),
        (0, "shrinking to 0 is not supported"),
        (SIZE + 4096, "must be a multiple of 65536"),
        (MAX_SMALL + BLOCK_SIZE, f"exceeds the maximum of {MAX_SMALL} bytes"),
        ("8M", "invalid volume size '8M'"),
        (True, "invalid volume size True"),
    ],
)
async def test_grow_rejects_bad_size(new_size: object, message: str) -> None:
    device = await format_small()
    volume = await Volume.open(device)
    before = volume.statfs()
    with pytest.raises(InvalidArgument, match=message):
        await volume.grow(new_size)  # type: ignore[arg-type]
    assert volume.statfs() == before
    assert volume.superblock.size == SIZE
    assert device.nblocks == Geometry.for_size(SIZE, JOURNAL, SLOT).nblocks
    await volume.close()


async def test_grow_up_to_the_maximum(tmp_path: Path) -> None:
    device = await format_small()
    volume = await Volume.open(device)
    await volume.grow(MAX_SMALL)
    assert volume.statfs()["blocks"] == MAX_SMALL // BLOCK_SIZE
    await volume.close()
    assert await check_volume(device) == []


def test_default_geometry_allows_one_tib() -> None:
    assert Geometry.for_size(SIZE).max_size >= 1 << 40


def test_format_rejects_size_over_the_maximum() -> None:
    geometry = Geometry.for_size(SIZE, JOURNAL, SLOT)
    with pytest.raises(InvalidArgument, match="exceeds the maximum"):
        Geometry.for_size(geometry.max_size + BLOCK_SIZE, JOURNAL, SLOT)


async def test_grow_closed_volume_rejected() -> None:
    volume = await Volume.open(await format_small())
    await volume.close()
    with pytest.raises(InvalidArgument, match="is closed"):
        await volume.grow(NEW_SIZE)


# A slot of 64 blocks allows volumes far larger than the 1 MiB tmpfs can hold the table of.
BIG_SLOT = 64 * BLOCK_SIZE


async def test_grow_without_space_leaves_volume_unchanged(
    nursery: trio.Nursery, tiny_fs: Path
) -> None:
    replicas = Replicas(nursery, tiny_fs)
    await nursery.start(replicas.serve)
    nblocks = Geometry.for_size(SIZE, JOURNAL, BIG_SLOT).nblocks
    try:
        await replicas.store.create(VOL, nblocks)
        device = await replicas.device(1, nblocks)
        await Volume.format(
            device, "grow-uuid", SIZE, journal_bytes=JOURNAL, checkpoint_bytes=BIG_SLOT
        )
        volume = await Volume.open(device)
        data = pattern(10, 3 * BLOCK_SIZE)
        await write_file(volume, b"f", data)
        before = volume.statfs()
        # 16 GiB needs a block table of 4 MiB, which cannot fit on the 1 MiB disk.
        with pytest.raises(NoSpace, match="grow the block table"):
            await volume.grow(16 * 1024 * MIB)
        assert volume.statfs() == before
        assert volume.superblock.size == SIZE
        assert device.nblocks == nblocks
        assert (await replicas.store.info(VOL))["nblocks"] == nblocks
        await write_file(volume, b"g", pattern(11, BLOCK_SIZE))
        await volume.close()
        volume = await Volume.open(device)
        assert volume.superblock.size == SIZE
        assert await read_file(volume, b"f") == data
        await volume.close()
        assert await check_volume(device) == []
    finally:
        await replicas.close()


# BlockDevice.grow


async def test_memory_device_grow() -> None:
    device = MemoryDevice(4)
    await device.write_blocks([(3, pattern(1, BLOCK_SIZE))])
    await device.grow(4)
    assert device.nblocks == 4
    await device.grow(10)
    assert device.nblocks == 10
    assert await device.read_blocks([3, 9]) == [pattern(1, BLOCK_SIZE), bytes(BLOCK_SIZE)]
    with pytest.raises(InvalidArgument, match="cannot shrink the device from 10 to 9"):
        await device.grow(9)
    assert device.crashed().nblocks == 10


async def test_file_device_grow(tmp_path: Path) -> None:
    path = str(tmp_path / "dev")
    device = FileDevice.open(path, create_blocks=4)
    await device.write_blocks([(3, pattern(2, BLOCK_SIZE))])
    await device.grow(12)
    assert device.nblocks == 12
    assert os.stat(path).st_size == 12 * BLOCK_SIZE
    await device.write_blocks([(11, pattern(3, BLOCK_SIZE))])
    with pytest.raises(InvalidArgument, match="cannot shrink"):
        await device.grow(11)
    device.close()
    reopened = FileDevice.open(path)
    assert reopened.nblocks == 12
    assert await reopened.read_blocks([3, 7, 11]) == [
        pattern(2, BLOCK_SIZE),
        bytes(BLOCK_SIZE),
        pattern(3, BLOCK_SIZE),
    ]
    reopened.close()


async def test_file_device_grow_past_file_size_limit(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    probe.touch()
    try:
        os.truncate(probe, 2**62)
    except OSError:
        pass
    else:
        pytest.skip("the file system under tmp_path allows files of 4 EiB")
    path = str(tmp_path / "dev")
    device = FileDevice.open(path, create_blocks=4)
    with pytest.raises(NoSpace, match="maximum file size"):
        await device.grow(2**62 // BLOCK_SIZE)
    assert device.nblocks == 4
    assert os.stat(path).st_size == 4 * BLOCK_SIZE
    device.close()


async def test_replicated_grow_stale_epoch(replicas: Replicas) -> None:
    await replicas.store.create(VOL, 64)
    old = await replicas.device(1, 64)
    await replicas.device(2, 64)
    with pytest.raises(StaleEpoch):
        await old.grow(128)
    assert old.nblocks == 64
    assert (await replicas.store.info(VOL))["nblocks"] == 64


def test_superblock_fits_in_first_sector() -> None:
    geometry = Geometry.for_size(SIZE)
    uuid = "0f8fad5b-d9cb-469f-a165-70867728950e"
    original = Superblock(uuid, SIZE, geometry, bytes(range(16)))
    grown = original.grown(geometry.max_size)
    block = grown.encode()
    # Growth relies on this: a write of block 0 torn after any sector keeps one valid version.
    assert block[512:] == bytes(BLOCK_SIZE - 512)
    assert Superblock.decode(block) == grown
