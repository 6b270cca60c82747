"""pxd as a real process on tmp_path, driven over its control socket with BlockingClient."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nodeproc import mount_child_pids

from pxfs import errors
from pxfs.blockingclient import BlockingClient
from pxfs.config import Config, load_config
from pxfs.volume.format import device_blocks

REPO = Path(__file__).resolve().parent.parent
GIB = 1 << 30
MIB = 1 << 20
START_TIMEOUT = 30.0
HAVE_MOUNT_CHILD = (REPO / "daemon" / "mount.py").exists()
needs_mount = pytest.mark.skipif(
    not HAVE_MOUNT_CHILD or os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
    reason="needs daemon/mount.py, root and /dev/fuse",
)


def mounted_paths() -> set[str]:
    """Every mountpoint of this mount namespace, dead FUSE mounts included."""
    with open("/proc/self/mountinfo") as f:
        return {line.split()[4] for line in f}


def alive_mount(path: Path) -> bool:
    """True if `path` is a mountpoint whose filesystem responds to a readdir."""
    try:
        os.listdir(path)
    except OSError:
        return False
    return os.path.ismount(path)


def wait_until(condition: Callable[[], bool], description: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {description}")


class Pxd:
    """One pxd process with its data directory and sockets under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.socket = root / "run" / "pxd.sock"
        self.peer_socket = root / "run" / "peer.sock"
        self.log_path = root / "pxd.log"
        self.process: subprocess.Popen[bytes] | None = None

    def argv(self, *extra: str) -> list[str]:
        return [
            sys.executable, "-m", "daemon.pxd",
            "--data-dir", str(self.data_dir),
            "--socket", str(self.socket),
            "--peer-socket", str(self.peer_socket),
            *extra,
        ]  # fmt: skip

    def start(self) -> None:
        offset = len(self.log())
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                self.argv(), cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if "pxd ready" in self.log()[offset:]:
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"pxd did not become ready:\n{self.log()}")

    def call(self, method: str, *args: Any) -> Any:
        with BlockingClient(self.socket) as client:
            return client.call(method, *args)

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"pxd did not stop on SIGTERM:\n{self.log()}") from None
        self.process = None
        return status

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.process = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def child_pids(self) -> list[int]:
        """Pids of the mount children of this pxd, found by their command line."""
        return mount_child_pids(str(self.peer_socket), whole_argument=True)

    def cleanup(self) -> None:
        """Stop pxd and its children and unmount whatever is left under root."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(AssertionError):
                self.stop()
        for pid in self.child_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        prefix = str(self.root.parent) + os.sep
        for path in sorted(mounted_paths(), key=len, reverse=True):
            if path.startswith(prefix):
                subprocess.run(["umount", "-l", path], check=False, capture_output=True)


@pytest.fixture
def pxd(tmp_path: Path) -> Iterator[Pxd]:
    daemon = Pxd(tmp_path / "node")
    daemon.root.mkdir()
    daemon.start()
    yield daemon
    daemon.cleanup()


def create(pxd: Pxd, name: str, size: int = GIB, **fields: Any) -> dict[str, Any]:
    spec = {"name": name, "size": size, "ha_level": 1, "labels": {}}
    spec.update(fields)
    return pxd.call("volume.create", spec)  # type: ignore[no-any-return]


# Start-up, identity and shutdown


def mount_new(pxd: Pxd, name: str, tmp_path: Path) -> tuple[Path, int]:
    """Create, attach and mount volume NAME on tmp_path/mnt; return the path and the epoch."""
    create(pxd, name)
    epoch = pxd.call("volume.attach", name)["epoch"]
    target = tmp_path / "mnt"
    target.mkdir()
    pxd.call("volume.mount", name, str(target))
    return target, epoch


def write_synced(path: Path, data: bytes) -> None:
    """Write DATA to PATH and fsync it, so it must survive a crash of pxd or the mount child."""
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path: Path) -> None:
    """Fsync the directory `path`, so that its entries survive a crash of the mount child."""
    directory = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


@contextlib.contextmanager
def children_cannot_start(pxd: Pxd) -> Iterator[None]:
    """Hide the cluster secret for the block, so that every mount child pxd starts fails."""
    secret = pxd.data_dir / "cluster.secret"
    hidden = secret.rename(secret.with_name("hidden"))
    try:
        yield
    finally:
        hidden.rename(secret)


def kill_child(pxd: Pxd) -> None:
    """SIGKILL the one mount child of `pxd`."""
    [pid] = pxd.child_pids()
    os.kill(pid, signal.SIGKILL)


def kill_child_until_restart_fails(pxd: Pxd) -> None:
    """SIGKILL the one mount child of `pxd` and wait for pxd to log its failed first restart."""
    kill_child(pxd)
    wait_until(lambda: "restart 1 of the mount child failed" in pxd.log(), "a failed restart")


def test_help_describes_flags() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "daemon.pxd", "--help"],
        cwd=REPO, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0
    for flag in ("--data-dir", "--socket", "--peer-socket", "--config", "--log-level"):
        assert flag in result.stdout


def test_status_and_files(pxd: Pxd) -> None:
    status = pxd.call("node.status")
    assert status["status"] == "up"
    assert status["data_dir"] == str(pxd.data_dir)
    assert status["volumes"] == 0
    assert status["mounted"] == 0
    assert status["capacity_bytes"] > status["free_bytes"] > 0
    assert status["used_bytes"] == 0
    assert status["started_ns"] > 0
    assert status["node_id"] == (pxd.data_dir / "node-id").read_text().strip()

    secret = pxd.data_dir / "cluster.secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert len(secret.read_text().strip()) == 64
    assert stat.S_IMODE(pxd.socket.stat().st_mode) == 0o600
    assert stat.S_IMODE(pxd.peer_socket.stat().st_mode) == 0o600
    assert (pxd.data_dir / "pxd.lock").read_text().strip() == str(pxd.process.pid)  # type: ignore[union-attr]


def test_identity_survives_restart(pxd: Pxd) -> None:
    node_id = pxd.call("node.status")["node_id"]
    secret = (pxd.data_dir / "cluster.secret").read_bytes()
    assert pxd.stop() == 0
    assert not pxd.socket.exists()
    assert not pxd.peer_socket.exists()

    pxd.start()
    assert pxd.call("node.status")["node_id"] == node_id
    assert (pxd.data_dir / "cluster.secret").read_bytes() == secret


def test_sigint_exits_zero(pxd: Pxd) -> None:
    assert pxd.process is not None
    pxd.process.send_signal(signal.SIGINT)
    assert pxd.process.wait(timeout=60) == 0
    pxd.process = None
    assert "Traceback" not in pxd.log()


def test_second_pxd_refused(pxd: Pxd) -> None:
    assert pxd.process is not None
    other = Pxd(pxd.root)
    other.socket = pxd.root / "run" / "other.sock"
    other.peer_socket = pxd.root / "run" / "other-peer.sock"
    result = subprocess.run(other.argv(), cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"pxd: data directory {pxd.data_dir} is in use by another pxd (pid {pxd.process.pid})"
    )
    # The running pxd is untouched.
    assert pxd.call("node.status")["status"] == "up"


def test_socket_in_use_refused(pxd: Pxd, tmp_path: Path) -> None:
    other = Pxd(tmp_path / "other")
    other.socket = pxd.socket
    result = subprocess.run(other.argv(), cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert f"socket {pxd.socket} is in use by another server" in result.stderr
    assert "Traceback" not in result.stderr
    assert pxd.call("node.status")["status"] == "up"


def test_unusable_data_dir_refused(tmp_path: Path) -> None:
    daemon = Pxd(tmp_path / "node")
    daemon.root.mkdir()
    daemon.data_dir.write_text("a file, not a directory")
    result = subprocess.run(daemon.argv(), cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.startswith("pxd: ")
    assert str(daemon.data_dir) in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_config_file_refused(tmp_path: Path) -> None:
    config = tmp_path / "pxd.toml"
    config.write_text('data_dir = "relative"\n')
    daemon = Pxd(tmp_path / "node")
    result = subprocess.run(
        daemon.argv("--config", str(config)), cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"pxd: {config}: data_dir must be an absolute path, not 'relative'"
    )


def test_config_file_is_read(tmp_path: Path) -> None:
    daemon = Pxd(tmp_path / "node")
    daemon.root.mkdir()
    config = tmp_path / "pxd.toml"
    config.write_text(f'data_dir = "{daemon.data_dir}"\nnode_ip = "127.0.0.2"\n')
    daemon.argv = lambda *extra: [  # type: ignore[method-assign]
        sys.executable, "-m", "daemon.pxd", "--config", str(config),
        "--socket", str(daemon.socket), "--peer-socket", str(daemon.peer_socket),
    ]  # fmt: skip
    try:
        daemon.start()
        status = daemon.call("node.status")
        assert status["ip"] == "127.0.0.2"
        assert status["data_dir"] == str(daemon.data_dir)
    finally:
        daemon.cleanup()


def test_load_config_defaults_and_errors(tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidArgument, match="does not exist"):
        load_config(tmp_path / "absent.toml")

    path = tmp_path / "pxd.toml"
    path.write_text('control_socket = "/tmp/x/pxd.sock"\nrest_port = 9101\n')
    config = load_config(path)
    assert config.control_socket == Path("/tmp/x/pxd.sock")
    assert config.peer_socket_path == Path("/tmp/x/peer.sock")
    assert config.rest_port == 9101
    assert config.data_dir == Config().data_dir

    for text, reason in [
        ("colour = 1\n", "unknown key 'colour'"),
        ("rest_port = 0\n", "port number"),
        ("rest_port = true\n", "port number"),
        ('peer_port = "9002"\n', "port number"),
        ("rest_host = 5\n", "non-empty string"),
        ("data_dir = [", "not valid TOML"),
    ]:
        path.write_text(text)
        with pytest.raises(errors.InvalidArgument, match=reason):
            load_config(path)


def test_config_defaults() -> None:
    config = Config()
    assert config.data_dir == Path("/var/lib/pxfs")
    assert config.control_socket == Path("/run/pxfs/pxd.sock")
    assert config.peer_socket_path == Path("/run/pxfs/peer.sock")
    assert (config.rest_host, config.rest_port, config.peer_port) == ("127.0.0.1", 9001, 9002)
    assert config.plugin_socket == Path("/run/docker/plugins/pxd.sock")
    assert config.docker_mount_base == Path("/var/lib/osd/mounts")
    assert config.replace(data_dir=None).data_dir == config.data_dir
    assert config.replace(data_dir=Path("/d")).data_dir == Path("/d")


# Volume create, list, inspect and delete


def test_create_list_inspect_delete(pxd: Pxd) -> None:
    node_id = pxd.call("node.status")["node_id"]
    record = create(pxd, "vol1", size=GIB + 1, labels={"app": "db"})

    assert record["id"].isdigit()
    assert 0 < int(record["id"]) < 2**63
    assert record["name"] == "vol1"
    assert record["size"] == GIB + 65536
    assert record["ha_level"] == 1
    assert record["labels"] == {"app": "db"}
    assert record["replica_nodes"] == [node_id]
    assert record["attached_on"] == ""
    assert record["mount_paths"] == []
    assert record["mounted"] == []
    assert record["usage"] > 0, "formatting writes the superblock and a checkpoint"
    assert record["usage"] < 64 * MIB, "volumes are thin"
    assert abs(record["ctime_ns"] - time.time_ns()) < 60 * 10**9
    assert len(record["uuid"]) == 36

    assert pxd.call("volume.inspect", "vol1") == record
    assert pxd.call("volume.inspect", record["id"]) == record
    assert pxd.call("volume.list", {}) == [record]
    assert pxd.call("node.status")["volumes"] == 1
    # The node counts the block table too: 16 bytes for each block of the volume's device.
    table = device_blocks(record["size"]) * 16
    assert pxd.call("node.status")["used_bytes"] == record["usage"] + table
    assert (pxd.data_dir / "replicas" / record["id"]).is_dir()

    assert pxd.call("volume.delete", "vol1") is None
    assert pxd.call("volume.list", {}) == []
    assert not (pxd.data_dir / "replicas" / record["id"]).exists()
    with pytest.raises(errors.NotFound):
        pxd.call("volume.inspect", "vol1")
    with pytest.raises(errors.NotFound):
        pxd.call("volume.delete", "vol1")


def test_volumes_survive_restart(pxd: Pxd) -> None:
    record = create(pxd, "kept")
    assert pxd.stop() == 0
    pxd.start()
    assert pxd.call("volume.inspect", "kept") == record


def test_create_same_spec_returns_existing(pxd: Pxd) -> None:
    first = create(pxd, "dup", size=2 * GIB)
    again = create(pxd, "dup", size=2 * GIB)
    assert again == first

    with pytest.raises(errors.AlreadyExists, match="already exists with size"):
        create(pxd, "dup", size=GIB)
    with pytest.raises(errors.AlreadyExists, match="ha_level 1"):
        create(pxd, "dup", size=2 * GIB, ha_level=2)
    with pytest.raises(errors.AlreadyExists, match="is the id of another volume"):
        create(pxd, first["id"])
    assert len(pxd.call("volume.list", {})) == 1


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "empty"),
        (".", "reserved"),
        ("..", "reserved"),
        ("a/b", "contains '/'"),
        ("x" * 256, "256 bytes"),
        ("bad\x01name", "control character"),
        ("nul\x00name", "control character"),
        (5, "must be a string"),
        (None, "must be a string"),
    ],
)
def test_create_rejects_bad_name(pxd: Pxd, name: Any, reason: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=reason):
        create(pxd, name)
    assert pxd.call("volume.list", {}) == []


@pytest.mark.parametrize(
    ("size", "reason"),
    [
        (0, "at least one byte"),
        (-1, "at least one byte"),
        ((1 << 40) + 1, "maximum volume size"),
        ("10G", "integer number of bytes"),
        (1.5, "integer number of bytes"),
        (True, "integer number of bytes"),
        (None, "integer number of bytes"),
        (65536, "minimum"),
    ],
)
def test_create_rejects_bad_size(pxd: Pxd, size: Any, reason: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=reason):
        create(pxd, "v", size=size)
    assert pxd.call("volume.list", {}) == []
    assert list((pxd.data_dir / "replicas").iterdir()) == []


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"ha_level": 0}, "must be 1, 2 or 3"),
        ({"ha_level": 4}, "must be 1, 2 or 3"),
        ({"ha_level": "1"}, "integer 1-3"),
        ({"ha_level": 2}, "needs 2 online nodes, but the cluster has 1 online"),
        ({"ha_level": 3}, "needs 3 online nodes, but the cluster has 1 online"),
        ({"labels": {"k": 1}}, "values are strings"),
        ({"labels": ["k"]}, "map of strings"),
        ({"shared": True}, "unknown volume.create fields: shared"),
    ],
)
def test_create_rejects_bad_fields(pxd: Pxd, fields: dict[str, Any], reason: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=reason):
        create(pxd, "v", **fields)
    assert pxd.call("volume.list", {}) == []


def test_create_rejects_malformed_requests(pxd: Pxd) -> None:
    with pytest.raises(errors.InvalidArgument, match="takes a map"):
        pxd.call("volume.create", "vol")
    with pytest.raises(errors.InvalidArgument, match="needs a size"):
        pxd.call("volume.create", {"name": "v"})
    with pytest.raises(errors.InvalidArgument, match="bad arguments"):
        pxd.call("volume.create")


def test_list_filters(pxd: Pxd) -> None:
    a = create(pxd, "a", labels={"app": "db", "tier": "1"})
    b = create(pxd, "b", labels={"app": "web"})
    c = create(pxd, "c")

    def names(filters: Any) -> list[str]:
        return [record["name"] for record in pxd.call("volume.list", filters)]

    assert names({}) == ["a", "b", "c"]
    assert names(None) == ["a", "b", "c"]
    assert names({"name": "b"}) == ["b"]
    assert names({"name": "zz"}) == []
    assert names({"labels": {"app": "db"}}) == ["a"]
    assert names({"labels": {"app": "db", "tier": "2"}}) == []
    assert names({"ids": [a["id"], c["id"]]}) == ["a", "c"]
    assert names({"ids": [b["id"]], "name": "a"}) == []
    with pytest.raises(errors.InvalidArgument, match="unknown volume.list filters: label"):
        pxd.call("volume.list", {"label": {}})
    with pytest.raises(errors.InvalidArgument, match="list of strings"):
        pxd.call("volume.list", {"ids": [1]})


def test_unknown_volume_is_not_found(pxd: Pxd) -> None:
    for method, args in [
        ("volume.inspect", ["nope"]),
        ("volume.delete", ["nope"]),
        ("volume.attach", ["nope"]),
        ("volume.detach", ["nope"]),
        ("volume.check", ["nope"]),
        ("volume.mount", ["nope", "/tmp"]),
        ("volume.unmount", ["nope", "/tmp"]),
    ]:
        with pytest.raises(errors.NotFound, match="not found"):
            pxd.call(method, *args)
    with pytest.raises(errors.InvalidArgument, match="expected a volume name or id"):
        pxd.call("volume.inspect", 12)


# Attach and detach


def test_attach_detach(pxd: Pxd) -> None:
    node_id = pxd.call("node.status")["node_id"]
    record = create(pxd, "att")

    attached = pxd.call("volume.attach", "att")
    assert attached["attached_on"] == node_id
    assert attached["epoch"] == record["epoch"] + 1
    assert attached["attach_time_ns"] > 0
    again = pxd.call("volume.attach", record["id"])
    assert again["epoch"] == attached["epoch"], "attaching again is a no-op"

    with pytest.raises(errors.Busy, match="detach it before deleting"):
        pxd.call("volume.delete", "att")
    with pytest.raises(errors.Busy, match="detach it before a check"):
        pxd.call("volume.check", "att")

    detached = pxd.call("volume.detach", "att")
    assert detached["attached_on"] == ""
    assert detached["detach_time_ns"] >= attached["attach_time_ns"]
    assert pxd.call("volume.detach", "att")["detach_time_ns"] == detached["detach_time_ns"]

    assert pxd.call("volume.attach", "att")["epoch"] == attached["epoch"] + 1
    pxd.call("volume.detach", "att")
    pxd.call("volume.delete", "att")


def test_mount_requires_attach(pxd: Pxd, tmp_path: Path) -> None:
    create(pxd, "m")
    target = tmp_path / "mnt"
    target.mkdir()
    with pytest.raises(errors.InvalidArgument, match="not attached; attach it first"):
        pxd.call("volume.mount", "m", str(target))
    with pytest.raises(errors.NotFound, match="not mounted at"):
        pxd.call("volume.unmount", "m", str(target))


def test_mount_path_checks(pxd: Pxd, tmp_path: Path) -> None:
    create(pxd, "m")
    pxd.call("volume.attach", "m")
    regular = tmp_path / "file"
    regular.write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "entry").write_text("x")

    cases: list[tuple[Any, type[errors.PxfsError], str]] = [
        ("relative/path", errors.InvalidArgument, "not absolute"),
        ("", errors.InvalidArgument, "non-empty string"),
        (None, errors.InvalidArgument, "non-empty string"),
        (str(tmp_path / "missing"), errors.NotFound, "does not exist"),
        (str(regular), errors.NotADirectory, "not a directory"),
        (str(full), errors.NotEmpty, "not empty"),
        ("/proc", errors.Busy, "already a mountpoint"),
    ]
    for path, error, reason in cases:
        with pytest.raises(error, match=reason):
            pxd.call("volume.mount", "m", path)
    assert pxd.call("volume.inspect", "m")["mount_paths"] == []
    assert pxd.call("node.status")["mounted"] == 0


# Mounts: these need the mount child


@needs_mount
def test_mount_unmount_detach(pxd: Pxd, tmp_path: Path) -> None:
    create(pxd, "vol")
    pxd.call("volume.attach", "vol")
    target = tmp_path / "mnt"
    target.mkdir()

    record = pxd.call("volume.mount", "vol", str(target))
    assert record["mount_paths"] == [str(target)]
    assert record["mounted"] == [str(target)]
    assert alive_mount(target)
    (target / "hello").write_bytes(b"hello pxfs\n" * 1000)
    assert pxd.call("node.status")["mounted"] == 1
    assert len(pxd.child_pids()) == 1

    with pytest.raises(errors.Busy, match="already mounted at"):
        pxd.call("volume.mount", "vol", str(target))
    with pytest.raises(errors.Busy, match="unmount it first"):
        pxd.call("volume.detach", "vol")

    record = pxd.call("volume.unmount", "vol", str(target))
    assert record["mount_paths"] == []
    assert record["mounted"] == []
    assert not os.path.ismount(target)
    assert str(target) not in mounted_paths()
    wait_until(lambda: pxd.child_pids() == [], "the mount child to exit")
    assert pxd.call("volume.detach", "vol")["attached_on"] == ""

    pxd.call("volume.attach", "vol")
    pxd.call("volume.mount", "vol", str(target))
    assert (target / "hello").read_bytes() == b"hello pxfs\n" * 1000
    assert pxd.call("volume.inspect", "vol")["usage"] >= 11000
    pxd.call("volume.unmount", "vol", str(target))
    pxd.call("volume.detach", "vol")


@needs_mount
def test_mount_at_two_paths(pxd: Pxd, tmp_path: Path) -> None:
    create(pxd, "two")
    pxd.call("volume.attach", "two")
    first, second = tmp_path / "mnt1", tmp_path / "mnt2"
    first.mkdir()
    second.mkdir()

    pxd.call("volume.mount", "two", str(first))
    record = pxd.call("volume.mount", "two", str(second))
    assert record["mount_paths"] == [str(first), str(second)]
    assert len(pxd.child_pids()) == 1, "one child serves every path of a volume"
    (first / "shared").write_text("same tree")
    assert (second / "shared").read_text() == "same tree"

    pxd.call("volume.unmount", "two", str(first))
    assert not os.path.ismount(first)
    assert alive_mount(second)
    assert (second / "shared").read_text() == "same tree"
    pxd.call("volume.unmount", "two", str(second))
    assert not os.path.ismount(second)
    wait_until(lambda: pxd.child_pids() == [], "the mount child to exit")


@needs_mount
def test_busy_path_is_not_unmounted(pxd: Pxd, tmp_path: Path) -> None:
    target, _ = mount_new(pxd, "busy", tmp_path)
    holder = open(target / "open-file", "w")
    try:
        with pytest.raises(errors.Busy, match="cannot unmount") as failure:
            pxd.call("volume.unmount", "busy", str(target))
        assert "close the files open under it" in failure.value.message
        assert alive_mount(target)
        assert pxd.call("volume.inspect", "busy")["mount_paths"] == [str(target)]
    finally:
        holder.close()
    pxd.call("volume.unmount", "busy", str(target))
    assert not os.path.ismount(target)


@needs_mount
def test_mount_again_raises_epoch(pxd: Pxd, tmp_path: Path) -> None:
    # Each mount child numbers its writes from the bottom of its epoch, so a child that
    # reused the epoch of the last one would write versions that the replicas already hold.
    target, epoch = mount_new(pxd, "again", tmp_path)
    write_synced(target / "first", b"one")
    pxd.call("volume.unmount", "again", str(target))

    pxd.call("volume.mount", "again", str(target))
    assert pxd.call("volume.inspect", "again")["epoch"] > epoch
    write_synced(target / "second", b"two")
    assert (target / "first").read_bytes() == b"one"
    assert (target / "second").read_bytes() == b"two"
    pxd.call("volume.unmount", "again", str(target))


@needs_mount
def test_killed_child_is_remounted(pxd: Pxd, tmp_path: Path) -> None:
    target, epoch = mount_new(pxd, "phoenix", tmp_path)
    write_synced(target / "kept", b"durable")

    [pid] = pxd.child_pids()
    os.kill(pid, signal.SIGKILL)

    def remounted() -> bool:
        pids = pxd.child_pids()
        return len(pids) == 1 and pids != [pid] and alive_mount(target)

    wait_until(remounted, "pxd to start a new mount child")
    assert (target / "kept").read_bytes() == b"durable"
    record = pxd.call("volume.inspect", "phoenix")
    assert record["epoch"] > epoch
    assert record["mounted"] == [str(target)]
    assert "exited unexpectedly" in pxd.log()
    pxd.call("volume.unmount", "phoenix", str(target))


@needs_mount
def test_restart_remounts(pxd: Pxd, tmp_path: Path) -> None:
    target, _ = mount_new(pxd, "again", tmp_path)
    (target / "dir").mkdir()
    (target / "dir" / "file").write_bytes(b"x" * 300_000)

    assert pxd.stop() == 0
    assert str(target) not in mounted_paths()
    assert pxd.child_pids() == []

    pxd.start()
    assert alive_mount(target)
    assert (target / "dir" / "file").read_bytes() == b"x" * 300_000
    record = pxd.call("volume.inspect", "again")
    assert record["mount_paths"] == [str(target)]
    assert record["mounted"] == [str(target)]


@needs_mount
def test_stop_unmounts_nested_volume_first(pxd: Pxd, tmp_path: Path) -> None:
    outer, _ = mount_new(pxd, "outer", tmp_path)
    inner = outer / "inner"
    inner.mkdir()
    create(pxd, "inner")
    pxd.call("volume.attach", "inner")
    pxd.call("volume.mount", "inner", str(inner))
    (inner / "file").write_bytes(b"nested")

    assert pxd.stop() == 0
    mounted = mounted_paths()
    assert str(inner) not in mounted
    assert str(outer) not in mounted
    log = pxd.log()
    assert "unmounting it lazily" not in log
    assert "no longer leads" not in log

    pxd.start()
    assert alive_mount(outer)
    assert alive_mount(inner)
    assert (inner / "file").read_bytes() == b"nested"


@needs_mount
def test_pxd_killed_then_restart_remounts(pxd: Pxd, tmp_path: Path) -> None:
    target, epoch = mount_new(pxd, "crash", tmp_path)
    write_synced(target / "f", b"before the crash")

    pxd.kill()
    pxd.start()
    assert alive_mount(target)
    assert (target / "f").read_bytes() == b"before the crash"
    record = pxd.call("volume.inspect", "crash")
    assert record["epoch"] > epoch
    assert record["mounted"] == [str(target)]
    # The old child lost its mount and its peer connection, so it ends by itself.
    wait_until(lambda: len(pxd.child_pids()) == 1, "the orphaned mount child to exit")


@needs_mount
def test_pxd_restart_never_unmounts_path(pxd: Pxd, tmp_path: Path) -> None:
    target, _ = mount_new(pxd, "steady", tmp_path)
    write_synced(target / "f", b"kept")
    pxd.kill()

    # Watch the path while the new pxd starts: it must stay a mountpoint all along.
    gaps = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal gaps
        while not done.is_set():
            if str(target) not in mounted_paths():
                gaps += 1
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        pxd.start()
        wait_until(lambda: alive_mount(target), "the volume to be served again")
    finally:
        done.set()
        watcher.join()
    assert gaps == 0
    assert (target / "f").read_bytes() == b"kept"
    assert "lazily unmounting the stale mount" not in pxd.log()
    wait_until(lambda: len(pxd.child_pids()) == 1, "the orphaned mount child to exit")


@needs_mount
def test_unmount_continues_stopped_child(pxd: Pxd, tmp_path: Path) -> None:
    target, _ = mount_new(pxd, "paused", tmp_path)
    # Not synced: the data reaches the replica only if the child still writes it back.
    data = os.urandom(3 << 20)
    (target / "f").write_bytes(data)
    [child] = pxd.child_pids()
    os.kill(child, signal.SIGSTOP)
    try:
        pxd.call("volume.unmount", "paused", str(target))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGCONT)

    assert f"mount child pid {child} is stopped; sending SIGCONT" in pxd.log()
    assert "killing it" not in pxd.log()
    assert str(target) not in mounted_paths()
    pxd.call("volume.mount", "paused", str(target))
    assert (target / "f").read_bytes() == data


@needs_mount
def test_unmount_wrong_path_in_stopped_volume(pxd: Pxd, tmp_path: Path) -> None:
    target, _ = mount_new(pxd, "paused", tmp_path)
    [child] = pxd.child_pids()
    os.kill(child, signal.SIGSTOP)
    try:
        # The lookup of a name inside the volume waits on the stopped child.
        with pytest.raises(errors.Unavailable, match="may be stopped"):
            pxd.call("volume.unmount", "paused", str(target / "typo"))
        assert pxd.call("node.status")["mounted"] == 1
    finally:
        os.kill(child, signal.SIGCONT)
    assert alive_mount(target)


@needs_mount
def test_list_waits_once_for_stopped_children(pxd: Pxd, tmp_path: Path) -> None:
    for index in range(4):
        create(pxd, f"paused{index}")
        pxd.call("volume.attach", f"paused{index}")
        target = tmp_path / f"mnt{index}"
        target.mkdir()
        pxd.call("volume.mount", f"paused{index}", str(target))
    children = pxd.child_pids()
    for child in children:
        os.kill(child, signal.SIGSTOP)
    try:
        started = time.monotonic()
        listed = pxd.call("volume.list")
        elapsed = time.monotonic() - started
    finally:
        for child in children:
            os.kill(child, signal.SIGCONT)
    assert len(listed) == 4
    assert all(record["runtime_state"] == {} for record in listed)
    # One runtime-state timeout of 2 s for the four of them; asked one by one, 8 s.
    assert elapsed < 6


@needs_mount
def test_restart_stops_stopped_orphan_child(pxd: Pxd, tmp_path: Path) -> None:
    target, _ = mount_new(pxd, "paused", tmp_path)
    write_synced(target / "f", b"kept")
    [orphan] = pxd.child_pids()
    os.kill(orphan, signal.SIGSTOP)
    pxd.kill()

    try:
        pxd.start()
        wait_until(lambda: alive_mount(target), "the volume to be served again")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(orphan, signal.SIGCONT)
    assert (target / "f").read_bytes() == b"kept"
    assert orphan not in pxd.child_pids()
    assert "still runs" not in pxd.log()


@needs_mount
@pytest.mark.parametrize("stop", ["kill", "sigterm", "kill-tie"])
def test_restart_remounts_nested_volume(pxd: Pxd, tmp_path: Path, stop: str) -> None:
    # The inner volume is created first, so the catalog lists it before the outer one.
    create(pxd, "nested-in")
    outer, _ = mount_new(pxd, "nested-out", tmp_path)
    inner = outer / "in"
    inner.mkdir()
    # The directory must survive the kill of pxd, which takes unsynced changes with it.
    fsync_directory(outer)
    pxd.call("volume.attach", "nested-in")
    pxd.call("volume.mount", "nested-in", str(inner))
    write_synced(inner / "f", b"inner")
    if stop == "kill-tie":
        # A second path of the inner volume as shallow as the outer volume's path.
        beside = outer.parent / "beside"
        beside.mkdir()
        pxd.call("volume.mount", "nested-in", str(beside))

    if stop.startswith("kill"):
        pxd.kill()
    else:
        assert pxd.stop() == 0
    pxd.start()
    wait_until(lambda: alive_mount(inner), "the inner volume to be served again")
    assert (inner / "f").read_bytes() == b"inner"
    assert str(inner) in pxd.call("volume.inspect", "nested-in")["mounted"]
    assert str(inner) in mounted_paths()
    wait_until(lambda: len(pxd.child_pids()) == 2, "the orphaned mount children to exit")


def mount_nested(pxd: Pxd, tmp_path: Path, *, synced: bool) -> tuple[Path, Path]:
    """Mount volume "outer" on tmp_path/mnt and volume "inner" on its directory "in"."""
    outer, _ = mount_new(pxd, "outer", tmp_path)
    inner = outer / "in"
    inner.mkdir()
    if synced:
        fsync_directory(outer)
    create(pxd, "inner")
    pxd.call("volume.attach", "inner")
    pxd.call("volume.mount", "inner", str(inner))
    write_synced(inner / "f", b"inner")
    return outer, inner


def outer_child_pid(pxd: Pxd) -> int:
    """Return the pid of the mount child of volume "outer"."""
    vol_id = pxd.call("volume.inspect", "outer")["id"]
    [pid] = mount_child_pids(str(pxd.data_dir / "mnt" / vol_id), whole_argument=True)
    return pid


@needs_mount
def test_outer_child_restart_keeps_inner(pxd: Pxd, tmp_path: Path) -> None:
    outer, inner = mount_nested(pxd, tmp_path, synced=True)
    os.kill(outer_child_pid(pxd), signal.SIGKILL)

    wait_until(lambda: "mounting at" in pxd.log(), "the inner volume to be mounted again")
    wait_until(lambda: alive_mount(inner), "the inner volume to be served again")
    assert (inner / "f").read_bytes() == b"inner"
    assert pxd.call("volume.inspect", "inner")["mounted"] == [str(inner)]


@needs_mount
def test_nested_restore_in_depth_order(pxd: Pxd, tmp_path: Path) -> None:
    # Volume "a" in "b" in "outer"; "a" is created first, so the catalog may list it first.
    # "outer" has a second path, through which its own directory b/a exists too.
    for name in ("a", "b"):
        create(pxd, name)
        pxd.call("volume.attach", name)
    outer, _ = mount_new(pxd, "outer", tmp_path)
    second = tmp_path / "second"
    second.mkdir()
    pxd.call("volume.mount", "outer", str(second))
    (outer / "b").mkdir()
    fsync_directory(outer)
    pxd.call("volume.mount", "b", str(outer / "b"))
    (second / "b" / "a").mkdir()
    fsync_directory(second / "b")
    (outer / "b" / "a").mkdir()
    fsync_directory(outer / "b")
    pxd.call("volume.mount", "a", str(outer / "b" / "a"))
    write_synced(outer / "b" / "a" / "f", b"in a")

    os.kill(outer_child_pid(pxd), signal.SIGKILL)
    wait_until(lambda: pxd.log().count("mounting at") >= 2, "the nested volumes to be mounted")
    wait_until(lambda: alive_mount(outer / "b" / "a"), "volume a to be served again")
    assert (outer / "b" / "a" / "f").read_bytes() == b"in a"
    assert "cannot mount at" not in pxd.log()


@needs_mount
def test_mount_again_binds_lost_path(pxd: Pxd, tmp_path: Path) -> None:
    # The kill of the outer child loses the unsynced directory that the inner path is in.
    outer, inner = mount_nested(pxd, tmp_path, synced=False)
    os.kill(outer_child_pid(pxd), signal.SIGKILL)
    wait_until(lambda: "cannot mount at" in pxd.log(), "the failed bind of the inner volume")
    assert pxd.call("volume.inspect", "inner")["mounted"] == []

    inner.mkdir()
    pxd.call("volume.mount", "inner", str(inner))
    assert (inner / "f").read_bytes() == b"inner"
    assert pxd.call("volume.inspect", "inner")["mounted"] == [str(inner)]


@needs_mount
def test_check_detached_volume(pxd: Pxd, tmp_path: Path) -> None:
    create(pxd, "fsck")
    result = pxd.call("volume.check", "fsck")
    assert result == {"clean": True, "problems": []}

    pxd.call("volume.attach", "fsck")
    target = tmp_path / "mnt"
    target.mkdir()
    pxd.call("volume.mount", "fsck", str(target))
    (target / "sub").mkdir()
    (target / "sub" / "data").write_bytes(os.urandom(200_000))
    pxd.call("volume.unmount", "fsck", str(target))
    pxd.call("volume.detach", "fsck")
    assert pxd.call("volume.check", "fsck") == {"clean": True, "problems": []}


@needs_mount
def test_child_start_failure_reported(pxd: Pxd, tmp_path: Path) -> None:
    create(pxd, "nostart")
    pxd.call("volume.attach", "nostart")
    target = tmp_path / "mnt"
    target.mkdir()
    with children_cannot_start(pxd), pytest.raises(errors.Unavailable, match="failed to start"):
        pxd.call("volume.mount", "nostart", str(target))
    record = pxd.call("volume.inspect", "nostart")
    assert record["mount_paths"] == []
    assert record["mounted"] == []
    assert not os.path.ismount(target)
    assert pxd.child_pids() == []

    pxd.call("volume.mount", "nostart", str(target))
    assert alive_mount(target)
    pxd.call("volume.unmount", "nostart", str(target))


def kernel_version() -> tuple[int, int]:
    """Return the major and minor version of the running Linux kernel."""
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int(minor.split("-")[0])


def entries_under_mount(parent: Path, name: str, peek: Path) -> list[str]:
    """List the directory `name` of `parent` as it is under whatever is mounted on it."""
    # A bind that is not recursive shows `parent` without the mounts below it.
    subprocess.run(["mount", "--bind", str(parent), str(peek)], check=True)
    try:
        return os.listdir(peek / name)
    finally:
        subprocess.run(["umount", str(peek)], check=True)


@needs_mount
def test_dead_child_path_fails_until_remount(pxd: Pxd, tmp_path: Path) -> None:
    # Between the death of a child and its replacement, a write to the path must fail, not
    # land in the directory under the mount with a successful fsync.
    target, _ = mount_new(pxd, "guarded", tmp_path)
    with children_cannot_start(pxd):
        kill_child_until_restart_fails(pxd)
        with pytest.raises(OSError) as failure:
            write_synced(target / "lost", b"x")
        assert failure.value.errno == errno.ENOTCONN

    wait_until(lambda: alive_mount(target), "pxd to mount the volume again")
    assert not (target / "lost").exists()
    peek = tmp_path / "peek"
    peek.mkdir()
    assert entries_under_mount(tmp_path, "mnt", peek) == []
    assert str(peek) not in mounted_paths()
    assert pxd.call("volume.inspect", "guarded")["mounted"] == [str(target)]
    if kernel_version() >= (6, 5):
        assert "cannot mount beneath" not in pxd.log()
    pxd.call("volume.unmount", "guarded", str(target))
    assert str(target) not in mounted_paths()


@needs_mount
def test_restarts_slow_down_and_go_on(pxd: Pxd, tmp_path: Path) -> None:
    target, _ = mount_new(pxd, "doomed", tmp_path)
    with children_cannot_start(pxd):
        kill_child(pxd)
        # Five attempts with backoff 0.5, 1, 2, 4 and 8 s.
        wait_until(lambda: "failed 5 times in a row" in pxd.log(), "five restarts", timeout=40)
        assert "trying again every 30 s" in pxd.log()
        # The dead child's bind stays, so the path fails every access instead of showing the
        # directory under it.
        assert str(target) in mounted_paths()
        with pytest.raises(OSError) as failure:
            os.listdir(target)
        assert failure.value.errno == errno.ENOTCONN
        record = pxd.call("volume.inspect", "doomed")
        assert record["mount_paths"] == [str(target)]
        assert record["mounted"] == []

    # The sixth attempt comes 16 s after the fifth, with no call to pxd.
    wait_until(lambda: alive_mount(target), "the sixth restart", timeout=40)
    assert "mount child restarted" in pxd.log()
    assert pxd.call("volume.inspect", "doomed")["mounted"] == [str(target)]
    pxd.call("volume.unmount", "doomed", str(target))


@needs_mount
def test_unmount_while_child_is_dead(pxd: Pxd, tmp_path: Path) -> None:
    target, _ = mount_new(pxd, "unmounted", tmp_path)
    with children_cannot_start(pxd):
        kill_child_until_restart_fails(pxd)
        pxd.call("volume.unmount", "unmounted", str(target))
        assert str(target) not in mounted_paths()
        assert pxd.call("volume.inspect", "unmounted")["mount_paths"] == []

    pxd.call("volume.mount", "unmounted", str(target))
    assert alive_mount(target)
    pxd.call("volume.unmount", "unmounted", str(target))
