"""The replication client: a BlockDevice for one volume over RPC to the stores of its replicas.

Writes, trims and flushes go to every in-sync replica at once. Reads go to the first in-sync
replica and move on to the next when it fails. A call with many blocks is split into RPC frames
of at most BATCH_BYTES of block data, with up to MAX_IN_FLIGHT frames in flight.

A replica that fails a write which another replica stored leaves the in-sync set of this client:
it missed blocks, so it must not serve reads. A call that reaches fewer than `write_quorum`
replicas raises. A call that no replica stored changes no replica, so nothing leaves the set
(a volume with one replica stays usable after a NoSpace).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from pxfs.errors import (
    ChecksumMismatch,
    InvalidArgument,
    NoSpace,
    ProtocolError,
    PxfsError,
    StaleEpoch,
    Unavailable,
)
from pxfs.rpc import RpcClient
from pxfs.store import BLOCK_SIZE, MAX_EPOCH

log = logging.getLogger(__name__)

BATCH_BYTES = 4 * 1024 * 1024
BLOCKS_PER_FRAME = BATCH_BYTES // BLOCK_SIZE
#: Block numbers per trim frame: msgpack takes at most 9 bytes each, far below the frame limit.
TRIMS_PER_FRAME = 65536
MAX_IN_FLIGHT = 4
ZERO_BLOCK = bytes(BLOCK_SIZE)
#: A version is (epoch << 32) | counter, so one epoch has 2**32 - 1 write calls to replicas.
MAX_COUNTER = 2**32 - 1

Job = Callable[[], Awaitable[None]]


class ReplicationClient:
    """The BlockDevice of one volume, backed by the replica stores of its nodes."""

    def __init__(
        self,
        vol_id: str,
        epoch: int,
        nblocks: int,
        replicas: Sequence[RpcClient],
        write_quorum: int = 1,
    ) -> None:
        if not replicas:
            raise InvalidArgument(f"volume {vol_id}: a replication client needs a replica")
        if not 1 <= write_quorum <= len(replicas):
            raise InvalidArgument(
                f"volume {vol_id}: write quorum {write_quorum} is not between 1 and the "
                f"{len(replicas)} replicas"
            )
        if not 0 <= epoch <= MAX_EPOCH:
            raise InvalidArgument(f"volume {vol_id}: invalid epoch {epoch}")
        if nblocks < 1:
            raise InvalidArgument(f"volume {vol_id}: invalid nblocks {nblocks}")
        self.vol_id = vol_id
        self.epoch = epoch
        self.nblocks = nblocks
        self.write_quorum = write_quorum
        self._in_sync = list(replicas)
        self._counter = 0

    @property
    def in_sync_replicas(self) -> list[RpcClient]:
        """The replicas that have every write of this client, in read order."""
        return list(self._in_sync)

    async def open(self) -> None:
        """Send the epoch to every replica, raising StaleEpoch after a newer attach."""
        outcomes = await self._fan_out("store.open", self.vol_id, self.epoch)
        self._settle("open", outcomes)
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

    async def write_blocks(self, blocks: Sequence[tuple[int, bytes]]) -> None:
        """Write blocks to every in-sync replica, and succeed once write_quorum stored them."""
        checked = [self._check_block(blockno, data) for blockno, data in blocks]

        def job(first: int) -> Job:
            async def write_frame() -> None:
                frame = checked[first : first + BLOCKS_PER_FRAME]
                version = self._next_version()
                outcomes = await self._fan_out(
                    "store.write", self.vol_id, self.epoch, version, frame
                )
                self._settle("write", outcomes)

            return write_frame

        # NOTE: each frame waits for the reply of every in-sync replica, not only a quorum,
        # because returning early would leave writes in flight that a failure could lose.
        await _run_jobs([job(first) for first in range(0, len(checked), BLOCKS_PER_FRAME)])

    async def trim_blocks(self, blocknos: Sequence[int]) -> None:
        """Free blocks on every in-sync replica, so that later reads return zeros."""
        checked = [self._check_blockno(blockno) for blockno in blocknos]

        def job(first: int) -> Job:
            async def trim_frame() -> None:
                frame = checked[first : first + TRIMS_PER_FRAME]
                outcomes = await self._fan_out("store.trim", self.vol_id, self.epoch, frame)
                self._settle("trim", outcomes)

            return trim_frame

        await _run_jobs([job(first) for first in range(0, len(checked), TRIMS_PER_FRAME)])

    async def flush(self) -> None:
        """Return once every completed write is durable on write_quorum replicas."""
        outcomes = await self._fan_out("store.flush", self.vol_id)
        self._settle("flush", outcomes)

    async def grow(self, nblocks: int) -> None:
        """Grow every in-sync replica to `nblocks` blocks; equal is a no-op, smaller raises.

        The client takes the new size only once write_quorum replicas have it. A replica that
        fails while another grows leaves the in-sync set, as after a failed write. A replica
        that already has `nblocks` or more is left as it is.
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

        async def grow_replica(replica: RpcClient) -> None:
            info = await replica.call("store.info", self.vol_id)
            if not isinstance(info, dict) or not isinstance(info.get("nblocks"), int):
                raise ProtocolError(f"replica {replica.description} sent a malformed info reply")
            # A grow whose superblock never became durable leaves replicas larger than the
            # volume, and store.grow rejects a smaller size.
            if info["nblocks"] < nblocks:
                await replica.call("store.grow", self.vol_id, self.epoch, nblocks)

        outcomes = await self._fan_out_each(grow_replica)
        self._settle("grow", outcomes)
        log.info(
            "volume %s: grew replicas from %d to %d blocks", self.vol_id, self.nblocks, nblocks
        )
        self.nblocks = nblocks

    def _check_blockno(self, blockno: int) -> int:
        if isinstance(blockno, bool) or not isinstance(blockno, int):
            raise InvalidArgument(f"volume {self.vol_id}: invalid block number {blockno!r}")
        if not 0 <= blockno < self.nblocks:
            raise InvalidArgument(
                f"volume {self.vol_id}: block {blockno} is outside 0 to {self.nblocks - 1}"
            )
        return blockno

    def _check_block(self, blockno: int, data: bytes) -> tuple[int, bytes]:
        self._check_blockno(blockno)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidArgument(f"volume {self.vol_id}: data of block {blockno} is not bytes")
        size = memoryview(data).nbytes
        if size != BLOCK_SIZE:
            raise InvalidArgument(
                f"volume {self.vol_id}: block {blockno} has {size} bytes, expected {BLOCK_SIZE}"
            )
        return blockno, bytes(data)

    def _next_version(self) -> int:
        if self._counter >= MAX_COUNTER:
            raise Unavailable(
                f"volume {self.vol_id}: epoch {self.epoch} has used all its write versions; "
                "detach and attach the volume to start a new epoch"
            )
        self._counter += 1
        return (self.epoch << 32) | self._counter

    async def _fan_out(self, method: str, *args: Any) -> list[tuple[RpcClient, PxfsError | None]]:
        """Call `method` on every in-sync replica at once and return each one's error or None."""

        async def call(replica: RpcClient) -> None:
            await replica.call(method, *args)

        return await self._fan_out_each(call)

    async def _fan_out_each(
        self, job: Callable[[RpcClient], Awaitable[None]]
    ) -> list[tuple[RpcClient, PxfsError | None]]:
        """Run `job` for every in-sync replica at once and return each one's error or None."""
        replicas = list(self._in_sync)
        outcomes: list[PxfsError | None] = [None] * len(replicas)

        async def call(index: int, replica: RpcClient) -> None:
            try:
                await job(replica)
            except PxfsError as exc:
                outcomes[index] = exc

        async with trio.open_nursery() as nursery:
            for index, replica in enumerate(replicas):
                nursery.start_soon(call, index, replica)
        return list(zip(replicas, outcomes, strict=True))

    def _settle(self, operation: str, outcomes: list[tuple[RpcClient, PxfsError | None]]) -> None:
        """Drop the replicas that missed a call that others stored, and raise without quorum."""
        failed = [(replica, exc) for replica, exc in outcomes if exc is not None]
        for _, exc in failed:
            # A newer attach, or a request that is invalid everywhere, is no replica's fault.
            if isinstance(exc, (StaleEpoch, InvalidArgument)):
                raise exc
        stored = len(outcomes) - len(failed)
        if stored and failed:
            for replica, exc in failed:
                self._drop(replica, operation, exc)
        if stored < self.write_quorum:
            raise self._quorum_error(operation, stored, failed)

    def _drop(self, replica: RpcClient, operation: str, exc: PxfsError) -> None:
        if replica not in self._in_sync:
            return
        self._in_sync.remove(replica)
        # TODO: record the blocks this replica missed and report it to the catalog, so that
        # it leaves the write set and catches up later. Until then it is only left out of this
        # client's I/O, and a later attach would trust it again.
        log.warning(
            "volume %s: replica %s left the in-sync set after a failed %s (%d left): %s",
            self.vol_id,
            replica.description,
            operation,
            len(self._in_sync),
            exc.message,
        )

    def _quorum_error(
        self, operation: str, stored: int, failed: list[tuple[RpcClient, PxfsError]]
    ) -> PxfsError:
        for _, exc in failed:
            if isinstance(exc, NoSpace):
                return NoSpace(exc.message)
        detail = "; ".join(f"{replica.description}: {exc.message}" for replica, exc in failed)
        return Unavailable(
            f"volume {self.vol_id}: {operation} reached {stored} replicas, {self.write_quorum} "
            f"needed ({detail or 'no replica is in sync'})"
        )

    async def _read_frame(self, blocknos: list[int]) -> list[bytes]:
        failures: list[tuple[RpcClient, PxfsError]] = []
        for replica in list(self._in_sync):
            try:
                reply = await replica.call("store.read", self.vol_id, blocknos)
                return self._decode_read(replica, reply, len(blocknos))
            except InvalidArgument:
                raise
            except PxfsError as exc:
                # Reads change nothing, so any other replica may serve this one.
                log.warning(
                    "volume %s: read from replica %s failed, trying the next: %s",
                    self.vol_id,
                    replica.description,
                    exc.message,
                )
                failures.append((replica, exc))
        # TODO: rewrite a copy that failed its checksum from the good one. A rewrite racing a
        # newer write of the same block would undo it on that replica, so it needs ordering.
        raise self._read_error(failures)

    def _decode_read(self, replica: RpcClient, reply: Any, count: int) -> list[bytes]:
        if not isinstance(reply, list) or len(reply) != count:
            raise ProtocolError(f"replica {replica.description} sent a malformed read reply")
        blocks = []
        for data in reply:
            if data is None:
                blocks.append(ZERO_BLOCK)
            elif isinstance(data, bytes) and len(data) == BLOCK_SIZE:
                blocks.append(data)
            else:
                raise ProtocolError(f"replica {replica.description} sent a malformed block")
        return blocks

    def _read_error(self, failures: list[tuple[RpcClient, PxfsError]]) -> PxfsError:
        if not failures:
            return Unavailable(f"volume {self.vol_id}: no in-sync replica is left to read from")
        detail = "; ".join(f"{replica.description}: {exc.message}" for replica, exc in failures)
        if any(isinstance(exc, ChecksumMismatch) for _, exc in failures):
            return ChecksumMismatch(f"volume {self.vol_id}: no good copy left ({detail})")
        return Unavailable(f"volume {self.vol_id}: no replica could serve the read ({detail})")


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
