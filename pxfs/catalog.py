"""The catalog: the one place where cluster state lives (volume records and nodes).

`Catalog` is the interface that pxd programs against. Its primitive write is compare-and-set on
one volume record: the write succeeds only if the record still has the revision that the caller
read. Transactions such as attach are built from it (`update_volume`), so a backend on etcd can
run them with an etcd transaction on the key's mod revision. `LocalCatalog` is the single-node
backend: one JSON file in the data directory, rewritten atomically on every change.

A revision is a counter that grows with every change to the catalog. Each volume keeps the
revision of its last change, so a stale read is detected even after the record went back to an
earlier value.
"""

from __future__ import annotations

import abc
import copy
import errno
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from pxfs.datadir import write_file_atomically
from pxfs.errors import (
    AlreadyExists,
    Corrupted,
    InvalidArgument,
    NoSpace,
    NotFound,
    Unavailable,
)

log = logging.getLogger(__name__)

VolumeRecord = dict[str, Any]
NodeRecord = dict[str, Any]
#: Takes a copy of the current record and returns the new one, or raises to abort.
Change = Callable[[VolumeRecord], VolumeRecord]

CATALOG_FILE = "catalog.json"
FORMAT_VERSION = 1
#: Compare-and-set attempts before a transaction gives up on a record that keeps changing.
MAX_ATTEMPTS = 16


@dataclass(frozen=True)
class Versioned:
    """A volume record with the revision of its last change."""

    record: VolumeRecord
    revision: int


class Catalog(abc.ABC):
    """Cluster state: volume records keyed by id, and the nodes of the cluster."""

    @abc.abstractmethod
    async def get_volume(self, vol_id: str) -> Versioned | None:
        """Return the record of `vol_id` with its revision, or None if there is none."""

    @abc.abstractmethod
    async def list_volumes(self) -> list[VolumeRecord]:
        """Return every volume record, ordered by creation time."""

    @abc.abstractmethod
    async def create_volume(self, record: VolumeRecord) -> Versioned:
        """Store a new record; raises AlreadyExists if its id or name is taken."""

    @abc.abstractmethod
    async def compare_and_set(
        self, vol_id: str, revision: int, record: VolumeRecord | None
    ) -> Versioned | None:
        """Replace (or with `record` None, delete) the record if it still has `revision`.

        Returns the new version, or None when the record changed since `revision` was read
        (or is gone). Deleting returns a Versioned of the removed record.
        """

    @abc.abstractmethod
    async def put_node(self, node: NodeRecord) -> None:
        """Create or replace the record of the node `node["id"]`."""

    @abc.abstractmethod
    async def list_nodes(self) -> list[NodeRecord]:
        """Return the record of every node."""

    @abc.abstractmethod
    async def add_leftovers(self, vol_id: str, node_ids: Sequence[str]) -> None:
        """Record that the replicas of `vol_id` on `node_ids` remain to be deleted."""

    @abc.abstractmethod
    async def list_leftovers(self, node_id: str) -> list[str]:
        """Return the ids of the volumes whose replica on `node_id` remains to be deleted."""

    @abc.abstractmethod
    async def remove_leftover(self, vol_id: str, node_id: str) -> None:
        """Forget the replica of `vol_id` on `node_id` once it is deleted."""

    async def close(self) -> None:  # noqa: B027 - a backend without connections has nothing to close
        """Release what the backend holds open."""

    async def require_volume(self, vol_id: str) -> Versioned:
        """Return the record of `vol_id`; raises NotFound."""
        found = await self.get_volume(vol_id)
        if found is None:
            raise NotFound(f"volume {vol_id} not found")
        return found

    async def find_volume(self, ref: str) -> VolumeRecord:
        """Return the volume whose id, or else whose name, is `ref`.

        Raises InvalidArgument for a `ref` that is not a string, and NotFound for an unknown one.
        """
        if not isinstance(ref, str):
            raise InvalidArgument(f"invalid volume {ref!r}: expected a volume name or id")
        if not ref:
            raise NotFound("volume '' not found")
        by_id = await self.get_volume(ref)
        if by_id is not None:
            return by_id.record
        for record in await self.list_volumes():
            if record["name"] == ref:
                return record
        raise NotFound(f"volume {ref} not found")

    async def update_volume(self, vol_id: str, change: Change) -> VolumeRecord:
        """Apply `change` to the record of `vol_id` as one transaction and return the result.

        `change` may run more than once when another writer gets in between, so it must not
        have side effects. An exception from it aborts the transaction and propagates.
        """
        for _ in range(MAX_ATTEMPTS):
            current = await self.require_volume(vol_id)
            updated = change(copy.deepcopy(current.record))
            written = await self.compare_and_set(vol_id, current.revision, updated)
            if written is not None:
                return written.record
        raise Unavailable(f"volume {vol_id} kept changing; gave up after {MAX_ATTEMPTS} attempts")

    async def delete_volume(
        self, vol_id: str, check: Callable[[VolumeRecord], None] | None = None
    ) -> VolumeRecord:
        """Delete the record of `vol_id` once `check` (which may raise) accepts it."""
        for _ in range(MAX_ATTEMPTS):
            current = await self.require_volume(vol_id)
            if check is not None:
                check(copy.deepcopy(current.record))
            removed = await self.compare_and_set(vol_id, current.revision, None)
            if removed is not None:
                return removed.record
        raise Unavailable(f"volume {vol_id} kept changing; gave up after {MAX_ATTEMPTS} attempts")


class LocalCatalog(Catalog):
    """The catalog of a single node, kept in DIR/catalog.json.

    Every change is written to a temporary file, synced, renamed over the old file and the
    directory synced, so a crash leaves either the old or the new catalog. Changes are made on
    a copy of the state and adopted only once the file is written, so a failed write changes
    nothing. One trio lock orders all changes.
    """

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.path = Path(data_dir) / CATALOG_FILE
        self._lock = trio.Lock()
        self._state = _load(self.path)

    async def get_volume(self, vol_id: str) -> Versioned | None:
        """Return the record of `vol_id` with its revision, or None if there is none."""
        entry = self._state["volumes"].get(vol_id)
        if entry is None:
            return None
        return Versioned(copy.deepcopy(entry["record"]), entry["revision"])

    async def list_volumes(self) -> list[VolumeRecord]:
        """Return every volume record, ordered by creation time."""
        records = [copy.deepcopy(entry["record"]) for entry in self._state["volumes"].values()]
        return sorted(records, key=lambda record: (record.get("ctime_ns", 0), record["id"]))

    async def create_volume(self, record: VolumeRecord) -> Versioned:
        """Store a new record; raises AlreadyExists if its id or name is taken."""
        async with self._lock:
            _check_unique(self._state["volumes"], record)
            state = copy.deepcopy(self._state)
            revision = state["revision"] + 1
            state["revision"] = revision
            state["volumes"][record["id"]] = {"revision": revision, "record": record}
            await self._commit(state)
        log.debug("catalog: created volume %s (%s)", record["id"], record["name"])
        return Versioned(copy.deepcopy(record), revision)

    async def compare_and_set(
        self, vol_id: str, revision: int, record: VolumeRecord | None
    ) -> Versioned | None:
        """Replace (or with `record` None, delete) the record if it still has `revision`."""
        async with self._lock:
            entry = self._state["volumes"].get(vol_id)
            if entry is None or entry["revision"] != revision:
                return None
            state = copy.deepcopy(self._state)
            state["revision"] += 1
            if record is None:
                del state["volumes"][vol_id]
                result = Versioned(copy.deepcopy(entry["record"]), state["revision"])
            else:
                if record["id"] != vol_id:
                    raise ValueError(f"record id {record['id']} does not match {vol_id}")
                state["volumes"][vol_id] = {"revision": state["revision"], "record": record}
                result = Versioned(copy.deepcopy(record), state["revision"])
            await self._commit(state)
        return result

    async def update_volume(self, vol_id: str, change: Change) -> VolumeRecord:
        """Apply `change` to the record of `vol_id` as one transaction and return the result.

        The lock is held from the read to the write, so `change` runs exactly once here.
        """
        async with self._lock:
            entry = self._state["volumes"].get(vol_id)
            if entry is None:
                raise NotFound(f"volume {vol_id} not found")
            updated = change(copy.deepcopy(entry["record"]))
            state = copy.deepcopy(self._state)
            state["revision"] += 1
            state["volumes"][vol_id] = {"revision": state["revision"], "record": updated}
            await self._commit(state)
        return copy.deepcopy(updated)

    async def put_node(self, node: NodeRecord) -> None:
        """Create or replace the record of the node `node["id"]`."""
        async with self._lock:
            state = copy.deepcopy(self._state)
            state["revision"] += 1
            state["nodes"][node["id"]] = copy.deepcopy(node)
            await self._commit(state)

    async def list_nodes(self) -> list[NodeRecord]:
        """Return the record of every node."""
        return [copy.deepcopy(node) for node in self._state["nodes"].values()]

    async def add_leftovers(self, vol_id: str, node_ids: Sequence[str]) -> None:
        """Record that the replicas of `vol_id` on `node_ids` remain to be deleted."""
        async with self._lock:
            state = copy.deepcopy(self._state)
            leftovers = state.setdefault("leftovers", {})
            for node_id in node_ids:
                volumes = leftovers.setdefault(node_id, [])
                if vol_id not in volumes:
                    volumes.append(vol_id)
            await self._commit(state)

    async def list_leftovers(self, node_id: str) -> list[str]:
        """Return the ids of the volumes whose replica on `node_id` remains to be deleted."""
        return list(self._state.get("leftovers", {}).get(node_id, []))

    async def remove_leftover(self, vol_id: str, node_id: str) -> None:
        """Forget the replica of `vol_id` on `node_id` once it is deleted."""
        async with self._lock:
            if vol_id not in self._state.get("leftovers", {}).get(node_id, []):
                return
            state = copy.deepcopy(self._state)
            volumes = state["leftovers"][node_id]
            volumes.remove(vol_id)
            if not volumes:
                del state["leftovers"][node_id]
            await self._commit(state)

    async def _commit(self, state: dict[str, Any]) -> None:
        # The write runs in a thread because fsync can take tens of milliseconds. It is
        # shielded, so a cancelled caller cannot leave memory and file out of step.
        data = json.dumps(state, indent=1, sort_keys=True).encode() + b"\n"
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(write_file_atomically, self.path, data)
            except OSError as exc:
                log.error("catalog: writing %s failed: %s", self.path, exc)
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise NoSpace(f"no space left to write the catalog {self.path}") from None
                raise Unavailable(f"writing the catalog {self.path} failed: {exc}") from None
        self._state = state


def _check_unique(volumes: dict[str, Any], record: VolumeRecord) -> None:
    # Ids and names share one lookup, so a name may not equal another volume's id either.
    vol_id, name = record["id"], record["name"]
    if vol_id in volumes:
        raise AlreadyExists(f"a volume with id {vol_id} already exists")
    if name in volumes:
        raise AlreadyExists(f"volume name {name!r} is the id of another volume")
    for entry in volumes.values():
        if entry["record"]["name"] == name:
            raise AlreadyExists(f"a volume named {name!r} already exists")
        if entry["record"]["name"] == vol_id:
            raise AlreadyExists(f"volume id {vol_id} is the name of another volume")


def _empty_state() -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "revision": 0, "volumes": {}, "nodes": {}}


def _load(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return _empty_state()
    try:
        state = json.loads(text)
    except ValueError as exc:
        raise Corrupted(f"catalog {path} is not valid JSON: {exc}") from None
    except RecursionError:
        # json.loads recurses once per level of nesting, and no catalog nests this deep.
        raise Corrupted(f"catalog {path} is not valid JSON: nested too deeply") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise Corrupted(f"catalog {path} has an unknown format; expected format {FORMAT_VERSION}")
    for key, kind in (("revision", int), ("volumes", dict), ("nodes", dict)):
        if not isinstance(state.get(key), kind):
            raise Corrupted(f"catalog {path}: {key!r} is missing or of the wrong type")
    for key, entry in state["volumes"].items():
        problem = volume_entry_problem(key, entry)
        if problem:
            raise Corrupted(f"catalog {path}: volume {key!r} {problem}: {entry!r:.200}")
    for key, node in state["nodes"].items():
        if not isinstance(node, dict) or node.get("id") != key:
            raise Corrupted(f"catalog {path}: node {key!r} has no matching id: {node!r:.200}")
    # Catalogs written before leftovers existed have no such key.
    leftovers = state.get("leftovers", {})
    valid = isinstance(leftovers, dict) and all(
        isinstance(volumes, list) and all(isinstance(vol_id, str) for vol_id in volumes)
        for volumes in leftovers.values()
    )
    if not valid:
        raise Corrupted(f"catalog {path}: 'leftovers' is not a map of node ids to volume ids")
    return state


#: The fields of a volume record, with their types. Only id and name are required, because
#: records written by tests and older tools may lack the others.
# TODO: require every field once all writers store complete records; pxd reads them directly.
_RECORD_FIELDS: dict[str, type | tuple[type, ...]] = {
    "id": str,
    "name": str,
    "labels": dict,
    "size": int,
    "ha_level": int,
    "epoch": int,
    "attached_on": str,
    "mount_paths": list,
}


def volume_entry_problem(key: str, entry: Any) -> str | None:
    """Return what is wrong with one entry of the catalog's volumes, or None if nothing is."""
    if not isinstance(entry, dict) or not isinstance(entry.get("revision"), int):
        return "is not a map with a revision and a record"
    record = entry.get("record")
    if not isinstance(record, dict):
        return "has no record"
    for name, kind in _RECORD_FIELDS.items():
        value = record.get(name)
        if value is None and name not in ("id", "name"):
            continue
        if isinstance(value, bool) or not isinstance(value, kind):
            return f"has a missing or invalid {name!r}"
    if record["id"] != key:
        return f"has a record with id {record['id']!r}"
    # A null mount_paths or labels passed the loop above as absent, like any other null field.
    if not all(isinstance(path, str) for path in record.get("mount_paths") or []):
        return "has a mount path that is not a string"
    labels = record.get("labels") or {}
    if not all(isinstance(value, str) for value in labels.values()):
        return "has a label value that is not a string"
    return None
