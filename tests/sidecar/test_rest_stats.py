"""The stats, usage, statslive, statshistory and cluster routes of pxfs.api.rest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from pxfs.api.app import make_app
from pxfs.api.control import ControlClient

pytestmark = pytest.mark.asyncio

GIB = 1 << 30
Client = TestClient[Any, Any]
FakePxd = Any


async def create(client: Client, name: str) -> str:
    """Create a 1 GiB volume through the API and return its id."""
    body = {"locator": {"name": name}, "spec": {"size": GIB}}
    response = await client.post("/v1/osd-volumes", json=body)
    assert response.status == 200
    return str((await response.json())["id"])


async def get(client: Client, path: str) -> tuple[int, Any]:
    """GET `path`; return the status and the decoded JSON, or the text of an error."""
    response = await client.get(path)
    if response.status == 200:
        return response.status, await response.json()
    return response.status, await response.text()


# --- /v1/osd-volumes/stats/{id} -----------------------------------------------------------------


async def test_stats_cumulative_default(rest_client: Client, fake_pxd: FakePxd) -> None:
    volume_id = await create(rest_client, "vol1")
    # A volume created a second ago, so its interval is not 0, which the reply would omit.
    fake_pxd.find("vol1")["ctime_ns"] -= 10**9
    fake_pxd.totals[volume_id] = {"writes": 4, "write_bytes": 4 << 20, "write_ms": 12}
    status, stats = await get(rest_client, f"/v1/osd-volumes/stats/{volume_id}")
    assert status == 200
    assert stats["writes"] == 4
    assert stats["write_bytes"] == 4 << 20
    assert stats["write_ms"] == 12
    assert stats["interval_ms"] >= 1000
    for key in ("reads", "read_bytes", "read_ms", "io_progress", "bytes_used"):
        assert key not in stats, key
    assert fake_pxd.calls[-1] == ("volume.stats", (volume_id, True))


@pytest.mark.parametrize(
    ("value", "cumulative"), [("true", True), ("false", False), ("FALSE", False)]
)
async def test_stats_cumulative_values(
    rest_client: Client, fake_pxd: FakePxd, value: str, cumulative: bool
) -> None:
    await create(rest_client, "vol1")
    status, _ = await get(rest_client, f"/v1/osd-volumes/stats/vol1?Cumulative={value}")
    assert status == 200
    assert fake_pxd.calls[-1] == ("volume.stats", ("vol1", cumulative))


async def test_stats_not_cumulative_is_live(rest_client: Client, fake_pxd: FakePxd) -> None:
    volume_id = await create(rest_client, "vol1")
    fake_pxd.live[volume_id] = {"reads": 7, "read_bytes": 7 * 4096}
    status, stats = await get(rest_client, "/v1/osd-volumes/stats/vol1?Cumulative=false")
    assert status == 200
    assert stats == {"reads": 7, "read_bytes": 7 * 4096, "interval_ms": 2000}


@pytest.mark.parametrize(
    "query", ["Cumulative=yes", "Cumulative=", "Cumulative=1", "Cumulative=true&Cumulative=false"]
)
async def test_stats_bad_cumulative_400(rest_client: Client, fake_pxd: FakePxd, query: str) -> None:
    await create(rest_client, "vol1")
    status, text = await get(rest_client, f"/v1/osd-volumes/stats/vol1?{query}")
    assert status == 400
    assert "query parameter Cumulative" in text
    assert text.endswith("\n")
    assert "volume.stats" not in [name for name, _ in fake_pxd.calls]


async def test_stats_unknown_volume_404(rest_client: Client) -> None:
    status, text = await get(rest_client, "/v1/osd-volumes/stats/ghost")
    assert status == 404
    assert text == "volume ghost not found\n"


# --- /v1/osd-volumes/usedsize/{id} --------------------------------------------------------------


async def test_usedsize_bare_integer(rest_client: Client, fake_pxd: FakePxd) -> None:
    volume_id = await create(rest_client, "vol1")
    fake_pxd.volumes[volume_id]["usage"] = 3 * 65536
    response = await rest_client.get(f"/v1/osd-volumes/usedsize/{volume_id}")
    assert response.status == 200
    assert await response.text() == str(3 * 65536)


async def test_usedsize_zero(rest_client: Client) -> None:
    await create(rest_client, "vol1")
    assert await get(rest_client, "/v1/osd-volumes/usedsize/vol1") == (200, 0)


async def test_usedsize_unknown_volume_404(rest_client: Client) -> None:
    assert await get(rest_client, "/v1/osd-volumes/usedsize/ghost") == (
        404, "volume ghost not found\n",
    )  # fmt: skip


# --- /statslive and /statshistory ---------------------------------------------------------------


async def test_statslive_body(rest_client: Client, fake_pxd: FakePxd) -> None:
    volume_id = await create(rest_client, "vol1")
    fake_pxd.live[volume_id] = {"writes": 32, "write_bytes": 4 << 20, "write_ms": 40}
    fake_pxd.volumes[volume_id]["usage"] = 4 << 20
    status, stats = await get(rest_client, f"/statslive?volumeid={volume_id}&stattype=volstat")
    assert status == 200
    assert stats == {
        "writes": 32,
        "write_bytes": 4 << 20,
        "write_ms": 40,
        "bytes_used": 4 << 20,
        "interval_ms": 2000,
    }
    assert fake_pxd.calls[-1] == ("volume.stats_live", (volume_id,))


async def test_statshistory_body(rest_client: Client, fake_pxd: FakePxd) -> None:
    volume_id = await create(rest_client, "vol1")
    hour = {"start": "2026-12-04T17:00:00Z", "reads": 0, "writes": 3, "write_bytes": 12288}
    day = {"start": "2026-12-03T00:00:00Z", "reads": 5, "read_bytes": 20480}
    fake_pxd.history[volume_id] = {"hourly": [hour], "daily": [day]}
    status, history = await get(rest_client, f"/statshistory?volumeid={volume_id}&stattype=volstat")
    assert status == 200
    assert history == {
        "hourly": [{"start": "2026-12-04T17:00:00Z", "writes": 3, "write_bytes": 12288}],
        "daily": [{"start": "2026-12-03T00:00:00Z", "reads": 5, "read_bytes": 20480}],
        "monthly": [],
    }


@pytest.mark.parametrize("route", ["/statslive", "/statshistory"])
@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", "query parameter volumeid is missing"),
        ("?stattype=volstat", "query parameter volumeid is missing"),
        ("?volumeid=&stattype=volstat", "query parameter volumeid is missing"),
        ("?volumeid=vol1&stattype=volstat", "volumeid must be a volume id"),
        ("?volumeid=12%2034&stattype=volstat", "volumeid must be a volume id"),
        ("?volumeid=1&volumeid=2&stattype=volstat", "volumeid is given 2 times"),
        ("?volumeid=123", "query parameter stattype is missing"),
        ("?volumeid=123&stattype=nodestat", "stattype must be volstat, got 'nodestat'"),
    ],
)
async def test_stats_query_errors_400(
    rest_client: Client, fake_pxd: FakePxd, route: str, query: str, expected: str
) -> None:
    status, text = await get(rest_client, route + query)
    assert status == 400
    assert expected in text
    assert text.endswith("\n")
    assert not [name for name, _ in fake_pxd.calls if name.startswith("volume.stats")]


@pytest.mark.parametrize("route", ["/statslive", "/statshistory"])
async def test_live_history_unknown_volume_404(rest_client: Client, route: str) -> None:
    status, text = await get(rest_client, f"{route}?volumeid=123456&stattype=volstat")
    assert status == 404
    assert text == "volume 123456 not found\n"


# --- cluster routes -----------------------------------------------------------------------------


async def test_cluster_versions(rest_client: Client) -> None:
    assert await get(rest_client, "/cluster/versions") == (200, ["v1"])


async def test_cluster_enumerate(rest_client: Client, fake_pxd: FakePxd) -> None:
    fake_pxd.other_nodes = [{"node_id": "node-b2", "online": False, "ip": "127.0.0.2"}]
    status, cluster = await get(rest_client, "/v1/cluster/enumerate")
    assert status == 200
    assert cluster["NodeId"] == fake_pxd.node_id
    assert cluster["Status"] == 2
    assert [node["Id"] for node in cluster["Nodes"]] == [fake_pxd.node_id, "node-b2"]
    own, other = cluster["Nodes"]
    assert own["Status"] == 2
    assert own["Hostname"] == "fakehost"
    assert own["MgmtIp"] == "127.0.0.1"
    assert own["Pools"] == [{"TotalSize": 100 * GIB, "Used": 40 * GIB}]
    assert other["Status"] == 3
    assert other["DataIp"] == "127.0.0.2"


async def test_cluster_inspect_node(rest_client: Client, fake_pxd: FakePxd) -> None:
    status, node = await get(rest_client, f"/v1/cluster/inspect/{fake_pxd.node_id}")
    assert status == 200
    assert node["Id"] == fake_pxd.node_id
    assert node["Status"] == 2
    assert node["Disks"]["/var/lib/pxfs"]["size"] == 100 * GIB


async def test_cluster_inspect_unknown_400(rest_client: Client) -> None:
    status, text = await get(rest_client, "/v1/cluster/inspect/node-zz")
    assert status == 400
    assert text == "node node-zz not found in the cluster\n"


@pytest.mark.parametrize(
    "path", ["/v1/cluster/status", "/v1/cluster/nodestatus", "/v1/cluster/nodehealth"]
)
async def test_cluster_status_integer(rest_client: Client, fake_pxd: FakePxd, path: str) -> None:
    assert await get(rest_client, path) == (200, 2)
    original = fake_pxd.node_status
    fake_pxd.node_status = lambda: {**original(), "status": "starting"}
    assert await get(rest_client, path) == (200, 1)
    fake_pxd.node_status = lambda: {**original(), "status": "stopping"}
    assert await get(rest_client, path) == (200, 4)


async def test_cluster_node_id_from_ip(rest_client: Client, fake_pxd: FakePxd) -> None:
    fake_pxd.other_nodes = [{"node_id": "node-b2", "online": True, "ip": "127.0.0.2"}]
    path = "/v1/cluster/getnodeidfromip"
    assert await get(rest_client, f"{path}/127.0.0.1") == (200, fake_pxd.node_id)
    assert await get(rest_client, f"{path}/127.0.0.2") == (200, "node-b2")
    assert await get(rest_client, f"{path}/node-b2") == (200, "node-b2")
    status, text = await get(rest_client, f"{path}/10.9.9.9")
    assert status == 400
    assert text == "no node with IP or id '10.9.9.9' in the cluster\n"


# --- usage and bytesused ------------------------------------------------------------------------


async def test_volume_usage(rest_client: Client, fake_pxd: FakePxd) -> None:
    volume_id = await create(rest_client, "vol1")
    fake_pxd.volumes[volume_id]["usage"] = 5 << 20
    expected = {
        "CapacityUsageInfo": {"exclusive_bytes": 5 << 20, "total_bytes": 5 << 20},
        "Error": None,
    }
    assert await get(rest_client, "/v1/osd-volumes/usage/vol1") == (200, expected)
    assert await get(rest_client, f"/v1/osd-volumes/usage/{volume_id}") == (200, expected)


async def test_volume_usage_unknown_404(rest_client: Client) -> None:
    status, text = await get(rest_client, "/v1/osd-volumes/usage/nosuch")
    assert status == 404
    assert text == "volume nosuch not found\n"


async def test_bytes_used(rest_client: Client, fake_pxd: FakePxd) -> None:
    first = await create(rest_client, "vol1")
    second = await create(rest_client, "vol2")
    fake_pxd.volumes[first]["usage"] = 1 << 20
    fake_pxd.volumes[second]["usage"] = 3 << 20
    path = "/v1/osd-volumes/bytesused"

    response = await rest_client.post(path, json={"node_id": fake_pxd.node_id, "ids": [int(first)]})
    assert response.status == 200
    assert await response.json() == {
        "vol_util_info": {
            "node_id": fake_pxd.node_id,
            "vol_usage": [{"volume_id": int(first), "total_bytes": 1 << 20}],
        }
    }

    response = await rest_client.post(path, json={})
    assert response.status == 200
    usage = (await response.json())["vol_util_info"]["vol_usage"]
    assert sorted(item["volume_id"] for item in usage) == sorted([int(first), int(second)])

    response = await rest_client.post(path, json={"ids": [123]})
    assert response.status == 200
    assert await response.json() == {"vol_util_info": {"node_id": fake_pxd.node_id}}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"ids": ["1"]}, 'ids must be a list of volume ids (unsigned integers), got ["1"]'),
        ({"ids": [-1]}, "ids must be a list of volume ids"),
        ({"ids": 5}, "ids must be a list of volume ids"),
        ({"node_id": 7}, "node_id must be a string, got 7"),
        ({"node_id": "node-zz"}, "node_id node-zz is not this node (node-a1)"),
    ],
)
async def test_bytes_used_bad_body_400(
    rest_client: Client, body: dict[str, Any], expected: str
) -> None:
    response = await rest_client.post("/v1/osd-volumes/bytesused", json=body)
    assert response.status == 400
    assert expected in await response.text()


async def test_cluster_routes_pxd_down_503(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(make_app(ControlClient(tmp_path / "absent.sock")))
    for path in [
        "/v1/cluster/enumerate",
        "/v1/osd-volumes/stats/x",
        "/statslive?volumeid=1&stattype=volstat",
        "/v1/cluster/status",
        "/v1/cluster/nodestatus",
        "/v1/cluster/nodehealth",
        "/v1/cluster/getnodeidfromip/127.0.0.1",
        "/v1/osd-volumes/usage/x",
    ]:
        status, text = await get(client, path)
        assert status == 503, path
        assert "pxd is not running" in text
