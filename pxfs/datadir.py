"""The data directory of pxd: its lock, the node id and the cluster secret."""

from __future__ import annotations

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
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
