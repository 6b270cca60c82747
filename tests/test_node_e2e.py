"""A whole node end to end: real pxd, pxd-sidecar, pxctl and FUSE mounts."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nodeproc import Node, is_mountpoint

from pxfs import errors

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for FUSE mounts")

GIB = 1 << 30


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    node = Node(tmp_path / "node")
    node.root.mkdir()
    node.start()
    node.start_sidecar()
    yield node
    node.cleanup(sorted(tmp_path.glob("mnt*")))


def wait_until(condition, timeout: float = 30.0, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {message}")


def test_pxctl_volume_lifecycle(node: Node, tmp_path: Path) -> None:
    created = node.pxctl("volume", "create", "vol1", "--size", "2", "--repl", "1")
    assert created.returncode == 0, created.stderr
    assert created.stdout.startswith("Volume successfully created: ")
    volume_id = created.stdout.split(":")[1].strip()
    assert volume_id.isdigit()

    listing = node.pxctl("volume", "list")
    assert "vol1" in listing.stdout
    assert "detached" in listing.stdout

    mountpoint = tmp_path / "mnt1"
    mountpoint.mkdir()
    assert node.pxctl("host", "attach", "vol1").returncode == 0
    mounted = node.pxctl("host", "mount", "vol1", str(mountpoint))
    assert mounted.returncode == 0, mounted.stderr
    assert os.path.ismount(mountpoint)
    (mountpoint / "hello.txt").write_text("hello pxfs\n")

    inspect = node.pxctl("volume", "inspect", "vol1")
    assert volume_id in inspect.stdout
    assert "2.0 GiB" in inspect.stdout

    assert node.pxctl("volume", "delete", "vol1").returncode != 0
    assert node.pxctl("host", "unmount", "vol1", str(mountpoint)).returncode == 0
    assert not os.path.ismount(mountpoint)
    assert node.pxctl("host", "detach", "vol1").returncode == 0

    checked = node.pxctl("volume", "check", "vol1")
    assert checked.returncode == 0, checked.stdout + checked.stderr

    assert node.pxctl("host", "attach", "vol1").returncode == 0
    assert node.pxctl("host", "mount", "vol1", str(mountpoint)).returncode == 0
    assert (mountpoint / "hello.txt").read_text() == "hello pxfs\n"
    assert node.pxctl("host", "unmount", "vol1", str(mountpoint)).returncode == 0
    assert node.pxctl("host", "detach", "vol1").returncode == 0

    deleted = node.pxctl("volume", "delete", "vol1")
    assert deleted.returncode == 0, deleted.stderr
    assert "vol1" not in node.pxctl("volume", "list").stdout


def test_rest_inspect_matches_reference_shape(node: Node) -> None:
    status, reply = node.rest(
        "POST",
        "/v1/osd-volumes",
        {
            "locator": {"name": "px7vol"},
            "spec": {"size": 14 * GIB, "ha_level": 1},
        },
    )
    assert status == 200
    volume_id = reply["id"]
    assert volume_id.isdigit()

    status, volumes = node.rest("GET", "/v1/osd-volumes/px7vol")
    assert status == 200
    assert isinstance(volumes, list)
    assert len(volumes) == 1
    volume = volumes[0]
    assert volume["id"] == volume_id
    assert volume["locator"]["name"] == "px7vol"
    assert volume["spec"]["size"] == 15032385536
    assert volume["spec"]["block_size"] == 65536
    assert volume["spec"]["ha_level"] == 1
    assert volume["state"] == 4
    assert volume["status"] == 2
    assert set(volume["ctime"]) <= {"seconds", "nanos"}
    assert volume["ctime"]["seconds"] > 1_600_000_000
    assert "last_scan" in volume
    status_info = node.call("node.status")
    assert volume["replica_sets"] == [{"nodes": [status_info["node_id"]]}]
    assert "runtime_state" in volume
    assert "attached_on" not in volume

    status, by_id = node.rest("GET", f"/v1/osd-volumes/{volume_id}")
    assert by_id[0]["id"] == volume_id
    status, missing = node.rest("GET", "/v1/osd-volumes/no-such-volume")
    assert (status, missing) == (200, [])


def test_rest_attach_mount_unmount_detach(node: Node, tmp_path: Path) -> None:
    status, reply = node.rest(
        "POST",
        "/v1/osd-volumes",
        {
            "locator": {"name": "restvol"},
            "spec": {"size": GIB, "ha_level": 1},
        },
    )
    volume_id = reply["id"]
    mountpoint = tmp_path / "mnt-rest"
    mountpoint.mkdir()

    status, reply = node.rest("PUT", f"/v1/osd-volumes/{volume_id}", {"action": {"attach": 2}})
    assert status == 200
    assert reply["volume"]["state"] == 3
    status, reply = node.rest(
        "PUT",
        f"/v1/osd-volumes/{volume_id}",
        {"action": {"mount": 2, "mount_path": str(mountpoint)}},
    )
    assert status == 200
    assert "error" not in reply.get("volume_response", {})
    assert reply["volume"]["attach_path"] == [str(mountpoint)]
    assert os.path.ismount(mountpoint)
    (mountpoint / "data").write_bytes(os.urandom(100_000))

    status, volumes = node.rest("GET", "/v1/osd-volumes/restvol")
    assert volumes[0]["usage"] >= 100_000
    assert volumes[0]["attached_on"] == node.call("node.status")["node_id"]

    status, reply = node.rest("DELETE", f"/v1/osd-volumes/{volume_id}")
    assert "attached" in reply.get("error", "")
    status, reply = node.rest(
        "PUT",
        f"/v1/osd-volumes/{volume_id}",
        {"action": {"mount": 1, "mount_path": str(mountpoint)}},
    )
    assert status == 200
    assert not os.path.ismount(mountpoint)
    status, reply = node.rest("PUT", f"/v1/osd-volumes/{volume_id}", {"action": {"attach": 1}})
    assert reply["volume"]["state"] == 4
    status, reply = node.rest("DELETE", f"/v1/osd-volumes/{volume_id}")
    assert (status, reply) == (200, {})
    status, reply = node.rest("DELETE", f"/v1/osd-volumes/{volume_id}")
    assert (status, reply) == (200, {})


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("", "1"),
        ("a/b", "1"),
        (".", "1"),
        ("..", "1"),
        ("x" * 256, "1"),
        ("bad\x01name", "1"),
        ("ok", "0"),
        ("ok", "-1"),
        ("ok", "ten"),
        ("ok", "100000"),
    ],
)
def test_pxctl_rejects_bad_create(node: Node, name: str, size: str) -> None:
    result = node.pxctl("volume", "create", name, "--size", size, "--repl", "1")
    assert result.returncode != 0
    assert result.stderr.startswith("pxctl: ")
    assert "Traceback" not in result.stderr
    assert node.call("volume.list", {}) == []


def test_bad_repl_and_duplicate_size(node: Node) -> None:
    for repl in ("0", "4", "2"):
        result = node.pxctl("volume", "create", "v", "--size", "1", "--repl", repl)
        assert result.returncode != 0, repl
        assert "Traceback" not in result.stderr
    assert node.pxctl("volume", "create", "v", "--size", "1").returncode == 0
    again = node.pxctl("volume", "create", "v", "--size", "1")
    assert again.returncode == 0
    other_size = node.pxctl("volume", "create", "v", "--size", "2")
    assert other_size.returncode != 0
    assert len(node.call("volume.list", {})) == 1


def test_mount_errors(node: Node, tmp_path: Path) -> None:
    node.call("volume.create", {"name": "m", "size": GIB, "ha_level": 1, "labels": {}})
    missing = node.pxctl("host", "mount", "m", str(tmp_path / "mnt-missing"))
    assert missing.returncode != 0
    node.call("volume.attach", "m")
    missing = node.pxctl("host", "mount", "m", str(tmp_path / "mnt-missing"))
    assert missing.returncode != 0
    assert "Traceback" not in missing.stderr
    mountpoint = tmp_path / "mnt-twice"
    mountpoint.mkdir()
    node.call("volume.mount", "m", str(mountpoint))
    with pytest.raises(errors.PxfsError):
        node.call("volume.mount", "m", str(mountpoint))
    unknown = node.pxctl("host", "mount", "nope", str(mountpoint))
    assert unknown.returncode != 0
    assert node.pxctl("volume", "inspect", "nope").returncode != 0
    node.call("volume.unmount", "m", str(mountpoint))


def test_mount_child_death_is_repaired(node: Node, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt-child"
    node.mount_volume("child", mountpoint)
    (mountpoint / "kept").write_bytes(b"fsynced data")
    fd = os.open(mountpoint / "kept", os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)

    [pid] = node.mount_child_pids()
    os.kill(pid, signal.SIGKILL)

    def remounted() -> bool:
        pids = node.mount_child_pids()
        if not pids or pids == [pid]:
            return False
        # Until the new child's bind replaces the dead one, the path fails with ENOTCONN.
        try:
            return (mountpoint / "kept").exists()
        except OSError:
            return False

    wait_until(remounted, message="pxd to remount after the child died")
    assert (mountpoint / "kept").read_bytes() == b"fsynced data"
    assert "mount child" in node.log_text()


def test_restart_remounts_volumes(tmp_path: Path) -> None:
    node = Node(tmp_path / "node")
    node.root.mkdir()
    mountpoint = tmp_path / "mnt-restart"
    try:
        node.start()
        node.mount_volume("r", mountpoint)
        (mountpoint / "dir").mkdir()
        (mountpoint / "dir" / "file").write_bytes(b"x" * 300_000)
        inode = os.stat(mountpoint / "dir" / "file").st_ino

        assert node.stop() == 0
        assert not is_mountpoint(mountpoint)

        node.start()
        wait_until(lambda: os.path.ismount(mountpoint), message="remount at start")
        assert (mountpoint / "dir" / "file").read_bytes() == b"x" * 300_000
        assert os.stat(mountpoint / "dir" / "file").st_ino == inode
        [record] = node.call("volume.list", {})
        assert record["mount_paths"] == [str(mountpoint)]
    finally:
        node.cleanup([mountpoint])


def test_second_pxd_on_same_data_dir_refused(node: Node) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon.pxd",
            "--data-dir",
            str(node.data_dir),
            "--socket",
            str(node.root / "run" / "other.sock"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).parent.parent,
    )
    assert result.returncode != 0
    assert "in use" in result.stderr
    assert "Traceback" not in result.stderr
