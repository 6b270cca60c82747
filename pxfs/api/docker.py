"""Docker's volume plugin protocol, served by pxd-sidecar on a unix socket (driver name pxd).

dockerd finds the plugin through legacy discovery: a socket /run/docker/plugins/pxd.sock. Every
call is a POST with a JSON body, and every reply is HTTP 200: a failure carries its message in
`Err`, which dockerd shows as `VolumeDriver.<Method>: <message>`.

A volume that a container uses is attached on this node and mounted at MOUNT_BASE/<name>. Mount
and Unmount carry the ID of the container, and the plugin counts the containers per volume: the
first Mount attaches and mounts, the last Unmount unmounts and detaches. pxd's catalog has no
field for these counts, so the sidecar keeps them in a small file in its state directory,
replaced atomically at each change, and they survive a crash or restart of the sidecar.

pxfs.api.dockeropts parses the options of Create, and pxfs.api.dockerrefs keeps the counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import stat
import weakref
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from pxfs import errors, units
from pxfs.api import osd, osdrequests
from pxfs.api.control import ControlClient
from pxfs.api.dockeropts import parse_create, volume_name
from pxfs.api.dockerrefs import RefStore
from pxfs.api.server import oversized_body

log = logging.getLogger(__name__)

DRIVER_NAME = "pxd"
DEFAULT_MOUNT_BASE = Path("/var/lib/osd/mounts")
DEFAULT_STATE_DIR = Path("/var/lib/pxfs/sidecar")
REFS_FILE = "docker-refs.json"
#: The media type of Docker's plugin protocol; dockerd sends it in Accept.
CONTENT_TYPE = "application/vnd.docker.plugins.v1.2+json"


# --- the driver ---------------------------------------------------------------------------------


class DockerPlugin:
    """The volume driver: each method serves one endpoint with control calls to pxd."""

    def __init__(self, control: ControlClient, mount_base: Path, refs: RefStore) -> None:
        self.control = control
        # pxd records mount paths with their symbolic links resolved, so the base is too.
        self.mount_base = Path(os.path.realpath(mount_base))
        self.refs = refs
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def mountpoint(self, name: str) -> Path:
        """Return the host path where volume `name` is mounted for containers."""
        units.validate_name(name)
        path = self.mount_base / name
        # validate_name already rules out "/", "." and "..", so this only guards that rule.
        if os.path.dirname(os.path.normpath(path)) != str(self.mount_base):
            raise errors.InvalidArgument(f"invalid volume name {name!r}: not a path component")
        return path

    async def create(self, docker_name: Any, opts: Any) -> None:
        """Create the volume; an existing one of that name is fine unless size or repl differ.

        Labels of the request that an existing volume lacks are added to it, as Docker users
        expect a repeated `docker volume create` to succeed with the options it was given.
        """
        spec = parse_create(docker_name, opts)
        if spec.nodes is not None:
            nodes = await self.control.call("cluster.nodes")
            spec.nodes = osd.node_ids_from_ips(nodes, spec.nodes)
        record = await self._find(spec.name)
        if record is not None and not spec.explicit:
            log.info("volume %s exists; Create without size or repl uses it", spec.name)
        else:
            # pxd returns the existing volume when name, size and replica count match.
            existed = record is not None
            record = await self.control.call("volume.create", spec.to_rpc())
            if not existed:
                log.info("created volume %s (%s) for Docker", spec.name, record["id"])
                return
        await self._add_labels(record, spec.labels)

    async def _add_labels(self, record: Mapping[str, Any], labels: Mapping[str, str]) -> None:
        current = dict(record.get("labels") or {})
        changed = sorted(key for key, value in labels.items() if current.get(key) != value)
        if not changed:
            return
        # NOTE: volume.update replaces the whole label map, so a label that another client sets
        # between the lookup and this call is lost.
        await self.control.call("volume.update", record["id"], {"labels": {**current, **labels}})
        log.info("volume %s exists; Create set its labels %s", record["name"], ", ".join(changed))

    async def remove(self, docker_name: Any) -> None:
        """Delete the volume; rejected while a container uses it."""
        name = volume_name(docker_name)
        async with self._lock(name):
            record = await self._require(name)
            users = self.refs.containers(record["id"])
            if users:
                raise errors.Busy(f"volume {name} is in use by {len(users)} container(s)")
            await self._release(record)
            await self.control.call("volume.delete", record["id"])
            await self.refs.forget(record["id"])
        log.info("deleted volume %s for Docker", name)

    async def mount(self, docker_name: Any, container: Any) -> str:
        """Attach and mount the volume for `container` if needed; return the mountpoint."""
        name = volume_name(docker_name)
        container = _container_id(container)
        path = self.mountpoint(name)
        async with self._lock(name):
            record = await self._find_pruned(name)
            if record is None:
                raise errors.NotFound(f"volume {name} not found")
            await self._ensure_mounted(record, path)
            try:
                await self.refs.add(record["id"], name, container)
            except errors.PxfsError:
                # A mount that no count records would never be released by an Unmount.
                if not self.refs.containers(record["id"]):
                    await _shielded(self._release(await self._require(name)))
                raise
        log.info("volume %s mounted at %s for container %s", name, path, container[:12])
        return str(path)

    async def unmount(self, docker_name: Any, container: Any) -> None:
        """Release the volume for `container`; the last container unmounts and detaches it."""
        name = volume_name(docker_name)
        container = _container_id(container)
        async with self._lock(name):
            record = await self._find_pruned(name)
            if record is None:
                log.info("Unmount of %s: no such volume, nothing to release", name)
                return
            left = await self.refs.remove(record["id"], container)
            if (
                left is None
                and self._mounted_path(record)
                and not self.refs.containers(record["id"])
            ):
                # No container is counted, yet the volume is mounted here: an earlier last
                # Unmount failed after dropping its count. This one releases it.
                log.info(
                    "Unmount of %s by container %s releases its leftover mount",
                    name,
                    container[:12],
                )
                await self._release(record)
            elif left is None:
                log.info("Unmount of %s: container %s was not using it", name, container[:12])
            elif left == 0:
                await self._release(record)
            else:
                log.info("volume %s stays mounted for %d container(s)", name, left)

    async def path(self, docker_name: Any) -> str:
        """Return the mountpoint of the volume; fails when it is not mounted."""
        name = volume_name(docker_name)
        record = await self._require(name)
        mountpoint = self._mounted_path(record)
        if not mountpoint:
            raise errors.InvalidArgument(f"volume {name} is not mounted")
        return mountpoint

    async def get(self, docker_name: Any) -> dict[str, Any]:
        """Return the Volume object of the Get reply."""
        name = volume_name(docker_name)
        record = await self._find_pruned(name)
        if record is None:
            raise errors.NotFound(f"volume {name} not found")
        volume: dict[str, Any] = {
            "Name": docker_name,
            "CreatedAt": _rfc3339(record.get("ctime_ns", 0)),
            "Status": self._status(record),
        }
        mountpoint = self._mounted_path(record)
        if mountpoint:
            volume["Mountpoint"] = mountpoint
        return volume

    async def list(self) -> list[dict[str, Any]]:
        """Return the Volumes of the List reply: every volume of pxd."""
        volumes = []
        counted = self.refs.volume_ids()
        records = await self.control.call("volume.list", {})
        await self.refs.drop_deleted(counted - {str(record["id"]) for record in records})
        for record in records:
            volume = {"Name": record["name"]}
            mountpoint = self._mounted_path(record)
            if mountpoint:
                volume["Mountpoint"] = mountpoint
            volumes.append(volume)
        return volumes

    def _lock(self, name: str) -> asyncio.Lock:
        # One Mount, Unmount or Remove at a time per volume. A waiter holds a strong reference,
        # so the lock lives as long as someone uses it.
        lock = self._locks.get(name)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[name] = lock
        return lock

    async def _find(self, name: str) -> dict[str, Any] | None:
        # volume.list matches the name exactly; volume.inspect would also take a volume id.
        records = await self.control.call("volume.list", {"name": name})
        return dict(records[0]) if records else None

    async def _find_pruned(self, name: str) -> dict[str, Any] | None:
        """Find volume `name` and drop the counts of deleted volumes that had this name.

        Volumes are never renamed, so a counted id under this name that is not the current
        volume's belongs to a volume that was deleted or deleted and created again.
        """
        counted = self.refs.volume_ids(name)
        record = await self._find(name)
        current = {str(record["id"])} if record is not None else set()
        await self.refs.drop_deleted(counted - current)
        return record

    async def _require(self, name: str) -> dict[str, Any]:
        record = await self._find(name)
        if record is None:
            raise errors.NotFound(f"volume {name} not found")
        return record

    def _mounted_path(self, record: Mapping[str, Any]) -> str:
        path = str(self.mount_base / record["name"])
        return path if path in (record.get("mount_paths") or []) else ""

    def _status(self, record: Mapping[str, Any]) -> dict[str, Any]:
        if self._mounted_path(record):
            state = "mounted"
        else:
            state = "attached" if record.get("attached_on") else "detached"
        status = {
            "id": str(record["id"]),
            "size": int(record["size"]),
            "ha_level": int(record["ha_level"]),
            "state": state,
            "containers": len(self.refs.containers(str(record["id"]))),
        }
        if record.get("attached_on"):
            status["attached_on"] = record["attached_on"]
        if record.get("labels"):
            status["labels"] = dict(record["labels"])
        return status

    async def _ensure_mounted(self, record: dict[str, Any], path: Path) -> None:
        """Attach the volume on this node and mount it at `path`, undoing the attach on failure."""
        if str(path) in (record.get("mount_paths") or []):
            return
        was_attached = bool(record.get("attached_on"))
        await self.control.call("volume.attach", record["id"])
        try:
            await asyncio.to_thread(_prepare_mountpoint, self.mount_base, path)
            await self.control.call("volume.mount", record["id"], str(path))
        except BaseException:
            with contextlib.suppress(OSError):
                os.rmdir(path)
            if not was_attached:
                await _shielded(self._detach_quietly(record))
            raise

    async def _release(self, record: Mapping[str, Any]) -> None:
        """Unmount the volume from its Docker mountpoint and detach it unless mounted elsewhere."""
        path = str(self.mountpoint(record["name"]))
        mount_paths = list(record.get("mount_paths") or [])
        if path in mount_paths:
            with contextlib.suppress(errors.NotFound):
                await self.control.call("volume.unmount", record["id"], path)
            mount_paths.remove(path)
            log.info("volume %s unmounted from %s", record["name"], path)
        with contextlib.suppress(OSError):
            os.rmdir(path)
        if mount_paths:
            log.info("volume %s stays attached: it is mounted at %s", record["name"], mount_paths)
            return
        if record.get("attached_on"):
            await self._detach_quietly(record)

    async def _detach_quietly(self, record: Mapping[str, Any]) -> None:
        """Detach the volume; a volume that another user keeps busy stays attached."""
        try:
            await self.control.call("volume.detach", record["id"])
        except (errors.Busy, errors.NotFound) as exc:
            log.info("volume %s stays attached: %s", record["name"], exc.message)


def _container_id(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise errors.InvalidArgument(
            "the request has no ID of the container; Docker 1.12 and later send one"
        )
    return value


def _prepare_mountpoint(base: Path, path: Path) -> None:
    """Create the base directory (0700) and the empty directory that the volume mounts on."""
    if not base.is_dir():
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        path.mkdir(mode=0o700)
        return
    if not stat.S_ISDIR(mode):
        raise errors.NotADirectory(f"mountpoint {path} exists and is not a directory")


async def _shielded(call: Awaitable[None]) -> None:
    """Run `call` to completion even when the request that started it is cancelled."""
    task = asyncio.ensure_future(call)
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.shield(task)
    if not task.done():
        await asyncio.wait([task])


def _rfc3339(ns: int) -> str:
    moment = datetime.datetime.fromtimestamp(ns / 1e9, tz=datetime.UTC)
    return moment.isoformat().replace("+00:00", "Z")


# --- the HTTP endpoints -------------------------------------------------------------------------

PLUGIN: web.AppKey[DockerPlugin] = web.AppKey("docker_plugin", DockerPlugin)

Endpoint = Callable[[DockerPlugin, dict[str, Any]], Awaitable[dict[str, Any]]]
_ENDPOINTS: dict[str, Endpoint] = {}


def _endpoint(path: str) -> Callable[[Endpoint], Endpoint]:
    def register(function: Endpoint) -> Endpoint:
        _ENDPOINTS[path] = function
        return function

    return register


@_endpoint("/Plugin.Activate")
async def _activate(plugin: DockerPlugin, body: dict[str, Any]) -> dict[str, Any]:
    return {"Implements": ["VolumeDriver"]}


@_endpoint("/VolumeDriver.Capabilities")
async def _capabilities(plugin: DockerPlugin, body: dict[str, Any]) -> dict[str, Any]:
    # Every node reaches every volume through pxd, so a volume exists once per cluster.
    return {"Capabilities": {"Scope": "global"}}


@_endpoint("/VolumeDriver.Create")
async def _create(plugin: DockerPlugin, body: dict[str, Any]) -> dict[str, Any]:
    await plugin.create(_field(body, "Name"), _field(body, "Opts"))
    return {"Err": ""}


@_endpoint("/VolumeDriver.Remove")
async def _remove(plugin: DockerPlugin, body: dict[str, Any]) -> dict[str, Any]:
    await plugin.remove(_field(body, "Name"))
    return {"Err": ""}


@_endpoint("/VolumeDriver.Mount")
async def _mount(plugin: DockerPlugin, body: dict[str, Any]) -> dict[str, Any]:
    mountpoint = await plugin.mount(_field(body, "Name"), _field(body, "ID"))
    return {"Mountpoint": mountpoint, "Err": ""}


@_endpoint("/VolumeDriver.Unmount")
async def _unmount(plugin: DockerPlugin, body: dict[str, Any]) -> dict[str, Any]:
    await plugin.unmount(_field(body, "Name"), _field(body, "ID"))
    return {"Err": ""}


@_endpoint("/VolumeDriver.Path")
async def _path(plugin: DockerPlugin, body: dict[str, Any]) -> dict[str, Any]:
    return {"Mountpoint": await plugin.path(_field(body, "Name")), "Err": ""}


@_endpoint("/VolumeDriver.Get")
async def _get(plugin: DockerPlugin, body: dict[str, Any]) -> dict[str, Any]:
    return {"Volume": await plugin.get(_field(body, "Name")), "Err": ""}


@_endpoint("/VolumeDriver.List")
async def _list(plugin: DockerPlugin, body: dict[str, Any]) -> dict[str, Any]:
    return {"Volumes": await plugin.list(), "Err": ""}


def _field(body: Mapping[str, Any], key: str) -> Any:
    """Find `key` the way Go's encoding/json does: exact first, then case-insensitively."""
    if key in body:
        return body[key]
    lowered = key.lower()
    return next((value for name, value in body.items() if name.lower() == lowered), None)


def add_routes(app: web.Application) -> None:
    """Register every endpoint of the plugin protocol on `app`."""
    for path in _ENDPOINTS:
        app.router.add_post(path, _handle)


async def _handle(request: web.Request) -> web.Response:
    """Serve one endpoint; every failure becomes an HTTP 200 reply with its message in Err."""
    endpoint = _ENDPOINTS[request.path]
    method = request.path.lstrip("/")
    too_large = oversized_body(request)
    if too_large is not None:
        # Rejected from the header, because the client may never send the body it announced.
        log.info("%s failed: %s", method, too_large)
        response = web.json_response({"Err": too_large}, content_type=CONTENT_TYPE)
        response.force_close()
        return response
    try:
        body = await _read_body(request)
        reply = await endpoint(request.app[PLUGIN], body)
    except errors.PxfsError as exc:
        log.log(_failure_level(exc), "%s failed: %s", method, exc.message)
        reply = {"Err": exc.message}
    except Exception:
        log.exception("%s failed", method)
        reply = {"Err": "internal error; the pxd-sidecar log has the details"}
    log.debug("%s -> %s", method, reply)
    return web.json_response(reply, content_type=CONTENT_TYPE)


def _failure_level(exc: errors.PxfsError) -> int:
    # dockerd calls Get for a name before it creates the volume, so a missing volume is routine.
    if isinstance(exc, errors.NotFound):
        return logging.DEBUG
    return logging.WARNING if exc.http_status >= 500 else logging.INFO


async def _read_body(request: web.Request) -> dict[str, Any]:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise errors.InvalidArgument(f"request body is too large: {exc.text}") from None
    except ConnectionResetError:
        # The client hung up before the end of the body; a client fault, not a server one.
        raise errors.InvalidArgument(
            "request body is incomplete: the client closed the connection"
        ) from None
    return osdrequests.decode_body(raw, allow_empty=True)
