"""pxd, the node daemon: control and peer RPC servers, volume lifecycle, mount children.

pxd owns the node's replica store (served to mount children and peers on the peer socket, behind
the cluster secret handshake), the catalog, and one mount child process per mounted volume.

Each mount child serves its volume's FUSE filesystem at a private mountpoint, DIR/mnt/<id>, and
pxd bind-mounts that onto every host path where the volume is mounted. So one child serves any
number of paths, and unmounting one path never disturbs the others. When a child dies, pxd
lazily unmounts every path of the volume, raises the epoch and starts a new child, with bounded
retries and backoff.

Every volume operation runs under that volume's lock, so attach, mount, unmount, check, delete
and the restart of a child never interleave on one volume. Catalog changes go through catalog
transactions, which order them against other nodes as well.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import fcntl
import importlib.metadata
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from pxfs import errors
from pxfs.catalog import LocalCatalog, VolumeRecord
from pxfs.config import Config
from pxfs.errors import Busy, InvalidArgument, NotFound, NotSupported, PxfsError, Unavailable
from pxfs.replication import ReplicationClient
from pxfs.rpc import RpcClient, RpcServer, read_secret
from pxfs.stats import LIVE_WINDOW, Counters, StatsStore
from pxfs.store import BLOCK_SIZE, ReplicaStore
from pxfs.units import check_size, validate_labels, validate_name
from pxfs.volume.format import device_blocks
from pxfs.volume.namespace import Volume

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)

LOCK_FILE = "pxd.lock"
NODE_ID_FILE = "node-id"
SECRET_FILE = "cluster.secret"
REPLICAS_DIR = "replicas"
MOUNTS_DIR = "mnt"

#: How long a mount child may take to print "ready", and to exit after SIGTERM.
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
#: How long the kernel may take to write a volume's dirty pages to its child before it stops.
SYNC_TIMEOUT = 30.0
#: A volume check reads all metadata of the volume; large volumes take a while.
CHECK_TIMEOUT = 600.0
#: Restarts of a dying mount child before pxd gives up on the volume, and the backoff.
MAX_RESTARTS = 5
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
#: A child that ran this long before dying counts as healthy: its restart count starts over.
STABLE_AFTER = 60.0
STDERR_TAIL_LINES = 20
MAX_HA_LEVEL = 3
CREATE_FIELDS = {"name", "size", "ha_level", "labels"}
UPDATE_FIELDS = {"size", "ha_level", "labels"}
#: Seconds between two samples of a mount child's I/O counters, and how long one may take.
SAMPLE_INTERVAL = 1.0
SAMPLE_TIMEOUT = 2.0
#: Seconds between two saves of the I/O statistics that changed. A crash of pxd loses the I/O
#: counted since the last save.
SAVE_INTERVAL = 10.0
#: How long a mount child may take to grow its volume online.
GROW_TIMEOUT = 30.0
#: The longest path of a unix socket that Linux accepts (sun_path is 108 bytes with the NUL).
MAX_SOCKET_PATH = 107
LIST_FIELDS = {"name", "labels", "ids"}


def lock_data_dir(data_dir: Path) -> int:
    """Take the exclusive lock on DIR/pxd.lock and write our pid there; return the fd.

    Raises Busy naming the pid of the pxd that holds the lock.
    """
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise Busy(f"data directory {data_dir} is in use by another pxd (pid {holder})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def load_node_id(data_dir: Path) -> str:
    """Return the node id stored in DIR/node-id, creating a random one on first start."""
    path = data_dir / NODE_ID_FILE
    try:
        node_id = path.read_text().strip()
    except FileNotFoundError:
        node_id = ""
    if node_id:
        return node_id
    node_id = str(uuid.uuid4())
    _write_private_file(path, node_id + "\n")
    log.info("created node id %s", node_id)
    return node_id


def ensure_secret(data_dir: Path) -> Path:
    """Create the cluster secret file (mode 0600) unless it exists; return its path."""
    path = data_dir / SECRET_FILE
    if not path.exists():
        _write_private_file(path, secrets.token_hex(32) + "\n")
        log.info("created cluster secret %s", path)
    os.chmod(path, 0o600)
    return path


def _write_private_file(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _version() -> str:
    try:
        return importlib.metadata.version("pxfs")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _now_ns() -> int:
    return time.time_ns()


def _mountinfo() -> dict[str, str]:
    """Return the filesystem type of every mountpoint of this mount namespace."""
    mounts: dict[str, str] = {}
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            separator = fields.index(b"-")
            mounts[_unescape_mount_path(fields[4])] = os.fsdecode(fields[separator + 1])
    return mounts


def _unescape_mount_path(raw: bytes) -> str:
    # The kernel writes space, tab, newline and backslash in paths as three octal digits.
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), raw))


def _is_mounted(path: str) -> bool:
    """True if `path` is a mountpoint, also when it is a FUSE mount whose daemon died."""
    # os.path.ismount stats the path, which fails on a dead FUSE mount.
    return os.path.realpath(path) in _mountinfo() or os.path.ismount(path)


async def _run_tool(*argv: str) -> str | None:
    """Run a mount tool; return None on success, else its error output."""
    try:
        result = await trio.run_process(
            list(argv), capture_stdout=True, capture_stderr=True, check=False
        )
    except FileNotFoundError:
        return f"{argv[0]} is not installed"
    except OSError as exc:
        return f"{argv[0]} could not run: {exc.strerror}"
    if result.returncode == 0:
        return None
    return (result.stderr or result.stdout).decode(errors="replace").strip() or (
        f"exit status {result.returncode}"
    )


async def _lazy_unmount(path: str) -> None:
    """Detach `path` now, even if busy or dead; the kernel finishes when the last user goes."""
    if not _is_mounted(path):
        return
    failure = await _run_tool("fusermount3", "-u", "-z", path)
    if failure is not None and _is_mounted(path):
        failure = await _run_tool("umount", "-l", path)
    if failure is not None and _is_mounted(path):
        log.error("lazy unmount of %s failed: %s", path, failure)


async def _unmount(path: str) -> None:
    """Unmount `path`; raises Busy when a process still uses it."""
    failure = await _run_tool("umount", path)
    if failure is not None and _is_mounted(path):
        raise Busy(f"cannot unmount {path}: {failure}")


def _syncfs(path: str) -> None:
    """Make the kernel write the dirty pages of the filesystem at `path`: syncfs(2)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), path)
    finally:
        os.close(fd)


async def _bind(source: str, target: str) -> None:
    failure = await _run_tool("mount", "--bind", source, target)
    if failure is not None:
        raise Unavailable(f"bind mount of the volume at {target} failed: {failure}")


@dataclass
class MountChild:
    """The mount child process of one volume and the host paths it is bound to."""

    vol_id: str
    mountpoint: str
    #: The unix socket on which the child serves mount.stats and mount.grow.
    control_socket: str
    paths: list[str] = field(default_factory=list)
    #: Failed samples of the I/O counters in a row.
    sample_failures: int = 0
    process: trio.Process | None = None
    epoch: int = 0
    started_at: float = 0.0
    failures: int = 0
    #: Counts the processes started, so a waiting restart notices that another one ran.
    generation: int = 0
    stopping: bool = False
    exited: trio.Event = field(default_factory=trio.Event)
    stderr_closed: trio.Event = field(default_factory=trio.Event)
    stderr_tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=STDERR_TAIL_LINES)
    )

    @property
    def running(self) -> bool:
        """True while a child process serves the volume."""
        return self.process is not None and not self.exited.is_set()

    def last_error(self) -> str:
        """Return the last line that the child wrote to stderr, for error messages."""
        return self.stderr_tail[-1] if self.stderr_tail else "no error output"


class Node:
    """The pxd of one node: start-up, the control methods, mount children, shutdown."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.data_dir = config.data_dir
        self.control_socket = config.control_socket
        self.peer_socket = config.peer_socket_path
        self.node_id = ""
        self.secret = b""
        self.secret_file = self.data_dir / SECRET_FILE
        self.started_ns = 0
        self.catalog: LocalCatalog | None = None
        self.store: ReplicaStore | None = None
        self.stats: StatsStore | None = None
        self._lock_fd: int | None = None
        self._nursery: trio.Nursery | None = None
        self._mounts: dict[str, MountChild] = {}
        self._volume_locks: collections.defaultdict[str, trio.Lock] = collections.defaultdict(
            trio.Lock
        )
        self._create_lock = trio.Lock()
        self._stop = trio.Event()
        self._shutting_down = False
        #: Set once start-up has remounted the volumes; node.status says "starting" until then.
        self._remounted = False

    # Start-up and shutdown

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start pxd, report readiness through `task_status`, serve until stop() is called."""
        self._lock_fd = lock_data_dir(self.data_dir)
        try:
            self._load_identity()
            self._open_state()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._start_servers(nursery)
                nursery.start_soon(self._save_stats_periodically)
                await self._register_node()
                await self._remount_volumes()
                self._remounted = True
                log.info("pxd ready: node %s, control socket %s", self.node_id, self.control_socket)
                task_status.started()
                await self._stop.wait()
                await self._shutdown()
                nursery.cancel_scope.cancel()
        finally:
            await self._close_state()
            os.close(self._lock_fd)
            self._lock_fd = None
        log.info("pxd stopped")

    def stop(self) -> None:
        """Ask run() to unmount every volume and return."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """True once stop() was called."""
        return self._stop.is_set()

    def _load_identity(self) -> None:
        self.node_id = load_node_id(self.data_dir)
        self.secret_file = ensure_secret(self.data_dir)
        self.secret = read_secret(self.secret_file)
        self.started_ns = _now_ns()

    def _open_state(self) -> None:
        self.catalog = LocalCatalog(self.data_dir)
        (self.data_dir / REPLICAS_DIR).mkdir(mode=0o700, exist_ok=True)
        (self.data_dir / MOUNTS_DIR).mkdir(mode=0o700, exist_ok=True)
        self.store = ReplicaStore(self.data_dir / REPLICAS_DIR)
        self.stats = StatsStore(self.data_dir)

    async def _close_state(self) -> None:
        if self.stats is not None:
            await self.stats.save_changed()
        if self.store is not None:
            await self.store.aclose()
        if self.catalog is not None:
            await self.catalog.close()

    async def _start_servers(self, nursery: trio.Nursery) -> None:
        assert self.store is not None
        for path in (self.peer_socket, self.control_socket):
            path.parent.mkdir(parents=True, exist_ok=True)
            await _reject_live_socket(path)
        peer = RpcServer(self.store.handlers(), secret=self.secret, name="peer rpc")
        await nursery.start(_serve_unix, peer, self.peer_socket)
        control = RpcServer(self.handlers(), name="control rpc")
        await nursery.start(_serve_unix, control, self.control_socket)

    async def _register_node(self) -> None:
        await self._catalog().put_node(
            {
                "id": self.node_id,
                "hostname": socket.gethostname(),
                "ip": self.config.node_ip,
                "peer_socket": str(self.peer_socket),
                "started_ns": self.started_ns,
            }
        )

    async def _remount_volumes(self) -> None:
        for record in await self._catalog().list_volumes():
            if record["attached_on"] != self.node_id or record.get("deleting"):
                continue
            async with self._volume_locks[record["id"]]:
                try:
                    await self._reattach(record)
                except PxfsError as exc:
                    log.error("volume %s: remount at start failed: %s", record["id"], exc.message)
                except Exception:
                    log.exception("volume %s: remount at start failed", record["id"])

    async def _reattach(self, record: VolumeRecord) -> None:
        record = await self._catalog().update_volume(record["id"], self._attach_change)
        paths = record["mount_paths"]
        log.info("volume %s: re-attached with epoch %d", record["id"], record["epoch"])
        if not paths:
            return
        usable = []
        for path in paths:
            try:
                await self._clear_stale_mount(path)
                usable.append(path)
            except Busy as exc:
                log.error("volume %s: %s", record["id"], exc.message)
        child = self._new_child(record["id"])
        try:
            await self._spawn(child, record)
        except PxfsError as exc:
            # Handled as a child that died, so the usual restarts with backoff follow.
            log.error("volume %s: mount child failed at start: %s", record["id"], exc.message)
            child.paths[:] = usable
            self._live_nursery().start_soon(self._recover, child)
            return
        await self._bind_paths(child, usable)
        log.info("volume %s: remounted at %s", record["id"], ", ".join(child.paths) or "no path")

    async def _clear_stale_mount(self, path: str) -> None:
        fstype = _mountinfo().get(os.path.realpath(path))
        if fstype is None:
            return
        if not fstype.startswith("fuse"):
            raise Busy(f"{path} has a {fstype} filesystem mounted on it; not remounting there")
        log.warning("lazily unmounting the stale mount at %s", path)
        await _lazy_unmount(path)

    async def _shutdown(self) -> None:
        # Mount paths stay in the catalog, so that the next start mounts them again.
        self._shutting_down = True
        log.info("pxd stopping; mounted volumes: %d", len(self._mounts))
        for child in list(self._mounts.values()):
            async with self._volume_locks[child.vol_id]:
                paths = ", ".join(child.paths) or "no path"
                for path in list(child.paths):
                    await self._unbind(child, path, lazy_if_busy=True)
                await self._stop_child(child)
            log.info("volume %s: unmounted from %s until the next start", child.vol_id, paths)

    # Control methods

    def handlers(self) -> dict[str, Callable[..., Awaitable[Any]]]:
        """Return the control RPC handlers by method name."""
        return {
            "node.status": self.status,
            "volume.create": self.create_volume,
            "volume.list": self.list_volumes,
            "volume.inspect": self.inspect_volume,
            "volume.delete": self.delete_volume,
            "volume.attach": self.attach_volume,
            "volume.detach": self.detach_volume,
            "volume.mount": self.mount_volume,
            "volume.unmount": self.unmount_volume,
            "volume.check": self.check_volume,
            "volume.update": self.update_volume,
            "volume.stats": self.volume_stats,
            "volume.stats_live": self.volume_stats_live,
            "volume.stats_history": self.volume_stats_history,
            "cluster.nodes": self.cluster_nodes,
        }

    async def status(self) -> dict[str, Any]:
        """Return the node's identity, state, volume counts and the space of its data directory.

        The state is "starting" until the volumes of the last run are mounted again, then "up".
        """
        volumes = await self._catalog().list_volumes()
        fs = os.statvfs(self.data_dir)
        used = 0
        for record in volumes:
            used += await self._usage(record["id"])
        return {
            "node_id": self.node_id,
            "hostname": socket.gethostname(),
            "ip": self.config.node_ip,
            "data_dir": str(self.data_dir),
            "version": _version(),
            "status": "up" if self._remounted else "starting",
            "volumes": len(volumes),
            "mounted": sum(1 for child in self._mounts.values() if child.running),
            "capacity_bytes": fs.f_blocks * fs.f_frsize,
            "free_bytes": fs.f_bavail * fs.f_frsize,
            "used_bytes": used,
            "started_ns": self.started_ns,
        }

    async def create_volume(self, spec: Any) -> VolumeRecord:
        """Create and format a volume; the same name, size and ha_level returns the existing one."""
        name, size, ha_level, labels = self._parse_create(spec)
        self._reject_while_stopping()
        async with self._create_lock:
            existing = await self._find_by_name(name)
            if existing is not None:
                return await self._existing_for_create(existing, size, ha_level)
            await self._check_ha_level(ha_level)
            record = await self._make_volume(name, size, ha_level, labels)
        log.info("volume %s: created %r, %d bytes, ha %d", record["id"], name, size, ha_level)
        return await self._public(record)

    def _parse_create(self, spec: Any) -> tuple[str, int, int, dict[str, str]]:
        if not isinstance(spec, dict):
            raise InvalidArgument("volume.create takes a map with name, size, ha_level, labels")
        unknown = set(spec) - CREATE_FIELDS
        if unknown:
            raise InvalidArgument(f"unknown volume.create fields: {', '.join(sorted(unknown))}")
        if "size" not in spec:
            raise InvalidArgument("volume.create needs a size in bytes")
        ha_level = _check_ha_range(spec.get("ha_level", 1))
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

    async def _check_ha_level(self, ha_level: int) -> None:
        nodes = len(await self._catalog().list_nodes())
        if ha_level > nodes:
            raise InvalidArgument(
                f"ha_level {ha_level} needs {ha_level} nodes, but the cluster has {nodes}"
            )

    async def _make_volume(
        self, name: str, size: int, ha_level: int, labels: dict[str, str]
    ) -> VolumeRecord:
        vol_id = await self._new_volume_id()
        fs_uuid = str(uuid.uuid4())
        record: VolumeRecord = {
            "id": vol_id,
            "name": name,
            "labels": labels,
            "size": size,
            "ha_level": ha_level,
            "ctime_ns": _now_ns(),
            "uuid": fs_uuid,
            "replica_nodes": [self.node_id],
            "epoch": 1,
            "attached_on": "",
            "attach_time_ns": 0,
            "detach_time_ns": 0,
            "mount_paths": [],
        }
        nblocks = device_blocks(size)
        await self._store().create(vol_id, nblocks)
        try:
            await self._format(vol_id, nblocks, fs_uuid, size, record["epoch"])
            await self._catalog().create_volume(record)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._delete_replica_after_failure(vol_id)
            raise
        return record

    async def _delete_replica_after_failure(self, vol_id: str) -> None:
        try:
            await self._store().delete(vol_id)
        except PxfsError as exc:
            log.error(
                "volume %s: deleting the replica of a failed create failed: %s", vol_id, exc.message
            )

    async def _new_volume_id(self) -> str:
        while True:
            vol_id = str(secrets.randbits(63))
            if await self._catalog().get_volume(vol_id) is None and vol_id != "0":
                return vol_id

    async def _format(self, vol_id: str, nblocks: int, fs_uuid: str, size: int, epoch: int) -> None:
        client = await RpcClient.connect_unix(self.peer_socket, self.secret)
        try:
            device = ReplicationClient(vol_id, epoch, nblocks, [client])
            await device.open()
            await Volume.format(device, fs_uuid, size)
        finally:
            await client.aclose()

    async def list_volumes(self, filters: Any = None) -> list[VolumeRecord]:
        """Return the records that match every given filter: name, labels (subset), ids."""
        name, labels, ids = _parse_list_filters(filters)
        found = []
        for record in await self._catalog().list_volumes():
            if name is not None and record["name"] != name:
                continue
            if ids is not None and record["id"] not in ids:
                continue
            if any(record["labels"].get(key) != value for key, value in labels.items()):
                continue
            found.append(await self._public(record))
        return found

    async def inspect_volume(self, ref: Any) -> VolumeRecord:
        """Return the record of the volume `ref` (a name or an id)."""
        return await self._public(await self._catalog().find_volume(ref))

    async def delete_volume(self, ref: Any) -> None:
        """Delete a detached volume: its replica, then its record."""
        record = await self._catalog().find_volume(ref)
        vol_id = record["id"]
        async with self._volume_locks[vol_id]:
            # The mark makes attach fail from here on, so the replica can go before the record.
            # A crash in between leaves a marked record, and a new delete finishes the job.
            await self._catalog().update_volume(vol_id, _mark_deleting)
            await self._store().delete(vol_id)
            self._stats().delete(vol_id)
            await self._catalog().delete_volume(vol_id)
        log.info("volume %s: deleted %r", vol_id, record["name"])

    async def attach_volume(self, ref: Any) -> VolumeRecord:
        """Attach the volume to this node, raising its epoch; a no-op if already attached here."""
        record = await self._catalog().find_volume(ref)
        async with self._volume_locks[record["id"]]:
            record = (await self._catalog().require_volume(record["id"])).record
            if record["attached_on"] == self.node_id:
                return await self._public(record)
            updated = await self._catalog().update_volume(record["id"], self._attach_change)
        log.info("volume %s: attached with epoch %d", updated["id"], updated["epoch"])
        return await self._public(updated)

    def _attach_change(self, record: VolumeRecord) -> VolumeRecord:
        if record.get("deleting"):
            raise NotFound(f"volume {record['id']} is being deleted")
        if record["attached_on"] not in ("", self.node_id):
            raise Busy(f"volume {record['name']} is attached on node {record['attached_on']}")
        record["attached_on"] = self.node_id
        record["epoch"] += 1
        record["attach_time_ns"] = _now_ns()
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
        record["detach_time_ns"] = _now_ns()
        return record

    async def mount_volume(self, ref: Any, path: Any) -> VolumeRecord:
        """Mount an attached volume at `path`, an empty directory that is not a mountpoint."""
        self._reject_while_stopping()
        record = await self._catalog().find_volume(ref)
        vol_id = record["id"]
        async with self._volume_locks[vol_id]:
            record = (await self._catalog().require_volume(vol_id)).record
            self._require_attached_here(record)
            path = _normalize_path(path)
            if path in record["mount_paths"]:
                raise Busy(f"volume {record['name']} is already mounted at {path}")
            _check_mount_path(path)
            try:
                child = await self._ensure_running(record)
                await self._bind_path(child, path)
                record = await self._catalog().update_volume(vol_id, _add_path(path))
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self._undo_mount(vol_id, path)
                raise
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
        path = _normalize_path(path)
        async with self._volume_locks[vol_id]:
            record = (await self._catalog().require_volume(vol_id)).record
            if path not in record["mount_paths"]:
                raise NotFound(f"volume {record['name']} is not mounted at {path}")
            child = self._mounts.get(vol_id)
            if child is not None and path in child.paths:
                await self._unbind(child, path, lazy_if_busy=not child.running)
            else:
                await self._clear_stale_mount(path)
            record = await self._catalog().update_volume(vol_id, _remove_path(path))
            if child is not None and not child.paths:
                await self._stop_child(child)
        log.info("volume %s: unmounted from %s", vol_id, path)
        return await self._public(record)

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
        argv = self._child_argv(record["id"], record["epoch"]) + ["--check"]
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

    async def update_volume(self, ref: Any, changes: Any) -> VolumeRecord:
        """Apply `changes` (size, ha_level, labels) to a volume, growing it online if mounted."""
        parsed = _parse_update(changes)
        record = await self._catalog().find_volume(ref)
        vol_id = record["id"]
        async with self._volume_locks[vol_id]:
            record = (await self._catalog().require_volume(vol_id)).record
            await self._check_update(record, parsed)
            if any(record.get(key) != value for key, value in parsed.items()):
                record = await self._catalog().update_volume(vol_id, _apply_update(parsed))
                log.info("volume %s: updated %s", vol_id, ", ".join(sorted(parsed)))
            if "size" in parsed:
                await self._grow_mounted(record)
        return await self._public(record)

    async def _check_update(self, record: VolumeRecord, parsed: dict[str, Any]) -> None:
        """Raise for a change that cannot be applied, before any change is made."""
        if record.get("deleting"):
            raise NotFound(f"volume {record['id']} is being deleted")
        if "size" in parsed:
            _check_not_shrinking(record, parsed["size"])
        ha_level = int(parsed["ha_level"] if "ha_level" in parsed else record["ha_level"])
        if ha_level != record["ha_level"]:
            await self._check_ha_level(ha_level)
            # TODO: adding and removing replicas needs the replica resync of a later version.
            raise NotSupported(
                f"changing ha_level from {record['ha_level']} to {ha_level} is not supported yet"
            )

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

    async def volume_stats(self, ref: Any, cumulative: Any = True) -> dict[str, int]:
        """Return the I/O totals since the volume was created; not `cumulative`: the live ones."""
        if not isinstance(cumulative, bool):
            raise InvalidArgument(f"cumulative must be true or false, not {cumulative!r}")
        if not cumulative:
            return await self.volume_stats_live(ref)
        record = await self._catalog().find_volume(ref)
        stats = self._stats().get(record["id"])
        age_ms = max(0, (_now_ns() - record.get("ctime_ns", 0)) // 1_000_000)
        return await self._stats_report(record, stats.totals, age_ms)

    async def volume_stats_live(self, ref: Any) -> dict[str, int]:
        """Return the I/O of the last 2 seconds through the volume's mount."""
        record = await self._catalog().find_volume(ref)
        if not self._child_running(record["id"]):
            return await self._stats_report(record, Counters(), int(LIVE_WINDOW * 1000))
        counters, interval_ms, _ = self._stats().get(record["id"]).live(trio.current_time())
        return await self._stats_report(record, counters, interval_ms)

    async def _stats_report(
        self, record: VolumeRecord, counters: Counters, interval_ms: int
    ) -> dict[str, int]:
        stats = self._stats().get(record["id"])
        in_flight = stats.in_flight if self._child_running(record["id"]) else 0
        return {
            **counters.to_report(),
            "io_progress": in_flight,
            "bytes_used": await self._usage(record["id"]),
            "interval_ms": interval_ms,
        }

    async def volume_stats_history(self, ref: Any) -> dict[str, list[dict[str, Any]]]:
        """Return the hourly, daily and monthly I/O sums of the volume, oldest first."""
        record = await self._catalog().find_volume(ref)
        history = self._stats().get(record["id"]).history
        history.roll_up(time.time())
        return history.report()

    async def cluster_nodes(self) -> list[dict[str, Any]]:
        """Return every node of the cluster: the node.status keys and whether it is online."""
        nodes = [{**await self.status(), "online": True}]
        for node in await self._catalog().list_nodes():
            if node["id"] != self.node_id:
                nodes.append(_offline_node(node))
        return nodes

    # Mount children

    def _child_running(self, vol_id: str) -> bool:
        child = self._mounts.get(vol_id)
        return child is not None and child.running

    def _new_child(self, vol_id: str) -> MountChild:
        mounts = self.data_dir / MOUNTS_DIR
        child = MountChild(vol_id, str(mounts / vol_id), str(mounts / f"{vol_id}.sock"))
        self._mounts[vol_id] = child
        return child

    def _child_argv(self, vol_id: str, epoch: int) -> list[str]:
        return [
            sys.executable, "-m", "daemon.mount",
            "--peer-socket", str(self.peer_socket),
            "--secret-file", str(self.secret_file),
            "--volume-id", vol_id,
            "--epoch", str(epoch),
        ]  # fmt: skip

    def _child_env(self) -> dict[str, Any]:
        # The child must import daemon.mount from the tree of this pxd, whatever its cwd; the
        # daemon and pxfs packages sit side by side.
        root = str(Path(__file__).resolve().parent.parent)
        path = os.environ.get("PYTHONPATH")
        env = dict(os.environ, PYTHONPATH=root + (os.pathsep + path if path else ""))
        return {"env": env, "cwd": "/"}

    async def _ensure_running(self, record: VolumeRecord) -> MountChild:
        child = self._mounts.get(record["id"])
        if child is not None and child.running:
            return child
        if child is None:
            child = self._new_child(record["id"])
            await self._spawn(child, record)
        else:
            await self._respawn(child)
        return child

    async def _respawn(self, child: MountChild) -> None:
        """Replace a dead child: raise the epoch, start a new one, bind its paths again."""
        paths = list(child.paths)
        await self._detach_dead_paths(child)
        child.paths.clear()
        try:
            record = await self._catalog().update_volume(child.vol_id, self._raise_epoch)
            await self._spawn(child, record)
        except BaseException:
            child.paths[:] = paths
            raise
        await self._bind_paths(child, paths)

    async def _spawn(self, child: MountChild, record: VolumeRecord) -> None:
        """Start the child at its private mountpoint and wait until it prints "ready"."""
        epoch = record["epoch"]
        process = await self._start_process(child, epoch, record["size"])
        assert process.stdout is not None
        try:
            ready = await self._wait_ready(child, process.stdout)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._reap(child, process)
            raise

        if not ready:
            with trio.CancelScope(shield=True):
                status = await self._reap(child, process)
            raise Unavailable(
                f"mount child of volume {child.vol_id} failed to start (exit status {status}): "
                f"{child.last_error()}"
            )
        log.info(
            "volume %s: mount child pid %d ready at epoch %d", child.vol_id, process.pid, epoch
        )
        self._live_nursery().start_soon(self._supervise, child, process)
        self._live_nursery().start_soon(self._sample_periodically, child, process)

    async def _start_process(self, child: MountChild, epoch: int, size: int) -> trio.Process:
        await _lazy_unmount(child.mountpoint)
        if len(os.fsencode(child.control_socket)) > MAX_SOCKET_PATH:
            raise Unavailable(
                f"cannot start the mount child of volume {child.vol_id}: its control socket "
                f"path {child.control_socket} is longer than {MAX_SOCKET_PATH} bytes; use a "
                "data directory with a shorter path"
            )
        argv = self._child_argv(child.vol_id, epoch) + [
            "--mountpoint", child.mountpoint,
            "--size", str(size),
            "--control-socket", child.control_socket,
        ]  # fmt: skip
        try:
            os.makedirs(child.mountpoint, mode=0o700, exist_ok=True)
            process = await trio.lowlevel.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                **self._child_env(),
            )  # fmt: skip
        except OSError as exc:
            raise Unavailable(
                f"cannot start the mount child of volume {child.vol_id}: {exc}"
            ) from None

        child.generation += 1
        child.sample_failures = 0
        child.process, child.epoch, child.stopping = process, epoch, False
        child.exited, child.stderr_closed = trio.Event(), trio.Event()
        child.started_at = trio.current_time()
        assert process.stderr is not None
        self._live_nursery().start_soon(self._forward_stderr, child, process.stderr)
        return process

    async def _wait_ready(self, child: MountChild, stdout: trio.abc.ReceiveStream) -> bool:
        lines = _Lines(stdout)
        with trio.move_on_after(READY_TIMEOUT):
            while (line := await lines.next()) is not None:
                if line.strip() == "ready":
                    self._live_nursery().start_soon(_drain, stdout)
                    return True
                log.info("volume %s: mount child: %s", child.vol_id, line)
            return False
        log.error(
            "volume %s: mount child did not become ready within %g s", child.vol_id, READY_TIMEOUT
        )
        return False

    async def _reap(self, child: MountChild, process: trio.Process) -> int:
        """Kill a child that never became ready and clean up after it; return its status."""
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        status = await process.wait()
        with trio.move_on_after(1):
            await child.stderr_closed.wait()
        await _lazy_unmount(child.mountpoint)
        child.exited.set()
        child.process = None
        return status

    async def _forward_stderr(self, child: MountChild, stream: trio.abc.ReceiveStream) -> None:
        """Copy the child's log to ours, keeping the last lines for error messages."""
        lines = _Lines(stream)
        while (line := await lines.next()) is not None:
            child.stderr_tail.append(line)
            _copy_to_stderr(line)
        child.stderr_closed.set()

    async def _supervise(self, child: MountChild, process: trio.Process) -> None:
        """Wait for the child to exit; start a new one unless pxd stopped it on purpose."""
        status = await process.wait()
        child.exited.set()
        if child.stopping or child.process is not process:
            return
        self._stats().get(child.vol_id).child_stopped()
        log.warning(
            "volume %s: mount child pid %d exited unexpectedly with status %d; remounting %s",
            child.vol_id,
            process.pid,
            status,
            ", ".join(child.paths),
        )
        await self._detach_dead_paths(child)
        if trio.current_time() - child.started_at > STABLE_AFTER:
            child.failures = 0
        await self._recover(child)

    async def _recover(self, child: MountChild) -> None:
        """Restart a dead child with exponential backoff, at most MAX_RESTARTS times in a row."""
        while child.failures < MAX_RESTARTS:
            child.failures += 1
            await trio.sleep(min(FIRST_BACKOFF * 2 ** (child.failures - 1), MAX_BACKOFF))
            generation = child.generation
            async with self._volume_locks[child.vol_id]:
                if self._gone(child) or child.generation != generation or child.running:
                    return
                try:
                    await self._respawn(child)
                except PxfsError as exc:
                    log.error(
                        "volume %s: restart %d of the mount child failed: %s",
                        child.vol_id,
                        child.failures,
                        exc.message,
                    )
                    continue
                except Exception:
                    # A bug here must not take down pxd and every other volume with it.
                    log.exception(
                        "volume %s: restart %d of the mount child failed",
                        child.vol_id,
                        child.failures,
                    )
                    continue
            log.info(
                "volume %s: mount child restarted; mounted again at %s",
                child.vol_id,
                ", ".join(child.paths) or "no path",
            )
            return
        log.error(
            "volume %s: the mount child failed %d times in a row; not restarting it, so "
            "%s stay unmounted until pxd restarts, or until they are unmounted and mounted again",
            child.vol_id,
            MAX_RESTARTS,
            ", ".join(child.paths) or "its paths",
        )

    def _gone(self, child: MountChild) -> bool:
        return child.stopping or self._shutting_down or self._mounts.get(child.vol_id) is not child

    def _raise_epoch(self, record: VolumeRecord) -> VolumeRecord:
        if record["attached_on"] != self.node_id:
            raise Busy(f"volume {record['id']} is no longer attached on this node")
        record["epoch"] += 1
        return record

    async def _detach_dead_paths(self, child: MountChild) -> None:
        for path in child.paths:
            await _lazy_unmount(path)
        await _lazy_unmount(child.mountpoint)

    async def _bind_paths(self, child: MountChild, paths: list[str]) -> None:
        for path in paths:
            try:
                await self._bind_path(child, path)
            except PxfsError as exc:
                log.error(
                    "volume %s: cannot mount at %s again: %s", child.vol_id, path, exc.message
                )

    async def _bind_path(self, child: MountChild, path: str) -> None:
        await _bind(child.mountpoint, path)
        child.paths.append(path)

    async def _unbind(self, child: MountChild, path: str, *, lazy_if_busy: bool) -> None:
        if _is_mounted(path):
            try:
                await _unmount(path)
            except Busy:
                if not lazy_if_busy:
                    raise
                log.warning("volume %s: %s is busy; unmounting it lazily", child.vol_id, path)
                await _lazy_unmount(path)
        with contextlib.suppress(ValueError):
            child.paths.remove(path)

    async def _stop_child(self, child: MountChild) -> None:
        """SIGTERM the child, wait for it to exit and make sure its mountpoint is gone."""
        child.stopping = True
        process = child.process
        if process is not None and child.running:
            await self._sync_kernel_cache(child)
            # The last I/O, the writeback that syncfs caused included, is counted before the
            # child goes.
            await self._sample(child)
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            with trio.move_on_after(STOP_TIMEOUT) as scope:
                await child.exited.wait()
            if scope.cancelled_caught:
                log.error(
                    "volume %s: mount child pid %d did not exit within %g s; killing it",
                    child.vol_id,
                    process.pid,
                    STOP_TIMEOUT,
                )
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                with trio.move_on_after(STOP_TIMEOUT):
                    await child.exited.wait()
                if not child.exited.is_set():
                    log.error(
                        "volume %s: mount child pid %d survived SIGKILL for %g s",
                        child.vol_id,
                        process.pid,
                        STOP_TIMEOUT,
                    )
        if _is_mounted(child.mountpoint):
            log.warning(
                "volume %s: %s is still mounted after its mount child exited",
                child.vol_id,
                child.mountpoint,
            )
            await _lazy_unmount(child.mountpoint)
        child.process = None
        self._stats().get(child.vol_id).child_stopped()
        await self._stats().save(child.vol_id)
        if self._mounts.get(child.vol_id) is child:
            del self._mounts[child.vol_id]

    async def _sync_kernel_cache(self, child: MountChild) -> None:
        """Have the kernel write the volume's dirty pages to the child before it is stopped."""
        # The kernel's writeback cache can hold writes to files that are still open. A child
        # stopped before they reach it loses them, even on a clean shutdown.
        with trio.move_on_after(SYNC_TIMEOUT) as scope:
            try:
                await trio.to_thread.run_sync(_syncfs, child.mountpoint, abandon_on_cancel=True)
            except OSError as exc:
                log.warning(
                    "volume %s: syncfs of %s failed: %s; recent writes may be lost",
                    child.vol_id,
                    child.mountpoint,
                    exc.strerror,
                )
        if scope.cancelled_caught:
            log.warning(
                "volume %s: syncfs of %s did not finish within %g s; recent writes may be lost",
                child.vol_id,
                child.mountpoint,
                SYNC_TIMEOUT,
            )

    # The control channel of mount children

    async def _sample_periodically(self, child: MountChild, process: trio.Process) -> None:
        """Sample the I/O counters of `process` about once a second until it exits."""
        while child.process is process and not child.exited.is_set():
            await self._sample(child)
            await trio.sleep(SAMPLE_INTERVAL)

    async def _sample(self, child: MountChild) -> None:
        """Fold one sample of the child's counters into the volume's statistics."""
        try:
            sample = await self._call_child(child, SAMPLE_TIMEOUT, "mount.stats")
        except PxfsError as exc:
            if child.exited.is_set():
                return
            # The child is starting, stopping or stuck, and the next sample tries again. Only
            # the first failure in a row is a warning, so a stuck child does not flood the log.
            level = logging.DEBUG if child.sample_failures else logging.WARNING
            child.sample_failures += 1
            log.log(level, "volume %s: sampling I/O counters failed: %s", child.vol_id, exc.message)
            return
        child.sample_failures = 0
        try:
            self._stats().get(child.vol_id).apply_sample(sample, time.time(), trio.current_time())
        except ValueError as exc:
            log.warning(
                "volume %s: invalid I/O counters from the mount child: %s", child.vol_id, exc
            )

    async def _call_child(self, child: MountChild, timeout: float, method: str, *args: Any) -> Any:
        """Call `method` on the child's control socket; raises Unavailable after `timeout` s."""
        with trio.move_on_after(timeout):
            try:
                client = await RpcClient.connect_unix(child.control_socket, self.secret)
            except OSError as exc:
                raise Unavailable(
                    f"cannot connect to the mount child of volume {child.vol_id}: {exc}"
                ) from None
            try:
                return await client.call(method, *args)
            finally:
                with trio.CancelScope(shield=True):
                    await client.aclose()
        raise Unavailable(
            f"{method} to the mount child of volume {child.vol_id} timed out after {timeout} s"
        )

    async def _save_stats_periodically(self) -> None:
        while True:
            await trio.sleep(SAVE_INTERVAL)
            await self._stats().save_changed()

    # Helpers

    async def _public(self, record: VolumeRecord) -> VolumeRecord:
        """The record as the control methods return it, with usage and live mount paths."""
        public = dict(record)
        public["usage"] = await self._usage(record["id"])
        child = self._mounts.get(record["id"])
        public["mounted"] = list(child.paths) if child is not None and child.running else []
        return public

    async def _usage(self, vol_id: str) -> int:
        try:
            info = await self._store().info(vol_id)
        except NotFound:
            return 0
        return int(info["used_blocks"]) * BLOCK_SIZE

    def _reject_while_stopping(self) -> None:
        if self._shutting_down or self._stop.is_set():
            raise Unavailable("pxd is shutting down")

    def _catalog(self) -> LocalCatalog:
        assert self.catalog is not None, "pxd is not started"
        return self.catalog

    def _store(self) -> ReplicaStore:
        assert self.store is not None, "pxd is not started"
        return self.store

    def _stats(self) -> StatsStore:
        assert self.stats is not None, "pxd is not started"
        return self.stats

    def _live_nursery(self) -> trio.Nursery:
        assert self._nursery is not None, "pxd is not started"
        return self._nursery


def _mark_deleting(record: VolumeRecord) -> VolumeRecord:
    if record["attached_on"]:
        raise Busy(
            f"volume {record['name']} is attached on node {record['attached_on']}; "
            "detach it before deleting"
        )
    record["deleting"] = True
    return record


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
        parsed["ha_level"] = _check_ha_range(changes["ha_level"])
    if "labels" in changes:
        parsed["labels"] = validate_labels(changes["labels"])
    return parsed


def _check_ha_range(ha_level: Any) -> int:
    if isinstance(ha_level, bool) or not isinstance(ha_level, int):
        raise InvalidArgument(f"ha_level must be an integer 1-3, not {ha_level!r}")
    if not 1 <= ha_level <= MAX_HA_LEVEL:
        raise InvalidArgument(f"invalid ha_level {ha_level}: it must be 1, 2 or 3")
    return ha_level


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


def _offline_node(node: dict[str, Any]) -> dict[str, Any]:
    """Return the node.status keys of a node that this pxd has only a catalog record of."""
    # NOTE: nodes do not report their status to each other yet, so every other node of a
    # shared catalog is shown as offline. The single-node catalog contains only this node.
    return {
        "node_id": node["id"],
        "hostname": node.get("hostname", ""),
        "ip": node.get("ip", ""),
        "data_dir": "",
        "version": "",
        "status": "unknown",
        "volumes": 0,
        "mounted": 0,
        "capacity_bytes": 0,
        "free_bytes": 0,
        "used_bytes": 0,
        "started_ns": node.get("started_ns", 0),
        "online": False,
    }


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


def _normalize_path(path: Any) -> str:
    if not isinstance(path, str) or not path:
        raise InvalidArgument(f"mount path must be a non-empty string, not {path!r}")
    if "\0" in path:
        raise InvalidArgument(f"mount path {path!r} contains a NUL byte")
    if not os.path.isabs(path):
        raise InvalidArgument(f"mount path {path!r} is not absolute")
    return os.path.normpath(path)


def _check_mount_path(path: str) -> None:
    """Raise unless `path` is an existing empty directory that is not a mountpoint."""
    if _is_mounted(path):
        raise Busy(f"mount path {path} is already a mountpoint")
    if not os.path.exists(path):
        raise NotFound(f"mount path {path} does not exist")
    if not os.path.isdir(path):
        raise errors.NotADirectory(f"mount path {path} is not a directory")
    try:
        with os.scandir(path) as entries:
            if next(entries, None) is not None:
                raise errors.NotEmpty(f"mount path {path} is not empty")
    except OSError as exc:
        raise InvalidArgument(f"mount path {path} cannot be read: {exc.strerror}") from None


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


class _Lines:
    """Lines of text from a byte stream, without their newlines."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""
        self._eof = False

    async def next(self) -> str | None:
        """Return the next line, or None at the end of the stream."""
        while b"\n" not in self._buffer and not self._eof:
            data = await self._stream.receive_some(65536)
            self._eof = not data
            self._buffer += data
        if not self._buffer:
            return None
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode(errors="replace")


def _copy_to_stderr(line: str) -> None:
    """Write one line of a child's log to pxd's stderr, dropping it if stderr is unusable."""
    # The reader of pxd's stderr can go away first (`run-node | tee log`, then Ctrl-C). A
    # BrokenPipeError here must not stop pxd in the middle of unmounting its volumes.
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    async for _ in stream:
        pass


async def _reject_live_socket(path: Path) -> None:
    """Raise Busy if a server accepts connections on `path`; a stale socket file passes."""
    if not path.exists():
        return
    try:
        stream = await trio.open_unix_socket(str(path))
    except OSError:
        return
    await stream.aclose()
    raise Busy(f"socket {path} is in use by another server")


async def _serve_unix(
    server: RpcServer,
    path: Path,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    await server.serve_unix(path, mode=0o600, task_status=task_status)
