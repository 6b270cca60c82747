"""Deletion of the replicas that a volume delete left on nodes that were offline.

A delete removes the replicas on the online nodes of the volume and the record. For each node
that is offline then, it records a leftover in the catalog (`Catalog.add_leftovers`), so a
node that is down does not block the delete. pxd deletes the replicas of its own leftovers at
start and every LEFTOVER_INTERVAL seconds after, and then removes the leftovers. It deletes a
replica only while the volume's record is gone or marked as being deleted, so a leftover can
never cost the data of a live volume.
"""

from __future__ import annotations

import logging

import trio

from pxfs.detached import DetachedResync
from pxfs.errors import PxfsError

log = logging.getLogger(__name__)

#: Seconds between two looks at this node's leftovers in the catalog.
LEFTOVER_INTERVAL = 30.0


class LeftoverReplicas(DetachedResync):
    """The deletion of this node's replicas of deleted volumes."""

    async def _delete_leftovers_periodically(self) -> None:
        """Delete the replicas of this node's leftovers now and every LEFTOVER_INTERVAL."""
        while True:
            try:
                await self._delete_leftovers()
            except PxfsError as exc:
                # etcd is out of reach; the lease task and the status publication log that.
                log.debug("deleting the replicas of deleted volumes failed: %s", exc)
            except Exception:
                # A bug here must not take down pxd and every volume it serves.
                log.exception("deleting the replicas of deleted volumes failed")
            await trio.sleep(LEFTOVER_INTERVAL)

    async def _delete_leftovers(self) -> None:
        catalog = self._catalog()
        for vol_id in await catalog.list_leftovers(self.node_id):
            async with self._volume_locks[vol_id]:
                found = await catalog.get_volume(vol_id)
                if found is not None and not found.record.get("deleting"):
                    log.error(
                        "volume %s: listed as deleted, but its record is live; keeping the "
                        "replica on this node",
                        vol_id,
                    )
                else:
                    await self._store().delete(vol_id)
                    self._stats().delete(vol_id)
                    log.info("volume %s: deleted the replica left here by a delete", vol_id)
            await catalog.remove_leftover(vol_id, self.node_id)
