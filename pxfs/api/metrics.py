"""The sidecar's Prometheus endpoint, /metrics on the REST port.

Nothing is sampled in the background. Each scrape calls pxd for its volumes, their cumulative
Stats and the cluster's nodes, and a collector turns the results into metric families. A pxd
that is down or too slow gives a scrape of 200 with `pxfs_up 0` and no other family, so
Prometheus records the outage instead of a failed scrape.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pxfs import errors
from pxfs.api import rest
from pxfs.api.control import ControlClient

log = logging.getLogger(__name__)

#: Seconds that one scrape may wait for pxd. Prometheus's default scrape timeout is 10 s, so a
#: slow pxd still gives a scrape with pxfs_up 0.
DEFAULT_SCRAPE_TIMEOUT = 8.0
SCRAPE_TIMEOUT: web.AppKey[float] = web.AppKey("scrape_timeout", float)

_VOLUME_LABELS = ["volume_id", "volume_name"]
_NODE_LABELS = ["node_id", "hostname"]

routes = web.RouteTableDef()


@dataclass
class VolumeSample:
    """One volume record of volume.list with its cumulative Stats map."""

    record: Mapping[str, Any]
    stats: Mapping[str, Any]


@dataclass
class Snapshot:
    """The results of pxd's calls during one scrape; `up` is False when a call failed."""

    up: bool
    volumes: list[VolumeSample] = field(default_factory=list)
    nodes: list[Mapping[str, Any]] = field(default_factory=list)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Serve the metrics in the Prometheus text format."""
    snapshot = await fetch_snapshot(request.app[rest.CONTROL], request.app[SCRAPE_TIMEOUT])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PxdCollector(snapshot))
    response = web.Response(body=generate_latest(registry))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


async def fetch_snapshot(control: ControlClient, timeout: float) -> Snapshot:
    """Ask pxd for the volumes, their Stats and the nodes; return Snapshot(up=False) on failure."""
    try:
        async with asyncio.timeout(timeout):
            records = await control.call("volume.list", {})
            nodes = await control.call("cluster.nodes")
            samples = await asyncio.gather(*(_sample(control, record) for record in records))
    except TimeoutError:
        log.warning("metrics scrape: pxd did not respond within %g s", timeout)
        return Snapshot(up=False)
    except errors.PxfsError as exc:
        log.warning("metrics scrape: pxd failed: %s", exc.message)
        return Snapshot(up=False)
    volumes = [sample for sample in samples if sample is not None]
    return Snapshot(up=True, volumes=volumes, nodes=list(nodes))


async def _sample(control: ControlClient, record: Mapping[str, Any]) -> VolumeSample | None:
    try:
        stats = await control.call("volume.stats", record["id"], True)
    except errors.NotFound:
        # Deleted between volume.list and this call; the next scrape no longer lists it.
        return None
    return VolumeSample(record, stats)


class PxdCollector(Collector):
    """A collector that yields the metric families of one scrape's Snapshot."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        """Yield pxfs_up, then the volume, replica and node families when pxd responded."""
        yield GaugeMetricFamily(
            "pxfs_up", "1 when pxd answered this scrape, 0 when it did not", value=self.snapshot.up
        )
        if not self.snapshot.up:
            return
        yield from volume_families(self.snapshot.volumes)
        yield replica_family(self.snapshot.volumes, self.snapshot.nodes)
        yield from node_families(self.snapshot.nodes)


# (metric name, help, Stats key, divisor) of the volume counters; times are sent in seconds.
# The mount child times only its own read and write handlers, so the times leave out the FUSE
# round trip and the help texts warn that they are below the latency a caller sees.
_VOLUME_COUNTERS = [
    ("pxfs_volume_reads", "Read requests completed", "reads", 1),
    ("pxfs_volume_writes", "Write requests completed", "writes", 1),
    ("pxfs_volume_read_bytes", "Bytes read", "read_bytes", 1),
    ("pxfs_volume_written_bytes", "Bytes written", "write_bytes", 1),
    (
        "pxfs_volume_read_seconds",
        "Seconds spent inside pxfs's read handler (service time without the FUSE round trip, "
        "below the latency a caller sees)",
        "read_ms",
        1000,
    ),
    (
        "pxfs_volume_write_seconds",
        "Seconds spent inside pxfs's write handler (service time without the FUSE round trip, "
        "below the latency a caller sees)",
        "write_ms",
        1000,
    ),
    (
        "pxfs_volume_io_seconds",
        "Seconds with at least one request inside pxfs's read or write handler",
        "io_ms",
        1000,
    ),
]


def volume_families(volumes: list[VolumeSample]) -> Iterator[Metric]:
    """Yield the per-volume counters and gauges, labelled by volume id and name."""
    for name, documentation, key, divisor in _VOLUME_COUNTERS:
        counter = CounterMetricFamily(name, documentation, labels=_VOLUME_LABELS)
        for sample in volumes:
            value = int(sample.stats.get(key) or 0)
            counter.add_metric(_volume_labels(sample.record), value / divisor)
        yield counter

    gauges = [
        (
            "pxfs_volume_io_in_progress",
            "Requests inside pxfs's read or write handler now, not those queued in the kernel",
            _in_progress,
        ),
        ("pxfs_volume_used_bytes", "Bytes that the volume's replicas store", _used),
        ("pxfs_volume_size_bytes", "Size of the volume in bytes", _size),
        ("pxfs_volume_ha_level", "Number of replicas the volume is configured for", _ha_level),
    ]
    for name, documentation, read in gauges:
        gauge = GaugeMetricFamily(name, documentation, labels=_VOLUME_LABELS)
        for sample in volumes:
            gauge.add_metric(_volume_labels(sample.record), read(sample))
        yield gauge


def replica_family(
    volumes: list[VolumeSample], nodes: list[Mapping[str, Any]]
) -> GaugeMetricFamily:
    """Return pxfs_volume_replica_in_sync: one gauge per replica, 1 when it is in sync."""
    online = {str(node.get("node_id")) for node in nodes if node.get("online")}
    gauge = GaugeMetricFamily(
        "pxfs_volume_replica_in_sync",
        "1 when the replica on node_id is in sync and can serve the volume, else 0",
        labels=[*_VOLUME_LABELS, "node_id"],
    )
    for sample in volumes:
        for node_id in sample.record.get("replica_nodes") or []:
            # NOTE: volume records carry no write set yet, so a replica counts as in sync
            # whenever its node is online. A replica that missed writes still shows 1.
            in_sync = str(node_id) in online
            gauge.add_metric([*_volume_labels(sample.record), str(node_id)], in_sync)
    return gauge


_NODE_GAUGES = [
    ("pxfs_node_capacity_bytes", "Size of the filesystem of the data directory", "capacity_bytes"),
    ("pxfs_node_used_bytes", "Bytes that the node's volume replicas store", "used_bytes"),
    ("pxfs_node_free_bytes", "Bytes free for pxd in the data directory", "free_bytes"),
    ("pxfs_node_volumes", "Volumes in the catalog as this node reports it", "volumes"),
    ("pxfs_node_mounted_volumes", "Volumes with a running mount child on the node", "mounted"),
]


def node_families(nodes: list[Mapping[str, Any]]) -> Iterator[Metric]:
    """Yield the node status and capacity gauges, labelled by node id and hostname."""
    online = GaugeMetricFamily(
        "pxfs_node_online", "1 when the node is a live member of the cluster", labels=_NODE_LABELS
    )
    up = GaugeMetricFamily(
        "pxfs_node_up", "1 when the node is online and its status is up", labels=_NODE_LABELS
    )
    for node in nodes:
        online.add_metric(_node_labels(node), bool(node.get("online")))
        up.add_metric(_node_labels(node), bool(node.get("online")) and node.get("status") == "up")
    yield online
    yield up

    for name, documentation, key in _NODE_GAUGES:
        gauge = GaugeMetricFamily(name, documentation, labels=_NODE_LABELS)
        for node in nodes:
            gauge.add_metric(_node_labels(node), int(node.get(key) or 0))
        yield gauge


def _volume_labels(record: Mapping[str, Any]) -> list[str]:
    return [str(record["id"]), str(record["name"])]


def _node_labels(node: Mapping[str, Any]) -> list[str]:
    return [str(node.get("node_id") or ""), str(node.get("hostname") or "")]


def _in_progress(sample: VolumeSample) -> int:
    return int(sample.stats.get("io_progress") or 0)


def _used(sample: VolumeSample) -> int:
    return int(sample.stats.get("bytes_used") or 0)


def _size(sample: VolumeSample) -> int:
    return int(sample.record["size"])


def _ha_level(sample: VolumeSample) -> int:
    return int(sample.record["ha_level"])
