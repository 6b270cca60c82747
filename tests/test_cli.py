"""pxctl (pxfs.cli) run as a subprocess against a fake pxd on a unix socket."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pxfs import cliparser, errors
from pxfs.api.osd import volume_to_osd

REPO = Path(__file__).resolve().parent.parent
GIB = 1 << 30


def _load_fake_pxd_module() -> Any:
    # The fake pxd lives with the sidecar tests. "import conftest" would be ambiguous between
    # the conftest.py files of tests/sidecar and tests/trio, so it is loaded by path.
    path = Path(__file__).parent / "sidecar" / "conftest.py"
    spec = importlib.util.spec_from_file_location("fake_pxd_for_cli_tests", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_fake = _load_fake_pxd_module()


@pytest.fixture
def pxd(tmp_path: Path) -> Iterator[Any]:
    """A fake pxd served on a unix socket; its path is `pxd.socket`."""
    fake = _fake.FakePxd()
    with _fake.FakePxdServer(fake, _fake.short_socket_path(tmp_path, "pxd.sock")):
        yield fake


def pxctl(
    socket_path: Path | None, *args: str, cwd: Path = REPO, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Run pxctl with `args`, with --socket when `socket_path` is given."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PXFS_SOCKET", None)
    env.update(kwargs.pop("env", {}))
    command = [sys.executable, "-m", "pxfs.cli"]
    if socket_path is not None:
        command += ["--socket", str(socket_path)]
    return subprocess.run(
        [*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60, **kwargs
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], exit_code: int) -> None:
    """Check that pxctl failed with `exit_code` and one `pxctl: ` line on stderr."""
    assert result.returncode == exit_code, result.stderr
    assert result.stderr.startswith("pxctl: ")
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def create(pxd: Any, name: str, *args: str) -> str:
    """Create a volume through pxctl and return its id."""
    result = pxctl(pxd.socket, "volume", "create", name, *args)
    assert result.returncode == 0, result.stderr
    prefix = "Volume successfully created: "
    assert result.stdout.startswith(prefix)
    return result.stdout[len(prefix) :].strip()


# --- volume create ------------------------------------------------------------------------------


def test_create_prints_id(pxd: Any) -> None:
    volume_id = create(pxd, "vol1", "--size", "2", "--repl", "1")
    assert volume_id.isdigit()
    record = pxd.volumes[volume_id]
    assert record["name"] == "vol1"
    assert record["size"] == 2 * GIB
    assert record["ha_level"] == 1
    assert record["labels"] == {}


def test_create_defaults_and_labels(pxd: Any) -> None:
    volume_id = create(pxd, "vol1", "--label", "app=db,tier=gold", "--label", "env=prod")
    record = pxd.volumes[volume_id]
    assert record["size"] == GIB
    assert record["ha_level"] == 1
    assert record["labels"] == {"app": "db", "tier": "gold", "env": "prod"}


def test_create_size_with_suffix(pxd: Any) -> None:
    volume_id = create(pxd, "vol1", "--size", "512M", "--repl", "3")
    assert pxd.volumes[volume_id]["size"] == 512 << 20
    assert pxd.volumes[volume_id]["ha_level"] == 3


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["vol1", "--size", "ten"], "invalid size"),
        (["vol1", "--size", "0"], "invalid size '0': below the minimum volume size of 1 MiB"),
        (["vol1", "--size", "1K"], "invalid size '1K': below the minimum volume size of 1 MiB"),
        (["vol1", "--size", "100000"], "maximum volume size"),
        (["vol1", "--repl", "4"], "invalid replica count"),
        (["vol1", "--repl", "x"], "invalid replica count"),
        (["vol1", "--label", "novalue"], "invalid label"),
        (["vol1", "--label", "a=b,a=c"], "duplicate label key 'a'"),
        (["vol1", "--label", "a=b", "--label", "a=c"], "duplicate label key 'a'"),
        (["vol1", "--nodes", "a,,b"], "invalid node list 'a,,b'"),
        (["vol1", "--nodes", ""], "invalid node list ''"),
        (["vol1", "--repl", "\u0661"], "invalid replica count"),
        (["vol1", "--repl", "\uff12"], "invalid replica count"),
        (["vol1\u2028x"], "non-printable character U+2028"),
        ([" vol1"], "starts or ends with whitespace"),
        (["a/b"], "'/'"),
        ([".."], "reserved"),
        ([""], "empty"),
        ([], "required"),
    ],
)
def test_create_bad_input(pxd: Any, args: list[str], expected: str) -> None:
    result = pxctl(pxd.socket, "volume", "create", *args)
    assert_one_line_error(result, errors.InvalidArgument.exit_code)
    assert expected in result.stderr
    assert pxd.calls == []


def test_create_conflict_exit_code(pxd: Any) -> None:
    create(pxd, "vol1", "--size", "1")
    result = pxctl(pxd.socket, "volume", "create", "vol1", "--size", "2")
    assert_one_line_error(result, errors.AlreadyExists.exit_code)
    assert "vol1" in result.stderr
    assert len(pxd.volumes) == 1


def test_create_on_nodes(pxd: Any) -> None:
    pxd.other_nodes = [{"node_id": "node-b2", "online": True, "ip": "127.0.0.2"}]
    volume_id = create(pxd, "vol1", "--repl", "2", "--nodes", f"127.0.0.2,{pxd.node_id}")
    assert pxd.volumes[volume_id]["replica_nodes"] == ["node-b2", pxd.node_id]
    [(_, (request,))] = [call for call in pxd.calls if call[0] == "volume.create"]
    assert request["nodes"] == ["node-b2", pxd.node_id]


def test_create_on_unknown_node(pxd: Any) -> None:
    result = pxctl(pxd.socket, "volume", "create", "vol1", "--nodes", "10.9.9.9")
    assert_one_line_error(result, errors.InvalidArgument.exit_code)
    assert "no node with IP or id '10.9.9.9'" in result.stderr
    assert pxd.volumes == {}


def test_create_json(pxd: Any) -> None:
    result = pxctl(pxd.socket, "-j", "volume", "create", "vol1")
    assert result.returncode == 0, result.stderr
    volume = json.loads(result.stdout)
    assert volume["locator"] == {"name": "vol1"}
    assert volume["id"] in pxd.volumes


# --- volume list and inspect --------------------------------------------------------------------


def test_list_table(pxd: Any) -> None:
    create(pxd, "alpha", "--size", "1")
    beta = create(pxd, "beta", "--size", "2", "--repl", "2")
    pxd.attach(beta)
    result = pxctl(pxd.socket, "volume", "list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "ID", "NAME", "SIZE", "HA", "SHARED", "ENCRYPTED", "IO_PRIORITY", "STATUS"
    ]  # fmt: skip
    rows = {line.split()[1]: line for line in lines[1:]}
    assert set(rows) == {"alpha", "beta"}
    assert rows["alpha"].endswith("up - detached")
    assert rows["beta"].endswith(f"up - attached on {pxd.node_id}")
    assert "2.0 GiB" in rows["beta"]
    assert lines[0].index("NAME") == lines[1].index(lines[1].split()[1])


def test_list_shows_half_deleted_volume(pxd: Any) -> None:
    create(pxd, "gone", "--size", "1")
    pxd.find("gone")["deleting"] = True
    result = pxctl(pxd.socket, "volume", "list")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].endswith("up - being deleted")


def test_list_empty_prints_header(pxd: Any) -> None:
    result = pxctl(pxd.socket, "v", "l")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "ID", "NAME", "SIZE", "HA", "SHARED", "ENCRYPTED", "IO_PRIORITY", "STATUS"
    ]  # fmt: skip


def test_list_filters(pxd: Any) -> None:
    create(pxd, "alpha", "--label", "env=prod")
    create(pxd, "beta")
    by_label = pxctl(pxd.socket, "volume", "list", "--label", "env=prod")
    assert [line.split()[1] for line in by_label.stdout.splitlines()[1:]] == ["alpha"]
    by_name = pxctl(pxd.socket, "volume", "list", "--name", "beta")
    assert [line.split()[1] for line in by_name.stdout.splitlines()[1:]] == ["beta"]


@pytest.mark.parametrize("flags", [["-j", "volume", "list"], ["volume", "list", "--json"]])
def test_list_json_is_rest_shape(pxd: Any, flags: list[str]) -> None:
    volume_id = create(pxd, "vol1")
    result = pxctl(pxd.socket, *flags)
    assert result.returncode == 0, result.stderr
    volumes = json.loads(result.stdout)
    assert volumes == [volume_to_osd(pxd.volumes[volume_id], pxd.node_id)]


def test_inspect_text(pxd: Any) -> None:
    volume_id = create(pxd, "vol1", "--size", "2", "--label", "app=db")
    result = pxctl(pxd.socket, "volume", "inspect", "vol1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Volume")
    assert lines[0].endswith(volume_id)
    fields = {
        line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip()
        for line in lines[1:]
        if line.startswith("\t") and not line.startswith("\t\t") and ":" in line
    }
    assert fields["Name"] == "vol1"
    assert fields["Size"] == "2.0 GiB"
    assert fields["HA"] == "1"
    assert fields["State"] == "detached"
    assert fields["Labels"] == "app=db"
    assert fields["Format"] == "fuse"
    colons = {
        line.index(":")
        for line in lines
        if line.startswith("\t") and not line.startswith("\t\t") and "  :" in line
    }
    assert len(colons) == 1
    assert f"\t\t\tNode\t:  {pxd.node_id}" in lines


def test_inspect_escapes_control_characters(pxd: Any) -> None:
    volume_id = create(pxd, "vol1")
    # Planted in the record directly: pxd rejects such labels now, but older catalogs may have them.
    pxd.volumes[volume_id]["labels"] = {"k": "a\x00b\nc\x1b[31m"}
    result = pxctl(pxd.socket, "volume", "inspect", "vol1")
    assert result.returncode == 0, result.stderr
    assert "\x00" not in result.stdout
    assert "\x1b" not in result.stdout
    labels = [line for line in result.stdout.splitlines() if "Labels" in line]
    assert labels == ["\tLabels          :  k=a\\x00b\\nc\\x1b[31m"]


def test_list_escapes_control_characters(pxd: Any) -> None:
    volume_id = create(pxd, "vol1")
    pxd.volumes[volume_id]["attached_on"] = "node\x1b[2J"
    result = pxctl(pxd.socket, "volume", "list")
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout
    assert result.stdout.splitlines()[1].endswith("up - attached on node\\x1b[2J")


def test_inspect_by_id_and_json(pxd: Any) -> None:
    volume_id = create(pxd, "vol1")
    result = pxctl(pxd.socket, "volume", "inspect", volume_id, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [volume_to_osd(pxd.volumes[volume_id], pxd.node_id)]


def test_inspect_attached_state(pxd: Any, tmp_path: Path) -> None:
    create(pxd, "vol1")
    pxd.attach("vol1")
    result = pxctl(pxd.socket, "v", "i", "vol1")
    assert f"Attached: {pxd.node_id}" in result.stdout


def test_inspect_missing_exit_code(pxd: Any) -> None:
    result = pxctl(pxd.socket, "volume", "inspect", "ghost")
    assert_one_line_error(result, errors.NotFound.exit_code)
    assert "ghost" in result.stderr


# --- volume delete and check --------------------------------------------------------------------


def test_delete(pxd: Any) -> None:
    create(pxd, "vol1")
    result = pxctl(pxd.socket, "volume", "delete", "vol1")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Volume vol1 successfully deleted\n"
    assert pxd.volumes == {}


def test_delete_attached_is_busy(pxd: Any) -> None:
    create(pxd, "vol1")
    pxd.attach("vol1")
    result = pxctl(pxd.socket, "volume", "delete", "vol1")
    assert_one_line_error(result, errors.Busy.exit_code)
    assert len(pxd.volumes) == 1


def test_check_clean(pxd: Any) -> None:
    create(pxd, "vol1")
    result = pxctl(pxd.socket, "volume", "check", "vol1")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Volume vol1 is clean\n"


def test_check_problems_exit_nonzero(pxd: Any) -> None:
    create(pxd, "vol1")
    pxd.problems["vol1"] = ["inode 7: block 12 claimed twice", "directory 2: bad entry"]
    result = pxctl(pxd.socket, "volume", "check", "vol1")
    assert result.returncode == errors.Corrupted.exit_code
    assert "2 problem(s)" in result.stdout
    assert "inode 7: block 12 claimed twice" in result.stdout
    assert "directory 2: bad entry" in result.stdout


def test_check_json(pxd: Any) -> None:
    create(pxd, "vol1")
    pxd.problems["vol1"] = ["bad"]
    result = pxctl(pxd.socket, "volume", "check", "vol1", "-j")
    assert result.returncode == errors.Corrupted.exit_code
    assert json.loads(result.stdout) == {"clean": False, "problems": ["bad"]}


def test_check_attached_is_busy(pxd: Any) -> None:
    create(pxd, "vol1")
    pxd.attach("vol1")
    assert_one_line_error(pxctl(pxd.socket, "volume", "check", "vol1"), errors.Busy.exit_code)


# --- host ---------------------------------------------------------------------------------------


def test_host_attach_mount_unmount_detach(pxd: Any, tmp_path: Path) -> None:
    volume_id = create(pxd, "vol1")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()

    attached = pxctl(pxd.socket, "host", "attach", "vol1")
    assert attached.returncode == 0, attached.stderr
    assert attached.stdout == f"Volume vol1 successfully attached on node {pxd.node_id}\n"

    # A relative path is resolved against pxctl's working directory, not pxd's.
    mounted = pxctl(pxd.socket, "host", "mount", "vol1", "mnt", cwd=tmp_path)
    assert mounted.returncode == 0, mounted.stderr
    assert mounted.stdout == f"Volume vol1 successfully mounted at {mountpoint}\n"
    assert pxd.volumes[volume_id]["mount_paths"] == [str(mountpoint)]

    busy = pxctl(pxd.socket, "host", "detach", "vol1")
    assert_one_line_error(busy, errors.Busy.exit_code)

    unmounted = pxctl(pxd.socket, "host", "unmount", "vol1", str(mountpoint))
    assert unmounted.returncode == 0, unmounted.stderr
    assert unmounted.stdout == f"Volume vol1 successfully unmounted from {mountpoint}\n"

    detached = pxctl(pxd.socket, "host", "detach", "vol1")
    assert detached.returncode == 0, detached.stderr
    assert detached.stdout == "Volume vol1 successfully detached\n"
    assert pxd.volumes[volume_id]["attached_on"] == ""


def test_host_mount_errors(pxd: Any, tmp_path: Path) -> None:
    create(pxd, "vol1")
    not_attached = pxctl(pxd.socket, "host", "mount", "vol1", str(tmp_path))
    assert_one_line_error(not_attached, errors.InvalidArgument.exit_code)
    pxd.attach("vol1")
    missing = pxctl(pxd.socket, "host", "mount", "vol1", str(tmp_path / "absent"))
    assert_one_line_error(missing, errors.NotADirectory.exit_code)
    not_mounted = pxctl(pxd.socket, "host", "unmount", "vol1", str(tmp_path))
    assert_one_line_error(not_mounted, errors.NotFound.exit_code)


@pytest.mark.parametrize("verb", ["mount", "unmount"])
def test_host_empty_path_rejected(pxd: Any, tmp_path: Path, verb: str) -> None:
    create(pxd, "vol1")
    pxd.attach("vol1")
    result = pxctl(pxd.socket, "host", verb, "vol1", "", cwd=tmp_path)
    assert_one_line_error(result, errors.InvalidArgument.exit_code)
    assert "invalid path ''" in result.stderr
    assert pxd.find("vol1")["mount_paths"] == []


# --- status and connection ----------------------------------------------------------------------


def test_status_text(pxd: Any) -> None:
    create(pxd, "vol1")
    result = pxctl(pxd.socket, "status")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "Status: pxfs is operational"
    assert lines[1] == f"Node ID: {pxd.node_id}"
    assert any(line.split(":", 1)[1].strip() == "1 (0 mounted)" for line in lines[2:])
    assert any("100.0 GiB" in line for line in lines)


def test_status_json(pxd: Any) -> None:
    result = pxctl(pxd.socket, "--json", "status")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["node_id"] == pxd.node_id


def test_socket_from_environment(pxd: Any) -> None:
    result = pxctl(None, "status", env={"PXFS_SOCKET": str(pxd.socket)})
    assert result.returncode == 0, result.stderr
    assert pxd.node_id in result.stdout


def test_pxd_not_running(tmp_path: Path) -> None:
    path = tmp_path / "absent.sock"
    result = pxctl(path, "volume", "list")
    assert_one_line_error(result, errors.Unavailable.exit_code)
    assert "pxd is not running" in result.stderr
    assert str(path) in result.stderr


def test_stale_socket_file(tmp_path: Path) -> None:
    path = _fake.short_socket_path(tmp_path, "stale.sock")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
    try:
        result = pxctl(path, "status")
    finally:
        path.unlink()
    assert_one_line_error(result, errors.Unavailable.exit_code)
    assert "pxd is not running" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run pxctl as another user")
def test_permission_denied_message(pxd: Any) -> None:
    # The socket's directory belongs to root with mode 0700, so the user "nobody" cannot
    # connect.
    os.chmod(pxd.socket.parent, 0o700)
    result = pxctl(pxd.socket, "status", user=65534, group=65534, cwd=Path("/"))
    assert_one_line_error(result, errors.PermissionDenied.exit_code)
    assert "permission denied" in result.stderr
    assert str(pxd.socket) in result.stderr


def test_internal_error_one_line(pxd: Any) -> None:
    pxd.fail_next = RuntimeError("catalog exploded")
    result = pxctl(pxd.socket, "volume", "list")
    assert_one_line_error(result, errors.InternalError.exit_code)
    assert "catalog exploded" in result.stderr


@pytest.mark.parametrize(
    "args",
    [[], ["volume"], ["host"], ["volume", "frobnicate"], ["bogus"], ["host", "mount", "vol1"]],
)
def test_usage_errors_one_line(args: list[str], tmp_path: Path) -> None:
    result = pxctl(tmp_path / "unused.sock", *args)
    assert_one_line_error(result, errors.InvalidArgument.exit_code)
    assert "--help" in result.stderr


def test_help_exits_zero() -> None:
    result = pxctl(None, "volume", "create", "--help")
    assert result.returncode == 0
    assert "--size" in result.stdout
    assert "--repl" in result.stdout


# --- arguments that are not valid UTF-8 ---------------------------------------------------------

# Python decodes the argument bytes b"\xff" to the lone surrogate "\udcff", and subprocess
# encodes it back to b"\xff".
NOT_UTF8 = "\udcff"


@pytest.mark.parametrize(
    "args",
    [
        ["volume", "inspect", NOT_UTF8],
        ["volume", "delete", NOT_UTF8],
        ["volume", "check", NOT_UTF8],
        ["volume", "create", NOT_UTF8],
        ["volume", "list", "--name", NOT_UTF8],
        ["volume", "list", "--label", f"k={NOT_UTF8}"],
        ["volume", "create", "vol1", "--label", f"{NOT_UTF8}=v"],
        ["host", "attach", NOT_UTF8],
        ["host", "detach", NOT_UTF8],
        ["host", "mount", NOT_UTF8, "/tmp"],
        ["host", "mount", "vol1", f"/tmp/{NOT_UTF8}"],
        ["host", "unmount", NOT_UTF8, "/tmp"],
        ["host", "unmount", "vol1", f"/tmp/{NOT_UTF8}"],
    ],
)
def test_non_utf8_argument_one_line(pxd: Any, args: list[str]) -> None:
    result = pxctl(pxd.socket, *args)
    assert_one_line_error(result, errors.InvalidArgument.exit_code)
    assert "not valid UTF-8" in result.stderr
    # The parser rejects it and names the argument, before anything is sent to pxd.
    assert "argument " in result.stderr
    assert pxd.volumes == {}


def test_socket_not_pxd(tmp_path: Path) -> None:
    path = _fake.short_socket_path(tmp_path, "http.sock")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen(1)
        server.settimeout(30)
        # The kernel queues the connection, so pxctl can send its request and read this reply
        # before the test accepts.
        process = subprocess.Popen(
            [sys.executable, "-m", "pxfs.cli", "--socket", str(path), "status"],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stderr=subprocess.PIPE,
            text=True,
        )
        connection, _ = server.accept()
        with connection:
            connection.settimeout(30)
            connection.recv(4096)
            connection.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            _, stderr = process.communicate(timeout=60)
    result = subprocess.CompletedProcess(process.args, process.returncode, "", stderr)
    assert_one_line_error(result, errors.ProtocolError.exit_code)
    assert f"the socket at {path} does not speak the pxd protocol" in stderr
    assert "exceeds" not in stderr


def test_socket_path_is_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "file.sock"
    path.write_text("")
    result = pxctl(path, "status")
    assert_one_line_error(result, errors.Unavailable.exit_code)
    assert f"{path} is not a socket" in result.stderr


# --- volume inspect counters, update, ha-update, stats ------------------------------------------


def inspect_fields(stdout: str) -> dict[str, str]:
    """Parse the `label : value` lines of `volume inspect` output."""
    return {
        line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip()
        for line in stdout.splitlines()
        if line.startswith("\t") and not line.startswith("\t\t") and ":" in line
    }


def test_inspect_shows_counters(pxd: Any) -> None:
    volume_id = create(pxd, "vol1")
    pxd.volumes[volume_id]["usage"] = 3 << 20
    pxd.totals[volume_id] = {
        "reads": 5,
        "read_ms": 7,
        "read_bytes": 20480,
        "writes": 64,
        "write_ms": 90,
        "write_bytes": 4 << 20,
        "io_progress": 1,
    }
    result = pxctl(pxd.socket, "volume", "inspect", "vol1")
    assert result.returncode == 0, result.stderr
    fields = inspect_fields(result.stdout)
    assert fields["Reads"] == "5"
    assert fields["Reads MS"] == "7"
    assert fields["Bytes Read"] == "20480"
    assert fields["Writes"] == "64"
    assert fields["Writes MS"] == "90"
    assert fields["Bytes Written"] == str(4 << 20)
    assert fields["IOs in progress"] == "1"
    assert fields["Bytes used"] == "3.0 MiB"


def test_update_size(pxd: Any) -> None:
    create(pxd, "vol1", "--size", "1")
    result = pxctl(pxd.socket, "volume", "update", "--size", "3", "vol1")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Update Volume: Volume update successful for volume vol1\n"
    assert pxd.find("vol1")["size"] == 3 * GIB


def test_update_shrink_exit_code(pxd: Any) -> None:
    create(pxd, "vol1", "--size", "2")
    result = pxctl(pxd.socket, "volume", "update", "--size", "1", "vol1")
    assert_one_line_error(result, errors.InvalidArgument.exit_code)
    assert "shrinking is not supported" in result.stderr
    assert pxd.find("vol1")["size"] == 2 * GIB


def test_update_labels_merge_and_remove(pxd: Any) -> None:
    create(pxd, "vol1", "--label", "app=db,tier=gold")
    result = pxctl(pxd.socket, "volume", "update", "--label", "tier=,env=prod", "vol1")
    assert result.returncode == 0, result.stderr
    assert pxd.find("vol1")["labels"] == {"app": "db", "env": "prod"}


def test_update_json(pxd: Any) -> None:
    volume_id = create(pxd, "vol1")
    result = pxctl(pxd.socket, "volume", "update", "--size", "2G", "vol1", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == volume_to_osd(pxd.volumes[volume_id], pxd.node_id)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["volume", "update", "vol1"], "needs --size or --label"),
        (["volume", "update", "--size", "0", "vol1"], "invalid size"),
        (["volume", "update", "--size", "ten", "vol1"], "invalid size"),
        (["volume", "update", "--label", "novalue", "vol1"], "expected KEY=VALUE"),
        (["volume", "update", "--size", "2"], "required"),
        (["volume", "ha-update", "vol1"], "--repl"),
        (["volume", "ha-update", "--repl", "4", "vol1"], "invalid replica count"),
        (["volume", "stats", "vol1", "--interval", "0"], "invalid interval"),
        (["volume", "stats", "vol1", "--interval", "nan"], "invalid interval"),
        (["volume", "stats", "vol1", "--interval", "x"], "invalid interval"),
        (["volume", "stats", "vol1", "--count", "0"], "invalid count"),
        (["volume", "stats", "vol1", "--count", "-1"], "invalid count"),
        (["cluster"], "required"),
    ],
)
def test_new_commands_bad_arguments(pxd: Any, args: list[str], expected: str) -> None:
    create(pxd, "vol1")
    before = json.dumps(pxd.volumes, sort_keys=True)
    result = pxctl(pxd.socket, *args)
    assert_one_line_error(result, errors.InvalidArgument.exit_code)
    assert expected in result.stderr
    assert json.dumps(pxd.volumes, sort_keys=True) == before


@pytest.mark.parametrize(
    "args",
    [
        ["volume", "update", "--size", "2", "ghost"],
        ["volume", "update", "--label", "a=b", "ghost"],
        ["volume", "ha-update", "--repl", "2", "ghost"],
        ["volume", "stats", "ghost", "--count", "1"],
    ],
)
def test_new_commands_unknown_volume(pxd: Any, args: list[str]) -> None:
    result = pxctl(pxd.socket, *args)
    assert_one_line_error(result, errors.NotFound.exit_code)
    assert "volume ghost not found" in result.stderr
    assert result.stdout == ""


def test_stats_default_interval_one_second() -> None:
    args = cliparser.build_parser().parse_args(["volume", "stats", "vol1"])
    assert args.interval == 1.0


def test_ha_update_needs_nodes(pxd: Any) -> None:
    create(pxd, "vol1")
    result = pxctl(pxd.socket, "volume", "ha-update", "--repl", "2", "vol1")
    assert_one_line_error(result, errors.InvalidArgument.exit_code)
    assert "needs 2 online nodes" in result.stderr


def test_ha_update_starts_the_change(pxd: Any) -> None:
    pxd.other_nodes = [{"node_id": "node-b2", "online": True, "status": "up"}]
    create(pxd, "vol1")
    result = pxctl(pxd.socket, "volume", "ha-update", "--repl", "2", "vol1")
    assert result.returncode == 0, result.stderr
    assert "Replication update started successfully for volume vol1" in result.stdout
    assert len(pxd.find("vol1")["replica_nodes_next"]) == 2


def test_ha_update_on_named_node(pxd: Any) -> None:
    pxd.other_nodes = [
        {"node_id": "node-b2", "online": True, "status": "up"},
        {"node_id": "node-b3", "online": True, "status": "up"},
    ]
    create(pxd, "vol1")
    result = pxctl(pxd.socket, "volume", "ha-update", "--repl", "2", "--nodes", "node-b3", "vol1")
    assert result.returncode == 0, result.stderr
    assert pxd.find("vol1")["replica_nodes_next"][1:] == ["node-b3"]


def test_ha_update_same_level(pxd: Any) -> None:
    create(pxd, "vol1")
    result = pxctl(pxd.socket, "volume", "ha-update", "--repl", "1", "vol1")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Volume vol1 already has 1 replica(s)\n"


def test_stats_lines(pxd: Any) -> None:
    volume_id = create(pxd, "vol1")
    pxd.live[volume_id] = {
        "reads": 10,
        "read_bytes": 2 << 20,
        "read_ms": 10,
        "writes": 30,
        "write_bytes": 4 << 20,
        "write_ms": 50,
        "io_progress": 3,
    }
    result = pxctl(pxd.socket, "volume", "stats", "vol1", "--interval", "0.1", "--count", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4
    assert lines[0].split() == [
        "TIME", "READS", "BYTES", "READ", "WRITES", "BYTES", "WRITTEN", "IOPS", "IO", "DEPTH",
        "READ", "TPUT", "WRITE", "TPUT", "SVC", "TIME", "(ms)",
    ]  # fmt: skip
    cells = lines[1].split()
    assert cells[0].endswith("Z")
    # 40 requests over the 2 s window; (10 + 50) ms over 40 requests.
    assert cells[1:] == [
        "10", "2.0", "MiB", "30", "4.0", "MiB", "20.0", "3", "1.0", "MiB/s", "2.0", "MiB/s",
        "1.50",
    ]  # fmt: skip
    assert [name for name, _ in pxd.calls].count("volume.stats_live") == 3


def test_stats_help_says_service_time(tmp_path: Path) -> None:
    result = pxctl(tmp_path / "absent.sock", "volume", "stats", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "service time inside pxfs" in text
    assert "/dev/fuse" in text
    assert "LATENCY" not in text


def test_stats_idle_volume(pxd: Any) -> None:
    create(pxd, "vol1")
    result = pxctl(pxd.socket, "volume", "stats", "vol1", "--count", "1")
    assert result.returncode == 0, result.stderr
    cells = result.stdout.splitlines()[1].split()
    assert cells[1:] == [
        "0", "0", "B", "0", "0", "B", "0.0", "0", "0", "B/s", "0", "B/s", "0.00",
    ]  # fmt: skip


def test_stats_json_lines(pxd: Any) -> None:
    volume_id = create(pxd, "vol1")
    pxd.live[volume_id] = {"writes": 2}
    result = pxctl(pxd.socket, "-j", "volume", "stats", "vol1", "--count", "2", "--interval", "0.1")
    assert result.returncode == 0, result.stderr
    samples = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(samples) == 2
    assert samples[0]["writes"] == 2
    assert samples[0]["interval_ms"] == 2000
    assert samples[0]["time"].endswith("Z")


# --- cluster list -------------------------------------------------------------------------------


def test_cluster_list_table(pxd: Any) -> None:
    pxd.other_nodes = [
        {"node_id": "node-b2", "hostname": "hb", "ip": "127.0.0.2", "online": False},
        {"node_id": "node-c3", "hostname": "hc", "online": True, "status": "starting"},
    ]
    result = pxctl(pxd.socket, "cluster", "list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "ID", "HOSTNAME", "IP", "CAPACITY", "USED", "FREE", "VOLUMES", "VERSION", "STATUS",
    ]  # fmt: skip
    assert lines[1].split() == [
        pxd.node_id, "fakehost", "127.0.0.1", "100.0", "GiB", "40.0", "GiB", "60.0", "GiB",
        "0", "0.1.0", "Online",
    ]  # fmt: skip
    assert lines[2].startswith("node-b2")
    assert lines[2].endswith("Offline")
    assert lines[3].endswith("Online (starting)")


def test_cluster_list_json(pxd: Any) -> None:
    result = pxctl(pxd.socket, "cluster", "l", "--json")
    assert result.returncode == 0, result.stderr
    nodes = json.loads(result.stdout)
    assert [node["node_id"] for node in nodes] == [pxd.node_id]
    assert nodes[0]["online"] is True


def test_cluster_list_pxd_down(tmp_path: Path) -> None:
    result = pxctl(tmp_path / "absent.sock", "cluster", "list")
    assert_one_line_error(result, errors.Unavailable.exit_code)
    assert "pxd is not running" in result.stderr


# --- replication status -------------------------------------------------------------------------


def degrade(pxd: Any, volume_id: str) -> list[str]:
    """Mark the second replica of a volume out of sync; return the replica nodes."""
    record = pxd.volumes[volume_id]
    nodes = list(record["replica_nodes"])
    record["write_set"] = nodes[:1]
    record["out_of_sync"] = nodes[1:2]
    return nodes


def test_inspect_clean_replication(pxd: Any) -> None:
    create(pxd, "vol1", "--repl", "2")
    result = pxctl(pxd.socket, "volume", "inspect", "vol1")
    assert result.returncode == 0, result.stderr
    fields = inspect_fields(result.stdout)
    assert fields["Status"] == "up"
    assert fields["Replication Status"] == "Up"
    assert "\t\tRuntimeState    :  clean" in result.stdout.splitlines()
    assert "\t\tWriteSet        :  [0 1]" in result.stdout.splitlines()


def test_inspect_degraded_replication(pxd: Any) -> None:
    volume_id = create(pxd, "vol1", "--repl", "2")
    nodes = degrade(pxd, volume_id)
    result = pxctl(pxd.socket, "volume", "inspect", "vol1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    fields = inspect_fields(result.stdout)
    assert fields["Status"] == "degraded"
    assert fields["Replication Status"] == "Degraded"
    assert f"\t\t\tNode\t:  {nodes[0]}" in lines
    assert f"\t\t\tNode\t:  {nodes[1]} (out of sync)" in lines
    assert "\t\tRuntimeState    :  degraded" in lines
    assert "\t\tWriteSet        :  [0]" in lines


def test_inspect_resync_progress(pxd: Any) -> None:
    volume_id = create(pxd, "vol1", "--repl", "2")
    nodes = degrade(pxd, volume_id)
    record = pxd.volumes[volume_id]
    record["attached_on"] = pxd.node_id
    record["runtime_state"] = {
        "RuntimeState": "resync",
        "WriteSet": "[0]",
        "ResyncProgress": "[{1 100/400}]",
        "ResyncBlocks": "[{0 0} {1 12}]",
    }
    result = pxctl(pxd.socket, "volume", "inspect", "vol1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    fields = inspect_fields(result.stdout)
    assert fields["Replication Status"] == f"Resync ({nodes[1]} 25%)"
    assert f"\t\t\tNode\t:  {nodes[1]} (resync 25%)" in lines
    assert "\t\tResyncBlocks    :  [{0 0} {1 12}]" in lines
    assert "\t\tResyncProgress  :  [{1 100/400}]" in lines


def test_inspect_ha_raise_progress(pxd: Any) -> None:
    volume_id = create(pxd, "vol1")
    record = pxd.volumes[volume_id]
    record["replica_nodes_next"] = [pxd.node_id, "node-new"]
    record["out_of_sync"] = ["node-new"]
    record["ha_update"] = {
        "ha_level": 2,
        "adding": ["node-new"],
        "removing": [],
        "progress": {"node-new": {"total": 1000, "scanned": 500, "planned": 10, "copied": 4}},
    }
    record["runtime_state"] = {"RuntimeState": "resync"}
    result = pxctl(pxd.socket, "volume", "inspect", "vol1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    fields = inspect_fields(result.stdout)
    assert fields["Status"] == "up"
    assert fields["Replication Status"] == "Resync (node-new 50%)"
    assert "\t\t\tNode\t:  node-new (being added, resync 50%)" in lines
    assert "\t\tReplicaSetNext  :  [0 1]" in lines
    assert "\t\tReplicaSetCurr  :  [0]" in lines


def test_list_shows_degraded(pxd: Any) -> None:
    healthy = create(pxd, "healthy", "--repl", "2")
    degraded = create(pxd, "degraded", "--repl", "2")
    degrade(pxd, degraded)
    pxd.attach(degraded)
    result = pxctl(pxd.socket, "volume", "list")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert rows[healthy][4] == "2"
    assert rows[healthy][-3:] == ["up", "-", "detached"]
    assert rows[degraded][4] == "1/2"
    assert rows[degraded][-5:] == ["degraded", "-", "attached", "on", pxd.node_id]
