"""The memory limit of the cgroup that a process runs in, and what is left below it.

A mount child in a container or a systemd slice with a memory limit reads the host's figures
in /proc/meminfo. Past the limit the kernel reclaims and then kills inside the cgroup, however
much the host has free. So the block cache also follows the cgroup's figures.

Both cgroup versions are read:

- cgroup v2: each level of the process's cgroup path, from its own cgroup up to the root,
  may set `memory.max`. A level's room is its limit minus `memory.current`, plus the
  `inactive_file` of its `memory.stat`, page cache that the kernel reclaims before it fails an
  allocation. The tightest level counts.
- cgroup v1 (the memory controller on a hierarchy of its own, also in the hybrid layout): the
  `hierarchical_memory_limit` of the process's cgroup, the tightest limit on its path, minus
  `memory.usage_in_bytes`, plus `total_inactive_file`.

NOTE: under cgroup v1 the usage is the process's own cgroup's, so siblings that share a
tighter parent's limit are not counted, and the room can be larger than it is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PROC_CGROUP = "/proc/self/cgroup"
CGROUP_ROOT = "/sys/fs/cgroup"
#: cgroup v1 writes "no limit" as a number near 2**63, rounded down to a page.
_NO_LIMIT = 2**62


@dataclass(frozen=True)
class MemoryLimit:
    """The tightest memory limit on a cgroup path and the bytes left below it, in bytes."""

    limit: int
    available: int


@dataclass(frozen=True)
class CgroupMemory:
    """The directories whose memory files limit a process, and the cgroup version of them."""

    directories: tuple[Path, ...]
    version: int

    def read(self) -> MemoryLimit | None:
        """Return the tightest limit and its room now, or None if no directory sets a limit.

        Raises OSError or ValueError when a file of a limited directory cannot be read.
        """
        read_level = _read_v2 if self.version == 2 else _read_v1
        limits = [read_level(directory) for directory in self.directories]
        found = [limit for limit in limits if limit is not None]
        if not found:
            return None
        return min(found, key=lambda limit: limit.available)


def _read_v2(directory: Path) -> MemoryLimit | None:
    try:
        text = (directory / "memory.max").read_text().strip()
    except FileNotFoundError:
        # The root cgroup, or a level where the memory controller is not enabled.
        return None
    if text == "max":
        return None
    limit = int(text)
    current = int((directory / "memory.current").read_text())
    inactive = _stat_value(directory / "memory.stat", "inactive_file")
    return MemoryLimit(limit, max(0, limit - current + inactive))


def _read_v1(directory: Path) -> MemoryLimit | None:
    limit = _stat_value(directory / "memory.stat", "hierarchical_memory_limit")
    if limit >= _NO_LIMIT:
        return None
    usage = int((directory / "memory.usage_in_bytes").read_text())
    inactive = _stat_value(directory / "memory.stat", "total_inactive_file")
    return MemoryLimit(limit, max(0, limit - usage + inactive))


def _stat_value(path: Path, key: str) -> int:
    """Return the value of `key` in a memory.stat file; raises ValueError when it is missing."""
    with open(path, encoding="ascii") as f:
        for line in f:
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    raise ValueError(f"{path} has no {key}")


def find_cgroup_memory(
    proc_cgroup: str = PROC_CGROUP, root: str = CGROUP_ROOT
) -> CgroupMemory | None:
    """Return the memory files of this process's cgroup, or None where there are none.

    Reads /proc/self/cgroup. A hierarchy that lists the memory controller is cgroup v1 and wins
    over the unified "0::" line, which then carries no memory controller.
    """
    try:
        lines = Path(proc_cgroup).read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        log.debug("no cgroup memory limit: failed to read %s: %s", proc_cgroup, exc)
        return None
    unified = None
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        number, controllers, path = fields
        if "memory" in controllers.split(","):
            return _v1_directory(Path(root, "memory"), path)
        if number == "0" and not controllers:
            unified = path
    if unified is None:
        return None
    return _unified_levels(Path(root), unified)


def _v1_directory(hierarchy: Path, path: str) -> CgroupMemory | None:
    """Return the cgroup v1 directory of the process's cgroup.

    A container often has its own cgroup mounted at the top of the hierarchy, while
    /proc/self/cgroup gives the path on the host. So the top is the fallback when the path is
    not found.
    """
    for directory in (hierarchy / path.lstrip("/"), hierarchy):
        if (directory / "memory.stat").is_file():
            return CgroupMemory((directory,), version=1)
    return None


def _unified_levels(root: Path, path: str) -> CgroupMemory | None:
    """Return the cgroup v2 directories from the process's own cgroup up to the root."""
    if not (root / "cgroup.controllers").is_file():
        return None
    parts = [part for part in path.split("/") if part]
    directories = tuple(root.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1))
    return CgroupMemory(directories, version=2)
