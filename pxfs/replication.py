"""The replication client: a BlockDevice for one volume over RPC to the stores of its replicas.

The client coordinates the I/O of one attached volume. Writes, trims and flushes go to every
replica of the write set, and to the replicas that are resyncing. Reads go to the local replica
of the write set first, then to the others. docs/replication.md gives the rules: the write
quorum, how the write set shrinks and grows, resync, reconcile and read repair.

A call with many blocks is split into RPC frames of at most BATCH_BYTES of block data, with up to
MAX_IN_FLIGHT frames in flight.

ReplicationClient is the last of four layers, each a class that extends the one before.
`ReplicationBase` (pxfs/replicationbase.py) contains the constructor, the state and the calls to
replicas. `WriteSetControl` (pxfs/writeset.py) changes the write set, settles failed calls and
reconciles. `ReplicaResync` (pxfs/rejoin.py) resyncs a returning replica. This module contains
the I/O path: open, reads, writes, trims, flush and grow.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import trio

from pxfs import resync
from pxfs.errors import InvalidArgument, NotSupported, ProtocolError, PxfsError, Unavailable
from pxfs.frames import PackedArgs
from pxfs.rejoin import ReplicaResync
from pxfs.replicationbase import (
    DEFAULT_TIMEOUT,
    MIN_WRITE_SET,
    SLOW_TIMEOUT,
    WriteSetCallback,
    _Replica,
)
from pxfs.store import BLOCK_SIZE
from pxfs.volume.device import BlockChange, BlockData

log = logging.getLogger(__name__)

# The names that callers of the client use, so that they need not know the layer that
# defines them.
__all__ = [
    "BATCH_BYTES",
    "BLOCKS_PER_FRAME",
    "DEFAULT_TIMEOUT",
    "MAX_COUNTER",
    "MAX_IN_FLIGHT",
    "MIN_WRITE_SET",
    "SLOW_TIMEOUT",
    "TRIMS_PER_FRAME",
    "ZERO_BLOCK",
    "ReplicationClient",
    "WriteSetCallback",
]

BATCH_BYTES = 4 * 1024 * 1024
BLOCKS_PER_FRAME = BATCH_BYTES // BLOCK_SIZE
#: Block numbers per trim frame: msgpack takes at most 9 bytes each, far below the frame limit.
TRIMS_PER_FRAME = 65536
MAX_IN_FLIGHT = 4
ZERO_BLOCK = bytes(BLOCK_SIZE)
#: A version is (epoch << 32) | counter, so one epoch has 2**32 - 1 write calls to replicas.
MAX_COUNTER = 2**32 - 1

Job = Callable[[], Awaitable[None]]
#: One call, or a few, to one replica, whose error is that replica's outcome.
ReplicaJob = Callable[["_Replica"], Awaitable[Any]]


class ReplicationClient(ReplicaResync):
    """The BlockDevice of one volume, backed by the replica stores of its nodes."""

    # --- BlockDevice -----------------------------------------------------------------------

    async def open(self) -> None:
        """Send the epoch to the write set and reconcile it.

        Raises StaleEpoch after a newer attach.
        """
        self._check_usable()
        members = [self._replicas[replica_id] for replica_id in self._write_set]
        outcomes = await self._fan_out(members, "store.open", self.vol_id, self.epoch)
        await self._settle("open", outcomes, ())
        if len(self._write_set) > 1:
            # A coordinator that stopped after a write below the quorum leaves replicas that
            # disagree. Every acknowledged write is on every replica of the write set.
            await self._reconcile([(0, self.nblocks)])
        log.debug(
            "volume %s: opened %d replicas at epoch %d", self.vol_id, len(outcomes), self.epoch
        )

    async def read_blocks(self, blocknos: Sequence[int]) -> list[bytes]:
        """Read blocks, with zeros for each block never written."""
        checked = [self._check_blockno(blockno) for blockno in blocknos]
        result: list[bytes] = [ZERO_BLOCK] * len(checked)

        def job(first: int) -> Job:
            async def read_frame() -> None:
                frame = checked[first : first + BLOCKS_PER_FRAME]
                result[first : first + len(frame)] = await self._read_frame(frame)

            return read_frame

        await _run_jobs([job(first) for first in range(0, len(checked), BLOCKS_PER_FRAME)])
        return result

    async def write_blocks(
        self,
        blocks: Sequence[tuple[int, BlockData]],
        changes: Mapping[int, BlockChange] | None = None,
    ) -> None:
        """Write blocks to the write set and return once a write quorum has stored each one.

        A block with an entry in `changes` goes to each replica as a store.patch of its changed
        bytes. A replica that does not hold the block the change starts from gets it whole.
        """
        checked = [self._check_block(blockno, data) for blockno, data in blocks]

        def job(first: int) -> Job:
            async def write_frame() -> None:
                frame = checked[first : first + BLOCKS_PER_FRAME]
                blocknos = [blockno for blockno, _ in frame]
                await self._versioned_call(
                    "write", blocknos, lambda version: self._write_job(version, frame, changes)
                )

            return write_frame

        # NOTE: each frame waits for the reply or the timeout of every target, not only a
        # quorum, because returning early would leave writes in flight that a failure could lose.
        await _run_jobs([job(first) for first in range(0, len(checked), BLOCKS_PER_FRAME)])

    async def trim_blocks(self, blocknos: Sequence[int]) -> None:
        """Free blocks on the write set, so that later reads return zeros."""
        checked = [self._check_blockno(blockno) for blockno in blocknos]

        def job(first: int) -> Job:
            async def trim_frame() -> None:
                frame = checked[first : first + TRIMS_PER_FRAME]

                def trim_job(version: int) -> ReplicaJob:
                    packed = PackedArgs(self.vol_id, self.epoch, frame, version)
                    return lambda replica: replica.call("store.trim", packed)

                await self._versioned_call("trim", frame, trim_job)

            return trim_frame

        await _run_jobs([job(first) for first in range(0, len(checked), TRIMS_PER_FRAME)])

    async def flush(self) -> None:
        """Flush the replicas and return once every completed write is durable on a write quorum."""
        self._check_usable()

        targets = self._targets()
        flushed: set[str] = set()
        quorum_flushed = trio.Event()

        async def flush_replica(replica: _Replica) -> None:
            # The writes are durable only if they went to the replica's own data file. The
            # store's flush raises Corrupted when that file was removed, replaced or truncated
            # under it, so the replica leaves the write set and its resync makes a full copy.
            reply = await replica.call("store.flush", self.vol_id, timeout=SLOW_TIMEOUT)
            if not (isinstance(reply, dict) and reply.get("data_file_checked") is True):
                # A store from before that check: a versions call checks the file instead.
                await replica.call("store.versions", self.vol_id, 0, 1)
            flushed.add(replica.id)
            if len(flushed & set(self._write_set)) >= self.write_quorum:
                quorum_flushed.set()

        async with trio.open_nursery() as nursery:
            if self._timeout is not None and len(targets) > 1:
                nursery.start_soon(self._drop_slow_flushes, targets, flushed, quorum_flushed)
            outcomes = await self._fan_out_each(targets, flush_replica)
            nursery.cancel_scope.cancel()
        await self._settle("flush", outcomes, ())

    async def _drop_slow_flushes(
        self, targets: list[_Replica], flushed: set[str], quorum_flushed: trio.Event
    ) -> None:
        """Close the connections of replicas still flushing `_timeout` s after a quorum flushed.

        Their flush fails, so they leave the write set. Without this, a replica that stopped
        replying would hold every fsync for SLOW_TIMEOUT.
        """
        await quorum_flushed.wait()
        assert self._timeout is not None
        await trio.sleep(self._timeout)
        for replica in targets:
            if replica.id not in flushed:
                log.warning(
                    "volume %s: replica %s did not flush within %g s of a write quorum",
                    self.vol_id,
                    replica.name,
                    self._timeout,
                )
                await replica.client.aclose()

    async def grow(self, nblocks: int) -> None:
        """Grow the replicas to `nblocks` blocks. An equal size is a no-op, a smaller one raises.

        The client takes the new size only once a write quorum has it. A replica that fails
        while others grow leaves the write set, as after a failed write. A replica that already
        has `nblocks` or more is left as it is.
        """
        if isinstance(nblocks, bool) or not isinstance(nblocks, int):
            raise InvalidArgument(f"volume {self.vol_id}: invalid block count {nblocks!r}")
        if nblocks < self.nblocks:
            raise InvalidArgument(
                f"volume {self.vol_id}: cannot shrink the device from {self.nblocks} to "
                f"{nblocks} blocks"
            )
        if nblocks == self.nblocks:
            return
        self._check_usable()

        async def grow_replica(replica: _Replica) -> None:
            await self._grow_replica(replica, nblocks)

        outcomes = await self._fan_out_each(self._targets(), grow_replica)
        await self._settle("grow", outcomes, ())
        log.info(
            "volume %s: grew replicas from %d to %d blocks", self.vol_id, self.nblocks, nblocks
        )
        self.nblocks = nblocks

    # --- writes ------------------------------------------------------------------------------

    def _write_job(
        self,
        version: int,
        frame: list[tuple[int, BlockData]],
        changes: Mapping[int, BlockChange] | None,
    ) -> ReplicaJob:
        """Return the job that writes `frame` at `version` to one replica, packed once for all."""
        whole: list[tuple[int, BlockData]] = []
        parts: list[tuple[int, int, BlockData, int, int]] = []
        for blockno, data in frame:
            change = changes.get(blockno) if changes else None
            if change is None:
                whole.append((blockno, data))
            else:
                piece = data[change.start : change.end]
                parts.append((blockno, change.start, piece, change.base, change.crc))
        packed_whole = PackedArgs(self.vol_id, self.epoch, version, whole) if whole else None
        packed_parts = PackedArgs(self.vol_id, self.epoch, version, parts) if parts else None
        blocks = dict(frame)

        async def write(replica: _Replica) -> None:
            if packed_whole is not None:
                await replica.call("store.write", packed_whole)
            if packed_parts is None:
                return
            left = [blockno for blockno, *_ in parts]
            if self._takes_patches(replica):
                try:
                    reply = await replica.call("store.patch", packed_parts)
                    left = _patched_left(replica, reply, blocks)
                except NotSupported:
                    # A pxd from before store.patch: this replica gets whole blocks from now on.
                    self._without_patch.add(replica.id)
            if left:
                rest = [(blockno, blocks[blockno]) for blockno in left]
                await replica.call("store.write", self.vol_id, self.epoch, version, rest)

        return write

    def _takes_patches(self, replica: _Replica) -> bool:
        """Tell whether `replica` gets partial writes as store.patch, not as whole blocks.

        A replica of the write set that is not resyncing has every block as the writer last
        wrote it. Any other replica may hold an older copy whose crc32 matches the base by
        chance (odds of about 2**-32). A patch on that copy would leave two copies that differ
        at one version, which resync never compares again.
        """
        return (
            replica.id in self._write_set
            and replica.id not in self._resyncing
            and replica.id not in self._without_patch
        )

    async def _versioned_call(
        self, operation: str, blocknos: Sequence[int], make_job: Callable[[int], ReplicaJob]
    ) -> None:
        await self._before_write()
        # No await from the end of _before_write to the start of the fan-out, so the version and
        # the targets are taken together. The resync floor (pxfs/rejoin.py) relies on this.
        version = self._next_version()
        done = trio.Event()
        self._in_flight[version] = done
        try:
            outcomes = await self._fan_out_each(self._targets(), make_job(version))
            await self._settle(operation, outcomes, blocknos)
        finally:
            del self._in_flight[version]
            done.set()

    async def _before_write(self) -> None:
        while True:
            self._check_usable()
            if self._pause is not None:
                await self._pause.wait()
            elif self._unsettled:
                await self._settle_unsettled()
            else:
                return

    # --- reads -------------------------------------------------------------------------------

    async def _read_frame(self, blocknos: list[int]) -> list[bytes]:
        self._check_usable()
        if self._unsettled.intersection(blocknos):
            await self._settle_unsettled()
        entries, bad = await resync.read_good(self.vol_id, self._read_order(), blocknos)
        if bad:
            repaired = await resync.repair(self.vol_id, self.epoch, blocknos, entries, bad)
            # Added after the await, because frames of one read run at once.
            self.repaired_blocks += repaired
        return [data if isinstance(data, bytes) else ZERO_BLOCK for _, data in entries]

    # --- helpers -----------------------------------------------------------------------------

    def _check_blockno(self, blockno: int) -> int:
        if isinstance(blockno, bool) or not isinstance(blockno, int):
            raise InvalidArgument(f"volume {self.vol_id}: invalid block number {blockno!r}")
        if not 0 <= blockno < self.nblocks:
            raise InvalidArgument(
                f"volume {self.vol_id}: block {blockno} is outside 0 to {self.nblocks - 1}"
            )
        return blockno

    def _check_block(self, blockno: int, data: BlockData) -> tuple[int, BlockData]:
        self._check_blockno(blockno)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidArgument(f"volume {self.vol_id}: data of block {blockno} is not bytes")
        size = memoryview(data).nbytes
        if size != BLOCK_SIZE:
            raise InvalidArgument(
                f"volume {self.vol_id}: block {blockno} has {size} bytes, expected {BLOCK_SIZE}"
            )
        # A bytearray is not copied: the block cache lends it unchanged until the write ends.
        return blockno, data if isinstance(data, (bytes, bytearray)) else bytes(data)

    def _next_version(self) -> int:
        if self._counter >= MAX_COUNTER:
            raise Unavailable(
                f"volume {self.vol_id}: epoch {self.epoch} has used all its write versions; "
                "detach and attach the volume to start a new epoch"
            )
        self._counter += 1
        return (self.epoch << 32) | self._counter


async def _run_jobs(jobs: list[Job]) -> None:
    """Run jobs, up to MAX_IN_FLIGHT at once, and raise the first PxfsError once all finish.

    Jobs in flight finish when one fails, so no frame is left half-sent, but jobs not yet
    started are skipped.
    """
    if len(jobs) == 1:
        await jobs[0]()
        return
    limiter = trio.CapacityLimiter(MAX_IN_FLIGHT)
    failures: list[PxfsError] = []

    async def run(job: Job) -> None:
        async with limiter:
            if failures:
                return
            try:
                await job()
            except PxfsError as exc:
                failures.append(exc)

    async with trio.open_nursery() as nursery:
        for job in jobs:
            nursery.start_soon(run, job)
    if failures:
        raise failures[0]


def _patched_left(replica: _Replica, reply: Any, blocks: Mapping[int, BlockData]) -> list[int]:
    """Return the blocks of a store.patch reply; raises ProtocolError for one not in `blocks`."""
    if not (isinstance(reply, list) and all(type(blockno) is int for blockno in reply)):
        raise ProtocolError(f"replica {replica.name} sent a malformed patch reply")
    if not set(reply) <= blocks.keys():
        raise ProtocolError(f"replica {replica.name} sent a patch reply with unknown blocks")
    return reply
