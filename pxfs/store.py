"""The replica store: the blocks of every volume replica that this node hosts.

The files of a replica are in pxfs/replicaformat.py and pxfs/replicafiles.py, and the blocking
I/O on them in pxfs/replica.py. This module serves them to mount children and peers: it checks
every argument with pxfs/storeargs.py and runs the I/O in worker threads. Each replica has one
trio lock that every operation on its files holds, so one volume's operations run one at a time,
in the order they took the lock. docs/store-format.md describes each call.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from pxfs.errors import InvalidArgument, NotFound, NotSupported, StaleEpoch
from pxfs.pullsources import PeerConnector, PullSources
from pxfs.replica import Replica, sync_and_close
from pxfs.replicafiles import check_reset_epoch, create_replica, delete_replica, open_replica
from pxfs.replicaformat import (
    BLOCK_SIZE,
    DATA_BAD,
    DIGEST_BLOCKS,
    DIGEST_SIZE,
    MAX_EPOCH,
    MAX_NBLOCKS,
    MAX_VERSION,
    RECORD_SIZE,
    TRIMMED,
    write_meta,
)
from pxfs.storeargs import (
    MAX_BLOCKS_PER_CALL,
    MAX_CHECKED_PER_CALL,
    MAX_CHECKSUMS_PER_CALL,
    MAX_DIGESTS_PER_CALL,
    MAX_TRIMS_PER_CALL,
    MAX_VERSIONS_PER_CALL,
    check_blocknos,
    check_blocks,
    check_copies,
    check_entries,
    check_fence,
    check_int,
    check_patches,
    check_pulls,
    check_vol_id,
)

log = logging.getLogger(__name__)

# The format constants that callers of the store use, so that they need not know the module
# that defines them.
__all__ = [
    "BLOCK_SIZE",
    "DATA_BAD",
    "DIGEST_BLOCKS",
    "DIGEST_SIZE",
    "MAX_EPOCH",
    "RECORD_SIZE",
    "TRIMMED",
    "ReplicaStore",
]

_VERIFY_BLOCKS = 1024


class ReplicaStore:
    """The replicas of every volume that this node hosts, under one root directory.

    With `peers`, the store can pull blocks from the stores of other nodes (`store.pull`), so
    that a resync moves each block once, from the source node to the target node.
    """

    def __init__(
        self, root_dir: str | os.PathLike[str], *, peers: PeerConnector | None = None
    ) -> None:
        self.root = Path(root_dir)
        self._replicas: dict[str, Replica] = {}
        # Guards opening, creating and deleting replicas, so a volume is never open twice.
        self._lock = trio.Lock()
        #: The connections to other nodes that `pull` reads from, None without `peers`.
        self._sources = PullSources(peers) if peers is not None else None

    def handlers(self) -> dict[str, Callable[..., Awaitable[Any]]]:
        """Return the RPC handlers of the store, by method name, for the peer server."""
        return {
            "store.create": self.create,
            "store.delete": self.delete,
            "store.open": self.open,
            "store.read": self.read,
            "store.write": self.write,
            "store.patch": self.patch,
            "store.trim": self.trim,
            "store.fence": self.fence,
            "store.flush": self.flush,
            "store.info": self.info,
            "store.resize": self.resize,
            "store.grow": self.grow,
            "store.verify": self.verify,
            "store.versions": self.versions,
            "store.digests": self.digests,
            "store.checksums": self.checksums,
            "store.read_versioned": self.read_versioned,
            "store.copy": self.copy,
            "store.pull": self.pull,
            "store.reset": self.reset,
        }

    async def _replica(self, vol_id: str) -> Replica:
        replica = self._replicas.get(vol_id)
        if replica is not None:
            return replica
        async with self._lock:
            replica = self._replicas.get(vol_id)
            if replica is None:
                replica = await trio.to_thread.run_sync(open_replica, self.root, vol_id)
                if replica is None:
                    raise NotFound(f"volume {vol_id} has no replica on this node")
                self._replicas[vol_id] = replica
            return replica

    @asynccontextmanager
    async def _locked(self, vol_id: object) -> AsyncIterator[Replica]:
        replica = await self._replica(check_vol_id(vol_id))
        async with replica.lock:
            if replica.closed:
                raise NotFound(f"volume {replica.vol_id} has no replica on this node")
            yield replica

    async def _accept_epoch(self, replica: Replica, epoch: object) -> None:
        """Raise StaleEpoch for an epoch below the highest seen, and persist a higher one."""
        epoch = check_int("epoch", epoch, 0, MAX_EPOCH)
        if epoch < replica.epoch:
            raise StaleEpoch(
                f"volume {replica.vol_id}: epoch {epoch} is older than epoch {replica.epoch} "
                "seen by this replica; the volume was attached again since"
            )
        if epoch > replica.epoch:
            await trio.to_thread.run_sync(replica.save_meta, replica.nblocks, epoch)
            replica.epoch = epoch

    async def create(self, vol_id: str, nblocks: int) -> None:
        """Create an empty replica of `nblocks` blocks, or raise AlreadyExists."""
        vol_id = check_vol_id(vol_id)
        nblocks = check_int("nblocks", nblocks, 1, MAX_NBLOCKS)
        async with self._lock:
            await trio.to_thread.run_sync(create_replica, self.root, vol_id, nblocks)
        log.info("created replica of volume %s with %d blocks", vol_id, nblocks)

    async def delete(self, vol_id: str) -> None:
        """Delete the replica of `vol_id`, if there is one."""
        vol_id = check_vol_id(vol_id)
        async with self._lock:
            replica = self._replicas.pop(vol_id, None)
            if replica is not None:
                async with replica.lock:
                    replica.close()
            removed = await trio.to_thread.run_sync(delete_replica, self.root, vol_id)
        if removed:
            log.info("deleted replica of volume %s", vol_id)

    async def open(self, vol_id: str, epoch: int) -> int:
        """Accept `epoch` for the replica and return the highest epoch it has seen."""
        async with self._locked(vol_id) as replica:
            await self._accept_epoch(replica, epoch)
            return replica.epoch

    async def read(self, vol_id: str, blocknos: list[int]) -> list[bytes | None]:
        """Read blocks, with None for each block never written."""
        async with self._locked(vol_id) as replica:
            checked = check_blocknos(replica, blocknos, MAX_BLOCKS_PER_CALL)
            return await trio.to_thread.run_sync(replica.read_blocks, checked)

    async def write(
        self, vol_id: str, epoch: int, version: int, blocks: list[tuple[int, bytes]]
    ) -> None:
        """Write [blockno, data] pairs, in order, under `epoch` and `version`."""
        async with self._locked(vol_id) as replica:
            version = check_int("version", version, 1, MAX_VERSION)
            checked = check_blocks(replica, blocks)
            await self._accept_epoch(replica, epoch)
            check_fence(replica, version)
            await trio.to_thread.run_sync(replica.write_blocks, version, checked)
        log.debug("volume %s: wrote %d blocks at version %x", vol_id, len(checked), version)

    async def patch(
        self, vol_id: str, epoch: int, version: int, patches: list[list[Any]]
    ) -> list[int]:
        """Write [blockno, offset, data, base, crc] parts of blocks under `epoch` and `version`.

        Returns the blocks not patched because their crc32 is not `base` (Replica.patch_blocks),
        which the writer then sends whole.
        """
        async with self._locked(vol_id) as replica:
            version = check_int("version", version, 1, MAX_VERSION)
            checked = check_patches(replica, patches)
            await self._accept_epoch(replica, epoch)
            check_fence(replica, version)
            left = await trio.to_thread.run_sync(replica.patch_blocks, version, checked)
        log.debug(
            "volume %s: patched %d of %d blocks at version %x",
            vol_id, len(checked) - len(left), len(checked), version,
        )  # fmt: skip
        return left

    async def trim(self, vol_id: str, epoch: int, blocknos: list[int], version: int = 0) -> None:
        """Mark blocks unwritten and free their space, so that later reads return None.

        A non-zero `version` stays in the table as the version of the trim; 0 clears the records.
        """
        async with self._locked(vol_id) as replica:
            checked = check_blocknos(replica, blocknos, MAX_TRIMS_PER_CALL)
            version = check_int("version", version, 0, MAX_VERSION)
            await self._accept_epoch(replica, epoch)
            check_fence(replica, version)
            await trio.to_thread.run_sync(replica.trim_blocks, checked, version)

    async def fence(self, vol_id: str, epoch: int, floor: int) -> None:
        """Reject writes, patches and trims below version `floor` from now on.

        A resync calls it once every later write reaches the target, and before it compares
        versions. A write from before the resync that reaches the replica after this call
        could otherwise undo a block that the resync copied. The fence never moves down.
        """
        async with self._locked(vol_id) as replica:
            floor = check_int("floor", floor, 0, MAX_VERSION)
            await self._accept_epoch(replica, epoch)
            replica.fence = max(replica.fence, floor)
        log.debug("volume %s: writes below version %x are rejected from now on", vol_id, floor)

    async def versions(self, vol_id: str, first: int, count: int) -> bytes:
        """Return the versions of blocks [first, first + count), 8 little-endian bytes each.

        Raises Corrupted when the data file is missing or shorter than the replica.
        """
        async with self._locked(vol_id) as replica:
            first = check_int("first block", first, 0, replica.nblocks - 1)
            limit = min(MAX_VERSIONS_PER_CALL, replica.nblocks - first)
            count = check_int("block count", count, 0, limit)
            return await trio.to_thread.run_sync(replica.versions, first, count)

    async def digests(self, vol_id: str, first: int, count: int) -> bytes:
        """Return a digest of the versions of each region of blocks [first, first + count).

        A region is DIGEST_BLOCKS blocks from a multiple of DIGEST_BLOCKS, the last one of the
        replica shorter. The range must start and end at region boundaries (or at nblocks) and
        span at most MAX_DIGESTS_PER_CALL regions. Each digest is the blake2b-128 of the
        little-endian u64 versions of its blocks, as `versions` returns them, so two replicas
        with equal digests for a region hold the same versions there. Raises Corrupted when the
        data file is missing or shorter than the replica.
        """
        async with self._locked(vol_id) as replica:
            first = check_int("first block", first, 0, replica.nblocks - 1)
            limit = min(MAX_DIGESTS_PER_CALL * DIGEST_BLOCKS, replica.nblocks - first)
            count = check_int("block count", count, 1, limit)
            end = first + count
            if first % DIGEST_BLOCKS or (end % DIGEST_BLOCKS and end != replica.nblocks):
                raise InvalidArgument(
                    f"invalid digest range {first}+{count}: it must start and end at a multiple "
                    f"of {DIGEST_BLOCKS} blocks or at the replica's end, {replica.nblocks}"
                )
            return await trio.to_thread.run_sync(replica.digests, first, count)

    async def checksums(
        self, vol_id: str, first: int, count: int, check_data: bool = False
    ) -> bytes:
        """Return the table records of blocks [first, first + count), 16 bytes each.

        Each record is version (u64), crc32 (u32) and flags (u32), little-endian, as the table
        stores it. With `check_data` the store also reads each written block and sets DATA_BAD
        in the flags of one whose data fails its crc32; it then takes at most
        MAX_CHECKED_PER_CALL blocks. Raises Corrupted when the data file is missing or short.
        """
        if not isinstance(check_data, bool):
            raise InvalidArgument(f"check_data must be true or false, not {check_data!r}")
        async with self._locked(vol_id) as replica:
            first = check_int("first block", first, 0, replica.nblocks - 1)
            maximum = MAX_CHECKED_PER_CALL if check_data else MAX_CHECKSUMS_PER_CALL
            limit = min(maximum, replica.nblocks - first)
            count = check_int("block count", count, 0, limit)
            return await trio.to_thread.run_sync(replica.checksums, first, count, check_data)

    async def read_versioned(
        self, vol_id: str, blocknos: list[int]
    ) -> list[tuple[int, bytes | None | bool]]:
        """Read blocks as [version, data]: data None when unwritten, False when it is damaged."""
        async with self._locked(vol_id) as replica:
            checked = check_blocknos(replica, blocknos, MAX_BLOCKS_PER_CALL)
            return await trio.to_thread.run_sync(replica.read_versioned, checked)

    async def copy(self, vol_id: str, epoch: int, blocks: list[Any]) -> int:
        """Store [blockno, expected, version, data] entries whose block is still at `expected`.

        Resync and repair use it: a block changed by a newer write since its version was read is
        left alone. data None trims the block under `version`. Returns the blocks stored.
        """
        async with self._locked(vol_id) as replica:
            checked = check_copies(replica, blocks)
            await self._accept_epoch(replica, epoch)
            return await trio.to_thread.run_sync(replica.copy_blocks, checked)

    async def pull(self, vol_id: str, epoch: int, source: str, blocks: list[Any]) -> dict[str, Any]:
        """Copy [blockno, expected] blocks from the replica of `vol_id` on node `source`.

        Each block is read from the source with `store.read_versioned` and stored as `copy`
        stores it: only while its version here is still `expected`. A block whose copy on the
        source fails its checksum is left alone and listed in "bad" by its index in `blocks`,
        so the caller can read it from another replica. Returns {"stored": n, "bad": [index]}.
        Raises NotSupported when this store has no connections to other nodes, and Unavailable
        when the source cannot be read.
        """
        if self._sources is None:
            raise NotSupported("this node's store cannot connect to other nodes to pull blocks")
        if not isinstance(source, str) or not source:
            raise InvalidArgument(f"invalid source node {source!r}: expected a node id")
        replica = await self._replica(check_vol_id(vol_id))
        wanted = check_pulls(replica, blocks)
        epoch = check_int("epoch", epoch, 0, MAX_EPOCH)
        if epoch < replica.epoch:
            # This raises StaleEpoch before the read from the source. The copy below checks
            # the epoch again, under the lock.
            await self._accept_epoch(replica, epoch)
        blocknos = [blockno for blockno, _ in wanted]
        entries = check_entries(
            await self._sources.read_versioned(source, vol_id, blocknos), len(wanted), source
        )
        copies = [
            [blockno, expected, version, data]
            for (blockno, expected), (version, data) in zip(wanted, entries, strict=True)
            if data is not False
        ]
        bad = [index for index, (_, data) in enumerate(entries) if data is False]
        async with self._locked(vol_id) as replica:
            checked = check_copies(replica, copies)
            await self._accept_epoch(replica, epoch)
            stored = await trio.to_thread.run_sync(replica.copy_blocks, checked)
        return {"stored": stored, "bad": bad}

    async def reset(self, vol_id: str, epoch: int, nblocks: int) -> None:
        """Replace the replica of `vol_id` with an empty one of `nblocks` blocks at `epoch`.

        A resync calls it before a full copy, for a replica whose files are damaged or gone.
        Raises StaleEpoch when the old replica's meta file names a higher epoch.
        """
        vol_id = check_vol_id(vol_id)
        epoch = check_int("epoch", epoch, 0, MAX_EPOCH)
        nblocks = check_int("nblocks", nblocks, 1, MAX_NBLOCKS)
        async with self._lock:
            await trio.to_thread.run_sync(check_reset_epoch, self.root, vol_id, epoch)
            replica = self._replicas.pop(vol_id, None)
            if replica is not None:
                async with replica.lock:
                    replica.close()
            await trio.to_thread.run_sync(delete_replica, self.root, vol_id)
            await trio.to_thread.run_sync(create_replica, self.root, vol_id, nblocks)
            await trio.to_thread.run_sync(write_meta, self.root / vol_id, vol_id, nblocks, epoch)
        log.warning(
            "reset replica of volume %s to %d empty blocks for a full copy", vol_id, nblocks
        )

    async def flush(self, vol_id: str) -> dict[str, bool]:
        """Return once every write completed before the call is durable (fdatasync).

        Raises Corrupted when the data file was removed, replaced or truncated since the store
        opened it, because the writes then did not reach the replica. The reply
        {"data_file_checked": True} tells a client that this check ran, which stores before it
        did not do.
        """
        async with self._locked(vol_id) as replica:
            handles = await trio.to_thread.run_sync(replica.flush_handles)
        # Without the lock, so that writes to the replica go on while the disk catches up.
        # Shielded, because to_thread.run_sync raises Cancelled before it starts its thread
        # when the call is cancelled already, and then nothing would close the handles.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(sync_and_close, handles)
        return {"data_file_checked": True}

    async def info(self, vol_id: str) -> dict[str, int]:
        """Return nblocks, used_blocks and the highest epoch seen."""
        async with self._locked(vol_id) as replica:
            return {
                "nblocks": replica.nblocks,
                "used_blocks": replica.used_blocks,
                "epoch": replica.epoch,
            }

    async def resize(self, vol_id: str, nblocks: int) -> None:
        """Grow or shrink the replica, dropping the blocks past a smaller end."""
        nblocks = check_int("nblocks", nblocks, 1, MAX_NBLOCKS)
        async with self._locked(vol_id) as replica:
            old = replica.nblocks
            await trio.to_thread.run_sync(replica.resize, nblocks)
        log.info("resized replica of volume %s from %d to %d blocks", vol_id, old, nblocks)

    async def grow(self, vol_id: str, epoch: int, nblocks: int) -> None:
        """Grow the replica to `nblocks` blocks under `epoch`; equal is a no-op, smaller raises.

        Unlike `resize`, it never drops blocks, and it checks the epoch as a write does, so a
        client that a newer attach replaced cannot change the replica.
        """
        nblocks = check_int("nblocks", nblocks, 1, MAX_NBLOCKS)
        async with self._locked(vol_id) as replica:
            if nblocks < replica.nblocks:
                raise InvalidArgument(
                    f"volume {replica.vol_id}: cannot grow the replica of {replica.nblocks} "
                    f"blocks to {nblocks}; store.grow does not shrink"
                )
            await self._accept_epoch(replica, epoch)
            old = replica.nblocks
            if nblocks == old:
                return
            await trio.to_thread.run_sync(replica.resize, nblocks)
        log.info("grew replica of volume %s from %d to %d blocks", vol_id, old, nblocks)

    async def verify(self, vol_id: str) -> list[int]:
        """Return the block numbers whose stored data fails its checksum."""
        bad: list[int] = []
        first = 0
        while True:
            # The lock is taken per slice, so that a scan of a large replica does not hold up
            # the volume's I/O for its whole length.
            async with self._locked(vol_id) as replica:
                stop = min(first + _VERIFY_BLOCKS, replica.nblocks)
                if first >= stop:
                    break
                bad += await trio.to_thread.run_sync(replica.verify, first, stop)
            first = stop
        if bad:
            log.error("volume %s: %d blocks fail their checksum: %s", vol_id, len(bad), bad[:20])
        return bad

    async def aclose(self) -> None:
        """Close the files of every open replica and the connections to other nodes."""
        if self._sources is not None:
            await self._sources.aclose()
        async with self._lock:
            for replica in self._replicas.values():
                async with replica.lock:
                    replica.close()
            self._replicas.clear()
