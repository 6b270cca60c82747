"""The resync of one replica by ReplicationClient: its claim, fence and rejoin of the write set.

`ReplicaResync` extends WriteSetControl (pxfs/writeset.py). It prepares the target, takes the
floor, fences the target and moves it to the write set once pxfs/resync.py has copied the blocks
that it missed. docs/replication.md lists the steps.
"""

from __future__ import annotations

import logging

from pxfs import resync
from pxfs.errors import Busy, Corrupted, NotFound, NotSupported, PxfsError, Unavailable
from pxfs.replicationbase import SLOW_TIMEOUT, _Replica
from pxfs.resync import ResyncProgress
from pxfs.rpc import RpcClient
from pxfs.writeset import WriteSetControl

log = logging.getLogger(__name__)


class ReplicaResync(WriteSetControl):
    """The layer of ReplicationClient that resyncs a returning replica."""

    def resyncing(self, replica_id: str) -> bool:
        """Return whether a resync of the replica runs now, from its claim to its end."""
        return replica_id in self._resync_claims

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
        if self._replicas.get(replica.id) is not replica:
            # remove_replica ran while the target was prepared. As a target it would make every
            # write look up a replica that is gone.
            raise Unavailable(
                f"volume {self.vol_id}: replica {replica.name} was dropped during its resync"
            )
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
