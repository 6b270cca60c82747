"""The reference counts of the Docker plugin: which containers use each volume.

RefStore keeps them in docker-refs.json in the sidecar's state directory, because pxd's catalog
has no field for them. Every change rewrites the file atomically.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
from pathlib import Path
from typing import Any

from pxfs import errors
from pxfs.datadir import write_file_atomically

log = logging.getLogger(__name__)

_REFS_VERSION = 1


class RefStore:
    """The containers that use each volume, keyed by volume id, kept in a JSON file.

    The file is {"version": 1, "volumes": {ID: {"name": NAME, "containers": [ID, ...]}}} and is
    replaced by write-fsync-rename, so a crash leaves either the old or the new counts.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._volumes: dict[str, dict[str, Any]] = {}
        self._write_lock = asyncio.Lock()

    @classmethod
    def load(cls, path: Path) -> RefStore:
        """Read the counts from `path`; a missing file means no volume is in use.

        Raises InvalidArgument for a file that cannot be read as counts: starting from zero
        would unmount volumes under running containers.
        """
        store = cls(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return store
        except OSError as exc:
            raise errors.InvalidArgument(f"cannot read {path}: {exc.strerror}") from None
        store._volumes = _decode_refs(path, text)
        return store

    def containers(self, vol_id: str) -> list[str]:
        """Return the IDs of the containers that use volume `vol_id`."""
        entry = self._volumes.get(vol_id)
        return list(entry["containers"]) if entry else []

    async def add(self, vol_id: str, name: str, container: str) -> None:
        """Record that `container` uses the volume; a repeated ID counts once."""
        entry = self._volumes.setdefault(vol_id, {"name": name, "containers": []})
        if container in entry["containers"]:
            return
        entry["containers"].append(container)
        try:
            await self._save()
        except errors.PxfsError:
            entry["containers"].remove(container)
            self._drop_empty(vol_id)
            raise

    async def remove(self, vol_id: str, container: str) -> int | None:
        """Forget that `container` uses the volume; return how many are left, None if unknown."""
        entry = self._volumes.get(vol_id)
        if entry is None or container not in entry["containers"]:
            return None
        entry["containers"].remove(container)
        left = len(entry["containers"])
        self._drop_empty(vol_id)
        await self._save()
        return left

    async def forget(self, vol_id: str) -> None:
        """Drop every count of volume `vol_id`, once the volume is deleted."""
        if self._volumes.pop(vol_id, None) is not None:
            await self._save()

    def volume_ids(self, name: str | None = None) -> set[str]:
        """Return the ids of the volumes with counts, only those named `name` when given."""
        return {
            vol_id
            for vol_id, entry in self._volumes.items()
            if name is None or entry["name"] == name
        }

    async def drop_deleted(self, vol_ids: set[str]) -> None:
        """Drop the counts of volumes that no longer exist, so that none stays stuck.

        The caller collects `vol_ids` before it asks pxd which volumes exist, so a volume
        created and mounted meanwhile is never among them.
        """
        dropped = [vol_id for vol_id in sorted(vol_ids) if vol_id in self._volumes]
        if not dropped:
            return
        for vol_id in dropped:
            entry = self._volumes.pop(vol_id)
            log.info(
                "dropping the Docker counts of deleted volume %s (%s): containers %s",
                entry["name"], vol_id, ", ".join(c[:12] for c in entry["containers"]),
            )  # fmt: skip
        await self._save()

    def _drop_empty(self, vol_id: str) -> None:
        entry = self._volumes.get(vol_id)
        if entry is not None and not entry["containers"]:
            del self._volumes[vol_id]

    async def _save(self) -> None:
        async with self._write_lock:
            data = json.dumps({"version": _REFS_VERSION, "volumes": self._volumes}, indent=1)
            try:
                await asyncio.to_thread(_write_refs, self.path, data.encode())
            except OSError as exc:
                log.error("cannot save the Docker reference counts to %s: %s", self.path, exc)
                message = f"cannot save the reference counts to {self.path}: {exc.strerror}"
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise errors.NoSpace(message) from None
                raise errors.InternalError(message) from None


def _decode_refs(path: Path, text: str) -> dict[str, dict[str, Any]]:
    problem = f"{path} does not contain Docker reference counts; fix or remove it"
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise errors.InvalidArgument(problem) from None
    if not isinstance(data, dict) or data.get("version") != _REFS_VERSION:
        raise errors.InvalidArgument(problem)
    volumes = data.get("volumes")
    if not isinstance(volumes, dict):
        raise errors.InvalidArgument(problem)
    for entry in volumes.values():
        containers = entry.get("containers") if isinstance(entry, dict) else None
        valid = isinstance(containers, list) and all(isinstance(c, str) for c in containers)
        if not valid or not isinstance(entry.get("name"), str):
            raise errors.InvalidArgument(problem)
    return {vol_id: entry for vol_id, entry in volumes.items() if entry["containers"]}


def _write_refs(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_file_atomically(path, data, temporary=path.with_name(f".{path.name}.tmp"))
