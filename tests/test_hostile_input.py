"""Hostile input against a real node: pxctl, the REST API, the control and peer sockets, signals.

One pxd and its sidecar serve the whole module. Each test leaves the catalog as it found it, and
most assert that a rejected request changed nothing. The process tests at the end start nodes of
their own.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from nodeproc import Node, is_mountpoint
from rawrpc import authenticate, connected, frame, receive_frame

from pxfs import errors
from pxfs.blockingclient import BlockingClient
from pxfs.frames import REQUEST
from pxfs.rpc import read_secret

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"
)

GIB = 1 << 30
MIB = 1 << 20
NAME_255 = "n" * 255


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    root = tmp_path_factory.mktemp("hostile") / "node"
    root.mkdir()
    node = Node(root)
    node.start()
    node.start_sidecar()
    yield node
    node.cleanup(sorted(root.parent.glob("mnt*")))


@pytest.fixture
def attached(node: Node) -> Iterator[str]:
    """An attached, unmounted volume, deleted again after the test."""
    name = "hostile-attached"
    node.call("volume.create", {"name": name, "size": GIB, "ha_level": 1, "labels": {}})
    node.call("volume.attach", name)
    yield name
    for path in node.call("volume.inspect", name)["mount_paths"]:
        node.call("volume.unmount", name, path)
    node.call("volume.detach", name)
    node.call("volume.delete", name)


def catalog_state(node: Node) -> list[tuple[Any, ...]]:
    """The fields of every volume record that a rejected request must not change."""
    return sorted(
        (
            record["id"],
            record["name"],
            record["size"],
            record["ha_level"],
            record["attached_on"],
            tuple(record["mount_paths"]),
            tuple(sorted(record["labels"].items())),
            record["epoch"],
        )
        for record in node.call("volume.list", {})
    )


def wait_until(condition: Callable[[], bool], description: str, timeout: float = 30.0) -> None:
    """Poll `condition` until it holds; fail naming `description` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {description}")


def assert_one_line_failure(result: subprocess.CompletedProcess[str], exit_code: int) -> None:
    """pxctl failed with `exit_code` and one `pxctl: ...` line on stderr, and printed nothing."""
    assert result.returncode == exit_code, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pxctl: ")


def open_fds(pid: int) -> int:
    """Count the open file descriptors of process `pid`."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_for_fds(pid: int, expected: int) -> None:
    """Wait until `pid` has at most `expected` open descriptors again."""
    wait_until(lambda: open_fds(pid) <= expected, f"pxd to close its descriptors ({expected})")


def fsync_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# --- pxctl --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "exit_code", "reason"),
    [
        (["volume", "create", ""], 2, "the name is empty"),
        (["volume", "create", "a/b"], 2, "contains '/'"),
        (["volume", "create", "."], 2, "reserved"),
        (["volume", "create", ".."], 2, "reserved"),
        (["volume", "create", "b" * 256], 2, "256 bytes, the maximum is 255"),
        (["volume", "create", "tab\there"], 2, "control character U+0009"),
        (["volume", "create", "bell\x07"], 2, "control character U+0007"),
        (["volume", "create", "s", "--size", "0"], 2, "invalid size '0'"),
        (["volume", "create", "s", "--size", "-1"], 2, "invalid size '-1'"),
        (["volume", "create", "s", "--size", "1e3"], 2, "invalid size '1e3'"),
        (["volume", "create", "s", "--size", "abc"], 2, "invalid size 'abc'"),
        (["volume", "create", "s", "--size", ""], 2, "invalid size ''"),
        (["volume", "create", "s", "--size", "2T"], 2, "maximum volume size is 1 TiB"),
        (["volume", "create", "s", "--size", "10PiB"], 2, "maximum volume size is 1 TiB"),
        (["volume", "create", "s", "--size", "1025G"], 2, "maximum volume size is 1 TiB"),
        (["volume", "create", "s", "--size", "1K"], 2, "below the minimum"),
        (["volume", "create", "s", "--repl", "0"], 2, "invalid replica count '0'"),
        (["volume", "create", "s", "--repl", "4"], 2, "invalid replica count '4'"),
        (["volume", "create", "s", "--repl", "1.0"], 2, "invalid replica count '1.0'"),
        (
            ["volume", "create", "s", "--repl", "2"],
            2,
            "needs 2 online nodes, but the cluster has 1 online",
        ),
        (["volume", "create", "s", "--label", "novalue"], 2, "expected KEY=VALUE"),
        (["volume", "create", "s", "--label", "k" * 129 + "=v"], 2, "maximum is 128 bytes"),
        (["volume", "create", "s", "extra"], 2, "unrecognized arguments"),
        (["volume", "create"], 2, "required: NAME"),
        (["volume"], 2, "required: VERB"),
        (["host"], 2, "required: VERB"),
        ([], 2, "required: COMMAND"),
        (["host", "mount", "s"], 2, "required: PATH"),
        (["volume", "frobnicate"], 2, "invalid choice"),
    ],
)
def test_pxctl_bad_arguments_change_nothing(
    node: Node, args: list[str], exit_code: int, reason: str
) -> None:
    before = catalog_state(node)
    result = node.pxctl(*args)
    assert_one_line_failure(result, exit_code)
    assert reason in result.stderr
    assert catalog_state(node) == before


@pytest.mark.parametrize(
    ("size", "expected"),
    [("1.5", 3 * GIB // 2), ("1 G", GIB), ("512M", 512 * MIB), ("1023K", MIB), ("1.", GIB)],
)
def test_pxctl_size_forms(node: Node, size: str, expected: int) -> None:
    result = node.pxctl("volume", "create", "sized", "--size", size)
    assert result.returncode == 0, result.stderr
    try:
        assert node.call("volume.inspect", "sized")["size"] == expected
    finally:
        node.call("volume.delete", "sized")


def test_pxctl_longest_name_and_odd_names(node: Node) -> None:
    for name in (NAME_255, "-dash", "in between", "é"):
        created = node.pxctl("volume", "create", "--size", "1M", "--", name)
        assert created.returncode == 0, created.stderr
        try:
            assert node.call("volume.inspect", name)["name"] == name
            listed = node.pxctl("volume", "list", f"--name={name}")
            assert name in listed.stdout
        finally:
            node.call("volume.delete", name)


def test_pxctl_name_with_outer_space_refused(node: Node) -> None:
    created = node.pxctl("volume", "create", "--size", "1M", "--", " spaced ")
    assert created.returncode == 2
    assert "Traceback" not in created.stderr
    assert node.call("volume.list", {}) == []


def test_pxctl_name_equal_to_an_id_refused(node: Node, attached: str) -> None:
    volume_id = node.call("volume.inspect", attached)["id"]
    before = catalog_state(node)
    result = node.pxctl("volume", "create", volume_id)
    assert_one_line_failure(result, errors.AlreadyExists.exit_code)
    assert "is the id of another volume" in result.stderr
    assert catalog_state(node) == before


@pytest.mark.parametrize(
    "args",
    [
        ["volume", "inspect"],
        ["volume", "delete"],
        ["volume", "check"],
        ["host", "attach"],
        ["host", "detach"],
    ],
)
@pytest.mark.parametrize("ref", ["nosuch", "", "123"])
def test_pxctl_unknown_volume(node: Node, args: list[str], ref: str) -> None:
    before = catalog_state(node)
    result = node.pxctl(*args, ref)
    assert_one_line_failure(result, errors.NotFound.exit_code)
    assert "not found" in result.stderr
    assert catalog_state(node) == before


def test_pxctl_unknown_volume_mount_unmount(node: Node, tmp_path: Path) -> None:
    before = catalog_state(node)
    for verb in ("mount", "unmount"):
        result = node.pxctl("host", verb, "nosuch", str(tmp_path))
        assert_one_line_failure(result, errors.NotFound.exit_code)
    assert catalog_state(node) == before


def test_pxctl_mount_path_errors(node: Node, attached: str, tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    before = catalog_state(node)
    cases = [
        (tmp_path / "missing", errors.NotFound.exit_code, "does not exist"),
        (a_file, errors.NotADirectory.exit_code, "is not a directory"),
        (full, errors.NotEmpty.exit_code, "is not empty"),
        (Path("/proc"), errors.Busy.exit_code, "already a mountpoint"),
    ]
    for path, exit_code, reason in cases:
        result = node.pxctl("host", "mount", attached, str(path))
        assert_one_line_failure(result, exit_code)
        assert reason in result.stderr
    assert catalog_state(node) == before
    assert node.mount_child_pids() == []


def test_pxctl_mount_twice_by_other_spellings(node: Node, attached: str, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    (tmp_path / "other").mkdir()
    mountpoint.mkdir()
    result = node.pxctl("host", "mount", attached, str(mountpoint))
    assert result.returncode == 0, result.stderr
    mounted = catalog_state(node)
    for spelling in (str(mountpoint), f"{mountpoint}/", str(tmp_path / "other" / ".." / "mnt")):
        again = node.pxctl("host", "mount", attached, spelling)
        assert_one_line_failure(again, errors.Busy.exit_code)
        assert "already mounted" in again.stderr
    assert catalog_state(node) == mounted
    assert node.call("volume.inspect", attached)["mounted"] == [str(mountpoint)]


def test_pxctl_relative_mount_path(node: Node, attached: str, tmp_path: Path) -> None:
    (tmp_path / "rel").mkdir()
    result = subprocess.run(
        [*node_pxctl_argv(node), "host", "mount", attached, "rel/../rel"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert node.call("volume.inspect", attached)["mount_paths"] == [str(tmp_path / "rel")]
    assert is_mountpoint(tmp_path / "rel")


def node_pxctl_argv(node: Node) -> list[str]:
    """The pxctl command line of `node` with the repository on PYTHONPATH, for any cwd."""
    return ["env", f"PYTHONPATH={Path(__file__).resolve().parent.parent}", sys.executable,
            "-m", "pxfs.cli", "--socket", str(node.socket)]  # fmt: skip


def test_pxctl_busy_volume_refuses(node: Node, attached: str, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    check = node.pxctl("volume", "check", attached)
    assert_one_line_failure(check, errors.Busy.exit_code)
    delete = node.pxctl("volume", "delete", attached)
    assert_one_line_failure(delete, errors.Busy.exit_code)

    assert node.pxctl("host", "mount", attached, str(mountpoint)).returncode == 0
    before = catalog_state(node)
    for args in (["volume", "delete"], ["host", "detach"], ["volume", "check"]):
        result = node.pxctl(*args, attached)
        assert_one_line_failure(result, errors.Busy.exit_code)
    unmount_other = node.pxctl("host", "unmount", attached, str(tmp_path))
    assert_one_line_failure(unmount_other, errors.NotFound.exit_code)
    assert catalog_state(node) == before
    assert is_mountpoint(mountpoint)

    assert node.pxctl("host", "unmount", attached, str(mountpoint)).returncode == 0
    assert node.pxctl("host", "detach", attached).returncode == 0
    clean = node.pxctl("volume", "check", attached)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert node.pxctl("host", "attach", attached).returncode == 0


def test_pxctl_wrong_sockets(node: Node, tmp_path: Path) -> None:
    a_file = tmp_path / "not-a-socket"
    a_file.write_text("x")
    plugin_socket = node.root / "run" / "plugin.sock"
    for path in (tmp_path / "missing.sock", a_file, tmp_path, plugin_socket):
        result = node.pxctl("--socket", str(path), "status")
        assert_one_line_failure(result, errors.Unavailable.exit_code)


# --- REST ---------------------------------------------------------------------------------------


def rest(node: Node, method: str, path: str, body: bytes | None = None) -> tuple[int, str, bytes]:
    """Send one raw request to the sidecar; return (status, content type, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", node.rest_port, timeout=60)
    try:
        connection.request(method, path, body=body)
        reply = connection.getresponse()
        return reply.status, reply.getheader("Content-Type") or "", reply.read()
    finally:
        connection.close()


def create_body(name: str = "r", size: Any = GIB, **spec: Any) -> bytes:
    """A VolumeCreateRequest body."""
    return json.dumps({"locator": {"name": name}, "spec": {"size": size, **spec}}).encode()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{", "not valid JSON"),
        (b"", "request body is empty"),
        (b"[]", "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b"\xff\xfe", "not valid JSON"),
        (b'{"locator": {"name": "r"}}', "spec.size is required"),
        (b'{"locator": "r", "spec": {"size": 1}}', "locator must be a JSON object"),
        (b'{"locator": {"name": 5}, "spec": {"size": 1}}', "locator.name must be a string"),
        (create_body(size="10G"), 'spec.size must be a non-negative integer, got "10G"'),
        (create_body(size=1.5e9), "spec.size must be a non-negative integer"),
        (create_body(size=-1), "spec.size must be a non-negative integer"),
        (create_body(size=True), "spec.size must be a non-negative integer"),
        (create_body(size=2**80), "maximum volume size"),
        (create_body(ha_level=4), "spec.ha_level must be between 1 and 3"),
        (create_body(ha_level="1"), "spec.ha_level must be a non-negative integer"),
        (create_body(shared="yes"), "spec.shared must be true or false"),
        (create_body(shared=True), "spec.shared is not supported"),
        (create_body(format=2), "spec.format 2 is not supported"),
        (create_body(name="a/b"), "contains '/'"),
        (create_body(name="r\x00"), "control character U+0000"),
        (create_body(name=".."), "reserved"),
    ],
)
def test_rest_create_rejects_bad_bodies(node: Node, body: bytes, reason: str) -> None:
    before = catalog_state(node)
    status, content_type, reply = rest(node, "POST", "/v1/osd-volumes", body)
    assert status == 400, reply
    assert content_type.startswith("text/plain")
    assert reason in reply.decode()
    assert reply.endswith(b"\n")
    assert catalog_state(node) == before


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (create_body(size=1000), "below the minimum"),
        (create_body(ha_level=2), "needs 2 online nodes, but the cluster has 1 online"),
    ],
)
def test_rest_create_soft_errors(node: Node, body: bytes, reason: str) -> None:
    before = catalog_state(node)
    status, _, reply = rest(node, "POST", "/v1/osd-volumes", body)
    assert status == 200
    decoded = json.loads(reply)
    assert "id" not in decoded
    assert reason in decoded["volume_response"]["error"]
    assert catalog_state(node) == before


def test_rest_body_over_limit(node: Node) -> None:
    before = catalog_state(node)
    status, _, _ = rest(node, "POST", "/v1/osd-volumes", b"x" * (300 * 1024))
    assert status == 413
    status, _, _ = rest(node, "PUT", "/v1/osd-volumes/x", b" " * (300 * 1024))
    assert status == 413
    assert catalog_state(node) == before


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/nothing"),
        ("GET", "/v1/osd-volumes/stats/x/y"),
        ("GET", "/v1/cluster/enumerate/x"),
        ("POST", "/v2/osd-volumes"),
        ("GET", "/"),
    ],
)
def test_rest_unknown_routes(node: Node, method: str, path: str) -> None:
    status, content_type, reply = rest(node, method, path)
    assert status == 404
    assert content_type.startswith("text/plain")
    assert reply == b"404 page not found\n"


@pytest.mark.parametrize("ref", ["nosuch", "%2F", "%00", "%FF", "..", "versions", "0"])
def test_rest_inspect_unknown_is_empty_list(node: Node, ref: str) -> None:
    status, _, reply = rest(node, "GET", f"/v1/osd-volumes/{ref}")
    assert status == 200
    assert json.loads(reply) == []


@pytest.mark.parametrize(
    "query",
    ["Label=notjson", "Label=%5B%5D", "Label=%7B%22a%22%3A1%7D", "ConfigLabel=%7B"],
)
def test_rest_list_rejects_bad_labels(node: Node, query: str) -> None:
    status, content_type, _ = rest(node, "GET", f"/v1/osd-volumes?{query}")
    assert status == 400
    assert content_type.startswith("text/plain")


def test_rest_create_and_delete_are_idempotent(node: Node) -> None:
    first = json.loads(rest(node, "POST", "/v1/osd-volumes", create_body("idem"))[2])
    again = json.loads(rest(node, "POST", "/v1/osd-volumes", create_body("idem"))[2])
    shouted = json.dumps({"LOCATOR": {"NAME": "idem"}, "Spec": {"Size": GIB}}).encode()
    case_folded = json.loads(rest(node, "POST", "/v1/osd-volumes", shouted)[2])
    assert first["volume_response"] == {}
    assert again == first
    assert case_folded == first

    before = catalog_state(node)
    other = json.loads(rest(node, "POST", "/v1/osd-volumes", create_body("idem", 2 * GIB))[2])
    assert "already exists" in other["volume_response"]["error"]
    assert catalog_state(node) == before

    for _ in range(2):
        status, _, reply = rest(node, "DELETE", "/v1/osd-volumes/idem")
        assert status == 200
        assert json.loads(reply) == {}
    assert json.loads(rest(node, "GET", "/v1/osd-volumes/idem")[2]) == []


def put(node: Node, ref: str, body: dict[str, Any]) -> tuple[int, Any]:
    """PUT a VolumeSetRequest; return the status and the decoded reply (text if not JSON)."""
    status, _, reply = rest(node, "PUT", f"/v1/osd-volumes/{ref}", json.dumps(body).encode())
    try:
        return status, json.loads(reply)
    except ValueError:
        return status, reply.decode()


def test_rest_put_partial_and_repeated(node: Node, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    rest(node, "POST", "/v1/osd-volumes", create_body("putvol"))
    try:
        status, reply = put(node, "putvol", {})
        assert status == 200
        assert reply["volume"]["locator"]["name"] == "putvol"
        assert reply["volume_response"] == {}
        assert put(node, "putvol", {"spec": {"size": GIB}})[1]["volume_response"] == {}
        assert put(node, "putvol", {"spec": {"ha_level": 1}})[1]["volume_response"] == {}

        status, reply = put(node, "putvol", {"spec": {"size": 2 * GIB}})
        assert status == 200
        assert int(reply["volume"]["spec"]["size"]) == 2 * GIB
        before = catalog_state(node)
        status, reply = put(node, "putvol", {"spec": {"size": GIB}})
        assert status == 400
        assert "shrinking is not supported" in reply
        assert put(node, "putvol", {"action": {"attach": 3}})[0] == 400
        assert put(node, "putvol", {"action": {"attach": "2"}})[0] == 400
        assert catalog_state(node) == before

        mount = {"action": {"mount": 2, "mount_path": str(mountpoint)}}
        error = put(node, "putvol", mount)[1]["volume_response"]["error"]
        assert "not attached" in error
        for _ in range(2):
            status, reply = put(node, "putvol", {"action": {"attach": 2}})
            assert reply["volume_response"] == {}
            assert reply["volume"]["state"] == 3
        no_path = put(node, "putvol", {"action": {"mount": 2}})[1]
        assert no_path["volume_response"]["error"] == "Invalid mount path"
        relative = {"action": {"mount": 2, "mount_path": "relative"}}
        assert "not absolute" in put(node, "putvol", relative)[1]["volume_response"]["error"]
        assert put(node, "putvol", mount)[1]["volume"]["attach_path"] == [str(mountpoint)]
        twice = put(node, "putvol", mount)[1]
        assert "already mounted" in twice["volume_response"]["error"]
        assert twice["volume"]["attach_path"] == [str(mountpoint)]

        detach = put(node, "putvol", {"action": {"attach": 1}})[1]
        assert "unmount it first" in detach["volume_response"]["error"]
        deleted = json.loads(rest(node, "DELETE", "/v1/osd-volumes/putvol")[2])
        assert "detach it before deleting" in deleted["error"]
        release = {"action": {"attach": 1}, "options": {"UNMOUNT_BEFORE_DETACH": "true"}}
        released = put(node, "putvol", release)[1]
        assert released["volume_response"] == {}
        assert released["volume"]["state"] == 4
        assert not is_mountpoint(mountpoint)
        unmount = {"action": {"mount": 1, "mount_path": str(mountpoint)}}
        assert "not mounted" in put(node, "putvol", unmount)[1]["volume_response"]["error"]
    finally:
        rest(node, "DELETE", "/v1/osd-volumes/putvol")


def test_rest_put_unknown_volume(node: Node) -> None:
    before = catalog_state(node)
    assert put(node, "nosuch", {"action": {"attach": 1}}) == (
        200, {"volume": {}, "volume_response": {}},
    )  # fmt: skip
    status, reply = put(node, "nosuch", {"action": {"attach": 2}})
    assert status == 200
    assert reply["volume"] == {}
    assert "not found" in reply["volume_response"]["error"]
    status, reply = put(node, "nosuch", {"spec": {"size": GIB}})
    assert status == 404
    assert catalog_state(node) == before


# --- Control and peer sockets -------------------------------------------------------------------


def test_control_socket_request_then_junk(node: Node) -> None:
    with connected(node.socket) as sock:
        sock.sendall(frame([REQUEST, 7, "node.status", []]) + b"\x00\x00")
        reply = receive_frame(sock)
    assert reply[0:3] == [1, 7, None]
    assert reply[3]["status"] == "up"


BAD_ARGUMENTS: list[list[Any]] = [
    [], [None], [1], [-1], [2**64 - 1], [1.5], [True], [b"\xff"], [[]], [{}], ["x"] * 5,
    [{"name": 1, "size": 1}],
    [{"name": "f", "size": 2**63, "ha_level": 1}],
    [{"name": "f", "size": GIB, "ha_level": 1, "labels": {1: 2}}],
    [{"name": "f", "size": GIB, "ha_level": True}],
    [{"name": "f", "size": GIB, "extra": 1}],
    [{"ids": "abc"}], [{"labels": []}], [{"name": 5}],
    ["hostile-attached", None], ["hostile-attached", 5], ["hostile-attached", b"/tmp"],
    ["hostile-attached", ""], ["hostile-attached", "relative"],
    [msgpack.ExtType(1, b"x")],
]  # fmt: skip
CONTROL_METHODS = [
    "node.status", "volume.create", "volume.list", "volume.inspect", "volume.delete",
    "volume.attach", "volume.detach", "volume.mount", "volume.unmount", "volume.check",
]  # fmt: skip
EXPECTED_ERRORS = (errors.InvalidArgument, errors.NotFound, errors.NotSupported)


def test_control_methods_reject_bad_arguments(node: Node, attached: str) -> None:
    before = catalog_state(node)
    with BlockingClient(node.socket) as client:
        for method in [*CONTROL_METHODS, "nope", "", "store.read", "__init__"]:
            for args in BAD_ARGUMENTS:
                try:
                    result = client.call(method, *args)
                except EXPECTED_ERRORS:
                    continue
                # The few calls that are valid must be read-only ones.
                assert method in ("node.status", "volume.list"), (method, args, result)
    assert catalog_state(node) == before
    assert node.mount_child_pids() == []
    assert "Traceback" not in node.log_text()


def peer_socket(node: Node) -> Path:
    """The peer socket that pxd puts beside the control socket."""
    return node.socket.parent / "peer.sock"


STORE_CALLS: list[tuple[str, list[Any]]] = [
    ("store.create", []), ("store.create", ["../x", 1]), ("store.create", ["1", 0]),
    ("store.create", ["1", 2**64 - 1]), ("store.create", ["1", 1.5]),
    ("store.create", ["0" * 21, 1]), ("store.create", ["1", "2"]),
    ("store.delete", [None]), ("store.delete", ["../x"]), ("store.delete", [1]),
    ("store.open", ["{vol}", -1]), ("store.open", ["{vol}", 2**32]), ("store.open", ["{vol}", 0]),
    ("store.read", ["{vol}", "x"]), ("store.read", ["{vol}", [-1]]),
    ("store.read", ["{vol}", [10**9]]), ("store.read", ["{vol}", [True]]),
    ("store.read", ["{vol}", [1.0]]), ("store.read", ["{vol}", None]),
    ("store.write", ["{vol}", 1, 1, [[0, b"x"]]]), ("store.write", ["{vol}", 10**12, 1, []]),
    ("store.write", ["{vol}", 1, 0, []]), ("store.write", ["{vol}", 1, 1, [[0]]]),
    ("store.write", ["{vol}", 1, 1, [["0", bytes(65536)]]]),
    ("store.write", ["{vol}", 1, 1, [[0, "text"]]]), ("store.write", ["{vol}", 1, 1, {"a": 1}]),
    ("store.write", ["{vol}", 0, 1, [[0, bytes(65536)]]]),
    ("store.patch", ["{vol}", 1, 1]), ("store.patch", ["{vol}", 1, 1, "x"]),
    ("store.patch", ["{vol}", 1, 1, [[0, 0, b"x", 0]]]),
    ("store.patch", ["{vol}", 1, 1, [[0, 65536, b"x", 0, 0]]]),
    ("store.patch", ["{vol}", 1, 1, [[0, 65535, b"xy", 0, 0]]]),
    ("store.patch", ["{vol}", 1, 1, [[0, 0, b"", 0, 0]]]),
    ("store.patch", ["{vol}", 1, 1, [[0, True, b"x", 0, 0]]]),
    ("store.patch", ["{vol}", 1, 1, [[0, 0, "x", 0, 0]]]),
    ("store.patch", ["{vol}", 1, 1, [[0, 0, None, 0, 0]]]),
    ("store.patch", ["{vol}", 1, 1, [[0, 0, b"x", -1, 0]]]),
    ("store.patch", ["{vol}", 1, 1, [[0, 0, b"x", 0, 2**32]]]),
    ("store.patch", ["{vol}", 1, 1, [[10**9, 0, b"x", 0, 0]]]),
    ("store.patch", ["{vol}", 1, 1, [[0, 0, b"x", 0, 0]] * 241]),
    ("store.patch", ["{vol}", 1, 1, {"0": [0, b"x", 0, 0]}]),
    ("store.patch", ["{vol}", 1, 0, [[0, 0, b"x", 0, 0]]]),
    ("store.patch", ["{vol}", 1.5, 1, [[0, 0, b"x", 0, 0]]]),
    ("store.patch", ["{vol}", 0, 1, [[0, 0, b"x", 0, 0]]]),
    ("store.trim", ["{vol}", 1, "abc"]), ("store.trim", ["{vol}", 1, [10**9]]),
    ("store.trim", ["{vol}", "1", [1]]), ("store.trim", ["{vol}", 0, [1]]),
    ("store.flush", ["{vol}", 1]), ("store.info", ["nosuch"]), ("store.info", []),
    ("store.resize", ["{vol}", 0]), ("store.resize", ["{vol}", 2**33]),
    ("store.verify", ["../x"]), ("store.verify", ["{vol}", 1]),
    ("volume.list", []), ("node.status", []),
]  # fmt: skip
STORE_ERROR_CODES = {"invalid_argument", "not_found", "not_supported", "stale_epoch"}


def test_peer_store_methods_reject_bad_arguments(node: Node, attached: str) -> None:
    assert node.pxd is not None
    record = node.call("volume.inspect", attached)
    vol_id = record["id"]
    secret = read_secret(node.data_dir / "cluster.secret")
    start = open_fds(node.pxd.pid)
    with connected(peer_socket(node)) as sock:
        authenticate(sock, secret)
        before = _store_call(sock, 1, "store.info", [vol_id])
        for request_id, (method, template) in enumerate(STORE_CALLS, start=2):
            args = [vol_id if arg == "{vol}" else arg for arg in template]
            reply = _store_call(sock, request_id, method, args)
            assert reply[2] is not None, (method, args, reply)
            assert reply[2][0] in STORE_ERROR_CODES, (method, args, reply)
        after = _store_call(sock, 999, "store.info", [vol_id])
    assert after == [1, 999, None, before[3]]
    wait_for_fds(node.pxd.pid, start)
    assert "Traceback" not in node.log_text()
    assert node.call("volume.inspect", attached)["epoch"] == record["epoch"]


def _store_call(sock: socket.socket, request_id: int, method: str, args: list[Any]) -> Any:
    sock.sendall(frame([REQUEST, request_id, method, args]))
    reply = receive_frame(sock)
    assert reply is not None, (method, args)
    assert reply[1] == request_id
    return reply


# --- Processes ----------------------------------------------------------------------------------


@pytest.fixture
def own_node(tmp_path: Path) -> Iterator[Node]:
    """A node of its own, for tests that kill or stop processes."""
    node = Node(tmp_path / "node")
    node.root.mkdir()
    node.start()
    yield node
    node.cleanup(sorted(tmp_path.glob("mnt*")))


def mounted_at(node: Node, name: str) -> list[str]:
    """The paths whose mount child runs now for volume `name`, or [] when pxd does not respond."""
    try:
        return list(node.call("volume.inspect", name)["mounted"])
    except errors.PxfsError:
        return []


def test_kill9_pxd_then_restart(own_node: Node, tmp_path: Path) -> None:
    own_node.start_sidecar()
    mountpoint = tmp_path / "mnt"
    own_node.mount_volume("k9", mountpoint)
    fsync_write(mountpoint / "kept", b"k" * 300_000)
    old_children = own_node.mount_child_pids()

    own_node.kill_pxd()
    status, text = own_node.rest("GET", "/v1/osd-volumes/k9")
    assert status == 503, text
    down = own_node.pxctl("volume", "list")
    assert_one_line_failure(down, errors.Unavailable.exit_code)

    own_node.start()
    wait_until(lambda: mounted_at(own_node, "k9") == [str(mountpoint)], "the remount")
    assert (mountpoint / "kept").read_bytes() == b"k" * 300_000
    wait_until(
        lambda: not any(os.path.exists(f"/proc/{pid}") for pid in old_children),
        "the old mount child to exit",
    )
    assert len(own_node.mount_child_pids()) == 1
    assert own_node.rest("GET", "/v1/osd-volumes/k9")[0] == 200

    own_node.call("volume.unmount", "k9", str(mountpoint))
    own_node.call("volume.detach", "k9")
    assert own_node.call("volume.check", "k9") == {"clean": True, "problems": []}


def test_kill9_sidecar_then_restart(own_node: Node) -> None:
    own_node.start_sidecar()
    plugin_socket = own_node.root / "run" / "plugin.sock"
    assert own_node.sidecar is not None
    own_node.sidecar.kill()
    own_node.sidecar.wait()
    own_node.sidecar = None
    assert plugin_socket.exists()

    own_node.start_sidecar()
    assert own_node.rest("GET", "/v1/osd-volumes")[0] == 200
    assert plugin_socket.exists()
    assert own_node.stop() == 0
    assert not plugin_socket.exists()


def test_sigterm_while_busy_then_restart(own_node: Node, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    own_node.mount_volume("busy", mountpoint)
    fsync_write(mountpoint / "kept", b"b" * 100_000)
    shell = subprocess.Popen(["sleep", "60"], cwd=mountpoint)
    holder = open(mountpoint / "kept", "rb")
    try:
        assert own_node.stop() == 0
        assert own_node.mount_child_pids() == []
        assert not is_mountpoint(mountpoint)

        own_node.start()
        wait_until(lambda: mounted_at(own_node, "busy") == [str(mountpoint)], "the remount")
        assert (mountpoint / "kept").read_bytes() == b"b" * 100_000
    finally:
        shell.kill()
        shell.wait()
        with contextlib.suppress(OSError):
            holder.close()
    own_node.call("volume.unmount", "busy", str(mountpoint))
    own_node.call("volume.detach", "busy")
    assert own_node.call("volume.check", "busy") == {"clean": True, "problems": []}


def test_second_pxd_on_same_socket_refused(own_node: Node, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "daemon.pxd", "--data-dir", str(tmp_path / "other-data"),
         "--socket", str(own_node.socket)],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert result.returncode == 1
    assert "in use by another server" in result.stderr
    assert "Traceback" not in result.stderr
    assert own_node.call("node.status")["status"] == "up"


def test_sigterm_with_closed_stderr_keeps_data(own_node: Node, tmp_path: Path) -> None:
    # `run-node 2>&1 | tee log` and Ctrl-C: tee exits first, so pxd's stderr is a broken pipe.
    assert own_node.stop() == 0
    own_node.start(stderr_pipe=True)
    assert own_node.pxd is not None and own_node.pxd.stderr is not None
    mountpoint = tmp_path / "mnt"
    own_node.mount_volume("pipe", mountpoint)
    (mountpoint / "unsynced").write_bytes(b"p" * 300_000)
    own_node.pxd.stderr.close()

    assert own_node.stop() == 0
    assert own_node.mount_child_pids() == []
    assert not is_mountpoint(mountpoint)

    own_node.start()
    wait_until(lambda: mounted_at(own_node, "pipe") == [str(mountpoint)], "the remount")
    assert (mountpoint / "unsynced").read_bytes() == b"p" * 300_000


def test_sigterm_keeps_unsynced_writes_to_open_files(own_node: Node, tmp_path: Path) -> None:
    # The data is still in the kernel's page cache when pxd stops, so a child stopped without
    # a syncfs first loses it. One file per round, and several rounds, because the kernel
    # writes some pages back on its own.
    mountpoint = tmp_path / "mnt"
    own_node.mount_volume("open", mountpoint)
    for round_number in range(2):
        held = [open(mountpoint / f"held-{round_number}-{i}", "wb") for i in range(4)]
        try:
            for f in held:
                f.write(b"abc")
                f.flush()
            assert own_node.stop() == 0
        finally:
            for f in held:
                with contextlib.suppress(OSError):
                    f.close()
        own_node.start()
        wait_until(lambda: mounted_at(own_node, "open") == [str(mountpoint)], "the remount")
        for i in range(4):
            assert (mountpoint / f"held-{round_number}-{i}").read_bytes() == b"abc", i


NUL_PATHS = ["/tmp/x\x00", "/tmp/\x00/y", "\x00", "/\x00"]
NON_STRING_REFS: list[Any] = [1.5, None, 7, True, [], {}, b"name"]
REF_METHODS = [
    "volume.inspect", "volume.delete", "volume.attach", "volume.detach", "volume.check",
]  # fmt: skip


def test_mount_paths_with_nul_rejected(node: Node, attached: str) -> None:
    before = catalog_state(node)
    for method in ("volume.mount", "volume.unmount"):
        for path in NUL_PATHS:
            with pytest.raises(errors.InvalidArgument, match="NUL byte"):
                node.call(method, attached, path)
    assert catalog_state(node) == before
    assert node.mount_child_pids() == []
    assert "Traceback" not in node.log_text()


def test_rest_mount_path_with_nul_rejected(node: Node, attached: str) -> None:
    before = catalog_state(node)
    mount = {"action": {"mount": 2, "mount_path": "/tmp/x\u0000"}}
    status, reply = put(node, attached, mount)
    assert status == 200, reply
    assert "NUL byte" in reply["volume_response"]["error"], reply
    assert catalog_state(node) == before
    assert "Traceback" not in node.log_text()


def test_refs_of_wrong_type_rejected(node: Node, tmp_path: Path) -> None:
    for ref in NON_STRING_REFS:
        for method in REF_METHODS:
            with pytest.raises(errors.InvalidArgument, match="expected a volume name or id"):
                node.call(method, ref)
        for method in ("volume.mount", "volume.unmount"):
            with pytest.raises(errors.InvalidArgument, match="expected a volume name or id"):
                node.call(method, ref, str(tmp_path))
    assert "Traceback" not in node.log_text()


def test_status_starting_until_remounted(own_node: Node, tmp_path: Path) -> None:
    mountpoints = [tmp_path / f"mnt{i}" for i in range(4)]
    for i, mountpoint in enumerate(mountpoints):
        own_node.mount_volume(f"remount{i}", mountpoint)
    assert own_node.stop() == 0

    # Start pxd by hand, to see the replies that come before the remount is done.
    with open(own_node.log_path, "ab") as log:
        own_node.pxd = subprocess.Popen(
            [sys.executable, "-m", "daemon.pxd", "--data-dir", str(own_node.data_dir),
             "--socket", str(own_node.socket)],
            cwd=Path(__file__).resolve().parent.parent, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    replies: list[tuple[str, int]] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not replies or replies[-1][0] != "up"):
        with contextlib.suppress(errors.Unavailable, errors.ProtocolError):
            status = own_node.call("node.status")
            replies.append((status["status"], status["mounted"]))
        time.sleep(0.02)
    assert replies, own_node.log_text()
    assert replies[-1] == ("up", 4), replies
    assert {state for state, _ in replies} <= {"starting", "up"}, replies
    assert all(mounted == 4 for state, mounted in replies if state == "up"), replies
    for mountpoint in mountpoints:
        assert is_mountpoint(mountpoint)

    own_node.stop()
    own_node.start()
    assert own_node.call("node.status")["mounted"] == 4


@pytest.mark.parametrize("entry", [{}, 5, {"revision": 1, "record": {}}])
def test_malformed_catalog_stops_pxd(tmp_path: Path, entry: Any) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    catalog = data_dir / "catalog.json"
    catalog.write_text(
        json.dumps({"format": 1, "revision": 1, "volumes": {"7": entry}, "nodes": {}})
    )
    result = subprocess.run(
        [sys.executable, "-m", "daemon.pxd", "--data-dir", str(data_dir),
         "--socket", str(tmp_path / "run" / "pxd.sock")],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"pxd: catalog {catalog}: volume '7'"), result.stderr


# --- Symbolic links in mount paths --------------------------------------------------------------


@contextlib.contextmanager
def other_mount(path: Path) -> Iterator[Path]:
    """A small tmpfs at `path` with a file `marker`: another filesystem that pxd must not touch."""
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], check=True)
    try:
        (path / "marker").write_text("other")
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_mount_through_symlink_records_real_path(node: Node, attached: str, tmp_path: Path) -> None:
    (tmp_path / "real" / "mnt").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    mounted = node.pxctl("host", "mount", attached, str(tmp_path / "link" / "mnt"))
    assert mounted.returncode == 0, mounted.stderr
    assert node.call("volume.inspect", attached)["mount_paths"] == [str(tmp_path / "real" / "mnt")]

    unmounted = node.pxctl("host", "unmount", attached, str(tmp_path / "link" / "mnt"))
    assert unmounted.returncode == 0, unmounted.stderr
    assert node.call("volume.inspect", attached)["mount_paths"] == []
    assert not is_mountpoint(tmp_path / "real" / "mnt")


def test_unmount_after_symlink_swap_spares_others(
    node: Node, attached: str, tmp_path: Path
) -> None:
    with other_mount(tmp_path / "other" / "mnt") as other:
        (tmp_path / "outer" / "mnt").mkdir(parents=True)
        mounted = node.pxctl("host", "mount", attached, str(tmp_path / "outer" / "mnt"))
        assert mounted.returncode == 0, mounted.stderr
        # Whoever owns "outer" moves it away and puts a link to another mount in its place.
        (tmp_path / "outer").rename(tmp_path / "moved")
        (tmp_path / "outer").symlink_to(tmp_path / "other")

        result = node.pxctl("host", "unmount", attached, str(tmp_path / "outer" / "mnt"))
        assert result.returncode == 0, result.stderr
        assert is_mountpoint(other)
        assert (other / "marker").read_text() == "other"
        assert not is_mountpoint(tmp_path / "moved" / "mnt")
        assert node.call("volume.inspect", attached)["mount_paths"] == []
        assert "no longer leads to the volume's mount" in node.log_text()
        wait_until(lambda: node.mount_child_pids() == [], "the mount child to stop")


def test_remount_after_symlink_swap_skipped(own_node: Node, tmp_path: Path) -> None:
    own_node.mount_volume("swap", tmp_path / "outer" / "mnt")
    assert own_node.stop() == 0
    (tmp_path / "outer").rename(tmp_path / "moved")
    (tmp_path / "elsewhere" / "mnt").mkdir(parents=True)
    (tmp_path / "outer").symlink_to(tmp_path / "elsewhere")

    own_node.start()
    assert not is_mountpoint(tmp_path / "elsewhere" / "mnt")
    assert not is_mountpoint(tmp_path / "moved" / "mnt")
    assert "now leads through a symbolic link; not remounting there" in own_node.log_text()
    assert mounted_at(own_node, "swap") == []
