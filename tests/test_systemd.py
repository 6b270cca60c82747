"""The systemd units, the example pxd.toml, and sd_notify readiness of real pxd and pxd-sidecar.

The daemons run as their units run them: the installed entry points, the working directory
"/", the capability bounding set of the unit and no_new_privs (through setpriv(1)), and
NOTIFY_SOCKET naming a datagram socket that the test binds, as systemd does for Type=notify.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nodeproc import Node, free_port, is_mountpoint

from pxfs.config import Config, load_config

REPO = Path(__file__).resolve().parent.parent
UNITS = ("pxd.service", "pxd-sidecar.service")
INSTALLED_BIN = "/opt/pxfs/bin"
# Where the test's interpreter has its entry points: the venv in which pxfs is installed.
VENV_BIN = Path(sys.executable).parent
NOTIFY_TIMEOUT = 60.0

needs_fuse = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"
)


def unit_settings(unit: str) -> dict[str, str]:
    """The KEY=VALUE lines of a unit file in systemd/, without comments and section headers."""
    settings = {}
    for line in (REPO / "systemd" / unit).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def venv_copy_of_unit(unit: str, directory: Path) -> Path:
    """Copy a unit to `directory` with ExecStart pointing at the entry points of this venv."""
    text = (REPO / "systemd" / unit).read_text()
    assert f"ExecStart={INSTALLED_BIN}/" in text, f"{unit} does not start {INSTALLED_BIN}/..."
    copy = directory / unit
    copy.write_text(text.replace(f"ExecStart={INSTALLED_BIN}/", f"ExecStart={VENV_BIN}/"))
    return copy


def sandbox_prefix(unit: str) -> list[str]:
    """setpriv arguments that apply the unit's CapabilityBoundingSet and NoNewPrivileges."""
    settings = unit_settings(unit)
    caps = [cap.removeprefix("CAP_").lower() for cap in settings["CapabilityBoundingSet"].split()]
    prefix = ["setpriv", "--bounding-set", ",".join(["-all", *("+" + cap for cap in caps)])]
    prefix += ["--inh-caps", "-all"]
    if settings.get("NoNewPrivileges") == "yes":
        prefix.append("--no-new-privs")
    return prefix


# capabilities(7) numbers of the capabilities that the units keep.
CAPABILITY_NUMBERS = {
    "CAP_DAC_OVERRIDE": 1,
    "CAP_DAC_READ_SEARCH": 2,
    "CAP_NET_BIND_SERVICE": 10,
    "CAP_SYS_ADMIN": 21,
}


def assert_sandboxed(pid: int, unit: str) -> None:
    """Check that process `pid` runs with the unit's bounding set and no_new_privs."""
    status = dict(
        line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    expected = 0
    for cap in unit_settings(unit)["CapabilityBoundingSet"].split():
        assert cap in CAPABILITY_NUMBERS, f"add {cap} of {unit} to CAPABILITY_NUMBERS"
        expected |= 1 << CAPABILITY_NUMBERS[cap]
    assert int(status["CapBnd"], 16) == expected
    assert int(status["CapEff"], 16) == expected
    assert status["NoNewPrivs"].strip() == "1"


class NotifySocket:
    """A datagram socket that receives sd_notify messages with the sender's pid."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        # Credentials let the test check the sender, as NotifyAccess=main does.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.messages: list[tuple[int, list[str]]] = []

    def receive(self, timeout: float) -> tuple[int, list[str]] | None:
        """One message as (sender pid, assignments), or None after `timeout` seconds."""
        self.sock.settimeout(timeout)
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            return None
        pid = -1
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", payload[:12])[0]
        message = (pid, data.decode().split("\n"))
        self.messages.append(message)
        return message

    def wait_for(self, assignment: str, process: subprocess.Popen[bytes], log: Path) -> int:
        """Wait for a message that contains `assignment`; return its sender's pid."""
        deadline = time.monotonic() + NOTIFY_TIMEOUT
        while time.monotonic() < deadline:
            message = self.receive(0.2)
            if message is not None and assignment in message[1]:
                return message[0]
            if message is None and process.poll() is not None:
                break
        raise AssertionError(
            f"no {assignment} (received {self.messages}, exit status {process.poll()}):\n"
            + log.read_text(errors="replace")
        )

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    """A NotifySocket at tmp_path/notify.sock."""
    receiver = NotifySocket(tmp_path / "notify.sock")
    yield receiver
    receiver.close()


def start_as_unit(
    unit: str, argv: list[str], notify: NotifySocket, log: Path
) -> subprocess.Popen[bytes]:
    """Start an entry point of this venv the way `unit` starts it, with NOTIFY_SOCKET set."""
    env = dict(os.environ, NOTIFY_SOCKET=str(notify.path))
    with open(log, "ab") as output:
        return subprocess.Popen(
            [*sandbox_prefix(unit), str(VENV_BIN / argv[0]), *argv[1:]],
            cwd="/",
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


# The units


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not found")
def test_units_verify(tmp_path: Path) -> None:
    copies = [venv_copy_of_unit(unit, tmp_path) for unit in UNITS]
    for unit in UNITS:
        binary = VENV_BIN / unit_settings(unit)["ExecStart"].split()[0].rsplit("/", 1)[1]
        assert binary.exists(), f"{binary} is missing: install pxfs into this venv first"
    result = subprocess.run(
        ["systemd-analyze", "verify", *map(str, copies)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    # verify also reports unknown or invalid settings as warnings with exit status 0.
    complaints = [line for line in result.stderr.splitlines() if str(tmp_path) in line]
    assert complaints == []


def test_unit_settings() -> None:
    for unit in UNITS:
        settings = unit_settings(unit)
        assert settings["Type"] == "notify", unit
        assert settings["Restart"] == "on-failure", unit
        assert settings["KillSignal"] == "SIGTERM", unit
        assert settings["Before"] == "docker.service", unit
        assert settings["ExecStart"].startswith(f"{INSTALLED_BIN}/"), unit
    pxd = unit_settings("pxd.service")
    assert pxd["KillMode"] == "mixed"
    assert "CAP_SYS_ADMIN" in pxd["CapabilityBoundingSet"].split()
    assert pxd["DeviceAllow"] == "/dev/fuse rw"
    sidecar = unit_settings("pxd-sidecar.service")
    assert sidecar["Requires"] == "pxd.service"
    assert sidecar["After"] == "pxd.service"


def test_install_script_venv_path() -> None:
    script = (REPO / "tools" / "install-systemd").read_text()
    assert f"venv={INSTALLED_BIN.removesuffix('/bin')}\n" in script
    result = subprocess.run(["bash", "-n", str(REPO / "tools" / "install-systemd")], timeout=30)
    assert result.returncode == 0


# The example configuration file

KEY_LINE = re.compile(r"^#(\w+) = (.+)$")


def test_example_config_documents_fields(tmp_path: Path) -> None:
    lines = (REPO / "systemd" / "pxd.toml").read_text().splitlines()
    keys = []
    for number, line in enumerate(lines):
        match = KEY_LINE.match(line)
        if match is None:
            continue
        keys.append(match.group(1))
        above = lines[number - 1]
        assert above.startswith("# "), f"{line!r} has no comment above it"
        assert not KEY_LINE.match(above), f"{line!r} has no comment above it"
    fields = [field.name for field in Config.__dataclass_fields__.values()]
    assert sorted(keys) == sorted(fields)

    uncommented = tmp_path / "pxd.toml"
    uncommented.write_text("\n".join(KEY_LINE.sub(r"\1 = \2", line) for line in lines) + "\n")
    config = load_config(uncommented)
    defaults = Config()
    for name in fields:
        expected = getattr(defaults, name)
        if name == "peer_socket":
            # None means peer.sock beside the control socket, which the file spells out.
            expected = defaults.peer_socket_path
        assert getattr(config, name) == expected, f"{name} in pxd.toml is not the default"


def test_example_config_as_shipped() -> None:
    assert load_config(REPO / "systemd" / "pxd.toml") == Config()


# Readiness notification of the real daemons


@needs_fuse
def test_pxd_ready_after_remount(tmp_path: Path, notify_socket: NotifySocket) -> None:
    node = Node(tmp_path / "node")
    mountpoint = tmp_path / "mnt"
    try:
        node.start()
        vol_id = node.mount_volume("notifyvol", mountpoint, size=64 << 20)
        (mountpoint / "greeting").write_text("hello\n")
        assert node.stop() == 0
        assert not is_mountpoint(mountpoint)

        argv = ["pxd", "--data-dir", str(node.data_dir), "--socket", str(node.socket)]
        node.pxd = start_as_unit("pxd.service", argv, notify_socket, node.log_path)
        sender = notify_socket.wait_for("READY=1", node.pxd, node.log_path)
        # Checked right after READY=1 arrives: it must not come before this state.
        status = node.call("node.status")
        record = node.call("volume.inspect", vol_id)
        assert status["status"] == "up"
        assert record["mounted"] == [str(mountpoint)]
        assert (mountpoint / "greeting").read_text() == "hello\n"
        assert sender == node.pxd.pid
        assert len(notify_socket.messages) == 1
        assert_sandboxed(node.pxd.pid, "pxd.service")

        node.pxd.send_signal(signal.SIGTERM)
        sender = notify_socket.wait_for("STOPPING=1", node.pxd, node.log_path)
        assert sender == node.pxd.pid
        assert node.pxd.wait(timeout=60) == 0
        assert not is_mountpoint(mountpoint)
    finally:
        node.cleanup([mountpoint])


@needs_fuse
def test_sidecar_ready_when_listening(tmp_path: Path, notify_socket: NotifySocket) -> None:
    node = Node(tmp_path / "node")
    log = tmp_path / "sidecar.log"
    plugin_socket = node.root / "run" / "plugin.sock"
    try:
        node.start()
        node.rest_port = free_port()
        argv = [
            "pxd-sidecar",
            "--socket", str(node.socket),
            "--rest", f"127.0.0.1:{node.rest_port}",
            "--plugin-socket", str(plugin_socket),
            "--state-dir", str(tmp_path / "sidecar-state"),
            "--docker-mount-base", str(tmp_path / "docker-mounts"),
        ]  # fmt: skip
        node.sidecar = start_as_unit("pxd-sidecar.service", argv, notify_socket, log)
        sender = notify_socket.wait_for("READY=1", node.sidecar, log)
        # Checked right after READY=1 arrives, without retries.
        status, body = node.rest("GET", "/v1/osd-volumes/versions")
        assert status == 200, body
        assert plugin_socket.is_socket()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(plugin_socket))
        assert sender == node.sidecar.pid
        assert_sandboxed(node.sidecar.pid, "pxd-sidecar.service")

        node.sidecar.send_signal(signal.SIGTERM)
        sender = notify_socket.wait_for("STOPPING=1", node.sidecar, log)
        assert sender == node.sidecar.pid
        assert node.sidecar.wait(timeout=60) == 0
        assert not plugin_socket.exists()
    finally:
        node.cleanup([])
