"""Tests of pxfs.volume.namespace: the Volume on a MemoryDevice."""

from __future__ import annotations

import itertools
import random
import stat
from collections.abc import AsyncIterator, Sequence

import pytest
import trio

from pxfs.errors import (
    AlreadyExists,
    FileTooLarge,
    InvalidArgument,
    IsADirectory,
    NameTooLong,
    NoAttribute,
    NoSpace,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    NotSupported,
)
from pxfs.volume.check import check_volume
from pxfs.volume.device import BLOCK_SIZE, MemoryDevice
from pxfs.volume.format import Geometry
from pxfs.volume.namespace import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    XATTR_CREATE,
    XATTR_REPLACE,
    Volume,
)

MIB = 1024 * 1024
SIZE = 4 * MIB
JOURNAL = 8 * BLOCK_SIZE
SLOT = 8 * BLOCK_SIZE
GEOMETRY = Geometry.for_size(SIZE, JOURNAL, SLOT)
ROOT = 1
FILE = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755


async def _formatted(size: int = SIZE) -> MemoryDevice:
    device = MemoryDevice(Geometry.for_size(size, JOURNAL, SLOT).nblocks)
    await Volume.format(device, "test-uuid", size, journal_bytes=JOURNAL, checkpoint_bytes=SLOT)
    return device


@pytest.fixture
async def device() -> MemoryDevice:
    return await _formatted()


@pytest.fixture
async def vol(device: MemoryDevice) -> AsyncIterator[Volume]:
    volume = await Volume.open(device)
    yield volume
    await volume.close()


async def _reopen(volume: Volume, device: MemoryDevice) -> Volume:
    await volume.close()
    return await Volume.open(device)


def _names(volume: Volume, ino: int) -> list[bytes]:
    return sorted(name for name, _ in volume.opendir(ino))


# Names and entries


async def test_root_is_inode_one(vol: Volume) -> None:
    root = vol.getattr(ROOT)
    assert stat.S_ISDIR(root.mode)
    assert root.nlink == 2
    assert _names(vol, ROOT) == [b".", b".."]


async def test_create_lookup_and_owner(vol: Volume) -> None:
    created = vol.create(ROOT, b"a", FILE, 1000, 2000)
    found = vol.lookup(ROOT, b"a")
    assert found.ino == created.ino
    assert (found.uid, found.gid, found.mode, found.nlink) == (1000, 2000, FILE, 1)
    assert _names(vol, ROOT) == [b".", b"..", b"a"]


async def test_name_rules(vol: Volume) -> None:
    with pytest.raises(NameTooLong):
        vol.create(ROOT, b"x" * 256, FILE, 0, 0)
    vol.create(ROOT, b"x" * 255, FILE, 0, 0)
    for bad in (b"a/b", b"a\0b", b""):
        with pytest.raises(InvalidArgument):
            vol.create(ROOT, bad, FILE, 0, 0)
    vol.create(ROOT, b"dup", FILE, 0, 0)
    with pytest.raises(AlreadyExists):
        vol.mkdir(ROOT, b"dup", DIR, 0, 0)
    with pytest.raises(NotFound):
        vol.lookup(ROOT, b"missing")


async def test_special_files(vol: Volume) -> None:
    fifo = vol.create(ROOT, b"fifo", stat.S_IFIFO | 0o600, 0, 0)
    assert stat.S_ISFIFO(fifo.mode)
    dev = vol.create(ROOT, b"null", stat.S_IFCHR | 0o666, 0, 0, rdev=0x0103)
    assert dev.rdev == 0x0103
    sock = vol.create(ROOT, b"sock", stat.S_IFSOCK | 0o600, 0, 0)
    assert stat.S_ISSOCK(sock.mode)
    with pytest.raises(InvalidArgument):
        vol.create(ROOT, b"dir", DIR, 0, 0)


async def test_directory_link_counts(vol: Volume) -> None:
    a = vol.mkdir(ROOT, b"a", DIR, 0, 0)
    vol.mkdir(a.ino, b"b", DIR, 0, 0)
    vol.create(a.ino, b"f", FILE, 0, 0)
    assert vol.getattr(ROOT).nlink == 3
    assert vol.getattr(a.ino).nlink == 3
    with pytest.raises(NotEmpty):
        vol.rmdir(ROOT, b"a")
    with pytest.raises(NotADirectory):
        vol.rmdir(a.ino, b"f")
    with pytest.raises(IsADirectory):
        vol.unlink(a.ino, b"b")
    vol.rmdir(a.ino, b"b")
    assert vol.getattr(a.ino).nlink == 2


async def test_hard_links(vol: Volume) -> None:
    f = vol.create(ROOT, b"f", FILE, 0, 0)
    d = vol.mkdir(ROOT, b"d", DIR, 0, 0)
    linked = vol.link(f.ino, d.ino, b"g")
    assert linked.nlink == 2
    assert vol.lookup(d.ino, b"g").ino == f.ino
    with pytest.raises(NotPermitted):
        vol.link(d.ino, ROOT, b"dlink")
    vol.unlink(ROOT, b"f")
    assert vol.getattr(f.ino).nlink == 1


async def test_setgid_directory_passes_gid(vol: Volume) -> None:
    shared = vol.mkdir(ROOT, b"shared", DIR | stat.S_ISGID, 0, 500)
    f = vol.create(shared.ino, b"f", FILE, 1000, 1000)
    sub = vol.mkdir(shared.ino, b"sub", DIR, 1000, 1000)
    assert f.gid == 500
    assert sub.gid == 500
    assert sub.mode & stat.S_ISGID
    assert not f.mode & stat.S_ISGID


async def test_symlink_and_readlink(vol: Volume) -> None:
    link = vol.symlink(ROOT, b"l", b"target/path", 0, 0)
    assert stat.S_ISLNK(link.mode)
    assert link.size == len(b"target/path")
    assert vol.readlink(link.ino) == b"target/path"
    f = vol.create(ROOT, b"f", FILE, 0, 0)
    with pytest.raises(InvalidArgument):
        vol.readlink(f.ino)
    with pytest.raises(NameTooLong):
        vol.symlink(ROOT, b"long", b"x" * 4096, 0, 0)


async def test_parent_times_change_on_create_and_unlink(vol: Volume) -> None:
    before = vol.getattr(ROOT)
    vol.create(ROOT, b"f", FILE, 0, 0)
    after_create = vol.getattr(ROOT)
    assert after_create.mtime_ns > before.mtime_ns
    assert after_create.ctime_ns > before.ctime_ns
    vol.unlink(ROOT, b"f")
    assert vol.getattr(ROOT).mtime_ns > after_create.mtime_ns


# Rename


async def test_rename_plain_and_replace(vol: Volume) -> None:
    a = vol.create(ROOT, b"a", FILE, 0, 0)
    b = vol.create(ROOT, b"b", FILE, 0, 0)
    vol.rename(ROOT, b"a", ROOT, b"b")
    assert vol.lookup(ROOT, b"b").ino == a.ino
    assert _names(vol, ROOT) == [b".", b"..", b"b"]
    assert vol.getattr(b.ino).nlink == 0
    vol.forget(b.ino, 1)
    with pytest.raises(NotFound):
        vol.getattr(b.ino)


async def test_rename_noreplace_and_exchange(vol: Volume) -> None:
    a = vol.create(ROOT, b"a", FILE, 0, 0)
    d = vol.mkdir(ROOT, b"d", DIR, 0, 0)
    with pytest.raises(AlreadyExists):
        vol.rename(ROOT, b"a", ROOT, b"d", RENAME_NOREPLACE)
    with pytest.raises(NotFound):
        vol.rename(ROOT, b"a", ROOT, b"nothing", RENAME_EXCHANGE)
    vol.rename(ROOT, b"a", ROOT, b"d", RENAME_EXCHANGE)
    assert vol.lookup(ROOT, b"d").ino == a.ino
    assert vol.lookup(ROOT, b"a").ino == d.ino
    with pytest.raises(InvalidArgument):
        vol.rename(ROOT, b"a", ROOT, b"d", RENAME_EXCHANGE | RENAME_NOREPLACE)


async def test_exchange_across_directories_fixes_links(vol: Volume) -> None:
    left = vol.mkdir(ROOT, b"left", DIR, 0, 0)
    right = vol.mkdir(ROOT, b"right", DIR, 0, 0)
    sub = vol.mkdir(left.ino, b"sub", DIR, 0, 0)
    f = vol.create(right.ino, b"f", FILE, 0, 0)
    vol.rename(left.ino, b"sub", right.ino, b"f", RENAME_EXCHANGE)
    assert vol.getattr(left.ino).nlink == 2
    assert vol.getattr(right.ino).nlink == 3
    assert vol.lookup(sub.ino, b"..").ino == right.ino
    assert vol.lookup(left.ino, b"sub").ino == f.ino


async def test_rename_type_and_subtree_rules(vol: Volume) -> None:
    d = vol.mkdir(ROOT, b"d", DIR, 0, 0)
    inner = vol.mkdir(d.ino, b"inner", DIR, 0, 0)
    vol.create(ROOT, b"f", FILE, 0, 0)
    full = vol.mkdir(ROOT, b"full", DIR, 0, 0)
    vol.create(full.ino, b"x", FILE, 0, 0)
    with pytest.raises(InvalidArgument):
        vol.rename(ROOT, b"d", inner.ino, b"moved")
    with pytest.raises(InvalidArgument):
        vol.rename(ROOT, b"d", d.ino, b"self")
    with pytest.raises(NotADirectory):
        vol.rename(ROOT, b"d", ROOT, b"f")
    with pytest.raises(IsADirectory):
        vol.rename(ROOT, b"f", ROOT, b"d")
    with pytest.raises(NotEmpty):
        vol.rename(ROOT, b"d", ROOT, b"full")


async def test_rename_directory_moves_dotdot_and_links(vol: Volume) -> None:
    a = vol.mkdir(ROOT, b"a", DIR, 0, 0)
    b = vol.mkdir(ROOT, b"b", DIR, 0, 0)
    c = vol.mkdir(a.ino, b"c", DIR, 0, 0)
    empty = vol.mkdir(b.ino, b"empty", DIR, 0, 0)
    vol.rename(a.ino, b"c", b.ino, b"empty")
    assert vol.getattr(a.ino).nlink == 2
    assert vol.getattr(b.ino).nlink == 3
    assert vol.lookup(c.ino, b"..").ino == b.ino
    assert vol.getattr(empty.ino).nlink == 0
    vol.forget(empty.ino, 1)
    with pytest.raises(NotFound):
        vol.getattr(empty.ino)


async def test_rename_of_hard_link_onto_itself_is_noop(vol: Volume) -> None:
    f = vol.create(ROOT, b"f", FILE, 0, 0)
    vol.link(f.ino, ROOT, b"g")
    vol.rename(ROOT, b"f", ROOT, b"g")
    assert _names(vol, ROOT) == [b".", b"..", b"f", b"g"]
    assert vol.getattr(f.ino).nlink == 2


# Attributes and xattrs


async def test_setattr_mode_owner_times(vol: Volume) -> None:
    f = vol.create(ROOT, b"f", FILE, 0, 0)
    changed = await vol.setattr(f.ino, mode=0o4711, uid=7, gid=8, atime_ns=123, mtime_ns=456)
    assert changed.mode == stat.S_IFREG | 0o4711
    assert (changed.uid, changed.gid) == (7, 8)
    assert (changed.atime_ns, changed.mtime_ns) == (123, 456)
    assert changed.ctime_ns > f.ctime_ns


async def test_xattrs(vol: Volume) -> None:
    f = vol.create(ROOT, b"f", FILE, 0, 0)
    vol.setxattr(f.ino, b"user.a", b"1")
    vol.setxattr(f.ino, b"trusted.t", b"2")
    assert vol.getxattr(f.ino, b"user.a") == b"1"
    assert sorted(vol.listxattr(f.ino)) == [b"trusted.t", b"user.a"]
    assert vol.listxattr(f.ino, privileged=False) == [b"user.a"]
    with pytest.raises(AlreadyExists):
        vol.setxattr(f.ino, b"user.a", b"x", XATTR_CREATE)
    with pytest.raises(NoAttribute):
        vol.setxattr(f.ino, b"user.b", b"x", XATTR_REPLACE)
    with pytest.raises(NotSupported):
        vol.setxattr(f.ino, b"system.posix_acl_access", b"x")
    with pytest.raises(NotSupported):
        vol.getxattr(f.ino, b"other.x")
    vol.removexattr(f.ino, b"user.a")
    with pytest.raises(NoAttribute):
        vol.getxattr(f.ino, b"user.a")
    with pytest.raises(NoAttribute):
        vol.removexattr(f.ino, b"user.a")


async def test_xattr_per_inode_limit(vol: Volume) -> None:
    f = vol.create(ROOT, b"f", FILE, 0, 0)
    for index in range(3):
        vol.setxattr(f.ino, b"user.%d" % index, b"v" * 65536)
    with pytest.raises(NoSpace):
        vol.setxattr(f.ino, b"user.3", b"v" * 65536)


# Data


async def test_write_read_unaligned(vol: Volume) -> None:
    f = vol.create(ROOT, b"f", FILE, 0, 0)
    data = bytes(range(256)) * 1000
    assert await vol.write(f.ino, 70000, data) == len(data)
    assert await vol.read(f.ino, 70000, len(data)) == data
    assert await vol.read(f.ino, 0, 70000) == bytes(70000)
    attr = vol.getattr(f.ino)
    assert attr.size == 70000 + len(data)
    assert attr.blocks == 4 * BLOCK_SIZE // 512
    assert await vol.read(f.ino, attr.size, 10) == b""


async def test_sparse_file_has_honest_blocks(vol: Volume) -> None:
    f = vol.create(ROOT, b"f", FILE, 0, 0)
    await vol.write(f.ino, 3 * MIB, b"end")
    attr = vol.getattr(f.ino)
    assert attr.size == 3 * MIB + 3
    assert attr.blocks == BLOCK_SIZE // 512
    assert await vol.read(f.ino, MIB, 100) == bytes(100)


async def test_truncate_zeroes_tail_across_reopen(vol: Volume, device: MemoryDevice) -> None:
    f = vol.create(ROOT, b"f", FILE, 0, 0)
    await vol.write(f.ino, 0, b"\xaa" * 200000)
    await vol.setattr(f.ino, size=1000)
    assert vol.getattr(f.ino).blocks == BLOCK_SIZE // 512
    await vol.setattr(f.ino, size=150000)
    assert await vol.read(f.ino, 0, 150000) == b"\xaa" * 1000 + bytes(149000)
    vol = await _reopen(vol, device)
    assert await vol.read(f.ino, 0, 150000) == b"\xaa" * 1000 + bytes(149000)
    await vol.close()


async def test_truncate_tail_survives_crash(device: MemoryDevice) -> None:
    vol = await Volume.open(device)
    f = vol.create(ROOT, b"f", FILE, 0, 0)
    await vol.write(f.ino, 0, b"\xbb" * 100000)
    await vol.sync()
    await vol.setattr(f.ino, size=10)
    await vol.setattr(f.ino, size=100000)
    await vol.sync()
    after = await Volume.open(device.crashed())
    assert await after.read(f.ino, 0, 100000) == b"\xbb" * 10 + bytes(99990)


async def test_write_beyond_volume_size_is_efbig(vol: Volume) -> None:
    f = vol.create(ROOT, b"f", FILE, 0, 0)
    with pytest.raises(FileTooLarge):
        await vol.write(f.ino, SIZE, b"x")
    with pytest.raises(FileTooLarge):
        await vol.setattr(f.ino, size=SIZE + 1)
    d = vol.mkdir(ROOT, b"d", DIR, 0, 0)
    with pytest.raises(IsADirectory):
        await vol.write(d.ino, 0, b"x")


async def test_enospc_then_reuse_after_delete(vol: Volume) -> None:
    first = vol.create(ROOT, b"first", FILE, 0, 0)
    chunk = b"\x11" * MIB
    await vol.write(first.ino, 0, chunk * 2)
    second = vol.create(ROOT, b"second", FILE, 0, 0)
    await vol.write(second.ino, 0, chunk)
    with pytest.raises(NoSpace):
        await vol.write(second.ino, MIB, chunk * 2)
    assert vol.getattr(second.ino).size == MIB
    assert await vol.read(first.ino, 0, 2 * MIB) == chunk * 2
    assert vol.statfs()["free"] == 16

    vol.unlink(ROOT, b"first")
    vol.forget(first.ino, 1)
    assert vol.statfs()["free"] == 48
    await vol.write(second.ino, MIB, chunk * 2)
    assert await vol.read(second.ino, 0, 3 * MIB) == chunk * 3


async def test_one_mib_write_is_few_device_calls(vol: Volume, device: MemoryDevice) -> None:
    f = vol.create(ROOT, b"f", FILE, 0, 0)
    await vol.sync()
    before = dict(vars(device.stats))
    await vol.write(f.ino, 0, b"z" * MIB)
    await vol.fsync(f.ino, datasync=False)
    # One call for the 16 data blocks and one for the journal; a flush after each.
    assert device.stats.write_calls - before["write_calls"] == 2
    assert device.stats.blocks_written - before["blocks_written"] == 17
    assert device.stats.flush_calls - before["flush_calls"] == 2
    assert device.stats.read_calls == before["read_calls"]


async def test_partial_write_reads_block_once(vol: Volume, device: MemoryDevice) -> None:
    f = vol.create(ROOT, b"f", FILE, 0, 0)
    await vol.write(f.ino, 0, b"a" * BLOCK_SIZE)
    await vol.close()
    vol = await Volume.open(device)
    reads = device.stats.read_calls
    await vol.write(f.ino, 10, b"bc")
    await vol.write(f.ino, 20, b"de")
    assert device.stats.read_calls - reads == 1
    assert await vol.read(f.ino, 8, 14) == b"aabcaaaaaaaade"
    await vol.close()


# Lifetime, durability and crashes


async def test_unlinked_open_file_lives_until_forget(vol: Volume) -> None:
    f = vol.create(ROOT, b"f", FILE, 0, 0)
    vol.opened(f.ino)
    await vol.write(f.ino, 0, b"keep")
    free = vol.statfs()["free"]
    vol.unlink(ROOT, b"f")
    assert vol.getattr(f.ino).nlink == 0
    assert await vol.read(f.ino, 0, 4) == b"keep"
    await vol.write(f.ino, 4, b"more")
    assert await vol.read(f.ino, 0, 8) == b"keepmore"
    assert vol.statfs()["free"] == free
    vol.released(f.ino)
    assert vol.statfs()["free"] == free + 1
    assert vol.getattr(f.ino).size == 0
    vol.forget(f.ino, 1)
    with pytest.raises(NotFound):
        vol.getattr(f.ino)
    assert vol.statfs()["free"] == free + 1


async def test_unlink_of_closed_file_frees_data_at_once(vol: Volume) -> None:
    f = vol.create(ROOT, b"f", FILE, 0, 0)
    await vol.write(f.ino, 0, b"x" * (3 * BLOCK_SIZE))
    free = vol.statfs()["free"]
    vol.unlink(ROOT, b"f")
    # The kernel still knows the inode (no forget yet), but nobody has it open.
    assert vol.getattr(f.ino).nlink == 0
    assert vol.getattr(f.ino).blocks == 0
    assert vol.statfs()["free"] == free + 3


async def test_orphans_are_dropped_at_open(device: MemoryDevice) -> None:
    vol = await Volume.open(device)
    f = vol.create(ROOT, b"f", FILE, 0, 0)
    vol.opened(f.ino)
    await vol.write(f.ino, 0, b"x" * 3 * BLOCK_SIZE)
    vol.unlink(ROOT, b"f")
    await vol.sync()
    assert vol.statfs()["free"] == 64 - 3
    crashed = device.crashed()
    after = await Volume.open(crashed)
    with pytest.raises(NotFound):
        after.getattr(f.ino)
    assert after.statfs()["free"] == 64
    await after.close()
    again = await Volume.open(crashed)
    assert again.statistics()["free_blocks"] == 64


async def test_inode_numbers_stable_across_reopen(vol: Volume, device: MemoryDevice) -> None:
    d = vol.mkdir(ROOT, b"d", DIR, 0, 0)
    f = vol.create(d.ino, b"f", FILE, 0, 0)
    vol.create(ROOT, b"gone", FILE, 0, 0)
    vol.unlink(ROOT, b"gone")
    vol = await _reopen(vol, device)
    assert vol.lookup(ROOT, b"d").ino == d.ino
    assert vol.lookup(d.ino, b"f").ino == f.ino
    new = vol.create(ROOT, b"new", FILE, 0, 0)
    assert new.ino > f.ino + 1
    await vol.close()


async def test_close_writes_checkpoint(vol: Volume, device: MemoryDevice) -> None:
    vol.create(ROOT, b"f", FILE, 0, 0)
    await vol.close()
    again = await Volume.open(device)
    assert again.statistics()["journal"]["seq"] == again.statistics()["journal"]["durable_seq"]
    assert _names(again, ROOT) == [b".", b"..", b"f"]
    await again.close()


async def test_synced_state_survives_crash(device: MemoryDevice) -> None:
    vol = await Volume.open(device)
    f = vol.create(ROOT, b"f", FILE, 0, 0)
    await vol.write(f.ino, 0, b"durable")
    await vol.fsync(f.ino, datasync=True)
    vol.create(ROOT, b"unsynced", FILE, 0, 0)
    after = await Volume.open(device.crashed())
    assert await after.read(f.ino, 0, 7) == b"durable"
    assert _names(after, ROOT) == [b".", b"..", b"f"]


class PowerLoss(Exception):
    """The device lost power."""


def _lose_power_at_journal_flush(device: MemoryDevice) -> None:
    """Make the device fail the first flush that would make journal blocks durable."""
    flush = device.flush
    journal = range(GEOMETRY.journal_start, GEOMETRY.journal_start + GEOMETRY.journal_blocks)

    async def flush_until_power_loss() -> None:
        if any(blockno in journal for blockno in device.unflushed_blocks()):
            raise PowerLoss()
        await flush()

    device.flush = flush_until_power_loss  # type: ignore[method-assign]


async def _every_crash_image(device: MemoryDevice) -> list[Volume]:
    """Return the volume of each crash image: any subset of the unflushed writes kept."""
    unflushed = device.unflushed_writes
    assert unflushed >= 1
    volumes = []
    for count in range(unflushed + 1):
        for keep in itertools.combinations(range(unflushed), count):
            volumes.append(await Volume.open(device.crashed(keep)))
    return volumes


async def test_crash_never_shows_old_owner_data(device: MemoryDevice) -> None:
    vol = await Volume.open(device)
    old = vol.create(ROOT, b"old", FILE, 0, 0)
    await vol.write(old.ino, 0, b"\x66" * (60 * BLOCK_SIZE))
    await vol.sync()
    vol.unlink(ROOT, b"old")
    vol.forget(old.ino, 1)
    await vol.sync()
    new = vol.create(ROOT, b"new", FILE, 0, 0)
    await vol.write(new.ino, 0, b"\x77" * (4 * BLOCK_SIZE))
    _lose_power_at_journal_flush(device)
    with pytest.raises(PowerLoss):
        await vol.sync()
    for after in await _every_crash_image(device):
        try:
            data = await after.read(new.ino, 0, 4 * BLOCK_SIZE)
        except NotFound:
            continue
        assert data == b"\x77" * (4 * BLOCK_SIZE)


async def test_crash_never_shows_bytes_past_eof(device: MemoryDevice) -> None:
    vol = await Volume.open(device)
    f = vol.create(ROOT, b"f", FILE, 0, 0)
    await vol.write(f.ino, 0, b"\x55" * (2 * BLOCK_SIZE))
    await vol.sync()
    await vol.setattr(f.ino, size=1000)
    _lose_power_at_journal_flush(device)
    with pytest.raises(PowerLoss):
        await vol.sync()
    for after in await _every_crash_image(device):
        size = after.getattr(f.ino).size
        data = await after.read(f.ino, 0, size)
        if size == 1000:
            await after.setattr(f.ino, size=2 * BLOCK_SIZE)
            assert await after.read(f.ino, 0, 2 * BLOCK_SIZE) == data + bytes(2 * BLOCK_SIZE - 1000)
            assert data == b"\x55" * 1000
        else:
            # The truncate record was lost; only its zeroing of the tail may have landed.
            assert size == 2 * BLOCK_SIZE
            assert data[:1000] == b"\x55" * 1000
            assert data[BLOCK_SIZE:] == b"\x55" * BLOCK_SIZE
    assert await check_volume(device.crashed(range(device.unflushed_writes))) == []


async def test_many_operations_wrap_journal(vol: Volume, device: MemoryDevice) -> None:
    d = vol.mkdir(ROOT, b"d", DIR, 0, 0)
    for index in range(600):
        vol.create(d.ino, b"file-%04d" % index, FILE, 0, 0)
        vol.setxattr(ROOT, b"user.pad", b"%04d" % index * 250)
        if index % 3 == 0:
            vol.unlink(d.ino, b"file-%04d" % (index // 2))
        await vol.sync()
    assert vol.statistics()["journal"]["checkpoint_counter"] > 2
    expected = _names(vol, d.ino)
    crashed = await Volume.open(device.crashed())
    assert _names(crashed, d.ino) == expected


async def test_statfs_counts_data_region(vol: Volume) -> None:
    stats = vol.statfs()
    assert stats["block_size"] == BLOCK_SIZE
    assert stats["blocks"] == SIZE // BLOCK_SIZE
    assert stats["free"] == SIZE // BLOCK_SIZE
    assert stats["name_max"] == 255
    vol.create(ROOT, b"f", FILE, 0, 0)
    assert stats["free_files"] - vol.statfs()["free_files"] == 1


async def test_concurrent_partial_writes_keep_both(vol: Volume, device: MemoryDevice) -> None:
    f = vol.create(ROOT, b"f", FILE, 0, 0)
    await vol.write(f.ino, 0, b"." * BLOCK_SIZE)
    vol = await _reopen(vol, device)

    async def write_at(offset: int, data: bytes) -> None:
        await vol.write(f.ino, offset, data)

    async with trio.open_nursery() as nursery:
        for index in range(8):
            nursery.start_soon(write_at, index * 100, b"%d" % index * 10)
    data = await vol.read(f.ino, 0, 800)
    for index in range(8):
        assert data[index * 100 : index * 100 + 10] == b"%d" % index * 10
    await vol.close()


async def test_background_flush_makes_records_durable(
    device: MemoryDevice, autojump_clock: trio.abc.Clock
) -> None:
    async with trio.open_nursery() as nursery:
        vol = await Volume.open(device, nursery=nursery)
        vol.create(ROOT, b"f", FILE, 0, 0)
        assert vol.statistics()["journal"]["durable_seq"] < vol.statistics()["journal"]["seq"]
        await trio.sleep(1.5)
        journal = vol.statistics()["journal"]
        assert journal["durable_seq"] == journal["seq"]
        await vol.close()
    after = await Volume.open(device.crashed())
    assert _names(after, ROOT) == [b".", b"..", b"f"]


async def test_sequential_reads_read_ahead(vol: Volume, device: MemoryDevice) -> None:
    f = vol.create(ROOT, b"f", FILE, 0, 0)
    data = bytes(range(256)) * (32 * BLOCK_SIZE // 256)
    await vol.write(f.ino, 0, data)
    vol = await _reopen(vol, device)
    reads = device.stats.read_calls
    chunk = 2 * BLOCK_SIZE
    for offset in range(0, len(data), chunk):
        assert await vol.read(f.ino, offset, chunk) == data[offset : offset + chunk]
    # The first read misses alone; each later miss brings READ_AHEAD_BLOCKS more along.
    assert device.stats.read_calls - reads <= 3
    await vol.close()


@pytest.mark.parametrize("seed", range(5))
async def test_random_operations_match_model(seed: int) -> None:
    rnd = random.Random(seed)
    device = await _formatted(8 * MIB)
    limits = {"cache_bytes": 4 * MIB, "dirty_bytes": MIB}
    vol = await Volume.open(device, **limits)
    files: dict[bytes, int] = {}
    model: dict[bytes, bytearray] = {}
    for step in range(600):
        choice = rnd.random()
        if choice < 0.05 or not files:
            name = b"f%d" % step
            files[name] = vol.create(ROOT, name, FILE, 0, 0).ino
            model[name] = bytearray()
            continue
        name = rnd.choice(sorted(files))
        ino, expected = files[name], model[name]
        if choice < 0.55:
            offset = rnd.randrange(0, 12 * BLOCK_SIZE)
            length = rnd.choice([1, 100, BLOCK_SIZE, BLOCK_SIZE + 7, rnd.randrange(1, 300000)])
            data = bytes([rnd.randrange(256)]) * length
            try:
                await vol.write(ino, offset, data)
            except NoSpace:
                continue
            expected.extend(bytes(max(0, offset + length - len(expected))))
            expected[offset : offset + length] = data
        elif choice < 0.7:
            size = rnd.randrange(0, 600000)
            await vol.setattr(ino, size=size)
            del expected[size:]
            expected.extend(bytes(size - len(expected)))
        elif choice < 0.75:
            vol.unlink(ROOT, name)
            vol.forget(ino, 1)
            del files[name], model[name]
        elif choice < 0.9:
            offset, length = rnd.randrange(0, 700000), rnd.randrange(0, 300000)
            assert await vol.read(ino, offset, length) == expected[offset : offset + length]
        elif choice < 0.95:
            await vol.sync()
            assert await check_volume(device.crashed()) == []
        else:
            vol = await _reopen(vol, device)
            for known in files.values():
                vol.remember(known)
        if name in files:
            assert vol.getattr(ino).size == len(expected)
    for name, ino in files.items():
        assert await vol.read(ino, 0, len(model[name])) == model[name]
    await vol.close()
    assert await check_volume(device) == []


async def test_stale_bytes_past_eof_read_as_zeros(vol: Volume, device: MemoryDevice) -> None:
    f = vol.create(ROOT, b"f", FILE, 0, 0)
    g = vol.create(ROOT, b"g", FILE, 0, 0)
    for ino in (f.ino, g.ino):
        await vol.write(ino, 0, b"\x33" * 1000)
    vol = await _reopen(vol, device)
    # As a crash can leave them: bytes past EOF that a lost record would have covered.
    for ino in (f.ino, g.ino):
        [blockno] = vol._tree.inodes[ino].blocks.values()  # type: ignore[union-attr]
        device.poke(blockno, b"\x33" * 1000 + b"\xee" * (BLOCK_SIZE - 1000))
    vol = await _reopen(vol, device)
    await vol.setattr(f.ino, size=3000)
    assert await vol.read(f.ino, 0, 3000) == b"\x33" * 1000 + bytes(2000)
    await vol.write(g.ino, 5000, b"end")
    assert await vol.read(g.ino, 0, 5003) == b"\x33" * 1000 + bytes(4000) + b"end"
    await vol.write(g.ino, 200_000, b"far")
    assert await vol.read(g.ino, 5003, BLOCK_SIZE - 5003) == bytes(BLOCK_SIZE - 5003)
    vol = await _reopen(vol, device)
    assert await vol.read(f.ino, 0, 3000) == b"\x33" * 1000 + bytes(2000)
    await vol.close()


async def test_metadata_space_full_then_freed() -> None:
    device = MemoryDevice(Geometry.for_size(SIZE, JOURNAL, 4 * BLOCK_SIZE).nblocks)
    await Volume.format(device, "u", SIZE, journal_bytes=JOURNAL, checkpoint_bytes=4 * BLOCK_SIZE)
    vol = await Volume.open(device)
    created = []
    for index in range(10_000):
        try:
            created.append(vol.create(ROOT, b"%0200d" % index, FILE, 0, 0).ino)
        except NoSpace:
            break
        # Checkpoints must keep succeeding up to the point where creates fail.
        if index % 50 == 0:
            await vol.sync()
    else:
        pytest.fail("the metadata space never filled up")
    assert len(created) > 100
    await vol.sync()
    for index in range(len(created) // 2):
        vol.unlink(ROOT, b"%0200d" % index)
        vol.forget(created[index], 1)
    await vol.close()
    vol = await Volume.open(device)
    vol.create(ROOT, b"after", FILE, 0, 0)
    await vol.close()
    assert await check_volume(device) == []


class SlowTrimDevice(MemoryDevice):
    """A MemoryDevice whose trims wait until the gate opens."""

    def __init__(self, nblocks: int) -> None:
        super().__init__(nblocks)
        self.trim_gate = trio.Event()
        self.trim_gate.set()

    async def trim_blocks(self, blocknos: Sequence[int]) -> None:
        await self.trim_gate.wait()
        await super().trim_blocks(blocknos)


async def test_writers_wait_for_blocks_being_trimmed() -> None:
    device = SlowTrimDevice(GEOMETRY.nblocks)
    await Volume.format(device, "u", SIZE, journal_bytes=JOURNAL, checkpoint_bytes=SLOT)
    vol = await Volume.open(device)
    full = vol.create(ROOT, b"full", FILE, 0, 0)
    await vol.write(full.ino, 0, b"f" * SIZE)
    vol.unlink(ROOT, b"full")
    assert vol.statfs()["free"] == SIZE // BLOCK_SIZE
    device.trim_gate = trio.Event()
    results = []

    async def write(name: bytes) -> None:
        attr = vol.create(ROOT, name, FILE, 0, 0)
        results.append(await vol.write(attr.ino, 0, b"w" * MIB))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write, b"a")
        await trio.testing.wait_all_tasks_blocked()
        # The first writer now waits for the trim of the freed blocks; the second one must
        # wait for them too rather than fail with NoSpace.
        nursery.start_soon(write, b"b")
        await trio.testing.wait_all_tasks_blocked()
        device.trim_gate.set()
    assert results == [MIB, MIB]
    await vol.close()
