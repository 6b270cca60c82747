"""The openstorage (OSD) wire format: volume records, stats and cluster nodes to OSD JSON.

The OSD REST API encodes protobuf structs with Go's encoding/json, so pxfs follows the same
conventions: snake_case keys, every zero value left out, enums as integers, timestamps as
{"seconds", "nanos"}. pxfs.api.osdrequests parses the request bodies.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from pxfs import errors, units

BLOCK_SIZE = units.BLOCK_SIZE

# Enum values of the openstorage protobuf definitions (api/api.proto).
FS_TYPE_FUSE = 3
VOLUME_STATE_ATTACHED = 3
VOLUME_STATE_DETACHED = 4
VOLUME_STATUS_UP = 2
VOLUME_STATUS_DEGRADED = 4
ACTION_NONE = 0
ACTION_OFF = 1
ACTION_ON = 2


# --- Volume JSON --------------------------------------------------------------------------------


def volume_to_osd(record: Mapping[str, Any], node_id: str) -> dict[str, Any]:
    """Convert a pxd volume record into the OSD Volume JSON object.

    `node_id` is the node that serves the request. When the volume is attached on that node,
    `attach_path` lists the paths whose mount child runs now; attached elsewhere, it lists the
    paths that the catalog records for the attached node.
    """
    attached_on = str(record.get("attached_on") or "")
    ctime = timestamp(record.get("ctime_ns", 0))
    attach_paths = attach_paths_of(record, node_id)
    volume = {
        "id": str(record["id"]),
        "locator": omit_zero(
            {"name": record["name"], "volume_labels": dict(record.get("labels") or {})}
        ),
        "ctime": ctime,
        "spec": _spec(record),
        "usage": int(record.get("usage") or 0),
        # pxd keeps no time of the last filesystem scan; openstorage's own drivers report the
        # creation time here until a scan happens, and so does pxfs.
        "last_scan": ctime,
        "format": FS_TYPE_FUSE,
        "status": volume_status(record),
        "state": VOLUME_STATE_ATTACHED if attached_on else VOLUME_STATE_DETACHED,
        "attached_on": attached_on,
        "attach_path": attach_paths,
        "replica_sets": [{"nodes": replica_set_nodes(record)}],
        "runtime_state": [{"runtime_state": _runtime_state(record, attach_paths)}],
        "attach_time": timestamp(record.get("attach_time_ns", 0)),
        "detach_time": timestamp(record.get("detach_time_ns", 0)),
    }
    return omit_zero(volume)


def timestamp(ns: int | None) -> dict[str, int]:
    """Convert nanoseconds since the epoch into a protobuf Timestamp, zero parts left out."""
    seconds, nanos = divmod(int(ns or 0), 1_000_000_000)
    return omit_zero({"seconds": seconds, "nanos": nanos})


def omit_zero(value: dict[str, Any]) -> dict[str, Any]:
    """Drop the keys whose values are zero, false, empty or None, as Go's omitempty does."""
    return {key: item for key, item in value.items() if not _is_zero(item)}


def write_quorum(ha_level: int) -> int:
    """Return the number of in-sync replicas that a write needs at `ha_level`."""
    # ha 2 stays writable, degraded, on one replica; ha 3 needs a majority of two.
    return 2 if ha_level >= 3 else 1


def _is_zero(value: Any) -> bool:
    if value is None or value is False:
        return True
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value == 0
    if isinstance(value, (str, dict, list, tuple)):
        return len(value) == 0
    return False


def _spec(record: Mapping[str, Any]) -> dict[str, Any]:
    return omit_zero(
        {
            "size": int(record["size"]),
            "format": FS_TYPE_FUSE,
            "block_size": BLOCK_SIZE,
            "ha_level": int(record["ha_level"]),
            # openstorage's REST handler keeps the labels in both the locator and the spec.
            "volume_labels": dict(record.get("labels") or {}),
            # pxfs stripes nothing across nodes: every replica contains the whole volume.
            "aggregation_level": 1,
        }
    )


def runtime_state(record: Mapping[str, Any], node_id: str) -> dict[str, str]:
    """Return the runtime_state map of the Volume JSON that `node_id` serves for `record`."""
    return _runtime_state(record, attach_paths_of(record, node_id))


def attach_paths_of(record: Mapping[str, Any], node_id: str) -> list[str]:
    """Return the mount paths of the Volume JSON's attach_path, empty for a detached volume."""
    if not record.get("attached_on"):
        return []
    if record.get("attached_on") == node_id and record.get("mounted") is not None:
        return [str(path) for path in record["mounted"]]
    return [str(path) for path in record.get("mount_paths") or []]


def _runtime_state(record: Mapping[str, Any], attach_paths: list[str]) -> dict[str, str]:
    """Merge the mount child's runtime state over the one that the record alone gives."""
    if attach_paths:
        attachment = "mounted"
    elif record.get("attached_on"):
        attachment = "attached"
    else:
        attachment = "detached"
    values = {
        "ID": "0",
        "Attachment": attachment,
        "Epoch": str(int(record.get("epoch") or 0)),
        "FilesystemUUID": str(record.get("uuid") or ""),
        "ReplicaNodes": ",".join(str(node) for node in record.get("replica_nodes") or []),
        "MountPaths": ",".join(str(path) for path in record.get("mount_paths") or []),
        **record_replication_state(record),
    }
    values.update(child_runtime_state(record))
    return {key: value for key, value in values.items() if value}


# --- Replication state --------------------------------------------------------------------------

#: RuntimeState values of a mount child (docs/replication.md) and of a record without one.
REPLICATION_CLEAN = "clean"
REPLICATION_DEGRADED = "degraded"
REPLICATION_RESYNC = "resync"


def replica_nodes(record: Mapping[str, Any]) -> list[str]:
    """Return the record's replica nodes as strings."""
    return [str(node) for node in record.get("replica_nodes") or []]


def replica_set_nodes(record: Mapping[str, Any]) -> list[str]:
    """Return the nodes of the volume's replica set: the replica nodes, then those being added.

    During a raise of the ha level, `replica_nodes_next` names the new nodes, which hold a
    replica that is still being copied. The indexes of ReplicaSetNext point into this list.
    """
    nodes = replica_nodes(record)
    for node in record.get("replica_nodes_next") or []:
        if str(node) not in nodes:
            nodes.append(str(node))
    return nodes


def in_sync_nodes(record: Mapping[str, Any]) -> list[str]:
    """Return the replica nodes that are in the write set and not out of sync."""
    nodes = replica_nodes(record)
    # Records written before pxd tracked the write set have none: every replica was in it.
    write_set = record.get("write_set")
    members = nodes if write_set is None else [str(node) for node in write_set]
    out_of_sync = {str(node) for node in record.get("out_of_sync") or []}
    return [node for node in nodes if node in members and node not in out_of_sync]


def replication_status(record: Mapping[str, Any]) -> str:
    """Return resync, degraded or clean: the replication state that pxctl shows.

    It is resync while the mount child copies to a replica, degraded while fewer replica nodes
    than ha_level are in sync, and clean otherwise.
    """
    if child_runtime_state(record).get("RuntimeState") == REPLICATION_RESYNC:
        return REPLICATION_RESYNC
    if is_degraded(record):
        return REPLICATION_DEGRADED
    return REPLICATION_CLEAN


def is_degraded(record: Mapping[str, Any]) -> bool:
    """True when fewer of the replica nodes than ha_level are in sync.

    The catalog records a replica as out of sync before a write that missed it is acknowledged,
    and a resyncing replica stays out of sync until it rejoins the write set, so the record
    alone decides. A replica being added by a raise of the ha level does not count.
    """
    return len(in_sync_nodes(record)) < int(record["ha_level"])


def volume_status(record: Mapping[str, Any]) -> int:
    """Return the VolumeStatus: DEGRADED with fewer in-sync replicas than ha_level, else UP."""
    return VOLUME_STATUS_DEGRADED if is_degraded(record) else VOLUME_STATUS_UP


def child_runtime_state(record: Mapping[str, Any]) -> dict[str, str]:
    """Return the runtime state that pxd got from the volume's mount child, or {} without one."""
    state = record.get("runtime_state")
    if not isinstance(state, Mapping):
        return {}
    return {str(key): str(value) for key, value in state.items()}


def record_replication_state(record: Mapping[str, Any]) -> dict[str, str]:
    """Build the Portworx runtime state keys from the record's write set and replica nodes.

    This is the state of a volume whose mount child does not run on the serving node. Replica
    sets are lists of indexes into `replica_set_nodes`. The read order of a child is unknown
    here, so ReadSet is the write set in replica order.
    """
    nodes = replica_set_nodes(record)
    synced = in_sync_nodes(record)
    ha_level = int(record["ha_level"])
    current = replica_nodes(record)
    target = [str(node) for node in record.get("replica_nodes_next") or current]
    write_set = _index_list(nodes, synced)
    state = REPLICATION_DEGRADED if is_degraded(record) else REPLICATION_CLEAN
    return {
        "RuntimeState": state,
        "ReadQuorum": "1",
        "WriteQuorum": str(max(write_quorum(ha_level), min(len(synced), 2))),
        "ReadSet": write_set,
        "WriteSet": write_set,
        "ReplicaSetCurr": _index_list(nodes, current),
        "ReplicaSetNext": _index_list(nodes, target),
    }


def _index_list(nodes: list[str], members: list[str]) -> str:
    """Format the indexes in `nodes` of `members` as Go prints an int slice: "[0 2]"."""
    indexes = sorted(nodes.index(node) for node in members if node in nodes)
    return "[" + " ".join(str(index) for index in indexes) + "]"


# --- Stats --------------------------------------------------------------------------------------

#: The counters of pxd's Stats map, in the order of openstorage's Stats message. All are
#: integers: counts, milliseconds and bytes.
STATS_KEYS = (
    "reads",
    "read_ms",
    "read_bytes",
    "writes",
    "write_ms",
    "write_bytes",
    "io_progress",
    "io_ms",
    "bytes_used",
    "interval_ms",
)
HISTORY_TIERS = ("hourly", "daily", "monthly")
HISTORY_KEYS = ("reads", "read_ms", "read_bytes", "writes", "write_ms", "write_bytes", "io_ms")


def stats_to_osd(stats: Mapping[str, Any]) -> dict[str, int]:
    """Convert a pxd Stats map into the OSD Stats object, zero counters left out."""
    return omit_zero({key: int(stats.get(key) or 0) for key in STATS_KEYS})


def history_to_osd(history: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Convert the result of volume.stats_history; every tier is kept, even when empty."""
    converted: dict[str, list[dict[str, Any]]] = {}
    for tier in HISTORY_TIERS:
        entries = []
        for entry in history.get(tier) or []:
            counters = {key: int(entry.get(key) or 0) for key in HISTORY_KEYS}
            entries.append({"start": str(entry["start"]), **omit_zero(counters)})
        converted[tier] = entries
    return converted


# --- Usage -------------------------------------------------------------------------------------


def usage_to_osd(record: Mapping[str, Any]) -> dict[str, Any]:
    """Build the reply of GET /v1/osd-volumes/usage/{id} from a volume record.

    Every replica contains the whole volume and pxfs has no snapshots or clones, so all of the
    stored bytes are exclusive to the volume and none are shared.
    """
    used = int(record.get("usage") or 0)
    info = omit_zero({"exclusive_bytes": used, "shared_bytes": 0, "total_bytes": used})
    return {"CapacityUsageInfo": info, "Error": None}


def bytes_used_to_osd(node_id: str, records: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Build the reply of POST /v1/osd-volumes/bytesused: the stored bytes of each volume."""
    usage = [
        omit_zero({"volume_id": int(record["id"]), "total_bytes": int(record.get("usage") or 0)})
        for record in records
    ]
    return {"vol_util_info": omit_zero({"node_id": node_id, "vol_usage": usage})}


# --- Cluster and Node JSON ----------------------------------------------------------------------

# openstorage's api.Status values for nodes and clusters.
STATUS_INIT = 1
STATUS_OK = 2
STATUS_OFFLINE = 3
STATUS_ERROR = 4


def node_status_code(node: Mapping[str, Any]) -> int:
    """Return the api.Status of a node map of cluster.nodes."""
    if not node.get("online"):
        return STATUS_OFFLINE
    state = node.get("status")
    if state == "up":
        return STATUS_OK
    if state == "starting":
        return STATUS_INIT
    return STATUS_ERROR


def node_to_osd(node: Mapping[str, Any], now_ns: int) -> dict[str, Any]:
    """Convert a node map of cluster.nodes into the OSD Node object.

    Node is a plain Go struct in openstorage, so its keys are CamelCase and zero values stay.
    pxd reports no CPU or memory figures, so those fields are zero.
    """
    node_id = str(node.get("node_id") or "")
    ip = str(node.get("ip") or "")
    data_dir = str(node.get("data_dir") or "")
    capacity = int(node.get("capacity_bytes") or 0)
    used = int(node.get("used_bytes") or 0)
    disk = {"id": data_dir, "path": data_dir, "online": bool(node.get("online")),
            "size": capacity, "used": used}  # fmt: skip
    return {
        "Id": node_id,
        "SchedulerNodeName": "",
        "Cpu": 0.0,
        "CpuCores": 0,
        "MemTotal": 0,
        "MemUsed": 0,
        "MemFree": 0,
        "Avgload": 0,
        "Status": node_status_code(node),
        "GenNumber": 0,
        "Disks": {data_dir: omit_zero(disk)} if data_dir else {},
        "Pools": [omit_zero({"ID": 0, "TotalSize": capacity, "Used": used})],
        "MgmtIp": ip,
        "DataIp": ip,
        "Timestamp": rfc3339(now_ns),
        "StartTime": rfc3339(int(node.get("started_ns") or 0)),
        "Hostname": str(node.get("hostname") or ""),
        "NodeData": {
            "version": str(node.get("version") or ""),
            "volumes": int(node.get("volumes") or 0),
            "mounted": int(node.get("mounted") or 0),
            "free_bytes": int(node.get("free_bytes") or 0),
        },
        "NodeLabels": {},
        "GossipPort": "",
        "HWType": 0,
        "SecurityStatus": 0,
        "SchedulerTopology": None,
        "NonQuorumMember": False,
        "DomainID": "",
    }


def cluster_to_osd(nodes: Sequence[Mapping[str, Any]], node_id: str, now_ns: int) -> dict[str, Any]:
    """Build the OSD Cluster object from cluster.nodes for the request served by `node_id`."""
    return {
        "Status": cluster_status_code(nodes, node_id),
        # NOTE: pxfs gives its cluster no name or id yet, so Id is empty.
        "Id": "",
        "NodeId": node_id,
        "Nodes": [node_to_osd(node, now_ns) for node in nodes],
        "ManagementURL": "",
        "FluentDConfig": {"ip": "", "port": ""},
    }


def cluster_status_code(nodes: Sequence[Mapping[str, Any]], node_id: str) -> int:
    """Return the api.Status of the cluster: that of `node_id`, or ERROR when it is missing."""
    own = next((node for node in nodes if str(node.get("node_id")) == node_id), None)
    return node_status_code(own) if own is not None else STATUS_ERROR


def node_id_from_ip(nodes: Sequence[Mapping[str, Any]], id_or_ip: str) -> str:
    """Return the id of the node whose IP is `id_or_ip`, or `id_or_ip` when it is a node id.

    Raises InvalidArgument when no node of the cluster has that IP or id.
    """
    for node in nodes:
        if str(node.get("node_id") or "") == id_or_ip:
            return id_or_ip
    for node in nodes:
        if node.get("ip") and str(node["ip"]) == id_or_ip:
            return str(node.get("node_id") or "")
    raise errors.InvalidArgument(f"no node with IP or id {id_or_ip!r} in the cluster")


def node_ids_from_ips(nodes: Sequence[Mapping[str, Any]], ids_or_ips: list[str]) -> list[str]:
    """Translate node IPs to node ids with node_id_from_ip, as openstorage does for replica sets."""
    return [node_id_from_ip(nodes, id_or_ip) for id_or_ip in ids_or_ips]


def rfc3339(ns: int) -> str:
    """Format nanoseconds since the epoch as Go's time.Time encodes itself in JSON (UTC)."""
    if not ns:
        # The zero time.Time, which Go sends for a time that was never set.
        return "0001-01-01T00:00:00Z"
    seconds, nanos = divmod(int(ns), 1_000_000_000)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    fraction = f"{nanos:09d}".rstrip("0")
    return f"{text}.{fraction}Z" if fraction else f"{text}Z"
