"""Node failures on a real cluster: stops, kill -9, failover and damaged replicas.

Three real pxd processes share one real etcd, volumes are mounted through FUSE, and every check
compares checksums on the mount and on each replica's files. The tests print what they measure:
the time from a death to writes resuming, the blocks resynced against the blocks written during
the outage, and the resync rate. Run with `-s` to see it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import errno
import hashlib
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusterproc import (
    RESYNC_DEADLINE,
    WRITER,
    Cluster,
    ClusterNode,
    assert_file_reads,
    assert_replicas_identical,
    count_differing,
    create_volume,
    lazy_unmount,
    mount_on,
    parse_pairs,
    read_runtime_state,
    release_on,
    sha256_file,
    wait_in_sync,
    wait_until,
    write_synced,
)

from pxfs import errors
from pxfs.etcdcatalog import DEFAULT_NODE_TTL
from pxfs.replication import DEFAULT_TIMEOUT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for FUSE mounts")

MIB = 1 << 20
BLOCK = 64 * 1024
#: How long after a kill -9 a node may still show online: the lease TTL, one status period
#: and the time etcd takes to expire a lease.
OFFLINE_DEADLINE = DEFAULT_NODE_TTL + 10.0
#: How long an idle mount child may take to drop a replica whose pxd died: it tries to
#: reconnect every 5 s, and a refused connection fails at once.
IDLE_DROP_DEADLINE = 20.0
#: Seconds that a writer process runs, the size of each of its fsync'd chunks, the maximum it
#: writes, and the size of the volumes it writes to.
WRITER_SECONDS = 6.0
WRITER_CHUNK = 256 * 1024
WRITER_MAX_BYTES = 192 * MIB
WRITER_VOLUME_SIZE = 256 * MIB


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("faults"), 3)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(autouse=True)
def every_node_running(cluster: Cluster) -> Iterator[None]:
    """Start again any node that a failed test left stopped, so the next test has three."""
    yield
    for node in cluster.nodes[:3]:
        if node.pxd is None:
            node.start()


# Helpers


def _start_writer(
    path: Path, seconds: float = WRITER_SECONDS, max_bytes: int = WRITER_MAX_BYTES
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(seconds), str(WRITER_CHUNK),
         str(max_bytes)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _finish_writer(writer: subprocess.Popen[str]) -> tuple[int, list[tuple[int, float]]]:
    """Wait for the writer; return its exit status and its (end offset, time) lines.

    Raises AssertionError when the writer hung or reported an error.
    """
    failed, done = _writer_outcome(writer)
    assert failed is None, f"the writer failed with errno {failed}"
    return writer.returncode, done


def _writer_outcome(
    writer: subprocess.Popen[str], timeout: float = WRITER_SECONDS + 60
) -> tuple[int | None, list[tuple[int, float]]]:
    """Wait for the writer; return the errno it stopped at (None) and its fsync lines."""
    try:
        out, err = writer.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        writer.kill()
        out, err = writer.communicate()
        raise AssertionError(f"the writer hung:\n{out}\n{err}") from None
    failed = None
    done = []
    for line in out.splitlines():
        # "END_OFFSET TIME", or "error ERRNO TIME" for the write that failed.
        first, second = line.split()[:2]
        if first == "error":
            failed = int(second)
        else:
            done.append((int(first), float(second)))
    return failed, done


def _writer_payload(path: Path, length: int) -> bytes:
    """The bytes the writer wrote to `path` in its first `length` bytes."""
    rng = random.Random(str(path))
    data = b"".join(rng.randbytes(WRITER_CHUNK) for _ in range(length // WRITER_CHUNK))
    return data


def _gap_after(done: list[tuple[int, float]], moment: float) -> float:
    """Seconds from `moment` to the first fsync that completed after it."""
    after = [at for _, at in done if at > moment]
    assert after, "no fsync completed after the fault"
    return after[0] - moment


def _longest_gap_after(done: list[tuple[int, float]], moment: float) -> float:
    """The maximum time without a completed fsync from `moment` to the last fsync."""
    moments = [moment] + [at for _, at in done if at > moment]
    assert len(moments) > 1, "no fsync completed after the fault"
    return max(later - earlier for earlier, later in zip(moments, moments[1:], strict=False))


def _resync_rate(node: ClusterNode, vol_id: str) -> float | None:
    """MiB/s of the last resync that the node's mount child of `vol_id` logged, if any."""
    started = finished = None
    copied = 0
    pattern = re.compile(r"^(\S+ \S+) \w+ \S+: volume " + vol_id + r": (.*)$")
    for line in node.log_text().splitlines():
        match = pattern.match(line)
        if match is None:
            continue
        at = datetime.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if "resync of replica" in match[2] and match[2].endswith("started"):
            started = at
        caught_up = re.search(r"caught up after copying (\d+) blocks", match[2])
        if caught_up and started is not None:
            finished, copied = at, int(caught_up[1])
    if started is None or finished is None or finished <= started or copied == 0:
        return None
    return copied * BLOCK / MIB / (finished - started)


# A replica stopped cleanly gets exactly the blocks it missed


def test_stopped_replica_gets_missed_blocks(cluster: Cluster, tmp_path: Path) -> None:
    first, second, third = cluster.nodes[:3]
    vol_id = create_volume(first, "stopped", 2, [first, second])
    path = tmp_path / "mnt"
    expected = bytearray(os.urandom(32 * MIB))
    written: set[int] = set()
    try:
        mount_on(third, "stopped", path)
        write_synced(path / "blob", bytes(expected))

        assert second.stop() == 0
        stale = second.versions(vol_id)
        rng = random.Random(1)
        with open(path / "blob", "r+b") as f:
            for _ in range(8 * MIB // BLOCK):
                block = rng.randrange(len(expected) // BLOCK)
                data = os.urandom(BLOCK)
                f.seek(block * BLOCK)
                f.write(data)
                expected[block * BLOCK : (block + 1) * BLOCK] = data
                written.add(block)
            f.flush()
            os.fsync(f.fileno())
        inspected = third.call("volume.inspect", "stopped")
        assert inspected["write_set"] == [first.node_id]
        assert inspected["out_of_sync"] == [second.node_id]
        assert read_runtime_state(third, "stopped")["RuntimeState"] == "degraded"

        missed = count_differing(stale, first.versions(vol_id))
        # Every file block written is a device block written, plus the metadata that maps them.
        assert missed >= len(written)
        second.start()
        wait_in_sync(third, "stopped")
        state = read_runtime_state(third, "stopped")
        index = inspected["replica_nodes"].index(second.node_id)
        copied = parse_pairs(state["ResyncBlocks"])[index]
        print(
            f"\nstopped replica: {len(written)} file blocks and {missed} device blocks written "
            f"during the outage, {copied} blocks resynced"
        )
        assert copied == missed
        assert state["RuntimeState"] == "clean"
        assert parse_pairs(state["FullResyncBlocks"]) == {}
        assert sha256_file(path / "blob") == hashlib.sha256(expected).hexdigest()
    finally:
        if second.pxd is None:
            second.start()
        release_on(third, "stopped", path)
    assert_replicas_identical([first, second], vol_id)
    first.call("volume.delete", "stopped")


def test_detached_volume_resynced_by_pxd(cluster: Cluster, tmp_path: Path) -> None:
    first, second, _ = cluster.nodes[:3]
    vol_id = create_volume(first, "detached", 2, [first, second])
    path = tmp_path / "mnt"
    expected = bytearray(os.urandom(16 * MIB))
    try:
        mount_on(first, "detached", path)
        write_synced(path / "blob", bytes(expected))
        assert second.stop() == 0
        stale = second.versions(vol_id)
        rng = random.Random(2)
        with open(path / "blob", "r+b") as f:
            for _ in range(2 * MIB // BLOCK):
                block = rng.randrange(len(expected) // BLOCK)
                data = os.urandom(BLOCK)
                f.seek(block * BLOCK)
                f.write(data)
                expected[block * BLOCK : (block + 1) * BLOCK] = data
            f.flush()
            os.fsync(f.fileno())
        release_on(first, "detached", path)
        missed = count_differing(stale, first.versions(vol_id))
        assert first.call("volume.inspect", "detached")["out_of_sync"] == [second.node_id]

        # No node attaches the volume: pxd on the write set's node resyncs it.
        second.start()
        record = wait_in_sync(first, "detached")
        assert record["attached_on"] == ""
        assert sorted(record["write_set"]) == sorted([first.node_id, second.node_id])
        assert missed > 0
        assert_replicas_identical([first, second], vol_id)
        print(f"\ndetached volume: {missed} blocks missed, resynced without an attach")

        # Attached on the node that missed the writes, reads come from its local replica.
        mount_on(second, "detached", path)
        assert sha256_file(path / "blob") == hashlib.sha256(expected).hexdigest()
    finally:
        if second.pxd is None:
            second.start()
        release_on(second, "detached", path)
    first.call("volume.delete", "detached")


def test_idle_volume_degraded_when_replica_dies(cluster: Cluster, tmp_path: Path) -> None:
    first, second, _ = cluster.nodes[:3]
    create_volume(first, "idle", 2, [first, second])
    path = tmp_path / "mnt"
    try:
        mount_on(first, "idle", path)
        write_synced(path / "blob", os.urandom(MIB))
        assert read_runtime_state(first, "idle")["RuntimeState"] == "clean"
        second.kill()
        killed_at = time.monotonic()

        # No write follows: the mount child notices the lost connection by itself.
        def degraded() -> bool:
            record = first.call("volume.inspect", "idle")
            state = record["runtime_state"]["RuntimeState"]
            return record["out_of_sync"] == [second.node_id] and state == "degraded"

        wait_until(degraded, IDLE_DROP_DEADLINE, "the idle volume still shows clean")
        noticed = time.monotonic() - killed_at
        second.start()
        record = wait_in_sync(first, "idle")
        assert sorted(record["write_set"]) == sorted([first.node_id, second.node_id])
        print(f"\nidle volume: degraded {noticed:.1f} s after the kill of a replica's pxd")
    finally:
        if second.pxd is None:
            second.start()
        release_on(first, "idle", path)
    first.call("volume.delete", "idle")


def test_delete_with_replica_node_offline(cluster: Cluster, tmp_path: Path) -> None:
    first, second, _ = cluster.nodes[:3]
    vol_id = create_volume(first, "gone", 2, [first, second])
    path = tmp_path / "mnt"
    mount_on(first, "gone", path)
    write_synced(path / "blob", os.urandom(MIB))
    release_on(first, "gone", path)
    try:
        assert second.stop() == 0
        assert second.replica_dir(vol_id).exists()
        first.call("volume.delete", "gone")
        assert not first.replica_dir(vol_id).exists()
        with pytest.raises(errors.NotFound):
            first.call("volume.inspect", "gone")
        # The name is free again at once, while the old replica still lies on the offline node.
        create_volume(first, "gone", 1, [first])
        assert second.replica_dir(vol_id).exists()
    finally:
        if second.pxd is None:
            second.start()
    wait_until(
        lambda: not second.replica_dir(vol_id).exists(),
        RESYNC_DEADLINE,
        "the returning node kept the replica of the deleted volume",
    )
    assert first.call("volume.inspect", "gone")["id"] != vol_id
    first.call("volume.delete", "gone")


def test_delete_while_dead_node_listed_online(cluster: Cluster) -> None:
    first, second, _ = cluster.nodes[:3]
    create_volume(first, "late", 2, [first, second])
    second.kill()
    try:
        # Until its lease lapses the dead node is listed online, so delete needs it and fails,
        # saying what to do.
        with pytest.raises(errors.Unavailable, match="run delete again") as raised:
            first.call("volume.delete", "late")
        assert "stays marked as being deleted" in raised.value.message
        with pytest.raises(errors.NotFound, match="late is being deleted"):
            first.call("volume.attach", "late")

        def deleted() -> bool:
            try:
                first.call("volume.delete", "late")
            except errors.Unavailable:
                return False
            return True

        wait_until(deleted, RESYNC_DEADLINE, "delete did not finish once the node was offline")
        with pytest.raises(errors.NotFound):
            first.call("volume.inspect", "late")
    finally:
        if second.pxd is None:
            second.start()


# A replica's pxd killed or hung during a sustained write


@pytest.mark.parametrize("ha_level", [2, 3])
def test_replica_killed_during_writes(cluster: Cluster, tmp_path: Path, ha_level: int) -> None:
    nodes = cluster.nodes[:3]
    name = f"killed{ha_level}"
    replicas = nodes[:ha_level]
    vol_id = create_volume(nodes[0], name, ha_level, replicas, WRITER_VOLUME_SIZE)
    victim = replicas[1]
    # The mount is on a node that stays up: the third node, a replica only at ha 3.
    coordinator = nodes[2]
    path = tmp_path / "mnt"
    try:
        mount_on(coordinator, name, path)
        writer = _start_writer(path / "stream")
        time.sleep(WRITER_SECONDS / 3)
        killed_at = time.monotonic()
        victim.kill()
        status, done = _finish_writer(writer)
        assert status == 0
        resumed = _gap_after(done, killed_at)

        inspected = coordinator.call("volume.inspect", name)
        assert victim.node_id not in inspected["write_set"]
        assert inspected["out_of_sync"] == [victim.node_id]
        assert len(inspected["write_set"]) == ha_level - 1
        assert read_runtime_state(coordinator, name)["RuntimeState"] == "degraded"

        survivor = replicas[0]
        missed = count_differing(victim.versions(vol_id), survivor.versions(vol_id))
        victim.start()
        record = wait_in_sync(coordinator, name)
        assert sorted(record["write_set"]) == sorted(node.node_id for node in replicas)
        state = read_runtime_state(coordinator, name)
        index = record["replica_nodes"].index(victim.node_id)
        copied = parse_pairs(state["ResyncBlocks"])[index]
        rate = _resync_rate(coordinator, vol_id)
        length = done[-1][0]
        print(
            f"\nha {ha_level} kill -9: writes resumed {resumed:.2f} s after the kill; "
            f"{missed} blocks written during the outage, {copied} resynced; "
            f"{length // MIB} MiB written; resync rate "
            + (f"{rate:.0f} MiB/s" if rate else "not logged")
        )
        assert copied == missed
        assert state["RuntimeState"] == "clean"
        assert (
            sha256_file(path / "stream")
            == hashlib.sha256(_writer_payload(path / "stream", length)).hexdigest()
        )
    finally:
        if victim.pxd is None:
            victim.start()
        release_on(coordinator, name, path)
    assert_replicas_identical(replicas, vol_id)
    nodes[0].call("volume.delete", name)


def test_hung_replica_dropped_after_timeout(cluster: Cluster, tmp_path: Path) -> None:
    first, second, third = cluster.nodes[:3]
    vol_id = create_volume(first, "hung", 2, [first, second], WRITER_VOLUME_SIZE)
    path = tmp_path / "mnt"
    try:
        mount_on(third, "hung", path)
        writer = _start_writer(path / "stream")
        time.sleep(WRITER_SECONDS / 3)
        paused_at = time.monotonic()
        second.pause()
        try:
            status, done = _finish_writer(writer)
        finally:
            second.resume()
        assert status == 0
        # The maximum stall, not the wait for the first fsync, because an fsync whose replies
        # were already on their way can complete just after the pause.
        resumed = _longest_gap_after(done, paused_at)
        print(f"\nhung replica: writes stalled {resumed:.2f} s after it stopped replying")
        # A write gives up on a replica that stopped replying after DEFAULT_TIMEOUT (5 s), and
        # so does a flush once a write quorum has flushed.
        assert 4.0 < resumed < DEFAULT_TIMEOUT + 10.0

        inspected = third.call("volume.inspect", "hung")
        assert inspected["write_set"] == [first.node_id]
        record = wait_in_sync(third, "hung")
        assert sorted(record["write_set"]) == sorted([first.node_id, second.node_id])
        length = done[-1][0]
        expected = _writer_payload(path / "stream", length)
        assert sha256_file(path / "stream") == hashlib.sha256(expected).hexdigest()
    finally:
        release_on(third, "hung", path)
    assert_replicas_identical([first, second], vol_id)
    first.call("volume.delete", "hung")


# Failover: the attached node dies, another node of the replica set takes the volume


def test_failover_to_replica_node(cluster: Cluster, tmp_path: Path) -> None:
    first, second, third = cluster.nodes[:3]
    vol_id = create_volume(first, "failover", 2, [first, second])
    old_path, new_path = tmp_path / "old", tmp_path / "new"
    payload = os.urandom(8 * MIB)
    try:
        mount_on(first, "failover", old_path)
        (old_path / "dir").mkdir()
        write_synced(old_path / "dir" / "synced", payload)
        epoch = first.call("volume.inspect", "failover")["epoch"]

        # pxd dies and its mount child lives on, as after a crash of pxd alone.
        killed_at = time.monotonic()
        first.kill()
        with pytest.raises(errors.Busy, match="is attached on node"):
            third.call("volume.attach", "failover")

        def attach() -> bool:
            try:
                second.call("volume.attach", "failover")
            except errors.Busy:
                return False
            return True

        wait_until(attach, OFFLINE_DEADLINE, "the volume stayed attached on the dead node")
        new_path.mkdir()
        second.call("volume.mount", "failover", str(new_path))
        taken_over = time.monotonic() - killed_at
        record = second.call("volume.inspect", "failover")
        assert record["epoch"] > epoch
        assert record["attached_on"] == second.node_id
        assert record["mount_paths"] == [str(new_path)]
        assert sha256_file(new_path / "dir" / "synced") == hashlib.sha256(payload).hexdigest()
        write_synced(new_path / "after", payload)

        # The old mount child is fenced: the replica rejects its epoch, which FUSE returns as
        # ESTALE. Its own pxd is dead, so it could not have recorded a write set change either.
        with pytest.raises(OSError) as raised:
            write_synced(old_path / "stale", payload)
        assert raised.value.errno == errno.ESTALE

        first.start()
        # The returning pxd drops the stale mounts of a volume attached elsewhere, and the old
        # mount child ends with them.
        with open("/proc/self/mounts", encoding="utf-8") as table:
            mounted = [line.split()[1] for line in table]
        assert str(old_path) not in mounted
        assert str(first.data_dir / "mnt" / vol_id) not in mounted
        wait_until(lambda: not first.child_pids(), 30, "the stale mount child did not exit")
        record = wait_in_sync(second, "failover")
        assert sorted(record["write_set"]) == sorted([first.node_id, second.node_id])
        assert record["attached_on"] == second.node_id
        assert not (new_path / "stale").exists()
        print(f"\nfailover: mounted on the other node {taken_over:.1f} s after the kill")
    finally:
        if first.pxd is None:
            first.start()
        first.kill_children()
        lazy_unmount(old_path)
        lazy_unmount(first.data_dir / "mnt" / vol_id)
        release_on(second, "failover", new_path)
    assert_replicas_identical([first, second], vol_id)
    second.call("volume.delete", "failover")


# ha 3 below its write quorum


def test_below_quorum_write_rolled_back(cluster: Cluster, tmp_path: Path) -> None:
    first, second, third = cluster.nodes[:3]
    vol_id = create_volume(first, "quorum", 3, [first, second, third])
    path = tmp_path / "mnt"
    before = os.urandom(4 * MIB)
    try:
        mount_on(first, "quorum", path)
        write_synced(path / "before", before)
        assert second.stop() == 0
        assert third.stop() == 0
        with pytest.raises(OSError) as raised:
            write_synced(path / "lost", os.urandom(4 * MIB))
        assert raised.value.errno == errno.EIO
        inspected = first.call("volume.inspect", "quorum")
        assert sorted(inspected["write_set"]) == sorted(n.node_id for n in (first, second, third))

        second.start()
        third.start()

        # Writes resume once the mount child has reconnected the two and reconciled the blocks
        # of the failed write, rolling the one replica that stored them back.
        def writable() -> bool:
            try:
                write_synced(path / "after", b"after")
            except OSError as exc:
                assert exc.errno == errno.EIO
                return False
            return True

        wait_until(writable, RESYNC_DEADLINE, "writes did not resume after the nodes returned")
        # The reconcile after the first node back drops a node that has not returned by then
        # from the write set; its resync brings it back.
        record = wait_in_sync(first, "quorum")
        assert len(record["write_set"]) == 3
        assert record["out_of_sync"] == []
        assert sha256_file(path / "before") == hashlib.sha256(before).hexdigest()
    finally:
        for node in (second, third):
            if node.pxd is None:
                node.start()
        release_on(first, "quorum", path)
    assert_replicas_identical([first, second, third], vol_id)
    first.call("volume.delete", "quorum")


def test_unmount_below_quorum_keeps_writes(cluster: Cluster, tmp_path: Path) -> None:
    first, second, third = cluster.nodes[:3]
    vol_id = create_volume(first, "unsynced", 3, [first, second, third])
    path = tmp_path / "mnt"
    payload = os.urandom(3 * MIB)
    try:
        mount_on(first, "unsynced", path)
        write_synced(path / "synced", b"durable")
        assert second.stop() == 0
        assert third.stop() == 0
        # Every write is durable, but closing the volume writes to a quorum, which is gone.
        with pytest.raises(errors.Unavailable, match="it stays mounted"):
            first.call("volume.unmount", "unsynced", str(path))
        assert os.path.ismount(path)

        # Without an fsync the write lands in the mount child's cache, which cannot store it.
        (path / "unsynced").write_bytes(payload)
        with pytest.raises(errors.Unavailable, match="it stays mounted"):
            first.call("volume.unmount", "unsynced", str(path))
        assert os.path.ismount(path)
        assert (path / "unsynced").read_bytes() == payload

        second.start()
        third.start()

        # The unmount works once the mount child has reconnected the two nodes.
        def unmounted() -> bool:
            try:
                first.call("volume.unmount", "unsynced", str(path))
            except errors.Unavailable:
                return False
            return True

        wait_until(unmounted, RESYNC_DEADLINE, "the unmount still failed after the nodes returned")
        assert not os.path.ismount(path)
        first.call("volume.mount", "unsynced", str(path))
        assert (path / "unsynced").read_bytes() == payload
        assert (path / "synced").read_bytes() == b"durable"
    finally:
        for node in (second, third):
            if node.pxd is None:
                node.start()
        release_on(first, "unsynced", path)
    assert_replicas_identical([first, second, third], vol_id)
    first.call("volume.delete", "unsynced")


# A replica's data file removed or truncated under a mounted volume


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_damaged_replica_gets_full_copy(cluster: Cluster, tmp_path: Path, damage: str) -> None:
    first, second, third = cluster.nodes[:3]
    name = f"damaged-{damage}"
    vol_id = create_volume(first, name, 2, [first, second])
    path = tmp_path / "mnt"
    payloads = [os.urandom(8 * MIB), os.urandom(8 * MIB)]
    try:
        mount_on(third, name, path)
        write_synced(path / "before", payloads[0])
        data_file = second.replica_dir(vol_id) / "data"
        if damage == "delete":
            data_file.unlink()
        else:
            os.truncate(data_file, 0)
        write_synced(path / "after", payloads[1])

        record = wait_in_sync(third, name)
        assert sorted(record["write_set"]) == sorted([first.node_id, second.node_id])
        state = read_runtime_state(third, name)
        index = record["replica_nodes"].index(second.node_id)
        assert parse_pairs(state["ResyncBlocks"])[index] > 0
        assert "is marked failed and gets a full copy" in third.log_text()
        assert sha256_file(path / "before") == hashlib.sha256(payloads[0]).hexdigest()
        assert sha256_file(path / "after") == hashlib.sha256(payloads[1]).hexdigest()
    finally:
        release_on(third, name, path)
    assert_replicas_identical([first, second], vol_id)
    first.call("volume.delete", name)


# Replica stores that run out of space


def _mount_tmpfs(node: ClusterNode, size_mib: int) -> Path:
    """Stop the node, put its replica store on a tmpfs of `size_mib` MiB and start it again."""
    store = node.data_dir / "replicas"
    assert node.stop() == 0
    store.mkdir(parents=True, exist_ok=True)
    assert not any(store.iterdir()), f"{store} still contains replicas"
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(store)], check=True
    )
    node.start()
    return store


def _unmount_tmpfs(node: ClusterNode, store: Path) -> None:
    if node.pxd is not None:
        node.stop()
    subprocess.run(["umount", str(store)], check=False)
    node.start()


def test_full_stores_leave_write_set_then_enospc(cluster: Cluster, tmp_path: Path) -> None:
    first, second, third = cluster.nodes[:3]
    # The small store fills first and leaves the write set. The larger one fills next, and
    # with no store left to drop the writer gets ENOSPC.
    small = _mount_tmpfs(second, 64)
    large = _mount_tmpfs(first, 128)
    vol_id = ""
    path = tmp_path / "mnt"
    try:
        vol_id = create_volume(first, "full", 2, [first, second], WRITER_VOLUME_SIZE)
        mount_on(third, "full", path)
        writer = _start_writer(path / "stream", seconds=120, max_bytes=200 * MIB)
        failed, done = _writer_outcome(writer, timeout=180)
        assert failed == errno.ENOSPC
        assert done, "the writer stored nothing"
        length = done[-1][0]
        # The small store was full long before the writer failed, and it saw no error then.
        assert length > 64 * MIB

        inspected = third.call("volume.inspect", "full")
        assert inspected["write_set"] == [first.node_id]
        assert inspected["out_of_sync"] == [second.node_id]
        with open(path / "stream", "rb") as f:
            synced = f.read(length)
        assert (
            hashlib.sha256(synced).hexdigest()
            == hashlib.sha256(_writer_payload(path / "stream", length)).hexdigest()
        )
        print(f"\nfull stores: ENOSPC after {length // MIB} MiB fsync'd")

        # The blocks of the failed write wait in the mount child, so the volume stays mounted.
        with pytest.raises(errors.NoSpace, match="it stays mounted"):
            third.call("volume.unmount", "full", str(path))
        assert os.path.ismount(path)
    finally:
        if vol_id:
            # Deleting the file drops those blocks and frees the stores, so the unmount works.
            with contextlib.suppress(OSError):
                (path / "stream").unlink()
            release_on(third, "full", path)
            first.call("volume.delete", "full")
        _unmount_tmpfs(second, small)
        _unmount_tmpfs(first, large)


# Partial writes: blocks changed in part reach the replicas as store.patch


def _overwrite_at_random(path: Path, model: bytearray, count: int, seed: int) -> None:
    """Write `count` random 4 KiB pieces into the file at `path` and into `model`, with fsyncs."""
    rng = random.Random(seed)
    fd = os.open(path, os.O_WRONLY)
    try:
        for number in range(count):
            offset = rng.randrange(0, len(model) - 4096)
            piece = rng.randbytes(rng.choice([1, 100, 4096]))
            os.pwrite(fd, piece, offset)
            model[offset : offset + len(piece)] = piece
            if number % 100 == 99:
                os.fsync(fd)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_partial_writes_survive_replica_kill(cluster: Cluster, tmp_path: Path) -> None:
    first, second, third = cluster.nodes[:3]
    vol_id = create_volume(first, "patches", 3, [first, second, third])
    path = tmp_path / "mnt"
    model = bytearray(random.Random(7).randbytes(16 * MIB))
    try:
        mount_on(first, "patches", path)
        write_synced(path / "file", bytes(model))
        _overwrite_at_random(path / "file", model, 500, seed=1)
        third.kill()
        # The write set shrinks to two, and the patches go on to them.
        _overwrite_at_random(path / "file", model, 500, seed=2)
        third.start()
        wait_in_sync(first, "patches")
        # Patches to a replica that a resync brought back start from its resynced blocks.
        _overwrite_at_random(path / "file", model, 500, seed=3)
        assert sha256_file(path / "file") == hashlib.sha256(model).hexdigest()
    finally:
        release_on(first, "patches", path)
    assert_replicas_identical([first, second, third], vol_id)
    # A new mount child reads the blocks back from the replicas, checking their crc32.
    assert_file_reads(second, "patches", path, "file", hashlib.sha256(model).hexdigest())
    first.call("volume.delete", "patches")


def _overwrite_until(path: Path, model: bytearray, stop: threading.Event, seed: int) -> int:
    """Overwrite random pieces as _overwrite_at_random does until `stop`, at most 60 s.

    Returns the number of rounds of 100 writes.
    """
    deadline = time.monotonic() + 60
    rounds = 0
    while not stop.is_set() and time.monotonic() < deadline:
        _overwrite_at_random(path, model, 100, seed=seed * 100_000 + rounds)
        rounds += 1
    return rounds


def test_replica_kill_during_partial_writes(cluster: Cluster, tmp_path: Path) -> None:
    first, second, third = cluster.nodes[:3]
    vol_id = create_volume(first, "patches-live", 3, [first, second, third])
    path = tmp_path / "mnt"
    model = bytearray(random.Random(11).randbytes(16 * MIB))
    stop = threading.Event()
    try:
        mount_on(first, "patches-live", path)
        write_synced(path / "file", bytes(model))
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            # The kill lands while patches are in flight to the third replica.
            writing = pool.submit(_overwrite_until, path / "file", model, stop, 1)
            time.sleep(1)
            third.kill()
            time.sleep(1)
            stop.set()
            assert writing.result(timeout=120) >= 2
        third.start()
        stop.clear()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            # The resync copies blocks while patches reach the third replica again.
            writing = pool.submit(_overwrite_until, path / "file", model, stop, 2)
            try:
                wait_in_sync(first, "patches-live")
            finally:
                stop.set()
            writing.result(timeout=120)
        assert sha256_file(path / "file") == hashlib.sha256(model).hexdigest()
    finally:
        stop.set()
        release_on(first, "patches-live", path)
    assert_replicas_identical([first, second, third], vol_id)
    assert_file_reads(third, "patches-live", path, "file", hashlib.sha256(model).hexdigest())
    first.call("volume.delete", "patches-live")
