"""The REST routes of pxfs.api.rest, served by the real app in front of a fake pxd."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from sidecarproc import signal_child

from pxfs import errors
from pxfs.api.app import MAX_BODY, make_app
from pxfs.api.control import ControlClient

pytestmark = pytest.mark.asyncio

GIB = 1 << 30

# The fixtures of conftest.py provide the fake pxd. Its types appear here as Any because
# "import conftest" would be ambiguous next to the conftest.py of tests/trio.
Client = TestClient[Any, Any]
FakePxd = Any


def create_body(name: str, size: int = GIB, ha_level: int = 1, **extra: Any) -> dict[str, Any]:
    """Return a VolumeCreateRequest body."""
    body: dict[str, Any] = {"locator": {"name": name}, "spec": {"size": size, "ha_level": ha_level}}
    body.update(extra)
    return body


async def create(client: Client, name: str, **kwargs: Any) -> str:
    """Create a volume through the API and return its id."""
    response = await client.post("/v1/osd-volumes", json=create_body(name, **kwargs))
    assert response.status == 200
    reply = await response.json()
    assert reply["volume_response"] == {}
    return str(reply["id"])


async def inspect(client: Client, ref: str) -> list[dict[str, Any]]:
    """GET /v1/osd-volumes/{ref} and return the decoded list."""
    response = await client.get(f"/v1/osd-volumes/{ref}")
    assert response.status == 200
    result: list[dict[str, Any]] = await response.json()
    return result


async def put(client: Client, ref: str, body: dict[str, Any]) -> tuple[int, Any]:
    """PUT a VolumeSetRequest and return the status and decoded body (or text)."""
    response = await client.put(f"/v1/osd-volumes/{ref}", json=body)
    if response.status == 200:
        return response.status, await response.json()
    return response.status, await response.text()


# --- versions and routing -----------------------------------------------------------------------


async def test_versions(rest_client: Client) -> None:
    response = await rest_client.get("/osd-volumes/versions")
    assert response.status == 200
    assert await response.json() == ["v1"]


async def test_unknown_path_is_go_404(rest_client: Client) -> None:
    response = await rest_client.get("/v1/no-such-route")
    assert response.status == 404
    assert await response.text() == "404 page not found\n"


# --- create -------------------------------------------------------------------------------------


async def test_create_sends_record_to_pxd(rest_client: Client, fake_pxd: FakePxd) -> None:
    body = create_body("vol1", size=GIB + 1, ha_level=2)
    body["locator"]["volume_labels"] = {"app": "db"}
    body["spec"]["volume_labels"] = {"app": "old", "tier": "gold"}
    volume_id = await create_body_request(rest_client, body)
    record = fake_pxd.volumes[volume_id]
    assert record["name"] == "vol1"
    assert record["size"] == GIB + 65536
    assert record["ha_level"] == 2
    assert record["labels"] == {"app": "db", "tier": "gold"}


async def create_body_request(client: Client, body: dict[str, Any]) -> str:
    """POST `body` to the create route and return the new id."""
    response = await client.post("/v1/osd-volumes", json=body)
    assert response.status == 200
    reply = await response.json()
    assert reply["volume_response"] == {}
    return str(reply["id"])


async def test_create_keys_case_insensitive(rest_client: Client, fake_pxd: FakePxd) -> None:
    body = {"Locator": {"NAME": "vol2"}, "SPEC": {"Size": GIB}, "unknown": [1, 2]}
    volume_id = await create_body_request(rest_client, body)
    assert fake_pxd.volumes[volume_id]["name"] == "vol2"
    assert fake_pxd.volumes[volume_id]["ha_level"] == 1


async def test_create_is_idempotent(rest_client: Client) -> None:
    first = await create(rest_client, "vol1")
    second = await create(rest_client, "vol1")
    assert first == second


async def test_create_mismatch_soft_error(rest_client: Client, fake_pxd: FakePxd) -> None:
    await create(rest_client, "vol1")
    response = await rest_client.post("/v1/osd-volumes", json=create_body("vol1", size=2 * GIB))
    assert response.status == 200
    reply = await response.json()
    assert "id" not in reply
    assert "exists" in reply["volume_response"]["error"]
    assert len(fake_pxd.volumes) == 1


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"", "empty"),
        (json.dumps(create_body("v", size="10G")).encode(), "spec.size"),  # type: ignore[arg-type]
        (json.dumps({"spec": {"size": GIB}}).encode(), "locator.name is required"),
        (json.dumps(create_body("v", size=0)).encode(), "spec.size is required"),
        (json.dumps(create_body("v", ha_level=4)).encode(), "spec.ha_level"),
        (json.dumps(create_body("a/b")).encode(), "'/'"),
        (json.dumps(create_body("v\udcff")).encode(), "locator.name"),
        (
            json.dumps(
                create_body("v", locator={"name": "v", "volume_labels": {"k": "\udcff"}})
            ).encode(),
            "lone surrogate",
        ),
    ],
)
async def test_create_bad_input_400(
    rest_client: Client, fake_pxd: FakePxd, body: bytes, expected: str
) -> None:
    response = await rest_client.post("/v1/osd-volumes", data=body)
    assert response.status == 400
    text = await response.text()
    assert expected in text
    assert text.endswith("\n")
    assert fake_pxd.volumes == {}


async def test_deeply_nested_body_400(rest_client: Client, fake_pxd: FakePxd) -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    assert len(body) < MAX_BODY
    response = await rest_client.post("/v1/osd-volumes", data=body)
    assert response.status == 400
    assert await response.text() == "request body is not valid JSON: nested too deeply\n"
    assert fake_pxd.volumes == {}


async def test_long_string_body_400(rest_client: Client, fake_pxd: FakePxd) -> None:
    response = await rest_client.post("/v1/osd-volumes", data=b'"' + b"x" * 1000 + b'"')
    assert response.status == 400
    expected = 'request body must be a JSON object, got "' + "x" * 79 + "...\n"
    assert await response.text() == expected
    assert fake_pxd.volumes == {}


async def test_body_limit_413(rest_client: Client, fake_pxd: FakePxd) -> None:
    body = create_body("big", padding="x" * (MAX_BODY + 1))
    response = await rest_client.post("/v1/osd-volumes", json=body)
    assert response.status == 413
    assert response.content_type == "text/plain"
    text = await response.text()
    assert text.startswith("request body is too large: ")
    assert str(MAX_BODY) in text
    assert text.endswith("\n")
    assert text.count("\n") == 1
    assert fake_pxd.volumes == {}


async def test_wrong_method_405_plain_text(rest_client: Client) -> None:
    response = await rest_client.patch("/v1/osd-volumes")
    assert response.status == 405
    assert response.content_type == "text/plain"
    assert await response.text() == "405 method not allowed\n"
    assert "POST" in response.headers["Allow"]


# --- list and inspect ---------------------------------------------------------------------------


async def test_list_filters(rest_client: Client) -> None:
    first = await create(rest_client, "alpha")
    body = create_body("beta")
    body["locator"]["volume_labels"] = {"env": "prod", "team": "x"}
    second = await create_body_request(rest_client, body)

    async def names(query: list[tuple[str, str]]) -> list[str]:
        response = await rest_client.get("/v1/osd-volumes", params=query)
        assert response.status == 200
        return sorted(volume["locator"]["name"] for volume in await response.json())

    assert await names([]) == ["alpha", "beta"]
    assert await names([("Name", "alpha")]) == ["alpha"]
    assert await names([("Name", "gamma")]) == []
    assert await names([("Label", json.dumps({"env": "prod"}))]) == ["beta"]
    assert await names([("ConfigLabel", json.dumps({"env": "dev"}))]) == []
    assert await names([("VolumeID", first), ("VolumeID", second)]) == ["alpha", "beta"]
    assert await names([("VolumeID", second)]) == ["beta"]


async def test_list_empty_is_list(rest_client: Client) -> None:
    response = await rest_client.get("/v1/osd-volumes")
    assert response.status == 200
    assert await response.json() == []


async def test_list_bad_label_400(rest_client: Client) -> None:
    response = await rest_client.get("/v1/osd-volumes", params={"Label": "env=prod"})
    assert response.status == 400
    assert "Label" in await response.text()


async def test_list_label_lone_surrogate_400(rest_client: Client) -> None:
    response = await rest_client.get("/v1/osd-volumes", params={"Label": '{"k": "\\udcff"}'})
    assert response.status == 400
    assert "lone surrogate" in await response.text()


async def test_inspect_by_name_and_id(rest_client: Client, fake_pxd: FakePxd) -> None:
    volume_id = await create(rest_client, "vol1", size=14 * GIB, ha_level=1)
    by_name = await inspect(rest_client, "vol1")
    by_id = await inspect(rest_client, volume_id)
    assert by_name == by_id
    assert len(by_name) == 1
    volume = by_name[0]
    assert volume["id"] == volume_id
    assert volume["locator"] == {"name": "vol1"}
    assert volume["spec"]["size"] == 15032385536
    assert volume["spec"]["block_size"] == 65536
    assert volume["spec"]["format"] == 3
    assert volume["state"] == 4
    assert volume["status"] == 2
    assert volume["replica_sets"] == [{"nodes": [fake_pxd.node_id]}]
    assert "attached_on" not in volume
    assert "attach_path" not in volume
    assert "usage" not in volume


async def test_inspect_miss_is_empty_list(rest_client: Client) -> None:
    assert await inspect(rest_client, "nothing") == []
    assert await inspect(rest_client, "versions") == []


async def test_many_requests_concurrently(rest_client: Client) -> None:
    await create(rest_client, "vol1")
    results = await asyncio.gather(*(inspect(rest_client, "vol1") for _ in range(30)))
    assert all(len(result) == 1 for result in results)


# --- PUT ----------------------------------------------------------------------------------------


async def test_put_attach_then_mount(
    rest_client: Client, fake_pxd: FakePxd, tmp_path: Path
) -> None:
    await create(rest_client, "vol1")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    body = {"action": {"attach": 2, "mount": 2, "mount_path": str(mountpoint)}}
    status, reply = await put(rest_client, "vol1", body)
    assert status == 200
    assert reply["volume_response"] == {}
    assert reply["volume"]["state"] == 3
    assert reply["volume"]["attached_on"] == fake_pxd.node_id
    assert reply["volume"]["attach_path"] == [str(mountpoint)]
    methods = [name for name, _ in fake_pxd.calls if name.startswith("volume.")]
    assert methods.index("volume.attach") < methods.index("volume.mount")


async def test_put_mount_needs_path(rest_client: Client, fake_pxd: FakePxd) -> None:
    await create(rest_client, "vol1")
    status, reply = await put(rest_client, "vol1", {"action": {"attach": 2, "mount": 2}})
    assert status == 200
    assert reply["volume_response"]["error"] == "Invalid mount path"
    assert reply["volume"]["state"] == 3
    assert "volume.mount" not in [name for name, _ in fake_pxd.calls]


async def test_put_detach_mounted_soft_error(rest_client: Client, tmp_path: Path) -> None:
    await create(rest_client, "vol1")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mount = {"action": {"attach": 2, "mount": 2, "mount_path": str(mountpoint)}}
    await put(rest_client, "vol1", mount)
    status, reply = await put(rest_client, "vol1", {"action": {"attach": 1}})
    assert status == 200
    assert "mounted" in reply["volume_response"]["error"]
    assert reply["volume"]["state"] == 3


async def test_put_unmount_before_detach(
    rest_client: Client, fake_pxd: FakePxd, tmp_path: Path
) -> None:
    await create(rest_client, "vol1")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mount = {"action": {"attach": 2, "mount": 2, "mount_path": str(mountpoint)}}
    await put(rest_client, "vol1", mount)
    body = {"action": {"attach": 1}, "options": {"UNMOUNT_BEFORE_DETACH": "true"}}
    status, reply = await put(rest_client, "vol1", body)
    assert status == 200
    assert reply["volume_response"] == {}
    assert reply["volume"]["state"] == 4
    assert fake_pxd.find("vol1")["mount_paths"] == []


async def test_put_unmount_then_detach(rest_client: Client, tmp_path: Path) -> None:
    await create(rest_client, "vol1")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mount = {"action": {"attach": 2, "mount": 2, "mount_path": str(mountpoint)}}
    await put(rest_client, "vol1", mount)
    status, reply = await put(
        rest_client, "vol1", {"action": {"mount": 1, "mount_path": str(mountpoint)}}
    )
    assert status == 200
    assert reply["volume_response"] == {}
    assert "attach_path" not in reply["volume"]
    status, reply = await put(rest_client, "vol1", {"action": {"attach": 1}})
    assert reply["volume_response"] == {}
    assert reply["volume"]["state"] == 4
    assert "attached_on" not in reply["volume"]


async def test_put_release_missing_volume_ok(rest_client: Client) -> None:
    status, reply = await put(rest_client, "ghost", {"action": {"attach": 1}})
    assert status == 200
    assert reply == {"volume": {}, "volume_response": {}}
    body = {"action": {"mount": 1, "mount_path": "/mnt/ghost"}}
    status, reply = await put(rest_client, "ghost", body)
    assert reply == {"volume": {}, "volume_response": {}}


async def test_put_attach_missing_soft_error(rest_client: Client) -> None:
    status, reply = await put(rest_client, "ghost", {"action": {"attach": 2}})
    assert status == 200
    assert "not found" in reply["volume_response"]["error"]
    assert reply["volume"] == {}


async def test_put_same_spec_accepted(rest_client: Client) -> None:
    await create(rest_client, "vol1", size=GIB, ha_level=2)
    body = {"spec": {"size": GIB, "ha_level": 2}, "locator": {"name": "vol1"}}
    status, reply = await put(rest_client, "vol1", body)
    assert status == 200
    assert reply["volume_response"] == {}
    assert reply["volume"]["spec"]["size"] == GIB


def update_calls(fake_pxd: FakePxd) -> list[tuple[Any, ...]]:
    """Return the arguments of every volume.update call that the fake pxd received."""
    return [args for name, args in fake_pxd.calls if name == "volume.update"]


async def test_put_resize_rounds_and_grows(rest_client: Client, fake_pxd: FakePxd) -> None:
    await create(rest_client, "vol1", size=GIB)
    status, reply = await put(rest_client, "vol1", {"spec": {"size": 2 * GIB + 1}})
    assert status == 200
    assert reply["volume_response"] == {}
    assert reply["volume"]["spec"]["size"] == 2 * GIB + 65536
    assert fake_pxd.find("vol1")["size"] == 2 * GIB + 65536
    assert update_calls(fake_pxd) == [("vol1", {"size": 2 * GIB + 65536})]


async def test_put_sends_only_present_keys(rest_client: Client, fake_pxd: FakePxd) -> None:
    await create(rest_client, "vol1", size=GIB, ha_level=1)
    body = {"locator": {"volume_labels": {"app": "db"}}}
    await put(rest_client, "vol1", body)
    assert update_calls(fake_pxd) == [("vol1", {"labels": {"app": "db"}})]
    assert fake_pxd.find("vol1")["size"] == GIB


async def test_put_labels_replace(rest_client: Client, fake_pxd: FakePxd) -> None:
    body = create_body("vol1")
    body["locator"]["volume_labels"] = {"old": "1", "keep": "x"}
    await create_body_request(rest_client, body)
    status, reply = await put(rest_client, "vol1", {"spec": {"volume_labels": {"new": "2"}}})
    assert status == 200
    assert reply["volume"]["locator"]["volume_labels"] == {"new": "2"}
    assert fake_pxd.find("vol1")["labels"] == {"new": "2"}


@pytest.mark.parametrize("where", ["locator", "spec"])
async def test_put_control_label_value_400(
    rest_client: Client, fake_pxd: FakePxd, where: str
) -> None:
    await create(rest_client, "vol1")
    body = {where: {"volume_labels": {"k": "a\u0000b\nc"}}}
    response = await rest_client.put("/v1/osd-volumes/vol1", json=body)
    assert response.status == 400
    assert "control character U+0000" in await response.text()
    assert fake_pxd.find("vol1")["labels"] == {}


async def test_create_control_label_value_400(rest_client: Client, fake_pxd: FakePxd) -> None:
    body = create_body("vol1")
    body["locator"]["volume_labels"] = {"k": "\u001b[31m"}
    response = await rest_client.post("/v1/osd-volumes", json=body)
    assert response.status == 400
    assert "control character U+001B" in await response.text()
    assert fake_pxd.volumes == {}


async def test_put_update_before_attach(rest_client: Client, fake_pxd: FakePxd) -> None:
    await create(rest_client, "vol1", size=GIB)
    body = {"spec": {"size": 2 * GIB}, "action": {"attach": 2}}
    status, reply = await put(rest_client, "vol1", body)
    assert status == 200
    assert reply["volume"]["state"] == 3
    assert reply["volume"]["spec"]["size"] == 2 * GIB
    methods = [name for name, _ in fake_pxd.calls]
    assert methods.index("volume.update") < methods.index("volume.attach")


async def test_put_same_spec_no_change(rest_client: Client, fake_pxd: FakePxd) -> None:
    await create(rest_client, "vol1", size=GIB, ha_level=1)
    status, reply = await put(rest_client, "vol1", {"spec": {"size": GIB, "ha_level": 1}})
    assert status == 200
    assert reply["volume_response"] == {}
    assert fake_pxd.find("vol1")["size"] == GIB


@pytest.mark.parametrize(
    ("body", "status", "expected"),
    [
        ({"spec": {"size": GIB // 2}}, 400, "shrinking is not supported"),
        ({"spec": {"size": 2 << 40}}, 400, "maximum volume size"),
        ({"spec": {"size": -1}}, 400, "spec.size must be a non-negative integer"),
        ({"spec": {"size": 1.5}}, 400, "spec.size must be a non-negative integer"),
        ({"spec": {"ha_level": 3}}, 400, "needs 3 online nodes"),
        ({"spec": {"ha_level": "2"}}, 400, "spec.ha_level"),
        ({"locator": {"volume_labels": {"": "v"}}}, 400, "label"),
        ({"locator": {"name": "renamed"}}, 501, "renaming volume vol1 is not supported"),
        ({"spec": {"replica_set": {"nodes": ["other-node"]}}}, 501, "moving the replicas"),
    ],
)
async def test_put_update_rejected_hard(
    rest_client: Client, fake_pxd: FakePxd, body: dict[str, Any], status: int, expected: str
) -> None:
    await create(rest_client, "vol1", size=GIB, ha_level=1)
    reply_status, text = await put(rest_client, "vol1", {**body, "action": {"attach": 2}})
    assert reply_status == status
    assert expected in text
    assert text.endswith("\n")
    record = fake_pxd.find("vol1")
    assert record["attached_on"] == ""
    assert record["size"] == GIB
    assert record["labels"] == {}


async def test_put_ha_change_starts_the_copy(rest_client: Client, fake_pxd: FakePxd) -> None:
    fake_pxd.other_nodes = [{"node_id": "node-b2", "online": True, "status": "up"}]
    await create(rest_client, "vol1", size=GIB, ha_level=1)
    status, text = await put(rest_client, "vol1", {"spec": {"ha_level": 2}})
    assert status == 200, text
    record = fake_pxd.find("vol1")
    assert record["ha_level"] == 1
    assert len(record["replica_nodes_next"]) == 2


async def test_put_update_unknown_volume_404(rest_client: Client, fake_pxd: FakePxd) -> None:
    status, text = await put(rest_client, "ghost", {"spec": {"size": 2 * GIB}})
    assert status == 404
    assert text == "volume ghost not found\n"
    assert update_calls(fake_pxd) == []


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"action": {"attach": "on"}}, "action.attach"),
        ({"action": {"attach": 3}}, "action.attach"),
        ({"action": {"mount": 2, "mount_path": 7}}, "action.mount_path"),
        ({"options": {"FORCE_DETACH": True}}, "options"),
        ({"spec": {"shared": True}}, "spec.shared"),
        ({"action": {"mount": 2, "mount_path": "/tmp/\udcff"}}, "action.mount_path"),
        ({"action": {"mount": 1, "mount_path": "/tmp/\udcff"}}, "lone surrogate"),
        ({"locator": {"volume_labels": {"k\udcff": "v"}}}, "locator.volume_labels"),
        ({"options": {"FORCE_DETACH": "\ud800"}}, "lone surrogate"),
    ],
)
async def test_put_bad_input_400(
    rest_client: Client, fake_pxd: FakePxd, body: dict[str, Any], expected: str
) -> None:
    await create(rest_client, "vol1")
    status, text = await put(rest_client, "vol1", body)
    assert status == 400
    assert expected in text
    assert fake_pxd.find("vol1")["attached_on"] == ""


# --- delete -------------------------------------------------------------------------------------


async def test_delete_idempotent(rest_client: Client, fake_pxd: FakePxd) -> None:
    volume_id = await create(rest_client, "vol1")
    for _ in range(2):
        response = await rest_client.delete(f"/v1/osd-volumes/{volume_id}")
        assert response.status == 200
        assert await response.json() == {}
    assert fake_pxd.volumes == {}


async def test_delete_attached_soft_error(rest_client: Client, fake_pxd: FakePxd) -> None:
    await create(rest_client, "vol1")
    await put(rest_client, "vol1", {"action": {"attach": 2}})
    response = await rest_client.delete("/v1/osd-volumes/vol1")
    assert response.status == 200
    assert "attached" in (await response.json())["error"]
    assert len(fake_pxd.volumes) == 1


# --- errors -------------------------------------------------------------------------------------


async def test_pxd_down_503(aiohttp_client: Any, tmp_path: Path) -> None:
    socket = tmp_path / "absent.sock"
    client = await aiohttp_client(make_app(ControlClient(socket)))
    for method, path in [("GET", "/v1/osd-volumes"), ("POST", "/v1/osd-volumes")]:
        body = create_body("vol1") if method == "POST" else None
        response = await client.request(method, path, json=body)
        assert response.status == 503
        text = await response.text()
        assert "pxd is not running" in text
        assert str(socket) in text


async def test_pxd_internal_error_500(rest_client: Client, fake_pxd: FakePxd) -> None:
    fake_pxd.fail_next = RuntimeError("disk on fire")
    response = await rest_client.get("/v1/osd-volumes")
    assert response.status == 500
    assert "disk on fire" in await response.text()
    assert "Retry-After" not in response.headers


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/osd-volumes"),
        ("GET", "/v1/osd-volumes/vol1"),
        ("PUT", "/v1/osd-volumes/vol1"),
        ("DELETE", "/v1/osd-volumes/vol1"),
        ("GET", "/v1/osd-volumes/stats/vol1"),
        ("GET", "/statslive?volumeid=1&stattype=volstat"),
        ("GET", "/v1/cluster/enumerate"),
    ],
)
async def test_pxd_down_retry_after(
    aiohttp_client: Any, tmp_path: Path, method: str, path: str
) -> None:
    client = await aiohttp_client(make_app(ControlClient(tmp_path / "absent.sock")))
    body = {"spec": {"size": GIB}} if method == "PUT" else None
    response = await client.request(method, path, json=body)
    assert response.status == 503
    assert response.headers["Retry-After"] == "1"


async def test_broken_record_logged_500(
    rest_client: Client, fake_pxd: FakePxd, caplog: pytest.LogCaptureFixture
) -> None:
    volume_id = await create(rest_client, "vol1")
    del fake_pxd.volumes[volume_id]["size"]
    with caplog.at_level(logging.ERROR, logger="pxfs.api.app"):
        response = await rest_client.get("/v1/osd-volumes/vol1")
    assert response.status == 500
    assert "Traceback" not in await response.text()
    assert any(record.exc_info for record in caplog.records if record.name == "pxfs.api.app")


async def test_reconnects_after_pxd_restart(
    aiohttp_client: Any, fake_server: Any, tmp_path: Path
) -> None:
    socket = tmp_path / "pxd.sock"
    client = await aiohttp_client(make_app(ControlClient(socket)))
    with fake_server(socket) as first:
        assert (await client.post("/v1/osd-volumes", json=create_body("vol1"))).status == 200
    assert (await client.get("/v1/osd-volumes/vol1")).status == 503
    with fake_server(socket, first.fake):
        assert len(await inspect(client, "vol1")) == 1


# --- the pxd-sidecar process --------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent.parent
START_TIMEOUT = 20.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start_sidecar(socket_path: Path, port: int, tmp_path: Path) -> asyncio.subprocess.Process:
    """Start pxd-sidecar as a subprocess; its stderr is a pipe."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon.sidecar",
        "--socket", str(socket_path),
        "--rest", f"127.0.0.1:{port}",
        "--plugin-socket", str(tmp_path / "plugin.sock"),
        cwd=REPO, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def wait_for_rest(session: aiohttp.ClientSession, url: str) -> None:
    """Poll `url` until the sidecar responds, for at most START_TIMEOUT seconds."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            async with session.get(url) as response:
                assert response.status == 200
                return
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.05)
    raise AssertionError(f"pxd-sidecar did not answer on {url}")


async def stop_process(process: asyncio.subprocess.Process) -> None:
    """Kill `process` if it still runs and reap it."""
    if process.returncode is None:
        signal_child(process, signal.SIGKILL)
        await process.wait()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_sidecar_serves_until_signal(
    fake_pxd: FakePxd, tmp_path: Path, signum: signal.Signals
) -> None:
    port = free_port()
    process = await start_sidecar(fake_pxd.socket, port, tmp_path)
    try:
        async with aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{port}"
            await wait_for_rest(session, f"{base}/osd-volumes/versions")
            async with session.post(f"{base}/v1/osd-volumes", json=create_body("proc")) as reply:
                assert reply.status == 200
                assert (await reply.json())["volume_response"] == {}
        assert [record["name"] for record in fake_pxd.volumes.values()] == ["proc"]
        signal_child(process, signum)
        assert await asyncio.wait_for(process.wait(), START_TIMEOUT) == 0
    finally:
        await stop_process(process)


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.05, 0.1, 0.2])
async def test_sidecar_second_signal_exit_0(
    fake_pxd: FakePxd, tmp_path: Path, delay: float
) -> None:
    # Ctrl-C sends SIGINT to the whole process group, and a supervisor may send SIGTERM right
    # after it; the second signal must not kill the sidecar while it shuts down.
    port = free_port()
    process = await start_sidecar(fake_pxd.socket, port, tmp_path)
    try:
        async with aiohttp.ClientSession() as session:
            await wait_for_rest(session, f"http://127.0.0.1:{port}/osd-volumes/versions")
        signal_child(process, signal.SIGINT)
        await asyncio.sleep(delay)
        signal_child(process, signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), START_TIMEOUT) == 0
        assert process.stderr is not None
        assert b"Traceback" not in await process.stderr.read()
        assert not (tmp_path / "plugin.sock").exists()
    finally:
        await stop_process(process)


async def test_sidecar_without_pxd_503(tmp_path: Path) -> None:
    port = free_port()
    socket_path = tmp_path / "absent.sock"
    process = await start_sidecar(socket_path, port, tmp_path)
    try:
        async with aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{port}"
            await wait_for_rest(session, f"{base}/osd-volumes/versions")
            async with session.get(f"{base}/v1/osd-volumes") as reply:
                assert reply.status == 503
                assert f"pxd is not running: no socket at {socket_path}" in await reply.text()
        signal_child(process, signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), START_TIMEOUT) == 0
    finally:
        await stop_process(process)


async def test_sidecar_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        process = await start_sidecar(tmp_path / "pxd.sock", port, tmp_path)
        try:
            _, stderr = await asyncio.wait_for(process.communicate(), START_TIMEOUT)
        finally:
            await stop_process(process)
    assert process.returncode == errors.Unavailable.exit_code
    assert f"pxd-sidecar: cannot listen on 127.0.0.1:{port}" in stderr.decode()
    assert b"Traceback" not in stderr


async def test_sidecar_bad_address_exit_2(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon.sidecar", "--rest", "localhost:http",
        cwd=REPO, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), START_TIMEOUT)
    assert process.returncode == 2
    assert b"invalid port" in stderr


# --- the control connection ---------------------------------------------------------------------


async def serve_raw(path: Path, reply: bytes | None) -> asyncio.AbstractServer:
    """Serve a broken pxd on `path` that sends `reply` to each request, or never replies."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        if reply is not None:
            writer.write(reply)
            await writer.drain()
        await reader.read(65536)
        writer.close()

    return await asyncio.start_unix_server(handle, path)


async def test_invalid_frame_from_pxd_503(aiohttp_client: Any, tmp_path: Path) -> None:
    socket_path = tmp_path / "broken.sock"
    server = await serve_raw(socket_path, b"\xff\xff\xff\xff")
    async with server:
        client = await aiohttp_client(make_app(ControlClient(socket_path)))
        response = await client.get("/v1/osd-volumes")
        assert response.status == 503
        assert "invalid frame" in await response.text()


async def test_pxd_silent_times_out_503(aiohttp_client: Any, tmp_path: Path) -> None:
    socket_path = tmp_path / "silent.sock"

    async def never_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_unix_server(never_reply, socket_path)
    async with server:
        control = ControlClient(socket_path, read_timeout=0.2, operation_timeout=0.6)
        client = await aiohttp_client(make_app(control))
        started = time.monotonic()
        response = await client.get("/v1/osd-volumes")
        assert response.status == 503
        assert "did not respond to volume.list within 0.2 s" in await response.text()
        assert time.monotonic() - started < 0.5

        body = {"locator": {"name": "vol1"}, "spec": {"size": GIB}}
        response = await client.post("/v1/osd-volumes", json=body)
        assert response.status == 503
        assert "did not respond to volume.create within 0.6 s" in await response.text()


async def test_control_timeouts_by_method() -> None:
    control = ControlClient("/nonexistent")
    for method in ("volume.inspect", "volume.list", "volume.stats", "cluster.nodes"):
        assert control.timeout(method) == 10.0
    for method in ("volume.create", "volume.attach", "volume.mount", "volume.update"):
        assert control.timeout(method) == 60.0
