"""The text and tables that pxctl prints: inspect, status, stats, verify and scrub output."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from pxfs import units
from pxfs.api import osd

_LABEL_WIDTH = 16


def verify_lines(ref: str, result: Mapping[str, Any]) -> list[str]:
    """Return the `volume verify` text of a volume.verify result."""
    replicas = len(result.get("replicas") or [])
    allocated = int(result.get("allocated_blocks") or 0)
    differing = int(result.get("differing_blocks") or 0)
    if result.get("identical"):
        if replicas == 1:
            return [f"Volume {ref}: its one replica is consistent ({allocated} allocated blocks)"]
        return [
            f"Volume {ref}: the {replicas} replicas are identical ({allocated} allocated blocks)"
        ]
    lines = [f"Volume {ref}: {differing} of {allocated} allocated blocks differ between replicas"]
    lines += [f"  {problem}" for problem in result.get("problems") or []]
    differences = result.get("differences") or []
    for entry in differences:
        copies = "; ".join(f"{node} {copy}" for node, copy in sorted(entry["copies"].items()))
        lines.append(f"  block {entry['block']}: {copies}")
    if differing > len(differences):
        lines.append(f"  and {differing - len(differences)} more blocks")
    return lines


def scrub_lines(ref: str, result: Mapping[str, Any]) -> list[str]:
    """Return the `volume scrub` text of a volume.scrub result."""
    repaired = int(result.get("repaired_blocks") or 0)
    lost = int(result.get("lost_blocks") or 0)
    lines = [
        f"Volume {ref}: checked {result.get('checked_blocks', 0)} block copies, repaired "
        f"{repaired}, lost {lost}, skipped {result.get('skipped_blocks', 0)}"
    ]
    for key, word, total in (("repaired", "repaired", repaired), ("lost", "lost", lost)):
        listed = result.get(key) or []
        lines += [f"  {word} block {block} on node {node}" for block, node in listed]
        if total > len(listed):
            lines.append(f"  and {total - len(listed)} more {word} blocks")
    return lines


def inspect_lines(
    record: Mapping[str, Any], stats: Mapping[str, Any], node_id: str = ""
) -> list[str]:
    """Return the `volume inspect` text of one volume record and its cumulative Stats.

    `node_id` is the node that pxctl talks to, which decides the mount paths of the runtime
    state as in the REST API.
    """
    attached_on = record.get("attached_on") or ""
    mounted = record.get("mounted")
    paths = mounted if mounted is not None else record.get("mount_paths") or []
    labels = ",".join(
        f"{key}={value}" for key, value in sorted((record.get("labels") or {}).items())
    )
    fields = [
        ("Name", record["name"]),
        ("Size", units.format_size(int(record["size"]))),
        ("Format", "fuse"),
        ("HA", str(record["ha_level"])),
        ("IO Priority", "LOW"),
        ("Creation time", format_time(record.get("ctime_ns", 0))),
        ("Shared", "no"),
        ("Status", volume_status_word(record)),
        ("State", f"Attached: {attached_on}" if attached_on else "detached"),
        ("Mount paths", ", ".join(str(path) for path in paths) or "none"),
        ("Labels", labels or "none"),
        ("Epoch", str(record.get("epoch", 0))),
        ("Scrub", scrub_summary(record.get("scrub"))),
        ("Reads", _counter(stats, "reads")),
        ("Reads MS", _counter(stats, "read_ms")),
        ("Bytes Read", _counter(stats, "read_bytes")),
        ("Writes", _counter(stats, "writes")),
        ("Writes MS", _counter(stats, "write_ms")),
        ("Bytes Written", _counter(stats, "write_bytes")),
        ("IOs in progress", _counter(stats, "io_progress")),
        ("Bytes used", units.format_size(int(stats.get("bytes_used") or 0))),
    ]
    lines = [f"Volume{' ' * (_LABEL_WIDTH - 6)}:  {record['id']}"]
    lines += _field_lines(fields)
    lines += replica_set_lines(record)
    lines.append(f"\tReplication Status\t:  {replication_status_text(record)}")
    lines += runtime_state_lines(osd.runtime_state(record, node_id))
    return lines


#: Runtime state keys that inspect shows in other lines, so its runtime state block skips them.
_SHOWN_ELSEWHERE = ("ID", "Attachment", "Epoch", "FilesystemUUID", "ReplicaNodes", "MountPaths")
#: The Portworx keys of the runtime state, in the order of its Volume JSON example.
_RUNTIME_STATE_ORDER = (
    "RuntimeState", "ReadQuorum", "WriteQuorum", "ReadSet", "WriteSet", "ReplicaSetCurr",
    "ReplicaSetNext", "ResyncBlocks", "FullResyncBlocks", "ResyncProgress", "RepairedBlocks",
)  # fmt: skip


def volume_status_word(record: Mapping[str, Any]) -> str:
    """Return the volume status of inspect and list: up, or degraded below ha_level in sync."""
    return "degraded" if osd.is_degraded(record) else "up"


def replication_status_text(record: Mapping[str, Any]) -> str:
    """Return Up, Degraded, or Resync with the progress of each replica being copied."""
    status = osd.replication_status(record)
    if status == osd.REPLICATION_CLEAN:
        return "Up"
    if status == osd.REPLICATION_DEGRADED:
        return "Degraded"
    progress = resync_progress(record)
    if not progress:
        return "Resync"
    return "Resync (" + ", ".join(f"{node} {done}" for node, done in progress.items()) + ")"


def resync_progress(record: Mapping[str, Any]) -> dict[str, str]:
    """Return, by node, the percentage of blocks that a running resync has scanned.

    The progress of a change of the ha level comes by node id. The mount child's ResyncProgress,
    "[{2 100/400}]", pairs an index into the replica set with the scanned and total blocks.
    """
    percent: dict[str, str] = {}
    ha_update = record.get("ha_update")
    by_node = ha_update.get("progress") if isinstance(ha_update, Mapping) else None
    for node, entry in (by_node or {}).items():
        if isinstance(entry, Mapping):
            percent[str(node)] = _percent(entry.get("scanned"), entry.get("total"))
    nodes = osd.replica_set_nodes(record)
    state = osd.child_runtime_state(record).get("ResyncProgress", "")
    for index, scanned, total in re.findall(r"\{(\d+) (\d+)/(\d+)\}", state):
        if int(index) < len(nodes):
            percent.setdefault(nodes[int(index)], _percent(scanned, total))
    return percent


def _percent(done: Any, total: Any) -> str:
    total_blocks = int(total or 0)
    if total_blocks <= 0:
        return "0%"
    return f"{min(int(done or 0) * 100 // total_blocks, 100)}%"


def replica_set_lines(record: Mapping[str, Any]) -> list[str]:
    """Return the replica set lines of inspect: one node a line, with its state when not in sync."""
    in_sync = set(osd.in_sync_nodes(record))
    current = set(osd.replica_nodes(record))
    target = record.get("replica_nodes_next")
    progress = resync_progress(record)
    lines = ["\tReplica sets on nodes:", "\t\tSet 0"]
    for node in osd.replica_set_nodes(record):
        notes = []
        if node not in current:
            notes.append("being added")
        elif target is not None and node not in target:
            notes.append("being removed")
        if node in progress:
            notes.append(f"resync {progress[node]}")
        elif node in current and node not in in_sync:
            notes.append("out of sync")
        suffix = f" ({', '.join(notes)})" if notes else ""
        lines.append(f"\t\t\tNode\t:  {units.escape_control(node)}{suffix}")
    return lines


def runtime_state_lines(state: Mapping[str, str]) -> list[str]:
    """Return the runtime state block of inspect: the Portworx keys first, then the others."""
    keys = [key for key in _RUNTIME_STATE_ORDER if key in state]
    keys += sorted(key for key in state if key not in keys and key not in _SHOWN_ELSEWHERE)
    lines = ["\tRuntime state:"]
    for key in keys:
        value = units.escape_control(str(state[key]))
        lines.append(f"\t\t{units.escape_control(key):<{_LABEL_WIDTH}}:  {value}")
    return lines


def scrub_summary(scrub: Any) -> str:
    """Return the inspect text of a record's "scrub" totals."""
    if not isinstance(scrub, Mapping) or not scrub.get("runs"):
        return "never"
    return (
        f"last {format_time(scrub.get('last_ns'))}, {scrub.get('runs')} runs, repaired "
        f"{scrub.get('repaired_blocks', 0)} blocks, lost {scrub.get('lost_blocks', 0)}"
    )


def _field_lines(fields: Sequence[tuple[str, Any]]) -> list[str]:
    """Format `label : value` lines; control characters in values are escaped for the terminal."""
    return [
        f"\t{label:<{_LABEL_WIDTH}}:  {units.escape_control(str(value))}" for label, value in fields
    ]


def status_lines(status: Mapping[str, Any]) -> list[str]:
    """Return the `status` text of a node.status result."""
    state = status.get("status", "unknown")
    headline = "pxfs is operational" if state == "up" else f"pxfs is {state}"
    capacity = int(status.get("capacity_bytes") or 0)
    used = int(status.get("used_bytes") or 0)
    free = int(status.get("free_bytes") or 0)
    fields = [
        ("Hostname", status.get("hostname", "")),
        ("IP", status.get("ip", "")),
        ("Version", status.get("version", "")),
        ("Data directory", status.get("data_dir", "")),
        ("Volumes", f"{status.get('volumes', 0)} ({status.get('mounted', 0)} mounted)"),
        ("Capacity", units.format_size(capacity)),
        ("Used", units.format_size(used)),
        ("Free", units.format_size(free)),
        ("Started", format_time(status.get("started_ns", 0))),
    ]
    lines = [f"Status: {headline}", f"Node ID: {status.get('node_id', '')}"]
    lines += _field_lines(fields)
    return lines


#: Column titles and widths of `volume stats`; the lines stream, so the widths are fixed.
_STATS_COLUMNS = [
    ("TIME", 20),
    ("READS", 8),
    ("BYTES READ", 11),
    ("WRITES", 8),
    ("BYTES WRITTEN", 13),
    ("IOPS", 8),
    ("IO DEPTH", 8),
    ("READ TPUT", 12),
    ("WRITE TPUT", 12),
    # The mount child times only its own handlers, so this is the service time inside pxfs and
    # not the latency that the application sees (see _STATS_DESCRIPTION).
    ("SVC TIME (ms)", 13),
]


def stats_header() -> str:
    """Return the header line of `volume stats`."""
    return _stats_row([title for title, _ in _STATS_COLUMNS])


def stats_line(stats: Mapping[str, Any], now: float) -> str:
    """Return one line of `volume stats` for a volume.stats_live result taken at `now`."""
    reads = int(stats.get("reads") or 0)
    writes = int(stats.get("writes") or 0)
    requests = reads + writes
    seconds = max(int(stats.get("interval_ms") or 0), 1) / 1000
    busy_ms = int(stats.get("read_ms") or 0) + int(stats.get("write_ms") or 0)
    latency = busy_ms / requests if requests else 0.0
    cells = [
        format_rfc3339(now),
        str(reads),
        units.format_size(int(stats.get("read_bytes") or 0)),
        str(writes),
        units.format_size(int(stats.get("write_bytes") or 0)),
        f"{requests / seconds:.1f}",
        str(int(stats.get("io_progress") or 0)),
        units.format_size(int(int(stats.get("read_bytes") or 0) / seconds)) + "/s",
        units.format_size(int(int(stats.get("write_bytes") or 0) / seconds)) + "/s",
        f"{latency:.2f}",
    ]
    return _stats_row(cells)


def _stats_row(cells: Sequence[str]) -> str:
    padded = [cell.rjust(width) for cell, (_, width) in zip(cells, _STATS_COLUMNS, strict=True)]
    padded[0] = cells[0].ljust(_STATS_COLUMNS[0][1])
    return "  ".join(padded).rstrip()


def format_rfc3339(seconds: float) -> str:
    """Format seconds since the epoch as an RFC 3339 UTC time to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def format_time(ns: int | None) -> str:
    """Format nanoseconds since the epoch the way pxctl prints times, in UTC."""
    if not ns:
        return "-"
    return time.strftime("%b %d %H:%M:%S UTC %Y", time.gmtime(int(ns) / 1e9))


def list_row(record: Mapping[str, Any]) -> list[str]:
    attached_on = record.get("attached_on") or ""
    where = f"attached on {attached_on}" if attached_on else "detached"
    if record.get("deleting"):
        # A delete that stopped half-way: attach fails until a repeated delete finishes.
        where = "being deleted"
    ha_level = int(record["ha_level"])
    in_sync = len(osd.in_sync_nodes(record))
    # A degraded volume shows its in-sync replicas over ha_level, as "1/2".
    ha = f"{in_sync}/{ha_level}" if in_sync < ha_level else str(ha_level)
    size = units.format_size(int(record["size"]))
    return [
        str(record["id"]),
        record["name"],
        size,
        ha,
        "no",
        "no",
        "LOW",
        f"{volume_status_word(record)} - {where}",
    ]


def node_row(node: Mapping[str, Any]) -> list[str]:
    if not node.get("online"):
        status = "Offline"
    elif node.get("status") == "up":
        status = "Online"
    else:
        status = f"Online ({node.get('status', 'unknown')})"
    return [
        str(node.get("node_id", "")),
        str(node.get("hostname", "")),
        str(node.get("ip", "")),
        units.format_size(int(node.get("capacity_bytes") or 0)),
        units.format_size(int(node.get("used_bytes") or 0)),
        units.format_size(int(node.get("free_bytes") or 0)),
        str(node.get("volumes", 0)),
        str(node.get("version", "")),
        status,
    ]


def _counter(stats: Mapping[str, Any], key: str) -> str:
    return str(int(stats.get(key) or 0))


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    # Names, labels and host names come from REST and Docker clients, so control characters
    # are escaped rather than sent to the terminal.
    rows = [[units.escape_control(cell) for cell in row] for row in rows]
    widths = [len(title) for title in header]
    for row in rows:
        widths = [max(width, len(cell)) for width, cell in zip(widths, row, strict=True)]
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        print("  ".join(cells).rstrip())


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=4, sort_keys=True))
