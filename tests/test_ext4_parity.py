"""POSIX parity with ext4: the same system calls on an ext4 loop mount and on a pxfs mount.

A probe runs a sequence of calls in a fresh directory and records each step's result, or the
errno name of the OSError it raised. Each test runs one probe on ext4 and on pxfs, on the same
kernel, and compares the two records. Only behaviours where pxfs matches ext4 are here, so each
test guards against pxfs drifting away from ext4. Behaviours that differ only because pxfs has
64 KiB blocks and ext4 4 KiB ones (st_blocks, st_blksize, xattr value limits, O_DIRECT
alignment) are not compared.

Needs root, /dev/fuse, mkfs.ext4 and losetup. The module shares one ext4 loop mount and one pxfs
mount child between the probes; teardown unmounts both and detaches the loop device.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import mmap
import os
import pickle
import random
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mountproc import MountChild, is_mounted

MIB = 1024 * 1024
BLOCK = 65536
NOBODY = 65534
EXT4_IMAGE_BYTES = 1024 * MIB
PXFS_VOLUME_BYTES = 1024 * MIB
#: Size of both filesystems in the full-volume test.
SMALL_BYTES = 48 * MIB
#: Long enough for the kernel's coarse clock to move between two timestamps.
TICK = 0.02
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


def _missing_requirement() -> str | None:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        return "needs root and /dev/fuse"
    if not os.path.exists("/dev/loop-control"):
        return "needs loop devices"
    for tool in ("mkfs.ext4", "losetup", "fusermount3"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


_MISSING = _missing_requirement()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")

_libc = ctypes.CDLL(None, use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _raise_errno(path: Path) -> None:
    code = ctypes.get_errno()
    raise OSError(code, os.strerror(code), str(path))


def renameat2(old: Path, new: Path, flags: int) -> None:
    """Call renameat2(2), raising OSError on failure."""
    if _libc.renameat2(AT_FDCWD, bytes(old), AT_FDCWD, bytes(new), flags) != 0:
        _raise_errno(old)


def utimensat(path: Path, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    """Call utimensat(2) with (seconds, nanoseconds) pairs, which may hold UTIME_NOW or _OMIT."""
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    if _libc.utimensat(AT_FDCWD, bytes(path), times, 0) != 0:
        _raise_errno(path)


# Mounts


def _run(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"{argv} failed: {result.stderr}"
    return result.stdout.strip()


class Ext4Mount:
    """An ext4 filesystem in an image file, mounted through a loop device it attaches."""

    def __init__(self, image: Path, mountpoint: Path, size: int) -> None:
        self.image = image
        self.mountpoint = mountpoint
        self.size = size
        self.loop: str | None = None

    def start(self) -> None:
        """Create the image, attach it and mount it."""
        with open(self.image, "wb") as image:
            image.truncate(self.size)
        # 256-byte inodes keep nanosecond timestamps on small images too.
        _run(["mkfs.ext4", "-q", "-F", "-I", "256", str(self.image)])
        self.loop = _run(["losetup", "--find", "--show", str(self.image)])
        self.mount()

    def mount(self) -> None:
        """Mount the attached loop device."""
        assert self.loop is not None
        _run(["mount", "-t", "ext4", self.loop, str(self.mountpoint)])

    def unmount(self) -> None:
        """Unmount, keeping the loop device attached."""
        _run(["umount", str(self.mountpoint)])

    def remount(self) -> None:
        """Unmount and mount again, which drops every cached page and inode."""
        self.unmount()
        self.mount()

    def cleanup(self) -> None:
        """Unmount if mounted, then detach the loop device."""
        if is_mounted(self.mountpoint):
            subprocess.run(["umount", str(self.mountpoint)], check=False, timeout=60)
        if self.loop is not None:
            subprocess.run(["losetup", "-d", self.loop], check=False, timeout=60)
            self.loop = None


@dataclass
class Pair:
    """An ext4 mount and a pxfs mount that the same calls run on."""

    ext4: Ext4Mount
    pxfs: MountChild


@contextlib.contextmanager
def mounted_pair(storage: Path, ext4_bytes: int, pxfs_bytes: int) -> Iterator[Pair]:
    """Mount ext4 and pxfs side by side; unmount both and detach the loop device on exit."""
    # pytest's directories are private to root; the permission probes run as another user.
    top = Path(tempfile.mkdtemp(prefix="pxfs-parity-"))
    os.chmod(top, 0o755)
    for name in ("ext4", "pxfs"):
        (top / name).mkdir(mode=0o755)
    ext4 = Ext4Mount(storage / "ext4.img", top / "ext4", ext4_bytes)
    pxfs = MountChild(storage / "pxfs.dev", top / "pxfs", storage / "pxfs.log", pxfs_bytes)
    try:
        ext4.start()
        pxfs.start()
        yield Pair(ext4, pxfs)
        pxfs.stop()
    finally:
        pxfs.cleanup()
        ext4.cleanup()
        # rmdir, not rmtree: a mount left behind must never have its contents deleted.
        for name in ("ext4", "pxfs"):
            (top / name).rmdir()
        top.rmdir()
    assert pxfs.errors_logged() == []


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    storage = tmp_path_factory.mktemp("parity")
    with mounted_pair(storage, EXT4_IMAGE_BYTES, PXFS_VOLUME_BYTES) as mounts:
        yield mounts


@pytest.fixture(autouse=True)
def pxfs_stays_healthy(pair: Pair) -> Iterator[None]:
    """Fail a test after which the pxfs mount is dead or its child logged an error."""
    logged_before = len(pair.pxfs.errors_logged())
    yield
    os.statvfs(pair.pxfs.mountpoint)
    assert pair.pxfs.errors_logged()[logged_before:] == []


# Recording


class Record:
    """The outcome of each step of a probe, in order, to compare across filesystems."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, Any]] = []

    def do(self, label: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run `call`, record "ok" or its errno name, and return its result (None on OSError)."""
        try:
            result = call(*args, **kwargs)
        except OSError as exc:
            self.steps.append((label, errno.errorcode.get(exc.errno or 0, exc.errno)))
            return None
        self.steps.append((label, "ok"))
        return result

    def value(self, label: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run `call` and record its result, or its errno name."""
        try:
            result = call(*args, **kwargs)
        except OSError as exc:
            self.steps.append((label, errno.errorcode.get(exc.errno or 0, exc.errno)))
            return None
        self.steps.append((label, result))
        return result

    def note(self, label: str, value: Any) -> None:
        """Record a value the probe computed."""
        self.steps.append((label, value))


Probe = Callable[[Record, Path], None]
PROBES: list[Probe] = []


def probe(function: Probe) -> Probe:
    """Register a probe for test_probe_matches_ext4."""
    PROBES.append(function)
    return function


def run_probe(function: Probe, directory: Path) -> list[tuple[str, Any]]:
    """Run a probe in a new, empty `directory` and return its steps."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(mode=0o755)
    record = Record()
    function(record, directory)
    assert record.steps, f"probe {function.__name__} recorded nothing"
    return record.steps


def as_user(
    steps: Callable[[Record], None],
    uid: int = NOBODY,
    gid: int = NOBODY,
    groups: tuple[int, ...] = (),
) -> list[tuple[str, Any]]:
    """Run `steps` in a child process with the given credentials and return what it recorded."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(reader)
            try:
                os.setgroups(list(groups))
                os.setgid(gid)
                os.setuid(uid)
                record = Record()
                steps(record)
                payload = pickle.dumps(("ok", record.steps))
            except BaseException:
                payload = pickle.dumps(("error", traceback.format_exc()))
            with os.fdopen(writer, "wb") as pipe:
                pipe.write(payload)
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        payload = pipe.read()
    os.waitpid(pid, 0)
    assert payload, f"the child running as uid {uid} sent nothing"
    kind, result = pickle.loads(payload)
    assert kind == "ok", f"steps as uid {uid} failed:\n{result}"
    steps_recorded: list[tuple[str, Any]] = result
    return steps_recorded


def _open_close(path: Path | str, flags: int, mode: int = 0o644) -> None:
    os.close(os.open(path, flags, mode))


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as file:
        file.write(data)


def _pattern(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


# Probes: files and data


@probe
def open_flags(rec: Record, d: Path) -> None:
    f = d / "f"
    rec.do("O_CREAT|O_EXCL new", _open_close, f, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    rec.do("O_CREAT|O_EXCL existing", _open_close, f, os.O_CREAT | os.O_EXCL | os.O_WRONLY)

    f.write_bytes(b"hello world")
    rec.do("O_TRUNC", _open_close, f, os.O_WRONLY | os.O_TRUNC)
    rec.note("size after O_TRUNC", os.stat(f).st_size)
    f.write_bytes(b"hello")
    rec.do("O_RDONLY|O_TRUNC", _open_close, f, os.O_RDONLY | os.O_TRUNC)
    rec.note("size after O_RDONLY|O_TRUNC", os.stat(f).st_size)

    fd = os.open(f, os.O_WRONLY | os.O_APPEND)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b"XY")
    rec.note("offset after O_APPEND write", os.lseek(fd, 0, os.SEEK_CUR))
    rec.value("pwrite with O_APPEND", os.pwrite, fd, b"Z", 0)
    os.close(fd)
    rec.note("content after appends", f.read_bytes())

    rec.do("missing parent", os.open, d / "missing" / "x", os.O_RDONLY)
    rec.do("file as parent", os.open, f / "x", os.O_RDONLY)
    rec.do("directory O_WRONLY", os.open, d, os.O_WRONLY)
    rec.do("directory O_RDWR", os.open, d, os.O_RDWR)
    rec.do("directory O_CREAT", os.open, d, os.O_CREAT | os.O_RDONLY)
    rec.do("O_DIRECTORY on directory", _open_close, d, os.O_RDONLY | os.O_DIRECTORY)
    rec.do("O_DIRECTORY on file", os.open, f, os.O_RDONLY | os.O_DIRECTORY)
    rec.do("O_CREAT|O_DIRECTORY", os.open, d / "new", os.O_CREAT | os.O_DIRECTORY | os.O_RDONLY)

    os.symlink("f", d / "link")
    rec.do("O_NOFOLLOW on symlink", os.open, d / "link", os.O_RDONLY | os.O_NOFOLLOW)
    rec.do("O_EXCL on symlink", os.open, d / "link", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.symlink("target", d / "dangling")
    rec.do(
        "O_CREAT through dangling symlink", _open_close, d / "dangling", os.O_CREAT | os.O_WRONLY
    )
    rec.note("entries", sorted(os.listdir(d)))
    os.chmod(f, 0o444)
    rec.do("O_WRONLY on read-only file as root", _open_close, f, os.O_WRONLY)


@probe
def o_direct_aligned(rec: Record, d: Path) -> None:
    f = d / "f"
    fd = rec.do("open O_DIRECT", os.open, f, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644)
    assert fd is not None
    data = mmap.mmap(-1, MIB)
    data.write(_pattern(1, MIB))
    small = mmap.mmap(-1, 4 * 4096)
    try:
        rec.value("aligned write", os.pwritev, fd, [data], 0)
        rec.value("aligned read across a block", os.preadv, fd, [small], BLOCK - 8192)
        rec.note("read matches", small[:] == data[BLOCK - 8192 : BLOCK + 8192])
        rec.value("read at EOF", os.preadv, fd, [small], MIB)
        rec.value("write past EOF", os.pwritev, fd, [small], 2 * MIB)
        rec.note("size", os.fstat(fd).st_size)
    finally:
        os.close(fd)
    content = f.read_bytes()
    rec.note("buffered view of direct writes", content[:MIB] == data[:])
    rec.note("hole between", content[MIB : 2 * MIB] == bytes(MIB))


@probe
def odd_offsets(rec: Record, d: Path) -> None:
    fd = os.open(d / "f", os.O_CREAT | os.O_RDWR, 0o644)
    model = bytearray()
    writes = [(65535, 2), (3 * BLOCK - 1, BLOCK + 2), (1, 2 * BLOCK), (2 * BLOCK - 1, 1)]
    writes += [(0, 1), (5 * BLOCK + 7, 300_000), (BLOCK, BLOCK), (10 * BLOCK - 3, 3)]
    for seed, (offset, length) in enumerate(writes):
        data = _pattern(seed, length)
        rec.value(f"pwrite {length} at {offset}", os.pwrite, fd, data, offset)
        model.extend(bytes(max(0, offset + length - len(model))))
        model[offset : offset + length] = data
    rec.note("size", os.fstat(fd).st_size)
    reads = [(65530, 12), (2 * BLOCK - 1, 2), (0, BLOCK + 1), (len(model) - 3, 10)]
    reads += [(len(model), 5), (len(model) + 100, 5), (7 * BLOCK + 1, 3 * BLOCK)]
    for offset, length in reads:
        got = os.pread(fd, length, offset)
        rec.note(f"pread {length} at {offset}", got == bytes(model[offset : offset + length]))
    rec.note("whole file", os.pread(fd, len(model) + 1, 0) == bytes(model))
    os.close(fd)


@probe
def sparse_files(rec: Record, d: Path) -> None:
    f = d / "f"
    fd = os.open(f, os.O_CREAT | os.O_RDWR, 0o644)
    os.pwrite(fd, b"a", MIB)
    os.pwrite(fd, b"b" * 10, 3 * MIB)
    os.fsync(fd)
    rec.note("size", os.fstat(fd).st_size)
    rec.note("hole before", os.pread(fd, 4096, MIB - 4096) == bytes(4096))
    rec.note("hole between", os.pread(fd, 2 * BLOCK, 2 * MIB) == bytes(2 * BLOCK))
    rec.note("data", os.pread(fd, 3, MIB - 1))
    rec.value("SEEK_DATA at a data byte", os.lseek, fd, MIB, os.SEEK_DATA)
    rec.value("SEEK_HOLE at the last byte", os.lseek, fd, 3 * MIB + 9, os.SEEK_HOLE)
    for whence in (os.SEEK_DATA, os.SEEK_HOLE):
        rec.value(f"lseek {whence} at EOF", os.lseek, fd, 3 * MIB + 10, whence)
        rec.value(f"lseek {whence} past EOF", os.lseek, fd, 4 * MIB, whence)
    rec.value("SEEK_END", os.lseek, fd, 0, os.SEEK_END)
    rec.value("SEEK_SET past EOF", os.lseek, fd, 10 * MIB, os.SEEK_SET)
    rec.value("read past EOF", os.read, fd, 10)
    os.close(fd)


@probe
def truncate_down_and_up(rec: Record, d: Path) -> None:
    f = d / "f"
    f.write_bytes(b"x" * 150_000)
    os.truncate(f, BLOCK + 1)
    os.truncate(f, 2 * BLOCK + 5)
    content = f.read_bytes()
    rec.note("size", len(content))
    rec.note("kept bytes", content[: BLOCK + 1] == b"x" * (BLOCK + 1))
    rec.note("zeros after regrowth", content[BLOCK + 1 :] == bytes(len(content) - BLOCK - 1))
    rec.do("truncate to 0", os.truncate, f, 0)
    rec.note("empty", f.read_bytes())
    rec.do("truncate to 100 MB", os.truncate, f, 100_000_000)
    rec.note("size after growing", os.stat(f).st_size)
    rec.note("blocks of the sparse file", os.stat(f).st_blocks)
    rec.do("negative size", os.truncate, f, -1)
    rec.do("directory", os.truncate, d, 0)
    rec.do("missing file", os.truncate, d / "missing", 0)
    fd = os.open(f, os.O_RDONLY)
    rec.do("ftruncate of a read-only descriptor", os.ftruncate, fd, 0)
    os.close(fd)
    fd = os.open(f, os.O_RDWR)
    os.ftruncate(fd, 0)
    os.pwrite(fd, b"y" * 3 * BLOCK, 0)
    os.ftruncate(fd, BLOCK + 100)
    rec.note("pread after shrink", os.pread(fd, 4 * BLOCK, 0) == b"y" * (BLOCK + 100))
    os.close(fd)


@probe
def mmap_shared_and_private(rec: Record, d: Path) -> None:
    f = d / "f"
    fd = os.open(f, os.O_CREAT | os.O_RDWR, 0o644)
    os.ftruncate(fd, 200_000)
    shared = mmap.mmap(fd, 200_000, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    shared[BLOCK - 6 : BLOCK + 6] = b"ABCDEFGHIJKL"
    shared[199_999:200_000] = b"Z"
    shared.flush()
    rec.note("pread of msync'd bytes", os.pread(fd, 12, BLOCK - 6))
    rec.note("pread of last byte", os.pread(fd, 1, 199_999))
    os.pwrite(fd, b"written", 100)
    rec.note("mapping sees pwrite", shared[100:107])
    shared.close()

    private = mmap.mmap(fd, 200_000, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
    private[0:4] = b"PRIV"
    private.close()
    rec.note("private writes stay private", os.pread(fd, 4, 0))
    os.close(fd)

    readonly = os.open(f, os.O_RDONLY)
    flags, prot = mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
    rec.do("shared writable map of O_RDONLY", mmap.mmap, readonly, 4096, flags, prot)
    rec.note("after reopen", os.pread(readonly, 12, BLOCK - 6))
    os.close(readonly)

    g = d / "g"
    fd = os.open(g, os.O_CREAT | os.O_RDWR, 0o644)
    os.ftruncate(fd, 3 * BLOCK)
    with mmap.mmap(fd, 3 * BLOCK) as mapping:
        mapping[:] = b"q" * (3 * BLOCK)
    os.ftruncate(fd, 70_000)
    os.ftruncate(fd, 3 * BLOCK)
    content = os.pread(fd, 3 * BLOCK, 0)
    rec.note("mapped data kept", content[:70_000] == b"q" * 70_000)
    rec.note("zeros after truncate", content[70_000:] == bytes(3 * BLOCK - 70_000))
    os.close(fd)


@probe
def copy_ranges(rec: Record, d: Path) -> None:
    (d / "src").write_bytes(bytes(range(256)) * 1000)
    src = os.open(d / "src", os.O_RDONLY)
    dst = os.open(d / "dst", os.O_CREAT | os.O_WRONLY, 0o644)
    rec.value("copy_file_range", os.copy_file_range, src, dst, 100_000, 5, 7)
    rec.value("sendfile", os.sendfile, dst, src, 0, 1000)
    os.close(src)
    os.close(dst)
    content = (d / "dst").read_bytes()
    rec.note("size", len(content))
    rec.note("digest", hashlib.sha256(content).hexdigest())


# Probes: names, renames and links


@probe
def rename_forms(rec: Record, d: Path) -> None:
    (d / "a").write_bytes(b"A")
    (d / "b").write_bytes(b"B")
    for name in ("D", "D/sub", "E", "F"):
        (d / name).mkdir()
    (d / "F" / "x").write_bytes(b"")

    def rename(old: str, new: str, flags: int = 0) -> None:
        rec.do(f"rename {old} {new} {flags}", renameat2, d / old, d / new, flags)

    rename("a", "b", RENAME_NOREPLACE)
    rename("a", "c", RENAME_NOREPLACE)
    rename("c", "b", RENAME_EXCHANGE)
    rec.note("exchanged", ((d / "c").read_bytes(), (d / "b").read_bytes()))
    rename("c", "missing", RENAME_EXCHANGE)
    rename("c", "b", RENAME_NOREPLACE | RENAME_EXCHANGE)
    rename("c", "b", 8)
    rename("c", "E")
    rename("E", "c")
    rename("E", "F")
    rename("E", "D/sub")
    rename("D", "D/sub/x")
    rename("D", "D/sub")
    rename("D", "D")
    rename("c", "c")
    rename("c", "c", RENAME_NOREPLACE)
    rename("c", "c", RENAME_EXCHANGE)
    os.link(d / "c", d / "hard")
    rename("c", "hard")
    rec.note("hard links after rename onto each other", sorted(os.listdir(d)))
    rec.note("nlink", os.stat(d / "c").st_nlink)
    rename("c", "hard", RENAME_EXCHANGE)
    rename("c", "hard", RENAME_NOREPLACE)
    rename("missing", "zz")
    rename("c", "missing/zz")
    rename("c", "b/zz")
    rename("D", "b", RENAME_EXCHANGE)
    rec.note("exchanged kinds", (os.path.isdir(d / "b"), os.path.isfile(d / "D")))
    rec.note("link counts", (os.stat(d).st_nlink, os.stat(d / "b").st_nlink))
    (d / "E").mkdir()
    rename("b", "E/bb")
    rec.note("link counts after move", (os.stat(d).st_nlink, os.stat(d / "E").st_nlink))
    rename("E", "E/bb", RENAME_EXCHANGE)
    rename("E/bb", "E", RENAME_EXCHANGE)
    rename("E", "E/bb/sub", RENAME_EXCHANGE)
    (d / "G").mkdir()
    rename("F", "G")
    rename("G", "F")
    rec.note("entries", sorted(os.listdir(d)))
    (d / "H").mkdir()
    (d / "I").mkdir()
    rename("H", "I/H")
    rec.note("'..' follows", os.stat(d / "I" / "H" / "..").st_ino == os.stat(d / "I").st_ino)
    rec.note("link counts after subdir move", (os.stat(d / "I").st_nlink, os.stat(d).st_nlink))
    rename("I", "I/H")
    rename("I/H", "I")
    rec.do("trailing slash on a file", os.rename, f"{d}/c/", f"{d}/q")
    rec.do("trailing slash on a new dir name", os.rename, f"{d}/I", f"{d}/J/")
    rec.note("final entries", sorted(os.listdir(d)))


@probe
def rename_over_open_and_linked(rec: Record, d: Path) -> None:
    (d / "a").write_bytes(b"A")
    os.link(d / "a", d / "b")
    (d / "c").write_bytes(b"C")
    os.rename(d / "c", d / "b")
    rec.note("nlink of the other name", os.stat(d / "a").st_nlink)
    rec.note("content", (d / "b").read_bytes())
    os.link(d / "a", d / "x")
    renameat2(d / "a", d / "b", RENAME_EXCHANGE)
    rec.note("nlinks after exchange", [os.stat(d / n).st_nlink for n in ("x", "b", "a")])
    (d / "old").write_bytes(b"OLD")
    (d / "new").write_bytes(b"NEW")
    fd = os.open(d / "old", os.O_RDONLY)
    os.rename(d / "new", d / "old")
    rec.note("replaced file still readable", os.pread(fd, 3, 0))
    rec.note("replaced file nlink", os.fstat(fd).st_nlink)
    os.close(fd)
    (d / "D1").mkdir()
    (d / "D2").mkdir()
    fd = os.open(d / "D2", os.O_RDONLY)
    os.rename(d / "D1", d / "D2")
    rec.note("replaced directory nlink", os.fstat(fd).st_nlink)
    rec.note("parent nlink", os.stat(d).st_nlink)
    os.close(fd)


@probe
def dot_entries(rec: Record, d: Path) -> None:
    s = str(d)
    os.mkdir(f"{s}/sub")
    open(f"{s}/f", "w").close()
    calls: list[tuple[str, Callable[..., Any], tuple[Any, ...]]] = [
        ("rmdir sub/.", os.rmdir, (f"{s}/sub/.",)),
        ("rmdir sub/..", os.rmdir, (f"{s}/sub/..",)),
        ("rmdir .", os.rmdir, (f"{s}/.",)),
        ("unlink sub/.", os.unlink, (f"{s}/sub/.",)),
        ("rename sub/. away", os.rename, (f"{s}/sub/.", f"{s}/x")),
        ("rename onto sub/.", os.rename, (f"{s}/f", f"{s}/sub/.")),
        ("rename onto sub/..", os.rename, (f"{s}/sub", f"{s}/sub/..")),
        ("rename sub/.. away", os.rename, (f"{s}/sub/..", f"{s}/y")),
        ("mkdir sub/.", os.mkdir, (f"{s}/sub/.",)),
        ("link to sub/.", os.link, (f"{s}/f", f"{s}/sub/.")),
        ("symlink at sub/..", os.symlink, ("f", f"{s}/sub/..")),
        ("mknod sub/.", os.mknod, (f"{s}/sub/.",)),
        ("rmdir f/.", os.rmdir, (f"{s}/f/.",)),
        ("open f/.", os.open, (f"{s}/f/.", os.O_RDONLY)),
        ("stat f/", os.stat, (f"{s}/f/",)),
        ("rmdir f/", os.rmdir, (f"{s}/f/",)),
        ("unlink f/", os.unlink, (f"{s}/f/",)),
        ("rmdir sub/", os.rmdir, (f"{s}/sub/",)),
    ]
    for label, call, args in calls:
        rec.do(label, call, *args)
    rec.note("entries", sorted(os.listdir(d)))


@probe
def link_counts(rec: Record, d: Path) -> None:
    (d / "f").write_bytes(b"f")
    (d / "sub").mkdir()
    rec.note("dir nlink with one subdir", os.stat(d).st_nlink)

    os.link(d / "f", d / "g")
    os.link(d / "f", d / "sub" / "h")
    rec.note("file nlink", os.stat(d / "f").st_nlink)
    rec.do("link onto existing", os.link, d / "f", d / "g")
    rec.do("link a directory", os.link, d / "sub", d / "s2")
    rec.do("link a missing file", os.link, d / "missing", d / "x")
    rec.do("link into a missing dir", os.link, d / "f", d / "nodir" / "x")

    os.unlink(d / "g")
    rec.note("nlink after unlink", os.stat(d / "sub" / "h").st_nlink)
    rec.do("rmdir non-empty", os.rmdir, d / "sub")
    rec.do("rmdir a file", os.rmdir, d / "f")
    rec.do("unlink a dir", os.unlink, d / "sub")
    rec.do("rmdir missing", os.rmdir, d / "missing")
    rec.do("mkdir existing dir", os.mkdir, d / "sub")
    rec.do("mkdir over a file", os.mkdir, d / "f")

    os.unlink(d / "sub" / "h")
    os.rmdir(d / "sub")
    rec.note("dir nlink after rmdir", os.stat(d).st_nlink)
    for i in range(5):
        (d / f"s{i}").mkdir()
    rec.note("dir nlink with five subdirs", os.stat(d).st_nlink)
    rec.note("dir size", os.stat(d).st_size)

    (d / "cwd").mkdir()
    old = os.getcwd()
    os.chdir(d / "cwd")
    try:
        os.rmdir(d / "cwd")
        rec.do("create in removed cwd", _open_close, "new", os.O_CREAT | os.O_WRONLY)
        rec.value("list removed cwd", os.listdir, ".")
        rec.do("mkdir in removed cwd", os.mkdir, "x")
    finally:
        os.chdir(old)


@probe
def symlinks(rec: Record, d: Path) -> None:
    for length in (1, 255, 256, 1023, 4094, 4095, 4096):
        link = d / f"s{length}"
        rec.do(f"symlink of {length} bytes", os.symlink, "a" * length, link)
        if os.path.lexists(link):
            rec.note("readlink length", len(os.readlink(link)))
            rec.note("lstat size", os.lstat(link).st_size)
    target = "/".join(["b" * 200] * 20)[:4095]
    os.symlink(target, d / "long")
    rec.note("long target kept", os.readlink(d / "long") == target)
    os.symlink("loop2", d / "loop1")
    os.symlink("loop1", d / "loop2")
    rec.do("stat a loop", os.stat, d / "loop1")
    rec.do("open a loop", os.open, d / "loop1", os.O_RDONLY)
    os.symlink("self", d / "self")
    rec.do("stat self loop", os.stat, d / "self")
    (d / "t0").write_bytes(b"x")
    for i in range(1, 45):
        os.symlink(f"t{i - 1}", d / f"t{i}")
    rec.value("follow 40 links", lambda: os.stat(d / "t40").st_size)
    rec.value("follow 41 links", lambda: os.stat(d / "t41").st_size)
    rec.do("empty target", os.symlink, "", d / "empty")
    rec.do("readlink of a file", os.readlink, d / "t0")
    rec.do("readlink of a missing name", os.readlink, d / "nope")
    rec.note("symlink mode", stat.S_IMODE(os.lstat(d / "t1").st_mode))
    rec.do("symlink over an existing name", os.symlink, "x", d / "t1")
    rec.do("chown -h", os.chown, d / "t1", 77, 78, follow_symlinks=False)
    rec.note("owner of link and target", (os.lstat(d / "t1").st_uid, os.stat(d / "t0").st_uid))


@probe
def special_files(rec: Record, d: Path) -> None:
    os.mkfifo(d / "fifo", 0o640)
    info = os.lstat(d / "fifo")
    rec.note("fifo", (stat.S_ISFIFO(info.st_mode), stat.S_IMODE(info.st_mode), info.st_size))
    rec.do("mknod socket", os.mknod, d / "sock", stat.S_IFSOCK | 0o600)
    rec.note("socket type", stat.S_ISSOCK(os.lstat(d / "sock").st_mode))
    rec.do("mknod char", os.mknod, d / "chr", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    rec.note("char rdev", os.lstat(d / "chr").st_rdev == os.makedev(1, 3))
    rec.do("mknod block", os.mknod, d / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    rec.do("mknod regular", os.mknod, d / "reg", stat.S_IFREG | 0o600)
    rec.do("mknod with no type", os.mknod, d / "none", 0o600)
    rec.note("regular types", [stat.S_ISREG(os.lstat(d / n).st_mode) for n in ("reg", "none")])
    rec.do("mknod a directory", os.mknod, d / "dir", stat.S_IFDIR | 0o755)
    rec.do("mknod a symlink", os.mknod, d / "lnk", stat.S_IFLNK | 0o755)
    rec.do("truncate a fifo", os.truncate, d / "fifo", 0)

    def write_fifo() -> None:
        with open(d / "fifo", "wb") as writer:
            writer.write(b"through the fifo")

    thread = threading.Thread(target=write_fifo)
    thread.start()
    with open(d / "fifo", "rb") as reader:
        rec.note("fifo data", reader.read())
    thread.join()
    with os.scandir(d) as entries:
        kinds = sorted(
            (e.name, e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False))
            for e in entries
        )
    rec.note("readdir types", kinds)


@probe
def name_lengths(rec: Record, d: Path) -> None:
    for length in (254, 255, 256, 1000):
        rec.do(f"create {length}", _open_close, d / ("a" * length), os.O_CREAT | os.O_WRONLY)
        rec.do(f"mkdir {length}", os.mkdir, d / ("b" * length))
        rec.do(f"symlink {length}", os.symlink, "x", d / ("c" * length))
        rec.do(f"stat missing {length}", os.stat, d / ("z" * length))
        rec.do(f"rename to {length}", os.rename, d / ("a" * 254), d / ("r" * length))
        rec.do(f"rename back from {length}", os.rename, d / ("r" * length), d / ("a" * 254))
    two_byte = "é" * 127
    rec.do("254 bytes of UTF-8", _open_close, d / two_byte, os.O_CREAT | os.O_WRONLY)
    rec.do("256 bytes of UTF-8", _open_close, d / (two_byte + "é"), os.O_CREAT | os.O_WRONLY)
    deep = d
    for _ in range(20):
        deep = deep / ("d" * 200)
    rec.do("path of 4000 bytes", os.makedirs, deep)
    binary = bytes(d) + b"/\xff\xfe\x01"
    rec.do("non-UTF-8 name", _open_close, binary, os.O_CREAT | os.O_WRONLY)
    rec.do("name with a newline", _open_close, f"{d}/with\nnewline", os.O_CREAT | os.O_WRONLY)
    rec.note("entries", sorted(os.listdir(bytes(d))))


@probe
def many_files(rec: Record, d: Path) -> None:
    count = 5000
    for i in range(count):
        _open_close(d / f"f{i:05d}", os.O_CREAT | os.O_WRONLY)
    names = os.listdir(d)
    rec.note("listed", len(names))
    rec.note("names", sorted(names) == [f"f{i:05d}" for i in range(count)])
    rec.note("all regular", all(stat.S_ISREG(os.stat(d / n).st_mode) for n in names))
    for i in range(0, count, 2):
        os.unlink(d / f"f{i:05d}")
    rec.note("after deleting half", len(os.listdir(d)))
    for name in os.listdir(d):
        os.unlink(d / name)
    rec.note("after deleting all", os.listdir(d))
    rec.do("rmdir the emptied directory", os.rmdir, d)
    d.mkdir()


@probe
def unlinked_open_files(rec: Record, d: Path) -> None:
    f = d / "f"
    fd = os.open(f, os.O_CREAT | os.O_RDWR, 0o600)
    os.write(fd, b"data" * 50_000)
    os.unlink(f)
    rec.note("nlink", os.fstat(fd).st_nlink)
    rec.note("read after unlink", os.pread(fd, 8, 199_990))
    os.pwrite(fd, b"more", MIB)
    rec.note("size after write", os.fstat(fd).st_size)
    os.ftruncate(fd, 5)
    rec.note("content after truncate", os.pread(fd, 100, 0))
    rec.do("stat of the name", os.stat, f)
    rec.note("entries", os.listdir(d))
    os.fchmod(fd, 0o640)
    rec.note("mode", oct(os.fstat(fd).st_mode))
    rec.do("fsync", os.fsync, fd)
    rec.do("fsetxattr", os.setxattr, fd, "user.x", b"1")
    rec.value("flistxattr", os.listxattr, fd)
    os.close(fd)
    (d / "dd").mkdir()
    dir_fd = os.open(d / "dd", os.O_RDONLY)
    os.rmdir(d / "dd")
    rec.note("removed dir nlink", os.fstat(dir_fd).st_nlink)
    rec.value("list removed dir", os.listdir, dir_fd)
    rec.do("create in removed dir", os.open, "x", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dir_fd)
    os.close(dir_fd)


# Probes: attributes and permissions


@probe
def modes_owners_times(rec: Record, d: Path) -> None:
    f = d / "f"
    f.write_bytes(b"x")
    os.chmod(f, 0o7777)
    rec.note("mode 7777", oct(os.stat(f).st_mode))
    os.chmod(f, 0o644)
    os.chown(f, 1234, 5678)
    rec.note("chown", (os.stat(f).st_uid, os.stat(f).st_gid))
    os.chown(f, -1, 42)
    rec.note("chown group only", (os.stat(f).st_uid, os.stat(f).st_gid))
    for atime, mtime in [(123456789123456789, 987654321987654321), (1, -1), (0, 0), (2**62, 2**62)]:
        os.utime(f, ns=(atime, mtime))
        rec.note(f"utime {atime} {mtime}", (os.stat(f).st_atime_ns, os.stat(f).st_mtime_ns))
    os.utime(f, ns=(5_000_000_123, 7_000_000_456))
    start = time.time_ns()
    utimensat(f, (0, UTIME_OMIT), (0, UTIME_NOW))
    info = os.stat(f)
    rec.note("UTIME_OMIT keeps atime", info.st_atime_ns)
    rec.note("UTIME_NOW sets mtime", abs(info.st_mtime_ns - start) < 2 * 10**9)
    utimensat(f, (0, UTIME_NOW), (0, UTIME_OMIT))
    info = os.stat(f)
    rec.note("UTIME_NOW sets atime", abs(info.st_atime_ns - start) < 2 * 10**9)
    rec.note("UTIME_OMIT keeps mtime", info.st_mtime_ns == 7_000_000_456)
    ctime = os.stat(f).st_ctime_ns
    utimensat(f, (0, UTIME_OMIT), (0, UTIME_OMIT))
    rec.note("omitting both keeps ctime", os.stat(f).st_ctime_ns == ctime)
    rec.do("nanoseconds out of range", utimensat, f, (0, 10**9), (0, 0))
    os.symlink("f", d / "l")
    os.utime(d / "l", ns=(10**18, 10**18), follow_symlinks=False)
    rec.note("lutimes", (os.lstat(d / "l").st_mtime_ns, os.stat(d / "l").st_mtime_ns == 10**18))

    def changes(label: str, attribute: str, path: Path, action: Callable[[], Any]) -> None:
        before = getattr(os.stat(path), attribute)
        time.sleep(TICK)
        action()
        rec.note(f"{label}: {attribute} changed", getattr(os.stat(path), attribute) != before)

    changes("chmod", "st_ctime_ns", f, lambda: os.chmod(f, 0o600))
    changes("link", "st_ctime_ns", f, lambda: os.link(f, d / "f2"))
    changes("rename", "st_ctime_ns", f, lambda: os.rename(d / "f2", d / "f3"))
    changes("create in dir", "st_mtime_ns", d, lambda: (d / "new").touch())
    changes("unlink in dir", "st_mtime_ns", d, lambda: os.unlink(d / "new"))
    changes("append", "st_mtime_ns", f, lambda: _append(f, b"y"))
    changes("shrink", "st_mtime_ns", f, lambda: os.truncate(f, 1))
    changes("O_TRUNC", "st_mtime_ns", f, lambda: _open_close(f, os.O_WRONLY | os.O_TRUNC))
    changes(
        "O_TRUNC of an empty file",
        "st_mtime_ns",
        f,
        lambda: _open_close(f, os.O_WRONLY | os.O_TRUNC),
    )

    def ftruncate_same() -> None:
        fd = os.open(f, os.O_RDWR)
        os.ftruncate(fd, 0)
        os.close(fd)

    changes("ftruncate to the same size", "st_mtime_ns", f, ftruncate_same)
    changes("empty write", "st_mtime_ns", f, lambda: _append(f, b""))
    (d / "a").mkdir()
    (d / "b").mkdir()
    moved = d / "b" / "a"
    changes("move a dir out", "st_mtime_ns", d, lambda: os.rename(d / "a", moved))
    before = os.stat(moved)
    time.sleep(TICK)
    os.rename(moved, d / "b" / "c")
    after = os.stat(d / "b" / "c")
    rec.note("rename of a dir: its ctime changed", after.st_ctime_ns != before.st_ctime_ns)
    rec.note("rename of a dir: its mtime changed", after.st_mtime_ns != before.st_mtime_ns)


@probe
def setgid_directories(rec: Record, d: Path) -> None:
    os.chown(d, 0, 4242)
    os.chmod(d, 0o2775)
    (d / "f").touch()
    (d / "sub").mkdir()
    os.mkfifo(d / "fifo")
    os.symlink("x", d / "link")
    for name in ("f", "sub", "fifo", "link"):
        info = os.lstat(d / name)
        rec.note(f"{name} inherits", (info.st_gid, oct(info.st_mode)))
    os.chmod(d, 0o2777)

    def as_nobody(r: Record) -> None:
        fd = r.do("create", os.open, d / "u", os.O_CREAT | os.O_WRONLY, 0o2755)
        if fd is not None:
            os.close(fd)
        r.note("created", (oct(os.stat(d / "u").st_mode), os.stat(d / "u").st_gid))
        r.do("mkdir", os.mkdir, d / "ud", 0o755)
        r.note("made dir", oct(os.stat(d / "ud").st_mode))
        r.do("chmod g+s as non-member", os.chmod, d / "u", 0o2755)
        r.note("after chmod", oct(os.stat(d / "u").st_mode))

    rec.note("as nobody", as_user(as_nobody))
    (d / "suid").write_bytes(b"x")
    os.chmod(d / "suid", 0o6777)

    def write_as_nobody(r: Record) -> None:
        with open(d / "suid", "ab") as file:
            file.write(b"y")
        r.note("write by non-owner", oct(os.stat(d / "suid").st_mode))

    rec.note("write clears set-id", as_user(write_as_nobody))
    os.chmod(d / "suid", 0o6777)

    def truncate_as_nobody(r: Record) -> None:
        os.truncate(d / "suid", 0)
        r.note("truncate by non-owner", oct(os.stat(d / "suid").st_mode))

    rec.note("truncate clears set-id", as_user(truncate_as_nobody))
    os.chmod(d / "suid", 0o6755)
    os.chown(d / "suid", 5, 5)
    rec.note("chown by root", oct(os.stat(d / "suid").st_mode))
    os.chmod(d / "suid", 0o6755)
    os.chown(d / "suid", -1, -1)
    rec.note("chown to nothing", oct(os.stat(d / "suid").st_mode))


@probe
def sticky_directory(rec: Record, d: Path) -> None:
    os.chmod(d, 0o1777)
    (d / "rootfile").write_bytes(b"r")
    os.chmod(d / "rootfile", 0o666)

    def first_user(r: Record) -> None:
        r.do("unlink root's file", os.unlink, d / "rootfile")
        r.do("rename root's file", os.rename, d / "rootfile", d / "x")
        r.do("write root's file", lambda: open(d / "rootfile", "ab").close())
        (d / "mine").touch()
        r.do("unlink own file", os.unlink, d / "mine")
        (d / "mine2").touch()

    def second_user(r: Record) -> None:
        r.do("unlink other's file", os.unlink, d / "mine2")
        r.do("rename root's file", renameat2, d / "rootfile", d / "zz", 0)
        (d / "zz3").touch()
        r.do("rename own file over other's", os.rename, d / "zz3", d / "mine2")

    rec.note("first user", as_user(first_user))
    rec.note("second user", as_user(second_user, uid=NOBODY - 1, gid=NOBODY - 1))
    rec.note("entries", sorted(os.listdir(d)))


@probe
def permissions_as_nobody(rec: Record, d: Path) -> None:
    (d / "ro").write_bytes(b"ro")
    os.chmod(d / "ro", 0o644)
    (d / "none").write_bytes(b"n")
    os.chmod(d / "none", 0o000)
    (d / "x").write_bytes(b"#!/bin/sh\n")
    os.chmod(d / "x", 0o711)
    (d / "priv").mkdir(0o700)
    (d / "priv" / "f").write_bytes(b"")
    for name, mode in (("wx", 0o733), ("rx", 0o744)):
        (d / name).mkdir()
        os.chmod(d / name, mode)
        (d / name / "in").write_bytes(b"i")

    def steps(r: Record) -> None:
        checks = [("ro", os.R_OK), ("ro", os.W_OK), ("ro", os.X_OK), ("none", os.R_OK)]
        checks += [("none", os.F_OK), ("x", os.X_OK), ("x", os.R_OK), ("priv", os.X_OK)]
        checks += [("priv/f", os.F_OK), (".", os.W_OK), ("rx", os.R_OK), ("wx", os.W_OK)]
        for name, mode in checks:
            r.note(f"access {name} {mode}", os.access(d / name, mode))
        r.value("read ro", lambda: (d / "ro").read_bytes())
        r.do("append to ro", lambda: open(d / "ro", "ab").close())
        r.do("read none", lambda: (d / "none").read_bytes())
        r.do("list priv", os.listdir, d / "priv")
        r.do("stat in priv", os.stat, d / "priv" / "f")
        r.do("chmod other's file", os.chmod, d / "ro", 0o777)
        r.do("chown other's file", os.chown, d / "ro", NOBODY, -1)
        r.do("set times of other's file", os.utime, d / "ro", (1, 1))
        r.do("touch other's read-only file", os.utime, d / "ro", None)
        r.do("unlink in root's dir", os.unlink, d / "ro")
        r.do("mkdir in root's dir", os.mkdir, d / "newd")
        r.do("list write-exec dir", os.listdir, d / "wx")
        r.value("read in write-exec dir", lambda: (d / "wx" / "in").read_bytes())
        r.value("list read-only dir", os.listdir, d / "rx")
        r.do("stat in read-only dir", os.stat, d / "rx" / "in")
        r.do("truncate other's file", os.truncate, d / "ro", 0)
        r.do("set user xattr", os.setxattr, d / "ro", "user.a", b"1")
        r.do("get missing user xattr", os.getxattr, d / "ro", "user.a")
        r.do("set trusted xattr", os.setxattr, d / "ro", "trusted.a", b"1")

    rec.note("as nobody", as_user(steps))
    os.setxattr(d / "ro", "trusted.t", b"1")
    os.setxattr(d / "ro", "user.u", b"2")

    def xattr_steps(r: Record) -> None:
        r.value("listxattr hides trusted", lambda: sorted(os.listxattr(d / "ro")))
        r.do("getxattr trusted", os.getxattr, d / "ro", "trusted.t")

    rec.note("xattrs as nobody", as_user(xattr_steps))
    rec.note(
        "gid 0 gives no write", as_user(lambda r: r.note("w", os.access(d / "ro", os.W_OK)), gid=0)
    )
    os.chown(d / "ro", 0, 100)
    os.chmod(d / "ro", 0o464)

    def group_steps(r: Record) -> None:
        r.note("group write", os.access(d / "ro", os.W_OK))
        r.note("other read", os.access(d / "ro", os.R_OK))

    rec.note("supplementary group", as_user(group_steps, groups=(100,)))
    os.chown(d / "ro", NOBODY, 100)
    os.chmod(d / "ro", 0o077)

    def owner_steps(r: Record) -> None:
        r.note("owner without bits", os.access(d / "ro", os.R_OK))
        r.do("owner read", lambda: (d / "ro").read_bytes())

    rec.note("owner class wins", as_user(owner_steps, groups=(100,)))


@probe
def open_descriptor_keeps_access(rec: Record, d: Path) -> None:
    f = d / "f"
    f.write_bytes(b"data")
    os.chmod(f, 0o666)
    os.chmod(d, 0o777)
    opened, go_on = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            fd = os.open(f, os.O_RDWR)
            os.write(opened[1], b"1")
            os.read(go_on[0], 1)
            record = Record()
            record.value("pwrite", os.pwrite, fd, b"XY", 0)
            record.do("ftruncate", os.ftruncate, fd, 3)
            record.do("fsync", os.fsync, fd)
            record.value("pread", os.pread, fd, 10, 0)
            record.do("fchmod", os.fchmod, fd, 0o644)
            os.write(opened[1], pickle.dumps(record.steps))
        finally:
            os._exit(0)
    os.close(opened[1])
    assert os.read(opened[0], 1) == b"1", "the child could not open the file"
    os.chmod(f, 0)
    os.write(go_on[1], b"1")
    with os.fdopen(opened[0], "rb") as pipe:
        payload = pipe.read()
    os.waitpid(pid, 0)
    for fd in go_on:
        os.close(fd)
    rec.note("calls through a descriptor opened before chmod 0", pickle.loads(payload))
    rec.note("content", f.read_bytes())
    (d / "sub").mkdir()
    os.chmod(d / "sub", 0o777)
    rec.note("mkdir", as_user(lambda r: r.do("mkdir", os.mkdir, d / "sub" / "u")))
    os.chmod(d / "sub", 0o555)

    def in_read_only_dir(r: Record) -> None:
        r.do("rmdir", os.rmdir, d / "sub" / "u")
        r.do("rename out", os.rename, d / "sub" / "u", d / "u2")
        r.do("mkdir", os.mkdir, d / "sub" / "v")

    rec.note("read-only dir", as_user(in_read_only_dir))
    os.chmod(d / "sub", 0o777)
    (d / "tgt").mkdir()
    os.chmod(d / "tgt", 0o777)
    (d / "sub" / "rootdir").mkdir(0o755)

    def move_root_dir(r: Record) -> None:
        r.do("move root's dir to another dir", os.rename, d / "sub" / "rootdir", d / "tgt" / "r")
        r.do("rename root's dir in place", os.rename, d / "sub" / "rootdir", d / "sub" / "r2")

    rec.note("moving a dir one cannot write", as_user(move_root_dir))


@probe
def xattrs(rec: Record, d: Path) -> None:
    f = d / "f"
    f.write_bytes(b"")
    rec.do("get missing", os.getxattr, f, "user.none")
    rec.do("set", os.setxattr, f, "user.a", b"1")
    rec.do("create existing", os.setxattr, f, "user.a", b"2", os.XATTR_CREATE)
    rec.do("replace missing", os.setxattr, f, "user.b", b"2", os.XATTR_REPLACE)
    rec.do("replace existing", os.setxattr, f, "user.a", b"3", os.XATTR_REPLACE)
    rec.value("get replaced", os.getxattr, f, "user.a")
    rec.do("set empty value", os.setxattr, f, "user.empty", b"")
    rec.value("get empty value", os.getxattr, f, "user.empty")
    rec.value("list", lambda: sorted(os.listxattr(f)))
    rec.do("remove", os.removexattr, f, "user.a")
    rec.do("remove again", os.removexattr, f, "user.a")
    rec.do("name of 255 bytes", os.setxattr, f, "user." + "n" * 250, b"v")
    rec.do("name of 256 bytes", os.setxattr, f, "user." + "n" * 251, b"v")
    rec.do("name without suffix", os.setxattr, f, "user.", b"v")
    rec.do("unknown namespace", os.setxattr, f, "bogus.x", b"v")
    rec.do("get unknown namespace", os.getxattr, f, "bogus.x")
    rec.do("invalid ACL", os.setxattr, f, "system.posix_acl_access", b"v")
    rec.do("trusted", os.setxattr, f, "trusted.t", b"t")
    rec.do("security", os.setxattr, f, "security.s", b"s")
    rec.value("value of 3000 bytes", lambda: os.setxattr(f, "user.big", b"v" * 3000))
    rec.value("get 3000 bytes", lambda: len(os.getxattr(f, "user.big")))
    rec.do("value over 64 KiB", os.setxattr, f, "user.huge", b"v" * 65537)
    g = d / "g"
    g.write_bytes(b"")
    for i in range(20):
        os.setxattr(g, f"user.k{i:02d}", b"x" * 50)
    rec.value("list of 20", lambda: sorted(os.listxattr(g)))
    os.setxattr(f, "user.sz", b"hello")
    buffer = ctypes.create_string_buffer(1)
    size = _libc.getxattr(bytes(f), b"user.sz", buffer, 1)
    rec.note("getxattr into a short buffer", (size, ctypes.get_errno() if size < 0 else 0))
    rec.note("getxattr size query", _libc.getxattr(bytes(f), b"user.sz", None, 0))
    names = os.listxattr(f)
    expected_size = sum(len(name.encode()) + 1 for name in names)
    rec.note("listxattr size query", _libc.listxattr(bytes(f), None, 0) == expected_size)
    size = _libc.listxattr(bytes(f), buffer, 1)
    rec.note("listxattr into a short buffer", (size, ctypes.get_errno() if size < 0 else 0))
    os.symlink("f", d / "l")
    rec.do("user xattr on a symlink", os.setxattr, d / "l", "user.a", b"1", follow_symlinks=False)
    rec.do(
        "trusted xattr on a symlink", os.setxattr, d / "l", "trusted.a", b"1", follow_symlinks=False
    )
    rec.value("list on a symlink", os.listxattr, d / "l", follow_symlinks=False)
    os.mkfifo(d / "fifo")
    rec.do("user xattr on a fifo", os.setxattr, d / "fifo", "user.a", b"1")
    rec.do("user xattr on a dir", os.setxattr, d, "user.dir", b"1")
    rec.value("get on a dir", os.getxattr, d, "user.dir")
    (d / "sticky").mkdir()
    os.chmod(d / "sticky", 0o1777)
    os.chmod(f, 0o666)

    def nobody_steps(r: Record) -> None:
        r.do("user xattr on a sticky dir", os.setxattr, d / "sticky", "user.a", b"1")
        r.do("user xattr on a writable file", os.setxattr, f, "user.w", b"1")
        r.do("security xattr", os.setxattr, f, "security.w", b"1")

    rec.note("as nobody", as_user(nobody_steps))
    ctime = os.stat(f).st_ctime_ns
    time.sleep(TICK)
    os.setxattr(f, "user.c", b"1")
    rec.note("setxattr sets ctime", os.stat(f).st_ctime_ns != ctime)


# Probes: concurrency, descriptors and space


@probe
def concurrent_writers(rec: Record, d: Path) -> None:
    f = d / "f"
    fd = os.open(f, os.O_CREAT | os.O_RDWR, 0o644)
    record_size = 10007

    def write_records(worker: int) -> None:
        data = bytes([65 + worker]) * record_size
        for i in range(60):
            os.pwrite(fd, data, (i * 8 + worker) * record_size)

    threads = [threading.Thread(target=write_records, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    os.fsync(fd)
    expected = b"".join(bytes([65 + k]) * record_size for _ in range(60) for k in range(8))
    rec.note("pwrite from 8 threads", os.pread(fd, 10 * MIB, 0) == expected)
    os.close(fd)
    g = d / "g"
    fds = [os.open(g, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644) for _ in range(4)]

    def append_lines(worker: int) -> None:
        for i in range(200):
            os.write(fds[worker], f"{worker}:{i:04d}{'.' * 93}\n".encode())

    threads = [threading.Thread(target=append_lines, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for descriptor in fds:
        os.close(descriptor)
    lines = g.read_bytes().split(b"\n")[:-1]
    rec.note("appended lines", len(lines))
    rec.note("no torn line", all(len(line) == 99 for line in lines))
    rec.note("no lost line", len(set(lines)))


@probe
def two_descriptors(rec: Record, d: Path) -> None:
    f = d / "f"
    writer = os.open(f, os.O_CREAT | os.O_WRONLY, 0o644)
    reader = os.open(f, os.O_RDONLY)
    appender = os.open(f, os.O_WRONLY | os.O_APPEND)
    both = os.open(f, os.O_RDWR)
    os.write(writer, b"0123456789" * 10_000)
    rec.note("reader sees writer", os.pread(reader, 10, BLOCK - 6))

    os.write(appender, b"APPENDED")
    rec.note("size after append", os.fstat(reader).st_size)
    os.pwrite(both, b"XX", BLOCK - 1)
    rec.note("reader sees O_RDWR write", os.pread(reader, 4, BLOCK - 2))
    rec.do("write to O_RDONLY", os.write, reader, b"no")
    rec.do("read from O_WRONLY", os.read, writer, 1)

    os.ftruncate(both, 70_000)
    rec.note("reader after truncate", os.pread(reader, 100, 69_990))
    rec.note("writer offset", os.lseek(writer, 0, os.SEEK_CUR))
    os.write(writer, b"W")
    rec.note("size after write at old offset", os.fstat(reader).st_size)
    rec.note("hole", os.pread(reader, 3, 69_999))
    os.write(appender, b"A")
    rec.note("size after append", os.fstat(appender).st_size)

    with mmap.mmap(both, 0) as mapping:
        mapping[0:4] = b"MMAP"
        rec.note("reader sees mapping", os.pread(reader, 4, 0))
        os.pwrite(writer, b"PWRT", 4)
        rec.note("mapping sees writer", mapping[0:8])
    for descriptor in (writer, reader, appender, both):
        os.close(descriptor)
    rec.note("digest", hashlib.sha256(f.read_bytes()).hexdigest())
    reader = os.open(f, os.O_RDONLY)
    os.chmod(f, 0)
    rec.note("read after chmod 0", os.pread(reader, 4, 0))
    os.close(reader)


@probe
def directory_streams(rec: Record, d: Path) -> None:
    for i in range(300):
        (d / f"e{i:03d}").write_bytes(b"")
    seen: list[str] = []
    with os.scandir(d) as entries:
        for index, entry in enumerate(entries):
            seen.append(entry.name)
            if index == 10:
                for i in range(300):
                    name = f"e{i:03d}"
                    if name not in seen:
                        os.unlink(d / name)
    rec.note("no name twice while deleting", len(set(seen)) == len(seen))
    with os.scandir(d) as entries:
        inodes = [(entry.inode(), os.lstat(entry.path).st_ino) for entry in entries]
    rec.note("inode numbers match stat", all(listed == real for listed, real in inodes))
    fd = os.open(d, os.O_RDONLY)
    rec.do("read a directory", os.read, fd, 10)
    rec.do("write a directory", os.write, fd, b"x")
    rec.do("fsync a directory", os.fsync, fd)
    os.close(fd)
    old = os.umask(0o027)
    try:
        (d / "masked").mkdir(0o777)
        _open_close(d / "masked-file", os.O_CREAT | os.O_WRONLY, 0o666)
    finally:
        os.umask(old)
    rec.note("umask", (oct(os.stat(d / "masked").st_mode), oct(os.stat(d / "masked-file").st_mode)))


@probe
def locks(rec: Record, d: Path) -> None:
    import fcntl

    (d / "f").write_bytes(b"x")
    first = os.open(d / "f", os.O_RDWR)
    second = os.open(d / "f", os.O_RDWR)
    rec.do("flock", fcntl.flock, first, fcntl.LOCK_EX | fcntl.LOCK_NB)
    rec.do("flock held by another description", fcntl.flock, second, fcntl.LOCK_EX | fcntl.LOCK_NB)
    rec.do("lockf", fcntl.lockf, first, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(first)
    rec.do("flock after close", fcntl.flock, second, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(second)


@probe
def statfs_tracks_usage(rec: Record, d: Path) -> None:
    before = os.statvfs(d)
    rec.note("name max", before.f_namemax)
    with open(d / "f", "wb") as file:
        file.write(_pattern(2, 8 * MIB))
        os.fsync(file.fileno())
    during = os.statvfs(d)
    used = (before.f_bfree - during.f_bfree) * during.f_frsize
    rec.note("8 MiB file uses 7 to 10 MiB", 7 * MIB <= used <= 10 * MIB)
    rec.note("one inode more in use", during.f_ffree < before.f_ffree)
    os.unlink(d / "f")
    os.sync()
    after = os.statvfs(d)
    rec.note("space back after unlink", (before.f_bfree - after.f_bfree) * after.f_frsize < MIB)
    rec.note("inode back after unlink", after.f_ffree == before.f_ffree)
    rec.note("counts ordered", after.f_bavail <= after.f_bfree <= after.f_blocks)


@probe
def blocks_after_close(rec: Record, d: Path) -> None:
    with open(d / "dense", "wb") as file:
        file.write(b"y" * MIB)
    with open(d / "sparse", "wb") as file:
        file.seek(MIB)
        file.write(b"x")
    dense, sparse = os.stat(d / "dense"), os.stat(d / "sparse")
    rec.note("dense file blocks cover its size", dense.st_blocks * 512 >= MIB)
    rec.note("dense file blocks not over one block more", dense.st_blocks * 512 <= MIB + BLOCK)
    rec.note("sparse file blocks one block at most", sparse.st_blocks * 512 <= BLOCK)
    result = subprocess.run(["du", "-B1", str(d / "dense")], capture_output=True, text=True)
    rec.note("du matches st_blocks", int(result.stdout.split()[0]) == dense.st_blocks * 512)


@pytest.mark.parametrize("function", PROBES, ids=[function.__name__ for function in PROBES])
def test_probe_matches_ext4(pair: Pair, function: Probe) -> None:
    expected = run_probe(function, pair.ext4.mountpoint / function.__name__)
    actual = run_probe(function, pair.pxfs.mountpoint / function.__name__)
    assert actual == expected


# Remount


def _prepare_for_remount(d: Path) -> None:
    d.mkdir()
    with open(d / "shrunk", "wb") as file:
        file.write(b"\x11" * 200_000)
    os.truncate(d / "shrunk", 70_001)
    with open(d / "grown", "wb") as file:
        file.write(b"\x22" * 2 * BLOCK)
    os.truncate(d / "grown", 5 * BLOCK + 3)

    with open(d / "emptied", "wb") as file:
        file.write(b"\x33" * 100)
    os.truncate(d / "emptied", 0)
    with open(d / "regrown", "wb") as file:
        file.write(b"\x44" * 3 * BLOCK)
    os.truncate(d / "regrown", BLOCK + 1)
    os.truncate(d / "regrown", 3 * BLOCK)

    with open(d / "synced", "wb") as file:
        file.write(b"\x55" * 300_000)
        os.fsync(file.fileno())
    os.truncate(d / "synced", 1000)
    with open(d / "sparse", "wb") as file:
        file.seek(10 * MIB)
        file.write(b"e")

    os.utime(d / "shrunk", ns=(111111111123456789, 222222222987654321))
    os.setxattr(d / "shrunk", "user.k", b"v" * 1000)
    os.link(d / "shrunk", d / "hard")
    os.symlink("t" * 3000, d / "symlink")
    os.mkfifo(d / "fifo")
    os.mkdir(d / "sub")
    os.chmod(d / "sub", 0o3755)
    os.chown(d / "sub", 12, 34)

    fd = os.open(d / "unlinked", os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, b"gone")
    os.unlink(d / "unlinked")
    os.close(fd)


def _describe_tree(d: Path) -> dict[str, dict[str, Any]]:
    tree: dict[str, dict[str, Any]] = {}
    for name in sorted(os.listdir(d)):
        path = d / name
        info = os.lstat(path)
        entry: dict[str, Any] = {"mode": oct(info.st_mode), "nlink": info.st_nlink}
        entry["owner"] = (info.st_uid, info.st_gid)
        if stat.S_ISREG(info.st_mode):
            entry["size"] = info.st_size
            entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            entry["xattrs"] = {key: os.getxattr(path, key) for key in os.listxattr(path)}
        if stat.S_ISLNK(info.st_mode):
            entry["target"] = os.readlink(path)
        if name in ("shrunk", "hard"):
            entry["mtime"] = info.st_mtime_ns
        tree[name] = entry
    return tree


def test_remount_keeps_what_ext4_keeps(pair: Pair) -> None:
    ext4_dir = pair.ext4.mountpoint / "remount"
    pxfs_dir = pair.pxfs.mountpoint / "remount"
    for d in (ext4_dir, pxfs_dir):
        if d.exists():
            shutil.rmtree(d)
        _prepare_for_remount(d)
    assert _describe_tree(pxfs_dir) == _describe_tree(ext4_dir)
    pair.ext4.remount()
    pair.pxfs.remount()
    after = _describe_tree(ext4_dir)
    assert _describe_tree(pxfs_dir) == after
    assert after["shrunk"]["size"] == 70_001


# Random operations


class RandomOperations:
    """fsx-style random operations on one file per filesystem, compared after each step."""

    MAX_OFFSET = 2 * MIB
    #: Operation kinds, drawn uniformly: a kind listed twice is drawn twice as often.
    KINDS: tuple[str, ...] = ("write", "write", "read", "truncate", "map-write", "map-read")
    KINDS += ("fsync", "reopen", "pwritev", "direct-write", "direct-read", "compare")

    def __init__(self, seed: int, paths: list[Path]) -> None:
        self.seed = seed
        self.random = random.Random(seed)
        self.paths = paths
        self.fds = [os.open(p, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o644) for p in paths]
        self.direct = [os.open(p, os.O_RDWR | os.O_DIRECT) for p in paths]
        self.history: list[tuple[int, str, int, int]] = []

    def close(self) -> None:
        """Close every descriptor."""
        for fd in self.fds + self.direct:
            os.close(fd)

    def _offset(self) -> int:
        if self.random.random() < 0.5:
            near = self.random.randrange(0, self.MAX_OFFSET // BLOCK + 1) * BLOCK
            return max(0, near + self.random.randint(-3, 3))
        return self.random.randrange(0, self.MAX_OFFSET)

    def _length(self) -> int:
        choices = [1, 2, 3, BLOCK - 1, BLOCK, BLOCK + 1]
        choices += [self.random.randint(1, 4096), self.random.randint(1, 3 * BLOCK)]
        return self.random.choice(choices)

    def step(self, index: int) -> None:
        """Run one random operation on both files and assert that the outcomes match."""
        kind = self.random.choice(self.KINDS)
        offset, length = self._offset(), self._length()
        if kind in ("direct-write", "direct-read"):
            # ext4 needs O_DIRECT I/O aligned to its logical block size.
            offset, length = offset // 4096 * 4096, max(4096, length // 4096 * 4096)
        elif kind in ("map-write", "map-read"):
            size = os.fstat(self.fds[0]).st_size
            if size == 0:
                return
            offset = self.random.randrange(0, size)
            length = min(length, size - offset)
        elif kind == "truncate":
            offset = self.random.choice([offset, offset // BLOCK * BLOCK, 0])
        self.history.append((index, kind, offset, length))
        data = self.random.randbytes(length)
        outcomes = [self._run(kind, n, offset, length, data) for n in range(2)]
        sizes = [os.fstat(fd).st_size for fd in self.fds]
        context = f"seed {self.seed}, last operations {self.history[-6:]}"
        assert sizes[1] == sizes[0], context
        assert outcomes[1] == outcomes[0], context

    def _run(self, kind: str, n: int, offset: int, length: int, data: bytes) -> Any:
        fd = self.fds[n]
        try:
            if kind == "write":
                return os.pwrite(fd, data, offset)
            if kind == "pwritev":
                third = len(data) // 3
                return os.pwritev(fd, [data[:third], data[third:]], offset)
            if kind == "read":
                return os.pread(fd, length, offset)
            if kind == "truncate":
                return os.ftruncate(fd, offset)
            if kind in ("map-write", "map-read"):
                return self._mapped(fd, kind, offset, data)
            if kind in ("direct-write", "direct-read"):
                return self._direct(self.direct[n], kind, offset, data)
            if kind == "fsync":
                return os.fsync(fd)
            if kind == "reopen":
                os.close(fd)
                self.fds[n] = os.open(self.paths[n], os.O_RDWR)
                return None
            return os.pread(fd, 2 * self.MAX_OFFSET + 4 * BLOCK, 0)
        except OSError as exc:
            return errno.errorcode.get(exc.errno or 0, exc.errno)

    @staticmethod
    def _mapped(fd: int, kind: str, offset: int, data: bytes) -> bytes | None:
        start = offset // mmap.PAGESIZE * mmap.PAGESIZE
        with mmap.mmap(fd, offset + len(data) - start, offset=start) as mapping:
            if kind == "map-write":
                mapping[offset - start : offset - start + len(data)] = data
                mapping.flush()
                return None
            return mapping[offset - start : offset - start + len(data)]

    @staticmethod
    def _direct(fd: int, kind: str, offset: int, data: bytes) -> int | bytes:
        # O_DIRECT needs an aligned buffer, which an anonymous mapping is.
        with mmap.mmap(-1, len(data)) as buffer:
            if kind == "direct-write":
                buffer.write(data)
                return os.pwritev(fd, [buffer], offset)
            count = os.preadv(fd, [buffer], offset)
            return buffer[:count]


@pytest.mark.parametrize("seed", [1, 2])
def test_random_operations_match_ext4(pair: Pair, seed: int) -> None:
    name = f"fsx-{seed}"
    paths = [pair.ext4.mountpoint / name, pair.pxfs.mountpoint / name]
    operations = RandomOperations(seed, paths)
    try:
        for index in range(2500):
            operations.step(index)
    finally:
        operations.close()
    assert paths[1].read_bytes() == paths[0].read_bytes()


# Full volume


def _fill(directory: Path, file_size: int, limit: int) -> list[str]:
    """Write files of `file_size` until a call fails or `limit` bytes; return the errno names."""
    errors: list[str] = []
    written = 0
    index = 0
    while written < limit and not errors:
        fd = os.open(directory / f"fill{index}", os.O_CREAT | os.O_WRONLY, 0o644)
        index += 1
        try:
            for _ in range(file_size // MIB):
                written += os.write(fd, b"\xab" * MIB)
            os.fsync(fd)
        except OSError as exc:
            errors.append(errno.errorcode.get(exc.errno or 0, str(exc.errno)))
        finally:
            try:
                os.close(fd)
            except OSError as exc:
                errors.append(errno.errorcode.get(exc.errno or 0, str(exc.errno)))
    return errors


def _full_volume_steps(root: Path, remount: Callable[[], None]) -> list[tuple[str, Any]]:
    rec = Record()
    free_before = os.statvfs(root).f_bfree * os.statvfs(root).f_frsize
    # Files of a quarter of the volume: a write past the volume size is a different error.
    errors = _fill(root, SMALL_BYTES // 4, 2 * SMALL_BYTES)
    rec.note("ENOSPC reported by write, fsync or close", errors[:1] == ["ENOSPC"])
    for name in os.listdir(root):
        if name.startswith("fill"):
            os.unlink(root / name)
    os.sync()
    free_after = os.statvfs(root).f_bfree * os.statvfs(root).f_frsize
    rec.note("space back after delete", free_before - free_after < MIB)
    data = _pattern(3, SMALL_BYTES // 2)
    with open(root / "again", "wb") as file:
        rec.value("write again", file.write, data)
        rec.do("fsync again", os.fsync, file.fileno())
    remount()
    rec.note("data after remount", (root / "again").read_bytes() == data)
    rec.note("entries after remount", sorted(n for n in os.listdir(root) if n != "lost+found"))
    return rec.steps


def test_full_volume_recovers_like_ext4(tmp_path: Path) -> None:
    with mounted_pair(tmp_path, SMALL_BYTES, SMALL_BYTES) as small:
        expected = _full_volume_steps(small.ext4.mountpoint, small.ext4.remount)
        actual = _full_volume_steps(small.pxfs.mountpoint, small.pxfs.remount)
        small.pxfs.stop()
        check = small.pxfs.check()
        assert check.returncode == 0, check.stdout + check.stderr
        small.pxfs.start()
    assert actual == expected
