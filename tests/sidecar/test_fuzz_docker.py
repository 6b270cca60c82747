"""Property and fuzz tests of the Docker volume plugin: DriverOpts, inline specs, every endpoint.

The parsers may raise only InvalidArgument or NotSupported, and what they accept must satisfy
the volume rules of pxfs.units. Every endpoint must reply with HTTP 200 with a JSON object whose
Err, when present, is a message of a PxfsError and never the reply to an unexpected exception.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pxfs import errors, units
from pxfs.api import docker, dockeropts
from pxfs.api.app import make_plugin_app
from pxfs.api.control import ControlClient
from pxfs.api.docker import DockerPlugin
from pxfs.api.dockerrefs import RefStore

# No example database, so a run leaves no files behind. The fixtures are created once per test
# function and shared by its examples, so volumes and counts from earlier examples stay.
FUZZ = settings(
    database=None,
    deadline=5000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

INTERNAL_ERR = "internal error; the pxd-sidecar log has the details"
ENDPOINTS = [
    "/Plugin.Activate",
    "/VolumeDriver.Capabilities",
    "/VolumeDriver.Create",
    "/VolumeDriver.Remove",
    "/VolumeDriver.Mount",
    "/VolumeDriver.Unmount",
    "/VolumeDriver.Path",
    "/VolumeDriver.Get",
    "/VolumeDriver.List",
]
OPTION_KEYS = [
    "size",
    "repl",
    "labels",
    "fs",
    "name",
    "shared",
    "sharedv4",
    "secure",
    "sticky",
    "compressed",
    "dedupe",
    "secret_key",
    "parent",
    "nodes",
    "token",
    "token_secret",
    "io_priority",
]
OPTION_VALUES = [
    "",
    "1",
    "2",
    "3",
    "4",
    "0",
    "true",
    "FALSE",
    "t",
    "maybe",
    "fuse",
    "ext4",
    "1G",
    "14",
    "512 MiB",
    "0.5K",
    "2T",
    "-1",
    "k=v",
    "a=1,b=2",
    "=x",
    "vol1",
]


def fuzz(examples: int) -> settings:
    """Return the fuzz settings with `examples` inputs per run."""
    return settings(FUZZ, max_examples=examples)


@st.composite
def cased(draw: st.DrawFn, word: str) -> str:
    """Draw `word` with random letter case and optional surrounding spaces."""
    letters = "".join(char.upper() if draw(st.booleans()) else char for char in word)
    return draw(st.sampled_from(["", " "])) + letters + draw(st.sampled_from(["", " "]))


option_keys = st.sampled_from(OPTION_KEYS).flatmap(cased) | st.text(max_size=6)
option_values = st.sampled_from(OPTION_VALUES) | st.text(max_size=8)
docker_opts = st.dictionaries(option_keys, option_values, max_size=5)
plain_names = st.sampled_from(["vol1", "a", ".", "..", "a/b", " x", "x\u2028", ""]) | st.text(
    max_size=12
)


@st.composite
def inline_specs(draw: st.DrawFn) -> str:
    """Draw a `name=...,size=...` string, sometimes malformed."""
    parts = [f"name={draw(st.sampled_from(['vol1', 'v_2', 'bad name', '', 'x-y']))}"]
    for _ in range(draw(st.integers(0, 4))):
        key = draw(option_keys)
        value = draw(option_values)
        parts.append(draw(st.sampled_from([f"{key}={value}", key, f"{key}=={value}"])))
    parts = draw(st.permutations(parts))
    return "".join(part + draw(st.sampled_from([",", ";", ",,", ";,"])) for part in parts)[:-1]


docker_names = plain_names | inline_specs()


def check_spec(spec: dockeropts.CreateSpec) -> None:
    """Assert that an accepted Create spec obeys the volume rules."""
    assert units.validate_name(spec.name) == spec.name
    assert spec.size % units.BLOCK_SIZE == 0
    assert units.MIN_VOLUME_SIZE <= spec.size <= units.MAX_VOLUME_SIZE
    assert 1 <= spec.ha_level <= dockeropts.MAX_HA_LEVEL
    assert units.validate_labels(spec.labels) == spec.labels


@fuzz(300)
@given(st.text(max_size=40) | inline_specs())
def test_parse_inline_any_text(text: str) -> None:
    """300 strings: None, an option map with a valid inline name, or InvalidArgument."""
    try:
        options = dockeropts.parse_inline(text)
    except errors.InvalidArgument:
        return
    if options is None:
        return
    assert dockeropts._INLINE_NAME.fullmatch(options["name"])
    for key in options:
        assert key
        assert key == key.strip().lower()


@fuzz(300)
@given(docker_names, st.none() | docker_opts)
def test_parse_create_any_opts(name: str, opts: dict[str, str] | None) -> None:
    """300 Names and DriverOpts: a spec within the volume rules or InvalidArgument/NotSupported."""
    try:
        spec = dockeropts.parse_create(name, opts)
    except (errors.InvalidArgument, errors.NotSupported):
        return
    check_spec(spec)
    inline = dockeropts.parse_inline(name)
    options = (
        inline if inline is not None else {k.strip().lower(): v for k, v in (opts or {}).items()}
    )
    if "size" in options:
        assert spec.size == units.parse_size(options["size"])
    if "repl" in options:
        assert spec.ha_level == int(options["repl"])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)


@fuzz(200)
@given(json_values | docker_names, json_values | docker_opts)
def test_parse_create_wrong_types(name: Any, opts: Any) -> None:
    """200 Names and Opts of any JSON type: a valid spec or InvalidArgument/NotSupported."""
    try:
        spec = dockeropts.parse_create(name, opts)
    except (errors.InvalidArgument, errors.NotSupported):
        return
    check_spec(spec)


# --- every endpoint over HTTP --------------------------------------------------------------------


@pytest_asyncio.fixture
async def plugin_client(fake_pxd: Any, aiohttp_client: Any, tmp_path: Path) -> AsyncIterator[Any]:
    """A plugin app on the fake pxd, with its mount base and state directory under tmp_path."""
    control = ControlClient(fake_pxd.socket)
    refs = RefStore.load(tmp_path / "state" / docker.REFS_FILE)
    driver = DockerPlugin(control, tmp_path / "mounts", refs)
    client: TestClient[Any, Any] = await aiohttp_client(make_plugin_app(driver))
    yield client
    await control.close()


@st.composite
def plugin_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """Draw a body with Name, Opts and ID in random case, and sometimes wrong types."""
    body: dict[str, Any] = {}
    if draw(st.booleans()):
        body[draw(cased("Name"))] = draw(docker_names | json_values)
    if draw(st.booleans()):
        body[draw(cased("Opts"))] = draw(docker_opts | json_values)
    if draw(st.booleans()):
        body[draw(cased("ID"))] = draw(st.sampled_from(["c1", "c2", ""]) | json_values)
    return body


raw_bodies = st.binary(max_size=40) | st.sampled_from(
    [b"", b"  ", b"null", b"[]", b"\xff\xfe", b"[" * 5000, b'{"Name": "\\ud800"}']
)


async def post_plugin(client: Any, path: str, data: bytes) -> dict[str, Any]:
    """POST `data` to `path` and check the reply shape that dockerd requires."""
    response = await client.post(path, data=data)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith(docker.CONTENT_TYPE)
    reply = json.loads(await response.read())
    assert isinstance(reply, dict)
    if "Err" in reply:
        assert isinstance(reply["Err"], str)
        assert reply["Err"] != INTERNAL_ERR
    return reply


@pytest.mark.asyncio
@fuzz(200)
@given(st.sampled_from(ENDPOINTS), plugin_bodies())
async def test_endpoints_structured_bodies(
    plugin_client: Any, path: str, body: dict[str, Any]
) -> None:
    """200 endpoint and body pairs with Name, Opts and ID fields: 200 and an Err or a result."""
    reply = await post_plugin(plugin_client, path, json.dumps(body).encode())
    if path == "/VolumeDriver.Mount" and not reply["Err"]:
        assert reply["Mountpoint"]


@pytest.mark.asyncio
@fuzz(200)
@given(st.sampled_from(ENDPOINTS), raw_bodies | json_values.map(lambda v: json.dumps(v).encode()))
async def test_endpoints_any_body(plugin_client: Any, path: str, data: bytes) -> None:
    """200 endpoint and raw or arbitrary JSON bodies: always 200 with a JSON object reply."""
    await post_plugin(plugin_client, path, data)
