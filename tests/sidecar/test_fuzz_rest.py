"""Property and fuzz tests of the REST bodies of create (POST) and update (PUT) volume.

Every reply must have a documented status and shape: a JSON object for HTTP 200 and a plain-text
message ending in a newline for a hard error. A 500, the reply to an unexpected exception, is a
failure. Accepted creates are checked against the record that the fake pxd stored.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pxfs import units

# No example database, so a run leaves no files behind. The fixtures are created once per test
# function and shared by its examples, so volumes created by earlier examples stay.
FUZZ = settings(
    database=None,
    deadline=5000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

CREATE_STATUSES = {200, 400, 413}
# PUT inspects the volume first when the body changes its spec, so an unknown id is a hard 404.
SET_STATUSES = {200, 400, 404, 413, 501}
GIB = 1 << 30


def fuzz(examples: int) -> settings:
    """Return the fuzz settings with `examples` inputs per run."""
    return settings(FUZZ, max_examples=examples)


@st.composite
def cased(draw: st.DrawFn, word: str) -> str:
    """Draw `word` with each letter in random case, as encoding/json matches keys."""
    return "".join(char.upper() if draw(st.booleans()) else char for char in word)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
sizes = st.sampled_from([0, 1, GIB, 65536, units.MAX_VOLUME_SIZE, units.MAX_VOLUME_SIZE + 1, -1])
strings = st.sampled_from(["", "v1", "vol-2", ".", "a/b", " x", "\udcff", "x" * 300]) | st.text(
    max_size=8
)
string_maps = st.dictionaries(st.text(max_size=4), st.text(max_size=4) | json_values, max_size=3)


def field(key: str, values: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[str, Any]]:
    """Return a strategy of (key in random case, value) pairs."""
    return st.tuples(cased(key), values)


def object_of(*fields: st.SearchStrategy[tuple[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Return a strategy of JSON objects with a random subset of `fields`."""
    return st.lists(st.one_of(*fields), max_size=len(fields) + 1).map(dict)


locators = object_of(
    field("name", strings | json_values), field("volume_labels", string_maps | json_values)
)
specs = object_of(
    field("size", sizes | st.integers() | json_values),
    field("ha_level", st.integers(-1, 4) | json_values),
    field("format", st.integers(0, 4) | json_values),
    field("volume_labels", string_maps | json_values),
    field("replica_set", st.fixed_dictionaries({"nodes": st.lists(strings, max_size=2)})),
    field("shared", st.booleans() | json_values),
    field("encrypted", st.booleans()),
    field("passphrase", strings),
)
actions = object_of(
    field("attach", st.integers(-1, 3) | json_values),
    field("mount", st.integers(-1, 3) | json_values),
    field("mount_path", strings | json_values),
)
bodies = object_of(
    field("locator", locators | json_values),
    field("spec", specs | json_values),
    field("source", st.fixed_dictionaries({"parent": strings}) | json_values),
    field("action", actions | json_values),
    field("options", string_maps | json_values),
)
raw_bodies = (
    st.binary(max_size=40)
    | st.sampled_from(
        [b"", b" ", b"null", b"[]", b"\xff", b"[" * 100000, b'{"locator": {"name": "\\ud800"}}']
    )
    | json_values.map(lambda value: json.dumps(value).encode())
)


async def check_reply(response: Any, statuses: set[int]) -> Any:
    """Assert the documented shape of a reply; return the decoded JSON of a 200."""
    assert response.status in statuses
    text = await response.text()
    if response.status != 200:
        assert response.content_type == "text/plain"
        assert text.endswith("\n")
        assert text.strip()
        return None
    assert response.content_type == "application/json"
    reply = json.loads(text)
    assert isinstance(reply, dict)
    return reply


@pytest.mark.asyncio
@fuzz(150)
@given(bodies)
@example(body={"Locator": {"name": "fuzz-ok"}, "spec": {"SIZE": GIB + 1, "ha_level": 2}})
async def test_create_structured_bodies(rest_client: Any, fake_pxd: Any, body: Any) -> None:
    """150 VolumeCreateRequest bodies with random fields and types: a documented reply."""
    response = await rest_client.post("/v1/osd-volumes", data=json.dumps(body).encode())
    reply = await check_reply(response, CREATE_STATUSES)
    if reply is None:
        return
    assert isinstance(reply["volume_response"], dict)
    if reply["volume_response"].get("error"):
        return
    record = fake_pxd.volumes[reply["id"]]
    assert units.validate_name(record["name"]) == record["name"]
    assert record["size"] % units.BLOCK_SIZE == 0
    assert 0 < record["size"] <= units.MAX_VOLUME_SIZE
    assert 1 <= record["ha_level"] <= 3
    assert units.validate_labels(record["labels"]) == record["labels"]


@pytest.mark.asyncio
@fuzz(200)
@given(raw_bodies)
async def test_create_raw_bodies(rest_client: Any, data: bytes) -> None:
    """200 raw and arbitrary JSON bodies for create: a documented status and shape."""
    response = await rest_client.post("/v1/osd-volumes", data=data)
    reply = await check_reply(response, CREATE_STATUSES)
    if reply is not None:
        assert isinstance(reply["volume_response"], dict)


@pytest.mark.asyncio
@fuzz(200)
@given(st.sampled_from(["fuzz-put", "missing", "1"]), bodies | raw_bodies)
async def test_put_any_body(rest_client: Any, ref: str, body: Any) -> None:
    """200 VolumeSetRequest bodies, structured or raw, on a known or unknown volume."""
    created = await rest_client.post(
        "/v1/osd-volumes",
        json={"locator": {"name": "fuzz-put"}, "spec": {"size": GIB, "ha_level": 1}},
    )
    assert created.status == 200
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await rest_client.put(f"/v1/osd-volumes/{ref}", data=data)
    reply = await check_reply(response, SET_STATUSES)
    if reply is None:
        return
    assert isinstance(reply["volume"], dict)
    assert isinstance(reply["volume_response"], dict)
    error = reply["volume_response"].get("error", "")
    assert isinstance(error, str)
