"""The mount child's block device: a device file, or a replication client over the replicas.

Each replica is reached over pxd's peer socket (`local`) or over TCP to another node's peer RPC.
While a volume mounted with --replica is open, a background task resyncs the out-of-sync replicas
that it can reach and reconnects the write-set replicas whose connection was lost.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from pxfs.config import parse_listen
from pxfs.errors import Busy, InvalidArgument, PxfsError, Unavailable
from pxfs.replication import ReplicationClient, WriteSetCallback
from pxfs.rpc import RpcClient, read_secret
from pxfs.tls import PeerTls, TlsFiles
from pxfs.volume.device import BlockDevice, FileDevice
from pxfs.volume.format import device_blocks

log = logging.getLogger(__name__)

#: Seconds that connecting to one replica and passing its handshake may take.
CONNECT_TIMEOUT = 10.0
#: Seconds between two attempts to resync the replicas that are out of sync. A returning replica
#: waits up to this long before its resync starts, and an attempt at a node that is down costs
#: one refused connection, or one CONNECT_TIMEOUT when no host responds.
RESYNC_INTERVAL = 1.0
#: Seconds between two attempts to reconnect the write-set replicas whose connection was lost.
#: The first one back lets a reconcile run, which drops from the write set every replica still
#: unreachable then. The longer interval gives nodes that restart together the time to return
#: together.
RECONNECT_INTERVAL = 5.0
#: The TLS client context for the replicas on other nodes, set from --ssl-cert, --ssl-key and
#: --ssl-ca at open. It is one process-wide setting because a child serves a single volume and
#: every TCP connection it opens is to a replica of it.
_peer_tls: ssl.SSLContext | None = None


@dataclass
class Replicas:
    """The replication client of a volume mounted with replica ids, and how to reach each."""

    device: ReplicationClient
    #: The --replica address of each replica, by id; shared with the periodic resync.
    addresses: dict[str, str]
    #: Every connection opened for the client; closed when the volume is closed.
    clients: list[RpcClient]
    peer_socket: str
    secret: bytes
    nursery: trio.Nursery


@asynccontextmanager
async def open_device(
    args: argparse.Namespace,
) -> AsyncIterator[tuple[BlockDevice, Replicas | None]]:
    """Open the block device that the command line names, and close it on exit.

    Yields the device with its Replicas, or with None unless the volume has replica ids.
    """
    if args.device_file:
        device = _open_file_device(args.device_file, args.format_size)
        try:
            yield device, None
        finally:
            device.close()
        return
    async with _open_replication(args) as opened:
        yield opened


def _open_file_device(path: str, format_size: int | None) -> FileDevice:
    if format_size is not None and not os.path.exists(path):
        return FileDevice.open(path, create_blocks=device_blocks(format_size))
    return FileDevice.open(path)


@asynccontextmanager
async def _open_replication(
    args: argparse.Namespace,
) -> AsyncIterator[tuple[BlockDevice, Replicas | None]]:
    global _peer_tls
    secret = read_secret(args.secret_file)
    if args.ssl_cert:
        files = TlsFiles(Path(args.ssl_cert), Path(args.ssl_key), Path(args.ssl_ca))
        _peer_tls = PeerTls.load(files).client
    specs = [_parse_replica(spec) for spec in args.replica or ["local"]]
    ids = [replica_id or address for replica_id, address in specs]
    # pxd records the write set by node id, so only a command line with the ids reports it.
    reporting = bool(args.replica) and all(replica_id for replica_id, _ in specs)
    unknown = set(args.out_of_sync) - set(ids)
    if unknown:
        raise InvalidArgument(f"--out-of-sync names no replica: {', '.join(sorted(unknown))}")
    clients: list[RpcClient] = []
    try:
        for replica_id, address in specs:
            clients.append(await _connect_replica(replica_id, address, args.peer_socket, secret))
        in_sync = [c for i, c in zip(ids, clients, strict=True) if i not in args.out_of_sync]
        device = ReplicationClient(
            args.volume_id,
            args.epoch,
            await _nblocks(args.volume_id, in_sync),
            clients,
            ha_level=args.ha_level or min(len(clients), 3),
            replica_ids=ids,
            out_of_sync=args.out_of_sync,
            on_write_set_change=_write_set_reporter(args, secret) if reporting else None,
        )
        await device.open()
        if not args.replica:
            yield device, None
            return
        addresses = {
            replica_id: address for replica_id, (_, address) in zip(ids, specs, strict=True)
        }
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_resync_periodically, device, addresses, args.peer_socket, secret)
            replicas = Replicas(device, addresses, clients, args.peer_socket, secret, nursery)
            try:
                yield device, replicas if reporting else None
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            for client in clients:
                await client.aclose()


def _parse_replica(spec: str) -> tuple[str, str]:
    """Split a --replica value into the node id (empty when not given) and the address."""
    replica_id, equals, address = spec.rpartition("=")
    if equals and not replica_id:
        raise InvalidArgument(f"invalid --replica {spec!r}: the node id before = is empty")
    return replica_id, address


async def _nblocks(vol_id: str, clients: list[RpcClient]) -> int:
    """Return the volume's size in blocks, read from the first in-sync replica that responds."""
    failures = []
    for client in clients:
        try:
            info = await client.call("store.info", vol_id)
        except PxfsError as exc:
            failures.append(f"{client.description}: {exc.message}")
            continue
        return int(info["nblocks"])
    raise Unavailable(
        f"volume {vol_id}: store.info failed on every in-sync replica: {'; '.join(failures)}"
    )


def _write_set_reporter(args: argparse.Namespace, secret: bytes) -> WriteSetCallback:
    """Return the callback that records the write set in the catalog through pxd."""

    async def report(write_set: list[str], out_of_sync: list[str]) -> None:
        client = await RpcClient.connect_unix(args.peer_socket, secret)
        try:
            await client.call(
                "volume.report_write_set", args.volume_id, args.epoch, write_set, out_of_sync
            )
        finally:
            with trio.CancelScope(shield=True):
                await client.aclose()

    return report


async def _connect_replica(
    replica_id: str, address: str, peer_socket: str, secret: bytes
) -> RpcClient:
    """Connect to one --replica: "local" over the unix peer socket, else HOST:PORT over TCP.

    A replica that cannot be reached gets a connection that fails every call, so that the
    replication client drops it from the write set at open and the volume mounts degraded.
    """
    try:
        return await open_connection(address, peer_socket, secret)
    except Unavailable as exc:
        log.warning("replica %s at %s is unreachable: %s", replica_id or address, address, exc)
        return _unreachable(address)


async def open_connection(address: str, peer_socket: str, secret: bytes) -> RpcClient:
    """Open an authenticated peer RPC connection to `address`; raises Unavailable."""
    if address == "local":
        host, port = "", 0
    else:
        try:
            host, port = parse_listen(address, 9002)
        except InvalidArgument:
            raise InvalidArgument(
                f"invalid --replica {address!r}: expected local or HOST:PORT"
            ) from None
    with trio.move_on_after(CONNECT_TIMEOUT):
        if address == "local":
            return await RpcClient.connect_unix(peer_socket, secret)
        return await RpcClient.connect_tcp(host, port, secret, ssl_context=_peer_tls)
    raise Unavailable(f"connecting to {address} timed out after {CONNECT_TIMEOUT} s")


async def _resync_periodically(
    device: ReplicationClient, addresses: dict[str, str], peer_socket: str, secret: bytes
) -> None:
    """Bring every out-of-sync replica that can be reached back into the write set."""
    # Attempts that failed in a row, by replica: only the first one is a warning, so a node
    # that stays down does not flood the log.
    failures: dict[str, int] = {}
    next_reconnect = trio.current_time() + RECONNECT_INTERVAL
    while True:
        await trio.sleep(RESYNC_INTERVAL)
        returning = device.out_of_sync
        if trio.current_time() >= next_reconnect:
            next_reconnect = trio.current_time() + RECONNECT_INTERVAL
            # A write-set replica whose connection was lost is reconnected too: a write below
            # the quorum keeps it in the write set, and its reconcile needs that replica back.
            # The probe finds the connections lost while the volume was idle.
            await device.probe_write_set()
            returning += device.disconnected
        for replica_id in returning:
            if replica_id not in addresses:
                # Dropped by mount.remove_replica while this loop waited.
                continue
            if device.resyncing(replica_id):
                # A resync runs already, such as the copy to a replica just added. Another one
                # would raise Busy after opening a connection for nothing.
                continue
            try:
                copied = await _resync_one(
                    device, replica_id, addresses[replica_id], peer_socket, secret
                )
            except Busy:
                continue
            except PxfsError as exc:
                failures[replica_id] = failures.get(replica_id, 0) + 1
                level = logging.WARNING if failures[replica_id] == 1 else logging.DEBUG
                log.log(level, "resync of replica %s failed: %s", replica_id, exc.message)
                await _drop_if_unreachable(device, replica_id, exc)
                continue
            failures.pop(replica_id, None)
            log.info("replica %s is in the write set again; %d blocks copied", replica_id, copied)


async def _drop_if_unreachable(device: ReplicationClient, replica_id: str, exc: PxfsError) -> None:
    """Drop a write-set replica that could not be reconnected, so the volume shows degraded."""
    if replica_id not in device.disconnected:
        return
    try:
        await device.drop_unreachable(replica_id, exc)
    except PxfsError as report_error:
        # pxd did not record the change; the next write or attempt reports it again.
        log.warning(
            "recording that replica %s left the write set failed: %s",
            replica_id,
            report_error.message,
        )


async def _resync_one(
    device: ReplicationClient, replica_id: str, address: str, peer_socket: str, secret: bytes
) -> int:
    client = await open_connection(address, peer_socket, secret)
    try:
        return await device.resync(replica_id, client)
    except BaseException:
        # The replica stays out of sync and gets a new connection at the next attempt.
        with trio.CancelScope(shield=True):
            await client.aclose()
        raise


async def resync_added(device: ReplicationClient, replica_id: str) -> None:
    """Start the full copy of a replica just added; the periodic resync retries a failure."""
    try:
        copied = await device.resync(replica_id)
    except Busy:
        return
    except PxfsError as exc:
        log.warning(
            "copy to the new replica %s failed, retrying later: %s", replica_id, exc.message
        )
        return
    log.info("new replica %s is in the write set; %d blocks copied", replica_id, copied)


def _unreachable(address: str) -> RpcClient:
    """Return a client whose every call fails with Unavailable, as a lost connection does."""
    ours, theirs = socket.socketpair()
    theirs.close()
    return RpcClient(trio.SocketStream(trio.socket.from_stdlib_socket(ours)), address)
