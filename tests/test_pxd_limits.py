"""pxd's bounds from pxd.toml: volumes per node.

One real pxd serves the module, started with a pxd.toml that sets max_volumes = 2, and a
sidecar in front of it for the REST create.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from nodeproc import REPO, START_TIMEOUT, Node

from pxfs import errors

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="pxd runs as root")

MAX_VOLUMES = 2
SIZE = 16 << 20


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    root = tmp_path_factory.mktemp("limits") / "node"
    root.mkdir()
    config = root / "pxd.toml"
    config.write_text(f"max_volumes = {MAX_VOLUMES}\n")
    node = Node(root)
    node.socket.parent.mkdir(parents=True)
    with open(node.log_path, "ab") as log:
        node.pxd = subprocess.Popen(
            [sys.executable, "-m", "daemon.pxd", "--data-dir", str(node.data_dir),
             "--socket", str(node.socket), "--config", str(config)],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    wait_until_up(node)
    node.start_sidecar()
    yield node
    node.cleanup([])


def wait_until_up(node: Node) -> None:
    """Wait until pxd returns "up" from node.status."""
    assert node.pxd is not None
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(errors.Unavailable, errors.ProtocolError):
            if node.call("node.status")["status"] == "up":
                return
        assert node.pxd.poll() is None, node.log_text()
        time.sleep(0.1)
    raise AssertionError(f"pxd did not start:\n{node.log_text()}")


def create(node: Node, name: str) -> dict[str, Any]:
    """Create a volume of SIZE bytes through the control socket."""
    result: dict[str, Any] = node.call(
        "volume.create", {"name": name, "size": SIZE, "ha_level": 1, "labels": {}}
    )
    return result


def test_max_volumes(node: Node) -> None:
    names = [f"limit{number}" for number in range(MAX_VOLUMES)]
    ids = [create(node, name)["id"] for name in names]
    try:
        with pytest.raises(errors.NoSpace) as caught:
            create(node, "one-too-many")
        assert caught.value.errno == errno.ENOSPC
        assert f"and max_volumes in pxd.toml is {MAX_VOLUMES}" in caught.value.message
        assert "delete a volume or raise max_volumes" in caught.value.message

        result = node.pxctl("volume", "create", "one-too-many", "--size", "16M")
        assert result.returncode == errors.NoSpace.exit_code
        assert result.stderr.startswith("pxctl: node ")
        assert "max_volumes" in result.stderr

        body = {"locator": {"name": "one-too-many"}, "spec": {"size": SIZE}}
        status, reply = node.rest("POST", "/v1/osd-volumes", body)
        assert status == 200
        assert "max_volumes" in reply["volume_response"]["error"]
        assert "id" not in reply

        # A create that names an existing volume still returns it.
        assert create(node, names[0])["id"] == ids[0]
        assert sorted(record["name"] for record in node.call("volume.list", {})) == names

        node.call("volume.delete", names[0])
        ids[0] = create(node, "after-delete")["id"]
        names[0] = "after-delete"
    finally:
        for name in names:
            with contextlib.suppress(errors.NotFound):
                node.call("volume.delete", name)
    assert json.dumps(node.call("volume.list", {})) == "[]"
