"""The sidecar's resize, stats, metrics and cluster routes against a real pxd and FUSE mount.

One pxd and one pxd-sidecar serve the whole module, each test on its own volume. pxd samples
the mount child's I/O counters about once a second, so the stats checks poll with a deadline.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nodeproc import Node
from prometheus_client.parser import text_string_to_metric_families

MIB = 1 << 20
SAMPLE_DEADLINE = 15.0

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"
)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A real pxd with its sidecar, stopped and unmounted after the module."""
    root = tmp_path_factory.mktemp("api-e2e")
    node = Node(root / "node")
    node.start()
    node.start_sidecar()
    yield node
    node.cleanup(sorted(root.glob("mnt-*")))


@pytest.fixture
def mounted(node: Node, request: pytest.FixtureRequest) -> Iterator[tuple[str, Path]]:
    """A 64 MiB volume created, attached and mounted through REST; (id, mountpoint)."""
    name = request.node.name.replace("_", "-")[:60]
    mountpoint = node.root.parent / f"mnt-{name}"
    mountpoint.mkdir()
    body = {"locator": {"name": name}, "spec": {"size": 64 * MIB}}
    status, reply = node.rest("POST", "/v1/osd-volumes", body)
    assert status == 200, reply
    volume_id = reply["id"]
    action = {"action": {"attach": 2, "mount": 2, "mount_path": str(mountpoint)}}
    status, reply = node.rest("PUT", f"/v1/osd-volumes/{volume_id}", action)
    assert reply["volume_response"] == {}, reply
    yield volume_id, mountpoint
    release = {"action": {"attach": 1}, "options": {"UNMOUNT_BEFORE_DETACH": "true"}}
    node.rest("PUT", f"/v1/osd-volumes/{volume_id}", release)
    node.rest("DELETE", f"/v1/osd-volumes/{volume_id}")


def df_size(path: Path) -> int:
    """The size in bytes that df reports for the filesystem at `path`."""
    output = subprocess.run(
        ["df", "-B1", "--output=size", str(path)], capture_output=True, text=True, check=True
    ).stdout
    return int(output.split()[-1])


def write_with_dd(path: Path, mebibytes: int) -> None:
    """Write `mebibytes` MiB of random data to `path` with dd and fsync it."""
    subprocess.run(
        ["dd", "if=/dev/urandom", f"of={path}", "bs=1M", f"count={mebibytes}", "conv=fsync"],
        capture_output=True,
        check=True,
        timeout=60,
    )


def poll(read: Callable[[], Any], accept: Callable[[Any], bool], failure: str) -> Any:
    """Call `read` until `accept` takes its result or SAMPLE_DEADLINE passes."""
    deadline = time.monotonic() + SAMPLE_DEADLINE
    value = read()
    while not accept(value):
        if time.monotonic() > deadline:
            raise AssertionError(f"{failure} within {SAMPLE_DEADLINE:g} s; last value: {value!r}")
        time.sleep(0.2)
        value = read()
    return value


def get_json(node: Node, path: str) -> Any:
    """GET `path` from the sidecar and return the decoded reply; fails on a non-200 status."""
    status, reply = node.rest("GET", path)
    assert status == 200, (path, reply)
    return reply


def test_put_resize_mounted_volume(node: Node, mounted: tuple[str, Path]) -> None:
    volume_id, mountpoint = mounted
    before = df_size(mountpoint)
    (mountpoint / "kept").write_bytes(b"data")

    status, reply = node.rest("PUT", f"/v1/osd-volumes/{volume_id}", {"spec": {"size": 256 * MIB}})

    assert status == 200, reply
    assert reply["volume_response"] == {}
    assert reply["volume"]["spec"]["size"] == 256 * MIB
    assert df_size(mountpoint) - before == 192 * MIB
    assert (mountpoint / "kept").read_bytes() == b"data"


def test_put_shrink_rejected(node: Node, mounted: tuple[str, Path]) -> None:
    volume_id, mountpoint = mounted
    before = df_size(mountpoint)
    status, reply = node.rest("PUT", f"/v1/osd-volumes/{volume_id}", {"spec": {"size": 32 * MIB}})
    assert status == 400
    assert "shrinking is not supported" in reply
    assert df_size(mountpoint) == before


def test_put_labels_real(node: Node, mounted: tuple[str, Path]) -> None:
    volume_id, _ = mounted
    body = {"locator": {"volume_labels": {"app": "db"}}}
    status, reply = node.rest("PUT", f"/v1/osd-volumes/{volume_id}", body)
    assert status == 200, reply
    assert reply["volume"]["locator"]["volume_labels"] == {"app": "db"}
    assert node.call("volume.inspect", volume_id)["labels"] == {"app": "db"}


def test_stats_after_dd(node: Node, mounted: tuple[str, Path]) -> None:
    volume_id, mountpoint = mounted
    write_with_dd(mountpoint / "data", 4)

    stats = poll(
        lambda: get_json(node, f"/v1/osd-volumes/stats/{volume_id}"),
        lambda stats: stats.get("write_bytes", 0) >= 4 * MIB,
        "cumulative write_bytes did not reach 4 MiB",
    )
    assert stats["writes"] >= 4
    assert stats["interval_ms"] > 0
    assert stats["bytes_used"] >= 4 * MIB
    assert get_json(node, f"/v1/osd-volumes/usedsize/{volume_id}") >= 4 * MIB


def test_statslive_sees_recent_writes(node: Node, mounted: tuple[str, Path]) -> None:
    volume_id, mountpoint = mounted
    path = f"/statslive?volumeid={volume_id}&stattype=volstat"
    write_with_dd(mountpoint / "data", 4)

    live = poll(
        lambda: get_json(node, path),
        lambda stats: stats.get("write_bytes", 0) >= 4 * MIB,
        "statslive write_bytes did not reach 4 MiB",
    )
    assert 1000 <= live["interval_ms"] <= 3000
    assert live["writes"] >= 4

    idle = poll(
        lambda: get_json(node, path),
        lambda stats: "write_bytes" not in stats,
        "statslive did not return to zero writes",
    )
    assert idle["bytes_used"] >= 4 * MIB


def test_statshistory_counts_writes(node: Node, mounted: tuple[str, Path]) -> None:
    volume_id, mountpoint = mounted
    write_with_dd(mountpoint / "data", 4)

    history = poll(
        lambda: get_json(node, f"/statshistory?volumeid={volume_id}&stattype=volstat"),
        lambda history: sum(entry.get("write_bytes", 0) for entry in history["hourly"]) >= 4 * MIB,
        "the hourly history did not reach 4 MiB written",
    )
    assert set(history) == {"hourly", "daily", "monthly"}
    assert history["hourly"][-1]["start"].endswith(":00:00Z")


def scrape(node: Node) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics and return {(name, sorted labels): value}."""
    url = f"http://127.0.0.1:{node.rest_port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_contain_volume(node: Node, mounted: tuple[str, Path]) -> None:
    volume_id, mountpoint = mounted
    name = node.call("volume.inspect", volume_id)["name"]
    labels = (("volume_id", volume_id), ("volume_name", name))
    write_with_dd(mountpoint / "data", 4)

    samples = poll(
        lambda: scrape(node),
        lambda samples: samples.get(("pxfs_volume_written_bytes_total", labels), 0) >= 4 * MIB,
        "pxfs_volume_written_bytes_total did not reach 4 MiB",
    )
    assert samples[("pxfs_up", ())] == 1
    assert samples[("pxfs_volume_size_bytes", labels)] == 64 * MIB
    assert samples[("pxfs_volume_writes_total", labels)] >= 4
    node_id = node.call("node.status")["node_id"]
    assert samples[("pxfs_volume_replica_in_sync", (("node_id", node_id), *labels))] == 1
    node_labels = [key for key in samples if key[0] == "pxfs_node_capacity_bytes"]
    assert len(node_labels) == 1
    assert samples[node_labels[0]] > 0


def test_cluster_enumerate_and_inspect(node: Node) -> None:
    status = node.call("node.status")
    cluster = get_json(node, "/v1/cluster/enumerate")
    assert cluster["NodeId"] == status["node_id"]
    assert cluster["Status"] == 2
    assert [entry["Id"] for entry in cluster["Nodes"]] == [status["node_id"]]
    own = cluster["Nodes"][0]
    assert own["Hostname"] == status["hostname"]
    assert own["Pools"][0]["TotalSize"] == status["capacity_bytes"]
    inspected = get_json(node, f"/v1/cluster/inspect/{status['node_id']}")
    assert inspected["Id"] == status["node_id"]
    assert node.rest("GET", "/v1/cluster/inspect/no-such-node")[0] == 400


def test_pxctl_stats_inspect_cluster(node: Node, mounted: tuple[str, Path]) -> None:
    volume_id, mountpoint = mounted
    write_with_dd(mountpoint / "data", 4)
    poll(
        lambda: node.call("volume.stats", volume_id, True)["write_bytes"],
        lambda written: written >= 4 * MIB,
        "volume.stats write_bytes did not reach 4 MiB",
    )

    inspect = node.pxctl("volume", "inspect", volume_id, check=True).stdout
    written = [line for line in inspect.splitlines() if line.strip().startswith("Bytes Written")]
    assert int(written[0].split(":")[1]) >= 4 * MIB

    stats = node.pxctl("volume", "stats", volume_id, "--count", "2", "--interval", "0.5")
    assert stats.returncode == 0, stats.stderr
    assert len(stats.stdout.splitlines()) == 3

    cluster = node.pxctl("cluster", "list", check=True).stdout.splitlines()
    assert len(cluster) == 2
    assert cluster[1].endswith("Online")

    before = df_size(mountpoint)
    update = node.pxctl("volume", "update", "--size", "128M", volume_id)
    assert update.returncode == 0, update.stderr
    assert df_size(mountpoint) - before == 64 * MIB
