"""The state that every part of pxd's Node shares, and the accessors that the parts use.

Node is built from layers, each a class that extends the one before:
`NodeBase` (this module), `StatsSampling` (pxfs/sampling.py), `ChildSupervisor`
(pxfs/children.py), `VolumeControl` (pxfs/volumes.py) and `Node` (pxfs/node.py).
"""

from __future__ import annotations

import collections
import importlib.metadata
import logging
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from pxfs.catalog import Catalog, VolumeRecord
from pxfs.config import Config
from pxfs.datadir import SECRET_FILE
from pxfs.errors import NotFound, PxfsError, Unavailable
from pxfs.etcd import EtcdClient
from pxfs.etcdcatalog import EtcdCatalog
from pxfs.membership import Peers, fence_margin
from pxfs.rpc import RpcClient
from pxfs.stats import StatsStore
from pxfs.store import BLOCK_SIZE, RECORD_SIZE, ReplicaStore

log = logging.getLogger(__name__)

STDERR_TAIL_LINES = 20
#: Seconds that inspect and list wait for a mount child's runtime state.
RUNTIME_STATE_TIMEOUT = 2.0
#: Runtime state keys whose value lists replica indexes, "[0 2]", and those whose value pairs
#: each index with a count, "[{0 12} {2 3}]".
INDEX_LIST_KEYS = ("ReadSet", "WriteSet", "ReplicaSetCurr", "ReplicaSetNext")
INDEX_PAIR_KEYS = ("ResyncBlocks", "FullResyncBlocks", "ResyncProgress")


def version() -> str:
    """Return the installed version of pxfs, or "unknown" when run from a source tree."""
    try:
        return importlib.metadata.version("pxfs")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def child_replica_order(replica_nodes: list[str], node_id: str) -> list[str]:
    """Return the replica nodes in the order a mount child on `node_id` gets them.

    The first replica is read first, so this node's own replica leads when it has one.
    """
    return sorted(replica_nodes, key=lambda replica: replica != node_id)


def renumber_runtime_state(
    state: dict[str, str], child_order: list[str], replica_nodes: list[str]
) -> dict[str, str]:
    """Map the replica indexes of a child's runtime state from `child_order` to `replica_nodes`.

    Returns `state` unchanged when the two lists name different nodes.
    """
    # NOTE: this assumes the child still has the replicas in the order it was started with. A
    # child whose replica set changed while mounted may list them otherwise.
    if sorted(child_order) != sorted(replica_nodes):
        return state
    new_index = {old: replica_nodes.index(node) for old, node in enumerate(child_order)}
    renumbered = dict(state)
    for key in INDEX_LIST_KEYS:
        if key in state:
            indexes = [new_index.get(int(n), int(n)) for n in re.findall(r"\d+", state[key])]
            renumbered[key] = "[" + " ".join(str(index) for index in indexes) + "]"
    for key in INDEX_PAIR_KEYS:
        if key in state:
            renumbered[key] = re.sub(
                r"\{(\d+) ",
                lambda match: f"{{{new_index.get(int(match[1]), int(match[1]))} ",
                state[key],
            )
    return renumbered


def replica_set(record: VolumeRecord) -> list[str]:
    """Return the nodes of a volume's replicas, those that a raise of its ha level adds too."""
    nodes = list(record["replica_nodes"]) + list(record.get("replica_nodes_next") or [])
    return list(dict.fromkeys(nodes))


def now_ns() -> int:
    """Return the wall-clock time in nanoseconds, as the records store it."""
    return time.time_ns()


class ChildUnreachable(Unavailable):
    """An Unavailable for a mount child that cannot be reached: no connection, or no reply in time.

    It travels over RPC as Unavailable. Within pxd it separates a child that did not reply from
    one that replied with Unavailable.
    """


@dataclass
class MountChild:
    """The mount child process of one volume and the host paths it is bound to."""

    vol_id: str
    mountpoint: str
    #: The unix socket on which the child serves mount.stats and mount.grow.
    control_socket: str
    paths: list[str] = field(default_factory=list)
    #: Consecutive failed samples of the I/O counters.
    sample_failures: int = 0
    process: trio.Process | None = None
    epoch: int = 0
    #: The replica nodes of the volume as pxd last read them, with those a raise adds.
    replica_nodes: list[str] = field(default_factory=list)
    started_at: float = 0.0
    failures: int = 0
    #: Number of processes started, so a waiting restart notices that another one ran.
    generation: int = 0
    stopping: bool = False
    #: The exit status of the last process, once it exited.
    exit_status: int | None = None
    #: The device of a dead child's mount while its binds wait for the next child's.
    dead_device: str | None = None
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


@dataclass
class FencedVolume:
    """A volume whose mount child this node stopped while its etcd lease could lapse."""

    #: The stopped child; its volume is mounted again only once it has gone.
    child: MountChild
    paths: list[str]


class NodeBase:
    """The configuration, identity and open state of one pxd."""

    def __init__(self, config: Config, *, secret_file: Path | None = None) -> None:
        self.config = config
        self.data_dir = config.data_dir
        self.control_socket = config.control_socket
        self.peer_socket = config.peer_socket_path
        self.node_id = ""
        self.secret = b""
        #: The cluster secret file given by the operator. None means DIR/cluster.secret,
        #: created if missing.
        self.given_secret_file = secret_file
        self.secret_file = secret_file or self.data_dir / SECRET_FILE
        self.started_ns = 0
        self.catalog: Catalog | None = None
        self.store: ReplicaStore | None = None
        self.stats: StatsStore | None = None
        #: The etcd client of an EtcdCatalog, or None with the LocalCatalog.
        self._etcd: EtcdClient | None = None
        #: The EtcdCatalog whose lease keeps this node online, or None with the LocalCatalog.
        self._leased: EtcdCatalog | None = None
        #: The volumes that this node fenced itself from while its lease could lapse, by
        #: volume id, until it mounts them again or learns that they moved.
        self._self_fenced: dict[str, FencedVolume] = {}
        #: The volume records of the last status, for a status while etcd is out of reach.
        self._status_volumes: list[VolumeRecord] | None = None
        self._peers: Peers | None = None
        self._lock_fd: int | None = None
        self._nursery: trio.Nursery | None = None
        self._mounts: dict[str, MountChild] = {}
        self._volume_locks: collections.defaultdict[str, trio.Lock] = collections.defaultdict(
            trio.Lock
        )
        self._create_lock = trio.Lock()
        self._stop = trio.Event()
        self._shutting_down = False
        #: True once start-up has remounted the volumes. Until then node.status reports
        #: "starting".
        self._remounted = False

    def stop(self) -> None:
        """Ask run() to unmount every volume and return."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """True once stop() was called."""
        return self._stop.is_set()

    async def status(self) -> dict[str, Any]:
        """Return the node's identity, state, volume counts and the space of its data directory.

        The state is "starting" until the volumes of the last run are mounted again, then "up",
        or "cut off" while the node's etcd lease may lapse because etcd is out of reach.
        """
        volumes = await self._volumes_for_status()
        fs = os.statvfs(self.data_dir)
        used = 0
        for record in volumes:
            used += await self._footprint(record["id"])
        return {
            "node_id": self.node_id,
            "hostname": socket.gethostname(),
            "ip": self.config.node_ip,
            "data_dir": str(self.data_dir),
            "version": version(),
            "status": self._state(),
            "volumes": len(volumes),
            "mounted": sum(1 for child in self._mounts.values() if child.running),
            "capacity_bytes": fs.f_blocks * fs.f_frsize,
            "free_bytes": fs.f_bavail * fs.f_frsize,
            "used_bytes": used,
            "started_ns": self.started_ns,
        }

    def _cut_off(self) -> bool:
        """True while this node's etcd lease may expire within the fence margin, or has."""
        catalog = self._leased
        if catalog is None:
            return False
        margin = fence_margin(catalog.node_ttl)
        return trio.current_time() >= catalog.lease_expiry - margin

    # Helpers

    def _state(self) -> str:
        if not self._remounted:
            return "starting"
        return "cut off" if self._cut_off() else "up"

    async def _volumes_for_status(self) -> list[VolumeRecord]:
        """List the volumes; the last list while etcd is out of reach, so status still answers."""
        if self._status_volumes is not None and self._cut_off():
            return self._status_volumes
        try:
            volumes = await self._catalog().list_volumes()
        except Unavailable:
            if self._status_volumes is None:
                raise
            return self._status_volumes
        self._status_volumes = volumes
        return volumes

    def _child_running(self, vol_id: str) -> bool:
        child = self._mounts.get(vol_id)
        return child is not None and child.running

    async def _public(self, record: VolumeRecord) -> VolumeRecord:
        """Return `record` as the control methods send it, with usage and live mount paths."""
        public = dict(record)
        public["usage"] = await self._usage(record["id"])
        child = self._mounts.get(record["id"])
        if child is None or not child.running:
            public["mounted"] = []
            public["runtime_state"] = {}
            return public
        public["mounted"] = list(child.paths)
        public["runtime_state"] = await self._runtime_state(child, record)
        return public

    async def _runtime_state(self, child: MountChild, record: VolumeRecord) -> dict[str, str]:
        """Return the replication runtime state of a running child, empty when the call fails.

        The replica indexes refer to the record's `replica_nodes`, the order a user sees.
        """
        try:
            state = await self._call_child(child, RUNTIME_STATE_TIMEOUT, "mount.runtime_state")
        except PxfsError as exc:
            log.debug("volume %s: no runtime state from the mount child: %s", child.vol_id, exc)
            return {}
        state = {str(key): str(value) for key, value in state.items()}
        replica_nodes = list(record["replica_nodes"])
        order = child_replica_order(replica_nodes, self.node_id)
        return renumber_runtime_state(state, order, replica_nodes)

    async def _call_child(self, child: MountChild, timeout: float, method: str, *args: Any) -> Any:
        """Call `method` on the child's control socket.

        Raises ChildUnreachable when the connection or its handshake fails, or when the call
        takes over `timeout` s.
        """
        with trio.move_on_after(timeout):
            try:
                client = await RpcClient.connect_unix(child.control_socket, self.secret)
            except (OSError, PxfsError) as exc:
                reason = exc.message if isinstance(exc, PxfsError) else str(exc)
                raise ChildUnreachable(
                    f"cannot connect to the mount child of volume {child.vol_id}: {reason}"
                ) from None
            try:
                return await client.call(method, *args)
            finally:
                with trio.CancelScope(shield=True):
                    await client.aclose()
        raise ChildUnreachable(
            f"{method} to the mount child of volume {child.vol_id} timed out after {timeout} s"
        )

    async def _offline_holder(self, record: VolumeRecord) -> str:
        """Return the node that `record` is attached on when that node is offline, else "".

        A node is offline once its catalog lease expired, after a stop or a crash. A node that
        the catalog does not list counts as online, so an attachment is never taken on a guess.
        """
        holder = record["attached_on"]
        if holder in ("", self.node_id):
            return ""
        for node in await self._catalog().list_nodes():
            if node["id"] == holder and not node.get("online", True):
                return str(holder)
        return ""

    async def _usage(self, vol_id: str) -> int:
        info = await self._replica_info(vol_id)
        return int(info["used_blocks"]) * BLOCK_SIZE if info else 0

    async def _footprint(self, vol_id: str) -> int:
        """Return the bytes that the replica of `vol_id` takes here: its data and block table."""
        info = await self._replica_info(vol_id)
        if info is None:
            return 0
        # The table is allocated whole at create, 16 bytes per block of the volume.
        return int(info["used_blocks"]) * BLOCK_SIZE + int(info["nblocks"]) * RECORD_SIZE

    async def _replica_info(self, vol_id: str) -> dict[str, int] | None:
        """Return `store.info` of the replica of `vol_id` here, or None when there is none."""
        try:
            return await self._store().info(vol_id)
        except NotFound:
            return None

    def _reject_while_stopping(self) -> None:
        if self._shutting_down or self._stop.is_set():
            raise Unavailable("pxd is shutting down")

    def _catalog(self) -> Catalog:
        assert self.catalog is not None, "pxd is not started"
        return self.catalog

    def _store(self) -> ReplicaStore:
        assert self.store is not None, "pxd is not started"
        return self.store

    def _stats(self) -> StatsStore:
        assert self.stats is not None, "pxd is not started"
        return self.stats

    @property
    def peers(self) -> Peers:
        """The peer RPC clients of the cluster's replica stores."""
        assert self._peers is not None, "pxd is not started"
        return self._peers

    def _live_nursery(self) -> trio.Nursery:
        assert self._nursery is not None, "pxd is not started"
        return self._nursery
