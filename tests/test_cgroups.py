"""Tests of pxfs.cgroups: the memory limit of a process's cgroup, on fake cgroup trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from pxfs.cgroups import MemoryLimit, find_cgroup_memory

MIB = 1024 * 1024
GIB = 1024 * MIB
#: What cgroup v1 reports for a cgroup without a limit.
V1_NO_LIMIT = 9223372036854771712


def _proc_cgroup(tmp_path: Path, text: str) -> str:
    path = tmp_path / "cgroup"
    path.write_text(text)
    return str(path)


def _v2_level(directory: Path, limit: str | None, current: int = 0, inactive: int = 0) -> None:
    """Write the memory files of one cgroup v2 level; a None limit writes no memory.max."""
    directory.mkdir(parents=True, exist_ok=True)
    if limit is not None:
        (directory / "memory.max").write_text(f"{limit}\n")
    (directory / "memory.current").write_text(f"{current}\n")
    (directory / "memory.stat").write_text(f"anon 1\nfile 2\ninactive_file {inactive}\n")


def _v2_tree(tmp_path: Path) -> Path:
    root = tmp_path / "fs"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    return root


def _v1_cgroup(directory: Path, limit: int, usage: int, inactive: int = 0) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "memory.usage_in_bytes").write_text(f"{usage}\n")
    (directory / "memory.stat").write_text(
        f"cache 5\nhierarchical_memory_limit {limit}\ntotal_inactive_file {inactive}\n"
    )


def test_v2_limit_of_own_cgroup(tmp_path: Path) -> None:
    root = _v2_tree(tmp_path)
    _v2_level(root / "a", "max")
    _v2_level(root / "a" / "b", str(GIB), current=600 * MIB, inactive=100 * MIB)
    cgroup = find_cgroup_memory(_proc_cgroup(tmp_path, "0::/a/b\n"), str(root))
    assert cgroup is not None
    assert cgroup.read() == MemoryLimit(GIB, 524 * MIB)


def test_v2_tighter_parent_wins(tmp_path: Path) -> None:
    root = _v2_tree(tmp_path)
    _v2_level(root / "a", str(512 * MIB), current=450 * MIB)
    _v2_level(root / "a" / "b", str(GIB), current=400 * MIB)
    cgroup = find_cgroup_memory(_proc_cgroup(tmp_path, "0::/a/b\n"), str(root))
    assert cgroup is not None
    assert cgroup.read() == MemoryLimit(512 * MIB, 62 * MIB)


def test_v2_without_limit(tmp_path: Path) -> None:
    root = _v2_tree(tmp_path)
    _v2_level(root / "a", "max")
    _v2_level(root / "a" / "b", None)
    cgroup = find_cgroup_memory(_proc_cgroup(tmp_path, "0::/a/b\n"), str(root))
    assert cgroup is not None
    assert cgroup.read() is None


def test_v2_container_limit_on_top(tmp_path: Path) -> None:
    # The host path of the cgroup does not exist in the container's view, and its limit is
    # on the top directory.
    root = _v2_tree(tmp_path)
    _v2_level(root, str(2 * GIB), current=GIB)
    cgroup = find_cgroup_memory(_proc_cgroup(tmp_path, "0::/system.slice/x.scope\n"), str(root))
    assert cgroup is not None
    assert cgroup.read() == MemoryLimit(2 * GIB, GIB)


def test_v2_usage_above_limit_leaves_no_room(tmp_path: Path) -> None:
    root = _v2_tree(tmp_path)
    _v2_level(root / "a", str(GIB), current=GIB + MIB)
    cgroup = find_cgroup_memory(_proc_cgroup(tmp_path, "0::/a\n"), str(root))
    assert cgroup is not None
    assert cgroup.read() == MemoryLimit(GIB, 0)


def test_v1_limit_in_hybrid_layout(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    _v1_cgroup(root / "memory" / "jobs" / "j1", 2 * GIB, int(1.5 * GIB), inactive=100 * MIB)
    text = "9:name=systemd:/\n4:memory:/jobs/j1\n1:cpu:/\n0::/\n"
    cgroup = find_cgroup_memory(_proc_cgroup(tmp_path, text), str(root))
    assert cgroup is not None
    assert cgroup.version == 1
    assert cgroup.read() == MemoryLimit(2 * GIB, 612 * MIB)


def test_v1_without_limit(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    _v1_cgroup(root / "memory" / "jobs", V1_NO_LIMIT, GIB)
    cgroup = find_cgroup_memory(_proc_cgroup(tmp_path, "4:memory:/jobs\n"), str(root))
    assert cgroup is not None
    assert cgroup.read() is None


def test_v1_container_falls_back_to_top(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    _v1_cgroup(root / "memory", GIB, 256 * MIB)
    cgroup = find_cgroup_memory(_proc_cgroup(tmp_path, "4:memory:/docker/abc\n"), str(root))
    assert cgroup is not None
    assert cgroup.read() == MemoryLimit(GIB, 768 * MIB)


@pytest.mark.parametrize(
    "text",
    ["", "0::/a\n", "4:cpu:/a\n", "not a cgroup line\n"],
    ids=["empty", "v2-without-controllers-file", "v1-without-memory", "malformed"],
)
def test_no_memory_cgroup(tmp_path: Path, text: str) -> None:
    root = tmp_path / "fs"
    root.mkdir()
    assert find_cgroup_memory(_proc_cgroup(tmp_path, text), str(root)) is None


def test_missing_proc_file(tmp_path: Path) -> None:
    assert find_cgroup_memory(str(tmp_path / "missing"), str(tmp_path)) is None


def test_limited_level_with_malformed_file(tmp_path: Path) -> None:
    root = _v2_tree(tmp_path)
    _v2_level(root / "a", str(GIB))
    (root / "a" / "memory.current").write_text("lots\n")
    cgroup = find_cgroup_memory(_proc_cgroup(tmp_path, "0::/a\n"), str(root))
    assert cgroup is not None
    with pytest.raises(ValueError):
        cgroup.read()


def test_this_host_reads_without_error() -> None:
    cgroup = find_cgroup_memory()
    if cgroup is None:
        pytest.skip("this host has no memory cgroup")
    limit = cgroup.read()
    if limit is not None:
        assert 0 <= limit.available
        assert limit.limit > 0
