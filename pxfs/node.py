"""pxd, the node daemon: control and peer RPC servers, volume lifecycle, mount children.

pxd owns the node's replica store (served to mount children and peers on the peer socket, behind
the cluster secret handshake), the catalog, and one mount child process per mounted volume.

The parts of the Node class live in their own modules: pxfs/nodebase.py (shared state),
pxfs/sampling.py (I/O statistics), pxfs/children.py (mount children and bind mounts) and
pxfs/volumes.py (the volume methods). This module holds start-up, shutdown and the node and
cluster methods.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from pxfs.catalog import LocalCatalog, VolumeRecord
from pxfs.datadir import MOUNTS_DIR, REPLICAS_DIR, ensure_secret, load_node_id, lock_data_dir
from pxfs.errors import Busy, PxfsError
from pxfs.nodebase import now_ns, version
from pxfs.rpc import RpcServer, read_secret
from pxfs.stats import StatsStore
from pxfs.store import ReplicaStore
from pxfs.volumes import VolumeControl

log = logging.getLogger(__name__)


class Node(VolumeControl):
    """The pxd of one node: start-up, the control methods, mount children, shutdown."""

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

    def _load_identity(self) -> None:
        self.node_id = load_node_id(self.data_dir)
        self.secret_file = ensure_secret(self.data_dir)
        self.secret = read_secret(self.secret_file)
        self.started_ns = now_ns()

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
            "version": version(),
            "status": "up" if self._remounted else "starting",
            "volumes": len(volumes),
            "mounted": sum(1 for child in self._mounts.values() if child.running),
            "capacity_bytes": fs.f_blocks * fs.f_frsize,
            "free_bytes": fs.f_bavail * fs.f_frsize,
            "used_bytes": used,
            "started_ns": self.started_ns,
        }

    async def cluster_nodes(self) -> list[dict[str, Any]]:
        """Return every node of the cluster: the node.status keys and whether it is online."""
        nodes = [{**await self.status(), "online": True}]
        for node in await self._catalog().list_nodes():
            if node["id"] != self.node_id:
                nodes.append(_offline_node(node))
        return nodes


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
