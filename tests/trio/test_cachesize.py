"""Tests of pxfs.cachesize: the block cache follows the host's available memory."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import trio

from pxfs.cachesize import FLOOR, CachePolicy, fit_cache_to_memory, read_meminfo
from pxfs.cgroups import find_cgroup_memory
from pxfs.volume.blockcache import BlockCache
from pxfs.volume.device import BLOCK_SIZE, MemoryDevice

MIB = 1024 * 1024
GIB = 1024 * MIB


def _write_meminfo(path: Path, total: int, available: int) -> None:
    path.write_text(
        f"MemTotal:       {total // 1024} kB\n"
        f"MemFree:        {available // 2048} kB\n"
        f"MemAvailable:   {available // 1024} kB\n"
        "Buffers:            1024 kB\n"
    )


def test_read_meminfo_in_bytes(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    _write_meminfo(meminfo, 8 * GIB, 3 * GIB)
    assert read_meminfo(str(meminfo)) == (8 * GIB, 3 * GIB)


def test_read_meminfo_without_available(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1024 kB\n")
    with pytest.raises(KeyError):
        read_meminfo(str(meminfo))


def test_policy_scales_with_memory() -> None:
    small = CachePolicy.for_host(256 * MIB)
    assert small.ceiling == FLOOR
    medium = CachePolicy.for_host(8 * GIB)
    assert medium.ceiling == GIB
    assert (medium.low, medium.high) == (int(0.8 * GIB), int(1.6 * GIB))
    assert CachePolicy.for_host(256 * GIB).ceiling == 4 * GIB


@pytest.mark.parametrize(
    ("capacity", "cached", "available", "expected"),
    [
        # Plenty available: grow by the surplus above the high mark, up to the ceiling.
        (256 * MIB, 256 * MIB, 1700 * MIB, 356 * MIB),
        (900 * MIB, 900 * MIB, 6 * GIB, GIB),
        # Between the marks: keep the size.
        (512 * MIB, 512 * MIB, GIB, 512 * MIB),
        # Below the low mark: shrink by the deficit, from what is cached when that is less.
        (512 * MIB, 512 * MIB, 700 * MIB, 412 * MIB),
        (GIB, 300 * MIB, 700 * MIB, 200 * MIB),
        # Never below the floor.
        (512 * MIB, 512 * MIB, 0, FLOOR),
        # Never above the ceiling, even between the marks.
        (2 * GIB, 2 * GIB, GIB, GIB),
    ],
)
def test_next_capacity(capacity: int, cached: int, available: int, expected: int) -> None:
    policy = CachePolicy(floor=FLOOR, ceiling=GIB, low=800 * MIB, high=1600 * MIB)
    assert policy.next_capacity(capacity, cached, available) == expected


async def test_cache_grows_then_shrinks(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    total = 8 * GIB
    _write_meminfo(meminfo, total, 6 * GIB)
    device = MemoryDevice(8192)
    cache = BlockCache(device, capacity_bytes=64 * MIB)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: fit_cache_to_memory(cache, meminfo=str(meminfo), interval=0.01))
        await trio.sleep(0.05)
        assert cache.capacity_bytes == GIB
        await cache.load(range(4096))
        assert cache.cached_bytes == 4096 * BLOCK_SIZE
        # 100 MiB below the low mark: 100 MiB of the least recently used blocks go.
        _write_meminfo(meminfo, total, int(total * 0.10) - 100 * MIB)
        await trio.sleep(0.05)
        assert cache.cached_bytes <= 4096 * BLOCK_SIZE - 100 * MIB
        assert cache.has(4095)
        assert not cache.has(0)
        nursery.cancel_scope.cancel()


async def test_unreadable_meminfo_keeps_size(tmp_path: Path) -> None:
    cache = BlockCache(MemoryDevice(64), capacity_bytes=64 * MIB)
    with trio.fail_after(1):
        await fit_cache_to_memory(cache, meminfo=str(tmp_path / "missing"), interval=0.01)
    assert cache.capacity_bytes == 64 * MIB


def test_read_meminfo_without_value(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:\nMemAvailable:   1024 kB\n")
    with pytest.raises(ValueError, match="MemTotal has no value"):
        read_meminfo(str(meminfo))


async def test_malformed_meminfo_keeps_size(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    meminfo = tmp_path / "meminfo"
    # 1 GiB of 8 available is between the marks, so the size stays.
    _write_meminfo(meminfo, 8 * GIB, GIB)
    cache = BlockCache(MemoryDevice(64), capacity_bytes=256 * MIB)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(fit_cache_to_memory, cache, meminfo=str(meminfo)))
        await trio.sleep(1.5)
        # A line without a number leaves the size, and the task goes on.
        meminfo.write_text("MemTotal:  8388608 kB\nMemAvailable:\n")
        await trio.sleep(3)
        assert cache.capacity_bytes == 256 * MIB
        _write_meminfo(meminfo, 8 * GIB, 0)
        await trio.sleep(3)
        assert cache.capacity_bytes == FLOOR
        nursery.cancel_scope.cancel()


async def test_cgroup_limit_shrinks_cache(tmp_path: Path) -> None:
    # The host has 6 of 8 GiB free, but the cgroup has 50 MiB of its 1 GiB left.
    meminfo = tmp_path / "meminfo"
    _write_meminfo(meminfo, 8 * GIB, 6 * GIB)
    root = tmp_path / "fs"
    (root / "a").mkdir(parents=True)
    (root / "cgroup.controllers").write_text("memory\n")
    (root / "a" / "memory.max").write_text(f"{GIB}\n")
    (root / "a" / "memory.current").write_text(f"{GIB - 50 * MIB}\n")
    (root / "a" / "memory.stat").write_text("inactive_file 0\n")
    proc_cgroup = tmp_path / "cgroup"
    proc_cgroup.write_text("0::/a\n")
    cgroup = find_cgroup_memory(str(proc_cgroup), str(root))
    cache = BlockCache(MemoryDevice(64), capacity_bytes=256 * MIB)
    fit = functools.partial(
        fit_cache_to_memory, cache, meminfo=str(meminfo), cgroup=cgroup, interval=0.01
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fit)
        await trio.sleep(0.05)
        assert cache.capacity_bytes == FLOOR
        nursery.cancel_scope.cancel()
