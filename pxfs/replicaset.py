"""The replica set of a volume: write-set reports, and online changes of the ha level.

A mount child reports each change of its write set (`report_write_set`), and pxd records it in
the catalog. A higher ha level (`volume.update` with `ha_level`) adds replicas by a full copy.
The mount child makes the copy while the volume is mounted, and a ReplicationClient of pxd's
own while it is not. A lower one drops one replica at a time. docs/pxd.md describes the steps.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import trio

from pxfs.catalog import VolumeRecord
from pxfs.children import ChildSupervisor
from pxfs.errors import (
    AlreadyExists,
    Busy,
    InvalidArgument,
    NotFound,
    PxfsError,
    StaleEpoch,
    Unavailable,
)
from pxfs.membership import PEER_TIMEOUT, choose_replica_nodes
from pxfs.nodebase import MountChild, replica_set
from pxfs.replication import ReplicationClient

log = logging.getLogger(__name__)

MAX_HA_LEVEL = 3
#: How long a mount child may take to add or drop a replica, or to report its resync progress.
REPLICA_CHANGE_TIMEOUT = 60.0
#: Seconds between two checks of a running raise of the ha level.
HA_POLL_INTERVAL = 0.5


@dataclass
class _HaRaise:
    """The state of the task that runs a raise of one volume's ha level to its end."""

    #: Cancels the copy that pxd runs itself while the volume is not mounted.
    offline: trio.CancelScope | None = None
    offline_done: trio.Event = field(default_factory=trio.Event)
    #: The replication client of that copy, for the progress that inspect shows.
    device: ReplicationClient | None = None


class ReplicaSetControl(ChildSupervisor):
    """Write-set reports and changes of the ha level: the replica-set part of pxd's Node."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Set up the node, with no raise of an ha level running."""
        super().__init__(*args, **kwargs)
        self._ha_raises: dict[str, _HaRaise] = {}

    async def _nodes_with_status(self) -> list[dict[str, Any]]:
        """Return the catalog's node records with `online`; this node's with its live status.

        This node is listed even before it has registered: the control socket serves calls from
        the moment it listens, and a create then must not find a cluster of no nodes.
        """
        this_node = {"id": self.node_id, **await self.status(), "online": True}
        nodes = [this_node]
        for node in await self._catalog().list_nodes():
            if node["id"] == self.node_id:
                this_node.update({**node, **this_node})
            else:
                nodes.append(node)
        return nodes

    async def _check_ha_level(self, ha_level: int) -> None:
        nodes = sum(1 for node in await self._nodes_with_status() if node.get("online"))
        if ha_level > nodes:
            raise InvalidArgument(
                f"ha_level {ha_level} needs {ha_level} online nodes, but the cluster has "
                f"{nodes} online"
            )

    async def _delete_replicas_after_failure(self, vol_id: str, node_ids: list[str]) -> None:
        for node_id in node_ids:
            try:
                await self.peers.call_each([node_id], "store.delete", vol_id)
            except PxfsError as exc:
                log.error(
                    "volume %s: deleting the replica on node %s of a failed create failed: %s",
                    vol_id,
                    node_id,
                    exc.message,
                )

    async def report_write_set(
        self, vol_id: Any, epoch: Any, write_set: Any, out_of_sync: Any
    ) -> None:
        """Record the write set that the mount child of `vol_id` at `epoch` reports.

        Served on the peer socket. Raises StaleEpoch once a newer attach raised the epoch,
        so a coordinator that lost the volume cannot change its write set.
        """
        if not isinstance(vol_id, str) or isinstance(epoch, bool) or not isinstance(epoch, int):
            raise InvalidArgument("volume.report_write_set takes a volume id and an epoch")
        members = _check_node_ids("write_set", write_set) + _check_node_ids(
            "out_of_sync", out_of_sync
        )

        def change(record: VolumeRecord) -> VolumeRecord:
            if record["epoch"] != epoch:
                raise StaleEpoch(
                    f"volume {vol_id} is at epoch {record['epoch']}, not {epoch}; "
                    "a newer attach owns its write set"
                )
            if not _members_match(record, members):
                raise InvalidArgument(
                    f"volume {vol_id}: the write set {write_set} and out-of-sync replicas "
                    f"{out_of_sync} are not the replica nodes {record['replica_nodes']}"
                )
            return _record_write_set(record, write_set, out_of_sync)

        before = await self._catalog().find_volume(vol_id)
        after = await self._catalog().update_volume(vol_id, change)
        child = self._mounts.get(vol_id)
        if child is not None and child.epoch == epoch:
            # A replica that joined may let another node take the volume over from now on.
            child.replica_nodes = replica_set(after)
        if after["ha_level"] != before["ha_level"]:
            log.info(
                "volume %s: ha level is now %d, replicas on %s",
                vol_id,
                after["ha_level"],
                ", ".join(after["replica_nodes"]),
            )
        level = logging.WARNING if out_of_sync else logging.INFO
        log.log(
            level,
            "volume %s: write set %s, out of sync %s at epoch %d",
            vol_id,
            ", ".join(write_set),
            ", ".join(out_of_sync) or "none",
            epoch,
        )

    async def _plan_ha_change(
        self, record: VolumeRecord, ha_level: int | None, requested: list[str] | None
    ) -> _HaPlan | None:
        """Check a change of the ha level and pick the replicas to add or drop."""
        if ha_level is None:
            return None
        current = record["ha_level"]
        target = record.get("replica_nodes_next")
        if target is not None:
            if len(target) == ha_level:
                return _HaPlan(ha_level, resume=True)
            raise Busy(
                f"volume {record['name']}: its ha level is changing from {current} to "
                f"{len(target)}; retry once that change is done"
            )
        if ha_level == current:
            return None
        if record["attached_on"] not in ("", self.node_id):
            raise Busy(
                f"volume {record['name']} is attached on node {record['attached_on']}; "
                "change its ha level on that node"
            )
        if ha_level < current:
            if requested is not None:
                raise InvalidArgument("volume.update takes nodes only with a higher ha_level")
            return _HaPlan(ha_level, drop=_choose_drops(record, current - ha_level))
        await self._check_ha_level(ha_level)
        nodes = await self._nodes_with_status()
        others = [node for node in nodes if node["id"] not in record["replica_nodes"]]
        return _HaPlan(ha_level, add=choose_replica_nodes(others, ha_level - current, requested))

    async def _change_ha_level(self, record: VolumeRecord, plan: _HaPlan) -> VolumeRecord:
        """Start a raise of the ha level, or drop replicas for a lower one."""
        target = record.get("replica_nodes_next")
        if plan.resume and target is not None and len(target) < len(record["replica_nodes"]):
            plan.drop = [node for node in record["replica_nodes"] if node not in target]
        if plan.drop:
            for node_id in plan.drop:
                record = await self._drop_replica(record, node_id, plan.ha_level)
            return record
        if not plan.resume:
            record = await self._add_empty_replicas(record, plan.add)
        self._resume_raise(record)
        return record

    def _resume_raise(self, record: VolumeRecord) -> None:
        """Start the task that copies to the new replicas of a raise, unless it runs already."""
        vol_id = record["id"]
        if _raising(record) and vol_id not in self._ha_raises:
            self._ha_raises[vol_id] = _HaRaise()
            self._live_nursery().start_soon(self._see_raise_through, vol_id)

    async def _add_empty_replicas(self, record: VolumeRecord, added: list[str]) -> VolumeRecord:
        """Create an empty replica on each of `added` and record them as the next replica set."""
        vol_id = record["id"]
        nblocks = await self._replica_nblocks(record)
        created: list[str] = []

        def change(current: VolumeRecord) -> VolumeRecord:
            if current.get("replica_nodes_next") is not None:
                raise Busy(f"volume {current['name']}: another change of its ha level started")
            if current["replica_nodes"] != record["replica_nodes"]:
                raise Busy(f"volume {current['name']}: its replica nodes changed; retry")
            current["replica_nodes_next"] = current["replica_nodes"] + added
            return current

        try:
            for node_id in added:
                await self._create_empty_replica(vol_id, node_id, nblocks)
                created.append(node_id)
            record = await self._catalog().update_volume(vol_id, change)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._delete_replicas_after_failure(vol_id, created)
            raise
        log.info(
            "volume %s: raising ha level from %d to %d, copying to new replicas on %s",
            vol_id,
            record["ha_level"],
            len(record["replica_nodes_next"]),
            ", ".join(added),
        )
        return record

    async def _create_empty_replica(self, vol_id: str, node_id: str, nblocks: int) -> None:
        try:
            await self.peers.call_each([node_id], "store.create", vol_id, nblocks)
        except AlreadyExists:
            # Left by an earlier raise that failed: the record lists no replica on this node,
            # so nothing reads it.
            log.warning("volume %s: replacing a stale replica on node %s", vol_id, node_id)
            await self.peers.call_each([node_id], "store.delete", vol_id)
            await self.peers.call_each([node_id], "store.create", vol_id, nblocks)

    async def _replica_nblocks(self, record: VolumeRecord) -> int:
        """Return the size in blocks of the first write-set replica that responds."""
        members = sorted(record["write_set"], key=lambda node_id: node_id != self.node_id)
        failures = []
        for node_id in members:
            with trio.move_on_after(PEER_TIMEOUT):
                try:
                    async with self.peers.connect([node_id]) as (client,):
                        info = await client.call("store.info", record["id"])
                    return int(info["nblocks"])
                except PxfsError as exc:
                    failures.append(f"{node_id}: {exc.message}")
                    continue
            failures.append(f"{node_id}: timed out after {PEER_TIMEOUT} s")
        raise Unavailable(
            f"volume {record['id']}: store.info failed on every replica of the write set: "
            f"{'; '.join(failures) or 'the write set is empty'}"
        )

    async def _see_raise_through(self, vol_id: str) -> None:
        """Copy to the new replicas of a raise, through the mount child or here, until done."""
        job = self._ha_raises[vol_id]
        last_error = ""
        try:
            while True:
                found = await self._catalog().get_volume(vol_id)
                if found is None or not _raising(found.record):
                    return
                try:
                    await self._raise_step(job, found.record)
                except PxfsError as exc:
                    # Each new reason is a warning; a reason that repeats at every poll is not.
                    level = logging.WARNING if exc.message != last_error else logging.DEBUG
                    log.log(level, "volume %s: copy to the new replicas failed: %s", vol_id, exc)
                    last_error = exc.message
                await trio.sleep(HA_POLL_INTERVAL)
        except Exception:
            log.exception("volume %s: the raise of the ha level stopped", vol_id)
        finally:
            del self._ha_raises[vol_id]

    async def _raise_step(self, job: _HaRaise, record: VolumeRecord) -> None:
        vol_id = record["id"]
        if record["attached_on"] not in ("", self.node_id):
            # NOTE: the mount child of another node is not told of the new replicas, so the
            # copy waits until the volume is detached there or attached here.
            return
        child = self._mounts.get(vol_id)
        if child is not None and child.running:
            await self._add_through_child(child, record)
            return
        scope = trio.CancelScope()
        async with self._volume_locks[vol_id]:
            # mount_volume stops this copy under the same lock before it starts a child.
            record = (await self._catalog().require_volume(vol_id)).record
            if not _raising(record) or self._child_running(vol_id):
                return
            job.offline, job.offline_done = scope, trio.Event()
        try:
            with scope:
                await self._copy_offline(job, record)
        finally:
            job.offline, job.device = None, None
            job.offline_done.set()

    async def _add_through_child(self, child: MountChild, record: VolumeRecord) -> None:
        target = record["replica_nodes_next"]
        added = [node_id for node_id in target if node_id not in record["replica_nodes"]]
        addresses = await self.peers.addresses(added)
        for node_id, address in zip(added, addresses, strict=True):
            reply = await self._call_child(
                child, REPLICA_CHANGE_TIMEOUT, "mount.add_replica", node_id, address, len(target)
            )
            if reply.get("added"):
                log.info(
                    "volume %s: the mount child copies to new replica %s", child.vol_id, node_id
                )

    async def _copy_offline(self, job: _HaRaise, record: VolumeRecord) -> None:
        """Copy every written block to the new replicas of a volume that is not mounted."""
        vol_id, epoch = record["id"], record["epoch"]
        ids = list(record["replica_nodes_next"])
        added = [node_id for node_id in ids if node_id not in record["replica_nodes"]]
        nblocks = await self._replica_nblocks(record)

        async def report(write_set: list[str], out_of_sync: list[str]) -> None:
            # Raises StaleEpoch once an attach raised the epoch, so this copy never completes
            # a raise for a volume that a mount child may be writing without the new replicas.
            await self.report_write_set(vol_id, epoch, write_set, out_of_sync)

        async with self.peers.connect(ids) as clients:
            device = ReplicationClient(
                vol_id,
                epoch,
                nblocks,
                clients,
                ha_level=record["ha_level"],
                replica_ids=ids,
                local=self.node_id if self.node_id in ids else None,
                out_of_sync=list(record["out_of_sync"]) + added,
                on_write_set_change=report,
            )
            job.device = device
            await device.open()
            for node_id in added:
                copied = await device.resync(node_id)
                log.info("volume %s: copied %d blocks to new replica %s", vol_id, copied, node_id)

    async def _stop_offline_copy(self, vol_id: str) -> None:
        """Stop the copy to new replicas that pxd runs for `vol_id`; the caller holds its lock."""
        job = self._ha_raises.get(vol_id)
        if job is None or job.offline is None:
            return
        job.offline.cancel()
        await job.offline_done.wait()

    async def _drop_replica(
        self, record: VolumeRecord, node_id: str, ha_level: int
    ) -> VolumeRecord:
        """Remove one replica from the write set and the catalog, then delete its store."""
        vol_id = record["id"]
        remaining = [node for node in record["replica_nodes"] if node != node_id]

        def mark(current: VolumeRecord) -> VolumeRecord:
            if node_id not in current["replica_nodes"]:
                raise Busy(f"volume {current['name']}: its replica nodes changed; retry")
            pending = current.get("replica_nodes_next")
            if pending is not None and not set(pending) <= set(remaining):
                raise Busy(f"volume {current['name']}: another change of its ha level started")
            if pending is None:
                current["replica_nodes_next"] = _keep_after_drops(current, ha_level)
            return current

        def finish(current: VolumeRecord) -> VolumeRecord:
            current["replica_nodes"] = [
                node for node in current["replica_nodes"] if node != node_id
            ]
            current["ha_level"] = len(current["replica_nodes"])
            current["write_set"] = [node for node in current["write_set"] if node != node_id]
            current["out_of_sync"] = [node for node in current["out_of_sync"] if node != node_id]
            if set(current.get("replica_nodes_next") or ()) == set(current["replica_nodes"]):
                current.pop("replica_nodes_next", None)
            return current

        record = await self._catalog().update_volume(vol_id, mark)
        await self._drop_from_child(record, node_id, len(remaining))
        record = await self._catalog().update_volume(vol_id, finish)
        log.info(
            "volume %s: dropped the replica on node %s, ha level %d",
            vol_id,
            node_id,
            len(remaining),
        )
        try:
            await self.peers.call_each([node_id], "store.delete", vol_id)
        except PxfsError as exc:
            # NOTE: the store stays on that node until it is deleted by hand; no record uses it.
            log.error(
                "volume %s: deleting the dropped replica on node %s failed: %s",
                vol_id,
                node_id,
                exc.message,
            )
        return record

    async def _drop_from_child(self, record: VolumeRecord, node_id: str, ha_level: int) -> None:
        """Have a running mount child stop all I/O to the replica on `node_id`."""
        child = self._mounts.get(record["id"])
        if child is None or not child.running:
            return
        try:
            await self._call_child(
                child, REPLICA_CHANGE_TIMEOUT, "mount.remove_replica", node_id, ha_level
            )
        except (InvalidArgument, NotFound):
            # The child kept the replica, so the change is undone and can be asked for again.
            await self._catalog().update_volume(record["id"], _clear_next)
            raise
        except PxfsError as exc:
            raise Unavailable(
                f"volume {record['name']}: the mount child failed to drop the replica on node "
                f"{node_id}: {exc.message}; repeat the update to finish the change"
            ) from None

    async def _inspect_record(self, record: VolumeRecord) -> VolumeRecord:
        """Return the public record with `ha_update`, the progress of a running ha change."""
        public = await self._public(record)
        target = record.get("replica_nodes_next")
        if target is None:
            return public
        progress: dict[str, Any] = {}
        job = self._ha_raises.get(record["id"])
        child = self._mounts.get(record["id"])
        if child is not None and child.running:
            with contextlib.suppress(PxfsError):
                progress = await self._call_child(child, 2.0, "mount.resync_progress")
        elif job is not None and job.device is not None:
            progress = job.device.resync_progress()
            public["runtime_state"] = job.device.runtime_state()
        public["ha_update"] = {
            "ha_level": len(target),
            "adding": [node for node in target if node not in record["replica_nodes"]],
            "removing": [node for node in record["replica_nodes"] if node not in target],
            "progress": progress,
        }
        return public


@dataclass
class _HaPlan:
    """A change of the ha level: the replica nodes to add, or the ones to drop."""

    ha_level: int
    add: list[str] = field(default_factory=list)
    drop: list[str] = field(default_factory=list)
    #: The catalog already records the change, so the update only completes it.
    resume: bool = False


def _raising(record: VolumeRecord) -> bool:
    target = record.get("replica_nodes_next")
    if record.get("deleting") or target is None:
        return False
    return len(target) > len(record["replica_nodes"])


def _choose_drops(record: VolumeRecord, count: int) -> list[str]:
    """Pick the replicas to drop: out-of-sync ones first, the attached node's own one last."""
    out_of_sync = [node for node in record["replica_nodes"] if node in record["out_of_sync"]]
    in_sync = [node for node in reversed(record["replica_nodes"]) if node not in out_of_sync]
    in_sync.sort(key=lambda node: node == record["attached_on"])
    return (out_of_sync + in_sync)[:count]


def _keep_after_drops(record: VolumeRecord, ha_level: int) -> list[str]:
    dropped = _choose_drops(record, len(record["replica_nodes"]) - ha_level)
    return [node for node in record["replica_nodes"] if node not in dropped]


def _clear_next(record: VolumeRecord) -> VolumeRecord:
    record.pop("replica_nodes_next", None)
    return record


def _members_match(record: VolumeRecord, members: list[str]) -> bool:
    """Tell whether a reported write set covers the replica nodes of `record`.

    While the ha level changes, a mount child may hold any set between the current replica
    nodes and those of `replica_nodes_next`.
    """
    current = set(record["replica_nodes"])
    if len(members) != len(set(members)):
        return False
    if set(members) == current:
        return True
    target = record.get("replica_nodes_next")
    if target is None:
        return False
    low, high = sorted((current, set(target)), key=len)
    return low <= set(members) <= high


def _record_write_set(
    record: VolumeRecord, write_set: list[str], out_of_sync: list[str]
) -> VolumeRecord:
    """Store a reported write set; a replica added by a raise of the ha level that joined it
    becomes a replica node, and the ha level counts it."""
    nodes = list(record["replica_nodes"])
    target = record.get("replica_nodes_next")
    if target is not None and len(target) > len(nodes):
        nodes += [node for node in target if node not in nodes and node in write_set]
        record["replica_nodes"] = nodes
        record["ha_level"] = len(nodes)
        if len(nodes) == len(target):
            del record["replica_nodes_next"]
    record["write_set"] = [node for node in write_set if node in nodes]
    record["out_of_sync"] = [node for node in out_of_sync if node in nodes]
    return record


def check_ha_range(ha_level: Any) -> int:
    """Return `ha_level` if it is an integer from 1 to MAX_HA_LEVEL; raises InvalidArgument."""
    if isinstance(ha_level, bool) or not isinstance(ha_level, int):
        raise InvalidArgument(f"ha_level must be an integer 1-3, not {ha_level!r}")
    if not 1 <= ha_level <= MAX_HA_LEVEL:
        raise InvalidArgument(f"invalid ha_level {ha_level}: it must be 1, 2 or 3")
    return ha_level


def _check_node_ids(name: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidArgument(f"{name} must be a list of node ids, not {value!r}")
    return value
