"""The replication client: a BlockDevice for one volume over RPC to the stores of its replicas.

The client coordinates the I/O of one attached volume. Writes, trims and flushes go to every
replica of the write set, and to the replicas that are resyncing. Reads go to the local replica
of the write set first, then to the others. docs/replication.md gives the rules: the write
quorum, how the write set shrinks and grows, resync, reconcile and read repair.

A call with many blocks is split into RPC frames of at most BATCH_BYTES of block data, with up to
MAX_IN_FLIGHT frames in flight.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import trio

from pxfs import resync
from pxfs.errors import (
    Busy,
    Corrupted,
    InvalidArgument,
    NoSpace,
    NotFound,
    NotSupported,
    ProtocolError,
    PxfsError,
    StaleEpoch,
    Unavailable,
)
from pxfs.frames import PackedArgs
from pxfs.resync import ResyncProgress
from pxfs.rpc import RpcClient
from pxfs.store import BLOCK_SIZE, MAX_EPOCH
from pxfs.volume.device import BlockChange, BlockData

log = logging.getLogger(__name__)

BATCH_BYTES = 4 * 1024 * 1024
BLOCKS_PER_FRAME = BATCH_BYTES // BLOCK_SIZE
#: Block numbers per trim frame: msgpack takes at most 9 bytes each, far below the frame limit.
TRIMS_PER_FRAME = 65536
MAX_IN_FLIGHT = 4
ZERO_BLOCK = bytes(BLOCK_SIZE)
#: A version is (epoch << 32) | counter, so one epoch has 2**32 - 1 write calls to replicas.
MAX_COUNTER = 2**32 - 1
#: Seconds within which a replica must reply to a read, write or trim call, or count as failed.
DEFAULT_TIMEOUT = 5.0
#: Seconds for calls that sync or allocate files: flush, grow, and the reset before a full copy.
SLOW_TIMEOUT = 60.0
#: The minimum size of the write set by ha level, so that ha 2 stays writable on one replica.
MIN_WRITE_SET = {1: 1, 2: 1, 3: 2}

Job = Callable[[], Awaitable[None]]
#: One call, or a few, to one replica, whose error is that replica's outcome.
ReplicaJob = Callable[["_Replica"], Awaitable[Any]]
#: A callback that receives the write set and the out-of-sync replicas, by id, after each change.
WriteSetCallback = Callable[[list[str], list[str]], Awaitable[None]]
Outcomes = list[tuple["_Replica", PxfsError | None]]


class _Replica:
    """One replica of the volume, with its id, its connection and the timeout of its calls.

    A timeout of None waits as long as the call takes.
    """

    def __init__(self, replica_id: str, client: RpcClient, timeout: float | None) -> None:
        self.id = replica_id
        self.client = client
        self.timeout = timeout

    @property
    def name(self) -> str:
        """The replica id and the address of its connection, for messages."""
        if self.id == self.client.description:
            return self.id
        return f"{self.id} ({self.client.description})"

    async def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        """Call `method` on the replica. Raises Unavailable when the call times out."""
        limit = self.timeout if timeout is None or self.timeout is None else timeout
        if limit is None:
            return await self.client.call(method, *args)
        client = self.client
        timed_out = False

        async def watchdog() -> None:
            nonlocal timed_out
            await trio.sleep(limit)
            timed_out = True
            # Closing the connection makes the server cancel the calls on it that have not
            # started, so a write that timed out cannot land after a later reconcile. It also
            # ends a send that RpcClient shields from cancellation, which a replica that stopped
            # reading its socket would hold forever.
            await client.aclose()

        result: Any = None
        error: PxfsError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watchdog)
            try:
                result = await client.call(method, *args)
            except PxfsError as exc:
                # Raised after the nursery exits, because raising inside it would wrap the error
                # in an ExceptionGroup.
                error = exc
            finally:
                nursery.cancel_scope.cancel()
        if timed_out and isinstance(error, Unavailable):
            raise Unavailable(f"replica {self.name}: {method} timed out after {limit:g} s")
        if error is not None:
            raise error
        return result


class ReplicationClient:
    """The BlockDevice of one volume, backed by the replica stores of its nodes."""

    def __init__(
        self,
        vol_id: str,
        epoch: int,
        nblocks: int,
        replicas: Sequence[RpcClient],
        write_quorum: int | None = None,
        *,
        ha_level: int | None = None,
        replica_ids: Sequence[str] | None = None,
        local: str | None = None,
        out_of_sync: Sequence[str] = (),
        on_write_set_change: WriteSetCallback | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        """Coordinate `replicas`, local replica first unless `local` names another id.

        `write_quorum` is the minimum size of the write set. By default it follows `ha_level`
        (MIN_WRITE_SET), which defaults to the number of replicas.
        `replica_ids` name the replicas (node ids) in the callback and the runtime state. They
        default to the connection addresses. `out_of_sync` lists the replicas that the catalog
        records as outside the write set, which get no I/O until `resync` brings them back.
        `timeout` bounds each call to a replica in seconds. A client of one replica has none,
        because no other replica could carry on without it, and None turns timeouts off.
        """
        ids = [client.description for client in replicas] if replica_ids is None else replica_ids
        _check_arguments(vol_id, epoch, nblocks, replicas, ids, out_of_sync, ha_level, timeout)
        self.vol_id = vol_id
        self.epoch = epoch
        self.nblocks = nblocks
        self.ha_level = ha_level or min(len(replicas), 3)
        minimum = MIN_WRITE_SET[self.ha_level] if write_quorum is None else write_quorum
        write_set = [replica_id for replica_id in ids if replica_id not in out_of_sync]
        if not 1 <= minimum <= len(write_set):
            raise InvalidArgument(
                f"volume {vol_id}: write quorum {minimum} is not between 1 and the "
                f"{len(write_set)} replicas of the write set"
            )
        self.write_quorum = minimum
        self._quorum_given = write_quorum is not None
        self._timeout = timeout
        if len(replicas) == 1:
            timeout = None
        self._replicas = {
            replica_id: _Replica(replica_id, client, timeout)
            for replica_id, client in zip(ids, replicas, strict=True)
        }
        self._local = ids[0] if local is None else local
        if self._local not in self._replicas:
            raise InvalidArgument(f"volume {vol_id}: local replica {local!r} is not a replica")
        self._write_set = write_set
        self._out_of_sync = [replica_id for replica_id in ids if replica_id in out_of_sync]
        self._resyncing: dict[str, ResyncProgress] = {}
        #: Replicas that a call of `resync` works on, from its start until it returns. Every
        #: replica of `_resyncing` is among them.
        self._resync_claims: set[str] = set()
        self._resynced: dict[str, int] = dict.fromkeys(ids, 0)
        self._full_copies: set[str] = set()
        #: Replicas added by a raise of the ha level that have not joined the write set yet.
        self._adding: set[str] = set()
        #: The ha level that the client takes once every replica of `_adding` has joined.
        self._next_ha_level = self.ha_level
        self._on_change = on_write_set_change
        self._changes = 0
        self._reported = 0
        self._report_lock = trio.Lock()
        self._reconcile_lock = trio.Lock()
        self._pause: trio.Event | None = None
        self._unsettled: set[int] = set()
        self._in_flight: dict[int, trio.Event] = {}
        #: Replicas whose store has no store.patch (a pxd of an older version), by id.
        self._without_patch: set[str] = set()
        self._stale: StaleEpoch | None = None
        self._counter = 0
        self.repaired_blocks = 0

    # --- state -----------------------------------------------------------------------------

    @property
    def in_sync_replicas(self) -> list[RpcClient]:
        """The connections of the write set in read order: the replicas with every write."""
        return [replica.client for replica in self._read_order()]

    @property
    def write_set(self) -> list[str]:
        """The ids of the replicas that every acknowledged write reached."""
        return list(self._write_set)

    @property
    def out_of_sync(self) -> list[str]:
        """The ids of the replicas that missed writes, resyncing ones included."""
        return list(self._out_of_sync)

    @property
    def disconnected(self) -> list[str]:
        """The ids of write-set replicas whose connection is lost. `resync` reconnects them."""
        return [key for key in self._write_set if self._replicas[key].client.broken]

    def write_quorum_now(self) -> int:
        """Return how many replicas of the write set a write reaches when none fails."""
        return max(self.write_quorum, min(len(self._write_set), 2))

    def runtime_state(self) -> dict[str, str]:
        """Return the runtime state in the string form of Portworx's runtime_state map.

        Replica sets are lists of indexes into the replica list. ResyncBlocks pairs each index
        with the blocks copied to it by resyncs of this client. ResyncProgress gives the blocks
        scanned of the total for each resyncing replica.
        """
        index = {replica_id: number for number, replica_id in enumerate(self._replicas)}

        def indexes(ids: Sequence[str]) -> str:
            return "[" + " ".join(str(index[replica_id]) for replica_id in ids) + "]"

        def pairs(values: dict[str, Any]) -> str:
            return (
                "[" + " ".join(f"{{{index[key]} {value}}}" for key, value in values.items()) + "]"
            )

        copied = {key: self._resynced[key] for key in self._replicas}
        for key, progress_of in self._resyncing.items():
            copied[key] += progress_of.copied
        progress = {key: f"{p.scanned}/{p.total}" for key, p in self._resyncing.items()}
        full = {key: copied[key] for key in self._full_copies}
        return {
            "RuntimeState": self._state_name(),
            "ReadQuorum": "1",
            "WriteQuorum": str(self.write_quorum_now()),
            "ReadSet": indexes([replica.id for replica in self._read_order()]),
            "WriteSet": indexes(self._write_set),
            "ReplicaSetCurr": indexes([key for key in self._replicas if key not in self._adding]),
            "ReplicaSetNext": indexes(list(self._replicas)),
            "ResyncBlocks": pairs(copied),
            "FullResyncBlocks": pairs(full),
            "ResyncProgress": pairs(progress),
            "RepairedBlocks": str(self.repaired_blocks),
        }

    def resync_progress(self) -> dict[str, dict[str, int]]:
        """Return, by replica id, the blocks scanned, planned and copied by each running resync.

        `planned` counts the blocks that the scans so far found to differ, out of `total`.
        """
        return {
            key: {
                "total": p.total,
                "scanned": p.scanned,
                "planned": p.planned,
                "copied": p.copied,
            }
            for key, p in self._resyncing.items()
        }

    def _state_name(self) -> str:
        if self._resyncing:
            return "resync"
        if len(self._write_set) < len(self._replicas):
            return "degraded"
        return "clean"

    def _read_order(self) -> list[_Replica]:
        order = [self._replicas[replica_id] for replica_id in self._write_set]
        order.sort(key=lambda replica: replica.id != self._local)
        return order

    def _targets(self) -> list[_Replica]:
        ids = self._write_set + list(self._resyncing)
        return [self._replicas[replica_id] for replica_id in ids]

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

    async def _grow_replica(self, replica: _Replica, nblocks: int) -> None:
        info = await replica.call("store.info", self.vol_id)
        if not isinstance(info, dict) or not isinstance(info.get("nblocks"), int):
            raise ProtocolError(f"replica {replica.name} sent a malformed info reply")
        # A grow whose superblock never became durable leaves replicas larger than the
        # volume, and store.grow rejects a smaller size.
        if info["nblocks"] < nblocks:
            await replica.call("store.grow", self.vol_id, self.epoch, nblocks, timeout=SLOW_TIMEOUT)

    # --- resync ----------------------------------------------------------------------------

    async def resync(self, replica_id: str, client: RpcClient | None = None) -> int:
        """Bring a returning replica back into the write set and return the blocks copied to it.

        `client` replaces the replica's connection. A replica of the write set only gets the
        epoch, because it missed no acknowledged write. An out-of-sync replica receives every block
        whose version differs from the write set's, while writes go on and reach it too, and
        then rejoins the write set. A replica whose files are damaged or gone gets a full copy.
        Raises Busy while another resync of the replica runs.
        """
        self._check_usable()
        replica = self._replicas.get(replica_id)
        if replica is None:
            raise NotFound(f"volume {self.vol_id}: {replica_id!r} is not one of its replicas")
        if replica_id in self._resync_claims:
            raise Busy(f"volume {self.vol_id}: replica {replica_id} is resyncing already")
        # Claimed before the first await. A second resync that started while the first one still
        # prepared its target would replace the first one's connection and progress, and the
        # one that finished last would raise KeyError at its rejoin.
        self._resync_claims.add(replica_id)
        try:
            return await self._resync_claimed(replica, client)
        finally:
            self._resync_claims.discard(replica_id)

    async def _resync_claimed(self, replica: _Replica, client: RpcClient | None) -> int:
        replica_id = replica.id
        if client is not None:
            replica.client = client
        if replica_id in self._write_set:
            await replica.call("store.open", self.vol_id, self.epoch)
            # The reconcile below comes after the fence, so it also finds a write that failed
            # below the quorum and whose frame reached the replica late, on the old connection.
            await self._fence(replica, self._floor())
            try:
                await self._settle_unsettled()
            except Unavailable as exc:
                log.warning("volume %s: %s", self.vol_id, exc.message)
            return 0
        await self._settle_unsettled()
        progress = ResyncProgress(target=replica_id, total=self.nblocks)
        await self._prepare_target(replica, progress)
        return await self._run_resync(replica, progress)

    async def _prepare_target(self, replica: _Replica, progress: ResyncProgress) -> None:
        """Open the target, or reset it for a full copy when its files are damaged or gone."""
        try:
            await replica.call("store.open", self.vol_id, self.epoch)
            # A versions scan checks that the data file is still the one the store opened.
            await replica.call("store.versions", self.vol_id, 0, 1)
        except (NotFound, Corrupted) as exc:
            log.warning(
                "volume %s: replica %s is marked failed and gets a full copy: %s",
                self.vol_id,
                replica.name,
                exc.message,
            )
            await replica.call(
                "store.reset", self.vol_id, self.epoch, self.nblocks, timeout=SLOW_TIMEOUT
            )
            progress.full = True
            self._full_copies.add(replica.id)
            self._resynced[replica.id] = 0
            return
        await self._grow_replica(replica, self.nblocks)

    async def _run_resync(self, replica: _Replica, progress: ResyncProgress) -> int:
        # No await between taking the floor and adding the target, so every write with a version
        # from the floor on is sent to the target as well.
        floor = self._floor()
        self._resyncing[replica.id] = progress
        log.info("volume %s: resync of replica %s started", self.vol_id, replica.name)
        try:
            await self._fence(replica, floor)
            await resync.resync(
                self.vol_id, self.epoch, progress.total, self._read_order, replica, floor, progress
            )
        except BaseException as exc:
            self._resyncing.pop(replica.id, None)
            self._resynced[replica.id] += progress.copied
            if isinstance(exc, PxfsError):
                log.warning(
                    "volume %s: resync of %s failed: %s", self.vol_id, replica.name, exc.message
                )
            else:
                # Cancelled, as when a mount or delete stops a copy that pxd runs itself.
                log.info("volume %s: resync of %s stopped", self.vol_id, replica.name)
            raise
        if progress.aborted:
            self._resynced[replica.id] += progress.copied
            raise Unavailable(
                f"volume {self.vol_id}: resync of {replica.name} stopped: {progress.aborted}"
            )
        self._rejoin(replica, progress)
        try:
            await self._ensure_reported()
        except Unavailable as exc:
            # The replica stays in the write set here. The next write retries the report.
            log.warning("volume %s: %s", self.vol_id, exc.message)
        return progress.copied

    def _floor(self) -> int:
        """Return the version that the next write will take."""
        return (self.epoch << 32) | (self._counter + 1)

    async def _fence(self, replica: _Replica, floor: int) -> None:
        """Wait for the writes below `floor`, then make the target reject any later one.

        Every write from `floor` on goes over the target's new connection. A frame below it that
        a network cut delayed on the old one could otherwise reach the target after the resync
        copied newer versions of its blocks. The scan that follows finds one that arrived
        before the fence, and copies the block over.
        """
        await self._wait_for_writes(below=floor)
        try:
            await replica.call("store.fence", self.vol_id, self.epoch, floor)
        except NotSupported:
            log.warning(
                "volume %s: replica %s cannot reject writes sent before its resync; update pxd "
                "on its node",
                self.vol_id,
                replica.name,
            )

    def _rejoin(self, replica: _Replica, progress: ResyncProgress) -> None:
        # No await in here, so the replica goes from the resync targets to the write set in one
        # step and every write reaches it.
        del self._resyncing[replica.id]
        self._write_set = [
            key for key in self._replicas if key in self._write_set or key == replica.id
        ]
        self._out_of_sync.remove(replica.id)
        self._full_copies.discard(replica.id)
        self._resynced[replica.id] += progress.copied
        self._changes += 1
        log.info(
            "volume %s: replica %s caught up after copying %d blocks and rejoined the write set",
            self.vol_id,
            replica.name,
            progress.copied,
        )
        if replica.id in self._adding:
            self._adding.discard(replica.id)
            if not self._adding:
                self._set_ha_level(self._next_ha_level)

    # --- replica set changes ----------------------------------------------------------------

    def add_replica(self, replica_id: str, client: RpcClient, ha_level: int) -> bool:
        """Add an empty replica that raises the ha level to `ha_level` once it has caught up.

        The replica starts out of sync, and `resync` copies every written block to it. When the
        last added replica joins the write set, the client takes `ha_level`. Returns False and
        changes nothing when `replica_id` is already a replica.
        """
        self._check_usable()
        if replica_id in self._replicas:
            return False
        if ha_level not in MIN_WRITE_SET or ha_level <= len(self._replicas):
            raise InvalidArgument(
                f"volume {self.vol_id}: invalid ha level {ha_level!r} for a replica added to "
                f"{len(self._replicas)} replicas"
            )
        if len(self._replicas) >= max(MIN_WRITE_SET):
            raise InvalidArgument(
                f"volume {self.vol_id} has {len(self._replicas)} replicas, the maximum"
            )
        self._replicas[replica_id] = _Replica(replica_id, client, self._timeout)
        self._retime()
        self._out_of_sync.append(replica_id)
        self._resynced[replica_id] = 0
        self._adding.add(replica_id)
        self._next_ha_level = ha_level
        log.info(
            "volume %s: added replica %s, which joins the write set after a full copy",
            self.vol_id,
            self._replicas[replica_id].name,
        )
        return True

    async def remove_replica(self, replica_id: str, ha_level: int) -> None:
        """Stop all I/O to a replica, drop it, take `ha_level` and report the new write set.

        A running resync of the replica stops. Raises NotFound for an unknown replica, and
        InvalidArgument when the remaining write set would be smaller than the write quorum of
        `ha_level`.
        """
        self._check_usable()
        if replica_id not in self._replicas:
            raise NotFound(f"volume {self.vol_id}: {replica_id!r} is not one of its replicas")
        if ha_level not in MIN_WRITE_SET or ha_level > len(self._replicas) - 1:
            raise InvalidArgument(
                f"volume {self.vol_id}: invalid ha level {ha_level!r} after dropping one of "
                f"{len(self._replicas)} replicas"
            )
        left = [key for key in self._write_set if key != replica_id]
        if len(left) < MIN_WRITE_SET[ha_level]:
            raise InvalidArgument(
                f"volume {self.vol_id}: dropping replica {replica_id} would leave the write set "
                f"{left}, below the {MIN_WRITE_SET[ha_level]} replicas that ha {ha_level} needs"
            )
        if replica_id in self._resyncing:
            self._resyncing.pop(replica_id).aborted = "the replica was dropped"
        # No await until the replica is gone from every set, so no new call is sent to it.
        replica = self._replicas.pop(replica_id)
        self._write_set = left
        self._out_of_sync = [key for key in self._out_of_sync if key != replica_id]
        self._adding.discard(replica_id)
        self._full_copies.discard(replica_id)
        self._set_ha_level(ha_level)
        self._changes += 1
        log.info("volume %s: dropped replica %s, ha %d", self.vol_id, replica.name, ha_level)
        with trio.CancelScope(shield=True):
            await replica.client.aclose()
        await self._ensure_reported()

    def _set_ha_level(self, ha_level: int) -> None:
        self.ha_level = ha_level
        if not self._quorum_given:
            self.write_quorum = MIN_WRITE_SET[ha_level]
        self._retime()
        log.info(
            "volume %s: ha level is now %d, write quorum %d",
            self.vol_id,
            ha_level,
            self.write_quorum,
        )

    def _retime(self) -> None:
        # Calls to a single replica wait as a disk would (see __init__). Calls to more replicas
        # time out.
        timeout = None if len(self._replicas) == 1 else self._timeout
        for replica in self._replicas.values():
            replica.timeout = timeout

    # --- writes and settling -----------------------------------------------------------------

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
        # the targets are taken together. The resync floor relies on this.
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

    async def _wait_for_writes(self, below: int | None = None) -> None:
        for version, done in list(self._in_flight.items()):
            if below is None or version < below:
                await done.wait()

    async def _settle(self, operation: str, outcomes: Outcomes, blocknos: Sequence[int]) -> None:
        """Drop the replicas that failed a call, report the change, and raise below the quorum."""
        failed = [(replica, exc) for replica, exc in outcomes if exc is not None]
        for _, exc in failed:
            # A newer attach, or a request that is invalid everywhere, is no replica's fault.
            if isinstance(exc, StaleEpoch):
                self._stop(exc)
                raise exc
            if isinstance(exc, InvalidArgument):
                raise exc
        for replica, exc in failed:
            if replica.id in self._resyncing:
                self._abort_resync(replica, operation, exc)
        members = [replica for replica, _ in outcomes if replica.id in self._write_set]
        failed_members = [(r, exc) for r, exc in failed if r.id in self._write_set]
        stored = len(members) - len(failed_members)
        if failed_members and stored >= self.write_quorum:
            for replica, exc in failed_members:
                self._leave_write_set(replica, operation, exc)
        elif stored < self.write_quorum:
            if blocknos and len(self._write_set) > 1:
                # Some replicas may contain this write and others not. Until they agree again,
                # the blocks are neither read nor written (docs/replication.md).
                self._unsettled.update(blocknos)
            if blocknos:
                # A resyncing replica may have stored the write as well, at a version above its
                # floor that its resync would keep, so its resync starts over later.
                for replica in [self._replicas[key] for key in self._resyncing]:
                    self._abort_resync(replica, operation, Unavailable("the write set failed it"))
            raise self._quorum_error(operation, stored, failed_members)
        await self._ensure_reported()

    async def probe_write_set(self) -> None:
        """Call each write-set replica once, so that a lost connection shows in `disconnected`.

        A connection notices that its peer is gone only when a call waits on it, so without
        this an idle volume would not learn that a replica died.
        """

        async def probe(replica: _Replica) -> None:
            with contextlib.suppress(PxfsError):
                # A reply or an error reply proves the connection. A lost one marks it broken,
                # and so does a call that times out, whose connection the call closes.
                await replica.call("store.info", self.vol_id, timeout=DEFAULT_TIMEOUT)

        # A client of a single replica has no call timeout, so the probe bounds itself, later
        # than the call timeout of the others so that theirs can close a hung connection.
        with trio.move_on_after(2 * DEFAULT_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for replica_id in self._write_set:
                    replica = self._replicas[replica_id]
                    if not replica.client.broken:
                        nursery.start_soon(probe, replica)

    async def drop_unreachable(self, replica_id: str, exc: PxfsError) -> bool:
        """Drop a write-set replica whose lost connection could not be opened again.

        Without this, a replica that dies while the volume is idle stays in the write set, and
        the volume reports clean, until the next write fails on it. Returns True when the
        replica left the write set and the catalog has the change. It stays when the rest of
        the write set would be below the write quorum, or while blocks of a write below the
        quorum wait for their reconcile, which needs every member back.
        """
        if replica_id not in self._write_set or self._unsettled:
            return False
        if len(self._write_set) - 1 < self.write_quorum:
            return False
        self._leave_write_set(self._replicas[replica_id], "reconnect", exc)
        await self._ensure_reported()
        return True

    def _leave_write_set(self, replica: _Replica, operation: str, exc: PxfsError) -> None:
        self._write_set.remove(replica.id)
        self._out_of_sync = [
            key for key in self._replicas if key in self._out_of_sync or key == replica.id
        ]
        self._changes += 1
        log.warning(
            "volume %s: replica %s left the write set after a failed %s (%d left): %s",
            self.vol_id,
            replica.name,
            operation,
            len(self._write_set),
            exc.message,
        )

    def _abort_resync(self, replica: _Replica, operation: str, exc: PxfsError) -> None:
        progress = self._resyncing.pop(replica.id)
        progress.aborted = f"a {operation} failed on it: {exc.message}"
        log.warning(
            "volume %s: resync of replica %s stopped after a failed %s: %s",
            self.vol_id,
            replica.name,
            operation,
            exc.message,
        )

    async def _ensure_reported(self) -> None:
        """Wait until the catalog callback has the current write set.

        Raises Unavailable if the callback fails.
        """
        if self._reported == self._changes:
            return
        async with self._report_lock:
            changes = self._changes
            if self._reported >= changes:
                return
            write_set, out_of_sync = list(self._write_set), list(self._out_of_sync)
            if self._on_change is not None:
                try:
                    await self._on_change(write_set, out_of_sync)
                except StaleEpoch as exc:
                    # A newer attach owns the volume: this client must stop, and that is no bug.
                    self._stop(exc)
                    raise
                except PxfsError as exc:
                    log.warning(
                        "volume %s: recording the write set failed: %s", self.vol_id, exc.message
                    )
                    raise Unavailable(
                        f"volume {self.vol_id}: recording the write set {write_set} failed: "
                        f"{exc.message}"
                    ) from exc
                except Exception as exc:
                    log.exception("volume %s: recording the write set failed", self.vol_id)
                    raise Unavailable(
                        f"volume {self.vol_id}: recording the write set {write_set} failed: {exc}"
                    ) from exc
            self._reported = changes
            log.info(
                "volume %s: write set is now %s, out of sync %s",
                self.vol_id,
                write_set,
                out_of_sync,
            )

    async def _settle_unsettled(self) -> None:
        """Reconcile the blocks of writes that failed below the quorum, or raise Unavailable."""
        async with self._reconcile_lock:
            if not self._unsettled:
                return
            pause = trio.Event()
            self._pause = pause
            try:
                await self._wait_for_writes()
                blocknos = sorted(self._unsettled)
                await self._reconcile(_runs(blocknos))
                self._unsettled.difference_update(blocknos)
                await self._ensure_reported()
            except StaleEpoch:
                raise
            except PxfsError as exc:
                raise Unavailable(
                    f"volume {self.vol_id}: {len(self._unsettled)} blocks contain a write that "
                    "reached fewer replicas than the write quorum; writes resume once the "
                    f"write set {self._write_set} answers again ({exc.message})"
                ) from None
            finally:
                self._pause = None
                pause.set()

    async def _reconcile(self, ranges: Sequence[tuple[int, int]]) -> None:
        # Every acknowledged write is on a write quorum of the write set, and a version that a
        # quorum agrees on reached the quorum, so the connected replicas are enough. The others
        # leave the write set because they may contain the failed write, which a resync replaces.
        members = [replica for replica in self._read_order() if not replica.client.broken]
        if len(members) < self.write_quorum_now():
            raise Unavailable(
                f"{len(members)} replicas of the write set are connected, "
                f"{self.write_quorum_now()} needed"
            )
        for replica in self._read_order():
            if replica not in members:
                self._leave_write_set(replica, "reconcile", Unavailable("not connected"))
        try:
            await resync.reconcile(self.vol_id, self.epoch, members, ranges, self.nblocks)
        except StaleEpoch as exc:
            self._stop(exc)
            raise

    def _stop(self, exc: StaleEpoch) -> None:
        if self._stale is None:
            log.error("volume %s: a newer attach took over, stopping: %s", self.vol_id, exc.message)
            self._stale = exc

    def _check_usable(self) -> None:
        if self._stale is not None:
            raise StaleEpoch(self._stale.message)

    def _quorum_error(
        self, operation: str, stored: int, failed: list[tuple[_Replica, PxfsError]]
    ) -> PxfsError:
        for _, exc in failed:
            if isinstance(exc, NoSpace):
                return NoSpace(exc.message)
        detail = "; ".join(f"{replica.name}: {exc.message}" for replica, exc in failed)
        return Unavailable(
            f"volume {self.vol_id}: {operation} reached {stored} replicas, {self.write_quorum} "
            f"needed ({detail or 'no replica is in sync'})"
        )

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

    async def _fan_out(
        self, replicas: list[_Replica], method: str, *args: Any, timeout: float | None = None
    ) -> Outcomes:
        """Call `method` on every replica of `replicas` at once and return each one's error."""

        async def call(replica: _Replica) -> None:
            await replica.call(method, *args, timeout=timeout)

        return await self._fan_out_each(replicas, call)

    async def _fan_out_each(
        self, replicas: list[_Replica], job: Callable[[_Replica], Awaitable[None]]
    ) -> Outcomes:
        """Run `job` for every replica of `replicas` at once and return each one's error."""
        outcomes: list[PxfsError | None] = [None] * len(replicas)

        async def call(index: int, replica: _Replica) -> None:
            try:
                await job(replica)
            except PxfsError as exc:
                outcomes[index] = exc

        async with trio.open_nursery() as nursery:
            for index, replica in enumerate(replicas):
                nursery.start_soon(call, index, replica)
        return list(zip(replicas, outcomes, strict=True))


def _check_arguments(
    vol_id: str,
    epoch: int,
    nblocks: int,
    replicas: Sequence[RpcClient],
    ids: Sequence[str],
    out_of_sync: Sequence[str],
    ha_level: int | None,
    timeout: float | None,
) -> None:
    if not replicas:
        raise InvalidArgument(f"volume {vol_id}: a replication client needs a replica")
    if len(ids) != len(replicas) or len(set(ids)) != len(ids):
        raise InvalidArgument(
            f"volume {vol_id}: replica ids {list(ids)} are not one distinct id per replica"
        )
    unknown = [replica_id for replica_id in out_of_sync if replica_id not in ids]
    if unknown:
        raise InvalidArgument(f"volume {vol_id}: out-of-sync replicas {unknown} are not replicas")
    if ha_level is not None and ha_level not in MIN_WRITE_SET:
        raise InvalidArgument(f"volume {vol_id}: invalid ha level {ha_level!r}, expected 1 to 3")
    if not 0 <= epoch <= MAX_EPOCH:
        raise InvalidArgument(f"volume {vol_id}: invalid epoch {epoch}")
    if nblocks < 1:
        raise InvalidArgument(f"volume {vol_id}: invalid nblocks {nblocks}")
    if timeout is not None and not timeout > 0:
        raise InvalidArgument(f"volume {vol_id}: invalid timeout {timeout!r}, expected seconds > 0")


def _runs(blocknos: Sequence[int]) -> list[tuple[int, int]]:
    """Split sorted, distinct block numbers into (first, count) runs of consecutive blocks."""
    runs: list[tuple[int, int]] = []
    for blockno in blocknos:
        if runs and runs[-1][0] + runs[-1][1] == blockno:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((blockno, 1))
    return runs


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
