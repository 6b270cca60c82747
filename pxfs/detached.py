"""Resync of the out-of-sync replicas of volumes that no node has attached.

A mount child resyncs the replicas of its own volume. A volume that is attached nowhere has no
mount child, so a replica that returns after missing writes would stay out of sync until the
next attach, and the volume would stay degraded meanwhile. pxd therefore checks the detached
volumes every RESYNC_DETACHED_INTERVAL seconds. When every node of a volume's write set is
online, the first of them resyncs each out-of-sync replica that is online, with a
ReplicationClient of its own at
an epoch one above the volume's, as a mount child would after an attach. The raise matters:
a resync copies no block whose version on the target is at or above the client's first
version, which is only right when that version is above every write of the epochs before.

An attach raises the epoch again. From then on this resync cannot record its write
set (report_write_set raises StaleEpoch), and once the new mount child has opened the replicas
they reject its copies too, so it never competes with a mount child. A mount on this node also
cancels it before the child starts.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import trio

from pxfs.catalog import VolumeRecord
from pxfs.errors import Busy, PxfsError, StaleEpoch
from pxfs.replication import ReplicationClient
from pxfs.volumes import VolumeControl

log = logging.getLogger(__name__)

#: Seconds between two checks of the detached volumes for replicas to resync.
RESYNC_DETACHED_INTERVAL = 5.0
#: Seconds before a detached volume whose resync failed is tried again. Each attempt raises
#: the volume's epoch, so a replica that etcd lists online but this node cannot reach does not
#: get an attempt, a raise and a warning every RESYNC_DETACHED_INTERVAL.
RESYNC_DETACHED_BACKOFF = 15.0


class DetachedResync(VolumeControl):
    """The resync that pxd runs itself for volumes that are attached nowhere."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Set up the node, with no resync of a detached volume running."""
        super().__init__(*args, **kwargs)
        #: The running resync of a detached volume, by volume id: its cancel scope and an event
        #: set when it has ended.
        self._detached_resyncs: dict[str, tuple[trio.CancelScope, trio.Event]] = {}
        #: The trio clock time before which a detached volume whose resync failed is left
        #: alone, by volume id.
        self._detached_retry_at: dict[str, float] = {}

    async def _resync_detached_periodically(self) -> None:
        """Resync the returning replicas of detached volumes, one volume at a time."""
        while True:
            await trio.sleep(RESYNC_DETACHED_INTERVAL)
            try:
                await self._resync_detached_volumes()
            except PxfsError as exc:
                # etcd is out of reach; the lease task and the status publication log that.
                log.debug("checking the detached volumes for a resync failed: %s", exc)
            except Exception:
                # A bug here must not take down pxd and every volume it serves.
                log.exception("checking the detached volumes for a resync failed")

    async def _resync_detached_volumes(self) -> None:
        if self._cut_off():
            return
        catalog = self._catalog()
        online = {node["id"] for node in await catalog.list_nodes() if node.get("online")}
        for record in await catalog.list_volumes():
            if self._resyncs_here(record, online):
                await self._resync_detached(record["id"], online)

    def _resyncs_here(self, record: VolumeRecord, online: set[str]) -> bool:
        """Tell whether this node should resync `record` now.

        The volume must be detached, not being deleted or changing its ha level, have an
        out-of-sync replica that is online, and have every replica of its write set online,
        this node first among them.
        """
        write_set = record["write_set"]
        if record["attached_on"] or record.get("deleting") or not write_set:
            return False
        if record.get("replica_nodes_next") is not None or record["id"] in self._ha_raises:
            return False
        if trio.current_time() < self._detached_retry_at.get(record["id"], -math.inf):
            return False
        if not any(node_id in online for node_id in record["out_of_sync"]):
            return False
        return write_set[0] == self.node_id and all(node_id in online for node_id in write_set)

    async def _resync_detached(self, vol_id: str, online: set[str]) -> None:
        scope, done = trio.CancelScope(), trio.Event()
        async with self._volume_locks[vol_id]:
            # The record is read again under the lock that attach, mount and delete take.
            found = await self._catalog().get_volume(vol_id)
            if found is None or self._child_running(vol_id):
                return
            if not self._resyncs_here(found.record, online):
                return
            try:
                record = await self._catalog().update_volume(vol_id, _raise_epoch)
            except Busy:
                # An attach on another node came first; its mount child resyncs the volume.
                return
            self._detached_resyncs[vol_id] = (scope, done)
        try:
            with scope:
                await self._resync_replicas(record, online)
            self._detached_retry_at.pop(vol_id, None)
        except StaleEpoch:
            log.info("volume %s: attached meanwhile, so its mount child resyncs it", vol_id)
        except PxfsError as exc:
            # The first failure in a row is a warning, the repeats are informational.
            failed_before = vol_id in self._detached_retry_at
            self._detached_retry_at[vol_id] = trio.current_time() + RESYNC_DETACHED_BACKOFF
            log.log(
                logging.INFO if failed_before else logging.WARNING,
                "volume %s: resync of the detached volume failed, next try in %g s: %s",
                vol_id,
                RESYNC_DETACHED_BACKOFF,
                exc,
            )
        finally:
            del self._detached_resyncs[vol_id]
            done.set()

    async def _resync_replicas(self, record: VolumeRecord, online: set[str]) -> None:
        """Resync the online out-of-sync replicas of a detached volume at its record's epoch."""
        vol_id, epoch = record["id"], record["epoch"]
        targets = [node_id for node_id in record["out_of_sync"] if node_id in online]
        offline = [node_id for node_id in record["out_of_sync"] if node_id not in online]
        ids = list(record["write_set"]) + targets
        nblocks = await self._replica_nblocks(record)
        log.info("volume %s: resyncing %s while detached", vol_id, ", ".join(targets))

        async def report(write_set: list[str], out_of_sync: list[str]) -> None:
            # The replicas left out because their node is offline are still out of sync.
            await self.report_write_set(vol_id, epoch, write_set, out_of_sync + offline)

        async with self.peers.connect(ids) as clients:
            device = ReplicationClient(
                vol_id,
                epoch,
                nblocks,
                clients,
                ha_level=record["ha_level"],
                replica_ids=ids,
                local=self.node_id,
                out_of_sync=targets,
                on_write_set_change=report,
            )
            await device.open()
            for node_id in targets:
                copied = await device.resync(node_id)
                log.info(
                    "volume %s: replica %s caught up while detached, %d blocks copied",
                    vol_id,
                    node_id,
                    copied,
                )

    async def _stop_offline_copy(self, vol_id: str) -> None:
        """Stop the copies that pxd runs for `vol_id` itself; the caller holds its lock."""
        await super()._stop_offline_copy(vol_id)
        running = self._detached_resyncs.get(vol_id)
        if running is not None:
            scope, done = running
            scope.cancel()
            await done.wait()


def _raise_epoch(record: VolumeRecord) -> VolumeRecord:
    """Raise the epoch of a volume that is still detached; raises Busy if it was attached."""
    if record["attached_on"] or record.get("deleting"):
        raise Busy(f"volume {record['name']} was attached or deleted meanwhile")
    record["epoch"] += 1
    return record
