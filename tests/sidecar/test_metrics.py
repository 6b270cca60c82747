"""pxfs.api.metrics: /metrics served by the real app in front of a fake pxd."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from pxfs.api.app import make_app
from pxfs.api.control import ControlClient

pytestmark = pytest.mark.asyncio

GIB = 1 << 30
Client = TestClient[Any, Any]
FakePxd = Any
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(client: Client) -> Samples:
    """GET /metrics, check the format and return {(name, sorted labels): value}."""
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.content_type == "text/plain"
    samples: Samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def volume_key(name: str, volume_id: str, volume: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Return the sample key of a per-volume metric."""
    return (name, (("volume_id", volume_id), ("volume_name", volume)))


async def create(client: Client, name: str, size: int = GIB) -> str:
    """Create a volume through the API and return its id."""
    body = {"locator": {"name": name}, "spec": {"size": size}}
    response = await client.post("/v1/osd-volumes", json=body)
    assert response.status == 200
    return str((await response.json())["id"])


async def test_metrics_volume_counters(rest_client: Client, fake_pxd: FakePxd) -> None:
    volume_id = await create(rest_client, "vol1", size=2 * GIB)
    fake_pxd.volumes[volume_id]["usage"] = 5 << 20
    fake_pxd.totals[volume_id] = {
        "reads": 10,
        "read_bytes": 40960,
        "read_ms": 1500,
        "writes": 64,
        "write_bytes": 4 << 20,
        "write_ms": 250,
        "io_ms": 1700,
        "io_progress": 2,
    }
    samples = await scrape(rest_client)
    assert samples[("pxfs_up", ())] == 1
    expected = {
        "pxfs_volume_reads_total": 10,
        "pxfs_volume_read_bytes_total": 40960,
        "pxfs_volume_read_seconds_total": 1.5,
        "pxfs_volume_writes_total": 64,
        "pxfs_volume_written_bytes_total": 4 << 20,
        "pxfs_volume_write_seconds_total": 0.25,
        "pxfs_volume_io_seconds_total": 1.7,
        "pxfs_volume_io_in_progress": 2,
        "pxfs_volume_used_bytes": 5 << 20,
        "pxfs_volume_size_bytes": 2 * GIB,
        "pxfs_volume_ha_level": 1,
    }
    for name, value in expected.items():
        assert samples[volume_key(name, volume_id, "vol1")] == value, name


async def test_metrics_replica_in_sync(rest_client: Client, fake_pxd: FakePxd) -> None:
    volume_id = await create(rest_client, "vol1")
    fake_pxd.other_nodes = [{"node_id": "node-b2", "online": False}]
    fake_pxd.volumes[volume_id]["replica_nodes"] = [fake_pxd.node_id, "node-b2"]
    samples = await scrape(rest_client)
    labels = (("volume_id", volume_id), ("volume_name", "vol1"))
    in_sync = "pxfs_volume_replica_in_sync"
    assert samples[(in_sync, (("node_id", fake_pxd.node_id), *labels))] == 1
    assert samples[(in_sync, (("node_id", "node-b2"), *labels))] == 0


async def test_metrics_node_gauges(rest_client: Client, fake_pxd: FakePxd) -> None:
    fake_pxd.other_nodes = [{"node_id": "node-b2", "hostname": "hb", "online": False}]
    samples = await scrape(rest_client)
    own = (("hostname", "fakehost"), ("node_id", fake_pxd.node_id))
    other = (("hostname", "hb"), ("node_id", "node-b2"))
    assert samples[("pxfs_node_online", own)] == 1
    assert samples[("pxfs_node_up", own)] == 1
    assert samples[("pxfs_node_online", other)] == 0
    assert samples[("pxfs_node_up", other)] == 0
    assert samples[("pxfs_node_capacity_bytes", own)] == 100 * GIB
    assert samples[("pxfs_node_used_bytes", own)] == 40 * GIB
    assert samples[("pxfs_node_free_bytes", own)] == 60 * GIB
    assert samples[("pxfs_node_volumes", own)] == 0


async def test_metrics_no_volumes(rest_client: Client) -> None:
    samples = await scrape(rest_client)
    assert samples[("pxfs_up", ())] == 1
    assert not [key for key in samples if key[0].startswith("pxfs_volume_")]


async def test_metrics_deleted_volume_skipped(rest_client: Client, fake_pxd: FakePxd) -> None:
    volume_id = await create(rest_client, "vol1")
    # volume.list now returns an id that volume.stats does not find, as when the volume is
    # deleted between the two calls.
    fake_pxd.volumes[volume_id]["id"] = "404404"
    samples = await scrape(rest_client)
    assert samples[("pxfs_up", ())] == 1
    assert not [key for key in samples if key[0] == "pxfs_volume_size_bytes"]
    assert ("volume.stats", ("404404", True)) in fake_pxd.calls


async def test_metrics_pxd_down_up_0(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(make_app(ControlClient(tmp_path / "absent.sock")))
    samples = await scrape(client)
    assert samples == {("pxfs_up", ()): 0}


async def test_metrics_pxd_error_up_0(rest_client: Client, fake_pxd: FakePxd) -> None:
    fake_pxd.fail_next = RuntimeError("catalog unreadable")
    samples = await scrape(rest_client)
    assert samples == {("pxfs_up", ()): 0}
    assert (await scrape(rest_client))[("pxfs_up", ())] == 1


async def test_metrics_pxd_silent_up_0(aiohttp_client: Any, tmp_path: Path) -> None:
    path = tmp_path / "silent.sock"

    async def never_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_unix_server(never_reply, path)
    try:
        app = make_app(ControlClient(path), scrape_timeout=0.5)
        client = await aiohttp_client(app)
        started = time.monotonic()
        samples = await scrape(client)
        assert samples == {("pxfs_up", ()): 0}
        assert time.monotonic() - started < 5
    finally:
        server.close()
        await server.wait_closed()


async def test_metrics_help_says_service_time(rest_client: Client) -> None:
    await create(rest_client, "vol1")
    response = await rest_client.get("/metrics")
    assert response.status == 200
    documentation = {
        family.name: family.documentation
        for family in text_string_to_metric_families(await response.text())
    }
    for name in ("pxfs_volume_read_seconds", "pxfs_volume_write_seconds"):
        assert "without the FUSE round trip" in documentation[name]
        assert "below the latency a caller sees" in documentation[name]
    assert "not those queued in the kernel" in documentation["pxfs_volume_io_in_progress"]
