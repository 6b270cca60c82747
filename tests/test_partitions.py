"""Network partitions: one node cut off from etcd and the other nodes, then healed.

etcd and three real pxd processes each run in a network namespace of their own, joined by veth
pairs to a bridge in a hub namespace (clusterproc.NetnsCluster). Cutting a node sets its veth
link down in the hub, so its packets are dropped both ways while its processes keep running.
Volumes are mounted through FUSE, and every check compares sha256 checksums on the mount and on
each replica, and runs `pxctl volume verify`. The tests print what they measure; run with `-s`
to see it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from clusterproc import (
    REPO,
    ClusterNode,
    NetnsCluster,
    Writer,
    lazy_unmount,
    mount_on,
    release_on,
    sha256_file,
    sha256_prefix,
    wait_until,
)

from pxfs import errors
from pxfs.etcd import DEFAULT_TIMEOUT as ETCD_TIMEOUT
from pxfs.etcdcatalog import DEFAULT_NODE_TTL
from pxfs.replication import DEFAULT_TIMEOUT
from pxfs.rpc import BlockingClient, RpcClient, read_secret

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for FUSE mounts")

MIB = 1 << 20
BLOCK = 64 * 1024
VOLUME_SIZE = 256 * MIB
#: Seconds that a writer runs, the size of each of its fsync'd chunks, and the most it writes.
#: A cut comes after a third of the run, and a replica that stops replying stalls the writer
#: for DEFAULT_TIMEOUT, so a few seconds of writes during the cut follow the stall.
WRITER_SECONDS = 10.0
CHUNK = 256 * 1024
MAX_BYTES = 192 * MIB
#: How long a writer may take beyond its own run time, stalls included, before it counts as hung.
WRITER_SLACK = 60.0
#: How long after a cut the other nodes may still show the node online: the lease TTL, one
#: status period and the time etcd takes to expire a lease.
OFFLINE_DEADLINE = DEFAULT_NODE_TTL + 10.0
#: How long after a cut the writer on the cut-off node may go on before a write fails. A write
#: to the peer replica times out first (DEFAULT_TIMEOUT), then recording the smaller write set
#: in etcd does (ETCD_TIMEOUT), and sending one chunk takes a little more.
WRITE_FAIL_DEADLINE = DEFAULT_TIMEOUT + ETCD_TIMEOUT + 10.0
#: How long a healed replica may take to rejoin the write set. The mount child tries every 5 s,
#: and an attempt that started during the cut may wait out its 10 s connect. Copying what a
#: writer wrote in a few seconds takes a few seconds more.
RESYNC_DEADLINE = 45.0
#: How long after a heal the old mount child of a volume taken over may run: one lease refresh
#: (a third of the TTL), one etcd timeout, one attachment check (3 s) and the child's exit.
FENCE_DEADLINE = DEFAULT_NODE_TTL / 3 + ETCD_TIMEOUT + 3.0 + 15.0
#: How long after a heal every node may take to list the healed node online again.
HEAL_DEADLINE = DEFAULT_NODE_TTL / 3 + ETCD_TIMEOUT + 10.0
#: How long a copy to a new replica of a volume of at most 256 MiB may take on a loaded machine.
COPY_DEADLINE = 120.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetnsCluster]:
    cluster = NetnsCluster(tmp_path_factory.mktemp("partitions"), 3)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(autouse=True)
def every_node_on_the_network(cluster: NetnsCluster) -> Iterator[None]:
    """Heal every node that a failed test left cut off, so the next test has three."""
    yield
    for node in cluster.nodes:
        cluster.heal(node)
        if node.pxd is None:
            node.start()


# Helpers


def _create(node: ClusterNode, name: str, ha_level: int, nodes: list[ClusterNode]) -> str:
    spec = {
        "name": name,
        "size": VOLUME_SIZE,
        "ha_level": ha_level,
        "labels": {},
        "nodes": [member.node_id for member in nodes],
    }
    return str(node.call("volume.create", spec)["id"])


def _write_synced(path: Path, payload: bytes) -> None:
    with open(path, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())


def _runtime(node: ClusterNode, name: str) -> dict[str, str]:
    state: dict[str, str] = node.call("volume.inspect", name)["runtime_state"]
    return state


def _pairs(text: str) -> dict[int, int]:
    """Parse a runtime state list such as "[{0 12} {1 3}]" into {0: 12, 1: 3}."""
    return {int(key): int(value) for key, value in re.findall(r"\{(\d+) (\d+)\}", text)}


def _differing(old: list[int], new: list[int]) -> int:
    """Count the blocks whose version differs between two block tables."""
    length = max(len(old), len(new))
    old = old + [0] * (length - len(old))
    new = new + [0] * (length - len(new))
    return sum(1 for before, after in zip(old, new, strict=True) if before != after)


def _wait_in_sync(node: ClusterNode, name: str) -> dict[str, Any]:
    def clean() -> dict[str, Any] | None:
        record: dict[str, Any] = node.call("volume.inspect", name)
        if record["out_of_sync"] or record["runtime_state"].get("RuntimeState") != "clean":
            return None
        return record

    found: dict[str, Any] = wait_until(clean, RESYNC_DEADLINE, f"{name} did not resync")
    return found


def _resynced(node: ClusterNode, name: str, replica: ClusterNode) -> int:
    """The blocks that the mount child on `node` copied to `replica` in its resyncs."""
    record = node.call("volume.inspect", name)
    index = record["replica_nodes"].index(replica.node_id)
    return _pairs(record["runtime_state"]["ResyncBlocks"]).get(index, 0)


def _assert_verified(node: ClusterNode, name: str) -> None:
    result = node.pxctl("volume", "verify", name)
    assert result.returncode == 0, f"pxctl volume verify {name}:\n{result.stdout}{result.stderr}"


def _assert_replicas_identical(nodes: list[ClusterNode], vol_id: str) -> None:
    """Compare the block tables (versions and crc32 of every block) and the data files."""
    tables = [(node.replica_dir(vol_id) / "table").read_bytes() for node in nodes]
    for node, table in zip(nodes[1:], tables[1:], strict=True):
        assert table == tables[0], f"block table of {node.ip} differs from {nodes[0].ip}"
    data = [sha256_file(node.replica_dir(vol_id) / "data") for node in nodes]
    for node, digest in zip(nodes[1:], data[1:], strict=True):
        assert digest == data[0], f"data file of {node.ip} differs from {nodes[0].ip}"


def _online_ids(viewer: ClusterNode) -> set[str] | None:
    """The ids of the nodes that `viewer` lists online; None when it does not respond now."""
    try:
        listed = viewer.call("cluster.nodes", timeout=2 * ETCD_TIMEOUT)
    except errors.PxfsError:
        return None
    return {entry["node_id"] for entry in listed if entry["online"]}


def _volume_ids(node: ClusterNode) -> list[str] | None:
    """The ids of the volumes that `node` lists; None when it does not respond now."""
    try:
        records = node.call("volume.list", timeout=2 * ETCD_TIMEOUT)
    except errors.PxfsError:
        return None
    return sorted(record["id"] for record in records)


def _mounted(path: Path) -> bool:
    with open("/proc/self/mounts", encoding="utf-8") as table:
        return any(line.split()[1] == str(path) for line in table)


def _stale_write_refused(node: ClusterNode, vol_id: str, epoch: int) -> bool:
    """Send one write at `epoch` to the replica on `node`; return whether it raised StaleEpoch.

    The write goes to the last block of the device, outside every file and all metadata.
    """

    async def attempt() -> bool:
        secret = read_secret(node.secret_file)
        client = await RpcClient.connect_unix(node.socket.parent / "peer.sock", secret)
        try:
            nblocks = (await client.call("store.info", vol_id))["nblocks"]
            version = (epoch << 32) | 1
            await client.call("store.write", vol_id, epoch, version, [[nblocks - 1, bytes(BLOCK)]])
        except errors.StaleEpoch:
            return True
        finally:
            await client.aclose()
        return False

    return trio.run(attempt)


def _cleanup_old_mount(node: ClusterNode, vol_id: str, path: Path) -> None:
    node.kill_children()
    lazy_unmount(path)
    lazy_unmount(node.data_dir / "mnt" / vol_id)


# a. A replica cut off during a sustained write elsewhere gets exactly the blocks it missed


@pytest.mark.parametrize("ha_level", [2, 3])
def test_replica_cut_off_during_writes(
    cluster: NetnsCluster, tmp_path: Path, ha_level: int
) -> None:
    nodes = cluster.nodes
    name = f"cut{ha_level}"
    replicas = nodes[:ha_level]
    vol_id = _create(nodes[0], name, ha_level, replicas)
    survivor, victim = replicas[0], replicas[1]
    # The mount is on a node that stays on the network: the third, a replica only at ha 3.
    coordinator = nodes[2]
    path = tmp_path / "mnt"
    try:
        mount_on(coordinator, name, path)
        writer = Writer(path / "stream", WRITER_SECONDS, CHUNK, MAX_BYTES)
        time.sleep(WRITER_SECONDS / 3)
        cut_at = time.monotonic()
        cluster.cut(victim)
        writer.finish(WRITER_SECONDS + WRITER_SLACK)
        assert writer.failed is None, f"the writer failed with errno {writer.failed}"
        stall = writer.longest_gap(cut_at, writer.synced[-1][1])

        inspected = coordinator.call("volume.inspect", name)
        assert victim.node_id not in inspected["write_set"]
        assert len(inspected["write_set"]) == ha_level - 1
        assert inspected["out_of_sync"] == [victim.node_id]
        assert inspected["runtime_state"]["RuntimeState"] == "degraded"

        # Nothing writes to the volume now, and the victim's pxd stores nothing while cut off.
        missed = _differing(victim.versions(vol_id), survivor.versions(vol_id))
        cluster.heal(victim)
        record = _wait_in_sync(coordinator, name)
        assert sorted(record["write_set"]) == sorted(node.node_id for node in replicas)
        copied = _resynced(coordinator, name, victim)
        print(
            f"\nha {ha_level} replica cut off: longest fsync stall {stall:.2f} s; {missed} "
            f"blocks written during the cut, {copied} resynced after the heal; "
            f"{writer.length // MIB} MiB written"
        )
        assert copied == missed
        expected = hashlib.sha256(writer.expected()).hexdigest()
        assert sha256_prefix(path / "stream", writer.length) == expected
        _assert_verified(coordinator, name)
    finally:
        cluster.heal(victim)
        release_on(coordinator, name, path)
    _assert_replicas_identical(replicas, vol_id)
    nodes[0].call("volume.delete", name)


# b. The attached node cut off: it stops acknowledging, another node takes over, the old one
#    is fenced on heal


def test_attached_node_cut_off_and_fenced(cluster: NetnsCluster, tmp_path: Path) -> None:
    old, new, _ = cluster.nodes
    vol_id = _create(old, "fenced", 2, [old, new])
    old_path, new_path = tmp_path / "old", tmp_path / "new"
    payload = os.urandom(8 * MIB)
    kept = None
    try:
        mount_on(old, "fenced", old_path)
        epoch = old.call("volume.inspect", "fenced")["epoch"]
        # A file that stays open on the old node across the whole partition, as an
        # application's would.
        kept = open(old_path / "kept", "wb")
        writer = Writer(old_path / "stream", 120.0, CHUNK, MAX_BYTES)
        time.sleep(WRITER_SECONDS / 3)
        cut_at = time.monotonic()
        cluster.cut(old)

        # The old node can no longer record that its peer left the write set, so it must
        # not acknowledge another write.
        writer.finish(WRITE_FAIL_DEADLINE + WRITER_SLACK)
        assert writer.failed is not None, "the cut-off node acknowledged every write"
        failed_errno, failed_at = writer.failed
        assert failed_errno == errno.EIO
        write_failed = failed_at - cut_at
        assert write_failed < WRITE_FAIL_DEADLINE
        assert writer.length > 0, "the writer fsync'd nothing before the cut"

        def attach() -> bool:
            try:
                new.call("volume.attach", "fenced", timeout=2 * ETCD_TIMEOUT)
            except errors.Busy:
                return False
            return True

        wait_until(attach, OFFLINE_DEADLINE, "the volume stayed attached on the cut-off node")
        new_path.mkdir()
        new.call("volume.mount", "fenced", str(new_path))
        taken_over = time.monotonic() - cut_at
        record = new.call("volume.inspect", "fenced")
        assert record["epoch"] > epoch
        assert record["attached_on"] == new.node_id
        assert record["runtime_state"]["RuntimeState"] == "degraded"
        _write_synced(new_path / "after", payload)

        # Two nodes never both accept writes: the old one still fails them.
        with pytest.raises(OSError) as raised:
            kept.write(b"stale")
            kept.flush()
            os.fsync(kept.fileno())
        assert raised.value.errno == errno.EIO

        healed_at = time.monotonic()
        cluster.heal(old)
        # The old node learns of the takeover from etcd and stops its mount child.
        wait_until(lambda: not old.child_pids(), FENCE_DEADLINE, "the old mount child runs on")
        fenced = time.monotonic() - healed_at
        assert not _mounted(old_path)
        assert not _mounted(old.data_dir / "mnt" / vol_id)
        with pytest.raises(OSError):
            kept.write(b"stale")
            kept.flush()
            os.fsync(kept.fileno())

        record = _wait_in_sync(new, "fenced")
        assert sorted(record["write_set"]) == sorted([old.node_id, new.node_id])
        assert record["attached_on"] == new.node_id
        assert _stale_write_refused(old, vol_id, epoch), "the old replica took a stale write"
        copied = _resynced(new, "fenced", old)
        expected = hashlib.sha256(writer.expected()).hexdigest()
        assert sha256_prefix(new_path / "stream", writer.length) == expected
        assert sha256_file(new_path / "after") == hashlib.sha256(payload).hexdigest()
        kept_there = new_path / "kept"
        assert not kept_there.exists() or not kept_there.read_bytes()
        _assert_verified(new, "fenced")
        print(
            f"\nattached node cut off: its writes failed with EIO {write_failed:.1f} s after "
            f"the cut; mounted on the other node {taken_over:.1f} s after the cut; the old "
            f"mount child stopped {fenced:.1f} s after the heal; {copied} blocks resynced to "
            f"the old replica; {writer.length // MIB} MiB fsync'd before the cut all there"
        )
    finally:
        if kept is not None:
            try:
                kept.close()
            except OSError:
                pass
        cluster.heal(old)
        _cleanup_old_mount(old, vol_id, old_path)
        release_on(new, "fenced", new_path)
    _assert_replicas_identical([old, new], vol_id)
    new.call("volume.delete", "fenced")


# c and d. A node without a replica cut off: I/O goes on; healed, it is back in the cluster


def test_node_without_replica_cut_off_and_healed(cluster: NetnsCluster, tmp_path: Path) -> None:
    first, second, bystander = cluster.nodes
    vol_id = _create(first, "bystander", 2, [first, second])
    path = tmp_path / "mnt"
    try:
        mount_on(first, "bystander", path)
        writer = Writer(path / "stream", WRITER_SECONDS, CHUNK, MAX_BYTES)
        time.sleep(WRITER_SECONDS / 3)
        cut_at = time.monotonic()
        cluster.cut(bystander)
        writer.finish(WRITER_SECONDS + WRITER_SLACK)
        assert writer.failed is None, f"the writer failed with errno {writer.failed}"
        stall = writer.longest_gap(cut_at, writer.synced[-1][1])
        # A write that waited for an unreachable replica would stall for its whole timeout.
        assert stall < DEFAULT_TIMEOUT - 1
        expected = hashlib.sha256(writer.expected()).hexdigest()
        assert sha256_prefix(path / "stream", writer.length) == expected
        record = first.call("volume.inspect", "bystander")
        assert sorted(record["write_set"]) == sorted([first.node_id, second.node_id])
        assert record["runtime_state"]["RuntimeState"] == "clean"

        wait_until(
            lambda: bystander.node_id not in (_online_ids(first) or {bystander.node_id}),
            OFFLINE_DEADLINE,
            "the cut-off node still shows online",
        )
        healed_at = time.monotonic()
        cluster.heal(bystander)

        every = {node.node_id for node in cluster.nodes}

        def rejoined() -> bool:
            if any(_online_ids(viewer) != every for viewer in cluster.nodes):
                return False
            listed = [_volume_ids(node) for node in cluster.nodes]
            return listed[0] is not None and all(ids == listed[0] for ids in listed)

        wait_until(rejoined, HEAL_DEADLINE, "the healed node did not rejoin the cluster")
        back = time.monotonic() - healed_at
        assert vol_id in (_volume_ids(bystander) or [])
        assert bystander.call("node.status")["status"] == "up"
        print(
            f"\nnode without a replica cut off: longest fsync stall {stall:.2f} s; online on "
            f"every node {back:.1f} s after the heal"
        )
    finally:
        cluster.heal(bystander)
        release_on(first, "bystander", path)
    _assert_verified(first, "bystander")
    first.call("volume.delete", "bystander")


# A raise of the ha level interrupted by a restart of pxd resumes by itself


def _wait_for_ha(node: ClusterNode, name: str, ha_level: int) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        record: dict[str, Any] = node.call("volume.inspect", name)
        if record["ha_level"] == ha_level and "replica_nodes_next" not in record:
            return record
        return None

    found: dict[str, Any] = wait_until(done, COPY_DEADLINE, f"ha level {ha_level} not reached")
    return found


def test_raise_resumes_after_pxd_restart(cluster: NetnsCluster, tmp_path: Path) -> None:
    first, second, _ = cluster.nodes
    vol_id = _create(first, "resumed", 1, [first])
    path = tmp_path / "mnt"
    payload = os.urandom(128 * MIB)
    try:
        mount_on(first, "resumed", path)
        _write_synced(path / "blob", payload)
        first.call("volume.update", "resumed", {"ha_level": 2, "nodes": [second.node_id]})
        # Cut off, the new replica cannot get its copy, so the raise is still running when pxd
        # stops. After the restart nothing but pxd itself goes on with it: no mount, no update.
        cluster.cut(second)
        assert "replica_nodes_next" in first.call("volume.inspect", "resumed")
        assert first.stop() == 0
        first.start()
        record = first.call("volume.inspect", "resumed")
        assert record["ha_level"] == 1
        assert record["replica_nodes_next"] == [first.node_id, second.node_id]
        cluster.heal(second)

        record = _wait_for_ha(first, "resumed", 2)
        assert record["replica_nodes"] == [first.node_id, second.node_id]
        record = _wait_in_sync(first, "resumed")
        assert sha256_file(path / "blob") == hashlib.sha256(payload).hexdigest()
        _assert_verified(first, "resumed")
    finally:
        cluster.heal(second)
        release_on(first, "resumed", path)
    _assert_replicas_identical([first, second], vol_id)
    first.call("volume.delete", "resumed")


# The launcher: tools/cluster start --netns, cut, heal and stop


def _cluster_tool(*args: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "cluster"), *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def _netns_names() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}


def _link_up(netns: str, link: str) -> bool:
    """Whether `link` in namespace `netns` is administratively up."""
    shown = subprocess.run(
        ["ip", "-n", netns, "-o", "link", "show", link], capture_output=True, text=True, check=True
    )
    flags = shown.stdout.partition("<")[2].partition(">")[0].split(",")
    return "UP" in flags


def test_launcher_netns_cut_heal_stop(tmp_path: Path) -> None:
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed")
    directory = tmp_path / "launched"
    started = _cluster_tool("start", "2", "--netns", "--dir", str(directory))
    assert started.returncode == 0, started.stderr
    netns = json.loads((directory / "cluster.json").read_text())["netns"]
    try:
        assert set(netns["namespaces"]) <= _netns_names()
        assert all(name.startswith("pxt") for name in netns["namespaces"] + netns["links"])
        # Both nodes registered through the hub's etcd, which only the namespaces reach.
        with BlockingClient(directory / "node1" / "run" / "pxd.sock") as client:
            listed = client.call("cluster.nodes")
        assert sorted(node["ip"] for node in listed) == ["10.213.0.2", "10.213.0.3"]

        link = netns["links"][0]
        assert _cluster_tool("cut", "1", "--dir", str(directory)).returncode == 0
        assert not _link_up(netns["hub"], link)
        assert _cluster_tool("heal", "1", "--dir", str(directory)).returncode == 0
        assert _link_up(netns["hub"], link)
        refused = _cluster_tool("cut", "3", "--dir", str(directory))
        assert refused.returncode == 1
        assert "no node 3" in refused.stderr
    finally:
        stopped = _cluster_tool("stop", "--dir", str(directory))
    assert stopped.returncode == 0, stopped.stderr
    assert not set(netns["namespaces"]) & _netns_names()
