"""volume.stats, stats_live, stats_history and cluster.nodes on a real pxd with FUSE mounts."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nodeproc import Node

from pxfs import errors

MIB = 1 << 20
STATS_KEYS = {
    "reads", "read_ms", "read_bytes", "writes", "write_ms", "write_bytes",
    "io_progress", "io_ms", "bytes_used", "interval_ms",
}  # fmt: skip
HISTORY_KEYS = {
    "start", "reads", "read_ms", "read_bytes", "writes", "write_ms", "write_bytes", "io_ms",
}  # fmt: skip

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"
)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    """A running pxd on tmp_path, stopped and cleaned up afterwards."""
    node = Node(tmp_path / "n")
    node.start()
    yield node
    node.cleanup([tmp_path / "mnt"])


def wait_for(condition: Callable[[], Any], description: str, timeout: float = 20.0) -> Any:
    """Poll `condition` until it returns something true; return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {description}")


def write_file(path: Path, nbytes: int) -> None:
    """Write `nbytes` to `path` and fsync, so that the writes reach the mount child."""
    with open(path, "wb") as f:
        f.write(os.urandom(nbytes))
        f.flush()
        os.fsync(f.fileno())


def stats(node: Node, name: str, cumulative: bool = True) -> dict[str, int]:
    result: dict[str, int] = node.call("volume.stats", name, cumulative)
    return result


def test_stats_count_real_io(node: Node, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    node.mount_volume("io", mnt, size=64 * MIB)
    write_file(mnt / "data", 4 * MIB)
    written = wait_for(
        lambda: (s := stats(node, "io"))["write_bytes"] >= 4 * MIB and s, "4 MiB of writes"
    )
    assert set(written) == STATS_KEYS
    assert written["writes"] >= 1
    assert written["write_bytes"] < 8 * MIB
    assert written["io_ms"] >= written["write_ms"] // 64
    assert written["bytes_used"] >= 4 * MIB
    assert written["interval_ms"] > 0

    # A new mount child starts with a cold page cache, so the reads reach FUSE.
    node.call("volume.unmount", "io", str(mnt))
    node.call("volume.mount", "io", str(mnt))
    assert len((mnt / "data").read_bytes()) == 4 * MIB
    read = wait_for(
        lambda: (s := stats(node, "io"))["read_bytes"] >= 4 * MIB and s, "4 MiB of reads"
    )
    assert read["reads"] >= 1
    assert read["write_bytes"] >= written["write_bytes"]


def test_live_stats_follow_io(node: Node, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    node.mount_volume("live", mnt, size=64 * MIB)
    stop = threading.Event()

    def writer() -> None:
        # Bounded: at most 200 rounds of 256 KiB, and it stops once the test has its sample.
        for round_number in range(200):
            if stop.is_set():
                return
            write_file(mnt / f"f{round_number % 4}", 256 * 1024)
            time.sleep(0.05)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        live = wait_for(
            lambda: (s := node.call("volume.stats_live", "live"))["writes"] > 0 and s,
            "live writes",
        )
    finally:
        stop.set()
        thread.join(timeout=30)
    assert set(live) == STATS_KEYS
    assert 900 <= live["interval_ms"] <= 3000
    assert live["write_bytes"] > 0
    assert live["bytes_used"] > 0
    assert stats(node, "live", False).keys() == STATS_KEYS

    idle = wait_for(
        lambda: (s := node.call("volume.stats_live", "live"))["writes"] == 0 and s, "idle window"
    )
    assert idle["write_bytes"] == 0
    assert idle["io_progress"] == 0
    assert stats(node, "live")["writes"] >= live["writes"]


def test_unmounted_volume_stats(node: Node) -> None:
    node.call("volume.create", {"name": "idle", "size": 64 * MIB, "ha_level": 1, "labels": {}})
    live = node.call("volume.stats_live", "idle")
    assert live["interval_ms"] == 2000
    assert live["bytes_used"] > 0
    assert all(live[key] == 0 for key in STATS_KEYS - {"interval_ms", "bytes_used"})
    total = stats(node, "idle")
    assert total["reads"] == 0
    assert total["interval_ms"] >= 0
    assert node.call("volume.stats_history", "idle") == {"hourly": [], "daily": [], "monthly": []}


def test_stats_survive_pxd_restart(node: Node, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    vol_id = node.mount_volume("keep", mnt, size=64 * MIB)
    write_file(mnt / "data", 2 * MIB)
    wait_for(lambda: stats(node, "keep")["write_bytes"] >= 2 * MIB, "2 MiB of writes")
    node.stop()
    saved = json.loads((node.data_dir / "stats" / f"{vol_id}.json").read_text())
    assert saved["totals"]["write_bytes"] >= 2 * MIB

    node.start()
    after = stats(node, "keep")
    assert after["write_bytes"] >= 2 * MIB
    write_file(mnt / "more", MIB)
    wait_for(lambda: stats(node, "keep")["write_bytes"] >= after["write_bytes"] + MIB, "1 MiB more")

    history = node.call("volume.stats_history", "keep")
    assert set(history) == {"hourly", "daily", "monthly"}
    [hour] = history["hourly"]
    assert set(hour) == HISTORY_KEYS
    assert hour["start"] == time.strftime("%Y-%m-%dT%H:00:00Z", time.gmtime())
    assert hour["write_bytes"] >= 3 * MIB


def test_stats_survive_child_restart(node: Node, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    node.mount_volume("crash", mnt, size=64 * MIB)
    write_file(mnt / "data", 2 * MIB)
    before = wait_for(
        lambda: (s := stats(node, "crash"))["write_bytes"] >= 2 * MIB and s, "2 MiB of writes"
    )
    [pid] = node.mount_child_pids()
    os.kill(pid, signal.SIGKILL)
    wait_for(
        lambda: (
            node.mount_child_pids() not in ([], [pid])
            and node.call("volume.inspect", "crash")["mounted"]
        ),
        "the restarted mount child",
    )
    assert stats(node, "crash")["write_bytes"] >= before["write_bytes"]
    write_file(mnt / "more", MIB)
    wait_for(
        lambda: stats(node, "crash")["write_bytes"] >= before["write_bytes"] + MIB,
        "writes of the new child added to the totals",
    )


def test_stopped_child_does_not_block_calls(node: Node, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    node.mount_volume("stuck", mnt, size=64 * MIB)
    [pid] = node.mount_child_pids()
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(2.5)
        for method in ("volume.stats", "volume.stats_live", "volume.stats_history"):
            started = time.monotonic()
            node.call(method, "stuck")
            assert time.monotonic() - started < 1.0, method
        started = time.monotonic()
        node.call("cluster.nodes")
        assert time.monotonic() - started < 1.0
    finally:
        os.kill(pid, signal.SIGCONT)


def test_corrupt_stats_file_starts_afresh(node: Node, tmp_path: Path) -> None:
    record = node.call(
        "volume.create", {"name": "broken", "size": 64 * MIB, "ha_level": 1, "labels": {}}
    )
    node.stop()
    path = node.data_dir / "stats" / f"{record['id']}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text('{"format": 1, "totals": ')
    node.start()
    assert stats(node, "broken")["writes"] == 0
    assert "unreadable" in node.log_text()
    assert path.with_name(path.name + ".corrupt").exists()


def test_stats_argument_errors(node: Node) -> None:
    node.call("volume.create", {"name": "args", "size": 64 * MIB, "ha_level": 1, "labels": {}})
    with pytest.raises(errors.InvalidArgument):
        node.call("volume.stats", "args", "yes")
    for method in ("volume.stats", "volume.stats_live", "volume.stats_history"):
        with pytest.raises(errors.NotFound):
            node.call(method, "missing")


def test_deleted_volume_loses_stats(node: Node, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    vol_id = node.mount_volume("gone", mnt, size=64 * MIB)
    write_file(mnt / "data", MIB)
    wait_for(lambda: stats(node, "gone")["write_bytes"] >= MIB, "1 MiB of writes")
    node.call("volume.unmount", "gone", str(mnt))
    assert (node.data_dir / "stats" / f"{vol_id}.json").exists()
    node.call("volume.detach", "gone")
    node.call("volume.delete", "gone")
    assert not (node.data_dir / "stats" / f"{vol_id}.json").exists()


def test_cluster_nodes_lists_this_node(node: Node) -> None:
    status = node.call("node.status")
    nodes = node.call("cluster.nodes")
    assert len(nodes) == 1
    [this] = nodes
    assert this["online"] is True
    assert set(this) == set(status) | {"online"}
    assert this["node_id"] == status["node_id"]
    assert this["hostname"] == status["hostname"]
    assert this["status"] == "up"
