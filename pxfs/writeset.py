"""Write-set membership of ReplicationClient: settling calls, reconcile, replica set changes.

`WriteSetControl` extends ReplicationBase (pxfs/replicationbase.py). It drops the replicas that
fail a call from the write set and reports the change to the catalog, or raises when fewer than
the write quorum stored it. It reconciles the blocks of a write that failed below the quorum,
drops a write-set replica that cannot be reached, and adds or removes replicas when the ha level
changes. docs/replication.md gives the rules.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import trio

from pxfs import resync
from pxfs.errors import InvalidArgument, NoSpace, NotFound, PxfsError, StaleEpoch, Unavailable
from pxfs.replicationbase import (
    DEFAULT_TIMEOUT,
    MIN_WRITE_SET,
    Outcomes,
    ReplicationBase,
    _Replica,
)
from pxfs.rpc import RpcClient

log = logging.getLogger(__name__)


class WriteSetControl(ReplicationBase):
    """The layer of ReplicationClient that changes the write set and settles failed calls."""

    # --- settling ----------------------------------------------------------------------------

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

    async def check_write_quorum(self) -> None:
        """Raise Unavailable unless a write quorum of the write set is connected now."""
        await self.probe_write_set()
        connected = len(self._write_set) - len(self.disconnected)
        if connected < self.write_quorum_now():
            raise Unavailable(
                f"volume {self.vol_id}: {connected} replicas of the write set are connected, "
                f"{self.write_quorum_now()} needed"
            )

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
        # Calls to a single replica wait as a disk would (see ReplicationBase.__init__). Calls to
        # more replicas time out.
        timeout = None if len(self._replicas) == 1 else self._timeout
        for replica in self._replicas.values():
            replica.timeout = timeout


def _runs(blocknos: Sequence[int]) -> list[tuple[int, int]]:
    """Split sorted, distinct block numbers into (first, count) runs of consecutive blocks."""
    runs: list[tuple[int, int]] = []
    for blockno in blocknos:
        if runs and runs[-1][0] + runs[-1][1] == blockno:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((blockno, 1))
    return runs
