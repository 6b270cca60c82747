"""Replication state in the REST Volume JSON, and replica nodes pinned at create."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from pxfs.api import osd

pytestmark = pytest.mark.asyncio

GIB = 1 << 30
OTHER = {"node_id": "node-b2", "online": True, "status": "up", "ip": "127.0.0.2"}

# FakePxd comes from conftest.py, which "import conftest" cannot name unambiguously.
Client = TestClient[Any, Any]
FakePxd = Any


async def post_create(client: Client, spec: dict[str, Any]) -> tuple[int, Any]:
    """POST a VolumeCreateRequest for volume "vol1"; return the status and body."""
    response = await client.post(
        "/v1/osd-volumes", json={"locator": {"name": "vol1"}, "spec": spec}
    )
    if response.status == 200:
        return response.status, await response.json()
    return response.status, await response.text()


async def inspect_one(client: Client, ref: str) -> dict[str, Any]:
    """GET /v1/osd-volumes/{ref} and return its one Volume."""
    response = await client.get(f"/v1/osd-volumes/{ref}")
    assert response.status == 200
    [volume] = await response.json()
    assert isinstance(volume, dict)
    return volume


def runtime_state(volume: dict[str, Any]) -> dict[str, str]:
    """Return the one runtime state map of a Volume."""
    [entry] = volume["runtime_state"]
    state: dict[str, str] = entry["runtime_state"]
    return state


# --- create with replica nodes ------------------------------------------------------------------


async def test_create_pins_node_ids(rest_client: Client, fake_pxd: FakePxd) -> None:
    fake_pxd.other_nodes = [OTHER]
    nodes = ["node-b2", fake_pxd.node_id]
    status, reply = await post_create(
        rest_client, {"size": GIB, "ha_level": 2, "replica_set": {"nodes": nodes}}
    )
    assert status == 200
    assert reply["volume_response"] == {}
    [(method, (spec,))] = [call for call in fake_pxd.calls if call[0] == "volume.create"]
    assert method == "volume.create"
    assert spec["nodes"] == nodes
    assert fake_pxd.volumes[reply["id"]]["replica_nodes"] == nodes


async def test_create_translates_node_ips(rest_client: Client, fake_pxd: FakePxd) -> None:
    fake_pxd.other_nodes = [OTHER]
    spec = {"size": GIB, "ha_level": 2, "replica_set": {"nodes": ["127.0.0.2", "127.0.0.1"]}}
    status, reply = await post_create(rest_client, spec)
    assert status == 200
    assert reply["volume_response"] == {}
    assert fake_pxd.volumes[reply["id"]]["replica_nodes"] == ["node-b2", fake_pxd.node_id]


async def test_create_unknown_node_400(rest_client: Client, fake_pxd: FakePxd) -> None:
    spec = {"size": GIB, "replica_set": {"nodes": ["10.9.9.9"]}}
    status, text = await post_create(rest_client, spec)
    assert status == 400
    assert "no node with IP or id '10.9.9.9'" in text
    assert fake_pxd.volumes == {}


async def test_create_wrong_node_count_soft(rest_client: Client, fake_pxd: FakePxd) -> None:
    spec = {"size": GIB, "ha_level": 1, "replica_set": {"nodes": [fake_pxd.node_id] * 2}}
    status, reply = await post_create(rest_client, spec)
    assert status == 200
    assert "replica nodes" in reply["volume_response"]["error"]
    assert fake_pxd.volumes == {}


async def test_create_empty_nodes_lets_pxd_choose(rest_client: Client, fake_pxd: FakePxd) -> None:
    status, reply = await post_create(rest_client, {"size": GIB, "replica_set": {"nodes": []}})
    assert status == 200
    [(_, (spec,))] = [call for call in fake_pxd.calls if call[0] == "volume.create"]
    assert "nodes" not in spec
    assert not any(call[0] == "cluster.nodes" for call in fake_pxd.calls)


# --- replication state --------------------------------------------------------------------------


async def test_new_volume_up_and_clean(rest_client: Client, fake_pxd: FakePxd) -> None:
    await post_create(rest_client, {"size": GIB})
    volume = await inspect_one(rest_client, "vol1")
    state = runtime_state(volume)
    assert volume["status"] == osd.VOLUME_STATUS_UP
    assert state["RuntimeState"] == "clean"
    assert state["WriteSet"] == "[0]"
    assert state["Attachment"] == "detached"


async def test_degraded_record_inspect(rest_client: Client, fake_pxd: FakePxd) -> None:
    fake_pxd.other_nodes = [OTHER]
    nodes = [fake_pxd.node_id, "node-b2"]
    _, reply = await post_create(
        rest_client, {"size": GIB, "ha_level": 2, "replica_set": {"nodes": nodes}}
    )
    record = fake_pxd.volumes[reply["id"]]
    record["write_set"] = [fake_pxd.node_id]
    record["out_of_sync"] = ["node-b2"]
    volume = await inspect_one(rest_client, "vol1")
    state = runtime_state(volume)
    assert volume["status"] == osd.VOLUME_STATUS_DEGRADED
    assert state["RuntimeState"] == "degraded"
    assert state["WriteSet"] == "[0]"
    assert state["WriteQuorum"] == "1"
    assert volume["replica_sets"] == [{"nodes": nodes}]


async def test_child_state_in_list(rest_client: Client, fake_pxd: FakePxd) -> None:
    _, reply = await post_create(rest_client, {"size": GIB})
    record = fake_pxd.volumes[reply["id"]]
    record["attached_on"] = fake_pxd.node_id
    record["runtime_state"] = {
        "RuntimeState": "clean",
        "WriteSet": "[0]",
        "ResyncBlocks": "[{0 5}]",
        "RepairedBlocks": "2",
    }
    response = await rest_client.get("/v1/osd-volumes")
    assert response.status == 200
    [volume] = await response.json()
    state = runtime_state(volume)
    assert volume["status"] == osd.VOLUME_STATUS_UP
    assert state["ResyncBlocks"] == "[{0 5}]"
    assert state["RepairedBlocks"] == "2"
    assert state["Attachment"] == "attached"
