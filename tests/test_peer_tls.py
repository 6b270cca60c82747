"""Mutual TLS between real pxd processes: a two-node cluster with `ssl = true` on one etcd.

Each node has a certificate of the cluster's CA (made with the openssl command). The tests check
that an ha 2 volume replicates between the nodes, from a mount child on either, and that the
peer port rejects a plain client and a client whose certificate another CA signed.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from clusterproc import (
    REPO,
    Cluster,
    ClusterNode,
    mount_on,
    release_on,
    sha256_file,
    wait_until,
    write_secret,
)
from etcdproc import start_etcd
from tlscerts import Ca, make_ca, make_node_cert

from pxfs import errors
from pxfs.frames import CHALLENGE, RESPONSE, encode_frame
from pxfs.rpc import RpcClient, read_secret
from pxfs.tls import PeerTls, TlsFiles

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for FUSE mounts")

MIB = 1 << 20


class TlsNode(ClusterNode):
    """A cluster node whose pxd.toml turns on TLS with the given files."""

    def __init__(self, root: Path, ip: str, etcd_endpoint: str, secret_file: Path, tls: TlsFiles):
        super().__init__(root, ip, etcd_endpoint, secret_file)
        self.tls = tls

    def write_config(self) -> None:
        """Write the cluster configuration and the TLS keys after it."""
        super().write_config()
        with open(self.config_file, "a") as config:
            config.write(
                f'ssl = true\nssl_cert = "{self.tls.cert}"\nssl_key = "{self.tls.key}"\n'
                f'ssl_ca = "{self.tls.ca}"\n'
            )


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Ca:
    return make_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, ca: Ca) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("tls")
    cluster = Cluster(root, 2)
    try:
        cluster.etcd = start_etcd(root / "etcd")
        write_secret(cluster.secret_file)
        for index in range(2):
            ip, name = f"127.0.0.{index + 2}", f"node{index + 1}"
            tls = make_node_cert(ca, root / name / "tls", name, ip)
            node = TlsNode(root / name, ip, cluster.etcd.endpoint, cluster.secret_file, tls)
            cluster.nodes.append(node)
            node.start()
        yield cluster
    finally:
        cluster.stop()


def _open_fds(node: ClusterNode) -> int:
    assert node.pxd is not None
    return len(os.listdir(f"/proc/{node.pxd.pid}/fd"))


def _wait_for_fds(node: ClusterNode, expected: int) -> None:
    wait_until(
        lambda: _open_fds(node) <= expected, 20, f"pxd to close its descriptors ({expected})"
    )


def _wait_for_log(node: ClusterNode, text: str) -> None:
    wait_until(lambda: text in node.log_text(), 10, f"pxd did not log {text!r}")


def _write_synced(path: Path, payload: bytes) -> None:
    with open(path, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())


def test_peer_port_serves_tls_only(cluster: Cluster) -> None:
    node = cluster.nodes[0]
    assert f"peer rpc listening on {node.ip}:{node.peer_port} with TLS" in node.log_text()


def test_ha2_volume_replicates_over_tls(cluster: Cluster, tmp_path: Path) -> None:
    first, second = cluster.nodes
    spec = {"name": "tls-ha2", "size": 64 * MIB, "ha_level": 2, "labels": {},
            "nodes": [first.node_id, second.node_id]}  # fmt: skip
    vol_id = first.call("volume.create", spec)["id"]
    payloads = {"from-first": os.urandom(3 * MIB + 17), "from-second": os.urandom(2 * MIB + 5)}
    path = tmp_path / "mnt"
    try:
        # A mount child on each node in turn, so each one writes to the other over TLS.
        for node, name in ((first, "from-first"), (second, "from-second")):
            mount_on(node, "tls-ha2", path)
            (child,) = node.child_pids()
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            assert b"--ssl-cert" in cmdline
            _write_synced(path / name, payloads[name])
            record = node.call("volume.inspect", "tls-ha2")
            assert sorted(record["write_set"]) == sorted([first.node_id, second.node_id])
            assert record["runtime_state"]["RuntimeState"] == "clean"
            release_on(node, "tls-ha2", path)
        mount_on(first, "tls-ha2", path)
        for name, payload in payloads.items():
            assert (path / name).read_bytes() == payload
        release_on(first, "tls-ha2", path)
    finally:
        with contextlib.suppress(errors.PxfsError):
            release_on(first, "tls-ha2", path)
    tables = [(node.replica_dir(vol_id) / "table").read_bytes() for node in cluster.nodes]
    assert tables[0] == tables[1]
    data = [sha256_file(node.replica_dir(vol_id) / "data") for node in cluster.nodes]
    assert data[0] == data[1]
    first.call("volume.delete", "tls-ha2")


def _exchange(node: ClusterNode, payload: bytes) -> bytes:
    """Send `payload` to the peer port, then read until the server closes the connection."""
    with socket.create_connection((node.ip, node.peer_port), timeout=15) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_plain_client_refused(cluster: Cluster) -> None:
    node = cluster.nodes[0]
    node.call("node.status")
    start = _open_fds(node)
    secret = read_secret(cluster.secret_file)
    attempts = [
        encode_frame([RESPONSE, b"x" * 32]),
        encode_frame([0, 1, "store.info", ["1"]]),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"",
    ]
    for attempt in attempts:
        received = _exchange(node, attempt)
        # The RPC layer never saw these bytes: it would have sent a CHALLENGE first.
        assert encode_frame([CHALLENGE, b""])[:5] not in received, attempt
    _wait_for_log(node, "peer rpc: rejected a TLS connection from")

    async def plain_rpc_client() -> None:
        await RpcClient.connect_tcp(node.ip, node.peer_port, secret)

    # Both sides wait for the other's first message until their handshake timeouts, and the
    # server's, which started first, usually ends it.
    began = time.monotonic()
    with pytest.raises((errors.AuthenticationFailed, errors.Unavailable)):
        trio.run(plain_rpc_client)
    assert time.monotonic() - began < 15
    _wait_for_fds(node, start)
    assert node.call("node.status")["status"] == "up"


def test_client_of_another_ca_refused(cluster: Cluster, tmp_path: Path, ca: Ca) -> None:
    # The other node than the plain client test's: each reason of a rejection is logged once per
    # 10 s, so that test's rejections could hide this one's.
    node = cluster.nodes[1]
    node.call("node.status")
    start = _open_fds(node)
    secret = read_secret(cluster.secret_file)
    other = make_ca(tmp_path / "other", "another CA")
    stranger = PeerTls.load(make_node_cert(other, tmp_path / "stranger", "x", "127.0.0.9")).client
    # The stranger trusts the cluster's CA, so only the node's check of its certificate fails.
    stranger.load_verify_locations(cafile=ca.cert)
    member = PeerTls.load(make_node_cert(ca, tmp_path / "member", "m", "127.0.0.9")).client

    async def call(context: object, secret: bytes) -> object:
        client = await RpcClient.connect_tcp(node.ip, node.peer_port, secret, ssl_context=context)
        try:
            return await client.call("store.info", "12345")
        finally:
            await client.aclose()

    with pytest.raises(errors.AuthenticationFailed):
        trio.run(call, stranger, secret)
    _wait_for_log(node, "rejected a TLS connection from 127.0.0.1")
    assert "CERTIFICATE_VERIFY_FAILED" in node.log_text()
    # The CA's certificate passes TLS, and the secret is still checked inside it.
    with pytest.raises(errors.AuthenticationFailed):
        trio.run(call, member, b"not the secret")
    _wait_for_log(node, "failed the handshake")
    with pytest.raises(errors.NotFound):
        trio.run(call, member, secret)
    _wait_for_fds(node, start)


@pytest.mark.parametrize("broken", ["missing", "garbage", "mismatched key"])
def test_bad_cert_files_stop_pxd(tmp_path: Path, ca: Ca, broken: str) -> None:
    files = make_node_cert(ca, tmp_path / "tls", "n", "127.0.0.1")
    if broken == "missing":
        files.cert.unlink()
        expected = f"pxd: ssl_cert file {files.cert} does not exist"
    elif broken == "garbage":
        bad_ca = tmp_path / "bad-ca.pem"
        bad_ca.write_text("not a certificate\n")
        files = TlsFiles(files.cert, files.key, bad_ca)
        expected = f"pxd: ssl_ca {bad_ca} contains no PEM certificate"
    else:
        other = make_node_cert(ca, tmp_path / "other", "o", "127.0.0.1")
        files = TlsFiles(files.cert, other.key, files.ca)
        expected = f"pxd: ssl_key {other.key} is not the private key of ssl_cert {files.cert}"
    config = tmp_path / "pxd.toml"
    config.write_text(
        f'ssl = true\nssl_cert = "{files.cert}"\nssl_key = "{files.key}"\nssl_ca = "{files.ca}"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "daemon.pxd", "--config", str(config),
         "--data-dir", str(tmp_path / "data"), "--socket", str(tmp_path / "run" / "pxd.sock")],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(expected), result.stderr
