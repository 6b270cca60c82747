"""Host mounts for pxd: mountinfo, bind mounts, lazy unmounts, syncfs.

pxd runs the mount tools (mount, umount, fusermount3) as subprocesses and reads
/proc/self/mountinfo, because a FUSE mount whose daemon died fails every stat of its path.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import subprocess
from collections.abc import Callable, Collection
from typing import Any

import trio

from pxfs import errors
from pxfs.errors import Busy, InvalidArgument, NotFound, Unavailable

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# The new mount API of Linux 5.2 and MOVE_MOUNT_BENEATH of Linux 6.5, which glibc does not wrap.
# System calls added since Linux 5.1 (number 424 and up) have one number on every architecture.
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_AT_FDCWD = -100
_OPEN_TREE_CLONE = 1
_MOVE_MOUNT_F_EMPTY_PATH = 0x04
_MOVE_MOUNT_BENEATH = 0x200


def mountinfo() -> dict[str, str]:
    """Return the filesystem type of every mountpoint of this mount namespace."""
    mounts: dict[str, str] = {}
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            separator = fields.index(b"-")
            mounts[_unescape_mount_path(fields[4])] = os.fsdecode(fields[separator + 1])
    return mounts


def mount_devices() -> dict[str, str]:
    """Return the device ("major:minor") of every mountpoint of this mount namespace.

    A bind mount has the device of the mount it binds, so this finds the binds of a mount.
    """
    devices: dict[str, str] = {}
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            devices[_unescape_mount_path(fields[4])] = os.fsdecode(fields[2])
    return devices


def _unescape_mount_path(raw: bytes) -> str:
    # The kernel writes space, tab, newline and backslash in paths as three octal digits.
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), raw))


#: Seconds that pxd waits for the stat of a path given by a user, in a thread of its own.
PATH_TIMEOUT = 10.0
#: Threads that may wait on such stats at once, apart from the threads of other work. So
#: threads left waiting on a stopped mount never hold up a syncfs.
PATH_THREADS = 4
#: Seconds that a mount tool (mount, umount, fusermount3) may run.
TOOL_TIMEOUT = 30.0
_PATH_THREADS: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("path_threads")


def parent_resolved(path: str, mountpoints: Collection[str] | None = None) -> str:
    """Return the absolute `path` with the symbolic links of its parent directories resolved.

    Unlike os.path.realpath, it stats neither `path` itself nor a parent that is a mountpoint,
    which cannot be a link. On a FUSE mount such a stat waits for the mount's process, and for
    as long as that process is stopped (SIGSTOP). `mountpoints` spares a read of mountinfo.
    """
    parent, name = os.path.split(path)
    if mountpoints is None:
        mountpoints = mountinfo()
    resolved = "/"
    for part in parent.split("/"):
        if part in ("", "."):
            continue
        candidate = os.path.join(resolved, part)
        if part == ".." or (candidate not in mountpoints and os.path.islink(candidate)):
            return os.path.join(os.path.realpath(parent), name)
        resolved = candidate
    return os.path.join(resolved, name)


async def resolve_in_thread(path: str, resolver: Callable[[str], str] = os.path.realpath) -> str:
    """Return resolver(path) from a thread; raise Unavailable when it takes over PATH_TIMEOUT.

    A thread that waits on a stopped FUSE mount is left behind until that mount's process runs
    again or dies.
    """
    try:
        limiter = _PATH_THREADS.get()
    except LookupError:
        limiter = trio.CapacityLimiter(PATH_THREADS)
        _PATH_THREADS.set(limiter)
    with trio.move_on_after(PATH_TIMEOUT):
        return await trio.to_thread.run_sync(
            resolver, path, abandon_on_cancel=True, limiter=limiter
        )
    raise Unavailable(
        f"the stat of {path} did not return within {PATH_TIMEOUT:g} s: the mount child of a "
        "volume on that path may be stopped (SIGSTOP); send it SIGCONT and try again"
    )


def is_mounted(path: str) -> bool:
    """True if `path` is a mountpoint, also when it is a FUSE mount whose daemon died."""
    # os.path.ismount stats the path, which fails on a dead FUSE mount and waits on a stopped
    # one, so mountinfo is read first.
    mountpoints = mountinfo()
    return parent_resolved(path, mountpoints) in mountpoints or os.path.ismount(path)


async def run_tool(*argv: str) -> str | None:
    """Run a mount tool; return None on success, else its error output.

    A tool that runs longer than TOOL_TIMEOUT is stopped and reported as failed. umount walks
    the path, which waits on a stopped mount child of a volume that the path is in.
    """
    result: subprocess.CompletedProcess[bytes] | None = None
    try:
        with trio.move_on_after(TOOL_TIMEOUT):
            result = await trio.run_process(
                list(argv), capture_stdout=True, capture_stderr=True, check=False
            )
        if result is None:
            return (
                f"{argv[0]} did not finish within {TOOL_TIMEOUT:g} s: the mount child of a "
                "volume on the path may be stopped (SIGSTOP)"
            )
    except FileNotFoundError:
        return f"{argv[0]} is not installed"
    except OSError as exc:
        return f"{argv[0]} could not run: {exc.strerror}"
    if result.returncode == 0:
        return None
    return (result.stderr or result.stdout).decode(errors="replace").strip() or (
        f"exit status {result.returncode}"
    )


async def lazy_unmount(path: str) -> None:
    """Detach `path` now, even if busy or dead; the kernel finishes when the last user goes."""
    if not is_mounted(path):
        return
    failure = await run_tool("fusermount3", "-u", "-z", path)
    if failure is not None and is_mounted(path):
        failure = await run_tool("umount", "-l", "--no-canonicalize", path)
    if failure is not None and is_mounted(path):
        log.error("lazy unmount of %s failed: %s", path, failure)


async def unmount(path: str) -> None:
    """Unmount `path`; raises Busy when a process still uses it."""
    # Without --no-canonicalize, umount stats `path`, which waits on a stopped FUSE daemon.
    failure = await run_tool("umount", "--no-canonicalize", path)
    if failure is not None and is_mounted(path):
        hint = ""
        if "busy" in failure:
            hint = (
                "; close the files open under it, or end the processes whose working directory "
                "is there, and unmount again"
            )
        raise Busy(f"cannot unmount {path}: {failure.rstrip('.')}{hint}")


def syncfs(path: str) -> None:
    """Make the kernel write the dirty pages of the filesystem at `path`: syncfs(2)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), path)
    finally:
        os.close(fd)


def _mount_beneath(source: str, target: str) -> None:
    """Bind `source` beneath the mount on top of `target`: open_tree(2) and move_mount(2)."""
    fd = _libc.syscall(
        _SYS_OPEN_TREE, _AT_FDCWD, os.fsencode(source), _OPEN_TREE_CLONE | os.O_CLOEXEC
    )
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), source)
    try:
        flags = _MOVE_MOUNT_F_EMPTY_PATH | _MOVE_MOUNT_BENEATH
        if _libc.syscall(_SYS_MOVE_MOUNT, fd, b"", _AT_FDCWD, os.fsencode(target), flags) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), target)
    finally:
        os.close(fd)


async def replace_with_bind(source: str, target: str) -> None:
    """Replace the mount on top of `target` with a bind of `source`; raises Unavailable.

    The bind goes beneath the old mount before that one is unmounted, so `target` is never a
    plain directory on the way. A kernel older than Linux 6.5, or one that rejects the move
    for the mount propagation of `target`, gets a lazy unmount and then a bind instead, and
    the directory under the mount shows for as long as that takes.
    """
    try:
        _mount_beneath(source, target)
    except OSError as exc:
        log.warning(
            "cannot mount beneath the mount at %s (%s); unmounting it before the bind",
            target,
            exc.strerror,
        )
        await lazy_unmount(target)
        await bind(source, target)
        return
    await lazy_unmount(target)


async def bind(source: str, target: str) -> None:
    """Bind-mount `source` onto `target`; raises Unavailable when mount fails."""
    failure = await run_tool("mount", "--bind", source, target)
    if failure is not None:
        raise Unavailable(f"bind mount of the volume at {target} failed: {failure}")


def normalize_path(path: Any) -> str:
    """Return the normalized form of a mount path; raises InvalidArgument for a bad one."""
    if not isinstance(path, str) or not path:
        raise InvalidArgument(f"mount path must be a non-empty string, not {path!r}")
    if "\0" in path:
        raise InvalidArgument(f"mount path {path!r} contains a NUL byte")
    if not os.path.isabs(path):
        raise InvalidArgument(f"mount path {path!r} is not absolute")
    return os.path.normpath(path)


def resolve_path(path: Any) -> str:
    """Return the mount path with every symbolic link resolved; raises InvalidArgument.

    pxd records and unmounts the resolved path, so a link that is changed later cannot
    redirect an unmount or a remount to another directory.
    """
    return os.path.realpath(normalize_path(path))


def leads_to_mount(path: str, mountpoint: str) -> bool:
    """True if `path` has no symbolic link on the way and is a bind of the mount at `mountpoint`.

    A directory on the way that was moved or replaced by a link since the mount makes `path`
    lead to another directory, and unmounting it would unmount whatever is mounted there.
    """
    # A path that mountinfo lists is a mountpoint, not a link, so only its parents need
    # resolving.
    devices = mount_devices()
    if parent_resolved(path, devices) != path:
        return False
    return path in devices and devices[path] == devices.get(parent_resolved(mountpoint, devices))


def binds_of(mountpoint: str) -> list[str]:
    """Return every other mountpoint of the filesystem mounted at `mountpoint`, newest first."""
    devices = mount_devices()
    mountpoint = parent_resolved(mountpoint, devices)
    device = devices.get(mountpoint)
    if device is None:
        return []
    binds = [path for path, other in devices.items() if other == device and path != mountpoint]
    return binds[::-1]


def check_mount_path(path: str) -> None:
    """Raise unless `path` is an existing empty directory that is not a mountpoint."""
    if is_mounted(path):
        raise Busy(f"mount path {path} is already a mountpoint")
    if not os.path.exists(path):
        raise NotFound(f"mount path {path} does not exist")
    if not os.path.isdir(path):
        raise errors.NotADirectory(f"mount path {path} is not a directory")
    try:
        with os.scandir(path) as entries:
            if next(entries, None) is not None:
                raise errors.NotEmpty(f"mount path {path} is not empty")
    except OSError as exc:
        raise InvalidArgument(f"mount path {path} cannot be read: {exc.strerror}") from None
