"""The catalog of a cluster, kept in etcd.

Every key lives under `/pxfs/<cluster-id>/`:

    volumes/<id>    the volume record as JSON; its mod revision is the record's revision
    names/<name>    the id of the volume with that name, created in the same transaction
    nodes/<id>      the node record as JSON, kept after the node goes away
    alive/<id>      empty, attached to the lease of the process that registered the node

Compare-and-set is one etcd transaction that compares the mod revision of `volumes/<id>`. A
volume's name key is written in the same transaction as its record, so no two volumes get one
name even when two nodes create them at once. docs/catalog.md describes the transactions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import trio

from pxfs.catalog import (
    Catalog,
    Change,
    NodeRecord,
    Versioned,
    VolumeRecord,
    volume_entry_problem,
)
from pxfs.errors import (
    AlreadyExists,
    Corrupted,
    InternalError,
    InvalidArgument,
    NotFound,
    PxfsError,
)
from pxfs.etcd import DEFAULT_TIMEOUT, EtcdClient
from pxfs.etcdmessages import (
    Compare,
    Delete,
    Get,
    KeyValue,
    Put,
    RangeResult,
    key_missing,
    mod_revision_is,
    prefix_end,
)

log = logging.getLogger(__name__)

#: Seconds a node stays online after its process stops refreshing its lease.
DEFAULT_NODE_TTL = 10
#: The longest wait before a failed lease refresh is tried again, so a node cut off from etcd
#: has its lease back soon after etcd answers again.
LEASE_RETRY_INTERVAL = 1.0


class EtcdCatalog(Catalog):
    """The catalog of the cluster `cluster_id`, in the etcd that `client` reaches.

    `put_node` keeps the nodes it registers online with a lease, which a background task in
    `nursery` refreshes every third of `node_ttl`. Without a nursery, `put_node` raises. The
    function `open_etcd_catalog` provides both the client and the nursery.
    """

    def __init__(
        self,
        client: EtcdClient,
        cluster_id: str,
        *,
        nursery: trio.Nursery | None = None,
        node_ttl: float = DEFAULT_NODE_TTL,
    ) -> None:
        self.prefix = _cluster_prefix(cluster_id)
        if not node_ttl > 0:
            raise InvalidArgument(f"invalid node TTL {node_ttl!r}: expected seconds > 0")
        # etcd counts lease TTLs in whole seconds.
        self.node_ttl = math.ceil(node_ttl)
        self._client = client
        self._nursery = nursery
        self._lock = trio.Lock()
        # Held while the lease is replaced and node keys are put under it, so that every node
        # key ends up under the lease that the background task refreshes.
        self._lease_lock = trio.Lock()
        self._lease = 0
        #: When the grant of the current lease was sent and the TTL etcd gave it, until the
        #: node keys are under it.
        self._granted: tuple[float, int] | None = None
        #: The trio clock time before which etcd cannot have expired the lease that the node
        #: keys are under; -inf without such a lease.
        self._lease_expiry = -math.inf
        self._lease_changed = trio.Event()
        self._registered: dict[str, bytes] = {}
        self._keepalive_scope: trio.CancelScope | None = None
        self._closed = False

    async def get_volume(self, vol_id: str) -> Versioned | None:
        """Return the record of `vol_id` with its revision, or None if there is none."""
        kv = await self._client.get(self._volume_key(vol_id))
        if kv is None:
            return None
        return Versioned(self._decode_volume(kv), kv.mod_revision)

    async def list_volumes(self) -> list[VolumeRecord]:
        """Return every volume record, ordered by creation time."""
        result = await self._client.range(self._key("volumes/"), prefix=True)
        records = [self._decode_volume(kv) for kv in result.kvs]
        return sorted(records, key=lambda record: (record.get("ctime_ns", 0), record["id"]))

    async def create_volume(self, record: VolumeRecord) -> Versioned:
        """Store a new record; raises AlreadyExists if its id or name is taken."""
        vol_id, name = record["id"], record["name"]
        # Ids and names share one lookup, as in LocalCatalog. Each check is a key that must be
        # missing, in the order that picks the same error as LocalCatalog when several fail.
        checks = [
            (self._volume_key(vol_id), f"a volume with id {vol_id} already exists"),
            (self._volume_key(name), f"volume name {name!r} is the id of another volume"),
            (self._name_key(name), f"a volume named {name!r} already exists"),
            (self._name_key(vol_id), f"volume id {vol_id} is the name of another volume"),
        ]
        unique = list(dict.fromkeys(key for key, _ in checks))
        success = [
            Put(self._volume_key(vol_id), _encode(record)),
            Put(self._name_key(name), vol_id.encode()),
        ]
        failure = [Get(key) for key in unique]
        result = await self._client.txn([key_missing(key) for key in unique], success, failure)
        if not result.succeeded:
            existing = {
                key for key, found in zip(unique, result.responses, strict=True) if _found(found)
            }
            for key, message in checks:
                if key in existing:
                    raise AlreadyExists(message)
            raise InternalError(f"creating volume {vol_id} failed, but no conflicting key exists")
        log.debug("catalog: created volume %s (%s)", vol_id, name)
        return Versioned(_decode(_encode(record)), result.revision)

    async def compare_and_set(
        self, vol_id: str, revision: int, record: VolumeRecord | None
    ) -> Versioned | None:
        """Replace (or with `record` None, delete) the record if it still has `revision`.

        Renaming a volume moves its name key in the same transaction and raises AlreadyExists
        when another volume has the new name, or has it as its id.
        """
        if record is not None and record["id"] != vol_id:
            raise ValueError(f"record id {record['id']} does not match {vol_id}")
        # The old record is read first because its name key must change with it. The
        # transaction compares the revision again, so the old name is the one being replaced.
        current = await self._client.get(self._volume_key(vol_id))
        if current is None or current.mod_revision != revision:
            return None
        old = self._decode_volume(current)
        if record is None:
            return await self._delete(old, revision)
        return await self._replace(old, record, revision)

    async def update_volume(self, vol_id: str, change: Change) -> VolumeRecord:
        """Apply `change` to the record of `vol_id` as one transaction and return the result.

        The update_volume and delete_volume calls of one catalog object run one at a time, so
        they do not make each other retry. Writers in other processes still can, and `change`
        may then run more than once.
        """
        async with self._lock:
            return await super().update_volume(vol_id, change)

    async def delete_volume(
        self, vol_id: str, check: Callable[[VolumeRecord], None] | None = None
    ) -> VolumeRecord:
        """Delete the record of `vol_id` once `check` (which may raise) accepts it."""
        async with self._lock:
            return await super().delete_volume(vol_id, check)

    async def put_node(self, node: NodeRecord) -> None:
        """Create or replace the record of the node `node["id"]` and mark it online.

        The node stays online while this catalog's lease lives, that is until `close` or
        about `node_ttl` seconds after this process stops.
        """
        node_id = node.get("id")
        if not isinstance(node_id, str) or not node_id:
            raise InvalidArgument(f"invalid node id {node_id!r}: expected a non-empty string")
        if self._nursery is None:
            raise RuntimeError("EtcdCatalog.put_node needs a nursery to keep the lease alive")
        if self._closed:
            raise RuntimeError("EtcdCatalog.put_node called after close")
        value = _encode(node)
        async with self._lease_lock:
            lease = await self._ensure_lease()
            try:
                await self._put_node_keys(node_id, value, lease)
            except NotFound:
                # The lease expired before the put (etcd was unreachable for longer than the
                # TTL), so take a new one and put every node's keys under it.
                self._lease_lost(lease)
                self._registered[node_id] = value
                await self._register_again()
                return
            self._registered[node_id] = value
            self._confirm_grant(lease)

    @property
    def lease_expiry(self) -> float:
        """The trio clock time before which etcd cannot have expired this catalog's nodes.

        It is the time at which the last successful lease grant or refresh was sent, plus the
        TTL that etcd answered with; -inf while no lease holds the node keys.
        """
        return self._lease_expiry

    async def wait_lease_change(self) -> None:
        """Return once `lease_expiry` has changed: a refresh succeeded or the lease was lost."""
        await self._lease_changed.wait()

    async def add_leftovers(self, vol_id: str, node_ids: Sequence[str]) -> None:
        """Record that the replicas of `vol_id` on `node_ids` remain to be deleted."""
        if node_ids:
            puts = [Put(self._leftover_key(node_id, vol_id), b"") for node_id in node_ids]
            await self._client.txn([], puts)

    async def list_leftovers(self, node_id: str) -> list[str]:
        """Return the ids of the volumes whose replica on `node_id` remains to be deleted."""
        prefix = self._leftover_key(node_id, "")
        result = await self._client.range(prefix, prefix=True)
        return [kv.key[len(prefix) :].decode(errors="replace") for kv in result.kvs]

    async def remove_leftover(self, vol_id: str, node_id: str) -> None:
        """Forget the replica of `vol_id` on `node_id` once it is deleted."""
        await self._client.delete(self._leftover_key(node_id, vol_id))

    async def list_nodes(self) -> list[NodeRecord]:
        """Return the record of every node, with `online` true while its lease lives."""
        nodes_prefix, alive_prefix = self._key("nodes/"), self._key("alive/")
        # One transaction reads both ranges at the same revision.
        reads = [
            Get(nodes_prefix, prefix_end(nodes_prefix)),
            Get(alive_prefix, prefix_end(alive_prefix)),
        ]
        result = await self._client.txn([], reads)
        nodes, alive = (_as_range(item) for item in result.responses)
        online = {kv.key[len(alive_prefix) :] for kv in alive.kvs}
        records = []
        for kv in nodes.kvs:
            record = self._decode_node(kv)
            record["online"] = kv.key[len(nodes_prefix) :] in online
            records.append(record)
        return records

    async def close(self) -> None:
        """Stop refreshing the lease and revoke it, so this catalog's nodes go offline now."""
        if self._closed:
            return
        self._closed = True
        if self._keepalive_scope is not None:
            self._keepalive_scope.cancel()
        with trio.CancelScope(shield=True):
            # The lock waits out a lease replacement in progress, so the lease revoked is the
            # one that the node keys are under.
            async with self._lease_lock:
                if self._lease:
                    await self._revoke_lease()

    async def _delete(self, old: VolumeRecord, revision: int) -> Versioned | None:
        vol_id = old["id"]
        success = [Delete(self._volume_key(vol_id)), Delete(self._name_key(old["name"]))]
        compare = [mod_revision_is(self._volume_key(vol_id), revision)]
        result = await self._client.txn(compare, success)
        if not result.succeeded:
            return None
        log.debug("catalog: deleted volume %s (%s)", vol_id, old["name"])
        return Versioned(old, result.revision)

    async def _replace(
        self, old: VolumeRecord, record: VolumeRecord, revision: int
    ) -> Versioned | None:
        vol_id, name = old["id"], record["name"]
        volume_key = self._volume_key(vol_id)
        compare: list[Compare] = [mod_revision_is(volume_key, revision)]
        success: list[Put | Delete] = [Put(volume_key, _encode(record))]
        renamed = name != old["name"]
        if renamed:
            compare.append(key_missing(self._name_key(name)))
            if name != vol_id:
                compare.append(key_missing(self._volume_key(name)))
            success += [
                Delete(self._name_key(old["name"])),
                Put(self._name_key(name), vol_id.encode()),
            ]
        result = await self._client.txn(compare, success, [Get(volume_key)])
        if result.succeeded:
            return Versioned(_decode(_encode(record)), result.revision)
        still_current = _as_range(result.responses[0]).kvs
        if renamed and still_current and still_current[0].mod_revision == revision:
            raise AlreadyExists(f"cannot rename volume {vol_id}: the name {name!r} is taken")
        return None

    async def _put_node_keys(self, node_id: str, value: bytes, lease: int) -> None:
        puts = [Put(self._node_key(node_id), value), Put(self._alive_key(node_id), b"", lease)]
        await self._client.txn([], puts)

    async def _ensure_lease(self) -> int:
        if not self._lease:
            sent = trio.current_time()
            granted = await self._client.lease_grant(self.node_ttl)
            self._lease, self._granted = granted.id, (sent, granted.ttl)
            log.info("catalog: lease %x granted with a TTL of %d s", granted.id, granted.ttl)
        if self._keepalive_scope is None:
            assert self._nursery is not None
            self._keepalive_scope = trio.CancelScope()
            self._nursery.start_soon(self._keep_alive, self._keepalive_scope)
        return self._lease

    async def _keep_alive(self, scope: trio.CancelScope) -> None:
        failures = 0
        with scope:
            while True:
                await trio.sleep(self._refresh_interval(failures))
                try:
                    await self._refresh_lease()
                except PxfsError as exc:
                    failures += 1
                    # The first three failures in a row are logged, then every tenth, so an
                    # etcd outage does not flood the log.
                    if failures <= 3 or failures % 10 == 0:
                        log.warning(
                            "catalog: refreshing lease %x failed (%d in a row): %s",
                            self._lease,
                            failures,
                            exc.message,
                        )
                    continue
                if failures:
                    log.info(
                        "catalog: lease %x refreshed again after %d failures", self._lease, failures
                    )
                failures = 0

    def _refresh_interval(self, failures: int) -> float:
        interval = self.node_ttl / 3
        # A refresh that failed, or whose request was sent long before etcd answered (during a
        # partition), leaves the lease short of time: the next one comes soon.
        short = self._lease_expiry - trio.current_time() < self.node_ttl - interval
        return min(interval, LEASE_RETRY_INTERVAL) if failures or short else interval

    async def _refresh_lease(self) -> None:
        expired = self._lease
        if expired:
            # etcd starts the new TTL when it handles the request, which is after it was sent.
            sent = trio.current_time()
            ttl = await self._client.lease_keepalive(expired)
            if ttl > 0:
                self._lease_refreshed(expired, sent + ttl)
                return
        async with self._lease_lock:
            if self._lease != expired:
                # put_node replaced the lease meanwhile and put its keys under the new one.
                return
            # The lease expired, so etcd deleted the alive keys: register every node again.
            if expired:
                log.warning("catalog: lease %x expired; registering nodes again", expired)
                self._lease_lost(expired)
            await self._register_again()

    async def _register_again(self) -> None:
        """Take a new lease and put the keys of every registered node under it."""
        self._lease = 0
        lease = await self._ensure_lease()
        for node_id, value in list(self._registered.items()):
            await self._put_node_keys(node_id, value, lease)
        self._confirm_grant(lease)

    def _confirm_grant(self, lease: int) -> None:
        """Count a new lease as held once the node keys are under it."""
        if self._granted is not None and lease == self._lease:
            sent, ttl = self._granted
            self._granted = None
            self._lease_refreshed(lease, sent + ttl)

    def _lease_refreshed(self, lease: int, expiry: float) -> None:
        # A refresh of a lease that another task replaced meanwhile, or of a new lease that the
        # node keys are not under yet, says nothing about the keys.
        if lease != self._lease or self._granted is not None or expiry <= self._lease_expiry:
            return
        self._set_lease_expiry(expiry)

    def _lease_lost(self, lease: int) -> None:
        if lease == self._lease:
            self._lease = 0
        self._set_lease_expiry(-math.inf)

    def _set_lease_expiry(self, expiry: float) -> None:
        self._lease_expiry = expiry
        self._lease_changed.set()
        self._lease_changed = trio.Event()

    async def _revoke_lease(self) -> None:
        lease, self._lease = self._lease, 0
        self._set_lease_expiry(-math.inf)
        try:
            with trio.fail_after(self._client.timeout):
                await self._client.lease_revoke(lease)
        except NotFound:
            pass
        except (PxfsError, trio.TooSlowError) as exc:
            # The nodes then stay online until the lease TTL runs out.
            log.warning("catalog: revoking lease %x failed: %s", lease, exc)
        else:
            log.info("catalog: lease %x revoked", lease)

    def _key(self, suffix: str) -> bytes:
        return (self.prefix + suffix).encode()

    def _volume_key(self, vol_id: str) -> bytes:
        return self._key("volumes/" + vol_id)

    def _name_key(self, name: str) -> bytes:
        return self._key("names/" + name)

    def _node_key(self, node_id: str) -> bytes:
        return self._key("nodes/" + node_id)

    def _alive_key(self, node_id: str) -> bytes:
        return self._key("alive/" + node_id)

    def _leftover_key(self, node_id: str, vol_id: str) -> bytes:
        return self._key(f"leftovers/{node_id}/{vol_id}")

    def _decode_volume(self, kv: KeyValue) -> VolumeRecord:
        record = self._decode_json(kv)
        vol_id = kv.key.decode(errors="replace")[len(self._key("volumes/")) :]
        problem = volume_entry_problem(vol_id, {"revision": kv.mod_revision, "record": record})
        if problem or not isinstance(record, dict):
            raise Corrupted(f"etcd key {kv.key.decode(errors='replace')} {problem}")
        return record

    def _decode_node(self, kv: KeyValue) -> NodeRecord:
        record = self._decode_json(kv)
        node_id = kv.key.decode(errors="replace")[len(self._key("nodes/")) :]
        if not isinstance(record, dict) or record.get("id") != node_id:
            raise Corrupted(f"etcd key {kv.key.decode(errors='replace')} has no matching node id")
        return record

    def _decode_json(self, kv: KeyValue) -> Any:
        try:
            return _decode(kv.value)
        except (ValueError, RecursionError) as exc:
            raise Corrupted(
                f"etcd key {kv.key.decode(errors='replace')} is not valid JSON: {exc}"
            ) from None


@contextlib.asynccontextmanager
async def open_etcd_catalog(
    endpoints: Sequence[str],
    cluster_id: str,
    *,
    node_ttl: float = DEFAULT_NODE_TTL,
    timeout: float = DEFAULT_TIMEOUT,
) -> AsyncIterator[EtcdCatalog]:
    """Connect to etcd at `endpoints` and yield the catalog of `cluster_id`, closed at exit."""
    async with EtcdClient(endpoints, timeout=timeout) as client, trio.open_nursery() as nursery:
        catalog = EtcdCatalog(client, cluster_id, nursery=nursery, node_ttl=node_ttl)
        try:
            yield catalog
        finally:
            await catalog.close()


def _cluster_prefix(cluster_id: str) -> str:
    if not isinstance(cluster_id, str) or not cluster_id or "/" in cluster_id:
        raise InvalidArgument(
            f"invalid cluster id {cluster_id!r}: expected a non-empty string without '/'"
        )
    if not cluster_id.isprintable():
        raise InvalidArgument(f"invalid cluster id {cluster_id!r}: contains unprintable characters")
    return f"/pxfs/{cluster_id}/"


def _encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


def _decode(value: bytes) -> Any:
    return json.loads(value)


def _found(result: object) -> bool:
    return bool(_as_range(result).kvs)


def _as_range(result: object) -> RangeResult:
    if not isinstance(result, RangeResult):
        raise InternalError(f"etcd returned {result!r:.200} for a range read in a transaction")
    return result
