"""Read repair, pxctl volume verify and volume scrub on a cluster of real pxd processes.

Bit rot is made by flipping a byte of a written block in a replica's data file under
DIR/replicas/, with the volume unmounted so that no block cache holds the block, and the
kernel's page cache dropped.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusterproc import REPO, Cluster, ClusterNode
from nodeproc import is_mountpoint

from pxfs import errors
from pxfs.cliformat import scrub_lines, scrub_summary, verify_lines
from pxfs.config import load_config

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for FUSE mounts")

MIB = 1 << 20
BLOCK = 65536
#: The bytes of the test file: 16 blocks, so the file's data has blocks of its own.
FILE_SIZE = 16 * BLOCK
#: How long the periodic scrub of a test node (every 3 s) may take to repair a block.
PERIODIC_DEADLINE = 60.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("scrub"), 3)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def pxctl(node: ClusterNode, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pxfs.cli", "--socket", str(node.socket), *args],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def create_volume(nodes: list[ClusterNode], name: str) -> str:
    spec = {
        "name": name,
        "size": 64 * MIB,
        "ha_level": len(nodes),
        "labels": {},
        "nodes": [node.node_id for node in nodes],
    }
    record = nodes[0].call("volume.create", spec)
    return str(record["id"])


def write_file(node: ClusterNode, name: str, mountpoint: Path, payload: bytes) -> None:
    """Mount the volume on `node`, write `payload` to a file, fsync, unmount and detach."""
    node.call("volume.attach", name)
    node.call("volume.mount", name, str(mountpoint))
    try:
        with open(mountpoint / "file", "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
    finally:
        unmount(node, name, mountpoint)


def read_file(node: ClusterNode, name: str, mountpoint: Path) -> bytes:
    """Mount the volume on `node`, read the file, unmount and detach."""
    node.call("volume.attach", name)
    node.call("volume.mount", name, str(mountpoint))
    try:
        return (mountpoint / "file").read_bytes()
    finally:
        unmount(node, name, mountpoint)


def unmount(node: ClusterNode, name: str, mountpoint: Path) -> None:
    if is_mountpoint(mountpoint):
        node.call("volume.unmount", name, str(mountpoint))
    node.call("volume.detach", name)


def find_block(node: ClusterNode, vol_id: str, content: bytes) -> int:
    """Return the block of `node`'s replica whose data is `content`."""
    with open(node.replica_dir(vol_id) / "data", "rb") as f:
        blockno = 0
        while chunk := f.read(BLOCK):
            if chunk == content:
                return blockno
            blockno += 1
    raise AssertionError(f"no block of the replica on {node.ip} contains the expected data")


def stored_block(node: ClusterNode, vol_id: str, blockno: int) -> bytes:
    with open(node.replica_dir(vol_id) / "data", "rb") as f:
        f.seek(blockno * BLOCK)
        return f.read(BLOCK)


def flip_byte(node: ClusterNode, vol_id: str, blockno: int) -> None:
    drop_caches()
    with open(node.replica_dir(vol_id) / "data", "r+b") as f:
        f.seek(blockno * BLOCK + 4321)
        byte = f.read(1)
        f.seek(blockno * BLOCK + 4321)
        f.write(bytes([byte[0] ^ 0xA5]))
        f.flush()
        os.fsync(f.fileno())


def written_volume(nodes: list[ClusterNode], name: str, mountpoint: Path) -> tuple[str, bytes, int]:
    """Create a volume on `nodes`, write the test file; return its id, payload and first block."""
    vol_id = create_volume(nodes, name)
    payload = os.urandom(FILE_SIZE)
    write_file(nodes[0], name, mountpoint, payload)
    blockno = find_block(nodes[0], vol_id, payload[:BLOCK])
    for node in nodes[1:]:
        assert stored_block(node, vol_id, blockno) == payload[:BLOCK], node.ip
    return vol_id, payload, blockno


@pytest.fixture
def mountpoint(tmp_path: Path) -> Path:
    path = tmp_path / "mnt"
    path.mkdir()
    return path


@pytest.mark.parametrize("ha_level", [2, 3])
def test_read_repairs_rotten_copy(cluster: Cluster, mountpoint: Path, ha_level: int) -> None:
    nodes = cluster.nodes[:ha_level]
    name = f"readrepair{ha_level}"
    vol_id, payload, blockno = written_volume(nodes, name, mountpoint)
    # The mount on nodes[0] reads its local replica first, so the read meets the bad copy.
    flip_byte(nodes[0], vol_id, blockno)
    assert stored_block(nodes[0], vol_id, blockno) != payload[:BLOCK]

    assert read_file(nodes[0], name, mountpoint) == payload
    assert stored_block(nodes[0], vol_id, blockno) == payload[:BLOCK]
    assert f"repaired block {blockno} " in nodes[0].log_text()
    assert pxctl(nodes[0], "volume", "verify", "--check-data", name).returncode == 0
    nodes[0].call("volume.delete", name)


def test_every_copy_bad_read_fails_eio(cluster: Cluster, mountpoint: Path) -> None:
    nodes = cluster.nodes[:2]
    vol_id, _, blockno = written_volume(nodes, "allbad", mountpoint)
    for node in nodes:
        flip_byte(node, vol_id, blockno)
    rotten = [stored_block(node, vol_id, blockno) for node in nodes]

    nodes[0].call("volume.attach", "allbad")
    nodes[0].call("volume.mount", "allbad", str(mountpoint))
    try:
        with pytest.raises(OSError) as caught:
            (mountpoint / "file").read_bytes()
        assert caught.value.errno == errno.EIO
    finally:
        unmount(nodes[0], "allbad", mountpoint)
    # No copy was overwritten with data that fails its checksum.
    assert [stored_block(node, vol_id, blockno) for node in nodes] == rotten

    scrubbed = pxctl(nodes[0], "volume", "scrub", "allbad")
    assert scrubbed.returncode == 1, scrubbed.stdout + scrubbed.stderr
    assert "lost 1," in scrubbed.stdout
    assert f"lost block {blockno} on node {nodes[0].node_id}" in scrubbed.stdout
    assert f"lost block {blockno} on node {nodes[1].node_id}" in scrubbed.stdout
    assert [stored_block(node, vol_id, blockno) for node in nodes] == rotten
    assert nodes[0].call("volume.inspect", "allbad")["scrub"]["lost_blocks"] == 1
    nodes[0].call("volume.delete", "allbad")


@pytest.mark.parametrize("ha_level", [2, 3])
def test_scrub_repairs_unread_block(cluster: Cluster, mountpoint: Path, ha_level: int) -> None:
    nodes = cluster.nodes[:ha_level]
    name = f"scrub{ha_level}"
    vol_id, payload, blockno = written_volume(nodes, name, mountpoint)
    rotten = nodes[-1]
    flip_byte(rotten, vol_id, blockno)

    before = pxctl(nodes[0], "volume", "verify", "--check-data", name)
    assert before.returncode == 1, before.stdout + before.stderr
    assert "1 of" in before.stdout
    assert f"block {blockno}: " in before.stdout
    assert "data fails its checksum" in before.stdout
    # The tables still agree, so only a verify that reads the data detects the rot.
    assert pxctl(nodes[0], "volume", "verify", name).returncode == 0

    scrubbed = pxctl(nodes[0], "volume", "scrub", name)
    assert scrubbed.returncode == 0, scrubbed.stdout + scrubbed.stderr
    assert "repaired 1," in scrubbed.stdout
    assert f"repaired block {blockno} on node {rotten.node_id}" in scrubbed.stdout
    assert stored_block(rotten, vol_id, blockno) == payload[:BLOCK]
    assert f"scrub repaired block {blockno} " in nodes[0].log_text()

    after = pxctl(nodes[0], "volume", "verify", "--check-data", name)
    assert after.returncode == 0, after.stdout + after.stderr
    assert "identical" in after.stdout
    scrub = nodes[0].call("volume.inspect", name)["scrub"]
    assert scrub["runs"] == 1
    assert scrub["repaired_blocks"] == 1
    assert scrub["lost_blocks"] == 0
    inspected = pxctl(nodes[1], "volume", "inspect", name)
    assert "repaired 1 blocks" in inspected.stdout
    nodes[0].call("volume.delete", name)


def test_scrub_of_mounted_volume(cluster: Cluster, mountpoint: Path) -> None:
    nodes = cluster.nodes[:2]
    vol_id, payload, blockno = written_volume(nodes, "mountedscrub", mountpoint)
    flip_byte(nodes[1], vol_id, blockno)
    nodes[0].call("volume.attach", "mountedscrub")
    nodes[0].call("volume.mount", "mountedscrub", str(mountpoint))
    try:
        result = nodes[0].call("volume.scrub", "mountedscrub")
        assert result["repaired"] == [[blockno, nodes[1].node_id]]
        # The volume stays writable and readable after the scrub.
        with open(mountpoint / "more", "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        assert (mountpoint / "file").read_bytes() == payload
        verified = nodes[0].call("volume.verify", "mountedscrub", True)
        assert verified["identical"] is True, verified
    finally:
        unmount(nodes[0], "mountedscrub", mountpoint)
    assert stored_block(nodes[1], vol_id, blockno) == payload[:BLOCK]
    nodes[0].call("volume.delete", "mountedscrub")


def test_verify_healthy_then_node_down(cluster: Cluster, mountpoint: Path) -> None:
    nodes = cluster.nodes[:3]
    written_volume(nodes, "healthy", mountpoint)
    healthy = pxctl(nodes[0], "volume", "verify", "--check-data", "healthy")
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert "the 3 replicas are identical" in healthy.stdout

    assert nodes[2].stop() == 0
    try:
        down = pxctl(nodes[0], "volume", "verify", "healthy")
        assert down.returncode == errors.Unavailable.exit_code, down.stdout + down.stderr
        assert down.returncode != 0
        assert nodes[2].node_id in down.stderr
        with pytest.raises(errors.Unavailable, match=nodes[2].node_id):
            nodes[0].call("volume.scrub", "healthy")
    finally:
        nodes[2].start()
    assert pxctl(nodes[0], "volume", "verify", "healthy").returncode == 0
    nodes[0].call("volume.delete", "healthy")


class PeriodicScrubNode(ClusterNode):
    """A cluster node whose pxd scrubs every volume every 3 s."""

    def write_config(self) -> None:
        super().write_config()
        with open(self.config_file, "a") as f:
            f.write("scrub_interval_seconds = 3\nscrub_rate_mib = 64\n")


def test_periodic_scrub_repairs_rot(
    tmp_path_factory: pytest.TempPathFactory, mountpoint: Path
) -> None:
    # A short root, because the mount child's control socket path is limited to 107 bytes.
    root = tmp_path_factory.mktemp("periodic")
    cluster = Cluster(root, 0)
    try:
        cluster.start()
        assert cluster.etcd is not None
        for index in range(2):
            node = PeriodicScrubNode(
                root / f"node{index + 1}",
                f"127.0.0.{index + 6}",
                cluster.etcd.endpoint,
                cluster.secret_file,
            )
            cluster.nodes.append(node)
            node.start()
        nodes = cluster.nodes
        assert load_config(nodes[0].config_file).scrub_interval_seconds == 3.0
        vol_id, payload, blockno = written_volume(nodes, "periodic", mountpoint)
        flip_byte(nodes[1], vol_id, blockno)

        deadline = time.monotonic() + PERIODIC_DEADLINE
        while stored_block(nodes[1], vol_id, blockno) != payload[:BLOCK]:
            assert time.monotonic() < deadline, "the periodic scrub did not repair the block"
            time.sleep(0.5)
        # The repair lands before the run ends and records its figures.
        while "scrub" not in (inspected := nodes[0].call("volume.inspect", "periodic")):
            assert time.monotonic() < deadline, "the periodic scrub recorded no run"
            time.sleep(0.5)
        scrub = inspected["scrub"]
        assert scrub["repaired_blocks"] == 1
        assert scrub["runs"] >= 1
        # The first online replica node scrubs the volume, and only it.
        assert f"scrub repaired block {blockno} " in nodes[0].log_text()
        assert "periodic scrub: every 3 s at 64 MiB/s" in nodes[1].log_text()
        assert "scrub repaired block" not in nodes[1].log_text()
    finally:
        cluster.stop()


# The configuration keys


def test_scrub_keys_default_and_parse(tmp_path: Path) -> None:
    path = tmp_path / "pxd.toml"
    path.write_text("")
    defaults = load_config(path)
    assert defaults.scrub_interval_seconds == 7 * 24 * 3600
    assert defaults.scrub_rate_mib == 4.0
    path.write_text("scrub_interval_seconds = 0\nscrub_rate_mib = 0.5\n")
    parsed = load_config(path)
    assert parsed.scrub_interval_seconds == 0.0
    assert parsed.scrub_rate_mib == 0.5


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("scrub_interval_seconds = -1", "0 \\(off\\) or more seconds"),
        ("scrub_interval_seconds = true", "must be a number"),
        ('scrub_rate_mib = "4"', "must be a number"),
        ("scrub_rate_mib = 0", "more than 0 MiB/s"),
    ],
)
def test_scrub_keys_invalid(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "pxd.toml"
    path.write_text(line + "\n")
    with pytest.raises(errors.InvalidArgument, match=message):
        load_config(path)


# The text of pxctl


def test_verify_lines_identical_and_differing() -> None:
    identical = {"identical": True, "replicas": ["a", "b"], "allocated_blocks": 5}
    assert verify_lines("v", identical) == [
        "Volume v: the 2 replicas are identical (5 allocated blocks)"
    ]
    differing = {
        "identical": False,
        "replicas": ["a", "b"],
        "allocated_blocks": 5,
        "differing_blocks": 3,
        "problems": ["the replicas have different sizes: a 16 blocks, b 32 blocks"],
        "differences": [
            {"block": 7, "copies": {"b": "unwritten", "a": "version 1 crc32 00000002"}}
        ],
    }
    assert verify_lines("v", differing) == [
        "Volume v: 3 of 5 allocated blocks differ between replicas",
        "  the replicas have different sizes: a 16 blocks, b 32 blocks",
        "  block 7: a version 1 crc32 00000002; b unwritten",
        "  and 2 more blocks",
    ]


def test_scrub_lines_lists_repairs_and_losses() -> None:
    result = {
        "checked_blocks": 40,
        "repaired_blocks": 2,
        "repaired": [[3, "a"]],
        "lost_blocks": 1,
        "lost": [[9, "a"], [9, "b"]],
        "skipped_blocks": 0,
    }
    assert scrub_lines("v", result) == [
        "Volume v: checked 40 block copies, repaired 2, lost 1, skipped 0",
        "  repaired block 3 on node a",
        "  and 1 more repaired blocks",
        "  lost block 9 on node a",
        "  lost block 9 on node b",
    ]


def test_scrub_summary_of_record() -> None:
    assert scrub_summary(None) == "never"
    assert scrub_summary({"runs": 0}) == "never"
    summary = scrub_summary({"runs": 2, "last_ns": 10**18, "repaired_blocks": 3, "lost_blocks": 0})
    assert summary == "last Sep 09 01:46:40 UTC 2001, 2 runs, repaired 3 blocks, lost 0"
