"""Runs of whole blocks written with O_DIRECT, and the buffered writes they fall back to."""

import errno
import fcntl
import os
import shutil
import subprocess
import zlib

import pytest

from pxfs import directwrite
from pxfs.directwrite import MIN_RUN_BLOCKS
from pxfs.store import BLOCK_SIZE, ReplicaStore

VOL = "5520913374"
RUN = MIN_RUN_BLOCKS * 2


def block(seed: int) -> bytes:
    """A block whose content depends on `seed`."""
    return seed.to_bytes(4, "little") * (BLOCK_SIZE // 4)


@pytest.fixture
async def store(tmp_path):
    store = ReplicaStore(tmp_path / "replicas")
    await store.create(VOL, 1024)
    yield store
    await store.aclose()


def cached_bytes(store: ReplicaStore) -> int:
    """Bytes of the replica's data file in the page cache, as fincore(1) reports them."""
    if shutil.which("fincore") is None:
        pytest.skip("fincore (util-linux) is not installed")
    path = store.root / VOL / "data"
    command = ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)]
    return int(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def run_of(first: int, seed: int, count: int = RUN) -> list[list[object]]:
    return [[first + n, block(seed + n)] for n in range(count)]


async def test_run_skips_page_cache(store):
    # One block goes through the page cache, which shows that fincore counts cached pages.
    await store.write(VOL, 0, 1, [[500, block(500)]])
    assert cached_bytes(store) == BLOCK_SIZE
    await store.write(VOL, 0, 2, run_of(0, 0))
    assert cached_bytes(store) == BLOCK_SIZE
    assert await store.read(VOL, list(range(RUN))) == [block(n) for n in range(RUN)]
    assert (await store.info(VOL))["used_blocks"] == RUN + 1
    assert await store.verify(VOL) == []


async def test_short_run_uses_page_cache(store):
    await store.write(VOL, 0, 1, run_of(0, 0, MIN_RUN_BLOCKS - 1))
    assert cached_bytes(store) == (MIN_RUN_BLOCKS - 1) * BLOCK_SIZE


async def test_overwrite_run_uses_page_cache(store):
    await store.write(VOL, 0, 1, run_of(0, 0))
    assert cached_bytes(store) == 0
    # Written blocks are overwritten one by one through the page cache, so that a crash leaves
    # at most one block with new data under its old record.
    await store.write(VOL, 0, 2, run_of(0, 100))
    assert cached_bytes(store) == RUN * BLOCK_SIZE
    assert await store.read(VOL, list(range(RUN))) == [block(100 + n) for n in range(RUN)]
    assert (await store.info(VOL))["used_blocks"] == RUN


async def test_trimmed_run_goes_direct(store):
    await store.write(VOL, 0, 1, run_of(0, 0, MIN_RUN_BLOCKS - 1))
    await store.trim(VOL, 0, list(range(MIN_RUN_BLOCKS - 1)))
    await store.write(VOL, 0, 2, run_of(0, 100))
    assert cached_bytes(store) == 0
    assert await store.read(VOL, list(range(RUN))) == [block(100 + n) for n in range(RUN)]
    assert (await store.info(VOL))["used_blocks"] == RUN


async def test_run_longer_than_the_buffer(store):
    count = directwrite.MAX_RUN_BLOCKS + MIN_RUN_BLOCKS + 3
    await store.write(VOL, 0, 1, run_of(100, 7, count))
    blocknos = list(range(100, 100 + count))
    assert await store.read(VOL, blocknos) == [block(7 + n) for n in range(count)]
    assert (await store.info(VOL))["used_blocks"] == count


async def test_direct_and_buffered_writes_agree(store):
    await store.write(VOL, 0, 1, run_of(0, 0))
    old = block(3)
    new = old[:100] + b"patched" + old[107:]
    patch = [3, 100, b"patched", zlib.crc32(old), zlib.crc32(new)]
    assert await store.patch(VOL, 0, 2, [patch]) == []
    assert await store.read(VOL, [3]) == [new]
    # The patch left block 3 in the page cache. After a trim, the run goes direct again, and a
    # buffered read must return its bytes, not the cached ones.
    await store.trim(VOL, 0, list(range(RUN)))
    await store.write(VOL, 0, 3, run_of(0, 50))
    assert cached_bytes(store) == 0
    assert await store.read(VOL, list(range(RUN))) == [block(50 + n) for n in range(RUN)]
    assert await store.verify(VOL) == []


async def test_rejected_open_uses_page_cache(store, monkeypatch):
    real_open = os.open

    def open_without_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(directwrite.os, "open", open_without_direct)
    await store.write(VOL, 0, 1, run_of(0, 0))
    assert cached_bytes(store) == RUN * BLOCK_SIZE
    assert await store.read(VOL, list(range(RUN))) == [block(n) for n in range(RUN)]


async def test_rejected_write_turns_direct_off(store, monkeypatch):
    real_pwrite = os.pwrite
    calls = []

    def reject_direct(fd, data, offset):
        if not is_direct(fd):
            return real_pwrite(fd, data, offset)
        calls.append(offset)
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(directwrite.os, "pwrite", reject_direct)
    await store.write(VOL, 0, 1, run_of(0, 0))
    await store.write(VOL, 0, 2, run_of(RUN, 0))
    assert calls == [0]
    assert await store.read(VOL, list(range(2 * RUN))) == [block(n % RUN) for n in range(2 * RUN)]
    assert (await store.info(VOL))["used_blocks"] == 2 * RUN


async def test_short_direct_write_rewritten(store, monkeypatch):
    real_pwrite = os.pwrite

    def write_half(fd, data, offset):
        if is_direct(fd):
            data = data[: len(data) // 2]
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(directwrite.os, "pwrite", write_half)
    await store.write(VOL, 0, 1, run_of(0, 0))
    assert await store.read(VOL, list(range(RUN))) == [block(n) for n in range(RUN)]
    assert (await store.info(VOL))["used_blocks"] == RUN
