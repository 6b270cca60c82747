"""pxfs.api.osd and pxfs.api.osdrequests: records to OSD Volume JSON, and OSD request bodies."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pxfs import errors
from pxfs.api import osd, osdrequests

GIB = 1 << 30
NODE = "node-a"


def make_record(**changes: Any) -> dict[str, Any]:
    """Return a detached volume record as pxd sends it."""
    record: dict[str, Any] = {
        "id": "700377599852814571",
        "name": "px7vol",
        "labels": {},
        "size": 14 * GIB,
        "ha_level": 3,
        "ctime_ns": 1479507011_890685197,
        "uuid": "5b0c2f4e-1111-4222-8333-444455556666",
        "replica_nodes": ["node-a", "node-b", "node-c"],
        "epoch": 0,
        "attached_on": "",
        "attach_time_ns": 0,
        "detach_time_ns": 0,
        "mount_paths": [],
        "usage": 138706944,
        "mounted": [],
    }
    record.update(changes)
    return record


# --- volume_to_osd ------------------------------------------------------------------------------


def test_detached_volume_matches_reference() -> None:
    volume = osd.volume_to_osd(make_record(), NODE)
    assert volume["id"] == "700377599852814571"
    assert volume["locator"] == {"name": "px7vol"}
    assert volume["ctime"] == {"seconds": 1479507011, "nanos": 890685197}
    assert volume["last_scan"] == volume["ctime"]
    assert volume["spec"] == {
        "size": 15032385536,
        "format": 3,
        "block_size": 65536,
        "ha_level": 3,
        "aggregation_level": 1,
    }
    assert volume["usage"] == 138706944
    assert volume["format"] == 3
    assert volume["status"] == 2
    assert volume["state"] == 4
    assert volume["replica_sets"] == [{"nodes": ["node-a", "node-b", "node-c"]}]


def test_detached_volume_omits_zero_values() -> None:
    volume = osd.volume_to_osd(make_record(usage=0), NODE)
    for key in ("attached_on", "attach_path", "attach_time", "detach_time", "usage", "readonly"):
        assert key not in volume, key
    assert "volume_labels" not in volume["locator"]
    assert "volume_labels" not in volume["spec"]


def test_whole_volume_is_json_with_int_enums() -> None:
    volume = osd.volume_to_osd(make_record(), NODE)
    decoded = json.loads(json.dumps(volume))
    assert decoded == volume
    for key in ("format", "status", "state"):
        assert type(volume[key]) is int


def test_runtime_state_is_map_of_strings() -> None:
    volume = osd.volume_to_osd(make_record(epoch=4), NODE)
    [entry] = volume["runtime_state"]
    state = entry["runtime_state"]
    assert all(isinstance(value, str) for value in state.values())
    assert state["Attachment"] == "detached"
    assert state["RuntimeState"] == "clean"
    assert state["Epoch"] == "4"
    assert state["WriteQuorum"] == "2"
    assert state["ReplicaNodes"] == "node-a,node-b,node-c"
    assert state["FilesystemUUID"] == "5b0c2f4e-1111-4222-8333-444455556666"


def test_attached_here_uses_running_mounts() -> None:
    record = make_record(
        attached_on=NODE,
        attach_time_ns=1_700_000_000_000_000_001,
        mount_paths=["/mnt/a", "/mnt/b"],
        mounted=["/mnt/a"],
    )
    volume = osd.volume_to_osd(record, NODE)
    assert volume["state"] == 3
    assert volume["attached_on"] == NODE
    assert volume["attach_path"] == ["/mnt/a"]
    assert volume["attach_time"] == {"seconds": 1_700_000_000, "nanos": 1}
    assert volume["runtime_state"][0]["runtime_state"]["Attachment"] == "mounted"


def test_attached_elsewhere_uses_catalog_paths() -> None:
    record = make_record(attached_on="node-b", mount_paths=["/mnt/a"], mounted=[])
    volume = osd.volume_to_osd(record, NODE)
    assert volume["attached_on"] == "node-b"
    assert volume["attach_path"] == ["/mnt/a"]


def test_attached_unmounted_has_no_path() -> None:
    volume = osd.volume_to_osd(make_record(attached_on=NODE), NODE)
    assert volume["state"] == 3
    assert "attach_path" not in volume
    assert volume["runtime_state"][0]["runtime_state"]["Attachment"] == "attached"


def runtime_state(volume: dict[str, Any]) -> dict[str, str]:
    """Return the one runtime state map of an OSD Volume."""
    [entry] = volume["runtime_state"]
    state: dict[str, str] = entry["runtime_state"]
    return state


def test_record_state_of_clean_volume() -> None:
    record = make_record(write_set=["node-a", "node-b", "node-c"], out_of_sync=[])
    volume = osd.volume_to_osd(record, NODE)
    state = runtime_state(volume)
    assert volume["status"] == osd.VOLUME_STATUS_UP
    assert state["RuntimeState"] == "clean"
    assert state["ReadQuorum"] == "1"
    assert state["WriteQuorum"] == "2"
    assert state["WriteSet"] == "[0 1 2]"
    assert state["ReadSet"] == "[0 1 2]"
    assert state["ReplicaSetCurr"] == "[0 1 2]"
    assert state["ReplicaSetNext"] == "[0 1 2]"


def test_record_without_write_set_is_clean() -> None:
    volume = osd.volume_to_osd(make_record(), NODE)
    assert volume["status"] == osd.VOLUME_STATUS_UP
    assert runtime_state(volume)["WriteSet"] == "[0 1 2]"


def test_shrunk_write_set_is_degraded() -> None:
    record = make_record(ha_level=2, replica_nodes=["node-a", "node-b"], write_set=["node-b"])
    record["out_of_sync"] = ["node-a"]
    volume = osd.volume_to_osd(record, NODE)
    state = runtime_state(volume)
    assert osd.VOLUME_STATUS_DEGRADED == 4
    assert volume["status"] == osd.VOLUME_STATUS_DEGRADED
    assert state["RuntimeState"] == "degraded"
    assert state["WriteSet"] == "[1]"
    assert state["WriteQuorum"] == "1"
    assert volume["replica_sets"] == [{"nodes": ["node-a", "node-b"]}]


def test_out_of_sync_alone_is_degraded() -> None:
    record = make_record(write_set=["node-a", "node-b", "node-c"], out_of_sync=["node-c"])
    volume = osd.volume_to_osd(record, NODE)
    assert volume["status"] == osd.VOLUME_STATUS_DEGRADED
    assert runtime_state(volume)["WriteSet"] == "[0 1]"


def test_child_state_merged_over_record() -> None:
    child = {
        "RuntimeState": "resync",
        "ReadQuorum": "1",
        "WriteQuorum": "2",
        "ReadSet": "[1 0]",
        "WriteSet": "[0 1]",
        "ReplicaSetCurr": "[0 1 2]",
        "ReplicaSetNext": "[0 1 2]",
        "ResyncBlocks": "[{0 0} {1 0} {2 17}]",
        "ResyncProgress": "[{2 100/400}]",
    }
    record = make_record(
        attached_on=NODE,
        mounted=["/mnt/a"],
        write_set=["node-a", "node-b"],
        out_of_sync=["node-c"],
        runtime_state=child,
    )
    volume = osd.volume_to_osd(record, NODE)
    state = runtime_state(volume)
    assert volume["status"] == osd.VOLUME_STATUS_DEGRADED
    for key, value in child.items():
        assert state[key] == value, key
    assert state["Attachment"] == "mounted"
    assert state["Epoch"] == "0"
    assert osd.replication_status(record) == "resync"


def test_child_degraded_with_clean_record() -> None:
    # The child reports degraded while a replica that an ha raise adds waits for its copy. The
    # ha_level replicas are in sync, so the volume is up.
    record = make_record(
        ha_level=1,
        replica_nodes=["node-a"],
        replica_nodes_next=["node-a", "node-b"],
        write_set=["node-a"],
        out_of_sync=["node-b"],
        runtime_state={"RuntimeState": "degraded"},
    )
    volume = osd.volume_to_osd(record, NODE)
    assert volume["status"] == osd.VOLUME_STATUS_UP
    assert osd.replication_status(record) == "clean"


def test_ha_raise_lists_next_replica_set() -> None:
    record = make_record(
        ha_level=2,
        replica_nodes=["node-a", "node-b"],
        replica_nodes_next=["node-a", "node-b", "node-c"],
        write_set=["node-a", "node-b"],
        out_of_sync=["node-c"],
    )
    volume = osd.volume_to_osd(record, NODE)
    state = runtime_state(volume)
    assert volume["replica_sets"] == [{"nodes": ["node-a", "node-b", "node-c"]}]
    assert volume["status"] == osd.VOLUME_STATUS_UP
    assert state["ReplicaSetCurr"] == "[0 1]"
    assert state["ReplicaSetNext"] == "[0 1 2]"
    assert state["WriteSet"] == "[0 1]"


def test_ha_lower_lists_smaller_next_set() -> None:
    record = make_record(replica_nodes_next=["node-a", "node-c"])
    state = runtime_state(osd.volume_to_osd(record, NODE))
    assert state["ReplicaSetCurr"] == "[0 1 2]"
    assert state["ReplicaSetNext"] == "[0 2]"


def test_labels_in_locator_and_spec() -> None:
    volume = osd.volume_to_osd(make_record(labels={"app": "db"}), NODE)
    assert volume["locator"]["volume_labels"] == {"app": "db"}
    assert volume["spec"]["volume_labels"] == {"app": "db"}


@pytest.mark.parametrize(
    ("ns", "expected"),
    [
        (0, {}),
        (None, {}),
        (5, {"nanos": 5}),
        (3_000_000_000, {"seconds": 3}),
        (3_000_000_007, {"seconds": 3, "nanos": 7}),
    ],
)
def test_timestamp(ns: int | None, expected: dict[str, int]) -> None:
    assert osd.timestamp(ns) == expected


@pytest.mark.parametrize(("ha_level", "quorum"), [(1, 1), (2, 1), (3, 2)])
def test_write_quorum(ha_level: int, quorum: int) -> None:
    assert osd.write_quorum(ha_level) == quorum


# --- VolumeCreateRequest ------------------------------------------------------------------------


def test_create_request_basic() -> None:
    body = {"locator": {"name": "v1"}, "spec": {"size": GIB, "ha_level": 2}}
    request = osdrequests.parse_create_request(body)
    assert request.to_rpc() == {"name": "v1", "size": GIB, "ha_level": 2, "labels": {}}


def test_create_request_defaults_and_rounding() -> None:
    request = osdrequests.parse_create_request({"locator": {"name": "v1"}, "spec": {"size": 1}})
    assert request.ha_level == 1
    assert request.size == 65536


def test_create_request_case_insensitive() -> None:
    body = {"LOCATOR": {"Name": "v1"}, "Spec": {"SIZE": GIB, "Ha_Level": 3}}
    request = osdrequests.parse_create_request(body)
    assert (request.name, request.size, request.ha_level) == ("v1", GIB, 3)


def test_create_request_exact_key_wins() -> None:
    body = {"locator": {"NAME": "upper", "name": "exact"}, "spec": {"size": GIB}}
    assert osdrequests.parse_create_request(body).name == "exact"


def test_create_request_ignores_unknown_and_null() -> None:
    body = {
        "locator": {"name": "v1", "ownership": {"owner": "x"}},
        "spec": {"size": GIB, "io_profile": 6, "cos": 3, "format": None},
        "source": None,
        "extra": [1, 2, 3],
    }
    assert osdrequests.parse_create_request(body).name == "v1"


def test_create_request_merges_labels() -> None:
    body = {
        "locator": {"name": "v1", "volume_labels": {"a": "locator"}},
        "spec": {"size": GIB, "volume_labels": {"a": "spec", "b": "spec"}},
    }
    assert osdrequests.parse_create_request(body).labels == {"a": "locator", "b": "spec"}


def test_create_request_accepts_fuse_format() -> None:
    body = {"locator": {"name": "v1"}, "spec": {"size": GIB, "format": 3}}
    assert osdrequests.parse_create_request(body).name == "v1"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"spec": {"size": GIB}}, "locator.name is required"),
        ({"locator": "v1", "spec": {"size": GIB}}, "locator must be a JSON object"),
        ({"locator": {"name": 7}, "spec": {"size": GIB}}, "locator.name must be a string"),
        ({"locator": {"name": "v1"}}, "spec.size is required"),
        ({"locator": {"name": "v1"}, "spec": {"size": "1G"}}, "spec.size must be"),
        ({"locator": {"name": "v1"}, "spec": {"size": 1.5}}, "spec.size must be"),
        ({"locator": {"name": "v1"}, "spec": {"size": True}}, "spec.size must be"),
        ({"locator": {"name": "v1"}, "spec": {"size": -1}}, "spec.size must be"),
        ({"locator": {"name": "v1"}, "spec": {"size": 1 << 50}}, "maximum volume size"),
        ({"locator": {"name": "v1"}, "spec": {"size": GIB, "ha_level": 4}}, "spec.ha_level"),
        ({"locator": {"name": "v1"}, "spec": {"size": GIB, "ha_level": "2"}}, "spec.ha_level"),
        ({"locator": {"name": "v1"}, "spec": {"size": GIB, "format": 2}}, "spec.format 2"),
        ({"locator": {"name": "v1"}, "spec": {"size": GIB, "shared": True}}, "spec.shared"),
        ({"locator": {"name": "v1"}, "spec": {"size": GIB, "encrypted": 1}}, "spec.encrypted"),
        ({"locator": {"name": "v1"}, "spec": {"size": GIB, "passphrase": "x"}}, "passphrase"),
        (
            {"locator": {"name": "v1", "volume_labels": {"a": 1}}, "spec": {"size": GIB}},
            "locator.volume_labels['a']",
        ),
        (
            {"locator": {"name": "v1", "volume_labels": ["a"]}, "spec": {"size": GIB}},
            "locator.volume_labels must be",
        ),
        ({"locator": {"name": "v1"}, "spec": {"size": GIB}, "source": {"parent": "7"}}, "clone"),
        (
            {"locator": {"name": "v1"}, "spec": {"size": GIB, "replica_set": {"nodes": [1]}}},
            "spec.replica_set.nodes",
        ),
        ({"locator": {"name": "a/b"}, "spec": {"size": GIB}}, "'/'"),
        ({"locator": {"name": ".."}, "spec": {"size": GIB}}, "reserved"),
    ],
)
def test_create_request_rejects(body: dict[str, Any], expected: str) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        osdrequests.parse_create_request(body)
    assert expected in caught.value.message


def test_create_request_replica_nodes() -> None:
    spec = {"size": GIB, "ha_level": 2, "replica_set": {"nodes": ["node-b", "10.0.0.3"]}}
    body = {"locator": {"name": "v1"}, "spec": spec}
    request = osdrequests.parse_create_request(body)
    assert request.nodes == ["node-b", "10.0.0.3"]
    assert request.to_rpc()["nodes"] == ["node-b", "10.0.0.3"]


def test_create_request_without_nodes() -> None:
    body = {"locator": {"name": "v1"}, "spec": {"size": GIB, "replica_set": {"nodes": []}}}
    request = osdrequests.parse_create_request(body)
    assert request.nodes is None
    assert "nodes" not in request.to_rpc()


def test_node_ids_from_ips() -> None:
    nodes = [{"node_id": "node-a", "ip": "10.0.0.1"}, {"node_id": "node-b", "ip": "10.0.0.2"}]
    assert osd.node_ids_from_ips(nodes, ["10.0.0.2", "node-a"]) == ["node-b", "node-a"]
    with pytest.raises(errors.InvalidArgument, match="10.0.0.9"):
        osd.node_ids_from_ips(nodes, ["10.0.0.9"])


# --- VolumeSetRequest ---------------------------------------------------------------------------


def test_set_request_only_present_keys() -> None:
    request = osdrequests.parse_set_request({"spec": {"size": 2 * GIB}})
    assert request.size == 2 * GIB
    assert request.ha_level is None
    assert request.labels is None
    assert request.name is None
    assert request.replica_nodes is None
    assert request.attach == osd.ACTION_NONE
    assert request.updates_volume


def test_set_request_actions() -> None:
    body = {
        "Action": {"Attach": 2, "Mount": 2, "Mount_Path": "/mnt/x"},
        "options": {"FORCE_DETACH": "true"},
    }
    request = osdrequests.parse_set_request(body)
    assert request.attach == osd.ACTION_ON
    assert request.mount == osd.ACTION_ON
    assert request.mount_path == "/mnt/x"
    assert request.options == {"FORCE_DETACH": "true"}
    assert not request.updates_volume


def test_set_request_empty_body() -> None:
    request = osdrequests.parse_set_request({})
    assert not request.updates_volume
    assert request.attach == osd.ACTION_NONE
    assert request.mount == osd.ACTION_NONE


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"action": {"attach": 3}}, "action.attach must be 0"),
        ({"action": {"mount": "on"}}, "action.mount must be"),
        ({"action": {"mount_path": ["/a"]}}, "action.mount_path must be a string"),
        ({"action": []}, "action must be a JSON object"),
        ({"options": {"A": 1}}, "options['A']"),
        ({"spec": {"ha_level": 9}}, "spec.ha_level"),
        ({"spec": {"replica_set": {"nodes": "n1"}}}, "spec.replica_set.nodes"),
        ({"spec": {"sticky": True}}, "spec.sticky"),
    ],
)
def test_set_request_rejects(body: dict[str, Any], expected: str) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        osdrequests.parse_set_request(body)
    assert expected in caught.value.message


def test_check_set_request_same_values_pass() -> None:
    record = make_record(labels={"a": "b"})
    body = {
        "locator": {"name": "px7vol", "volume_labels": {"a": "b"}},
        "spec": {
            "size": 14 * GIB,
            "ha_level": 3,
            "replica_set": {"nodes": ["node-c", "node-a", "node-b"]},
        },
    }
    osdrequests.check_set_request(osdrequests.parse_set_request(body), record)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"locator": {"name": "other"}}, "renaming"),
        ({"spec": {"replica_set": {"nodes": ["node-z"]}}}, "replicas"),
    ],
)
def test_check_set_request_changes_unsupported(body: dict[str, Any], expected: str) -> None:
    with pytest.raises(errors.NotSupported) as caught:
        osdrequests.check_set_request(osdrequests.parse_set_request(body), make_record())
    assert expected in caught.value.message


@pytest.mark.parametrize(
    "body",
    [
        {"spec": {"size": GIB}},
        {"spec": {"ha_level": 2}},
        {"locator": {"volume_labels": {"x": "y"}}},
    ],
)
def test_check_set_request_leaves_updates_to_pxd(body: dict[str, Any]) -> None:
    osdrequests.check_set_request(osdrequests.parse_set_request(body), make_record())


def test_set_request_changes_only_present_keys() -> None:
    assert osdrequests.parse_set_request({"spec": {"size": GIB + 1}}).changes() == {
        "size": GIB + 65536
    }
    assert osdrequests.parse_set_request({"spec": {"ha_level": 2}}).changes() == {"ha_level": 2}
    assert osdrequests.parse_set_request({"action": {"attach": 2}}).changes() == {}
    assert osdrequests.parse_set_request({"locator": {"name": "px7vol"}}).changes() == {}


def test_set_request_zero_size_is_no_change() -> None:
    request = osdrequests.parse_set_request({"spec": {"size": 0, "ha_level": 0}})
    assert request.changes() == {}
    assert not request.updates_volume


def test_set_request_labels_merged_locator_wins() -> None:
    body = {
        "locator": {"volume_labels": {"app": "db"}},
        "spec": {"volume_labels": {"app": "old", "tier": "gold"}},
    }
    assert osdrequests.parse_set_request(body).changes() == {
        "labels": {"app": "db", "tier": "gold"}
    }


def test_set_request_spec_labels_alone() -> None:
    body = {"spec": {"volume_labels": {"tier": "gold"}}}
    assert osdrequests.parse_set_request(body).changes() == {"labels": {"tier": "gold"}}


def test_set_request_empty_labels_clear() -> None:
    body: dict[str, Any] = {"locator": {"volume_labels": {}}}
    assert osdrequests.parse_set_request(body).changes() == {"labels": {}}


# --- stats --------------------------------------------------------------------------------------


def full_stats(**changes: int) -> dict[str, int]:
    """Return a Stats map as pxd sends it, every key present."""
    stats = dict.fromkeys(osd.STATS_KEYS, 0)
    stats.update(changes)
    return stats


def test_stats_drop_zero_counters() -> None:
    stats = full_stats(reads=3, read_bytes=4096, interval_ms=2000)
    assert osd.stats_to_osd(stats) == {"reads": 3, "read_bytes": 4096, "interval_ms": 2000}


def test_stats_all_zero_is_empty_object() -> None:
    assert osd.stats_to_osd(full_stats()) == {}


def test_stats_ignore_unknown_keys() -> None:
    assert osd.stats_to_osd({**full_stats(writes=1), "extra": 5}) == {"writes": 1}


def test_history_keeps_tiers_and_start() -> None:
    entry = {"start": "2026-12-04T17:00:00Z", "reads": 0, "writes": 2, "write_bytes": 8192}
    history = osd.history_to_osd({"hourly": [entry], "daily": [], "monthly": []})
    assert history == {
        "hourly": [{"start": "2026-12-04T17:00:00Z", "writes": 2, "write_bytes": 8192}],
        "daily": [],
        "monthly": [],
    }


def test_history_missing_tier_is_empty_list() -> None:
    assert osd.history_to_osd({}) == {"hourly": [], "daily": [], "monthly": []}


# --- cluster and node ---------------------------------------------------------------------------


def make_node(**changes: Any) -> dict[str, Any]:
    """Return a node map as cluster.nodes sends it."""
    node: dict[str, Any] = {
        "node_id": NODE,
        "hostname": "host-a",
        "ip": "127.0.0.1",
        "data_dir": "/var/lib/pxfs",
        "version": "0.1.0",
        "status": "up",
        "volumes": 2,
        "mounted": 1,
        "capacity_bytes": 100 * GIB,
        "free_bytes": 60 * GIB,
        "used_bytes": 3 * GIB,
        "started_ns": 1_700_000_000_500_000_000,
        "online": True,
    }
    node.update(changes)
    return node


def test_node_object_keys_and_values() -> None:
    node = osd.node_to_osd(make_node(), 1_700_000_100_000_000_000)
    assert node["Id"] == NODE
    assert node["Status"] == osd.STATUS_OK
    assert node["MgmtIp"] == "127.0.0.1"
    assert node["DataIp"] == "127.0.0.1"
    assert node["Hostname"] == "host-a"
    assert node["StartTime"] == "2023-11-14T22:13:20.5Z"
    assert node["Timestamp"] == "2023-11-14T22:15:00Z"
    assert node["Pools"] == [{"TotalSize": 100 * GIB, "Used": 3 * GIB}]
    assert node["Disks"]["/var/lib/pxfs"]["size"] == 100 * GIB
    assert node["Disks"]["/var/lib/pxfs"]["online"] is True
    assert node["NodeData"]["volumes"] == 2


def test_node_object_keeps_zero_values() -> None:
    node = osd.node_to_osd(make_node(), 0)
    for key in ("Cpu", "MemTotal", "MemFree", "GenNumber", "NodeLabels", "SchedulerNodeName"):
        assert key in node, key
    assert node["Timestamp"] == "0001-01-01T00:00:00Z"


@pytest.mark.parametrize(
    ("changes", "status"),
    [
        ({}, osd.STATUS_OK),
        ({"status": "starting"}, osd.STATUS_INIT),
        ({"status": "broken"}, osd.STATUS_ERROR),
        ({"online": False}, osd.STATUS_OFFLINE),
    ],
)
def test_node_status_code(changes: dict[str, Any], status: int) -> None:
    assert osd.node_status_code(make_node(**changes)) == status


def test_cluster_object() -> None:
    nodes = [make_node(), make_node(node_id="node-b", online=False)]
    cluster = osd.cluster_to_osd(nodes, NODE, 0)
    assert cluster["NodeId"] == NODE
    assert cluster["Status"] == osd.STATUS_OK
    assert [node["Id"] for node in cluster["Nodes"]] == [NODE, "node-b"]
    assert cluster["Nodes"][1]["Status"] == osd.STATUS_OFFLINE
    assert json.loads(json.dumps(cluster)) == cluster


def test_cluster_without_own_node_is_error() -> None:
    cluster = osd.cluster_to_osd([make_node(node_id="node-b")], NODE, 0)
    assert cluster["Status"] == osd.STATUS_ERROR


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (0, "0001-01-01T00:00:00Z"),
        (1_479_507_011_000_000_000, "2016-11-18T22:10:11Z"),
        (1_479_507_011_890_685_197, "2016-11-18T22:10:11.890685197Z"),
        (1_479_507_011_100_000_000, "2016-11-18T22:10:11.1Z"),
    ],
)
def test_rfc3339(ns: int, text: str) -> None:
    assert osd.rfc3339(ns) == text


# --- bodies and queries -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"", "empty"),
        (b"   ", "empty"),
        (b"{", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b'"text"', "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "nested too deeply"),
    ],
)
def test_decode_body_rejects(body: bytes, expected: str) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        osdrequests.decode_body(body)
    assert expected in caught.value.message


def test_decode_body_object() -> None:
    assert osdrequests.decode_body(b'{"a": 1}') == {"a": 1}


def test_label_query_merges() -> None:
    values = [json.dumps({"a": "1"}), json.dumps({"b": "2"})]
    assert osdrequests.parse_label_query(values, "Label") == {"a": "1", "b": "2"}


@pytest.mark.parametrize("value", ["a=1", "[1]", json.dumps({"a": 1}), "[" * 100_000])
def test_label_query_rejects(value: str) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        osdrequests.parse_label_query([value], "Label")
    assert "Label" in caught.value.message


def test_usage_to_osd_zero() -> None:
    assert osd.usage_to_osd({"usage": 0}) == {"CapacityUsageInfo": {}, "Error": None}


def test_usage_to_osd_bytes() -> None:
    reply = osd.usage_to_osd({"usage": 4096})
    assert reply["CapacityUsageInfo"] == {"exclusive_bytes": 4096, "total_bytes": 4096}
    assert json.dumps(reply).endswith('"Error": null}')


def test_node_id_from_ip_unknown() -> None:
    nodes: list[dict[str, Any]] = [{"node_id": "n1", "ip": ""}]
    assert osd.node_id_from_ip(nodes, "n1") == "n1"
    with pytest.raises(errors.InvalidArgument, match="no node with IP or id ''"):
        osd.node_id_from_ip(nodes, "")
