"""Cluster membership of a node: the secret check in etcd, replica placement, peer calls.

Every node of a cluster must hold the same cluster secret, because peers authenticate each
other with it. etcd never stores the secret itself, only its fingerprint: an HMAC-SHA256 of a
fixed message keyed with the secret. The first node stores it, and a node whose secret gives a
different fingerprint does not start.

Other nodes are reached through the peer RPC over TCP, at the `peer_address` that each node
publishes in its catalog record. This node's own store is reached over its unix peer socket.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import ssl
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import trio

from pxfs.catalog import Catalog, NodeRecord
from pxfs.config import parse_listen
from pxfs.errors import AuthenticationFailed, InvalidArgument, PxfsError, Unavailable
from pxfs.etcd import EtcdClient
from pxfs.etcdmessages import Get, Put, RangeResult, key_missing
from pxfs.rpc import RpcClient

log = logging.getLogger(__name__)

FINGERPRINT_KEY = "secret-fingerprint"
FINGERPRINT_MESSAGE = b"pxfs cluster secret fingerprint v1"
#: Seconds between two publications of this node's status in the catalog.
STATUS_INTERVAL = 3.0
#: How long before the earliest moment etcd may expire this node's lease pxd fences itself:
#: this share of the lease TTL, and at least FENCE_MARGIN_MIN seconds. The margin covers the
#: fence itself (a few lazy unmounts and signals) and a clock of etcd that runs slightly fast.
FENCE_MARGIN_SHARE = 0.25
FENCE_MARGIN_MIN = 1.0
#: How long connecting to a peer, passing its handshake and one call on it may take.
PEER_TIMEOUT = 30.0
#: The word that a mount child's --replica option uses for the store behind --peer-socket.
LOCAL_REPLICA = "local"
DEFAULT_PEER_PORT = 9002


def secret_fingerprint(secret: bytes) -> str:
    """Return the hex HMAC-SHA256 of a fixed message keyed with `secret`."""
    return hmac.new(secret, FINGERPRINT_MESSAGE, hashlib.sha256).hexdigest()


async def check_secret_fingerprint(
    client: EtcdClient, prefix: str, cluster_id: str, secret: bytes, secret_file: Path
) -> None:
    """Store the secret's fingerprint under `prefix`, or compare it with the stored one.

    Raises AuthenticationFailed when the cluster already has a different fingerprint.
    """
    key = (prefix + FINGERPRINT_KEY).encode()
    fingerprint = secret_fingerprint(secret).encode()
    # One transaction, so two first nodes that start at once cannot both store theirs.
    result = await client.txn([key_missing(key)], [Put(key, fingerprint)], [Get(key)])
    if result.succeeded:
        log.info("cluster %s: stored the fingerprint of the cluster secret", cluster_id)
        return
    stored = result.responses[0]
    value = stored.kvs[0].value if isinstance(stored, RangeResult) and stored.kvs else b""
    if not hmac.compare_digest(value, fingerprint):
        raise AuthenticationFailed(
            f"the cluster secret in {secret_file} does not match the secret of cluster "
            f"{cluster_id!r} in etcd; give this node the secret file of the other nodes "
            "(pxd --secret-file FILE)"
        )


def fence_margin(ttl: float) -> float:
    """Return how many seconds before its lease may expire a node stops its volumes."""
    return max(FENCE_MARGIN_MIN, FENCE_MARGIN_SHARE * ttl)


def peer_address(node: NodeRecord) -> tuple[str, int]:
    """Return the host and port of a node's peer RPC; raises Unavailable if it has none."""
    address = node.get("peer_address")
    if not isinstance(address, str) or not address:
        raise Unavailable(f"node {node.get('id')} publishes no peer address")
    try:
        return parse_listen(address, DEFAULT_PEER_PORT)
    except InvalidArgument:
        raise Unavailable(
            f"node {node.get('id')} publishes an invalid peer address {address!r}"
        ) from None


def choose_replica_nodes(
    nodes: Sequence[NodeRecord], ha_level: int, requested: Sequence[str] | None
) -> list[str]:
    """Return the ids of `ha_level` distinct online nodes to hold the replicas of a volume.

    Without `requested`, the nodes with the most free space come first. `requested` names the
    nodes: it must list `ha_level` distinct ids of online nodes. Raises InvalidArgument.
    """
    online = {node["id"]: node for node in nodes if node.get("online")}
    if requested is not None:
        return _check_requested(online, ha_level, list(requested))
    if ha_level > len(online):
        raise InvalidArgument(
            f"ha_level {ha_level} needs {ha_level} online nodes, but the cluster has "
            f"{len(online)} online"
        )
    ranked = sorted(
        online.values(), key=lambda node: (-int(node.get("free_bytes") or 0), node["id"])
    )
    return [node["id"] for node in ranked[:ha_level]]


def _check_requested(
    online: dict[str, NodeRecord], ha_level: int, requested: list[str]
) -> list[str]:
    if len(set(requested)) != len(requested):
        raise InvalidArgument(f"the replica nodes {requested} name a node more than once")
    if len(requested) != ha_level:
        raise InvalidArgument(
            f"ha_level {ha_level} needs {ha_level} replica nodes, but the request names "
            f"{len(requested)}"
        )
    for node_id in requested:
        if node_id not in online:
            raise InvalidArgument(f"replica node {node_id} is not an online node of the cluster")
    return requested


def parse_requested_nodes(value: Any) -> list[str] | None:
    """Validate the `nodes` field of volume.create: None or a list of node ids."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise InvalidArgument(f"nodes must be a list of node ids, not {value!r}")
    return value


class Peers:
    """Peer RPC connections to the replica stores of the cluster's nodes, by node id."""

    def __init__(
        self,
        catalog: Catalog,
        node_id: str,
        secret: bytes,
        peer_socket: Path,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._catalog = catalog
        self._node_id = node_id
        self._secret = secret
        self._peer_socket = peer_socket
        #: The TLS client context of the peer RPC over TCP, or None for plain TCP.
        self._ssl_context = ssl_context

    async def addresses(self, node_ids: Sequence[str]) -> list[str]:
        """Return the --replica arguments of a mount child: "local" or HOST:PORT per node."""
        nodes = {node["id"]: node for node in await self._catalog.list_nodes()}
        addresses = []
        for node_id in node_ids:
            if node_id == self._node_id:
                addresses.append(LOCAL_REPLICA)
                continue
            if node_id not in nodes:
                raise Unavailable(f"replica node {node_id} is not in the catalog")
            host, port = peer_address(nodes[node_id])
            addresses.append(f"{host}:{port}")
        return addresses

    @contextlib.asynccontextmanager
    async def connect(self, node_ids: Sequence[str]) -> AsyncIterator[list[RpcClient]]:
        """Open one authenticated client per node, in the order given, closed at exit."""
        clients: list[RpcClient] = []
        try:
            for address in await self.addresses(node_ids):
                clients.append(await self._connect(address))
            yield clients
        finally:
            with trio.CancelScope(shield=True):
                for client in clients:
                    await client.aclose()

    async def call_each(self, node_ids: Sequence[str], method: str, *args: Any) -> None:
        """Call `method` on the store of every node, one after another; raises the first error."""
        for node_id in node_ids:
            try:
                with trio.fail_after(PEER_TIMEOUT):
                    async with self.connect([node_id]) as (client,):
                        await client.call(method, *args)
            except trio.TooSlowError:
                raise Unavailable(
                    f"{method} on node {node_id} timed out after {PEER_TIMEOUT} s"
                ) from None
            except PxfsError as exc:
                log.warning("%s on node %s failed: %s", method, node_id, exc.message)
                raise

    async def _connect(self, address: str) -> RpcClient:
        if address == LOCAL_REPLICA:
            return await RpcClient.connect_unix(self._peer_socket, self._secret)
        host, port = parse_listen(address, DEFAULT_PEER_PORT)
        with trio.move_on_after(PEER_TIMEOUT):
            return await RpcClient.connect_tcp(
                host, port, self._secret, ssl_context=self._ssl_context
            )
        raise Unavailable(
            f"connecting to the peer RPC at {address} timed out after {PEER_TIMEOUT} s"
        )
