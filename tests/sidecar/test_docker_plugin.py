"""The Docker volume plugin of pxfs.api.docker, served by the real app in front of a fake pxd."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient
from nodeproc import free_port
from sidecarproc import signal_child

from pxfs import errors
from pxfs.api import docker, dockeropts
from pxfs.api.app import MAX_BODY, make_plugin_app
from pxfs.api.control import ControlClient
from pxfs.api.docker import DockerPlugin
from pxfs.api.dockerrefs import RefStore

pytestmark = pytest.mark.asyncio

GIB = 1 << 30
MIB = 1 << 20
REPO = Path(__file__).resolve().parent.parent.parent
START_TIMEOUT = 20.0

# conftest.py provides the fake pxd; its type appears as Any because "import conftest" would be
# ambiguous next to the conftest.py of tests/trio.
Client = TestClient[Any, Any]
FakePxd = Any


class Plugin:
    """A plugin app under test with its client, fake pxd and directories."""

    def __init__(self, client: Client, fake: FakePxd, mount_base: Path, state_dir: Path) -> None:
        self.client = client
        self.fake = fake
        self.mount_base = mount_base
        self.state_dir = state_dir

    async def call(self, endpoint: str, body: Any = None) -> dict[str, Any]:
        """POST to /VolumeDriver.<endpoint> (or a full path) and return the decoded reply."""
        path = endpoint if endpoint.startswith("/") else f"/VolumeDriver.{endpoint}"
        data = b"" if body is None else json.dumps(body).encode()
        response = await self.client.post(path, data=data)
        assert response.status == 200
        reply: dict[str, Any] = json.loads(await response.read())
        return reply

    async def ok(self, endpoint: str, body: Any = None) -> dict[str, Any]:
        """Call an endpoint and assert that its reply has no error."""
        reply = await self.call(endpoint, body)
        assert not reply.get("Err"), reply
        return reply

    async def error(self, endpoint: str, body: Any = None) -> str:
        """Call an endpoint and return its non-empty Err."""
        reply = await self.call(endpoint, body)
        assert reply.get("Err"), reply
        return str(reply["Err"])

    def record(self, name: str) -> dict[str, Any]:
        """Return the fake pxd's record of volume `name`."""
        result: dict[str, Any] = self.fake.find(name)
        return result

    def names(self) -> list[str]:
        """Return the names of the volumes in the fake pxd."""
        return sorted(record["name"] for record in self.fake.volumes.values())

    def methods(self) -> list[str]:
        """Return the control methods called so far, in order."""
        return [name for name, _ in self.fake.calls]

    def refs(self) -> dict[str, Any]:
        """Return the decoded reference-count file."""
        data: dict[str, Any] = json.loads((self.state_dir / docker.REFS_FILE).read_text())
        return data


PluginFactory = Callable[..., Any]


@pytest_asyncio.fixture
async def make_plugin(
    fake_pxd: FakePxd, aiohttp_client: Any, tmp_path: Path
) -> AsyncIterator[PluginFactory]:
    """Return a factory of plugin apps on one fake pxd and one state directory.

    Each call builds a new app that loads the counts from the file, as a restarted sidecar does.
    """
    mount_base = tmp_path / "osd" / "mounts"
    state_dir = tmp_path / "state"
    controls: list[ControlClient] = []

    async def build(max_body: int | None = None) -> Plugin:
        control = ControlClient(fake_pxd.socket)
        controls.append(control)
        refs = RefStore.load(state_dir / docker.REFS_FILE)
        driver = DockerPlugin(control, mount_base, refs)
        client = await aiohttp_client(make_plugin_app(driver, max_body=max_body or MAX_BODY))
        return Plugin(client, fake_pxd, mount_base, state_dir)

    yield build
    for control in controls:
        await control.close()


@pytest_asyncio.fixture
async def plugin(make_plugin: PluginFactory) -> Plugin:
    """A plugin app in front of the fake pxd."""
    result: Plugin = await make_plugin()
    return result


async def create(plugin: Plugin, name: str, **opts: str) -> None:
    """Create a volume through the plugin and assert success."""
    await plugin.ok("Create", {"Name": name, "Opts": opts or None})


# --- activation and capabilities ----------------------------------------------------------------


async def test_activate_implements_volume_driver(plugin: Plugin) -> None:
    reply = await plugin.call("/Plugin.Activate")
    assert reply == {"Implements": ["VolumeDriver"]}


async def test_capabilities_scope_global(plugin: Plugin) -> None:
    reply = await plugin.call("Capabilities", {})
    assert reply == {"Capabilities": {"Scope": "global"}}


async def test_reply_content_type(plugin: Plugin) -> None:
    response = await plugin.client.post("/Plugin.Activate")
    assert response.content_type == docker.CONTENT_TYPE


async def test_unknown_endpoint_404(plugin: Plugin) -> None:
    response = await plugin.client.post("/VolumeDriver.Snapshot", data=b"{}")
    assert response.status == 404


# --- Create: DriverOpts -------------------------------------------------------------------------


async def test_create_size_and_repl(plugin: Plugin) -> None:
    await create(plugin, "vol1", size="1", repl="1")
    record = plugin.record("vol1")
    assert record["size"] == GIB
    assert record["ha_level"] == 1
    assert record["labels"] == {}


async def test_create_default_size_1gib(plugin: Plugin) -> None:
    await create(plugin, "plain")
    assert plugin.record("plain")["size"] == GIB
    assert plugin.record("plain")["ha_level"] == 1


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ("10", 10 * GIB),
        ("512M", 512 * MIB),
        ("512 MiB", 512 * MIB),
        ("2g", 2 * GIB),
        ("1.5G", 3 * GIB // 2),
        ("1100K", 1152 * 1024),
        ("1", GIB),
        ("1T", 1 << 40),
    ],
)
async def test_create_size_units(plugin: Plugin, size: str, expected: int) -> None:
    await create(plugin, "sized", size=size)
    assert plugin.record("sized")["size"] == expected


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ("0", "invalid size '0': below the minimum volume size of 1 MiB"),
        ("1K", "invalid size '1K': below the minimum volume size of 1 MiB"),
        ("-1", "invalid size"),
        ("abc", "invalid size"),
        ("", "invalid size"),
        ("10X", "unknown suffix"),
        ("2T", "maximum volume size"),
        ("9" * 40, "maximum volume size"),
        ("9" * 100, "too long"),
    ],
)
async def test_create_bad_size_creates_nothing(plugin: Plugin, size: str, message: str) -> None:
    err = await plugin.error("Create", {"Name": "bad", "Opts": {"size": size}})
    assert message in err
    assert plugin.names() == []
    assert "volume.create" not in plugin.methods()


@pytest.mark.parametrize("repl", ["0", "4", "-1", "two", ""])
async def test_create_bad_repl_creates_nothing(plugin: Plugin, repl: str) -> None:
    err = await plugin.error("Create", {"Name": "bad", "Opts": {"repl": repl}})
    assert "invalid repl" in err
    assert plugin.names() == []


async def test_create_repl_3(plugin: Plugin) -> None:
    await create(plugin, "ha3", repl="3")
    assert plugin.record("ha3")["ha_level"] == 3


async def test_create_labels_and_unknown_keys(plugin: Plugin) -> None:
    await create(plugin, "lab", labels="app=web, tier=front", env="prod", io_priority="high")
    assert plugin.record("lab")["labels"] == {
        "app": "web",
        "tier": "front",
        "env": "prod",
        "io_priority": "high",
    }


async def test_create_labels_key_wins_over_unknown_key(plugin: Plugin) -> None:
    await create(plugin, "lab", labels="env=prod", env="dev")
    assert plugin.record("lab")["labels"] == {"env": "prod"}


async def test_create_argument_copies_labels() -> None:
    spec = dockeropts.parse_create("lab", {"env": "prod"})
    argument = spec.to_rpc()
    argument["labels"]["env"] = "dev"
    assert spec.labels == {"env": "prod"}


async def test_create_keys_case_insensitive(plugin: Plugin) -> None:
    await plugin.ok("Create", {"Name": "caps", "Opts": {"Size": "2", "REPL": "2"}})
    assert plugin.record("caps")["size"] == 2 * GIB
    assert plugin.record("caps")["ha_level"] == 2


async def test_create_token_not_stored(plugin: Plugin) -> None:
    await create(plugin, "tok", token="secret", token_secret="s")
    assert plugin.record("tok")["labels"] == {}


async def test_create_bad_labels(plugin: Plugin) -> None:
    err = await plugin.error("Create", {"Name": "lab", "Opts": {"labels": "novalue"}})
    assert "invalid labels" in err
    assert plugin.names() == []


@pytest.mark.parametrize("opts", [{"k": "x\x01"}, {"labels": "k=a\x00b"}, {"k": "\x1b[2J"}])
async def test_create_control_label_value(plugin: Plugin, opts: dict[str, str]) -> None:
    err = await plugin.error("Create", {"Name": "lab", "Opts": opts})
    assert "invalid value" in err
    assert "control character" in err
    assert plugin.names() == []


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({"shared": "true"}, "shared access"),
        ({"sharedv4": "1"}, "shared access"),
        ({"secure": "TRUE"}, "encryption"),
        ({"sticky": "t"}, "sticky"),
        ({"compressed": "true"}, "compression"),
        ({"dedupe": "true"}, "deduplication"),
        ({"secret_key": "k"}, "encryption"),
        ({"parent": "other"}, "cannot clone"),
        ({"nodes": "n1;n2"}, "no node with IP or id 'n1'"),
        ({"fs": "ext4"}, "FUSE filesystems"),
        ({"shared": "maybe"}, "expected true or false"),
        ({"size": 10}, "must be a string"),
        ({"name": "other"}, "does not match"),
    ],
)
async def test_create_unsupported_options(
    plugin: Plugin, opts: dict[str, Any], message: str
) -> None:
    err = await plugin.error("Create", {"Name": "feat", "Opts": opts})
    assert message in err
    assert plugin.names() == []


async def test_create_feature_off_and_fs_fuse_accepted(plugin: Plugin) -> None:
    opts = {"shared": "false", "secure": "0", "fs": "fuse", "name": "feat"}
    await plugin.ok("Create", {"Name": "feat", "Opts": opts})
    assert plugin.names() == ["feat"]
    assert plugin.record("feat")["labels"] == {}


async def test_create_opts_not_an_object(plugin: Plugin) -> None:
    err = await plugin.error("Create", {"Name": "x", "Opts": ["size=1"]})
    assert "Opts must be a JSON object" in err
    assert plugin.names() == []


@pytest.mark.parametrize("name", ["", "..", ".", "../etc", "a/b", "bad\nname", "x" * 256])
async def test_create_invalid_name(plugin: Plugin, name: str) -> None:
    err = await plugin.error("Create", {"Name": name, "Opts": {}})
    assert "invalid volume name" in err
    assert plugin.names() == []


async def test_create_missing_name(plugin: Plugin) -> None:
    err = await plugin.error("Create", {"Opts": {}})
    assert "Name must be a string" in err


async def test_create_idempotent(plugin: Plugin) -> None:
    await create(plugin, "same", size="2")
    await create(plugin, "same", size="2")
    assert plugin.names() == ["same"]


async def test_create_existing_adds_labels(plugin: Plugin) -> None:
    await create(plugin, "dk8", size="1G", labels="old=1,keep=x")
    await create(plugin, "dk8", size="1G", labels="new=1,old=2")
    assert plugin.names() == ["dk8"]
    assert plugin.record("dk8")["labels"] == {"old": "2", "keep": "x", "new": "1"}
    assert plugin.record("dk8")["size"] == GIB


async def test_create_without_size_adds_labels(plugin: Plugin) -> None:
    await create(plugin, "dk9", size="1G")
    await create(plugin, "dk9", env="qa")
    assert plugin.record("dk9")["labels"] == {"env": "qa"}
    assert plugin.methods().count("volume.create") == 1


async def test_create_same_labels_no_update(plugin: Plugin) -> None:
    await create(plugin, "dk10", size="1G", env="qa")
    await create(plugin, "dk10", size="1G", env="qa")
    assert "volume.update" not in plugin.methods()


async def test_create_mismatch_is_error(plugin: Plugin) -> None:
    await create(plugin, "same", size="2")
    err = await plugin.error("Create", {"Name": "same", "Opts": {"size": "3"}})
    assert "exists" in err
    assert plugin.record("same")["size"] == 2 * GIB


async def test_create_without_opts_uses_existing(plugin: Plugin) -> None:
    await create(plugin, "big", size="20")
    await plugin.ok("Create", {"Name": "big"})
    assert plugin.methods().count("volume.create") == 1
    assert plugin.record("big")["size"] == 20 * GIB


# --- inline names -------------------------------------------------------------------------------


async def test_inline_name_spec(plugin: Plugin) -> None:
    await plugin.ok("Create", {"Name": "name=inl,size=2G;repl=2,env=qa", "Opts": {"size": "5"}})
    record = plugin.record("inl")
    assert record["size"] == 2 * GIB
    assert record["ha_level"] == 2
    assert record["labels"] == {"env": "qa"}


async def test_inline_name_bad_size(plugin: Plugin) -> None:
    err = await plugin.error("Create", {"Name": "name=inl,size=0"})
    assert "invalid size '0': below the minimum volume size" in err
    assert plugin.names() == []


async def test_inline_name_malformed(plugin: Plugin) -> None:
    err = await plugin.error("Create", {"Name": "name=inl,junk"})
    assert "is not KEY=VALUE" in err
    err = await plugin.error("Create", {"Name": "name=inl,size=1,size=2"})
    assert "given twice" in err
    assert plugin.names() == []


async def test_inline_name_with_dot_is_plain_name(plugin: Plugin) -> None:
    # The inline name must be letters, digits, _ or -; otherwise the whole string is the name.
    await plugin.ok("Create", {"Name": "name=a.b,size=2"})
    assert plugin.names() == ["name=a.b,size=2"]
    assert plugin.record("name=a.b,size=2")["size"] == GIB


async def test_inline_name_get_mount_remove(plugin: Plugin) -> None:
    inline = "name=inl,size=1"
    await plugin.ok("Create", {"Name": inline})
    reply = await plugin.ok("Get", {"Name": inline})
    assert reply["Volume"]["Name"] == inline
    mount = await plugin.ok("Mount", {"Name": inline, "ID": "c1"})
    assert mount["Mountpoint"] == str(plugin.mount_base / "inl")
    await plugin.ok("Unmount", {"Name": inline, "ID": "c1"})
    await plugin.ok("Remove", {"Name": inline})
    assert plugin.names() == []


# --- Mount and Unmount --------------------------------------------------------------------------


async def test_mount_attaches_and_mounts(plugin: Plugin) -> None:
    await create(plugin, "web")
    reply = await plugin.ok("Mount", {"Name": "web", "ID": "c1"})
    path = plugin.mount_base / "web"
    assert reply == {"Mountpoint": str(path), "Err": ""}
    record = plugin.record("web")
    assert record["attached_on"] == plugin.fake.node_id
    assert record["mount_paths"] == [str(path)]
    assert path.is_dir()
    assert stat.S_IMODE(os.stat(plugin.mount_base).st_mode) == 0o700
    assert plugin.refs()["volumes"] == {record["id"]: {"name": "web", "containers": ["c1"]}}


async def test_refs_file_private(plugin: Plugin) -> None:
    await create(plugin, "web")
    await plugin.ok("Mount", {"Name": "web", "ID": "c1"})
    assert stat.S_IMODE(os.stat(plugin.state_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(plugin.state_dir / docker.REFS_FILE).st_mode) == 0o600
    assert sorted(os.listdir(plugin.state_dir)) == [docker.REFS_FILE]


async def test_two_containers_last_unmount_releases(plugin: Plugin) -> None:
    await create(plugin, "web")
    path = str(plugin.mount_base / "web")
    await plugin.ok("Mount", {"Name": "web", "ID": "c1"})
    await plugin.ok("Mount", {"Name": "web", "ID": "c2"})
    assert plugin.methods().count("volume.mount") == 1

    await plugin.ok("Unmount", {"Name": "web", "ID": "c1"})
    assert plugin.record("web")["mount_paths"] == [path]
    assert plugin.record("web")["attached_on"]

    await plugin.ok("Unmount", {"Name": "web", "ID": "c2"})
    record = plugin.record("web")
    assert record["mount_paths"] == []
    assert record["attached_on"] == ""
    assert not os.path.exists(path)
    assert plugin.refs()["volumes"] == {}


@pytest.mark.parametrize(
    "failure",
    [
        errors.Unavailable("volume web stays mounted: its replicas are unreachable"),
        errors.Busy("volume web is in use at its mountpoint"),
    ],
)
async def test_failed_unmount_retried(plugin: Plugin, failure: errors.PxfsError) -> None:
    await create(plugin, "web")
    path = str(plugin.mount_base / "web")
    await plugin.ok("Mount", {"Name": "web", "ID": "c1"})
    plugin.fake.fail_method["volume.unmount"] = failure

    assert await plugin.error("Unmount", {"Name": "web", "ID": "c1"}) == failure.message
    assert plugin.record("web")["mount_paths"] == [path]
    assert plugin.refs()["volumes"] == {}

    # Any later Unmount releases the volume, which no container uses any more.
    await plugin.ok("Unmount", {"Name": "web", "ID": "c1"})
    assert plugin.record("web")["mount_paths"] == []
    assert plugin.record("web")["attached_on"] == ""


async def test_remove_after_failed_unmount(plugin: Plugin) -> None:
    await create(plugin, "web")
    await plugin.ok("Mount", {"Name": "web", "ID": "c1"})
    plugin.fake.fail_method["volume.unmount"] = errors.Busy("target is busy")
    await plugin.error("Unmount", {"Name": "web", "ID": "c1"})

    await plugin.ok("Remove", {"Name": "web"})
    assert plugin.names() == []


async def test_repeated_mount_same_id_counts_once(plugin: Plugin) -> None:
    await create(plugin, "web")
    await plugin.ok("Mount", {"Name": "web", "ID": "c1"})
    await plugin.ok("Mount", {"Name": "web", "ID": "c1"})
    await plugin.ok("Unmount", {"Name": "web", "ID": "c1"})
    assert plugin.record("web")["mount_paths"] == []
    assert plugin.record("web")["attached_on"] == ""


async def test_unmount_unknown_id_harmless(plugin: Plugin) -> None:
    await create(plugin, "web")
    await plugin.ok("Mount", {"Name": "web", "ID": "c1"})
    await plugin.ok("Unmount", {"Name": "web", "ID": "stranger"})
    assert plugin.record("web")["mount_paths"] == [str(plugin.mount_base / "web")]
    assert plugin.refs()["volumes"][plugin.record("web")["id"]]["containers"] == ["c1"]


async def test_unmount_never_mounted_harmless(plugin: Plugin) -> None:
    await create(plugin, "web")
    await plugin.ok("Unmount", {"Name": "web", "ID": "c1"})
    await plugin.ok("Unmount", {"Name": "nosuch", "ID": "c1"})
    assert "volume.unmount" not in plugin.methods()
    assert "volume.detach" not in plugin.methods()


async def test_concurrent_mounts_mount_once(plugin: Plugin) -> None:
    await create(plugin, "web")
    bodies = [{"Name": "web", "ID": f"c{i}"} for i in range(8)]
    replies = await asyncio.gather(*(plugin.ok("Mount", body) for body in bodies))
    assert {reply["Mountpoint"] for reply in replies} == {str(plugin.mount_base / "web")}
    assert plugin.methods().count("volume.mount") == 1
    containers = plugin.refs()["volumes"][plugin.record("web")["id"]]["containers"]
    assert sorted(containers) == [f"c{i}" for i in range(8)]


async def test_mount_without_id_is_error(plugin: Plugin) -> None:
    await create(plugin, "web")
    err = await plugin.error("Mount", {"Name": "web"})
    assert "no ID" in err
    assert plugin.record("web")["attached_on"] == ""


async def test_mount_unknown_volume(plugin: Plugin) -> None:
    err = await plugin.error("Mount", {"Name": "nosuch", "ID": "c1"})
    assert err == "volume nosuch not found"
    assert not (plugin.mount_base / "nosuch").exists()


async def test_mount_failure_rolls_back(plugin: Plugin) -> None:
    await create(plugin, "web")
    path = plugin.mount_base / "web"
    path.mkdir(parents=True)
    (path / "leftover").write_text("x")
    err = await plugin.error("Mount", {"Name": "web", "ID": "c1"})
    assert "not empty" in err
    record = plugin.record("web")
    assert record["attached_on"] == ""
    assert record["mount_paths"] == []
    assert (path / "leftover").read_text() == "x"
    assert not (plugin.state_dir / docker.REFS_FILE).exists()


async def test_mount_pxd_error_in_err(plugin: Plugin) -> None:
    await create(plugin, "web")
    plugin.fake.fail_next = errors.NoSpace("no space left for volume web")
    err = await plugin.error("Mount", {"Name": "web", "ID": "c1"})
    assert err == "no space left for volume web"


async def test_mountpoint_is_symlink_rejected(plugin: Plugin, tmp_path: Path) -> None:
    await create(plugin, "web")
    target = tmp_path / "elsewhere"
    target.mkdir()
    plugin.mount_base.mkdir(parents=True)
    (plugin.mount_base / "web").symlink_to(target)
    err = await plugin.error("Mount", {"Name": "web", "ID": "c1"})
    assert "is not a directory" in err
    assert plugin.record("web")["mount_paths"] == []


@pytest.mark.parametrize("name", ["..", "../../etc", "/etc", "a/../../b"])
async def test_mount_name_cannot_escape_base(plugin: Plugin, tmp_path: Path, name: str) -> None:
    err = await plugin.error("Mount", {"Name": name, "ID": "c1"})
    assert "invalid volume name" in err
    assert "volume.attach" not in plugin.methods()
    assert not plugin.mount_base.exists()


async def test_mountpoint_guard() -> None:
    driver = DockerPlugin(ControlClient("/nonexistent"), Path("/base"), RefStore(Path("/x")))
    assert driver.mountpoint("web") == Path("/base/web")
    for name in ("..", ".", "a/b", ""):
        with pytest.raises(errors.InvalidArgument):
            driver.mountpoint(name)


async def test_unmount_keeps_volume_attached_when_mounted_elsewhere(
    plugin: Plugin, tmp_path: Path
) -> None:
    await create(plugin, "web")
    await plugin.ok("Mount", {"Name": "web", "ID": "c1"})
    other = tmp_path / "admin"
    other.mkdir()
    plugin.fake.mount("web", str(other))
    await plugin.ok("Unmount", {"Name": "web", "ID": "c1"})
    record = plugin.record("web")
    assert record["mount_paths"] == [str(other)]
    assert record["attached_on"] == plugin.fake.node_id


# --- counts across a restart of the sidecar -----------------------------------------------------


async def test_counts_survive_restart(make_plugin: PluginFactory) -> None:
    first = await make_plugin()
    await create(first, "web")
    await first.ok("Mount", {"Name": "web", "ID": "c1"})
    await first.ok("Mount", {"Name": "web", "ID": "c2"})

    second = await make_plugin()
    await second.ok("Unmount", {"Name": "web", "ID": "c1"})
    assert second.record("web")["mount_paths"] == [str(second.mount_base / "web")]
    reply = await second.ok("Get", {"Name": "web"})
    assert reply["Volume"]["Status"]["containers"] == 1

    await second.ok("Unmount", {"Name": "web", "ID": "c2"})
    assert second.record("web")["mount_paths"] == []
    assert second.record("web")["attached_on"] == ""


async def test_mounted_without_counts_is_adopted(make_plugin: PluginFactory) -> None:
    # A crash between pxd's mount and the write of the counts leaves a mount with no count.
    first = await make_plugin()
    await create(first, "web")
    path = first.mount_base / "web"
    path.mkdir(parents=True)
    first.fake.attach("web")
    first.fake.mount("web", str(path))

    second = await make_plugin()
    reply = await second.ok("Mount", {"Name": "web", "ID": "c1"})
    assert reply["Mountpoint"] == str(path)
    assert "volume.mount" not in second.methods()
    await second.ok("Unmount", {"Name": "web", "ID": "c1"})
    assert second.record("web")["mount_paths"] == []


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"version": 2, "volumes": {}}',
        '{"version": 1}',
        '{"version": 1, "volumes": {"1": {"name": "a", "containers": "c1"}}}',
        '{"version": 1, "volumes": {"1": {"containers": ["c1"]}}}',
        '{"version": 1, "volumes": {"1": []}}',
    ],
)
async def test_corrupt_refs_file_rejected(tmp_path: Path, text: str) -> None:
    path = tmp_path / docker.REFS_FILE
    path.write_text(text)
    with pytest.raises(errors.InvalidArgument, match="fix or remove it"):
        RefStore.load(path)


async def test_refs_missing_file_empty(tmp_path: Path) -> None:
    store = RefStore.load(tmp_path / "absent" / docker.REFS_FILE)
    assert store.containers("1") == []
    assert not (tmp_path / "absent").exists()


async def test_refs_write_failure_undoes_mount(plugin: Plugin) -> None:
    await create(plugin, "web")
    plugin.state_dir.mkdir()
    # A directory where the file should be makes the rename fail.
    (plugin.state_dir / docker.REFS_FILE).mkdir()
    err = await plugin.error("Mount", {"Name": "web", "ID": "c1"})
    assert "cannot save the reference counts" in err
    record = plugin.record("web")
    assert record["mount_paths"] == []
    assert record["attached_on"] == ""


# --- Remove -------------------------------------------------------------------------------------


async def test_remove_deletes_volume(plugin: Plugin) -> None:
    await create(plugin, "web")
    await plugin.ok("Remove", {"Name": "web"})
    assert plugin.names() == []


async def test_remove_in_use_rejected(plugin: Plugin) -> None:
    await create(plugin, "web")
    await plugin.ok("Mount", {"Name": "web", "ID": "c1"})
    err = await plugin.error("Remove", {"Name": "web"})
    assert "in use by 1 container" in err
    assert plugin.names() == ["web"]
    assert plugin.record("web")["mount_paths"] == [str(plugin.mount_base / "web")]


async def test_remove_after_unmount(plugin: Plugin) -> None:
    await create(plugin, "web")
    await plugin.ok("Mount", {"Name": "web", "ID": "c1"})
    await plugin.ok("Unmount", {"Name": "web", "ID": "c1"})
    await plugin.ok("Remove", {"Name": "web"})
    assert plugin.names() == []
    assert plugin.refs()["volumes"] == {}


async def test_remove_releases_leftover_mount(plugin: Plugin) -> None:
    await create(plugin, "web")
    path = plugin.mount_base / "web"
    path.mkdir(parents=True)
    plugin.fake.attach("web")
    plugin.fake.mount("web", str(path))
    await plugin.ok("Remove", {"Name": "web"})
    assert plugin.names() == []
    assert not path.exists()


async def test_remove_busy_elsewhere_keeps_volume(plugin: Plugin, tmp_path: Path) -> None:
    await create(plugin, "web")
    other = tmp_path / "admin"
    other.mkdir()
    plugin.fake.attach("web")
    plugin.fake.mount("web", str(other))
    err = await plugin.error("Remove", {"Name": "web"})
    assert "attached" in err
    assert plugin.record("web")["mount_paths"] == [str(other)]


async def test_remove_unknown_volume(plugin: Plugin) -> None:
    err = await plugin.error("Remove", {"Name": "nosuch"})
    assert err == "volume nosuch not found"


# --- Path, Get and List -------------------------------------------------------------------------


async def test_path_mounted_and_not(plugin: Plugin) -> None:
    await create(plugin, "web")
    err = await plugin.error("Path", {"Name": "web"})
    assert err == "volume web is not mounted"
    await plugin.ok("Mount", {"Name": "web", "ID": "c1"})
    reply = await plugin.ok("Path", {"Name": "web"})
    assert reply["Mountpoint"] == str(plugin.mount_base / "web")


async def test_path_unknown_volume(plugin: Plugin) -> None:
    assert await plugin.error("Path", {"Name": "nosuch"}) == "volume nosuch not found"


async def test_get_detached(plugin: Plugin) -> None:
    await create(plugin, "web", size="2", env="prod")
    reply = await plugin.ok("Get", {"Name": "web"})
    volume = reply["Volume"]
    record = plugin.record("web")
    assert volume["Name"] == "web"
    assert "Mountpoint" not in volume
    assert volume["CreatedAt"].endswith("Z")
    assert volume["Status"] == {
        "id": record["id"],
        "size": 2 * GIB,
        "ha_level": 1,
        "state": "detached",
        "containers": 0,
        "labels": {"env": "prod"},
    }


async def test_get_mounted(plugin: Plugin) -> None:
    await create(plugin, "web")
    await plugin.ok("Mount", {"Name": "web", "ID": "c1"})
    volume = (await plugin.ok("Get", {"Name": "web"}))["Volume"]
    assert volume["Mountpoint"] == str(plugin.mount_base / "web")
    assert volume["Status"]["state"] == "mounted"
    assert volume["Status"]["containers"] == 1
    assert volume["Status"]["attached_on"] == plugin.fake.node_id


async def test_get_unknown_volume(plugin: Plugin) -> None:
    reply = await plugin.call("Get", {"Name": "nosuch"})
    assert reply == {"Err": "volume nosuch not found"}


async def test_list_all_volumes(plugin: Plugin) -> None:
    assert await plugin.ok("List", {}) == {"Volumes": [], "Err": ""}
    await create(plugin, "a")
    await create(plugin, "b")
    await plugin.ok("Mount", {"Name": "b", "ID": "c1"})
    reply = await plugin.ok("List", {})
    volumes = sorted(reply["Volumes"], key=lambda volume: volume["Name"])
    assert volumes == [{"Name": "a"}, {"Name": "b", "Mountpoint": str(plugin.mount_base / "b")}]


# --- malformed requests and pxd failures --------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "request body must be a JSON object, got a list"),
        (b"\xff", "JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (
            b'{"Name": ' + b"1" * (sys.get_int_max_str_digits() + 1) + b"}",
            f"a number has more than {sys.get_int_max_str_digits()} digits",
        ),
    ],
)
async def test_bad_body_is_err(plugin: Plugin, data: bytes, message: str) -> None:
    response = await plugin.client.post("/VolumeDriver.Create", data=data)
    assert response.status == 200
    reply = json.loads(await response.read())
    assert message in reply["Err"]
    assert plugin.names() == []


@pytest.mark.parametrize("data", [b"", b" \n", b"null"])
async def test_empty_body_is_empty_request(plugin: Plugin, data: bytes) -> None:
    response = await plugin.client.post("/VolumeDriver.List", data=data)
    assert response.status == 200
    reply = json.loads(await response.read())
    assert reply == {"Volumes": [], "Err": ""}


async def test_body_too_large_is_err(make_plugin: PluginFactory) -> None:
    plugin = await make_plugin(max_body=1024)
    body = {"Name": "big", "Opts": {"note": "x" * 4096}}
    err = await plugin.error("Create", body)
    assert "too large" in err
    assert plugin.names() == []


async def test_request_keys_case_insensitive(plugin: Plugin) -> None:
    await plugin.ok("Create", {"name": "lower", "opts": {"size": "2"}})
    assert plugin.record("lower")["size"] == 2 * GIB


async def test_pxd_down_is_err(aiohttp_client: Any, tmp_path: Path) -> None:
    control = ControlClient(tmp_path / "absent.sock")
    driver = DockerPlugin(control, tmp_path / "mounts", RefStore(tmp_path / docker.REFS_FILE))
    client = await aiohttp_client(make_plugin_app(driver))
    response = await client.post("/VolumeDriver.List", data=b"{}")
    assert response.status == 200
    reply = json.loads(await response.read())
    assert reply["Err"] == f"pxd is not running: no socket at {tmp_path / 'absent.sock'}"


async def test_unexpected_exception_is_err(
    plugin: Plugin, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken() -> list[dict[str, Any]]:
        raise RuntimeError("boom")

    plugin.client.app[docker.PLUGIN].list = broken  # type: ignore[method-assign,unused-ignore]
    with caplog.at_level("ERROR"):
        reply = await plugin.call("List", {})
    assert reply == {"Err": "internal error; the pxd-sidecar log has the details"}
    assert "boom" in caplog.text
    caplog.clear()


# --- the plugin socket of the pxd-sidecar process -----------------------------------------------


def sidecar_args(fake: FakePxd, tmp_path: Path, plugin_socket: Path) -> list[str]:
    """Return the command line of a sidecar with private sockets and directories."""
    return [
        sys.executable, "-m", "daemon.sidecar",
        "--socket", str(fake.socket),
        "--rest", f"127.0.0.1:{free_port()}",
        "--plugin-socket", str(plugin_socket),
        "--docker-mount-base", str(tmp_path / "mounts"),
        "--state-dir", str(tmp_path / "state"),
    ]  # fmt: skip


async def start_process(args: list[str]) -> asyncio.subprocess.Process:
    """Start a sidecar with its stderr on a pipe."""
    return await asyncio.create_subprocess_exec(*args, cwd=REPO, stderr=asyncio.subprocess.PIPE)


async def plugin_call(path: Path, endpoint: str, body: Any) -> dict[str, Any]:
    """POST one plugin request over the unix socket at `path`."""
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as session:
        async with session.post(f"http://plugin/{endpoint}", json=body) as response:
            assert response.status == 200
            reply: dict[str, Any] = json.loads(await response.read())
            return reply


async def wait_for_socket(path: Path, process: asyncio.subprocess.Process) -> None:
    """Poll until the plugin socket responds to Plugin.Activate."""
    deadline = asyncio.get_running_loop().time() + START_TIMEOUT
    while asyncio.get_running_loop().time() < deadline:
        if process.returncode is not None:
            break
        try:
            await plugin_call(path, "Plugin.Activate", {})
            return
        except (aiohttp.ClientConnectionError, FileNotFoundError):
            await asyncio.sleep(0.05)
    raise AssertionError(f"pxd-sidecar did not serve {path}")


async def stop(process: asyncio.subprocess.Process, signum: int = signal.SIGTERM) -> int:
    """Send `signum` to the process and return its exit status."""
    signal_child(process, signum)
    return await asyncio.wait_for(process.wait(), START_TIMEOUT)


async def test_sidecar_serves_plugin_socket(fake_pxd: FakePxd, tmp_path: Path) -> None:
    path = tmp_path / "plugins" / "pxd.sock"
    process = await start_process(sidecar_args(fake_pxd, tmp_path, path))
    try:
        await wait_for_socket(path, process)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert os.listdir(path.parent) == ["pxd.sock"]
        reply = await plugin_call(path, "VolumeDriver.Create", {"Name": "p", "Opts": {}})
        assert reply == {"Err": ""}
        assert [record["name"] for record in fake_pxd.volumes.values()] == ["p"]
        assert await stop(process) == 0
    finally:
        await stop(process, signal.SIGKILL)
    assert not path.exists()


async def test_sidecar_kill9_keeps_counts(fake_pxd: FakePxd, tmp_path: Path) -> None:
    path = tmp_path / "plugin.sock"
    args = sidecar_args(fake_pxd, tmp_path, path)
    process = await start_process(args)
    try:
        await wait_for_socket(path, process)
        await plugin_call(path, "VolumeDriver.Create", {"Name": "web", "Opts": {}})
        for container in ("c1", "c2"):
            reply = await plugin_call(path, "VolumeDriver.Mount", {"Name": "web", "ID": container})
            assert reply["Mountpoint"] == str(tmp_path / "mounts" / "web")
        await stop(process, signal.SIGKILL)
        # The killed sidecar leaves its socket behind; the next one replaces it.
        assert path.exists()

        process = await start_process(args)
        await wait_for_socket(path, process)
        await plugin_call(path, "VolumeDriver.Unmount", {"Name": "web", "ID": "c1"})
        assert fake_pxd.find("web")["mount_paths"] == [str(tmp_path / "mounts" / "web")]
        await plugin_call(path, "VolumeDriver.Unmount", {"Name": "web", "ID": "c2"})
        assert fake_pxd.find("web")["mount_paths"] == []
        assert fake_pxd.find("web")["attached_on"] == ""
        assert await stop(process) == 0
    finally:
        await stop(process, signal.SIGKILL)


async def test_sidecar_plugin_socket_taken(fake_pxd: FakePxd, tmp_path: Path) -> None:
    path = tmp_path / "plugin.sock"
    server = await asyncio.start_unix_server(lambda reader, writer: writer.close(), path)
    async with server:
        process = await start_process(sidecar_args(fake_pxd, tmp_path, path))
        _, stderr = await asyncio.wait_for(process.communicate(), START_TIMEOUT)
        assert process.returncode == errors.Busy.exit_code
        assert f"cannot listen on {path}: another process serves it" in stderr.decode()
        assert b"Traceback" not in stderr
        assert stat.S_ISSOCK(os.lstat(path).st_mode)


async def test_sidecar_plugin_socket_not_a_socket(fake_pxd: FakePxd, tmp_path: Path) -> None:
    path = tmp_path / "plugin.sock"
    path.write_text("keep me")
    process = await start_process(sidecar_args(fake_pxd, tmp_path, path))
    _, stderr = await asyncio.wait_for(process.communicate(), START_TIMEOUT)
    assert process.returncode == errors.Unavailable.exit_code
    assert "exists and is not a socket" in stderr.decode()
    assert path.read_text() == "keep me"


async def test_sidecar_corrupt_refs_file(fake_pxd: FakePxd, tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / docker.REFS_FILE).write_text("{")
    process = await start_process(sidecar_args(fake_pxd, tmp_path, tmp_path / "plugin.sock"))
    _, stderr = await asyncio.wait_for(process.communicate(), START_TIMEOUT)
    assert process.returncode == errors.InvalidArgument.exit_code
    assert "does not contain Docker reference counts; fix or remove it" in stderr.decode()
    assert not (tmp_path / "plugin.sock").exists()


# --- counts of volumes deleted behind the plugin's back -----------------------------------------


async def delete_behind_plugin(plugin: Plugin, name: str) -> str:
    """Unmount, detach and delete volume `name` in the fake pxd, as a REST client would."""
    record = plugin.record(name)
    for path in list(record["mount_paths"]):
        plugin.fake.unmount(record["id"], path)
    plugin.fake.detach(record["id"])
    plugin.fake.delete(record["id"])
    return str(record["id"])


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        ("Mount", {"Name": "dk5", "ID": "c2"}),
        ("Unmount", {"Name": "dk5", "ID": "c1"}),
        ("Get", {"Name": "dk5"}),
        ("List", {}),
    ],
)
async def test_recreated_volume_drops_stale_counts(
    plugin: Plugin, endpoint: str, body: dict[str, Any]
) -> None:
    await create(plugin, "dk5")
    await plugin.ok("Mount", {"Name": "dk5", "ID": "c1"})
    old_id = await delete_behind_plugin(plugin, "dk5")
    assert list(plugin.refs()["volumes"]) == [old_id]
    await create(plugin, "dk5")

    await plugin.ok(endpoint, body)
    assert old_id not in plugin.refs()["volumes"]


async def test_deleted_volume_counts_dropped(plugin: Plugin) -> None:
    await create(plugin, "dk6")
    await plugin.ok("Mount", {"Name": "dk6", "ID": "c1"})
    await delete_behind_plugin(plugin, "dk6")
    await plugin.ok("Unmount", {"Name": "dk6", "ID": "c1"})
    assert plugin.refs()["volumes"] == {}


async def test_recreated_volume_released_by_last_unmount(plugin: Plugin) -> None:
    await create(plugin, "dk7")
    await plugin.ok("Mount", {"Name": "dk7", "ID": "c1"})
    await delete_behind_plugin(plugin, "dk7")
    await create(plugin, "dk7")
    await plugin.ok("Mount", {"Name": "dk7", "ID": "c2"})
    await plugin.ok("Unmount", {"Name": "dk7", "ID": "c2"})
    assert plugin.refs()["volumes"] == {}
    assert plugin.record("dk7")["mount_paths"] == []
    assert plugin.record("dk7")["attached_on"] == ""


# --- Create: replica nodes ----------------------------------------------------------------------


async def test_create_nodes_option(plugin: Plugin) -> None:
    plugin.fake.other_nodes = [{"node_id": "node-b2", "online": True, "ip": "127.0.0.2"}]
    await create(plugin, "pinned", repl="2", nodes=f"127.0.0.2;{plugin.fake.node_id}")
    record = plugin.record("pinned")
    assert record["replica_nodes"] == ["node-b2", plugin.fake.node_id]
    assert record["labels"] == {}


async def test_create_empty_nodes_option(plugin: Plugin) -> None:
    await create(plugin, "free", nodes="")
    assert plugin.record("free")["replica_nodes"] == [plugin.fake.node_id]
