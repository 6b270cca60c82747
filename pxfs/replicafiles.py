"""The replica directories under a store's root: create, open and delete them.

A create builds the files in a staging directory whose name starts with a dot and then renames it
into place. A delete renames the replica to such a name before it removes the files. A crash thus
leaves a whole replica or a staging directory, which the next create removes. Everything here
blocks, and pxfs/store.py calls it in worker threads.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

from pxfs.errors import AlreadyExists, Corrupted, InvalidArgument, NoSpace, StaleEpoch
from pxfs.replica import Replica
from pxfs.replicaformat import (
    BLOCK_SIZE,
    DATA_FILE,
    META_FILE,
    RECORD_SIZE,
    TABLE_FILE,
    fsync_dir,
    is_no_space,
    parse_meta,
    write_meta,
)

log = logging.getLogger(__name__)

_CREATING = ".creating-"
_DELETING = ".deleting-"


def open_replica(root: Path, vol_id: str) -> Replica | None:
    """Open the replica of `vol_id` under `root`, or return None when there is none."""
    directory = root / vol_id
    meta_path = directory / META_FILE
    try:
        raw = meta_path.read_bytes()
    except FileNotFoundError:
        if directory.exists():
            raise Corrupted(f"replica directory {directory} has no meta file") from None
        return None
    nblocks, epoch = parse_meta(raw, vol_id, meta_path)
    data_fd = _open_file(directory / DATA_FILE, vol_id)
    try:
        table_fd = _open_file(directory / TABLE_FILE, vol_id)
    except BaseException:
        os.close(data_fd)
        raise
    replica = Replica(vol_id, directory, nblocks, epoch, data_fd, table_fd)
    try:
        _check_file_sizes(replica)
        replica.used_blocks = replica.count_used(0, nblocks)
    except BaseException:
        replica.close()
        raise
    return replica


def _open_file(path: Path, vol_id: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise Corrupted(f"replica of volume {vol_id} has no {path.name} file") from None


def _check_file_sizes(replica: Replica) -> None:
    # Files longer than nblocks are what a crash during a resize leaves, and are harmless.
    if os.fstat(replica.data_fd).st_size < replica.nblocks * BLOCK_SIZE:
        raise Corrupted(f"data file of volume {replica.vol_id} is shorter than its nblocks")
    if os.fstat(replica.table_fd).st_size < replica.nblocks * RECORD_SIZE:
        raise Corrupted(f"block table of volume {replica.vol_id} is shorter than its nblocks")


def _remove_leftovers(root: Path) -> None:
    """Remove what a crash during a create or a delete left under `root`."""
    for entry in root.iterdir():
        if entry.name.startswith((_CREATING, _DELETING)):
            log.info("removing %s, left by an interrupted create or delete", entry)
            shutil.rmtree(entry, ignore_errors=True)


def create_replica(root: Path, vol_id: str, nblocks: int) -> None:
    """Create the files of a new replica in a staging directory, then rename it into place."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / vol_id
    if final.exists():
        raise AlreadyExists(f"volume {vol_id} already has a replica on this node")
    _remove_leftovers(root)
    staging = root / (_CREATING + vol_id)
    staging.mkdir(mode=0o700)
    try:
        _create_files(staging, vol_id, nblocks)
        os.rename(staging, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _create_files(directory: Path, vol_id: str, nblocks: int) -> None:
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    data_fd = os.open(directory / DATA_FILE, flags, 0o600)
    try:
        os.ftruncate(data_fd, nblocks * BLOCK_SIZE)
        os.fsync(data_fd)
    except OSError as exc:
        if exc.errno != errno.EFBIG:
            raise
        raise InvalidArgument(
            f"volume {vol_id} of {nblocks} blocks is larger than a file under {directory.parent} "
            "can be"
        ) from None
    finally:
        os.close(data_fd)
    table_fd = os.open(directory / TABLE_FILE, flags, 0o600)
    try:
        # The table is allocated up front so that updating a record never needs new space.
        os.posix_fallocate(table_fd, 0, nblocks * RECORD_SIZE)
        os.fsync(table_fd)
    except OSError as exc:
        if not is_no_space(exc):
            raise
        raise NoSpace(
            f"no space left on this node for the {nblocks * RECORD_SIZE} byte block table "
            f"of volume {vol_id}"
        ) from None
    finally:
        os.close(table_fd)
    try:
        write_meta(directory, vol_id, nblocks, 0)
    except OSError as exc:
        if not is_no_space(exc):
            raise
        raise NoSpace(f"no space left on this node for the metadata of volume {vol_id}") from None


def check_reset_epoch(root: Path, vol_id: str, epoch: int) -> None:
    """Raise StaleEpoch when the meta file of the replica, if readable, has a higher epoch."""
    meta_path = root / vol_id / META_FILE
    try:
        _, seen = parse_meta(meta_path.read_bytes(), vol_id, meta_path)
    except (FileNotFoundError, Corrupted):
        return
    if epoch < seen:
        raise StaleEpoch(
            f"volume {vol_id}: epoch {epoch} is older than epoch {seen} seen by this replica; "
            "the volume was attached again since"
        )


def delete_replica(root: Path, vol_id: str) -> bool:
    """Remove the replica directory and return whether there was one."""
    doomed = root / (_DELETING + vol_id)
    shutil.rmtree(doomed, ignore_errors=True)
    try:
        # Renamed first, so that a crash half-way through the removal cannot leave a replica
        # directory with some of its files gone.
        os.rename(root / vol_id, doomed)
    except FileNotFoundError:
        return False
    fsync_dir(root)
    shutil.rmtree(doomed)
    return True
