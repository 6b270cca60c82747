"""docker volume and docker run against a real dockerd, a real pxd and a real pxd-sidecar.

dockerd runs on private directories and a private API socket (tests/dockerd.py). It finds the
sidecar's plugin through /run/docker/plugins/pxd.sock, the one path that it shares with the
machine, so the module is skipped when another plugin already serves that path. The image is
Debian's busybox-static imported with `docker import`; no registry is needed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dockerd import Dockerd, find_busybox, unix_request
from nodeproc import REPO, Node, free_port, is_mountpoint

GIB = 1 << 30
PLUGIN_SOCKET = Path("/run/docker/plugins/pxd.sock")
IMAGE = "pxfs-test-busybox:latest"
START_TIMEOUT = 30.0


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root: dockerd and FUSE mounts"
    for tool in ("dockerd", "docker"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian package docker.io)"
    if find_busybox() is None:
        return "no statically linked busybox (Debian package busybox-static)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if os.path.lexists(PLUGIN_SOCKET):
        return f"{PLUGIN_SOCKET} already exists: another pxd plugin serves this machine"
    return None


_SKIP = _skip_reason()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")


class Sidecar:
    """A pxd-sidecar process serving the plugin socket that dockerd discovers."""

    def __init__(self, root: Path, control_socket: Path) -> None:
        self.root = root
        self.mount_base = root / "mounts"
        self.args = [
            sys.executable, "-m", "daemon.sidecar",
            "--socket", str(control_socket),
            "--plugin-socket", str(PLUGIN_SOCKET),
            "--docker-mount-base", str(self.mount_base),
            "--state-dir", str(root / "sidecar-state"),
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None
        #: (st_dev, st_ino) of each socket file that a sidecar of this class created.
        self.sockets: set[tuple[int, int]] = set()

    def start(self) -> None:
        """Start the sidecar and wait until the plugin socket responds to Plugin.Activate."""
        with open(self.root / "sidecar.log", "ab") as log:
            self.process = subprocess.Popen(
                [*self.args, "--rest", f"127.0.0.1:{free_port()}"],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and self.process.poll() is None:
            with contextlib.suppress(OSError):
                if unix_request(PLUGIN_SOCKET, "POST", "/Plugin.Activate", timeout=5)[0] == 200:
                    info = os.lstat(PLUGIN_SOCKET)
                    self.sockets.add((info.st_dev, info.st_ino))
                    return
            time.sleep(0.1)
        raise AssertionError(f"pxd-sidecar did not serve {PLUGIN_SOCKET}:\n{self.log_text()}")

    def kill(self) -> None:
        """SIGKILL the sidecar, as a crash would."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.process = None

    def stop(self) -> None:
        """SIGTERM the sidecar, then remove the plugin socket if a sidecar of ours left it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=START_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        with contextlib.suppress(FileNotFoundError):
            info = os.lstat(PLUGIN_SOCKET)
            if (info.st_dev, info.st_ino) in self.sockets:
                PLUGIN_SOCKET.unlink()

    def log_text(self) -> str:
        """Return what the sidecar wrote to its log."""
        try:
            return (self.root / "sidecar.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""


class Stack:
    """pxd, its sidecar and dockerd, all private to this module."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.node = Node(root / "node")
        self.sidecar = Sidecar(root, self.node.socket)
        self.docker = Dockerd(root / "docker")

    def record(self, name: str) -> dict[str, Any] | None:
        """Return pxd's record of volume `name`, or None."""
        records = self.node.call("volume.list", {"name": name})
        return records[0] if records else None

    def mountpoint(self, name: str) -> str:
        """Return the host path where the plugin mounts volume `name`."""
        return str(self.sidecar.mount_base / name)

    def run(
        self, volume: str, *command: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a throw-away container with `volume` at /data."""
        return self.docker.cli(
            "run", "--rm", "--network", "none", "-v", f"{volume}:/data", IMAGE, *command,
            check=check,
        )  # fmt: skip

    def create(self, name: str, *opts: str) -> None:
        """docker volume create -d pxd with the given --opt values."""
        args = [arg for opt in opts for arg in ("--opt", opt)]
        result = self.docker.cli("volume", "create", "-d", "pxd", *args, name)
        assert result.stdout.strip() == name

    def remove(self, name: str) -> None:
        """docker volume rm, tolerating a volume that is already gone."""
        self.docker.cli("volume", "rm", "-f", name, check=False)


def _created_dirs(path: Path) -> list[Path]:
    """Return the ancestors of `path` that do not exist yet, deepest first."""
    missing = []
    for parent in path.parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """Start pxd, the sidecar on the real plugin socket and dockerd; stop all of it after."""
    root = Path(tempfile.mkdtemp(prefix="pxdk-", dir="/tmp"))
    new_dirs = _created_dirs(PLUGIN_SOCKET)
    stack = Stack(root)
    try:
        stack.node.start()
        stack.sidecar.start()
        stack.docker.start()
        busybox = find_busybox()
        assert busybox is not None
        stack.docker.import_busybox(busybox, IMAGE)
        yield stack
    finally:
        _teardown(stack, new_dirs)


def _teardown(stack: Stack, new_dirs: list[Path]) -> None:
    # Containers go first, while the sidecar still serves their Unmount calls.
    stack.docker.stop()
    stack.sidecar.stop()
    mountpoints = []
    if stack.sidecar.mount_base.exists():
        mountpoints = list(stack.sidecar.mount_base.iterdir())
    stack.node.cleanup(mountpoints)
    for directory in new_dirs:
        with contextlib.suppress(OSError):
            directory.rmdir()
    leftovers = [path for path in mountpoints if is_mountpoint(path)]
    sidecar_log = stack.sidecar.log_text()
    pxd_log = stack.node.log_text()
    if not leftovers:
        shutil.rmtree(stack.root, ignore_errors=True)
    assert not leftovers, f"still mounted after teardown: {leftovers}"
    assert "Traceback" not in sidecar_log, sidecar_log
    assert " ERROR " not in sidecar_log, sidecar_log
    assert "Traceback" not in pxd_log, pxd_log


@pytest.fixture
def volume(stack: Stack, request: pytest.FixtureRequest) -> Iterator[str]:
    """A volume name for one test; whatever the test leaves is removed after it."""
    name = "dk-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.removeprefix("test_"))[:40]
    yield name
    stack.docker.cli("rm", "-f", f"{name}-holder", check=False)
    stack.remove(name)
    record = stack.record(name)
    if record is not None:
        for path in record["mount_paths"]:
            stack.node.call("volume.unmount", name, path)
        stack.node.call("volume.detach", name)
        stack.node.call("volume.delete", name)


def wait_for(condition: Any, what: str, timeout: float = 30.0) -> None:
    """Poll `condition()` until it is true, failing with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def start_holder(stack: Stack, volume: str) -> str:
    """Start a detached container that keeps `volume` mounted; return its name."""
    name = f"{volume}-holder"
    stack.docker.cli(
        "run", "-d", "--name", name, "--network", "none", "-v", f"{volume}:/data", IMAGE,
        "sleep", "300",
    )  # fmt: skip
    wait_for(lambda: stack.docker.cli("inspect", "-f", "{{.State.Running}}", name).stdout
             .strip() == "true", f"container {name} to run")  # fmt: skip
    return name


def filesystem_type(path: str) -> str:
    """Return the type of the filesystem mounted at `path`, or "" when nothing is."""
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            if fields[4] == path:
                return fields[fields.index("-") + 1]
    return ""


def released(stack: Stack, name: str) -> bool:
    """Return True when volume `name` is neither mounted nor attached."""
    record = stack.record(name)
    assert record is not None
    return not record["mount_paths"] and not record["attached_on"]


# --- docker volume ------------------------------------------------------------------------------


def test_volume_create_ls_inspect(stack: Stack, volume: str) -> None:
    stack.create(volume, "size=1", "repl=1")
    record = stack.record(volume)
    assert record is not None
    assert record["size"] == GIB
    assert record["ha_level"] == 1

    listed = stack.docker.cli("volume", "ls", "--format", "{{.Driver}} {{.Name}}").stdout
    assert f"pxd {volume}" in listed.splitlines()

    inspected = json.loads(stack.docker.cli("volume", "inspect", volume).stdout)
    assert len(inspected) == 1
    assert inspected[0]["Name"] == volume
    assert inspected[0]["Driver"] == "pxd"
    assert inspected[0]["Scope"] == "global"
    assert inspected[0]["Status"]["size"] == GIB
    assert inspected[0]["Status"]["ha_level"] == 1
    assert inspected[0]["Status"]["state"] == "detached"
    assert inspected[0]["Status"]["id"] == record["id"]


def test_volume_create_labels_and_inline_name(stack: Stack, volume: str) -> None:
    stack.create(volume, "size=512M", "repl=1", "env=test")
    record = stack.record(volume)
    assert record is not None
    assert record["size"] == 512 << 20
    assert record["labels"] == {"env": "test"}

    inline = f"name={volume}-inl,size=2"
    stack.docker.cli("volume", "create", "-d", "pxd", inline)
    try:
        inlined = stack.record(f"{volume}-inl")
        assert inlined is not None
        assert inlined["size"] == 2 * GIB
    finally:
        stack.remove(inline)
    assert stack.record(f"{volume}-inl") is None


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ("0", "below the minimum volume size"),
        ("lots", "invalid size"),
        ("2T", "maximum volume size"),
    ],
)
def test_volume_create_bad_size(stack: Stack, volume: str, size: str, message: str) -> None:
    result = stack.docker.cli(
        "volume", "create", "-d", "pxd", "--opt", f"size={size}", volume, check=False
    )
    assert result.returncode != 0
    assert f"create {volume}: " in result.stderr
    assert message in result.stderr
    assert stack.record(volume) is None
    listed = stack.docker.cli("volume", "ls", "--format", "{{.Name}}").stdout.split()
    assert volume not in listed


def test_volume_rm(stack: Stack, volume: str) -> None:
    stack.create(volume, "size=1")
    stack.docker.cli("volume", "rm", volume)
    assert stack.record(volume) is None
    listed = stack.docker.cli("volume", "ls", "--format", "{{.Name}}").stdout.split()
    assert volume not in listed


# --- docker run ---------------------------------------------------------------------------------


def test_run_write_then_read(stack: Stack, volume: str) -> None:
    stack.create(volume, "size=1", "repl=1")
    stack.run(volume, "sh", "-c", "echo x > /data/f")
    assert released(stack, volume)

    result = stack.run(volume, "cat", "/data/f")
    assert result.stdout == "x\n"
    assert released(stack, volume)


def test_run_two_containers(stack: Stack, volume: str) -> None:
    stack.create(volume, "size=1")
    holder = start_holder(stack, volume)
    record = stack.record(volume)
    assert record is not None
    assert record["mount_paths"] == [stack.mountpoint(volume)]
    assert filesystem_type(stack.mountpoint(volume)) == "fuse.pxfs"

    stack.run(volume, "sh", "-c", "echo y > /data/g")
    record = stack.record(volume)
    assert record is not None
    assert record["mount_paths"] == [stack.mountpoint(volume)]
    assert stack.docker.cli("exec", holder, "cat", "/data/g").stdout == "y\n"

    inspected = json.loads(stack.docker.cli("volume", "inspect", volume).stdout)
    assert inspected[0]["Mountpoint"] == stack.mountpoint(volume)
    assert inspected[0]["Status"]["containers"] == 1

    stack.docker.cli("rm", "-f", holder)
    wait_for(lambda: released(stack, volume), f"{volume} to be unmounted and detached")
    assert not os.path.exists(stack.mountpoint(volume))


def test_counts_survive_sidecar_kill(stack: Stack, volume: str) -> None:
    stack.create(volume, "size=1")
    holder = start_holder(stack, volume)

    stack.sidecar.kill()
    stack.sidecar.start()
    stack.run(volume, "sh", "-c", "echo z > /data/h")
    record = stack.record(volume)
    assert record is not None
    assert record["mount_paths"] == [stack.mountpoint(volume)]
    assert stack.docker.cli("exec", holder, "cat", "/data/h").stdout == "z\n"

    stack.docker.cli("rm", "-f", holder)
    wait_for(lambda: released(stack, volume), f"{volume} to be unmounted and detached")


# --- the Engine API -----------------------------------------------------------------------------


def test_engine_api_create_list_delete(stack: Stack, volume: str) -> None:
    body = {"Name": volume, "Driver": "pxd", "DriverOpts": {"repl": "1", "size": "2"}}
    status, created = stack.docker.api("POST", "/volumes/create", body)
    assert status == 201, created
    assert created["Name"] == volume
    assert created["Driver"] == "pxd"
    record = stack.record(volume)
    assert record is not None
    assert record["size"] == 2 * GIB
    assert record["ha_level"] == 1

    status, listed = stack.docker.api("GET", "/volumes")
    assert status == 200
    drivers = {item["Name"]: item["Driver"] for item in listed["Volumes"]}
    assert drivers.get(volume) == "pxd"

    status, _ = stack.docker.api("DELETE", f"/volumes/{volume}")
    assert status == 204
    assert stack.record(volume) is None
    status, listed = stack.docker.api("GET", "/volumes")
    assert volume not in {item["Name"] for item in listed["Volumes"]}


def test_engine_api_bad_size(stack: Stack, volume: str) -> None:
    body = {"Name": volume, "Driver": "pxd", "DriverOpts": {"size": "-5"}}
    status, reply = stack.docker.api("POST", "/volumes/create", body)
    assert status == 500
    assert "invalid size" in reply["message"]
    assert stack.record(volume) is None
