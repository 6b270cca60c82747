"""Stopping a mount child that a killed pxd left behind.

A mount child outlives a pxd that is killed (SIGKILL, a crash). It keeps serving its volume at
the volume's paths, with every I/O that needs pxd failing, and it keeps listening on its control
socket, so a new child of the same volume cannot start. The next pxd finds such a child by its
control socket: the kernel reports the pid of the process that listens on a unix socket
(SO_PEERCRED). pxd stops it with SIGTERM, and with SIGKILL when it has not let go of the socket
after ORPHAN_STOP_TIMEOUT seconds.

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

import trio

log = logging.getLogger(__name__)

#: Seconds that an orphaned child gets to exit after SIGTERM, and again after SIGKILL.
ORPHAN_STOP_TIMEOUT = 10.0
_POLL_INTERVAL = 0.05
_PEERCRED = struct.Struct("3i")


def socket_server_pid(path: str) -> int | None:
    """Return the pid of the process listening on unix socket `path`, or None if none is."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
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


async def stop_orphan_child(vol_id: str, control_socket: str) -> None:
    """Stop the process that still serves `control_socket`, a child of an earlier pxd."""
    pid = socket_server_pid(control_socket)
    if pid is None:
        return
    log.warning(
        "volume %s: stopping mount child pid %d, left running by the last run of pxd",
        vol_id, pid,
    )  # fmt: skip
    for signum in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
        with trio.move_on_after(ORPHAN_STOP_TIMEOUT):
            while socket_server_pid(control_socket) == pid:
                await trio.sleep(_POLL_INTERVAL)
            return
        log.warning(
            "volume %s: mount child pid %d still serves %s %g s after signal %d",
            vol_id, pid, control_socket, ORPHAN_STOP_TIMEOUT, signum,
        )  # fmt: skip
