"""POSIX behaviour of a real mount: the mount child on a FileDevice, driven by real syscalls.

Needs root and /dev/fuse. Every test starts `python -m daemon.mount` as a subprocess, waits for
it to print `ready`, and unmounts in teardown whatever happens.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mountproc import MountChild

MIB = 1024 * 1024
BLOCK = 65536
NOBODY = 65534
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"
)

_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old: Path, new: Path, flags: int) -> None:
    """Call renameat2(2), raising OSError on failure."""
    if _libc.renameat2(AT_FDCWD, bytes(old), AT_FDCWD, bytes(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(old))


@pytest.fixture
def child(tmp_path: Path) -> Iterator[MountChild]:
    # tmp_path is private to root; other users must reach the mountpoint for permission tests.
    mountpoint = Path(tempfile.mkdtemp(prefix="pxfs-test-mnt-"))
    os.chmod(mountpoint, 0o755)
    mount = MountChild(tmp_path / "vol.dev", mountpoint, tmp_path / "vol.log")
    try:
        yield mount
    finally:
        mount.cleanup()
        mountpoint.rmdir()
    assert mount.errors_logged() == []


@pytest.fixture
def mnt(child: MountChild) -> Iterator[Path]:
    child.start(format_size=256 * MIB)
    yield child.mountpoint
    child.stop()


# Files and directories


def test_write_read_stat(mnt: Path) -> None:
    path = mnt / "file"
    data = os.urandom(300_000)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o640)
    try:
        assert os.write(fd, data) == len(data)
        assert os.pread(fd, 1000, 70_000) == data[70_000:71_000]
    finally:
        os.close(fd)
    # With the writeback cache the kernel refreshes st_blocks once the file is closed.
    info = os.stat(path)
    assert info.st_size == len(data)
    assert info.st_blocks == 5 * BLOCK // 512
    assert stat.S_IMODE(info.st_mode) == 0o640
    assert path.read_bytes() == data


def test_holes_and_truncate(mnt: Path) -> None:
    path = mnt / "sparse"
    with open(path, "wb") as f:
        f.seek(5 * MIB)
        f.write(b"end")
    assert os.stat(path).st_blocks == BLOCK // 512
    with open(path, "rb") as f:
        assert f.read(1000) == bytes(1000)
    with open(path, "r+b") as f:
        f.write(b"\xaa" * 100_000)
    os.truncate(path, 10)
    os.truncate(path, 200_000)
    assert path.read_bytes() == b"\xaa" * 10 + bytes(199_990)
    assert os.stat(path).st_size == 200_000


def test_directories_and_link_counts(mnt: Path) -> None:
    (mnt / "a").mkdir()
    (mnt / "a" / "b").mkdir()
    (mnt / "a" / "f").write_bytes(b"x")
    assert os.stat(mnt).st_nlink == 3
    assert os.stat(mnt / "a").st_nlink == 3
    with pytest.raises(OSError) as excinfo:
        os.rmdir(mnt / "a")
    assert excinfo.value.errno == errno.ENOTEMPTY
    with pytest.raises(OSError) as excinfo:
        os.rmdir(mnt / "a" / "f")
    assert excinfo.value.errno == errno.ENOTDIR
    with pytest.raises(OSError) as excinfo:
        os.unlink(mnt / "a" / "b")
    assert excinfo.value.errno == errno.EISDIR
    with pytest.raises(OSError) as excinfo:
        os.mkdir(mnt / ("n" * 256))
    assert excinfo.value.errno == errno.ENAMETOOLONG
    os.rmdir(mnt / "a" / "b")
    assert os.stat(mnt / "a").st_nlink == 2
    assert sorted(os.listdir(mnt / "a")) == ["f"]


def test_parent_times_follow_changes(mnt: Path) -> None:
    before = os.stat(mnt)
    time.sleep(0.01)
    (mnt / "new").write_bytes(b"")
    after = os.stat(mnt)
    assert after.st_mtime_ns > before.st_mtime_ns
    assert after.st_ctime_ns > before.st_ctime_ns
    link_before = os.stat(mnt / "new")
    time.sleep(0.01)
    os.link(mnt / "new", mnt / "again")
    assert os.stat(mnt / "new").st_ctime_ns > link_before.st_ctime_ns
    assert os.stat(mnt / "new").st_nlink == 2


def test_utime_nanoseconds(mnt: Path) -> None:
    path = mnt / "timed"
    path.write_bytes(b"")
    os.utime(path, ns=(1_234_567_891_123_456_789, 987_654_321_987_654_321))
    info = os.stat(path)
    assert info.st_atime_ns == 1_234_567_891_123_456_789
    assert info.st_mtime_ns == 987_654_321_987_654_321


def test_rename_flags(mnt: Path) -> None:
    (mnt / "a").write_bytes(b"A")
    (mnt / "b").write_bytes(b"B")
    with pytest.raises(OSError) as excinfo:
        renameat2(mnt / "a", mnt / "b", RENAME_NOREPLACE)
    assert excinfo.value.errno == errno.EEXIST
    renameat2(mnt / "a", mnt / "b", RENAME_EXCHANGE)
    assert (mnt / "a").read_bytes() == b"B"
    assert (mnt / "b").read_bytes() == b"A"
    with pytest.raises(OSError) as excinfo:
        renameat2(mnt / "a", mnt / "missing", RENAME_EXCHANGE)
    assert excinfo.value.errno == errno.ENOENT
    renameat2(mnt / "a", mnt / "c", RENAME_NOREPLACE)
    os.rename(mnt / "c", mnt / "b")
    assert (mnt / "b").read_bytes() == b"B"
    assert sorted(os.listdir(mnt)) == ["b"]


def test_rename_directories(mnt: Path) -> None:
    (mnt / "d" / "inner").mkdir(parents=True)
    (mnt / "e").mkdir()
    with pytest.raises(OSError) as excinfo:
        os.rename(mnt / "d", mnt / "d" / "inner" / "x")
    assert excinfo.value.errno == errno.EINVAL
    os.rename(mnt / "d" / "inner", mnt / "e" / "moved")
    assert os.stat(mnt / "d").st_nlink == 2
    assert os.stat(mnt / "e").st_nlink == 3
    assert os.stat(mnt / "e" / "moved" / "..").st_ino == os.stat(mnt / "e").st_ino
    (mnt / "file").write_bytes(b"")
    with pytest.raises(OSError) as excinfo:
        os.rename(mnt / "e", mnt / "file")
    assert excinfo.value.errno == errno.ENOTDIR


def test_special_files_and_links(mnt: Path) -> None:
    os.mkfifo(mnt / "fifo", 0o600)
    assert stat.S_ISFIFO(os.stat(mnt / "fifo").st_mode)
    os.mknod(mnt / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    assert os.stat(mnt / "null").st_rdev == os.makedev(1, 3)
    # FUSE mounts are nodev by default, so the node exists but does not open.
    with pytest.raises(PermissionError):
        open(mnt / "null", "wb")
    os.symlink("some/target", mnt / "sym")
    assert os.readlink(mnt / "sym") == "some/target"
    assert stat.S_ISLNK(os.lstat(mnt / "sym").st_mode)
    (mnt / "dir").mkdir()
    with pytest.raises(OSError) as excinfo:
        os.link(mnt / "dir", mnt / "dirlink")
    assert excinfo.value.errno == errno.EPERM


def test_xattrs(mnt: Path) -> None:
    path = mnt / "x"
    path.write_bytes(b"")
    os.setxattr(path, "user.color", b"blue")
    os.setxattr(path, "trusted.level", b"7")
    assert os.getxattr(path, "user.color") == b"blue"
    assert sorted(os.listxattr(path)) == ["trusted.level", "user.color"]
    with pytest.raises(OSError) as excinfo:
        os.setxattr(path, "user.color", b"red", os.XATTR_CREATE)
    assert excinfo.value.errno == errno.EEXIST
    with pytest.raises(OSError) as excinfo:
        os.setxattr(path, "user.none", b"red", os.XATTR_REPLACE)
    assert excinfo.value.errno == errno.ENODATA
    with pytest.raises(OSError) as excinfo:
        os.setxattr(path, "system.posix_acl_access", b"\x02\x00\x00\x00")
    assert excinfo.value.errno == errno.EOPNOTSUPP
    os.removexattr(path, "user.color")
    with pytest.raises(OSError) as excinfo:
        os.getxattr(path, "user.color")
    assert excinfo.value.errno == errno.ENODATA


def test_unlinked_open_file_keeps_working(mnt: Path) -> None:
    path = mnt / "tmp"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.write(fd, b"x" * MIB)
        os.fsync(fd)
        free_before = os.statvfs(mnt).f_bfree
        os.unlink(path)
        assert not path.exists()
        os.pwrite(fd, b"still here", MIB)
        os.fsync(fd)
        assert os.pread(fd, 10, MIB) == b"still here"
        assert os.fstat(fd).st_nlink == 0
        assert os.statvfs(mnt).f_bfree == free_before - 1
    finally:
        os.close(fd)
    deadline = time.monotonic() + 10
    while os.statvfs(mnt).f_bfree < free_before + 16 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.statvfs(mnt).f_bfree == free_before + 16


def test_o_direct_write(mnt: Path) -> None:
    buffer = mmap.mmap(-1, BLOCK)
    buffer.write(b"d" * BLOCK)
    fd = os.open(mnt / "direct", os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644)
    try:
        assert os.write(fd, buffer) == BLOCK
    finally:
        os.close(fd)
    assert (mnt / "direct").read_bytes() == b"d" * BLOCK


def test_statfs_shows_data_region(mnt: Path) -> None:
    info = os.statvfs(mnt)
    assert info.f_bsize == BLOCK
    assert info.f_blocks == 256 * MIB // BLOCK
    assert info.f_namemax == 255
    (mnt / "f").write_bytes(b"x" * (2 * BLOCK))
    os.sync()
    assert os.statvfs(mnt).f_bfree == info.f_bfree - 2


def test_rewinddir_shows_new_entries(mnt: Path) -> None:
    (mnt / "rewind").mkdir()
    fd = os.open(mnt / "rewind", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert os.listdir(fd) == []
        (mnt / "rewind" / "new").write_bytes(b"")
        assert os.listdir(fd) == ["new"]
    finally:
        os.close(fd)


def test_readdir_of_100k_entries(mnt: Path) -> None:
    directory = mnt / "many"
    directory.mkdir()
    names = {f"entry-{index:06d}" for index in range(100_000)}
    for name in names:
        os.mknod(directory / name)
    found = os.listdir(directory)
    assert len(found) == 100_000
    assert set(found) == names
    with os.scandir(directory) as entries:
        assert sum(1 for entry in entries if entry.is_file()) == 100_000


# Permissions


def _as_nobody(code: str) -> dict[str, object]:
    """Run Python `code` as uid/gid 65534 and return the JSON it prints."""
    argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    argv += [sys.executable, "-c", code]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    answer: dict[str, object] = json.loads(result.stdout)
    return answer


def test_permissions_for_other_user(mnt: Path) -> None:
    (mnt / "private").write_bytes(b"secret")
    os.chmod(mnt / "private", 0o600)
    (mnt / "readonly").write_bytes(b"public")
    shared = mnt / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    code = f"""
import errno, json, os
result = {{}}
def attempt(name, action):
    try:
        action()
        result[name] = 0
    except OSError as exc:
        result[name] = exc.errno
attempt("read_private", lambda: open({str(mnt / "private")!r}, "rb").read())
attempt("write_readonly", lambda: open({str(mnt / "readonly")!r}, "ab"))
attempt("create_in_root", lambda: open({str(mnt / "mine")!r}, "wb"))
attempt("chmod_others", lambda: os.chmod({str(mnt / "readonly")!r}, 0o777))
attempt("create_shared", lambda: open({str(shared / "mine")!r}, "wb").write(b"ok"))
result["read_public"] = open({str(mnt / "readonly")!r}, "rb").read().decode()
print(json.dumps(result))
"""
    result = _as_nobody(code)
    assert result["read_private"] == errno.EACCES
    assert result["write_readonly"] == errno.EACCES
    assert result["create_in_root"] == errno.EACCES
    assert result["chmod_others"] == errno.EPERM
    assert result["create_shared"] == 0
    assert result["read_public"] == "public"
    owned = os.stat(shared / "mine")
    assert (owned.st_uid, owned.st_gid) == (NOBODY, NOBODY)
    # The sticky bit: root's file in the shared directory stays root's.
    (shared / "roots").write_bytes(b"")
    removal = _as_nobody(
        f"import json, os\ntry:\n    os.unlink({str(shared / 'roots')!r})\n    print(0)\n"
        f"except OSError as exc:\n    print(json.dumps({{'errno': exc.errno}}))"
    )
    assert removal == {"errno": errno.EPERM}


# Persistence, crashes, space


def test_remount_keeps_tree_and_inode_numbers(child: MountChild) -> None:
    child.start(format_size=64 * MIB)
    mnt = child.mountpoint
    (mnt / "dir" / "sub").mkdir(parents=True)
    data = os.urandom(3 * MIB + 123)
    (mnt / "dir" / "data").write_bytes(data)
    os.symlink("dir/data", mnt / "link")
    os.setxattr(mnt / "dir", "user.tag", b"kept")
    os.truncate(mnt / "dir" / "data", 2 * MIB + 5)
    os.truncate(mnt / "dir" / "data", 3 * MIB)
    paths = ["dir", "dir/sub", "dir/data", "link"]
    before = {path: os.lstat(mnt / path) for path in paths}
    child.stop()

    child.start()
    after = {path: os.lstat(mnt / path) for path in paths}
    for path in paths:
        assert after[path].st_ino == before[path].st_ino, path
        assert after[path].st_mtime_ns == before[path].st_mtime_ns, path
        assert after[path].st_size == before[path].st_size, path
    assert os.stat(mnt).st_ino == 1
    expected = data[: 2 * MIB + 5] + bytes(3 * MIB - 2 * MIB - 5)
    assert (mnt / "dir" / "data").read_bytes() == expected
    assert os.readlink(mnt / "link") == "dir/data"
    assert os.getxattr(mnt / "dir", "user.tag") == b"kept"
    child.stop()
    checked = child.check()
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout == ""


def test_kill_keeps_fsynced_data(child: MountChild) -> None:
    child.start(format_size=64 * MIB)
    mnt = child.mountpoint
    durable = os.urandom(2 * MIB)
    with open(mnt / "durable", "wb") as f:
        f.write(durable)
        f.flush()
        os.fsync(f.fileno())
    (mnt / "unsynced").mkdir()
    (mnt / "unsynced" / "file").write_bytes(b"maybe")
    child.kill()

    child.start()
    assert (child.mountpoint / "durable").read_bytes() == durable
    child.stop()
    checked = child.check()
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_sigterm_with_open_file_flushes_it(child: MountChild) -> None:
    child.start(format_size=64 * MIB)
    fd = os.open(child.mountpoint / "open", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"before")
        assert child.process is not None
        child.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        os.write(fd, b" after")
    finally:
        os.close(fd)
    child.reap(0)

    child.start()
    assert (child.mountpoint / "open").read_bytes() == b"before after"
    child.stop()


def test_enospc_then_space_is_reused(child: MountChild) -> None:
    child.start(format_size=8 * MIB)
    mnt = child.mountpoint
    chunk = b"\x5a" * MIB
    (mnt / "first").write_bytes(chunk * 5)
    with pytest.raises(OSError) as excinfo:
        with open(mnt / "second", "wb") as f:
            for _ in range(5):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    assert excinfo.value.errno == errno.ENOSPC
    assert (mnt / "first").read_bytes() == chunk * 5
    (mnt / "beyond").write_bytes(b"")
    with pytest.raises(OSError) as excinfo:
        os.truncate(mnt / "beyond", 9 * MIB)
    assert excinfo.value.errno == errno.EFBIG
    os.unlink(mnt / "first")
    os.unlink(mnt / "second")
    with open(mnt / "again", "wb") as f:
        for _ in range(6):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    assert (mnt / "again").read_bytes() == chunk * 6
    child.stop()
    checked = child.check()
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_check_reports_damage(child: MountChild) -> None:
    child.start(format_size=16 * MIB)
    (child.mountpoint / "f").write_bytes(b"y" * 1000)
    child.stop()
    # Block 0 holds the superblock; damaging it must fail the check, not crash it.
    with open(child.device, "r+b") as device:
        device.seek(40)
        device.write(b"\xff\xff\xff\xff")
    checked = child.check()
    assert checked.returncode != 0
    assert "superblock" in checked.stdout
    assert "Traceback" not in checked.stderr


def _write_fsynced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def test_full_volume_reads_only_stored_bytes(child: MountChild) -> None:
    child.start(format_size=48 * MIB)
    mnt = child.mountpoint
    first, second = os.urandom(30 * MIB), os.urandom(30 * MIB)
    _write_fsynced(mnt / "first", first)
    with pytest.raises(OSError) as excinfo:
        _write_fsynced(mnt / "second", second)
    assert excinfo.value.errno == errno.ENOSPC
    seen = (mnt / "second").read_bytes()
    child.stop()

    child.start()
    stored = (child.mountpoint / "second").read_bytes()
    assert len(stored) < len(second)
    # The kernel keeps the size it cached while the inode stays in memory, so past what was
    # stored it reads zeros, never the bytes that were not stored.
    assert seen[: len(stored)] == stored
    assert seen[len(stored) :] == bytes(len(seen) - len(stored))
    assert (child.mountpoint / "first").read_bytes() == first
    child.stop()
