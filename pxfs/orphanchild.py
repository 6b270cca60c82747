"""Stopping a mount child that a killed pxd left behind.

A mount child outlives a pxd that is killed (SIGKILL, a crash). It keeps serving its volume at
the volume's paths, with every I/O that needs pxd failing, and it keeps listening on its control
socket, so a new child of the same volume cannot start. The next pxd finds such a child by its
control socket: the kernel reports the pid of the process that listens on a unix socket
(SO_PEERCRED), and /proc shows whether that process is a mount child started with that socket.
pxd stops it with SIGTERM, and with SIGKILL when it has not exited after ORPHAN_STOP_TIMEOUT
seconds.

The orphan's mounts at the volume's paths stay until the new child's bind goes beneath them
(pxfs/hostmounts.py, replace_with_bind). In between, an access fails with EIO while the orphan
runs and with ENOTCONN once it has exited, but a path never shows the directory under it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import struct
from pathlib import Path

import trio

log = logging.getLogger(__name__)

#: Seconds that an orphaned child gets to exit after SIGTERM, and again after SIGKILL.
ORPHAN_STOP_TIMEOUT = 10.0
_PEERCRED = struct.Struct("3i")


def socket_server_pid(path: str) -> int | None:
    """Return the pid that listens on unix socket `path`, or None if none is found at once.

    The probe does not wait: a listener whose backlog is full, such as a stopped process,
    counts as none, so that pxd never blocks here.
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
        credentials = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except OSError:
        return None
    finally:
        probe.close()
    pid, uid, _ = _PEERCRED.unpack(credentials)
    # A socket in pxd's data directory that another user serves is not an orphan of pxd.
    return pid if uid == os.geteuid() and pid > 0 else None


def is_mount_child(pid: int, control_socket: str) -> bool:
    """Return whether process `pid` is a pxfs mount child started with `control_socket`."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if b"daemon.mount" not in argv or b"--control-socket" not in argv:
        return False
    index = argv.index(b"--control-socket") + 1
    return index < len(argv) and argv[index] == os.fsencode(control_socket)


async def stop_orphan_child(vol_id: str, control_socket: str) -> None:
    """Stop the mount child of an earlier pxd that still serves `control_socket`.

    A process that listens there but is not such a child is left alone. So is one that cannot
    be found at once; the new child then fails to start, and its restarts follow.
    """
    pid = socket_server_pid(control_socket)
    if pid is None:
        return
    try:
        # The pidfd pins the process, so a signal can never reach another one that reuses pid.
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        if not is_mount_child(pid, control_socket):
            log.warning(
                "volume %s: process %d listens on %s but is not its mount child; not stopping it",
                vol_id, pid, control_socket,
            )  # fmt: skip
            return
        log.warning(
            "volume %s: stopping mount child pid %d, left running by the last run of pxd",
            vol_id, pid,
        )  # fmt: skip
        for signum in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signum)
                # A stopped child handles SIGTERM only once it runs again (systemd does the same).
                signal.pidfd_send_signal(pidfd, signal.SIGCONT)
            with trio.move_on_after(ORPHAN_STOP_TIMEOUT):
                # A pidfd becomes readable when its process exits.
                await trio.lowlevel.wait_readable(pidfd)
                return
            log.warning(
                "volume %s: mount child pid %d still runs %g s after signal %d",
                vol_id, pid, ORPHAN_STOP_TIMEOUT, signum,
            )  # fmt: skip
    finally:
        os.close(pidfd)


def process_state(pid: int) -> str:
    """Return the state letter of `pid` in /proc ("T" for stopped by a signal), or ""."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # The command name in parentheses may contain spaces, so the fields start after its ")".
    return stat.rsplit(")", 1)[1].split()[0]
