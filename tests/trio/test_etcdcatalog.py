"""EtcdCatalog on a real etcd: racing writers, key layout, node leases and etcd outages.

The Catalog contract itself runs against this backend in test_catalog_backends.py.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from etcdproc import EtcdProcess, start_etcd_cluster

from pxfs.catalog import VolumeRecord
from pxfs.errors import AlreadyExists, Corrupted, InvalidArgument, Unavailable
from pxfs.etcd import EtcdClient
from pxfs.etcdcatalog import EtcdCatalog, open_etcd_catalog

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 2.0
#: The shortest lease TTL that etcd 3.4 grants with its default election timeout is 2 s.
SHORT_TTL = 2

_cluster_ids = itertools.count()


def make_record(vol_id: str, name: str, **fields: object) -> VolumeRecord:
    record: VolumeRecord = {"id": vol_id, "name": name, "ctime_ns": 1, "epoch": 1}
    record.update(fields)
    return record


@pytest.fixture
def cluster_id() -> str:
    return f"catalog-{next(_cluster_ids)}"


@pytest.fixture
async def raw(shared_etcd: EtcdProcess) -> AsyncIterator[EtcdClient]:
    """A plain client, to look at and damage the keys behind the catalog."""
    async with EtcdClient([shared_etcd.endpoint], timeout=TIMEOUT) as client:
        yield client


async def node_states(catalog: EtcdCatalog) -> dict[str, bool]:
    return {node["id"]: node["online"] for node in await catalog.list_nodes()}


async def wait_for_node_state(
    catalog: EtcdCatalog, node_id: str, online: bool, limit: float
) -> float:
    """Poll until `node_id` has `online`; return the seconds it took."""
    started = trio.current_time()
    with trio.fail_after(limit):
        while (await node_states(catalog)).get(node_id) is not online:
            await trio.sleep(0.1)
    return trio.current_time() - started


async def test_cluster_id_is_checked() -> None:
    async with EtcdClient(["http://127.0.0.1:1"]) as client:
        for bad in ["", "a/b", "tab\there", None]:
            with pytest.raises(InvalidArgument, match="invalid cluster id"):
                EtcdCatalog(client, bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="invalid node TTL"):
            EtcdCatalog(client, "c", node_ttl=0)


async def test_keys_live_under_cluster_prefix(
    shared_etcd: EtcdProcess, raw: EtcdClient, cluster_id: str
) -> None:
    async with open_etcd_catalog([shared_etcd.endpoint], cluster_id) as catalog:
        created = await catalog.create_volume(make_record("11", "data"))
        await catalog.put_node({"id": "n1", "hostname": "h"})
        prefix = f"/pxfs/{cluster_id}/".encode()
        keys = {kv.key: kv for kv in (await raw.range(prefix, prefix=True)).kvs}
        assert sorted(keys) == [
            prefix + b"alive/n1",
            prefix + b"names/data",
            prefix + b"nodes/n1",
            prefix + b"volumes/11",
        ]
        assert keys[prefix + b"names/data"].value == b"11"
        assert keys[prefix + b"volumes/11"].mod_revision == created.revision
        # The volume and its name key were written by one transaction.
        assert keys[prefix + b"names/data"].mod_revision == created.revision
        assert keys[prefix + b"alive/n1"].lease != 0
        assert keys[prefix + b"nodes/n1"].lease == 0


async def test_clusters_do_not_share_state(shared_etcd: EtcdProcess, cluster_id: str) -> None:
    endpoints = [shared_etcd.endpoint]
    async with open_etcd_catalog(endpoints, cluster_id) as first:
        async with open_etcd_catalog(endpoints, cluster_id + "-other") as second:
            await first.create_volume(make_record("1", "vol"))
            await second.create_volume(make_record("1", "vol"))
            assert await second.get_volume("2") is None
            assert len(await first.list_volumes()) == 1


async def test_racing_compare_and_set_has_one_winner(
    shared_etcd: EtcdProcess, cluster_id: str
) -> None:
    endpoints = [shared_etcd.endpoint]
    async with (
        open_etcd_catalog(endpoints, cluster_id) as first,
        open_etcd_catalog(endpoints, cluster_id) as second,
    ):
        created = await first.create_volume(make_record("1", "vol", attached_on=""))
        results: dict[str, object] = {}

        async def attach(catalog: EtcdCatalog, node: str) -> None:
            record = make_record("1", "vol", attached_on=node)
            results[node] = await catalog.compare_and_set("1", created.revision, record)

        for _ in range(10):
            results.clear()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(attach, first, "node-a")
                nursery.start_soon(attach, second, "node-b")
            winners = [node for node, result in results.items() if result is not None]
            assert len(winners) == 1
            current = await second.require_volume("1")
            assert current.record["attached_on"] == winners[0]
            # Put the record back, so the next round races from a known revision again.
            reset = await first.compare_and_set(
                "1", current.revision, make_record("1", "vol", attached_on="")
            )
            assert reset is not None
            created = reset


async def test_racing_updates_all_apply(shared_etcd: EtcdProcess, cluster_id: str) -> None:
    endpoints = [shared_etcd.endpoint]
    async with (
        open_etcd_catalog(endpoints, cluster_id) as first,
        open_etcd_catalog(endpoints, cluster_id) as second,
    ):
        await first.create_volume(make_record("1", "vol", counter=0))

        def increment(record: VolumeRecord) -> VolumeRecord:
            record["counter"] += 1
            return record

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(first.update_volume, "1", increment)
                nursery.start_soon(second.update_volume, "1", increment)

        assert (await first.require_volume("1")).record["counter"] == 20


async def test_racing_creates_of_one_name(shared_etcd: EtcdProcess, cluster_id: str) -> None:
    endpoints = [shared_etcd.endpoint]
    async with (
        open_etcd_catalog(endpoints, cluster_id) as first,
        open_etcd_catalog(endpoints, cluster_id) as second,
    ):
        outcomes: list[str] = []

        async def create(catalog: EtcdCatalog, vol_id: str) -> None:
            try:
                await catalog.create_volume(make_record(vol_id, "shared"))
                outcomes.append("created")
            except AlreadyExists:
                outcomes.append("exists")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(create, first, "1")
            nursery.start_soon(create, second, "2")

        assert sorted(outcomes) == ["created", "exists"]
        assert len(await first.list_volumes()) == 1


async def test_rename_moves_name_key(shared_etcd: EtcdProcess, cluster_id: str) -> None:
    async with open_etcd_catalog([shared_etcd.endpoint], cluster_id) as catalog:
        created = await catalog.create_volume(make_record("1", "old"))
        await catalog.create_volume(make_record("2", "taken"))

        renamed = await catalog.compare_and_set("1", created.revision, make_record("1", "new"))
        assert renamed is not None
        assert (await catalog.find_volume("new"))["id"] == "1"
        # The old name is free again, and the new one is taken.
        await catalog.create_volume(make_record("3", "old"))
        with pytest.raises(AlreadyExists, match="named 'new'"):
            await catalog.create_volume(make_record("4", "new"))

        with pytest.raises(AlreadyExists, match="the name 'taken' is taken"):
            await catalog.compare_and_set("1", renamed.revision, make_record("1", "taken"))
        with pytest.raises(AlreadyExists, match="the name '2' is taken"):
            await catalog.compare_and_set("1", renamed.revision, make_record("1", "2"))
        stored = await catalog.require_volume("1")
        assert stored.record["name"] == "new"
        assert stored.revision == renamed.revision
        # A stale rename loses like any other stale write.
        assert await catalog.compare_and_set("1", created.revision, make_record("1", "x")) is None


async def test_corrupt_values_are_reported(
    shared_etcd: EtcdProcess, raw: EtcdClient, cluster_id: str
) -> None:
    prefix = f"/pxfs/{cluster_id}/"
    async with open_etcd_catalog([shared_etcd.endpoint], cluster_id) as catalog:
        await raw.put(f"{prefix}volumes/1".encode(), b"{not json")
        with pytest.raises(Corrupted, match="volumes/1 is not valid JSON"):
            await catalog.get_volume("1")
        await raw.put(f"{prefix}volumes/1".encode(), b'{"id": "2", "name": "x"}')
        with pytest.raises(Corrupted, match="volumes/1 has a record with id '2'"):
            await catalog.list_volumes()
        await raw.put(f"{prefix}nodes/n".encode(), b'{"id": "m"}')
        with pytest.raises(Corrupted, match="nodes/n has no matching node id"):
            await catalog.list_nodes()


async def test_put_node_needs_a_nursery(raw: EtcdClient, cluster_id: str) -> None:
    catalog = EtcdCatalog(raw, cluster_id)
    with pytest.raises(RuntimeError, match="needs a nursery"):
        await catalog.put_node({"id": "n"})
    with pytest.raises(InvalidArgument, match="invalid node id"):
        await catalog.put_node({"hostname": "h"})


async def test_node_stays_online_past_ttl(shared_etcd: EtcdProcess, cluster_id: str) -> None:
    endpoints = [shared_etcd.endpoint]
    async with open_etcd_catalog(endpoints, cluster_id, node_ttl=SHORT_TTL) as catalog:
        await catalog.put_node({"id": "n1", "hostname": "h1"})
        await trio.sleep(SHORT_TTL * 2.5)
        assert await catalog.list_nodes() == [{"id": "n1", "hostname": "h1", "online": True}]


async def test_close_takes_node_offline(shared_etcd: EtcdProcess, cluster_id: str) -> None:
    endpoints = [shared_etcd.endpoint]
    async with open_etcd_catalog(endpoints, cluster_id) as observer:
        async with open_etcd_catalog(endpoints, cluster_id) as member:
            await member.put_node({"id": "n1"})
            assert await node_states(observer) == {"n1": True}
        # The lease was revoked, so there is no wait for its TTL.
        assert await node_states(observer) == {"n1": False}


async def test_dead_process_goes_offline_after_ttl(
    shared_etcd: EtcdProcess, cluster_id: str, tmp_path: Path
) -> None:
    script = textwrap.dedent(
        f"""
        import trio
        from pxfs.etcdcatalog import open_etcd_catalog

        async def main():
            endpoints = [{shared_etcd.endpoint!r}]
            async with open_etcd_catalog(endpoints, {cluster_id!r}, node_ttl={SHORT_TTL}) as c:
                await c.put_node({{"id": "doomed"}})
                print("ready", flush=True)
                await trio.sleep(120)

        trio.run(main)
        """
    )
    member = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert member.stdout is not None
        with trio.fail_after(30):
            line = await trio.to_thread.run_sync(member.stdout.readline)
        assert line == b"ready\n", member.stderr.read() if member.stderr else b""
        member.kill()
        member.wait()
        async with open_etcd_catalog([shared_etcd.endpoint], cluster_id) as observer:
            assert await node_states(observer) == {"doomed": True}
            waited = await wait_for_node_state(observer, "doomed", False, SHORT_TTL + 5)
            assert await observer.list_nodes() == [{"id": "doomed", "online": False}]
    finally:
        if member.poll() is None:
            member.kill()
            member.wait()
        for stream in (member.stdout, member.stderr):
            if stream is not None:
                stream.close()
    assert waited <= SHORT_TTL + 5


async def test_expired_lease_is_replaced(
    shared_etcd: EtcdProcess, raw: EtcdClient, cluster_id: str
) -> None:
    endpoints = [shared_etcd.endpoint]
    async with open_etcd_catalog(endpoints, cluster_id, node_ttl=SHORT_TTL) as catalog:
        await catalog.put_node({"id": "n1"})
        alive = await raw.get(f"/pxfs/{cluster_id}/alive/n1".encode())
        assert alive is not None
        # Revoking the lease from outside is what etcd does when it expires.
        await raw.lease_revoke(alive.lease)
        assert await node_states(catalog) == {"n1": False}

        await wait_for_node_state(catalog, "n1", True, SHORT_TTL + 3)
        again = await raw.get(f"/pxfs/{cluster_id}/alive/n1".encode())
        assert again is not None
        assert again.lease not in (0, alive.lease)


async def test_etcd_outage_and_recovery(own_etcd: EtcdProcess, cluster_id: str) -> None:
    endpoints = [own_etcd.endpoint]
    async with open_etcd_catalog(endpoints, cluster_id, node_ttl=5, timeout=TIMEOUT) as catalog:
        await catalog.create_volume(make_record("1", "vol"))
        await catalog.put_node({"id": "n1"})
        own_etcd.stop()

        started = trio.current_time()
        with pytest.raises(Unavailable, match=own_etcd.endpoint):
            await catalog.get_volume("1")
        with pytest.raises(Unavailable):
            await catalog.create_volume(make_record("2", "other"))
        with pytest.raises(Unavailable):
            await catalog.update_volume("1", lambda record: record)
        assert trio.current_time() - started < 3 * TIMEOUT

        own_etcd.start()
        assert (await catalog.require_volume("1")).record["name"] == "vol"
        await catalog.create_volume(make_record("2", "other"))
        await wait_for_node_state(catalog, "n1", True, 10)


async def test_cluster_member_failures(tmp_path: Path, cluster_id: str) -> None:
    members = start_etcd_cluster(tmp_path / "cluster")
    try:
        endpoints = [member.endpoint for member in members]
        async with open_etcd_catalog(endpoints, cluster_id, timeout=TIMEOUT) as catalog:
            await catalog.create_volume(make_record("1", "vol", counter=0))
            await catalog.put_node({"id": "n1"})

            # With the first endpoint gone, every call moves on to the next member.
            members[0].stop()
            await catalog.update_volume("1", lambda record: {**record, "counter": 1})
            assert (await catalog.require_volume("1")).record["counter"] == 1
            assert await node_states(catalog) == {"n1": True}

            # Without a quorum, no member serves, and the call gives up within its timeout.
            members[1].stop()
            started = trio.current_time()
            with pytest.raises(Unavailable, match="timed out after"):
                await catalog.get_volume("1")
            assert trio.current_time() - started < TIMEOUT + 1

            members[0].start()
            with trio.fail_after(20):
                while True:
                    try:
                        found = await catalog.require_volume("1")
                        break
                    except Unavailable:
                        await trio.sleep(0.2)
            assert found.record["counter"] == 1
    finally:
        for member in members:
            member.stop()
