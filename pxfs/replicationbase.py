"""The state that every layer of ReplicationClient shares, and the calls to its replicas.

ReplicationClient (pxfs/replication.py) is built from four layers, each a class that extends
the one before. They are `ReplicationBase` (this module), `WriteSetControl` (pxfs/writeset.py),
`ReplicaResync` (pxfs/rejoin.py) and `ReplicationClient`, which contains the I/O path. This
module contains the constructor and its checks, the runtime state, `_Replica` with its call
timeout, and the fan-out of one call to many replicas.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from pxfs.errors import InvalidArgument, ProtocolError, PxfsError, StaleEpoch, Unavailable
from pxfs.resync import ResyncProgress
from pxfs.rpc import RpcClient
from pxfs.store import MAX_EPOCH

log = logging.getLogger(__name__)

#: Seconds within which a replica must reply to a read, write or trim call, or count as failed.
DEFAULT_TIMEOUT = 5.0
#: Seconds for calls that sync or allocate files: flush, grow, and the reset before a full copy.
SLOW_TIMEOUT = 60.0
#: The minimum size of the write set by ha level, so that ha 2 stays writable on one replica.
MIN_WRITE_SET = {1: 1, 2: 1, 3: 2}

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


class ReplicationBase:
    """The replicas of one volume, their write set and the state that every layer reads."""

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
        self._init_write_set(ids, out_of_sync, write_quorum)
        self._init_replicas(ids, replicas, local, timeout)
        self._init_resync_state(ids)
        self._init_reports(on_write_set_change)
        self._init_io_state()

    def _init_write_set(
        self, ids: Sequence[str], out_of_sync: Sequence[str], write_quorum: int | None
    ) -> None:
        minimum = MIN_WRITE_SET[self.ha_level] if write_quorum is None else write_quorum
        write_set = [replica_id for replica_id in ids if replica_id not in out_of_sync]
        if not 1 <= minimum <= len(write_set):
            raise InvalidArgument(
                f"volume {self.vol_id}: write quorum {minimum} is not between 1 and the "
                f"{len(write_set)} replicas of the write set"
            )
        self.write_quorum = minimum
        self._quorum_given = write_quorum is not None
        self._write_set = write_set
        self._out_of_sync = [replica_id for replica_id in ids if replica_id in out_of_sync]

    def _init_replicas(
        self,
        ids: Sequence[str],
        replicas: Sequence[RpcClient],
        local: str | None,
        timeout: float | None,
    ) -> None:
        self._timeout = timeout
        if len(replicas) == 1:
            timeout = None
        self._replicas = {
            replica_id: _Replica(replica_id, client, timeout)
            for replica_id, client in zip(ids, replicas, strict=True)
        }
        self._local = ids[0] if local is None else local
        if self._local not in self._replicas:
            raise InvalidArgument(f"volume {self.vol_id}: local replica {local!r} is not a replica")
        #: Replicas whose store has no store.patch (a pxd of an older version), by id.
        self._without_patch: set[str] = set()

    def _init_resync_state(self, ids: Sequence[str]) -> None:
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

    def _init_reports(self, on_write_set_change: WriteSetCallback | None) -> None:
        """Set up the count of write-set changes and of those sent to `on_write_set_change`."""
        self._on_change = on_write_set_change
        self._changes = 0
        self._reported = 0
        self._report_lock = trio.Lock()

    def _init_io_state(self) -> None:
        """Set up the I/O path's state: unsettled writes, write versions, the stale epoch."""
        self._reconcile_lock = trio.Lock()
        self._pause: trio.Event | None = None
        self._unsettled: set[int] = set()
        self._in_flight: dict[int, trio.Event] = {}
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

    def _stop(self, exc: StaleEpoch) -> None:
        if self._stale is None:
            log.error("volume %s: a newer attach took over, stopping: %s", self.vol_id, exc.message)
            self._stale = exc

    def _check_usable(self) -> None:
        if self._stale is not None:
            raise StaleEpoch(self._stale.message)

    # --- calls to replicas -------------------------------------------------------------------

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

    async def _grow_replica(self, replica: _Replica, nblocks: int) -> None:
        info = await replica.call("store.info", self.vol_id)
        if not isinstance(info, dict) or not isinstance(info.get("nblocks"), int):
            raise ProtocolError(f"replica {replica.name} sent a malformed info reply")
        # A grow whose superblock never became durable leaves replicas larger than the
        # volume, and store.grow rejects a smaller size.
        if info["nblocks"] < nblocks:
            await replica.call("store.grow", self.vol_id, self.epoch, nblocks, timeout=SLOW_TIMEOUT)


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
