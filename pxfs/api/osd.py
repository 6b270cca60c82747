"""The openstorage (OSD) wire format: volume records to Volume JSON, request bodies to calls.

The OSD REST API encodes protobuf structs with Go's encoding/json, so pxfs follows the same
conventions: snake_case keys, every zero value left out, enums as integers, timestamps as
{"seconds", "nanos"}. Request bodies are decoded the way encoding/json decodes them: key
matching is case-insensitive, unknown keys are ignored and a JSON null counts as absent.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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

#: Largest replica count pxfs places (one replica per node, at most three).
MAX_HA_LEVEL = 3

#: Volume features that openstorage clients may request and pxfs does not have. A request that
#: switches one on is rejected, because silently creating the volume without the feature (an
#: unencrypted volume where encryption was requested) would mislead the client.
UNSUPPORTED_FLAGS = ("shared", "sharedv4", "encrypted", "sticky", "compressed", "dedupe")

_ABSENT: Any = object()


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


def parse_bytes_used_request(body: Mapping[str, Any]) -> tuple[str, list[int]]:
    """Parse the body of POST /v1/osd-volumes/bytesused into its node id and volume ids."""
    node_id = _string(body, "node_id", "node_id")
    ids = _lookup(body, "ids")
    if ids is _ABSENT:
        return node_id, []
    valid = isinstance(ids, list) and all(
        isinstance(item, int) and not isinstance(item, bool) and 0 <= item < 1 << 64 for item in ids
    )
    if not valid:
        shown = json.dumps(ids)
        shown = shown if len(shown) <= 80 else shown[:80] + "..."
        raise errors.InvalidArgument(
            f"ids must be a list of volume ids (unsigned integers), got {shown}"
        )
    return node_id, list(ids)


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


# --- Request bodies -----------------------------------------------------------------------------


@dataclass
class CreateRequest:
    """A parsed VolumeCreateRequest: the arguments of the control call volume.create."""

    name: str
    size: int
    ha_level: int
    labels: dict[str, str]
    #: The ids or IPs of the nodes to place the replicas on; None lets pxd choose them.
    nodes: list[str] | None = None

    def to_rpc(self) -> dict[str, Any]:
        """Return the argument of volume.create."""
        request: dict[str, Any] = {
            "name": self.name,
            "size": self.size,
            "ha_level": self.ha_level,
            "labels": dict(self.labels),
        }
        if self.nodes is not None:
            request["nodes"] = list(self.nodes)
        return request


@dataclass
class SetRequest:
    """A parsed VolumeSetRequest; None and ACTION_NONE mean that the body did not set the key."""

    name: str | None = None
    labels: dict[str, str] | None = None
    size: int | None = None
    ha_level: int | None = None
    replica_nodes: list[str] | None = None
    attach: int = ACTION_NONE
    mount: int = ACTION_NONE
    mount_path: str = ""
    options: dict[str, str] = field(default_factory=dict)

    @property
    def updates_volume(self) -> bool:
        """True when the body requests a change of the volume's locator or spec."""
        changes = (self.name, self.labels, self.size, self.ha_level, self.replica_nodes)
        return any(change is not None for change in changes)

    def changes(self) -> dict[str, Any]:
        """Return the argument of volume.update: only the keys that the body set."""
        changes: dict[str, Any] = {}
        if self.size is not None:
            changes["size"] = self.size
        if self.ha_level is not None:
            changes["ha_level"] = self.ha_level
        if self.labels is not None:
            changes["labels"] = dict(self.labels)
        return changes


def decode_body(body: bytes) -> dict[str, Any]:
    """Decode a JSON request body that must be an object; raises InvalidArgument."""
    if not body.strip():
        raise errors.InvalidArgument("request body is empty: expected a JSON object")
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise errors.InvalidArgument(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        # The json module recurses once per nested array or object, so a body of many "["
        # exhausts the stack; an OSD request never nests more than a few levels.
        raise errors.InvalidArgument("invalid JSON in request body: nested too deeply") from None
    if not isinstance(value, dict):
        raise errors.InvalidArgument("request body must be a JSON object")
    return value


def parse_create_request(body: Mapping[str, Any]) -> CreateRequest:
    """Parse a VolumeCreateRequest; raises InvalidArgument naming the offending key."""
    locator = _object(body, "locator", "locator")
    spec = _object(body, "spec", "spec")
    source = _object(body, "source", "source")

    name = _string(locator, "name", "locator.name")
    if not name:
        raise errors.InvalidArgument("locator.name is required: the name of the new volume")
    units.validate_name(name)
    if _string(source, "parent", "source.parent"):
        raise errors.InvalidArgument("source.parent is not supported: pxfs cannot clone volumes")

    size = _integer(spec, "size", "spec.size", default=0)
    if size <= 0:
        raise errors.InvalidArgument("spec.size is required: the volume size in bytes")
    ha_level = _integer(spec, "ha_level", "spec.ha_level", default=0) or 1
    _check_ha_level(ha_level)
    _check_format(spec)
    _check_unsupported(spec)
    # An empty list is what a Go client sends for no replica set, so pxd chooses the nodes.
    nodes = _replica_nodes(spec) or None

    # Spec labels are deprecated in openstorage; the locator's labels win where both set a key.
    labels = _string_map(spec, "volume_labels", "spec.volume_labels") or {}
    labels.update(_string_map(locator, "volume_labels", "locator.volume_labels") or {})
    units.validate_labels(labels)
    return CreateRequest(
        name=name, size=units.check_size(size), ha_level=ha_level, labels=labels, nodes=nodes
    )


def parse_set_request(body: Mapping[str, Any]) -> SetRequest:
    """Parse a VolumeSetRequest, keeping only the keys that the body sets."""
    locator = _object(body, "locator", "locator")
    spec = _object(body, "spec", "spec")
    action = _object(body, "action", "action")

    request = SetRequest()
    if locator:
        request.name = _string(locator, "name", "locator.name") or None
    if spec:
        # A zero size or HA level is what encoding/json leaves for an absent key, so openstorage
        # treats zero as "no change", and so does pxfs.
        size = _integer(spec, "size", "spec.size", default=0)
        ha_level = _integer(spec, "ha_level", "spec.ha_level", default=0)
        request.size = units.check_size(size) if size else None
        request.ha_level = ha_level or None
        if ha_level:
            _check_ha_level(ha_level)
        request.replica_nodes = _replica_nodes(spec)
        _check_format(spec)
        _check_unsupported(spec)
    request.labels = _set_labels(locator, spec)
    if action:
        request.attach = _action(action, "attach")
        request.mount = _action(action, "mount")
        request.mount_path = _string(action, "mount_path", "action.mount_path")
    request.options = _string_map(body, "options", "options") or {}
    return request


def check_set_request(request: SetRequest, record: Mapping[str, Any]) -> None:
    """Raise NotSupported when `request` renames the volume or moves its replicas.

    pxd has no control call for either, so a PUT may only repeat the current name and replica
    nodes. Size, HA level and labels go to volume.update, which validates them itself.
    """
    ref = record["name"]
    if request.name is not None and request.name != record["name"]:
        raise errors.NotSupported(f"renaming volume {ref} is not supported")
    current_nodes = sorted(str(node) for node in record.get("replica_nodes") or [])
    if request.replica_nodes and sorted(request.replica_nodes) != current_nodes:
        raise errors.NotSupported(f"moving the replicas of volume {ref} is not supported")


def _set_labels(locator: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, str] | None:
    """Return the label map that a PUT sets, merged as at create, or None when it sets none."""
    spec_labels = _string_map(spec, "volume_labels", "spec.volume_labels")
    locator_labels = _string_map(locator, "volume_labels", "locator.volume_labels")
    if spec_labels is None and locator_labels is None:
        return None
    labels = dict(spec_labels or {})
    labels.update(locator_labels or {})
    return units.validate_labels(labels)


def parse_label_query(values: list[str], key: str) -> dict[str, str]:
    """Parse the JSON label maps of repeated `Label` or `ConfigLabel` query parameters."""
    labels: dict[str, str] = {}
    for value in values:
        try:
            decoded = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            raise errors.InvalidArgument(
                f"query parameter {key} must be a JSON object of strings, got {value!r}"
            ) from None
        labels.update(_check_string_map(decoded, key))
    return labels


def _lookup(obj: Mapping[str, Any], key: str) -> Any:
    """Find `key` as encoding/json does: the exact key first, then any case-insensitive one."""
    if key in obj:
        value = obj[key]
    else:
        lowered = key.lower()
        value = next((v for k, v in obj.items() if k.lower() == lowered), None)
    return _ABSENT if value is None else value


def _object(obj: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = _lookup(obj, key)
    if value is _ABSENT:
        return {}
    if not isinstance(value, dict):
        raise errors.InvalidArgument(f"{where} must be a JSON object, got {_kind(value)}")
    return value


def _string(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = _lookup(obj, key)
    if value is _ABSENT:
        return ""
    if not isinstance(value, str):
        raise errors.InvalidArgument(f"{where} must be a string, got {_kind(value)}")
    return _check_unicode(value, where)


def _check_unicode(value: str, where: str) -> str:
    """Return `value` unless it contains a lone surrogate, which has no UTF-8 form."""
    # JSON escapes such as "\udcff" decode to lone surrogates, which pxd could not receive.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = value[exc.start : exc.end]
        raise errors.InvalidArgument(
            f"{where} is not valid Unicode: it contains the lone surrogate {bad!r}"
        ) from None
    return value


def _integer(obj: Mapping[str, Any], key: str, where: str, default: int) -> int:
    value = _lookup(obj, key)
    if value is _ABSENT:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise errors.InvalidArgument(
            f"{where} must be a non-negative integer, got {json.dumps(value)}"
        )
    return value


def _boolean(obj: Mapping[str, Any], key: str, where: str) -> bool:
    value = _lookup(obj, key)
    if value is _ABSENT:
        return False
    if not isinstance(value, bool):
        raise errors.InvalidArgument(f"{where} must be true or false, got {json.dumps(value)}")
    return value


def _string_map(obj: Mapping[str, Any], key: str, where: str) -> dict[str, str] | None:
    value = _lookup(obj, key)
    if value is _ABSENT:
        return None
    return _check_string_map(value, where)


def _check_string_map(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise errors.InvalidArgument(
            f"{where} must be a JSON object of strings, got {_kind(value)}"
        )
    for item_key, item in value.items():
        if not isinstance(item, str):
            raise errors.InvalidArgument(
                f"{where}[{item_key!r}] must be a string, got {json.dumps(item)}"
            )
        _check_unicode(item_key, f"a key of {where}")
        _check_unicode(item, f"{where}[{item_key!r}]")
    return dict(value)


def _action(action: Mapping[str, Any], key: str) -> int:
    value = _integer(action, key, f"action.{key}", default=ACTION_NONE)
    if value not in (ACTION_NONE, ACTION_OFF, ACTION_ON):
        raise errors.InvalidArgument(
            f"action.{key} must be 0 (none), 1 (off) or 2 (on), got {value}"
        )
    return value


def _replica_nodes(spec: Mapping[str, Any]) -> list[str] | None:
    replica_set = _object(spec, "replica_set", "spec.replica_set")
    nodes = _lookup(replica_set, "nodes")
    if nodes is _ABSENT:
        return None
    if not isinstance(nodes, list) or not all(isinstance(node, str) for node in nodes):
        raise errors.InvalidArgument("spec.replica_set.nodes must be a list of node ids")
    return list(nodes)


def _check_ha_level(ha_level: int) -> None:
    if not 1 <= ha_level <= MAX_HA_LEVEL:
        raise errors.InvalidArgument(
            f"spec.ha_level must be between 1 and {MAX_HA_LEVEL}, got {ha_level}"
        )


def _check_format(spec: Mapping[str, Any]) -> None:
    fs_format = _integer(spec, "format", "spec.format", default=0)
    if fs_format not in (0, FS_TYPE_FUSE):
        raise errors.InvalidArgument(
            f"spec.format {fs_format} is not supported: pxfs volumes are FUSE filesystems "
            f"(format {FS_TYPE_FUSE}); leave format out or set it to {FS_TYPE_FUSE}"
        )


def _check_unsupported(spec: Mapping[str, Any]) -> None:
    for flag in UNSUPPORTED_FLAGS:
        if _boolean(spec, flag, f"spec.{flag}"):
            raise errors.InvalidArgument(f"spec.{flag} is not supported by pxfs")
    if _string(spec, "passphrase", "spec.passphrase"):
        raise errors.InvalidArgument("spec.passphrase is not supported: pxfs cannot encrypt")


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return json.dumps(value)
