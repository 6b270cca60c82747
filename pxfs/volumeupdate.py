"""volume.update: a new size, ha level or labels for a volume, applied while it is in use.

A new size is written to the catalog first and then given to a running mount child, which grows
the volume online. A child started later grows it at open. A change of the ha level goes to
ReplicaSetControl (pxfs/replicaset.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pxfs.catalog import VolumeRecord
from pxfs.errors import InvalidArgument, NotFound, PxfsError, Unavailable
from pxfs.membership import parse_requested_nodes
from pxfs.replicaset import ReplicaSetControl, check_ha_range
from pxfs.units import check_size, validate_labels
from pxfs.volume.format import device_blocks

log = logging.getLogger(__name__)

UPDATE_FIELDS = {"size", "ha_level", "labels", "nodes"}
#: How long a mount child may take to grow its volume online.
GROW_TIMEOUT = 30.0


class VolumeUpdates(ReplicaSetControl):
    """The volume.update method of the control RPC."""

    async def update_volume(self, ref: Any, changes: Any) -> VolumeRecord:
        """Apply `changes` (size, ha_level, labels) to a volume, growing it online if mounted.

        A higher ha_level adds empty replicas and starts their copy, which goes on after this
        returns; a lower one drops replicas before it returns.
        """
        parsed = _parse_update(changes)
        ha_level = parsed.pop("ha_level", None)
        requested = parsed.pop("nodes", None)
        record = await self._catalog().find_volume(ref)
        vol_id = record["id"]
        async with self._volume_locks[vol_id]:
            record = (await self._catalog().require_volume(vol_id)).record
            await self._check_update(record, parsed)
            plan = await self._plan_ha_change(record, ha_level, requested)
            if any(record.get(key) != value for key, value in parsed.items()):
                record = await self._catalog().update_volume(vol_id, _apply_update(parsed))
                log.info("volume %s: updated %s", vol_id, ", ".join(sorted(parsed)))
            if "size" in parsed:
                await self._grow_mounted(record)
            if plan is not None:
                record = await self._change_ha_level(record, plan)
        return await self._inspect_record(record)

    async def _check_update(self, record: VolumeRecord, parsed: dict[str, Any]) -> None:
        """Raise for a change that cannot be applied, before any change is made."""
        if record.get("deleting"):
            raise NotFound(f"volume {record['name']} is being deleted; delete it again to finish")
        if "size" in parsed:
            _check_not_shrinking(record, parsed["size"])

    async def _grow_mounted(self, record: VolumeRecord) -> None:
        """Have a running mount child grow its volume to the size of `record`."""
        child = self._mounts.get(record["id"])
        if child is None or not child.running:
            # The next mount child is started with --size and grows the volume at open.
            return
        try:
            reply = await self._call_child(child, GROW_TIMEOUT, "mount.grow", record["size"])
        except PxfsError as exc:
            raise Unavailable(
                f"volume {record['name']} is now {record['size']} bytes in the catalog, but the "
                f"mount child failed to grow it: {exc.message}; it grows at the next mount"
            ) from None
        log.info("volume %s: mounted volume is now %d bytes", record["id"], reply["size"])


def _parse_update(changes: Any) -> dict[str, Any]:
    """Validate the fields of volume.update and return them, the size rounded up."""
    if not isinstance(changes, dict):
        raise InvalidArgument("volume.update takes a map with any of size, ha_level, labels")
    unknown = set(changes) - UPDATE_FIELDS
    if unknown:
        raise InvalidArgument(f"unknown volume.update fields: {', '.join(sorted(unknown))}")
    parsed: dict[str, Any] = {}
    if "size" in changes:
        parsed["size"] = check_size(changes["size"])
        device_blocks(parsed["size"])
    if "ha_level" in changes:
        parsed["ha_level"] = check_ha_range(changes["ha_level"])
    if "nodes" in changes:
        if "ha_level" not in changes:
            raise InvalidArgument("volume.update takes nodes only with a higher ha_level")
        parsed["nodes"] = parse_requested_nodes(changes["nodes"])
    if "labels" in changes:
        parsed["labels"] = validate_labels(changes["labels"])
    return parsed


def _check_not_shrinking(record: VolumeRecord, size: int) -> None:
    if size < record["size"]:
        raise InvalidArgument(
            f"volume {record['name']} is {record['size']} bytes; shrinking is not supported"
        )


def _apply_update(parsed: dict[str, Any]) -> Callable[[VolumeRecord], VolumeRecord]:
    def change(record: VolumeRecord) -> VolumeRecord:
        # Checked again inside the transaction: the record may have changed since it was read.
        if "size" in parsed:
            _check_not_shrinking(record, parsed["size"])
        record.update(parsed)
        return record

    return change
