"""Fixtures of the sidecar tests: a fake pxd on a unix socket and the REST app in front of it.

FakePxd keeps volume records in memory and serves the control RPC methods with the real
RpcServer of pxfs.rpcserver. The server runs in a trio event loop on a thread of its own, so the
sidecar and pxctl under test speak the real frame protocol. It follows the semantics that
docs/internals.md fixes for each method but stores no data. The end-to-end tests run the real
pxd.

aiohttp's pytest plugin runs on pytest-asyncio, which, like pytest-trio, only takes the async
tests that carry its marker, so each test module here sets `pytestmark = pytest.mark.asyncio`.
"""

from __future__ import annotations

import inspect
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import trio
from aiohttp.test_utils import TestClient
from sidecarproc import SidecarProcess, short_socket_path

from pxfs import errors, units
from pxfs.api.app import make_app
from pxfs.api.control import ControlClient
from pxfs.rpcserver import RpcServer

NODE_ID = "node-a1"
STATS_KEYS = (
    "reads", "read_ms", "read_bytes", "writes", "write_ms", "write_bytes",
    "io_progress", "io_ms", "bytes_used", "interval_ms",
)  # fmt: skip
LIVE_WINDOW_MS = 2000


class FakePxd:
    """An in-memory stand-in for pxd's control RPC; `calls` records every call in order."""

    def __init__(self, node_id: str = NODE_ID) -> None:
        self.node_id = node_id
        self.volumes: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.problems: dict[str, list[str]] = {}
        #: The unix socket that FakePxdServer serves this fake on.
        self.socket = Path()
        #: When set, the next call raises this instead of running.
        self.fail_next: Exception | None = None
        #: Per method name: the next call of that method raises this instead of running.
        self.fail_method: dict[str, Exception] = {}
        #: Per volume id: the cumulative counters, the live window and the history that the
        #: stats methods return. Tests set them, and a missing one is zero or empty.
        self.totals: dict[str, dict[str, int]] = {}
        self.live: dict[str, dict[str, int]] = {}
        self.history: dict[str, dict[str, list[dict[str, Any]]]] = {}
        #: Extra nodes that cluster.nodes lists after this one.
        self.other_nodes: list[dict[str, Any]] = []
        #: While this event is not set, every call waits for it after being recorded.
        self.hold: threading.Event | None = None

    def handlers(self) -> dict[str, Callable[..., Any]]:
        """Return the RpcServer handler table."""
        methods: dict[str, Callable[..., Any]] = {
            "node.status": self.node_status,
            "volume.create": self.create,
            "volume.list": self.list_volumes,
            "volume.inspect": self.inspect,
            "volume.delete": self.delete,
            "volume.attach": self.attach,
            "volume.detach": self.detach,
            "volume.mount": self.mount,
            "volume.unmount": self.unmount,
            "volume.check": self.check,
            "volume.update": self.update,
            "volume.stats": self.stats,
            "volume.stats_live": self.stats_live,
            "volume.stats_history": self.stats_history,
            "cluster.nodes": self.cluster_nodes,
        }
        return {name: self._recorded(name, method) for name, method in methods.items()}

    def _recorded(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        async def handler(*args: Any) -> Any:
            self.calls.append((name, args))
            while self.hold is not None and not self.hold.is_set():
                await trio.sleep(0.01)
            if self.fail_next is not None:
                failure, self.fail_next = self.fail_next, None
                raise failure
            if name in self.fail_method:
                raise self.fail_method.pop(name)
            return method(*args)

        # RpcServer checks the arguments against the signature of the handler.
        handler.__signature__ = inspect.signature(method)  # type: ignore[attr-defined]
        return handler

    def find(self, ref: str) -> dict[str, Any]:
        """Return the record whose id or name is `ref`; raises NotFound."""
        if ref in self.volumes:
            return self.volumes[ref]
        for record in self.volumes.values():
            if record["name"] == ref:
                return record
        raise errors.NotFound(f"volume {ref} not found")

    def node_status(self) -> dict[str, Any]:
        """Serve node.status."""
        mounted = sum(1 for record in self.volumes.values() if record["mounted"])
        return {
            "node_id": self.node_id,
            "hostname": "fakehost",
            "ip": "127.0.0.1",
            "data_dir": "/var/lib/pxfs",
            "version": "0.1.0",
            "status": "up",
            "volumes": len(self.volumes),
            "mounted": mounted,
            "capacity_bytes": 100 << 30,
            "free_bytes": 60 << 30,
            "used_bytes": 40 << 30,
            "started_ns": 1_700_000_000_000_000_000,
        }

    def create(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Serve volume.create, idempotent by name, size and HA level; `nodes` pins replicas."""
        for record in self.volumes.values():
            if record["name"] != spec["name"]:
                continue
            if record["size"] == spec["size"] and record["ha_level"] == spec["ha_level"]:
                return record
            raise errors.AlreadyExists(f"volume {spec['name']} exists with another size or HA")
        replica_nodes = self._replica_nodes(spec)
        volume_id = str(secrets.randbits(63))
        record = {
            "id": volume_id,
            "name": spec["name"],
            "labels": dict(spec.get("labels") or {}),
            "size": spec["size"],
            "ha_level": spec["ha_level"],
            "ctime_ns": time.time_ns(),
            "uuid": "c0ffee00-0000-4000-8000-000000000001",
            "replica_nodes": replica_nodes,
            "write_set": list(replica_nodes),
            "out_of_sync": [],
            "runtime_state": {},
            "epoch": 0,
            "attached_on": "",
            "attach_time_ns": 0,
            "detach_time_ns": 0,
            "mount_paths": [],
            "usage": 0,
            "mounted": [],
        }
        self.volumes[volume_id] = record
        return record

    def _replica_nodes(self, spec: dict[str, Any]) -> list[str]:
        """Check the `nodes` of volume.create as pxd does, or pick ha_level nodes without them.

        Unlike pxd, the fake places more replicas than the cluster has nodes, on made-up peer
        ids, so that tests of HA 2 and 3 need no extra nodes.
        """
        requested = spec.get("nodes")
        if requested is None:
            peers = [f"{self.node_id}-peer{number}" for number in range(1, spec["ha_level"])]
            return [self.node_id, *peers]
        online = {node["node_id"] for node in self.cluster_nodes() if node.get("online")}
        if len(requested) != spec["ha_level"] or len(set(requested)) != len(requested):
            raise errors.InvalidArgument(
                f"ha_level {spec['ha_level']} needs {spec['ha_level']} distinct replica nodes, "
                f"but {requested} are given"
            )
        for node_id in requested:
            if node_id not in online:
                raise errors.InvalidArgument(
                    f"replica node {node_id} is not an online node of the cluster"
                )
        return list(requested)

    def list_volumes(self, filters: dict[str, Any]) -> list[dict[str, Any]]:
        """Serve volume.list with the name, labels and ids filters."""
        found = []
        for record in self.volumes.values():
            if "name" in filters and record["name"] != filters["name"]:
                continue
            if "ids" in filters and record["id"] not in filters["ids"]:
                continue
            wanted = filters.get("labels") or {}
            if any(record["labels"].get(key) != value for key, value in wanted.items()):
                continue
            found.append(record)
        return found

    def inspect(self, ref: str) -> dict[str, Any]:
        """Serve volume.inspect."""
        return self.find(ref)

    def delete(self, ref: str) -> None:
        """Serve volume.delete; Busy while attached."""
        record = self.find(ref)
        if record["attached_on"]:
            raise errors.Busy(f"volume {record['name']} is attached on {record['attached_on']}")
        del self.volumes[record["id"]]

    def attach(self, ref: str) -> dict[str, Any]:
        """Serve volume.attach; attaching again is a no-op."""
        record = self.find(ref)
        if not record["attached_on"]:
            record["attached_on"] = self.node_id
            record["epoch"] += 1
            record["attach_time_ns"] = time.time_ns()
        return record

    def detach(self, ref: str) -> dict[str, Any]:
        """Serve volume.detach; Busy while mounted."""
        record = self.find(ref)
        if record["mount_paths"]:
            raise errors.Busy(f"volume {record['name']} is mounted at {record['mount_paths'][0]}")
        if record["attached_on"]:
            record["attached_on"] = ""
            record["detach_time_ns"] = time.time_ns()
        return record

    def mount(self, ref: str, path: str) -> dict[str, Any]:
        """Serve volume.mount: the volume must be attached, `path` an empty directory."""
        record = self.find(ref)
        if not record["attached_on"]:
            raise errors.InvalidArgument(f"volume {record['name']} is not attached")
        if not os.path.isdir(path):
            raise errors.NotADirectory(f"{path} is not a directory")
        if os.listdir(path):
            raise errors.NotEmpty(f"{path} is not empty")
        if path not in record["mount_paths"]:
            record["mount_paths"].append(path)
            record["mounted"].append(path)
        return record

    def unmount(self, ref: str, path: str) -> dict[str, Any]:
        """Serve volume.unmount; NotFound when the volume is not mounted at `path`."""
        record = self.find(ref)
        if path not in record["mount_paths"]:
            raise errors.NotFound(f"volume {record['name']} is not mounted at {path}")
        record["mount_paths"].remove(path)
        record["mounted"].remove(path)
        return record

    def check(self, ref: str) -> dict[str, Any]:
        """Serve volume.check with the problems that a test planted; Busy while attached."""
        record = self.find(ref)
        if record["attached_on"]:
            raise errors.Busy(f"volume {record['name']} is attached; detach it first")
        problems = self.problems.get(record["name"], [])
        return {"clean": not problems, "problems": problems}

    def update(self, ref: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Serve volume.update: validate every key present, then apply them all."""
        record = self.find(ref)
        unknown = sorted(set(changes) - {"size", "ha_level", "labels", "nodes"})
        if unknown:
            raise errors.InvalidArgument(f"volume.update does not know the key {unknown[0]!r}")
        size = record["size"]
        if "size" in changes:
            size = units.check_size(changes["size"])
            if size < record["size"]:
                raise errors.InvalidArgument(
                    f"volume {record['name']} is {record['size']} bytes; shrinking is not supported"
                )
        if "ha_level" in changes:
            self._check_ha_change(record, changes["ha_level"], changes.get("nodes"))
        labels = record["labels"]
        if "labels" in changes:
            labels = units.validate_labels(changes["labels"])
        record["size"] = size
        record["labels"] = dict(labels)
        return record

    def _check_ha_change(
        self, record: dict[str, Any], ha_level: Any, requested: list[str] | None = None
    ) -> None:
        if isinstance(ha_level, bool) or not isinstance(ha_level, int) or not 1 <= ha_level <= 3:
            raise errors.InvalidArgument(f"ha_level must be 1 to 3, got {ha_level!r}")
        if ha_level == record["ha_level"]:
            return
        nodes = len(self.cluster_nodes())
        if ha_level > nodes:
            raise errors.InvalidArgument(
                f"ha_level {ha_level} needs {ha_level} online nodes, but the cluster has "
                f"{nodes} online"
            )
        # As pxd does: a raise records the target set and returns while the copy runs.
        if requested is not None:
            record["replica_nodes_next"] = list(record["replica_nodes"]) + list(requested)
            return
        record["replica_nodes_next"] = [node["node_id"] for node in self.cluster_nodes()][:ha_level]

    def stats(self, ref: str, cumulative: bool = True) -> dict[str, int]:
        """Serve volume.stats: the planted totals, or the live window when not cumulative."""
        record = self.find(ref)
        if not cumulative:
            return self.stats_live(ref)
        stats = self._zero_stats(record)
        stats.update(self.totals.get(record["id"], {}))
        stats["interval_ms"] = (time.time_ns() - record["ctime_ns"]) // 1_000_000
        return stats

    def stats_live(self, ref: str) -> dict[str, int]:
        """Serve volume.stats_live with the planted window; zeros for a quiet volume."""
        record = self.find(ref)
        stats = self._zero_stats(record)
        stats["interval_ms"] = LIVE_WINDOW_MS
        stats.update(self.live.get(record["id"], {}))
        return stats

    def stats_history(self, ref: str) -> dict[str, list[dict[str, Any]]]:
        """Serve volume.stats_history with the planted tiers."""
        record = self.find(ref)
        history: dict[str, list[dict[str, Any]]] = {"hourly": [], "daily": [], "monthly": []}
        history.update(self.history.get(record["id"], {}))
        return history

    def cluster_nodes(self) -> list[dict[str, Any]]:
        """Serve cluster.nodes: this node, online, then `other_nodes`."""
        return [{**self.node_status(), "online": True}, *self.other_nodes]

    def _zero_stats(self, record: dict[str, Any]) -> dict[str, int]:
        stats = dict.fromkeys(STATS_KEYS, 0)
        stats["bytes_used"] = record["usage"]
        return stats


class FakePxdServer:
    """Run a FakePxd on a unix socket from a thread; use it as a context manager."""

    def __init__(self, fake: FakePxd, path: Path) -> None:
        self.fake = fake
        self.path = path
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._thread = threading.Thread(target=self._run, name="fake-pxd", daemon=True)
        self._failure: BaseException | None = None

    def __enter__(self) -> FakePxdServer:
        self._thread.start()
        if not self._ready.wait(timeout=10) or self._failure is not None:
            raise RuntimeError(f"fake pxd did not start on {self.path}: {self._failure!r}")
        self.fake.socket = self.path
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None and self._scope is not None:
            trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:
            self._failure = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        server = RpcServer(self.fake.handlers(), name="fake-pxd")
        with trio.CancelScope() as scope:
            self._scope = scope
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_unix, self.path)
                self._ready.set()


@pytest.fixture
def fake_server() -> Callable[..., FakePxdServer]:
    """Return a factory of servers `(path, fake=None)`, for tests that stop and start pxd."""

    def build(path: Path, fake: FakePxd | None = None) -> FakePxdServer:
        return FakePxdServer(fake or FakePxd(), path)

    return build


@pytest.fixture
def fake_pxd(tmp_path: Path) -> Iterator[FakePxd]:
    """A FakePxd served on a unix socket; its path is `fake_pxd.socket`."""
    fake = FakePxd()
    path = short_socket_path(tmp_path, "pxd.sock")
    with FakePxdServer(fake, path):
        yield fake


@pytest_asyncio.fixture
async def rest_client(
    fake_pxd: FakePxd, aiohttp_client: Any
) -> AsyncIterator[TestClient[Any, Any]]:
    """An aiohttp test client of the REST app wired to `fake_pxd`."""
    control = ControlClient(fake_pxd.socket)
    client = await aiohttp_client(make_app(control))
    yield client


@pytest.fixture
def sidecar_process(fake_pxd: FakePxd, tmp_path: Path) -> Iterator[Callable[..., SidecarProcess]]:
    """Return a factory `(*extra_args)` of started sidecar processes, stopped after the test."""
    started: list[SidecarProcess] = []

    def build(*extra: str) -> SidecarProcess:
        sidecar = SidecarProcess(fake_pxd.socket, tmp_path, *extra)
        started.append(sidecar)
        sidecar.start()
        return sidecar

    yield build
    for sidecar in started:
        sidecar.stop()
