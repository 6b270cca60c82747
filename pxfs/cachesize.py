"""Sizing a mount child's block cache to the memory the host has available.

A fixed cache is either too small to hold a working set or too large for a host with many
volumes. So each mount child sizes its own cache from /proc/meminfo, once a second. While
MemAvailable stays above a high mark, the cache may grow by the surplus, up to a ceiling. When
MemAvailable falls below a low mark, it shrinks by the deficit, down to a floor, and the freed
blocks are given back to the kernel at once. The children of one host do not talk to each
other: each reacts to the same figure, so under pressure they all shrink, and the one that
reads most keeps most.

The marks are fractions of MemTotal. The kernel counts its page cache as available, so the
block cache gives way to processes, not to the page cache of pxd's data files.

A mount child in a cgroup with a memory limit (a container, a systemd slice) uses the tighter of
the host's figures and the cgroup's: the limit counts as MemTotal and the room below it as
MemAvailable (pxfs/cgroups.py).

NOTE: the children of one host grow by the same surplus at once, so together they can
overshoot the high mark before the low mark shrinks them.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio

from pxfs.cgroups import CgroupMemory
from pxfs.volume.blockcache import MIB, BlockCache

log = logging.getLogger(__name__)

GIB = 1024 * MIB
MEMINFO = "/proc/meminfo"
#: Seconds between two reads of MemAvailable.
INTERVAL = 1.0
#: The cache of one volume never shrinks below this, nor grows above CEILING_SHARE of MemTotal
#: or CEILING_MAX.
FLOOR = 64 * MIB
CEILING_SHARE = 1 / 8
CEILING_MAX = 4 * GIB
#: The cache shrinks below LOW_SHARE of MemTotal available, and may grow above HIGH_SHARE.
LOW_SHARE = 0.10
HIGH_SHARE = 0.20


@dataclass(frozen=True)
class CachePolicy:
    """The floor, ceiling and marks, in bytes, that a cache's size follows."""

    floor: int
    ceiling: int
    low: int
    high: int

    @classmethod
    def for_host(cls, total: int) -> CachePolicy:
        """Return the policy for a host with `total` bytes of memory."""
        ceiling = max(FLOOR, min(int(total * CEILING_SHARE), CEILING_MAX))
        return cls(FLOOR, ceiling, int(total * LOW_SHARE), int(total * HIGH_SHARE))

    def next_capacity(self, capacity: int, cached: int, available: int) -> int:
        """Return the capacity to set, given the current one, the bytes cached and available."""
        if available < self.low:
            target = max(self.floor, min(capacity, cached) - (self.low - available))
        elif available > self.high:
            target = capacity + (available - self.high)
        else:
            target = capacity
        # The starting capacity may be above the ceiling of a small host.
        return min(self.ceiling, target)


def read_meminfo(path: str = MEMINFO) -> tuple[int, int]:
    """Return MemTotal and MemAvailable in bytes.

    Raises KeyError when one is missing and ValueError when one has no number in kB.
    """
    values: dict[str, int] = {}
    with open(path, encoding="ascii") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("MemTotal", "MemAvailable"):
                fields = rest.split()
                if not fields:
                    raise ValueError(f"{name} has no value")
                values[name] = int(fields[0]) * 1024
    return values["MemTotal"], values["MemAvailable"]


def _trim_function() -> Callable[[int], int] | None:
    """Return glibc's malloc_trim, or None on a C library without it."""
    # The process's own symbols include the C library's, with no search for its file.
    try:
        function: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return function


_MALLOC_TRIM = _trim_function()


def give_back_freed_memory() -> None:
    """Return the free pages of the C heap to the kernel.

    A block is 64 KiB, below glibc's threshold for a mapping of its own, so freed blocks stay in
    the heap, counted in the process's resident memory, until malloc_trim releases them.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


async def fit_cache_to_memory(
    cache: BlockCache,
    *,
    meminfo: str = MEMINFO,
    cgroup: CgroupMemory | None = None,
    interval: float = INTERVAL,
) -> None:
    """Resize `cache` to the available memory every `interval` seconds, until cancelled.

    The figures are the host's from `meminfo`, or those of `cgroup` where they are tighter.
    """
    try:
        read_meminfo(meminfo)
    except (OSError, KeyError, ValueError) as exc:
        log.warning(
            "block cache stays at %d MiB: failed to read %s: %s",
            cache.capacity_bytes // MIB, meminfo, exc,
        )  # fmt: skip
        return
    _log_cgroup_limit(cgroup)
    while True:
        try:
            total, available = _memory_now(meminfo, cgroup)
        except (OSError, KeyError, ValueError) as exc:
            log.debug("block cache size unchanged: failed to read the memory figures: %s", exc)
        else:
            policy = CachePolicy.for_host(total)
            capacity = cache.capacity_bytes
            target = policy.next_capacity(capacity, cache.cached_bytes, available)
            if target != capacity:
                cache.resize(target)
                if target < capacity:
                    give_back_freed_memory()
        await trio.sleep(interval)


def _log_cgroup_limit(cgroup: CgroupMemory | None) -> None:
    if cgroup is None:
        return
    try:
        limit = cgroup.read()
    except (OSError, ValueError) as exc:
        log.warning("failed to read the memory limit of cgroup %s: %s", cgroup.directories[0], exc)
        return
    if limit is not None:
        log.info(
            "block cache follows the memory limit of cgroup %s: %d MiB",
            cgroup.directories[0], limit.limit // MIB,
        )  # fmt: skip


def _memory_now(meminfo: str, cgroup: CgroupMemory | None) -> tuple[int, int]:
    """Return the total and available bytes: the host's, or the cgroup's where they are lower."""
    total, available = read_meminfo(meminfo)
    limit = cgroup.read() if cgroup is not None else None
    if limit is None:
        return total, available
    return min(total, limit.limit), min(available, limit.available)
