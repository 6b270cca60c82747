"""pxd, the node daemon: control and peer RPC servers, volume lifecycle, mount children.

pxd owns the node's replica store (served to mount children and peers on the peer socket, behind
the cluster secret handshake), the catalog, and one mount child process per mounted volume.
With etcd endpoints the catalog is the cluster's EtcdCatalog: pxd then also serves the peer RPC
on TCP to the other nodes and publishes its status in its node record every few seconds.

The parts of the Node class live in their own modules: pxfs/nodebase.py (shared state),
pxfs/sampling.py (I/O statistics), pxfs/children.py (mount children and bind mounts),
pxfs/volumes.py (the volume methods), pxfs/replicaset.py (write-set reports and changes of the
ha level), pxfs/detached.py (the resync of detached volumes) and
pxfs/leftovers.py (the replicas that a delete left on offline nodes).
This module contains start-up, shutdown and the node and cluster methods.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from pxfs.catalog import Catalog, LocalCatalog, VolumeRecord
from pxfs.children import ATTACHMENT_CHECK_INTERVAL
from pxfs.datadir import MOUNTS_DIR, REPLICAS_DIR, ensure_secret, load_node_id, lock_data_dir
from pxfs.errors import Busy, NoSpace, PxfsError, Unavailable
from pxfs.etcd import EtcdClient
from pxfs.etcdcatalog import EtcdCatalog
from pxfs.leftovers import LeftoverReplicas
from pxfs.membership import STATUS_INTERVAL, Peers, check_secret_fingerprint, fence_margin
from pxfs.nodebase import MountChild, now_ns
from pxfs.rpc import read_secret
from pxfs.rpcserver import RpcServer
from pxfs.stats import StatsStore
from pxfs.store import ReplicaStore
from pxfs.tls import PeerTls, TlsFiles

log = logging.getLogger(__name__)

#: Seconds between two attempts to mount the volumes fenced here again once the lease is back.
REMOUNT_RETRY_INTERVAL = 3.0


class Node(LeftoverReplicas):
    """The pxd of one node: start-up, the control methods, mount children, shutdown."""

    # Start-up and shutdown

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start pxd, report readiness through `task_status`, serve until stop() is called."""
        self._lock_fd = lock_data_dir(self.data_dir)
        try:
            self._load_identity()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._open_state(nursery)
                await self._start_servers(nursery)
                nursery.start_soon(self._save_stats_periodically)
                nursery.start_soon(self.scrubber.run_periodically)
                await self._register_node()
                await self._remount_volumes()
                self._remounted = True
                if self._etcd is not None:
                    await self._register_node()
                    nursery.start_soon(self._publish_status_periodically)
                    nursery.start_soon(self._check_attachments_periodically)
                    nursery.start_soon(self._guard_lease)
                    nursery.start_soon(self._resync_detached_periodically)
                    nursery.start_soon(self._delete_leftovers_periodically)
                log.info("pxd ready: node %s, control socket %s", self.node_id, self.control_socket)
                task_status.started()
                await self._stop.wait()
                await self._shutdown()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._close_state()
            os.close(self._lock_fd)
            self._lock_fd = None
        log.info("pxd stopped")

    def _load_identity(self) -> None:
        self.node_id = load_node_id(self.data_dir)
        if self.given_secret_file is None:
            self.secret_file = ensure_secret(self.data_dir)
        self.secret = read_secret(self.secret_file)
        files = TlsFiles.from_config(self.config)
        self._tls = PeerTls.load(files) if files is not None else None
        self.started_ns = now_ns()

    async def _open_state(self, nursery: trio.Nursery) -> None:
        self.catalog = await self._open_catalog(nursery)
        tls = self._tls.client if self._tls is not None else None
        self._peers = Peers(
            self.catalog, self.node_id, self.secret, self.peer_socket, ssl_context=tls
        )
        (self.data_dir / REPLICAS_DIR).mkdir(mode=0o700, exist_ok=True)
        (self.data_dir / MOUNTS_DIR).mkdir(mode=0o700, exist_ok=True)
        # In a cluster, a resync's target pulls blocks straight from the source's node.
        peers = self._peers if self._etcd is not None else None
        self.store = ReplicaStore(self.data_dir / REPLICAS_DIR, peers=peers)
        self.stats = StatsStore(self.data_dir)

    async def _open_catalog(self, nursery: trio.Nursery) -> Catalog:
        """Open the LocalCatalog, or with etcd endpoints the cluster's EtcdCatalog."""
        if not self.config.etcd_endpoints:
            return LocalCatalog(self.data_dir)
        cluster_id = self.config.cluster_id
        self._etcd = EtcdClient(self.config.etcd_endpoints)
        catalog = EtcdCatalog(self._etcd, cluster_id, nursery=nursery)
        self._leased = catalog
        await check_secret_fingerprint(
            self._etcd, catalog.prefix, cluster_id, self.secret, self.secret_file
        )
        log.info(
            "catalog: cluster %s in etcd at %s", cluster_id, ", ".join(self.config.etcd_endpoints)
        )
        return catalog

    async def _close_state(self) -> None:
        if self.stats is not None:
            await self.stats.save_changed()
        if self.store is not None:
            await self.store.aclose()
        if self.catalog is not None:
            await self.catalog.close()
        if self._etcd is not None:
            await self._etcd.aclose()

    async def _start_servers(self, nursery: trio.Nursery) -> None:
        assert self.store is not None
        for path in (self.peer_socket, self.control_socket):
            path.parent.mkdir(parents=True, exist_ok=True)
            await _reject_live_socket(path)
        peer_handlers = {
            **self.store.handlers(),
            "volume.report_write_set": self.report_write_set,
        }
        peer = RpcServer(peer_handlers, secret=self.secret, name="peer rpc")
        await nursery.start(_serve_unix, peer, self.peer_socket)
        if self._etcd is not None:
            host, port = self.config.peer_address
            tls = self._tls.server if self._tls is not None else None
            try:
                await nursery.start(functools.partial(peer.serve_tcp, host, port, ssl_context=tls))
            except OSError as exc:
                raise Unavailable(
                    f"cannot serve the peer RPC on {host}:{port}: {exc.strerror}"
                ) from None
        control = RpcServer(
            self.handlers(),
            name="control rpc",
            max_connections=self.config.control_max_connections,
        )
        await nursery.start(
            functools.partial(
                control.serve_unix,
                self.control_socket,
                mode=self.config.socket_mode,
                group=self.config.socket_gid(),
            )
        )

    async def _register_node(self) -> None:
        """Write this node's record, with its status, to the catalog."""
        host, port = self.config.peer_address
        status = await self.status()
        await self._catalog().put_node(
            {
                **status,
                "id": self.node_id,
                "peer_address": f"{host}:{port}" if self._etcd is not None else "",
                "peer_socket": str(self.peer_socket),
                "published_ns": now_ns(),
            }
        )

    async def _publish_status_periodically(self) -> None:
        """Refresh this node's record, so the other nodes see its current status and space."""
        failures = 0
        while True:
            await trio.sleep(STATUS_INTERVAL)
            try:
                await self._register_node()
            except PxfsError as exc:
                failures += 1
                # Only the first failure in a row is a warning, so an etcd outage does not flood
                # the log. The lease task of the catalog logs the outage as well.
                level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(level, "publishing the node status failed: %s", exc.message)
                continue
            if failures:
                log.info("publishing the node status works again after %d failures", failures)
            failures = 0

    async def _check_attachments_periodically(self) -> None:
        """Stop the mount children of volumes that another node took over meanwhile."""
        while True:
            await trio.sleep(ATTACHMENT_CHECK_INTERVAL)
            try:
                await self._fence_lost_volumes()
            except PxfsError as exc:
                # etcd is out of reach; the lease task and the status publication log that.
                log.debug("checking the attachments of the mounted volumes failed: %s", exc)
            except Exception:
                # A bug here must not take down pxd and every volume it serves.
                log.exception("checking the attachments of the mounted volumes failed")

    async def _guard_lease(self) -> None:
        """Fence the volumes that could move while the etcd lease may lapse; remount them after.

        The lease may lapse at `lease_expiry`; the fence comes a margin before, so this node has
        stopped serving those volumes before etcd lets another node attach them.
        """
        catalog = self._leased
        assert catalog is not None
        margin = fence_margin(catalog.node_ttl)
        cut_off_at: float | None = None
        while True:
            if self._cut_off():
                if cut_off_at is None:
                    cut_off_at = trio.current_time()
                    left = max(0.0, catalog.lease_expiry - cut_off_at)
                    log.warning(
                        "etcd lease not refreshed in time, it may lapse in %.1f s: this node is "
                        "cut off and stops the volumes that another node could take over",
                        left,
                    )
                await self._guarded(self._fence_self, "fencing the volumes")
                await catalog.wait_lease_change()
                continue
            if cut_off_at is not None:
                log.info(
                    "etcd lease held again after %.1f s; volumes to mount again: %d",
                    trio.current_time() - cut_off_at,
                    len(self._self_fenced),
                )
                cut_off_at = None
            if self._self_fenced:
                await self._guarded(self._remount_self_fenced, "mounting the fenced volumes")
            retry = REMOUNT_RETRY_INTERVAL if self._self_fenced else math.inf
            with trio.move_on_after(retry):
                await trio.sleep_until(catalog.lease_expiry - margin)

    async def _guarded(self, step: Callable[[], Awaitable[None]], what: str) -> None:
        try:
            await step()
        except Exception:
            # A bug here must not take down pxd and every volume it serves.
            log.exception("%s failed", what)

    async def _remount_self_fenced(self) -> None:
        """Mount the volumes fenced here again that the catalog still has attached here."""
        for vol_id in list(self._self_fenced):
            if self._cut_off():
                return
            async with self._volume_locks[vol_id]:
                try:
                    await self._remount_fenced_volume(vol_id)
                except Unavailable as exc:
                    # etcd went out of reach again; the next round tries once more.
                    log.warning("volume %s: mounting it again failed: %s", vol_id, exc.message)
                    return
                except PxfsError as exc:
                    log.error("volume %s: mounting it again failed: %s", vol_id, exc.message)
                    self._self_fenced.pop(vol_id, None)

    async def _remount_fenced_volume(self, vol_id: str) -> None:
        fenced = self._self_fenced[vol_id]
        if fenced.child.process is not None:
            # The old child still exits. Gone late, it could unmount its successor's mountpoint,
            # which is the same path; the next round tries again.
            return
        found = await self._catalog().get_volume(vol_id)
        record = found.record if found is not None else None
        if record is None or record.get("deleting"):
            log.info("volume %s: deleted while this node was cut off; not mounting it", vol_id)
        elif record["attached_on"] != self.node_id:
            log.warning(
                "volume %s: attached on node %s now, so it stays unmounted here from %s",
                vol_id,
                record["attached_on"] or "none",
                ", ".join(fenced.paths) or "no path",
            )
        elif self._child_running(vol_id):
            log.info("volume %s: mounted again meanwhile", vol_id)
        else:
            log.info(
                "volume %s: still attached here after the cut; attaching and mounting it again",
                vol_id,
            )
            await self._reattach(record)
            self._resume_raise(record)
        del self._self_fenced[vol_id]

    async def _remount_volumes(self) -> None:
        records = await self._catalog().list_volumes()
        here = {record["id"] for record in records if record["attached_on"] == self.node_id}
        await self._clear_orphan_mounts(here)
        # The shallowest paths go first: a volume mounted inside another one's mount needs that
        # mount in place first, and replacing the outer mount later would take the inner one
        # with it. NOTE: the order is by each volume's shallowest path and then its deepest, so
        # a volume with a shallower path elsewhere still comes before the volume that one of
        # its paths is in.
        records.sort(key=lambda record: _depths(record["mount_paths"]))
        for record in records:
            if record["attached_on"] != self.node_id or record.get("deleting"):
                continue
            async with self._volume_locks[record["id"]]:
                try:
                    await self._reattach(record)
                except PxfsError as exc:
                    log.error("volume %s: remount at start failed: %s", record["id"], exc.message)
                except Exception:
                    log.exception("volume %s: remount at start failed", record["id"])
            # A raise of the ha level that the stop of the last run interrupted goes on, through
            # the new mount child, or here when the remount failed.
            self._resume_raise(record)

    async def _reattach(self, record: VolumeRecord) -> None:
        record = await self._catalog().update_volume(record["id"], self._attach_change)
        paths = record["mount_paths"]
        log.info("volume %s: re-attached with epoch %d", record["id"], record["epoch"])
        if not paths:
            return
        usable: list[str] = []
        stale: list[str] = []
        for path in paths:
            try:
                if self._stale_mount_at(path):
                    stale.append(path)
                usable.append(path)
            except Busy as exc:
                log.error("volume %s: %s", record["id"], exc.message)
        child = self._new_child(record["id"])
        try:
            await self._spawn(child, record)
        except PxfsError as exc:
            # Handled as a child that died, so the usual restarts with backoff follow.
            log.error("volume %s: mount child failed at start: %s", record["id"], exc.message)
            for path in stale:
                await self._clear_stale_mount(path)
            child.paths[:] = usable
            self._live_nursery().start_soon(self._recover, child)
            return
        # The mount of the last run stays at its paths until the new bind is beneath it, so a
        # path never shows the directory under it on the way.
        await self._bind_paths(child, usable, over_stale=stale)
        log.info("volume %s: remounted at %s", record["id"], ", ".join(child.paths) or "no path")

    async def _shutdown(self) -> None:
        # Mount paths stay in the catalog, so that the next start mounts them again.
        self._shutting_down = True
        log.info("pxd stopping; mounted volumes: %d", len(self._mounts))
        # The deepest paths go first: a volume mounted inside another one's mount must be
        # unmounted before the mount that contains its path.
        children = sorted(self._mounts.values(), key=lambda child: -_deepest(child.paths))
        # A stopped child would block the stat of the paths inside its volume.
        for child in children:
            self._continue_if_stopped(child)
        for child in children:
            async with self._volume_locks[child.vol_id]:
                paths = ", ".join(child.paths) or "no path"
                await self._report_unwritten(child)
                for path in sorted(child.paths, key=lambda path: -_deepest([path])):
                    await self._unbind(child, path, lazy_if_busy=True)
                await self._stop_child(child)
            log.info("volume %s: unmounted from %s until the next start", child.vol_id, paths)

    async def _report_unwritten(self, child: MountChild) -> None:
        """Log an error for a child that stops holding writes it cannot store."""
        # NOTE: pxd cannot keep such a volume mounted once it stops, so those writes are lost.
        # An unmount keeps the volume mounted instead (VolumeControl.unmount_volume).
        if not child.running:
            return
        try:
            await self._write_back(child)
        except (NoSpace, Unavailable) as exc:
            reason = "do not fit" if isinstance(exc, NoSpace) else "cannot reach its replicas"
            log.error(
                "volume %s: stopping with writes that %s, so the changes since the last fsync "
                "of its files are lost: %s",
                child.vol_id, reason, exc.message,
            )  # fmt: skip

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
            "volume.verify": self.verify_volume,
            "volume.scrub": self.scrub_volume,
            "volume.update": self.update_volume,
            "volume.stats": self.volume_stats,
            "volume.stats_live": self.volume_stats_live,
            "volume.stats_history": self.volume_stats_history,
            "cluster.nodes": self.cluster_nodes,
        }

    async def cluster_nodes(self) -> list[dict[str, Any]]:
        """Return every node of the cluster: the node.status keys and whether it is online."""
        nodes = [{**await self.status(), "online": True}]
        for node in await self._catalog().list_nodes():
            if node["id"] != self.node_id:
                nodes.append(_published_node(node))
        return nodes


def _published_node(node: dict[str, Any]) -> dict[str, Any]:
    """Return the node.status keys that another node last published, and `online`."""
    # A record without a key (written by an older pxd, or a LocalCatalog of several nodes)
    # shows the key's zero value.
    return {
        "node_id": node["id"],
        "hostname": node.get("hostname", ""),
        "ip": node.get("ip", ""),
        "data_dir": node.get("data_dir", ""),
        "version": node.get("version", ""),
        "status": node.get("status", "unknown"),
        "volumes": node.get("volumes", 0),
        "mounted": node.get("mounted", 0),
        "capacity_bytes": node.get("capacity_bytes", 0),
        "free_bytes": node.get("free_bytes", 0),
        "used_bytes": node.get("used_bytes", 0),
        "started_ns": node.get("started_ns", 0),
        "online": bool(node.get("online", False)),
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


def _depths(paths: list[str]) -> tuple[int, int]:
    """Return the number of components of the shortest and of the longest of `paths`."""
    return min((len(Path(path).parts) for path in paths), default=0), _deepest(paths)


def _deepest(paths: list[str]) -> int:
    """Return the number of components of the longest of `paths`, 0 without any."""
    return max((len(Path(path).parts) for path in paths), default=0)
