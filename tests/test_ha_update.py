"""Changing the ha level of volumes online, on a cluster of three real pxd processes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clusterproc import (
    COPY_DEADLINE,
    REPO,
    Cluster,
    assert_file_reads,
    assert_replicas_identical,
    create_volume,
    free_port_on,
    mount_on,
    release_on,
    sha256_file,
    wait_for_ha_level,
    write_synced,
)

from pxfs import errors
from pxfs.blockingclient import BlockingClient

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for FUSE mounts")

MIB = 1 << 20
#: How long the writer of the online raise writes after the copy is done.
WRITER_TAIL = 1.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("ha"), 3)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


class _Writer(threading.Thread):
    """Write and fsync files on a mount in a loop until `stop` is set, for at most 10 minutes."""

    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.written: dict[str, str] = {}

    def run(self) -> None:
        deadline = time.monotonic() + 600
        count = 0
        try:
            while not self.stop.is_set() and time.monotonic() < deadline:
                payload = os.urandom(MIB)
                name = f"w{count % 32}"
                write_synced(self.root / name, payload)
                self.written[name] = hashlib.sha256(payload).hexdigest()
                count += 1
        except BaseException as exc:
            self.error = exc


def test_raise_1_to_2_while_writing(cluster: Cluster, tmp_path: Path) -> None:
    first, second = cluster.nodes[:2]
    vol_id = create_volume(first, "online", 1, [first])
    path = tmp_path / "mnt"
    writer = _Writer(path)
    try:
        mount_on(first, "online", path)
        write_synced(path / "before", os.urandom(8 * MIB))
        writer.start()
        time.sleep(0.5)
        started = first.call("volume.update", "online", {"ha_level": 2, "nodes": [second.node_id]})
        assert started["ha_level"] == 1
        assert started["replica_nodes_next"] == [first.node_id, second.node_id]
        record = wait_for_ha_level(first, "online", 2)
        time.sleep(WRITER_TAIL)
        writer.stop.set()
        writer.join(timeout=60)
        assert writer.error is None, f"the writer failed: {writer.error!r}"
        assert writer.written, "the writer wrote nothing"
        assert record["replica_nodes"] == [first.node_id, second.node_id]
        assert sorted(record["write_set"]) == sorted([first.node_id, second.node_id])
        assert record["out_of_sync"] == []
        state = first.call("volume.inspect", "online")["runtime_state"]
        assert state["RuntimeState"] == "clean"
        assert state["WriteSet"] == "[0 1]"
        for name, digest in writer.written.items():
            assert sha256_file(path / name) == digest, name
    finally:
        writer.stop.set()
        release_on(first, "online", path)
    assert_replicas_identical([first, second], vol_id)
    first.call("volume.delete", "online")


def test_raise_2_to_3_detached(cluster: Cluster, tmp_path: Path) -> None:
    first, second, third = cluster.nodes[:3]
    vol_id = create_volume(first, "offline", 2, [first, second])
    path = tmp_path / "mnt"
    payload = os.urandom(16 * MIB)
    try:
        mount_on(first, "offline", path)
        write_synced(path / "blob", payload)
    finally:
        release_on(first, "offline", path)

    first.call("volume.update", "offline", {"ha_level": 3})
    record = wait_for_ha_level(first, "offline", 3)
    assert record["replica_nodes"] == [first.node_id, second.node_id, third.node_id]
    assert sorted(record["write_set"]) == sorted(record["replica_nodes"])
    assert record["attached_on"] == ""
    assert_replicas_identical([first, second, third], vol_id)

    # A detached volume drops replicas from the end of replica_nodes.
    record = first.call("volume.update", "offline", {"ha_level": 1})
    assert record["replica_nodes"] == [first.node_id]
    assert not third.replica_dir(vol_id).exists()
    assert not second.replica_dir(vol_id).exists()
    assert_file_reads(first, "offline", path, "blob", hashlib.sha256(payload).hexdigest())
    first.call("volume.delete", "offline")


def test_lower_drops_right_replicas(cluster: Cluster, tmp_path: Path) -> None:
    first, second, third = cluster.nodes[:3]
    vol_id = create_volume(first, "lower", 3, [second, first, third])
    path = tmp_path / "mnt"
    payload = os.urandom(8 * MIB)
    try:
        # Attached on the second node, whose replica must stay to the end.
        mount_on(second, "lower", path)
        write_synced(path / "blob", payload)

        record = second.call("volume.update", "lower", {"ha_level": 2})
        assert record["ha_level"] == 2
        assert record["replica_nodes"] == [second.node_id, first.node_id]
        assert "replica_nodes_next" not in record
        assert not third.replica_dir(vol_id).exists()
        state = second.call("volume.inspect", "lower")["runtime_state"]
        assert state["ReplicaSetCurr"] == "[0 1]"

        record = second.call("volume.update", "lower", {"ha_level": 1})
        assert record["replica_nodes"] == [second.node_id]
        assert record["write_set"] == [second.node_id]
        assert not first.replica_dir(vol_id).exists()
        assert second.replica_dir(vol_id).exists()

        write_synced(path / "after", payload)
        assert sha256_file(path / "blob") == hashlib.sha256(payload).hexdigest()
    finally:
        release_on(second, "lower", path)
    second.call("volume.delete", "lower")


def test_lower_drops_out_of_sync_first(cluster: Cluster, tmp_path: Path) -> None:
    first, second, third = cluster.nodes[:3]
    vol_id = create_volume(first, "stale", 3, [first, second, third])
    path = tmp_path / "mnt"
    try:
        mount_on(first, "stale", path)
        second.kill()
        write_synced(path / "blob", os.urandom(4 * MIB))
        record = first.call("volume.inspect", "stale")
        assert record["out_of_sync"] == [second.node_id]
        second.start()

        record = first.call("volume.update", "stale", {"ha_level": 2})
        assert record["replica_nodes"] == [first.node_id, third.node_id]
        assert record["out_of_sync"] == []
        assert not second.replica_dir(vol_id).exists()
    finally:
        if second.pxd is None:
            second.start()
        release_on(first, "stale", path)
    assert_replicas_identical([first, third], vol_id)
    first.call("volume.delete", "stale")


def test_progress_visible_during_copy(cluster: Cluster, tmp_path: Path) -> None:
    first, second = cluster.nodes[:2]
    vol_id = create_volume(first, "big", 1, [first], size=256 * MIB)
    path = tmp_path / "mnt"
    try:
        mount_on(first, "big", path)
        write_synced(path / "fill", os.urandom(192 * MIB))
        first.call("volume.update", "big", {"ha_level": 2, "nodes": [second.node_id]})
        with pytest.raises(errors.Busy) as caught:
            first.call("volume.update", "big", {"ha_level": 3})
        assert "changing from 1 to 2" in str(caught.value)

        samples = []
        deadline = time.monotonic() + COPY_DEADLINE
        with BlockingClient(first.socket) as client:
            while time.monotonic() < deadline:
                record = client.call("volume.inspect", "big")
                if "ha_update" not in record:
                    break
                progress = record["ha_update"]["progress"].get(second.node_id)
                if progress is not None:
                    samples.append(progress)
        partial = [p for p in samples if 0 < p["planned"] and p["copied"] < p["planned"]]
        assert partial, f"no progress seen during the copy: {samples[:5]}"
        assert partial[0]["total"] >= 256 * MIB // (64 * 1024)
        assert partial[0]["planned"] >= 192 * MIB // (64 * 1024)
        assert wait_for_ha_level(first, "big", 2)["ha_level"] == 2
    finally:
        release_on(first, "big", path)
    assert_replicas_identical([first, second], vol_id)
    first.call("volume.delete", "big")


def test_ha_update_errors(cluster: Cluster) -> None:
    first, second, third = cluster.nodes[:3]
    create_volume(first, "bad", 1, [first])
    for ha_level in (0, 4):
        with pytest.raises(errors.InvalidArgument):
            first.call("volume.update", "bad", {"ha_level": ha_level})
    with pytest.raises(errors.InvalidArgument) as caught:
        first.call("volume.update", "bad", {"ha_level": 2, "nodes": ["no-such-node"]})
    assert "no-such-node" in str(caught.value)

    third.stop()
    try:
        with pytest.raises(errors.InvalidArgument) as caught:
            first.call("volume.update", "bad", {"ha_level": 3})
        assert str(caught.value) == "ha_level 3 needs 3 online nodes, but the cluster has 2 online"
    finally:
        third.start()
    record = first.call("volume.inspect", "bad")
    assert record["ha_level"] == 1
    assert "replica_nodes_next" not in record
    assert not second.replica_dir(record["id"]).exists()
    first.call("volume.delete", "bad")


def test_rest_put_ha_level(cluster: Cluster, tmp_path: Path) -> None:
    first = cluster.nodes[0]
    vol_id = create_volume(first, "rest", 1, [first])
    port = free_port_on(first.ip)
    log = open(tmp_path / "sidecar.log", "wb")  # noqa: SIM115 - closed after the process
    sidecar = subprocess.Popen(
        [sys.executable, "-m", "daemon.sidecar", "--socket", str(first.socket),
         "--rest", f"{first.ip}:{port}", "--plugin-socket", str(tmp_path / "plugin.sock"),
         "--docker-mount-base", str(tmp_path / "docker"), "--state-dir", str(tmp_path / "state")],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        body = json.dumps({"spec": {"ha_level": 2}}).encode()
        url = f"http://{first.ip}:{port}/v1/osd-volumes/{vol_id}"
        reply = _put_when_up(url, body)
        assert reply.get("volume_response", {}).get("error") is None, reply
        record = wait_for_ha_level(first, "rest", 2)
    finally:
        sidecar.terminate()
        sidecar.wait(timeout=30)
        log.close()
    assert record["replica_nodes"][0] == first.node_id
    added = [node for node in cluster.nodes if node.node_id == record["replica_nodes"][1]]
    assert len(added) == 1
    assert_replicas_identical([first, added[0]], vol_id)
    first.call("volume.delete", "rest")


def _put_when_up(url: str, body: bytes) -> dict[str, Any]:
    """PUT `body` to `url`, retrying while the sidecar starts; return the JSON reply."""
    deadline = time.monotonic() + 30
    while True:
        request = urllib.request.Request(url, data=body, method="PUT")
        request.add_header("Content-Type", "application/json")
        try:
            # No proxy from the environment: the sidecar listens on loopback.
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(request, timeout=30) as response:
                reply: dict[str, Any] = json.loads(response.read())
                return reply
        except ConnectionRefusedError:
            pass
        except urllib.error.URLError as exc:
            if not isinstance(exc.reason, ConnectionRefusedError):
                raise
        assert time.monotonic() < deadline, "the sidecar did not start"
        time.sleep(0.2)


def test_mount_takes_over_offline_copy(cluster: Cluster, tmp_path: Path) -> None:
    first, second = cluster.nodes[:2]
    vol_id = create_volume(first, "handover", 1, [first], size=256 * MIB)
    path = tmp_path / "mnt"
    payload = os.urandom(192 * MIB)
    try:
        mount_on(first, "handover", path)
        write_synced(path / "fill", payload)
    finally:
        release_on(first, "handover", path)

    first.call("volume.update", "handover", {"ha_level": 2, "nodes": [second.node_id]})
    try:
        # The mount stops the copy that pxd runs and hands the rest to the mount child.
        mount_on(first, "handover", path)
        record = wait_for_ha_level(first, "handover", 2)
        assert sorted(record["write_set"]) == sorted([first.node_id, second.node_id])
        assert sha256_file(path / "fill") == hashlib.sha256(payload).hexdigest()
        write_synced(path / "after", os.urandom(4 * MIB))
    finally:
        release_on(first, "handover", path)
    assert_replicas_identical([first, second], vol_id)
    first.call("volume.delete", "handover")
