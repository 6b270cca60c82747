"""The data directory of pxd: its lock, the node id, the cluster secret, atomic file writes."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import uuid
from pathlib import Path

from pxfs.errors import Busy

log = logging.getLogger(__name__)

LOCK_FILE = "pxd.lock"
NODE_ID_FILE = "node-id"
SECRET_FILE = "cluster.secret"
REPLICAS_DIR = "replicas"
MOUNTS_DIR = "mnt"


def lock_data_dir(data_dir: Path) -> int:
    """Take the exclusive lock on DIR/pxd.lock and write our pid there; return the fd.

    Raises Busy naming the pid of the pxd that holds the lock.
    """
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise Busy(f"data directory {data_dir} is in use by another pxd (pid {holder})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def load_node_id(data_dir: Path) -> str:
    """Return the node id stored in DIR/node-id, creating a random one on first start."""
    path = data_dir / NODE_ID_FILE
    try:
        node_id = path.read_text().strip()
    except FileNotFoundError:
        node_id = ""
    if node_id:
        return node_id
    node_id = str(uuid.uuid4())
    _write_private_file(path, node_id + "\n")
    log.info("created node id %s", node_id)
    return node_id


def ensure_secret(data_dir: Path) -> Path:
    """Create the cluster secret file (mode 0600) unless it exists; return its path."""
    path = data_dir / SECRET_FILE
    if not path.exists():
        _write_private_file(path, secrets.token_hex(32) + "\n")
        log.info("created cluster secret %s", path)
    os.chmod(path, 0o600)
    return path


def _write_private_file(path: Path, text: str) -> None:
    write_file_atomically(path, text.encode())


def write_file_atomically(path: Path, data: bytes, *, temporary: Path | None = None) -> None:
    """Replace `path` with a file of mode 0600 that contains `data`, durably.

    The data goes to a temporary file, which is fsynced and renamed over `path`, and then the
    directory is fsynced. A crash leaves the old file or the new one. On an error, a full disk
    included, the old file stays as it was and the temporary file (default PATH.tmp) is
    removed. Raises OSError.
    """
    if temporary is None:
        temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                # On a nearly full file system a write can be short, and the next one then
                # fails with ENOSPC, so a single write could rename a truncated file into place.
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
