"""Replica placement, peer addresses and the secret fingerprint of pxfs/membership.py."""

from __future__ import annotations

import pytest

from pxfs import errors
from pxfs.membership import (
    choose_replica_nodes,
    parse_requested_nodes,
    peer_address,
    secret_fingerprint,
)

NODES = [
    {"id": "a", "online": True, "free_bytes": 10},
    {"id": "b", "online": True, "free_bytes": 30},
    {"id": "c", "online": False, "free_bytes": 99},
    {"id": "d", "online": True, "free_bytes": 20},
]


def test_placement_most_free_first() -> None:
    assert choose_replica_nodes(NODES, 1, None) == ["b"]
    assert choose_replica_nodes(NODES, 2, None) == ["b", "d"]
    assert choose_replica_nodes(NODES, 3, None) == ["b", "d", "a"]


def test_placement_skips_offline_nodes() -> None:
    with pytest.raises(
        errors.InvalidArgument, match="needs 4 online nodes, but the cluster has 3 online"
    ):
        choose_replica_nodes(NODES, 4, None)


def test_placement_ties_by_node_id() -> None:
    nodes = [{"id": "z", "online": True}, {"id": "y", "online": True}]
    assert choose_replica_nodes(nodes, 2, None) == ["y", "z"]


def test_placement_on_requested_nodes() -> None:
    assert choose_replica_nodes(NODES, 2, ["a", "d"]) == ["a", "d"]


@pytest.mark.parametrize(
    ("requested", "message"),
    [
        (["a", "a"], "more than once"),
        (["a"], "needs 2 replica nodes, but the request names 1"),
        (["a", "c"], "replica node c is not an online node"),
        (["a", "x"], "replica node x is not an online node"),
    ],
)
def test_placement_rejects_bad_requests(requested: list[str], message: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=message):
        choose_replica_nodes(NODES, 2, requested)


@pytest.mark.parametrize("value", ["a", [1], [""], {"a": 1}])
def test_requested_nodes_must_be_ids(value: object) -> None:
    with pytest.raises(errors.InvalidArgument, match="nodes must be a list of node ids"):
        parse_requested_nodes(value)


def test_requested_nodes_optional() -> None:
    assert parse_requested_nodes(None) is None
    assert parse_requested_nodes(["a"]) == ["a"]


def test_peer_address_parses_host_port() -> None:
    assert peer_address({"id": "a", "peer_address": "127.0.0.2:9100"}) == ("127.0.0.2", 9100)


@pytest.mark.parametrize("address", ["", None, "host:port", "127.0.0.2:70000"])
def test_peer_address_invalid(address: object) -> None:
    with pytest.raises(errors.Unavailable, match="node a publishes"):
        peer_address({"id": "a", "peer_address": address})


def test_fingerprint_depends_on_secret() -> None:
    first = secret_fingerprint(b"1" * 32)
    assert first == secret_fingerprint(b"1" * 32)
    assert first != secret_fingerprint(b"2" * 32)
    assert len(first) == 64
