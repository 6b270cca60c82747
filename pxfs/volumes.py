"""The volume methods of pxd's control RPC: create, list, attach, mount, check, delete.

volume.update is in pxfs/volumeupdate.py.

Every volume operation runs under that volume's lock, so attach, mount, unmount, check, delete
and the restart of a child never interleave on one volume. Catalog changes go through catalog
transactions, which order them against other nodes as well.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
import uuid
from collections.abc import Callable
from typing import Any

import trio

from pxfs import errors
from pxfs.catalog import VolumeRecord
from pxfs.errors import (
    Busy,
    InternalError,
    InvalidArgument,
    NoSpace,
    NotFound,
    PxfsError,
    Unavailable,
)
from pxfs.hostmounts import (
    check_mount_path,
    is_mounted,
    normalize_path,
    parent_resolved,
    resolve_in_thread,
    resolve_path,
)
from pxfs.membership import choose_replica_nodes, parse_requested_nodes
from pxfs.nodebase import ChildUnreachable, MountChild, now_ns
from pxfs.replicaset import check_ha_range
from pxfs.replication import ReplicationClient
from pxfs.scrub import Scrubber
from pxfs.units import check_size, validate_labels, validate_name
from pxfs.volume.format import device_blocks
from pxfs.volume.namespace import Volume
from pxfs.volumeupdate import VolumeUpdates

log = logging.getLogger(__name__)

#: Volumes that volume.list describes at once, each with a call to its mount child.
LIST_CONCURRENCY = 16

#: A volume check reads all metadata of the volume; large volumes take a while.
CHECK_TIMEOUT = 600.0
CREATE_FIELDS = {"name", "size", "ha_level", "labels", "nodes"}
LIST_FIELDS = {"name", "labels", "ids"}
#: How long a mount child may take to make its writes durable before its last path goes.
WRITE_BACK_TIMEOUT = 20.0


class VolumeControl(VolumeUpdates):
    """The volume.* methods of the control RPC."""

    async def create_volume(self, spec: Any) -> VolumeRecord:
        """Create and format a volume; the same name, size and ha_level returns the existing one."""
        name, size, ha_level, labels = self._parse_create(spec)
        requested = parse_requested_nodes(spec.get("nodes"))
        self._reject_while_stopping()
        async with self._create_lock:
            existing = await self._find_by_name(name)
            if existing is not None:
                return await self._existing_for_create(existing, size, ha_level)
            nodes = await self._nodes_with_status()
            replica_nodes = choose_replica_nodes(nodes, ha_level, requested)
            # NOTE: each node checks its own max_volumes for every replica node, and only its
            # own creates are serialised, so two nodes creating at once may pass it by one each.
            volumes = await self._catalog().list_volumes()
            limit = self.config.max_volumes
            for node_id in replica_nodes:
                replicas = sum(
                    node_id in [*record["replica_nodes"], *(record.get("replica_nodes_next") or [])]
                    for record in volumes
                )
                if replicas >= limit:
                    raise errors.NoSpace(
                        f"node {node_id} has replicas of {replicas} volumes, and max_volumes in "
                        f"pxd.toml is {limit}; delete a volume or raise max_volumes"
                    )
            record = await self._make_volume(name, size, ha_level, labels, replica_nodes)
        log.info(
            "volume %s: created %r, %d bytes, ha %d, replicas on %s",
            record["id"],
            name,
            size,
            ha_level,
            ", ".join(record["replica_nodes"]),
        )
        return await self._public(record)

    def _parse_create(self, spec: Any) -> tuple[str, int, int, dict[str, str]]:
        if not isinstance(spec, dict):
            raise InvalidArgument("volume.create takes a map with name, size, ha_level, labels")
        unknown = set(spec) - CREATE_FIELDS
        if unknown:
            raise InvalidArgument(f"unknown volume.create fields: {', '.join(sorted(unknown))}")
        if "size" not in spec:
            raise InvalidArgument("volume.create needs a size in bytes")
        ha_level = check_ha_range(spec.get("ha_level", 1))
        name = validate_name(spec.get("name"))
        size = check_size(spec["size"])
        # The metadata regions come on top of the size; this raises for a size below the minimum.
        device_blocks(size)
        return name, size, ha_level, validate_labels(spec.get("labels"))

    async def _find_by_name(self, name: str) -> VolumeRecord | None:
        with contextlib.suppress(NotFound):
            record = await self._catalog().find_volume(name)
            if record["name"] == name:
                return record
        return None

    async def _existing_for_create(
        self, record: VolumeRecord, size: int, ha_level: int
    ) -> VolumeRecord:
        if record.get("deleting"):
            raise errors.AlreadyExists(
                f"volume {record['name']!r} is being deleted; delete it again to finish"
            )
        if record["size"] != size or record["ha_level"] != ha_level:
            raise errors.AlreadyExists(
                f"volume {record['name']!r} already exists with size {record['size']} and "
                f"ha_level {record['ha_level']}"
            )
        return await self._public(record)

    async def _make_volume(
        self, name: str, size: int, ha_level: int, labels: dict[str, str], replica_nodes: list[str]
    ) -> VolumeRecord:
        vol_id = await self._new_volume_id()
        fs_uuid = str(uuid.uuid4())
        record: VolumeRecord = {
            "id": vol_id,
            "name": name,
            "labels": labels,
            "size": size,
            "ha_level": ha_level,
            "ctime_ns": now_ns(),
            "uuid": fs_uuid,
            "replica_nodes": replica_nodes,
            # The format below writes every replica, so all of them start in the write set.
            "write_set": list(replica_nodes),
            "out_of_sync": [],
            "epoch": 1,
            "attached_on": "",
            "attach_time_ns": 0,
            "detach_time_ns": 0,
            "mount_paths": [],
        }
        nblocks = device_blocks(size)
        created: list[str] = []
        try:
            for node_id in replica_nodes:
                await self.peers.call_each([node_id], "store.create", vol_id, nblocks)
                created.append(node_id)
            await self._format(vol_id, nblocks, fs_uuid, size, record["epoch"], replica_nodes)
            await self._catalog().create_volume(record)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._delete_replicas_after_failure(vol_id, created)
            raise
        return record

    async def _new_volume_id(self) -> str:
        while True:
            vol_id = str(secrets.randbits(63))
            if await self._catalog().get_volume(vol_id) is None and vol_id != "0":
                return vol_id

    async def _format(
        self, vol_id: str, nblocks: int, fs_uuid: str, size: int, epoch: int, nodes: list[str]
    ) -> None:
        async with self.peers.connect(nodes) as clients:
            # Every replica must hold the new filesystem, so the quorum is all of them.
            device = ReplicationClient(vol_id, epoch, nblocks, clients, len(clients))
            await device.open()
            await Volume.format(device, fs_uuid, size)

    async def list_volumes(self, filters: Any = None) -> list[VolumeRecord]:
        """Return the records that match every given filter: name, labels (subset), ids."""
        name, labels, ids = _parse_list_filters(filters)
        matching = [
            record
            for record in await self._catalog().list_volumes()
            if (name is None or record["name"] == name)
            and (ids is None or record["id"] in ids)
            and all(record["labels"].get(key) == value for key, value in labels.items())
        ]
        # The mount children are asked for their state LIST_CONCURRENCY at a time, so that
        # children that do not reply (stopped ones, say) do not cost one timeout each.
        found: list[VolumeRecord | None] = [None] * len(matching)
        limiter = trio.CapacityLimiter(LIST_CONCURRENCY)

        async def describe(index: int, record: VolumeRecord) -> None:
            async with limiter:
                found[index] = await self._public(record)

        async with trio.open_nursery() as nursery:
            for index, record in enumerate(matching):
                nursery.start_soon(describe, index, record)
        return [record for record in found if record is not None]

    async def inspect_volume(self, ref: Any) -> VolumeRecord:
        """Return the record of the volume `ref` (a name or an id)."""
        return await self._inspect_record(await self._catalog().find_volume(ref))

    async def delete_volume(self, ref: Any) -> None:
        """Delete a detached volume: its replica, then its record."""
        record = await self._catalog().find_volume(ref)
        vol_id = record["id"]
        async with self._volume_locks[vol_id]:
            # The mark makes attach fail from here on, so the replica can go before the record.
            # A crash in between leaves a marked record, and a new delete finishes the job.
            await self._stop_offline_copy(vol_id)
            record = await self._catalog().update_volume(vol_id, _mark_deleting)
            # A change of the ha level may have left replicas that are not replica nodes yet.
            pending = record.get("replica_nodes_next") or []
            nodes = record["replica_nodes"] + [
                n for n in pending if n not in record["replica_nodes"]
            ]
            offline = await self._offline_nodes(nodes)
            if offline:
                # Those nodes delete their replica when they return (pxfs/leftovers.py).
                await self._catalog().add_leftovers(vol_id, offline)
                log.warning(
                    "volume %s: nodes %s are offline; each deletes its replica when it returns",
                    vol_id,
                    ", ".join(offline),
                )
            online = [node_id for node_id in nodes if node_id not in offline]
            try:
                await self.peers.call_each(online, "store.delete", vol_id)
            except Unavailable as exc:
                raise Unavailable(
                    f"volume {record['name']}: deleting a replica failed: {exc.message}. The "
                    "volume stays marked as being deleted; run delete again once that node "
                    "answers or is listed offline"
                ) from None
            self._stats().delete(vol_id)
            await self._catalog().delete_volume(vol_id)
        log.info("volume %s: deleted %r", vol_id, record["name"])

    async def _offline_nodes(self, node_ids: list[str]) -> list[str]:
        """Return the nodes of `node_ids` that the catalog lists as offline, or not at all."""
        online = {node["id"] for node in await self._nodes_with_status() if node.get("online")}
        return [node_id for node_id in node_ids if node_id not in online]

    async def attach_volume(self, ref: Any) -> VolumeRecord:
        """Attach the volume to this node, raising its epoch; a no-op if already attached here."""
        record = await self._catalog().find_volume(ref)
        async with self._volume_locks[record["id"]]:
            record = (await self._catalog().require_volume(record["id"])).record
            if record["attached_on"] == self.node_id:
                return await self._public(record)
            lost = await self._offline_holder(record)
            updated = await self._catalog().update_volume(
                record["id"], lambda current: self._attach_change(current, take_from=lost)
            )
        if lost:
            log.warning("volume %s: taken over from node %s, which is offline", updated["id"], lost)
        log.info("volume %s: attached with epoch %d", updated["id"], updated["epoch"])
        return await self._public(updated)

    def _attach_change(self, record: VolumeRecord, take_from: str = "") -> VolumeRecord:
        if record.get("deleting"):
            raise NotFound(f"volume {record['name']} is being deleted; delete it again to finish")
        if record["attached_on"] not in ("", self.node_id):
            if record["attached_on"] != take_from:
                raise Busy(f"volume {record['name']} is attached on node {record['attached_on']}")
            # The paths are on the lost node, and the raised epoch fences its mount child.
            record["mount_paths"] = []
        record["attached_on"] = self.node_id
        record["epoch"] += 1
        record["attach_time_ns"] = now_ns()
        return record

    async def detach_volume(self, ref: Any) -> VolumeRecord:
        """Detach the volume from this node; Busy while it is mounted."""
        record = await self._catalog().find_volume(ref)
        async with self._volume_locks[record["id"]]:
            record = (await self._catalog().require_volume(record["id"])).record
            if not record["attached_on"]:
                return await self._public(record)
            updated = await self._catalog().update_volume(record["id"], self._detach_change)
        log.info("volume %s: detached", updated["id"])
        return await self._public(updated)

    def _detach_change(self, record: VolumeRecord) -> VolumeRecord:
        if not record["attached_on"]:
            return record
        if record["attached_on"] != self.node_id:
            raise Busy(f"volume {record['name']} is attached on node {record['attached_on']}")
        if record["mount_paths"]:
            raise Busy(
                f"volume {record['name']} is mounted at {', '.join(record['mount_paths'])}; "
                "unmount it first"
            )
        record["attached_on"] = ""
        record["detach_time_ns"] = now_ns()
        return record

    async def mount_volume(self, ref: Any, path: Any) -> VolumeRecord:
        """Mount an attached volume at `path`, an empty directory that is not a mountpoint."""
        self._reject_while_stopping()
        record = await self._catalog().find_volume(ref)
        vol_id = record["id"]
        async with self._volume_locks[vol_id]:
            record = (await self._catalog().require_volume(vol_id)).record
            self._require_attached_here(record)
            path = resolve_path(path)
            child = self._mounts.get(vol_id)
            if path in record["mount_paths"]:
                if child is None or not child.running or path in child.paths:
                    raise Busy(f"volume {record['name']} is already mounted at {path}")
                # The catalog lists the path, but its bind failed or was lost, for instance inside
                # another volume whose mount child was down or was replaced.
                check_mount_path(path)
                await self._bind_path(child, path)
                log.info("volume %s: mounted at %s again", vol_id, path)
                return await self._public(record)
            check_mount_path(path)
            # A child and pxd must not copy to the same replicas at the same time.
            await self._stop_offline_copy(vol_id)
            try:
                child = await self._ensure_running(record)
                await self._bind_path(child, path)
                record = await self._catalog().update_volume(vol_id, _add_path(path))
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self._undo_mount(vol_id, path)
                raise
            # A raise of the ha level that a restart of pxd stopped goes on through this child.
            self._resume_raise(record)
        log.info("volume %s: mounted at %s", vol_id, path)
        return await self._public(record)

    async def _undo_mount(self, vol_id: str, path: str) -> None:
        child = self._mounts.get(vol_id)
        if child is None:
            return
        if path in child.paths:
            await self._unbind(child, path, lazy_if_busy=True)
        if not child.paths:
            await self._stop_child(child)

    def _require_attached_here(self, record: VolumeRecord) -> None:
        if record["attached_on"] == self.node_id:
            return
        if record["attached_on"]:
            raise Busy(f"volume {record['name']} is attached on node {record['attached_on']}")
        raise InvalidArgument(f"volume {record['name']} is not attached; attach it first")

    async def unmount_volume(self, ref: Any, path: Any) -> VolumeRecord:
        """Unmount the volume from `path`; the child stops when no path is left."""
        record = await self._catalog().find_volume(ref)
        vol_id = record["id"]
        path = normalize_path(path)
        async with self._volume_locks[vol_id]:
            record = (await self._catalog().require_volume(vol_id)).record
            if record["attached_on"] not in ("", self.node_id):
                # Its mount paths are paths on that node: unmounting them here would tear down
                # whatever this host has mounted there, and drop that node's record of them.
                raise Busy(
                    f"volume {record['name']} is attached on node {record['attached_on']}; "
                    "unmount it there"
                )
            if path not in record["mount_paths"]:
                # A path given through a symbolic link names the resolved path in the record.
                # Resolving the parents first spares the stat of the mountpoint, which waits
                # on a stopped mount child, and a thread keeps such a wait out of pxd's loop.
                requested = path
                path = await resolve_in_thread(requested, parent_resolved)
                if path not in record["mount_paths"]:
                    path = await resolve_in_thread(requested)
            if path not in record["mount_paths"]:
                raise NotFound(f"volume {record['name']} is not mounted at {path}")
            child = self._mounts.get(vol_id)
            if child is not None and child.running and child.paths == [path]:
                await self._write_back_before_stop(child, record, path)
            record = await self._unmount_path(child, vol_id, path)
            if child is not None and not child.paths:
                running = child.running
                await self._stop_child(child)
                if running:
                    _check_clean_exit(child, record, path)
        log.info("volume %s: unmounted from %s", vol_id, path)
        return await self._public(record)

    async def _unmount_path(self, child: MountChild | None, vol_id: str, path: str) -> VolumeRecord:
        """Unmount `path` and drop it from the catalog; a failed catalog write mounts it again."""
        if child is not None and path in child.paths:
            await self._unbind(child, path, lazy_if_busy=not child.running)
        else:
            await self._clear_stale_mount(path)
        try:
            return await self._catalog().update_volume(vol_id, _remove_path(path))
        except PxfsError:
            # The catalog still lists the path, so it gets the volume back, or writes to it would
            # land on the directory under it.
            if child is not None and child.running and not is_mounted(path):
                await self._bind_paths(child, [path])
            raise

    async def _write_back_before_stop(
        self, child: MountChild, record: VolumeRecord, path: str
    ) -> None:
        """Have a child whose last path goes make its writes durable, or keep it mounted.

        A child that stops holding writes it cannot store loses them. So when they do not fit
        (NoSpace) or cannot reach a write quorum of replicas (Unavailable), the unmount fails
        and the volume stays mounted at `path`, to be unmounted again once they can be stored.
        """
        try:
            await self._write_back(child, before_close=True)
        except (NoSpace, Unavailable) as exc:
            if isinstance(exc, NoSpace):
                reason = "its writes do not fit"
                advice = "mounted with its unwritten data, unmount it again once there is space"
            else:
                reason = "its writes or its close cannot reach its replicas"
                advice = (
                    "mounted, because its writes or its close need those replicas; unmount it "
                    "again once the nodes of its replicas are back"
                )
            log.warning(
                "volume %s: not unmounting %s, %s: %s", record["id"], path, reason, exc.message
            )
            raise type(exc)(
                f"cannot unmount volume {record['name']} from {path}: {exc.message}; it stays "
                f"{advice}"
            ) from None

    async def _write_back(self, child: MountChild, *, before_close: bool = False) -> None:
        """Have the kernel and then the child write every change, before the child stops.

        Raises NoSpace when the changes do not fit, and Unavailable when the child replies that
        they could not reach a write quorum. With `before_close`, the child also raises
        Unavailable when no write quorum is connected for the writes of its close. Other
        failures are logged, and the caller then stops the child, as it does for a child that
        does not reply within WRITE_BACK_TIMEOUT or that exits during the call.
        """
        await self._sync_kernel_cache(child)
        try:
            await self._call_child(child, WRITE_BACK_TIMEOUT, "mount.sync", before_close)
        except ChildUnreachable as exc:
            log.warning(
                "volume %s: write-back before the stop failed: %s", child.vol_id, exc.message
            )
        except (NoSpace, Unavailable) as exc:
            if child.running:
                raise
            log.warning(
                "volume %s: mount child exited during the write-back: %s", child.vol_id, exc.message
            )
        except PxfsError as exc:
            log.warning(
                "volume %s: write-back before the stop failed: %s", child.vol_id, exc.message
            )

    async def check_volume(self, ref: Any) -> dict[str, Any]:
        """Check the metadata of a detached volume; return clean and the problems found."""
        record = await self._catalog().find_volume(ref)
        vol_id = record["id"]
        async with self._volume_locks[vol_id]:
            record = (await self._catalog().require_volume(vol_id)).record
            if record["attached_on"]:
                raise Busy(f"volume {record['name']} is attached; detach it before a check")
            result = await self._run_check(record)
        log.info("volume %s: check found %d problems", vol_id, len(result["problems"]))
        return result

    async def _run_check(self, record: VolumeRecord) -> dict[str, Any]:
        argv = await self._child_argv(record, record["epoch"]) + ["--check"]
        with trio.move_on_after(CHECK_TIMEOUT) as scope:
            result = await trio.run_process(
                argv, capture_stdout=True, capture_stderr=True, check=False, **self._child_env()
            )
        if scope.cancelled_caught:
            raise Unavailable(f"volume check of {record['id']} timed out after {CHECK_TIMEOUT} s")
        problems = result.stdout.decode(errors="replace").splitlines()
        problems = [line for line in problems if line.strip()]
        if result.returncode == 0:
            return {"clean": True, "problems": problems}
        if problems:
            return {"clean": False, "problems": problems}
        stderr = result.stderr.decode(errors="replace").strip().splitlines()
        raise errors.InternalError(
            f"volume check of {record['id']} failed with exit status {result.returncode}: "
            f"{stderr[-1] if stderr else 'no error output'}"
        )

    @functools.cached_property
    def scrubber(self) -> Scrubber:
        """The verify and scrub of the volumes, built at first use, which is after start-up."""
        return Scrubber(
            self._catalog(),
            self.peers,
            self.node_id,
            self.config.scrub_interval_seconds,
            self.config.scrub_rate_mib,
        )

    async def verify_volume(self, ref: Any, check_data: Any = False) -> dict[str, Any]:
        """Compare every allocated block of every replica of `ref` by version and crc32."""
        return await self.scrubber.verify(ref, check_data)

    async def scrub_volume(self, ref: Any) -> dict[str, Any]:
        """Check every written block of every replica of `ref` and repair the bad copies."""
        return await self.scrubber.scrub(ref)


def _check_clean_exit(child: MountChild, record: VolumeRecord, path: str) -> None:
    """Raise when a child that pxd stopped failed to close its volume, after the unmount."""
    status = child.exit_status
    if not status:
        return
    error = {NoSpace.exit_code: NoSpace, Unavailable.exit_code: Unavailable}.get(
        status, InternalError
    )
    raise error(
        f"volume {record['name']} is unmounted from {path}, but its mount child exited with "
        f"status {status}, so its last writes may be lost: {child.last_error()}"
    )


def _mark_deleting(record: VolumeRecord) -> VolumeRecord:
    if record["attached_on"]:
        raise Busy(
            f"volume {record['name']} is attached on node {record['attached_on']}; "
            "detach it before deleting"
        )
    record["deleting"] = True
    return record


def _add_path(path: str) -> Callable[[VolumeRecord], VolumeRecord]:
    def change(record: VolumeRecord) -> VolumeRecord:
        if path not in record["mount_paths"]:
            record["mount_paths"].append(path)
        return record

    return change


def _remove_path(path: str) -> Callable[[VolumeRecord], VolumeRecord]:
    def change(record: VolumeRecord) -> VolumeRecord:
        record["mount_paths"] = [p for p in record["mount_paths"] if p != path]
        return record

    return change


def _parse_list_filters(filters: Any) -> tuple[str | None, dict[str, str], set[str] | None]:
    if filters is None:
        filters = {}
    if not isinstance(filters, dict):
        raise InvalidArgument("volume.list takes a map of filters: name, labels, ids")
    unknown = set(filters) - LIST_FIELDS
    if unknown:
        raise InvalidArgument(f"unknown volume.list filters: {', '.join(sorted(unknown))}")
    name = filters.get("name")
    if name is not None and not isinstance(name, str):
        raise InvalidArgument("the name filter must be a string")
    labels = validate_labels(filters.get("labels"))
    ids = filters.get("ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise InvalidArgument("the ids filter must be a list of strings")
        ids = set(ids)
    return name, labels, ids
