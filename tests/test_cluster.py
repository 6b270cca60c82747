"""A cluster of three real pxd processes on one real etcd: membership and replicated volumes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from clusterproc import REPO, Cluster, ClusterNode, sha256_file, write_secret
from nodeproc import is_mountpoint

from pxfs import errors
from pxfs.blockingclient import BlockingClient
from pxfs.etcdcatalog import DEFAULT_NODE_TTL
from pxfs.rpc import RpcClient, read_secret

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for FUSE mounts")

MIB = 1 << 20
#: How long after a kill -9 a node may still show online: the lease TTL, one status period
#: and the time etcd takes to expire a lease.
OFFLINE_DEADLINE = DEFAULT_NODE_TTL + 10.0
#: How long a restarted node's replica may take to rejoin the write set: the mount child tries
#: every 5 s, and a resync of a 64 MiB volume takes well under a second here.
RESYNC_DEADLINE = 30.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("cluster"), 3)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _create(node: ClusterNode, name: str, ha_level: int, **extra: object) -> dict[str, object]:
    spec = {"name": name, "size": 64 * MIB, "ha_level": ha_level, "labels": {}, **extra}
    record: dict[str, object] = node.call("volume.create", spec)
    return record


def _unmount(node: ClusterNode, name: str, path: Path) -> None:
    node.call("volume.unmount", name, str(path))
    node.call("volume.detach", name)


def test_cluster_lists_every_node_online(cluster: Cluster) -> None:
    expected = sorted(node.node_id for node in cluster.nodes[:3])
    for node in cluster.nodes[:3]:
        listed = node.call("cluster.nodes")
        assert listed[0]["node_id"] == node.node_id
        assert sorted(entry["node_id"] for entry in listed) == expected
        for entry in listed:
            assert entry["online"] is True, entry
            assert entry["status"] == "up", entry
            assert entry["capacity_bytes"] > 0, entry


def test_cluster_nodes_show_published_addresses(cluster: Cluster) -> None:
    listed = {entry["node_id"]: entry for entry in cluster.nodes[0].call("cluster.nodes")}
    for node in cluster.nodes[:3]:
        assert listed[node.node_id]["ip"] == node.ip


def test_volume_created_on_one_node_listed_on_all(cluster: Cluster) -> None:
    first, _, third = cluster.nodes[:3]
    record = _create(first, "shared", 1)
    names = [volume["name"] for volume in third.call("volume.list")]
    assert "shared" in names
    inspected = third.call("volume.inspect", "shared")
    assert inspected["id"] == record["id"]
    assert inspected["replica_nodes"] == record["replica_nodes"]
    holders = [node for node in cluster.nodes[:3] if node.replica_dir(str(record["id"])).is_dir()]
    assert [node.node_id for node in holders] == record["replica_nodes"]
    first.call("volume.delete", "shared")
    assert third.call("volume.list", {"name": "shared"}) == []


def test_ha2_places_replicas_on_distinct_nodes(cluster: Cluster) -> None:
    nodes = cluster.nodes[:3]
    record = _create(nodes[0], "ha2", 2)
    vol_id = str(record["id"])
    replica_nodes = record["replica_nodes"]
    assert isinstance(replica_nodes, list)
    assert len(set(replica_nodes)) == 2
    for node in nodes:
        assert node.replica_dir(vol_id).is_dir() == (node.node_id in replica_nodes), node.ip

    nodes[2].call("volume.delete", "ha2")
    for node in nodes:
        assert not node.replica_dir(vol_id).exists(), node.ip


def test_create_on_named_nodes(cluster: Cluster) -> None:
    nodes = cluster.nodes[:3]
    chosen = [nodes[2].node_id, nodes[0].node_id]
    record = _create(nodes[1], "named", 2, nodes=chosen)
    assert record["replica_nodes"] == chosen
    assert not nodes[1].replica_dir(str(record["id"])).exists()
    nodes[1].call("volume.delete", "named")


def test_create_on_unknown_node_fails(cluster: Cluster) -> None:
    with pytest.raises(errors.InvalidArgument, match="is not an online node"):
        _create(cluster.nodes[0], "nowhere", 2, nodes=[cluster.nodes[0].node_id, "no-such-node"])
    assert cluster.nodes[0].call("volume.list", {"name": "nowhere"}) == []


def test_ha4_is_invalid(cluster: Cluster) -> None:
    with pytest.raises(errors.InvalidArgument, match="ha_level"):
        _create(cluster.nodes[0], "ha4", 4)


def test_remote_mount_writes_every_replica(cluster: Cluster, tmp_path: Path) -> None:
    first, second, third = cluster.nodes[:3]
    record = _create(first, "data", 2, nodes=[first.node_id, second.node_id])
    vol_id = str(record["id"])
    path = tmp_path / "third"
    path.mkdir()
    payload = os.urandom(16 * MIB)
    expected = hashlib.sha256(payload).hexdigest()
    try:
        third.call("volume.attach", "data")
        third.call("volume.mount", "data", str(path))
        with open(path / "blob", "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        assert sha256_file(path / "blob") == expected
    finally:
        if is_mountpoint(path):
            _unmount(third, "data", path)
    assert not third.replica_dir(vol_id).exists()

    # The mount child closed the volume at unmount, so both replicas are final now.
    tables = [(node.replica_dir(vol_id) / "table").read_bytes() for node in (first, second)]
    assert tables[0] == tables[1]
    data = [sha256_file(node.replica_dir(vol_id) / "data") for node in (first, second)]
    assert data[0] == data[1]

    # Read it back through a node that has a replica.
    again = tmp_path / "second"
    again.mkdir()
    try:
        second.call("volume.attach", "data")
        second.call("volume.mount", "data", str(again))
        assert sha256_file(again / "blob") == expected
    finally:
        if is_mountpoint(again):
            _unmount(second, "data", again)
    first.call("volume.delete", "data")


def test_replica_down_then_resynced(cluster: Cluster, tmp_path: Path) -> None:
    first, second, third = cluster.nodes[:3]
    record = _create(first, "degraded", 2, nodes=[first.node_id, second.node_id])
    vol_id = str(record["id"])
    path = tmp_path / "mnt"
    path.mkdir()
    before, after = os.urandom(4 * MIB), os.urandom(4 * MIB)
    try:
        third.call("volume.attach", "degraded")
        third.call("volume.mount", "degraded", str(path))
        _write_synced(path / "before", before)

        second.kill()
        _write_synced(path / "after", after)
        inspected = third.call("volume.inspect", "degraded")
        assert inspected["write_set"] == [first.node_id]
        assert inspected["out_of_sync"] == [second.node_id]

        second.start()
        deadline = time.monotonic() + RESYNC_DEADLINE
        while third.call("volume.inspect", "degraded").get("out_of_sync"):
            assert time.monotonic() < deadline, "the replica did not resync"
            time.sleep(0.5)
        inspected = third.call("volume.inspect", "degraded")
        assert sorted(inspected["write_set"]) == sorted([first.node_id, second.node_id])
        assert sha256_file(path / "after") == hashlib.sha256(after).hexdigest()
    finally:
        if is_mountpoint(path):
            _unmount(third, "degraded", path)

    tables = [(node.replica_dir(vol_id) / "table").read_bytes() for node in (first, second)]
    assert tables[0] == tables[1]
    data = [sha256_file(node.replica_dir(vol_id) / "data") for node in (first, second)]
    assert data[0] == data[1]
    first.call("volume.delete", "degraded")


def test_unmount_from_other_node_rejected(cluster: Cluster, tmp_path: Path) -> None:
    first, second = cluster.nodes[:2]
    _create(first, "owned", 1, nodes=[first.node_id])
    path = tmp_path / "mnt"
    path.mkdir()
    first.call("volume.attach", "owned")
    try:
        first.call("volume.mount", "owned", str(path))
        with pytest.raises(errors.Busy, match="attached on node"):
            second.call("volume.unmount", "owned", str(path))
        assert is_mountpoint(path)
        assert first.call("volume.inspect", "owned")["mount_paths"] == [str(path)]
    finally:
        if is_mountpoint(path):
            first.call("volume.unmount", "owned", str(path))
        first.call("volume.detach", "owned")
    first.call("volume.delete", "owned")


def test_out_of_sync_replica_kept_at_remount(cluster: Cluster, tmp_path: Path) -> None:
    first, second, third = cluster.nodes[:3]
    record = _create(first, "stale", 2, nodes=[first.node_id, second.node_id])
    vol_id = str(record["id"])
    path = tmp_path / "mnt"
    path.mkdir()
    payload = os.urandom(4 * MIB)
    third.call("volume.attach", "stale")
    try:
        third.call("volume.mount", "stale", str(path))
        second.kill()
        _write_synced(path / "blob", payload)
        third.call("volume.unmount", "stale", str(path))
        assert third.call("volume.inspect", "stale")["out_of_sync"] == [second.node_id]

        # The stale replica must not be taken as in sync when the volume mounts again.
        second.start()
        third.call("volume.mount", "stale", str(path))
        assert sha256_file(path / "blob") == hashlib.sha256(payload).hexdigest()
        deadline = time.monotonic() + RESYNC_DEADLINE
        while third.call("volume.inspect", "stale").get("out_of_sync"):
            assert time.monotonic() < deadline, "the replica did not resync"
            time.sleep(0.5)
    finally:
        if second.pxd is None:
            second.start()
        if is_mountpoint(path):
            third.call("volume.unmount", "stale", str(path))
        third.call("volume.detach", "stale")

    tables = [(node.replica_dir(vol_id) / "table").read_bytes() for node in (first, second)]
    assert tables[0] == tables[1]
    first.call("volume.delete", "stale")


def _write_synced(path: Path, payload: bytes) -> None:
    with open(path, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())


def test_wrong_secret_rejected(cluster: Cluster, tmp_path: Path) -> None:
    other = write_secret(tmp_path / "other.secret")
    node = cluster.new_node("127.0.0.9", "stranger", secret_file=other)
    node.launch()
    assert node.pxd is not None
    try:
        status = node.pxd.wait(timeout=30)
    except subprocess.TimeoutExpired:
        node.kill()
        raise
    assert status == 1
    assert "does not match the secret of cluster" in node.log_text()
    ids = [entry["node_id"] for entry in cluster.nodes[0].call("cluster.nodes")]
    assert len(ids) == 3


def test_pxctl_cluster_list_shows_every_node(cluster: Cluster) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pxfs.cli", "--socket", str(cluster.nodes[1].socket),
         "cluster", "list"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for node in cluster.nodes[:3]:
        assert node.node_id in result.stdout
        assert node.ip in result.stdout
    assert result.stdout.count("Online") == 3


def test_peer_tcp_rejects_wrong_secret(cluster: Cluster) -> None:
    node = cluster.nodes[0]

    async def connect() -> None:
        await RpcClient.connect_tcp(node.ip, node.peer_port, b"0" * 32)

    with pytest.raises(errors.AuthenticationFailed):
        trio.run(connect)
    deadline = time.monotonic() + 10
    while "rejected a connection that failed the handshake" not in node.log_text():
        assert time.monotonic() < deadline, "pxd did not log the failed handshake"
        time.sleep(0.1)


def test_peer_tcp_serves_store_with_secret(cluster: Cluster) -> None:
    node = cluster.nodes[0]
    secret = read_secret(cluster.secret_file)

    async def info() -> object:
        client = await RpcClient.connect_tcp(node.ip, node.peer_port, secret)
        try:
            return await client.call("store.info", "12345")
        finally:
            await client.aclose()

    with pytest.raises(errors.NotFound):
        trio.run(info)


def test_stopped_node_offline_at_once(cluster: Cluster) -> None:
    first, second, _ = cluster.nodes[:3]
    assert second.stop() == 0
    try:
        listed = {entry["node_id"]: entry for entry in first.call("cluster.nodes")}
        # pxd revokes its lease as it stops, so no TTL has to run out.
        assert listed[second.node_id]["online"] is False
    finally:
        second.start()
    listed = {entry["node_id"]: entry for entry in first.call("cluster.nodes")}
    assert listed[second.node_id]["online"] is True


def test_killed_node_goes_offline(cluster: Cluster) -> None:
    first, second, third = cluster.nodes[:3]
    third.kill()
    deadline = time.monotonic() + OFFLINE_DEADLINE
    while time.monotonic() < deadline:
        listed = {entry["node_id"]: entry for entry in first.call("cluster.nodes")}
        if not listed[third.node_id]["online"]:
            break
        time.sleep(0.5)
    assert listed[third.node_id]["online"] is False
    assert listed[second.node_id]["online"] is True

    # Two online nodes cannot hold three replicas.
    with pytest.raises(
        errors.InvalidArgument, match="needs 3 online nodes, but the cluster has 2 online"
    ):
        _create(first, "ha3", 3)

    third.start()
    listed = {entry["node_id"]: entry for entry in first.call("cluster.nodes")}
    assert listed[third.node_id]["online"] is True


def test_mount_with_replica_node_down(cluster: Cluster, tmp_path: Path) -> None:
    first, second, _ = cluster.nodes[:3]
    _create(first, "half", 2, nodes=[first.node_id, second.node_id])
    second.kill()
    path = tmp_path / "mnt"
    path.mkdir()
    payload = os.urandom(MIB)
    try:
        first.call("volume.attach", "half")
        first.call("volume.mount", "half", str(path))
        _write_synced(path / "blob", payload)
        inspected = first.call("volume.inspect", "half")
        assert inspected["write_set"] == [first.node_id]
        assert inspected["out_of_sync"] == [second.node_id]

        second.start()
        deadline = time.monotonic() + RESYNC_DEADLINE
        while first.call("volume.inspect", "half").get("out_of_sync"):
            assert time.monotonic() < deadline, "the replica did not resync"
            time.sleep(0.5)
    finally:
        if second.pxd is None:
            second.start()
        if is_mountpoint(path):
            _unmount(first, "half", path)
    first.call("volume.delete", "half")


def test_cluster_tool_starts_and_stops(tmp_path: Path) -> None:
    tool = [sys.executable, str(REPO / "tools" / "cluster")]
    directory = tmp_path / "tool"
    mountpoint = tmp_path / "mnt"
    started = subprocess.run(
        [*tool, "start", "2", "--dir", str(directory)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    state = json.loads((directory / "cluster.json").read_text()) if started.returncode == 0 else {}
    try:
        assert started.returncode == 0, started.stderr
        assert "--socket" in started.stdout
        # start returns once every sidecar serves its REST port.
        for node in state["nodes"]:
            url = f"{node['rest']}/v1/cluster/enumerate"
            with urllib.request.urlopen(url, timeout=5) as reply:
                assert reply.status == 200

        # A second cluster on the same addresses gets other REST ports, and its URLs reach
        # its own nodes, not those of the first cluster.
        second_dir = tmp_path / "second"
        second = subprocess.run(
            [*tool, "start", "1", "--dir", str(second_dir)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        try:
            assert second.returncode == 0, second.stderr
            other = json.loads((second_dir / "cluster.json").read_text())["nodes"][0]
            assert other["rest"] != state["nodes"][0]["rest"]
            with BlockingClient(other["socket"]) as client:
                own_id = client.call("node.status")["node_id"]
            with urllib.request.urlopen(f"{other['rest']}/v1/cluster/enumerate") as reply:
                listed = [node["Id"] for node in json.loads(reply.read())["Nodes"]]
            assert listed == [own_id]
        finally:
            subprocess.run(
                [*tool, "stop", "--dir", str(second_dir)],
                capture_output=True, text=True, timeout=300, check=False,
            )  # fmt: skip

        sockets = [node["socket"] for node in state["nodes"]]
        with BlockingClient(sockets[1]) as client:
            listed = client.call("cluster.nodes")
        assert len(listed) == 2
        assert all(entry["online"] for entry in listed)

        mountpoint.mkdir()
        with BlockingClient(sockets[0]) as client:
            client.call("volume.create", {"name": "tool", "size": 64 * MIB})
            client.call("volume.attach", "tool")
            client.call("volume.mount", "tool", str(mountpoint))
        assert is_mountpoint(mountpoint)

        # One node's pxd killed as a crash would, then started again, and stop sees the new pid.
        old_pid = state["nodes"][1]["pxd_pid"]
        killed = subprocess.run(
            [*tool, "stop-node", "2", "--kill", "--dir", str(directory)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert killed.returncode == 0, killed.stderr
        assert not _runs_in(old_pid, directory)
        again = subprocess.run(
            [*tool, "start-node", "2", "--dir", str(directory)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert again.returncode == 0, again.stderr
        state = json.loads((directory / "cluster.json").read_text())
        assert state["nodes"][1]["pxd_pid"] != old_pid
        assert _runs_in(state["nodes"][1]["pxd_pid"], directory)
        with BlockingClient(sockets[1]) as client:
            assert client.call("node.status")["status"] == "up"
        twice = subprocess.run(
            [*tool, "start-node", "2", "--dir", str(directory)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert twice.returncode == 1
        assert "runs already" in twice.stderr
    finally:
        stopped = subprocess.run(
            [*tool, "stop", "--dir", str(directory)],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
    assert stopped.returncode == 0, stopped.stderr

    pids = [state["etcd"]["pid"]]
    for node in state["nodes"]:
        pids += [node["pxd_pid"], node["sidecar_pid"]]
    for pid in pids:
        assert not _runs_in(pid, directory), pid
    assert not (directory / "cluster.json").exists()
    assert not is_mountpoint(mountpoint)


def _runs_in(pid: int, directory: Path) -> bool:
    """Return whether `pid` is alive with `directory` on its command line."""
    try:
        return str(directory).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
