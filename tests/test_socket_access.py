"""Who may use pxd's control socket and the sidecar's plugin socket: root, or socket_group.

A real pxd and sidecar run as root with their sockets in a directory that every user may
enter, so only the mode and group of each socket decide. pxctl and a plugin client run as
user nobody (65534) through setpriv(1), with and without the group GROUP in their groups.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nodeproc import REPO, START_TIMEOUT, Node, free_port

from pxfs import errors

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv"
)

NOBODY = 65534
#: A gid that no file of the host needs to know: setpriv can give it to nobody anyway.
GROUP = 42424

PLUGIN_CLIENT = """
import http.client, socket, sys
class Conn(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(sys.argv[1])
try:
    conn = Conn("localhost", timeout=10)
    conn.request("POST", "/Plugin.Activate", body=b"{}")
    print(conn.getresponse().read().decode())
except PermissionError:
    sys.exit(6)
"""


@pytest.fixture
def shared_root() -> Iterator[Path]:
    """A directory under /tmp that every user may enter, unlike pytest's tmp_path."""
    root = Path(tempfile.mkdtemp(prefix="pxfs-access-", dir="/tmp"))
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def start_node(root: Path, config_text: str) -> tuple[Node, Path]:
    """Start pxd and a sidecar with a pxd.toml of `config_text`; return the node, plugin socket."""
    config = root / "pxd.toml"
    config.write_text(config_text)
    node = Node(root)
    node.socket.parent.mkdir(parents=True)
    os.chmod(node.socket.parent, 0o755)
    with open(node.log_path, "ab") as log:
        node.pxd = subprocess.Popen(
            [sys.executable, "-m", "daemon.pxd", "--data-dir", str(node.data_dir),
             "--socket", str(node.socket), "--config", str(config)],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + START_TIMEOUT
    while not node.socket.exists():
        assert node.pxd.poll() is None, node.log_text()
        assert time.monotonic() < deadline, node.log_text()
        time.sleep(0.1)

    plugin = node.socket.parent / "plugin.sock"
    with open(root / "sidecar.log", "ab") as log:
        node.sidecar = subprocess.Popen(
            [sys.executable, "-m", "daemon.sidecar", "--config", str(config),
             "--socket", str(node.socket), "--rest", f"127.0.0.1:{free_port()}",
             "--plugin-socket", str(plugin), "--state-dir", str(root / "sidecar")],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    while not plugin.exists():
        assert node.sidecar.poll() is None, (root / "sidecar.log").read_text()
        assert time.monotonic() < deadline, (root / "sidecar.log").read_text()
        time.sleep(0.1)

    return node, plugin


def as_nobody(argv: list[str], *, in_group: bool) -> subprocess.CompletedProcess[str]:
    """Run `argv` as user nobody, with GROUP as its only group when `in_group`."""
    groups = ["--groups", str(GROUP)] if in_group else ["--clear-groups"]
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", *groups, *argv],
        cwd="/", capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def pxctl_as_nobody(node: Node, *, in_group: bool) -> subprocess.CompletedProcess[str]:
    """Run `pxctl status` against `node` as user nobody."""
    argv = [sys.executable, "-m", "pxfs.cli", "--socket", str(node.socket), "status"]
    return as_nobody(argv, in_group=in_group)


def plugin_as_nobody(plugin: Path, *, in_group: bool) -> subprocess.CompletedProcess[str]:
    """Send /Plugin.Activate to the plugin socket as user nobody."""
    return as_nobody([sys.executable, "-c", PLUGIN_CLIENT, str(plugin)], in_group=in_group)


def assert_permission_denied(result: subprocess.CompletedProcess[str], path: Path) -> None:
    """pxctl exited with PermissionDenied's code and one line that names the socket."""
    assert result.returncode == errors.PermissionDenied.exit_code, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"pxctl: permission denied on {path}: run as root or as a member of its group"
    ]


def socket_owner(path: Path) -> tuple[int, int, int]:
    """The mode bits, uid and gid of a socket file."""
    info = os.stat(path)
    assert stat.S_ISSOCK(info.st_mode)
    return stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid


def test_sockets_root_only_by_default(shared_root: Path) -> None:
    node, plugin = start_node(shared_root, "")
    try:
        assert socket_owner(node.socket) == (0o600, 0, 0)
        assert socket_owner(node.socket.parent / "peer.sock") == (0o600, 0, 0)
        assert socket_owner(plugin) == (0o600, 0, 0)
        for in_group in (False, True):
            assert_permission_denied(pxctl_as_nobody(node, in_group=in_group), node.socket)
            assert plugin_as_nobody(plugin, in_group=in_group).returncode == 6
        assert node.pxctl("status").returncode == 0
    finally:
        node.cleanup([])


def test_socket_group_admits_its_members(shared_root: Path) -> None:
    node, plugin = start_node(shared_root, f'socket_group = "{GROUP}"\n')
    try:
        assert socket_owner(node.socket) == (0o660, 0, GROUP)
        assert socket_owner(plugin) == (0o660, 0, GROUP)
        # The peer socket serves the replica store to mount children, which run as root.
        assert socket_owner(node.socket.parent / "peer.sock") == (0o600, 0, 0)

        member = pxctl_as_nobody(node, in_group=True)
        assert member.returncode == 0, member.stderr
        assert "pxfs is operational" in member.stdout
        activated = plugin_as_nobody(plugin, in_group=True)
        assert activated.returncode == 0, activated.stderr
        assert "VolumeDriver" in activated.stdout

        assert_permission_denied(pxctl_as_nobody(node, in_group=False), node.socket)
        assert plugin_as_nobody(plugin, in_group=False).returncode == 6
    finally:
        node.cleanup([])


def test_unknown_socket_group_stops_both(shared_root: Path) -> None:
    config = shared_root / "pxd.toml"
    config.write_text('socket_group = "no-such-group-pxfs"\n')
    expected = "socket_group 'no-such-group-pxfs' is not a group of this host"
    for daemon in ("daemon.pxd", "daemon.sidecar"):
        result = subprocess.run(
            [sys.executable, "-m", daemon, "--config", str(config), "--socket",
             str(shared_root / "pxd.sock")],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 1, result.stderr
        assert expected in result.stderr
        assert "Traceback" not in result.stderr
