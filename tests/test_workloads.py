"""Real trees, real programs and crashes on a mounted volume of a real node."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nodeproc import Node, is_mountpoint

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for FUSE mounts")

GIB = 1 << 30
WRITER = Path(__file__).parent / "crash_writer.py"


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    node = Node(tmp_path / "node")
    node.root.mkdir()
    node.start()
    yield node
    node.cleanup(sorted(tmp_path.glob("mnt*")))


def stdlib_tree() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def ignore_site_packages(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if n in ("site-packages", "dist-packages")]


def compare_trees(source: Path, copy: Path) -> int:
    """Assert both trees hold the same files, bytes, modes, sizes and mtimes; count files."""
    count = 0
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages")]
        relative = Path(dirpath).relative_to(source)
        copied_names = set(os.listdir(copy / relative))
        assert copied_names == set(dirnames) | set(filenames), relative
        for name in filenames:
            original, duplicate = Path(dirpath) / name, copy / relative / name
            a, b = original.lstat(), duplicate.lstat()
            assert a.st_mode == b.st_mode, original
            assert a.st_size == b.st_size, original
            if not original.is_symlink():
                assert a.st_mtime_ns == b.st_mtime_ns, original
                assert original.read_bytes() == duplicate.read_bytes(), original
            else:
                assert os.readlink(original) == os.readlink(duplicate)
            count += 1
    return count


def remount(node: Node, name: str, mountpoint: Path) -> None:
    node.call("volume.unmount", name, str(mountpoint))
    node.call("volume.detach", name)
    check = node.call("volume.check", name)
    assert check["clean"], check["problems"]
    node.call("volume.attach", name)
    node.call("volume.mount", name, str(mountpoint))


def test_stdlib_copy_survives_remount(node: Node, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    node.mount_volume("tree", mountpoint, size=2 * GIB)
    shutil.copytree(
        stdlib_tree(), mountpoint / "stdlib", symlinks=True, ignore=ignore_site_packages
    )
    remount(node, "tree", mountpoint)
    count = compare_trees(stdlib_tree(), mountpoint / "stdlib")
    assert count > 1000


def test_git_repository_fsck_after_remount(node: Node, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    node.mount_volume("git", mountpoint, size=2 * GIB)
    work = mountpoint / "repo"
    shutil.copytree(stdlib_tree() / "json", work / "json")
    shutil.copytree(stdlib_tree() / "email", work / "email")
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.invalid",
    }

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(work), *args], check=True, env=env, capture_output=True, text=True
        ).stdout

    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "stdlib subset")
    head = git("rev-parse", "HEAD").strip()
    remount(node, "git", mountpoint)
    subprocess.run(
        ["git", "-C", str(work), "fsck", "--full", "--strict"], check=True, capture_output=True
    )
    assert git("rev-parse", "HEAD").strip() == head
    assert git("status", "--porcelain") == ""


def write_sqlite_rows(path: Path, rows: int) -> None:
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, payload TEXT)")
    batch = 10_000
    for start in range(0, rows, batch):
        connection.executemany(
            "INSERT INTO t (id, payload) VALUES (?, ?)",
            ((i, f"row {i} " + "p" * (i % 200)) for i in range(start, start + batch)),
        )
        connection.commit()
    connection.close()


def check_sqlite(path: Path, rows: int) -> None:
    connection = sqlite3.connect(path)
    assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert connection.execute("SELECT count(*) FROM t").fetchone()[0] == rows
    connection.close()


def test_sqlite_survives_remount_and_pxd_kill(node: Node, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    node.mount_volume("db", mountpoint, size=2 * GIB)
    database = mountpoint / "rows.db"
    write_sqlite_rows(database, 100_000)
    remount(node, "db", mountpoint)
    check_sqlite(database, 100_000)

    node.kill_pxd()
    restart_after_crash(node, mountpoint)
    check_sqlite(database, 100_000)


def restart_after_crash(node: Node, mountpoint: Path) -> None:
    """Start pxd again after a kill and wait until it has the volume mounted again."""
    node.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if os.path.ismount(mountpoint) and node.call("volume.list", {})[0]["mounted"]:
            return
        time.sleep(0.2)
    raise AssertionError("pxd did not remount the volume after a restart:\n" + node.log_text())


def start_writer(mountpoint: Path, manifest: Path, seed: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(WRITER), str(mountpoint), str(manifest), str(seed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_for_fsyncs(manifest: Path, count: int, writer: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if manifest.exists() and len(manifest.read_text().splitlines()) >= count:
            return
        assert writer.poll() is None, "the writer stopped early"
        time.sleep(0.05)
    raise AssertionError(f"the writer did not reach {count} fsyncs")


def verify_manifest(mountpoint: Path, manifest: Path) -> int:
    """Check every fsync'd file named in the manifest by checksum; return how many."""
    lines = manifest.read_text().splitlines()
    for line in lines:
        name, digest = line.split()
        data = (mountpoint / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest, name
    return len(lines)


def stop_writer(writer: subprocess.Popen[bytes]) -> None:
    if writer.poll() is None:
        writer.kill()
    writer.wait(timeout=60)


def check_after_crash(node: Node, mountpoint: Path, manifest: Path) -> None:
    assert verify_manifest(mountpoint, manifest) > 0
    node.call("volume.unmount", "crash", str(mountpoint))
    node.call("volume.detach", "crash")
    result = node.pxctl("volume", "check", "crash")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("fsyncs", [3, 40])
def test_pxd_kill_during_writes_keeps_fsynced_files(
    node: Node, tmp_path: Path, fsyncs: int
) -> None:
    mountpoint, manifest = tmp_path / "mnt", tmp_path / "manifest"
    node.mount_volume("crash", mountpoint)
    writer = start_writer(mountpoint, manifest, seed=fsyncs)
    try:
        wait_for_fsyncs(manifest, fsyncs, writer)
        node.kill_pxd()
    finally:
        stop_writer(writer)
    restart_after_crash(node, mountpoint)
    check_after_crash(node, mountpoint, manifest)


def test_mount_child_kill_during_writes_keeps_fsynced_files(node: Node, tmp_path: Path) -> None:
    mountpoint, manifest = tmp_path / "mnt", tmp_path / "manifest"
    node.mount_volume("crash", mountpoint)
    writer = start_writer(mountpoint, manifest, seed=7)
    try:
        wait_for_fsyncs(manifest, 20, writer)
        [pid] = node.mount_child_pids()
        os.kill(pid, signal.SIGKILL)
    finally:
        stop_writer(writer)
    deadline = time.monotonic() + 60
    while not (not is_mountpoint(mountpoint) or _alive_mount(mountpoint)):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    while not _alive_mount(mountpoint):
        assert time.monotonic() < deadline, "pxd did not remount after the child died"
        time.sleep(0.2)
    check_after_crash(node, mountpoint, manifest)


def _alive_mount(mountpoint: Path) -> bool:
    try:
        os.listdir(mountpoint)
        return os.path.ismount(mountpoint)
    except OSError:
        return False
