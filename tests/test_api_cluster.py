"""The REST API's replication state on a real two-node cluster: degraded and back to clean.

Two real pxd processes share one real etcd (tests/clusterproc.py), and a real pxd-sidecar
serves the REST API of the first node on its own address.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clusterproc import REPO, Cluster, ClusterNode, free_port_on, wait_until
from nodeproc import is_mountpoint

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"
)

MIB = 1 << 20
START_TIMEOUT = 30.0
#: Seconds for a write to drop the stopped replica: the 5 s replica timeout and the report to
#: the catalog, with room for a loaded machine.
DEGRADED_DEADLINE = 30.0
#: Seconds for the restarted replica to rejoin: the mount child retries every 5 s, and the
#: resync of a few MiB takes well under a second.
RESYNC_DEADLINE = 60.0
VOLUME_STATUS_UP = 2
VOLUME_STATUS_DEGRADED = 4


class Sidecar:
    """A pxd-sidecar for one cluster node, serving REST on the node's loopback address."""

    def __init__(self, node: ClusterNode) -> None:
        self.node = node
        self.port = free_port_on(node.ip)
        self.log_path = node.root / "sidecar.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the sidecar and wait until REST replies; raises AssertionError if it does not."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "daemon.sidecar", "--socket", str(self.node.socket),
                 "--rest", f"{self.node.ip}:{self.port}",
                 "--plugin-socket", str(self.node.root / "run" / "plugin.sock"),
                 "--state-dir", str(self.node.root / "sidecar")],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                self.rest("GET", "/osd-volumes/versions")
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"pxd-sidecar did not start:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        """Stop the sidecar by its pid and wait for it."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def rest(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """Send one REST request; return the status and the decoded JSON or text."""
        data = None if body is None else json.dumps(body).encode()
        url = f"http://{self.node.ip}:{self.port}{path}"
        request = urllib.request.Request(url, data=data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=60) as reply:
                status, raw = reply.status, reply.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def inspect(self, ref: str) -> dict[str, Any]:
        """Return the one Volume of GET /v1/osd-volumes/{ref}."""
        status, reply = self.rest("GET", f"/v1/osd-volumes/{ref}")
        assert status == 200, reply
        assert isinstance(reply, list) and len(reply) == 1, reply
        volume: dict[str, Any] = reply[0]
        return volume


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two pxd nodes on one etcd, stopped after the test."""
    # A short root, because the mount child's control socket under it must fit in 107 bytes.
    cluster = Cluster(tmp_path_factory.mktemp("apic"), 2)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def sidecar(cluster: Cluster) -> Iterator[Sidecar]:
    """The REST API of the cluster's first node."""
    sidecar = Sidecar(cluster.nodes[0])
    try:
        sidecar.start()
        yield sidecar
    finally:
        sidecar.stop()


def write_synced(path: Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it, so that every replica of the write set gets it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def runtime_state(volume: dict[str, Any]) -> dict[str, str]:
    """Return the one runtime state map of a Volume."""
    [entry] = volume["runtime_state"]
    state: dict[str, str] = entry["runtime_state"]
    return state


def test_stopped_replica_degrades_then_recovers(
    cluster: Cluster, sidecar: Sidecar, tmp_path: Path
) -> None:
    first, second = cluster.nodes
    # The second node is named by its IP, which the sidecar translates to its node id.
    spec = {"size": 64 * MIB, "ha_level": 2, "replica_set": {"nodes": [first.node_id, second.ip]}}
    status, reply = sidecar.rest(
        "POST", "/v1/osd-volumes", {"locator": {"name": "ha2"}, "spec": spec}
    )
    assert status == 200, reply
    assert reply["volume_response"] == {}, reply
    volume_id = reply["id"]
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    try:
        action = {"action": {"attach": 2, "mount": 2, "mount_path": str(mountpoint)}}
        status, reply = sidecar.rest("PUT", f"/v1/osd-volumes/{volume_id}", action)
        assert status == 200, reply
        assert reply["volume_response"] == {}, reply
        write_synced(mountpoint / "before", os.urandom(MIB))

        volume = sidecar.inspect(volume_id)
        state = runtime_state(volume)
        assert volume["replica_sets"] == [{"nodes": [first.node_id, second.node_id]}]
        assert volume["status"] == VOLUME_STATUS_UP
        assert state["RuntimeState"] == "clean"
        assert state["WriteSet"] == "[0 1]"
        assert state["Attachment"] == "mounted"

        assert second.stop() == 0
        write_synced(mountpoint / "after", os.urandom(MIB))
        volume = wait_until(
            lambda: _with_status(sidecar, volume_id, VOLUME_STATUS_DEGRADED),
            DEGRADED_DEADLINE,
            "the volume did not show DEGRADED after its second replica stopped",
        )
        state = runtime_state(volume)
        assert state["WriteSet"] == "[0]"
        assert state["RuntimeState"] in ("degraded", "resync")
        listing = subprocess.run(
            [sys.executable, "-m", "pxfs.cli", "--socket", str(first.socket), "volume", "list"],
            cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        [row] = [line.split() for line in listing.stdout.splitlines()[1:]]
        assert row[4] == "1/2"
        assert row[-5:-3] == ["degraded", "-"]

        second.start()
        volume = wait_until(
            lambda: _clean(sidecar, volume_id),
            RESYNC_DEADLINE,
            "the volume did not return to UP and clean after its second replica restarted",
        )
        state = runtime_state(volume)
        assert volume["status"] == VOLUME_STATUS_UP
        assert state["WriteSet"] == "[0 1]"
    finally:
        if is_mountpoint(mountpoint):
            release = {"action": {"attach": 1}, "options": {"UNMOUNT_BEFORE_DETACH": "true"}}
            sidecar.rest("PUT", f"/v1/osd-volumes/{volume_id}", release)
    status, reply = sidecar.rest("DELETE", f"/v1/osd-volumes/{volume_id}")
    assert reply == {}, reply


def _with_status(sidecar: Sidecar, volume_id: str, status: int) -> dict[str, Any] | None:
    volume = sidecar.inspect(volume_id)
    return volume if volume["status"] == status else None


def _clean(sidecar: Sidecar, volume_id: str) -> dict[str, Any] | None:
    volume = sidecar.inspect(volume_id)
    if volume["status"] != VOLUME_STATUS_UP or runtime_state(volume)["RuntimeState"] != "clean":
        return None
    return volume
