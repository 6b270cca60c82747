"""A stalled peer costs only the volumes that use it: real pxd processes on one real etcd.

Two kinds of stalled peer: a replica pxd stopped with SIGSTOP, and a fake node whose address is
a TCP proxy (opened by the test on 127.0.0.5) that stops reading, as a hung host or a black-holed
link would. In both, one volume mounted on the first node has the stalled peer in its write set
and a second volume on the same node does not. The stalled volume must drop the peer after the
replication timeout (pxfs.replication.DEFAULT_TIMEOUT) plus DROP_MARGIN, and the second
volume's fsync'd writes must keep completing within WRITE_BOUND all along. The dropping itself
after a SIGSTOP, and the resync that follows, are tested in test_cluster_faults.py; these tests
add the second volume and the fake peer. Run with `-s` to see the latencies measured.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from clusterproc import Cluster, ClusterNode, mount_on, release_on, wait_until

from pxfs import errors
from pxfs.mountdevice import CONNECT_TIMEOUT
from pxfs.replication import DEFAULT_TIMEOUT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for FUSE mounts")

MIB = 1 << 20
CHUNK = 256 * 1024
#: Bytes of a file that a writer cycles over, so that no run fills the volume.
REGION = 32 * MIB
#: Seconds that a write and fsync of CHUNK on the volume without the stalled peer may take. A
#: write that waits on the stalled peer takes DEFAULT_TIMEOUT (5 s) or more. This bound is half
#: of it, so a loaded 2-CPU machine still passes while a volume that waits fails.
WRITE_BOUND = DEFAULT_TIMEOUT / 2
#: Seconds beyond DEFAULT_TIMEOUT by which the stalled volume must write again.
DROP_MARGIN = 4.0
#: Seconds measured before the stall, and the stall's length. The stall outlasts the deadline
#: of the drop, so a volume that only writes again once the stall ends fails.
BASELINE_SECONDS = 2.0
STALL_SECONDS = DEFAULT_TIMEOUT + DROP_MARGIN + 1.0
FAKE_IP = "127.0.0.5"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("stall"), 3)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _create(node: ClusterNode, name: str, node_ids: list[str]) -> str:
    spec = {"name": name, "size": 128 * MIB, "ha_level": 2, "labels": {}, "nodes": node_ids}
    return str(node.call("volume.create", spec)["id"])


class Writer:
    """A thread that writes CHUNK and fsyncs it in a loop for `seconds`, timing each write."""

    def __init__(self, path: Path, seconds: float) -> None:
        self.path = path
        self.seconds = seconds
        #: (time.monotonic() when the write began, seconds it took with its fsync).
        self.writes: list[tuple[float, float]] = []
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Writer:
        """Start the thread; return self."""
        self._thread.start()
        return self

    def join(self) -> Writer:
        """Wait for the thread, at most its run time plus a minute; return self."""
        self._thread.join(self.seconds + 60)
        assert not self._thread.is_alive(), f"the writer of {self.path} hung"
        assert self.error is None, f"writing {self.path} failed: {self.error}"
        return self

    def _run(self) -> None:
        payload = os.urandom(CHUNK)
        deadline = time.monotonic() + self.seconds
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            offset = 0
            while time.monotonic() < deadline:
                began = time.monotonic()
                os.pwrite(fd, payload, offset)
                os.fsync(fd)
                self.writes.append((began, time.monotonic() - began))
                offset = (offset + CHUNK) % REGION
        except OSError as exc:
            self.error = exc
        finally:
            os.close(fd)

    def rate(self) -> float:
        """MiB/s written over the writer's run time."""
        return len(self.writes) * CHUNK / MIB / self.seconds

    def resumed_after(self, moment: float) -> float:
        """Seconds from `moment` to the end of the first write that began after it."""
        ends = [began + took for began, took in self.writes if began > moment]
        assert ends, f"no write to {self.path} began after the stall"
        return ends[0] - moment


def _stall_and_measure(
    stalled_path: Path,
    other_path: Path,
    stall: Callable[[], None],
    unstall: Callable[[], None],
    while_stalled: Callable[[], None],
) -> tuple[float, list[tuple[float, float]]]:
    """Write to both volumes, stall the peer for STALL_SECONDS and print what was measured.

    `while_stalled` runs at the end of the stall. Returns the seconds until the stalled volume
    wrote again and the other volume's writes during the stall.
    """
    baseline = Writer(other_path / "baseline", BASELINE_SECONDS).start().join()
    stalled = Writer(stalled_path / "stream", 1 + STALL_SECONDS + DEFAULT_TIMEOUT).start()
    other = Writer(other_path / "during", 1 + STALL_SECONDS).start()
    time.sleep(1.0)
    stalled_at = time.monotonic()
    stall()
    try:
        other.join()
        while_stalled()
    finally:
        unstall()
    stalled.join()
    during = [write for write in other.writes if write[0] >= stalled_at]
    resumed = stalled.resumed_after(stalled_at)
    worst = max((took for _, took in during), default=0.0)
    print(
        f"\nthe other volume wrote {baseline.rate():.1f} MiB/s before the stall and "
        f"{len(during) * CHUNK / MIB / STALL_SECONDS:.1f} MiB/s during it, its slowest "
        f"write+fsync took {worst * 1000:.0f} ms; the stalled volume wrote again "
        f"{resumed:.2f} s after the stall began"
    )
    return resumed, during


def _assert_unaffected(during: list[tuple[float, float]]) -> None:
    assert len(during) >= 5, f"only {len(during)} writes completed during the stall"
    slow = [round(took, 2) for _, took in during if took > WRITE_BOUND]
    assert not slow, f"writes to the other volume took {slow} s during the stall"


def _assert_dropped_in_time(resumed: float) -> None:
    # The write in flight when the stall began was sent a few milliseconds before it, so the
    # drop can come slightly less than DEFAULT_TIMEOUT after the stall.
    assert DEFAULT_TIMEOUT - 1.5 < resumed < DEFAULT_TIMEOUT + DROP_MARGIN


def _release_all(node: ClusterNode, mounts: dict[str, Path]) -> None:
    for name, path in mounts.items():
        with contextlib.suppress(errors.PxfsError):
            release_on(node, name, path)


def _delete(node: ClusterNode, name: str) -> None:
    """Delete `name`, retrying while a replica node is still offline after a stall."""

    def deleted() -> bool:
        try:
            node.call("volume.delete", name)
        except errors.Unavailable:
            return False
        return True

    wait_until(deleted, 60, f"volume {name} could not be deleted")


# A replica pxd stopped with SIGSTOP


def test_sigstopped_replica_spares_other_volume(cluster: Cluster, tmp_path: Path) -> None:
    first, second, third = cluster.nodes[:3]
    _create(first, "stop-hung", [first.node_id, second.node_id])
    _create(first, "stop-other", [first.node_id, third.node_id])
    mounts = {"stop-hung": tmp_path / "hung", "stop-other": tmp_path / "other"}
    try:
        for name, path in mounts.items():
            mount_on(first, name, path)
        records: dict[str, Any] = {}

        def inspect() -> None:
            records.update({name: first.call("volume.inspect", name) for name in mounts})

        resumed, during = _stall_and_measure(
            mounts["stop-hung"], mounts["stop-other"], second.pause, second.resume, inspect
        )
        _assert_unaffected(during)
        _assert_dropped_in_time(resumed)
        assert records["stop-hung"]["write_set"] == [first.node_id]
        assert records["stop-hung"]["out_of_sync"] == [second.node_id]
        other_set = records["stop-other"]["write_set"]
        assert sorted(other_set) == sorted([first.node_id, third.node_id])
    finally:
        second.resume()
        _release_all(first, mounts)
    _delete(first, "stop-hung")
    _delete(first, "stop-other")


# A fake peer behind a proxy that stops reading


class StallingProxy:
    """A TCP proxy on `ip` to `target`. stall() makes it stop reading from its clients.

    While stalled it still accepts connections, and never reads them either, like a host whose
    kernel takes connections while its daemon hangs. Every thread stops at close().
    """

    def __init__(self, ip: str, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server((ip, 0))
        host, port = self.listener.getsockname()[:2]
        self.address = f"{host}:{port}"
        self.stalled = threading.Event()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def stall(self) -> None:
        """Stop reading from every client, now and for new connections."""
        self.stalled.set()

    def unstall(self) -> None:
        """Forward again; connections made while stalled stay unread."""
        self.stalled.clear()

    def close(self) -> None:
        """Close every socket and wait for the threads."""
        self._closed.set()
        # The accept thread first: it is the one that adds threads to the list.
        self._threads[0].join(10)
        for thread in self._threads[1:]:
            thread.join(10)
        self.listener.close()
        for sock in self._sockets:
            sock.close()

    def _ready(self, sock: socket.socket) -> bool:
        return bool(select.select([sock], [], [], 0.2)[0])

    def _accept(self) -> None:
        while not self._closed.is_set():
            if not self._ready(self.listener):
                continue
            client, _ = self.listener.accept()
            self._sockets.append(client)
            if self.stalled.is_set():
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self._sockets.append(upstream)
            for source, sink, stallable in ((client, upstream, True), (upstream, client, False)):
                thread = threading.Thread(
                    target=self._pump, args=(source, sink, stallable), daemon=True
                )
                self._threads.append(thread)
                thread.start()

    def _pump(self, source: socket.socket, sink: socket.socket, stallable: bool) -> None:
        with contextlib.suppress(OSError):
            while not self._closed.is_set():
                if stallable and self.stalled.is_set():
                    time.sleep(0.1)
                    continue
                if not self._ready(source):
                    continue
                data = source.recv(1 << 16)
                if not data:
                    break
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def _etcd_post(endpoint: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(f"{endpoint}{path}", data=json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=10) as reply:
        result: dict[str, Any] = json.loads(reply.read())
    return result


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@contextlib.contextmanager
def fake_node(endpoint: str, peer_address: str) -> Iterator[str]:
    """Register a node that publishes `peer_address`, online under a lease; yield its id."""
    node_id = f"fake-{uuid.uuid4()}"
    record = {"id": node_id, "hostname": "fake", "ip": FAKE_IP, "peer_address": peer_address,
              "status": "up", "free_bytes": 1 << 40, "capacity_bytes": 1 << 40}  # fmt: skip
    # The TTL outlasts the test; the lease is revoked at the end.
    lease = _etcd_post(endpoint, "/v3/lease/grant", {"TTL": 600})["ID"]
    _etcd_post(
        endpoint, "/v3/kv/put",
        {"key": _b64(f"/pxfs/default/nodes/{node_id}"), "value": _b64(json.dumps(record))},
    )  # fmt: skip
    _etcd_post(
        endpoint, "/v3/kv/put",
        {"key": _b64(f"/pxfs/default/alive/{node_id}"), "value": "", "lease": lease},
    )  # fmt: skip
    try:
        yield node_id
    finally:
        _etcd_post(endpoint, "/v3/lease/revoke", {"ID": lease})
        _etcd_post(endpoint, "/v3/kv/deleterange", {"key": _b64(f"/pxfs/default/nodes/{node_id}")})


def test_unread_fake_peer_spares_other_volume(cluster: Cluster, tmp_path: Path) -> None:
    first, second, third = cluster.nodes[:3]
    assert cluster.etcd is not None
    # The fake node's replica lives in the third node's store, reached through the proxy.
    proxy = StallingProxy(FAKE_IP, (third.ip, third.peer_port))
    mounts = {"fake-stalled": tmp_path / "stalled", "fake-other": tmp_path / "other"}
    try:
        with fake_node(cluster.etcd.endpoint, proxy.address) as fake_id:
            _create(first, "fake-stalled", [first.node_id, fake_id])
            _create(first, "fake-other", [first.node_id, second.node_id])
            try:
                for name, path in mounts.items():
                    mount_on(first, name, path)
                assert len(first.call("volume.inspect", "fake-stalled")["write_set"]) == 2
                resumed, during = _stall_and_measure(
                    mounts["fake-stalled"], mounts["fake-other"], proxy.stall, lambda: None,
                    lambda: None,
                )  # fmt: skip
                _assert_unaffected(during)
                _assert_dropped_in_time(resumed)
                stalled = first.call("volume.inspect", "fake-stalled")
                assert stalled["write_set"] == [first.node_id]
                assert stalled["out_of_sync"] == [fake_id]
                other_set = first.call("volume.inspect", "fake-other")["write_set"]
                assert sorted(other_set) == sorted([first.node_id, second.node_id])

                # A mount while the peer accepts but never reads gives up on it after
                # CONNECT_TIMEOUT and mounts degraded.
                release_on(first, "fake-stalled", mounts["fake-stalled"])
                began = time.monotonic()
                mount_on(first, "fake-stalled", mounts["fake-stalled"])
                took = time.monotonic() - began
                print(f"mount with the unread peer took {took:.2f} s")
                assert took < CONNECT_TIMEOUT + DROP_MARGIN
                Writer(mounts["fake-stalled"] / "after", 1.0).start().join()
            finally:
                _release_all(first, mounts)
                proxy.unstall()
            _delete(first, "fake-stalled")
            _delete(first, "fake-other")
    finally:
        proxy.close()
