"""The mount child: one process per mounted volume, serving it over FUSE.

    python -m daemon.mount --mountpoint PATH --device-file FILE [--format-size BYTES]
    python -m daemon.mount --mountpoint PATH --peer-socket SOCK --secret-file F \\
        --volume-id ID --epoch N [--replica ADDR ...] [--size BYTES] [--control-socket SOCK]
    python -m daemon.mount (--device-file FILE | --peer-socket ...) --check

The child prints `ready` on stdout once the FUSE mount is live. On SIGTERM or SIGINT it detaches
the mount (lazily, so a busy mount goes too), serves the requests the kernel still sends while it
writes back, closes the volume and exits 0. `--check` mounts nothing: it prints one problem per
line and exits 0 only when the volume is consistent.

Each `--replica` is one replica of the volume, in read order: `local` is the replica store
behind --peer-socket, and HOST:PORT the peer RPC of another node, over TCP with the same
cluster secret. Without `--replica` the volume has its one replica behind --peer-socket. The
number of replicas is the volume's ha level, which sets the write quorum of the replication
client.

`--size` grows a volume whose superblock is smaller to that many bytes when it opens. With
`--control-socket` the child serves pxd's calls on that unix socket (mode 0600, behind the
cluster secret handshake of --secret-file): `mount.stats` returns the I/O counters of the FUSE
handlers, `mount.grow(size)` grows the mounted volume online, and `mount.runtime_state`
returns the replication client's runtime state. `mount.add_replica` and `mount.remove_replica`
change the replica set of a volume mounted with replica ids, for a change of its ha level.

The mount uses allow_other and default_permissions (fuseops.MOUNT_OPTIONS), and FUSE's own
defaults nosuid and nodev: device nodes on a volume can be created but not opened.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import socket
import ssl
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from pxfs.cachesize import fit_cache_to_memory
from pxfs.cgroups import find_cgroup_memory
from pxfs.config import parse_listen
from pxfs.errors import Busy, Corrupted, InvalidArgument, NotFound, PxfsError, Unavailable
from pxfs.fuseops import MOUNT_OPTIONS, POLLER, DroppedReplyFilter, Operations
from pxfs.replication import ReplicationClient, WriteSetCallback
from pxfs.rpc import RpcClient, RpcServer, read_secret
from pxfs.stats import IoMeter
from pxfs.tls import PeerTls, TlsFiles
from pxfs.volume.check import check_volume
from pxfs.volume.device import BlockDevice, FileDevice
from pxfs.volume.format import device_blocks
from pxfs.volume.journal import read_superblock
from pxfs.volume.namespace import Volume

log = logging.getLogger(__name__)

#: Seconds to wait for the kernel to let go of a detached mount before stopping anyway.
UNMOUNT_GRACE = 10.0
#: Seconds that connecting to one replica and passing its handshake may take.
CONNECT_TIMEOUT = 10.0
#: Seconds between two attempts to resync the replicas that are out of sync. A returning replica
#: waits up to this long before its resync starts, and an attempt at a node that is down costs
#: one refused connection, or one CONNECT_TIMEOUT when no host answers.
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line of the mount child."""
    parser = argparse.ArgumentParser(prog="python -m daemon.mount", description=__doc__)
    parser.add_argument("--mountpoint", help="directory to mount the volume on")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--device-file", help="sparse file that stores the volume's blocks")
    source.add_argument("--peer-socket", help="unix socket of the replica store of pxd")
    parser.add_argument("--secret-file", help="cluster secret for --peer-socket")
    parser.add_argument("--volume-id", help="volume id for --peer-socket")
    parser.add_argument("--epoch", type=int, help="attach epoch for --peer-socket")
    parser.add_argument(
        "--replica",
        action="append",
        metavar="[ID=]ADDR",
        help='a replica of the volume: "local" for the store behind --peer-socket, or HOST:PORT '
        "of another node's peer RPC, optionally after the node id and =; repeat it for each "
        "replica (default: local only). With ids, write set changes are reported to pxd",
    )
    parser.add_argument(
        "--out-of-sync",
        action="append",
        default=[],
        metavar="ID",
        help="id of a replica that the catalog records as out of sync: it gets no I/O",
    )
    parser.add_argument(
        "--ha-level",
        type=int,
        choices=(1, 2, 3),
        help="the volume's ha level, which sets the write quorum (default: the number of "
        "replicas, at most 3)",
    )
    parser.add_argument(
        "--format-size",
        type=int,
        metavar="BYTES",
        help="format a blank device as a volume of this many bytes (a formatted one is kept)",
    )
    parser.add_argument(
        "--size",
        type=int,
        metavar="BYTES",
        help="grow the volume to this many bytes at open if it is smaller",
    )
    parser.add_argument(
        "--control-socket",
        metavar="PATH",
        help="unix socket on which to serve pxd's mount.stats and mount.grow (needs --secret-file)",
    )
    parser.add_argument(
        "--ssl-cert",
        metavar="FILE",
        help="this node's certificate (PEM): TLS to the HOST:PORT replicas, with --ssl-key and "
        "--ssl-ca",
    )
    parser.add_argument("--ssl-key", metavar="FILE", help="the private key of --ssl-cert (PEM)")
    parser.add_argument(
        "--ssl-ca", metavar="FILE", help="the CA (PEM) that signed the certificate of every node"
    )
    parser.add_argument("--check", action="store_true", help="check the volume, mount nothing")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    args = parser.parse_args(argv)
    if args.peer_socket and None in (args.secret_file, args.volume_id, args.epoch):
        parser.error("--peer-socket needs --secret-file, --volume-id and --epoch")
    if not args.check and not args.mountpoint:
        parser.error("--mountpoint is required unless --check is given")
    if args.control_socket and not args.secret_file:
        parser.error("--control-socket needs --secret-file")
    tls_options = (args.ssl_cert, args.ssl_key, args.ssl_ca)
    if any(tls_options) and not all(tls_options):
        parser.error("--ssl-cert, --ssl-key and --ssl-ca go together")
    if args.size is not None and args.size <= 0:
        parser.error(f"--size must be a positive number of bytes, not {args.size}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the mount child; return its exit status."""
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("pyfuse3").addFilter(DroppedReplyFilter())
    try:
        return trio.run(_run, args)
    except PxfsError as exc:
        print(f"pxfs mount: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except BaseExceptionGroup as group:
        # The nursery of the volume's background tasks wraps an error of close in a group.
        first = _first_pxfs_error(group)
        if first is None:
            raise
        print(f"pxfs mount: {first.message}", file=sys.stderr)
        return first.exit_code


def _first_pxfs_error(group: BaseExceptionGroup) -> PxfsError | None:
    """Return the first PxfsError in a group, if every member is a PxfsError or a group."""
    matched, rest = group.split(PxfsError)
    if matched is None or rest is not None:
        return None
    member: BaseException = matched
    while isinstance(member, BaseExceptionGroup):
        member = member.exceptions[0]
    return member if isinstance(member, PxfsError) else None


async def _run(args: argparse.Namespace) -> int:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with _open_device(args) as (device, replicas):
            if args.check:
                return await _check(device)
            if args.format_size is not None:
                await _format_if_blank(device, args.format_size)
            await _serve(device, replicas, args, signals)
    return 0


# Devices


@dataclass
class _Replicas:
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
async def _open_device(
    args: argparse.Namespace,
) -> AsyncIterator[tuple[BlockDevice, _Replicas | None]]:
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
) -> AsyncIterator[tuple[BlockDevice, _Replicas | None]]:
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
            replicas = _Replicas(device, addresses, clients, args.peer_socket, secret, nursery)
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
        return await _open_connection(address, peer_socket, secret)
    except Unavailable as exc:
        log.warning("replica %s at %s is unreachable: %s", replica_id or address, address, exc)
        return _unreachable(address)


async def _open_connection(address: str, peer_socket: str, secret: bytes) -> RpcClient:
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
    client = await _open_connection(address, peer_socket, secret)
    try:
        return await device.resync(replica_id, client)
    except BaseException:
        # The replica stays out of sync and gets a new connection at the next attempt.
        with trio.CancelScope(shield=True):
            await client.aclose()
        raise


async def _resync_added(device: ReplicationClient, replica_id: str) -> None:
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


def _check_ha(ha_level: Any) -> int:
    if isinstance(ha_level, bool) or ha_level not in (1, 2, 3):
        raise InvalidArgument(f"invalid ha level {ha_level!r}: it must be 1, 2 or 3")
    return int(ha_level)


def _unreachable(address: str) -> RpcClient:
    """Return a client whose every call fails with Unavailable, as a lost connection does."""
    ours, theirs = socket.socketpair()
    theirs.close()
    return RpcClient(trio.SocketStream(trio.socket.from_stdlib_socket(ours)), address)


async def _format_if_blank(device: BlockDevice, size: int) -> None:
    try:
        sb = await read_superblock(device)
    except NotFound:
        await Volume.format(device, str(uuid.uuid4()), size)
        return
    if sb.size != size:
        log.info("the device already has a volume of %d bytes, ignoring --format-size", sb.size)


async def _check(device: BlockDevice) -> int:
    problems = await check_volume(device)
    for problem in problems:
        print(problem, flush=True)
    return Corrupted.exit_code if problems else 0


# Serving


@dataclass
class _Session:
    """The state shared by the FUSE loop and the signal watcher."""

    mountpoint: str
    main_done: trio.Event = field(default_factory=trio.Event)
    detached: bool = False


async def _serve(
    device: BlockDevice,
    replicas: _Replicas | None,
    args: argparse.Namespace,
    signals: AsyncIterator[int],
) -> None:
    mountpoint = args.mountpoint
    if not os.path.isdir(mountpoint):
        raise InvalidArgument(f"mountpoint {mountpoint} is not a directory")
    async with trio.open_nursery() as nursery:
        volume = await Volume.open(device, nursery=nursery)
        session = _Session(mountpoint)
        try:
            await _grow_at_open(volume, args.size)
            meter = IoMeter()
            if args.control_socket:
                await _start_control(nursery, volume, meter, device, replicas, args)
            operations = _fuse_init(volume, mountpoint, meter)
        except BaseException:
            await _shielded(volume.close)
            raise
        try:
            nursery.start_soon(_stop_on_signal, signals, session)
            cgroup = find_cgroup_memory()
            nursery.start_soon(
                functools.partial(fit_cache_to_memory, volume.block_cache, cgroup=cgroup)
            )
            print("ready", flush=True)
            log.info("volume %s mounted at %s", volume.superblock.uuid, mountpoint)
            await _serve_requests(operations)
        finally:
            session.main_done.set()
            try:
                await _shielded(volume.close)
            finally:
                pyfuse3.close(unmount=not session.detached)
        log.info("volume %s unmounted from %s", volume.superblock.uuid, mountpoint)
        nursery.cancel_scope.cancel()


async def _grow_at_open(volume: Volume, size: int | None) -> None:
    """Grow a volume whose size pxd raised while it was not mounted."""
    if size is None or size == volume.superblock.size:
        return
    if size < volume.superblock.size:
        log.warning(
            "volume %s is %d bytes, more than --size %d; keeping its size",
            volume.superblock.uuid,
            volume.superblock.size,
            size,
        )
        return
    await volume.grow(size)


# The control channel


class _Control:
    """The handlers of the control socket that pxd calls."""

    def __init__(
        self, volume: Volume, meter: IoMeter, device: BlockDevice, replicas: _Replicas | None
    ) -> None:
        self._volume = volume
        self._meter = meter
        self._device = device
        self._replicas = replicas

    def handlers(self) -> dict[str, Callable[..., Awaitable[Any]]]:
        """Return the handlers by method name."""
        return {
            "mount.stats": self.stats,
            "mount.grow": self.grow,
            "mount.runtime_state": self.runtime_state,
            "mount.resync_progress": self.resync_progress,
            "mount.add_replica": self.add_replica,
            "mount.remove_replica": self.remove_replica,
        }

    async def stats(self) -> dict[str, Any]:
        """Return the I/O counters of this process and the requests in flight."""
        return self._meter.snapshot()

    async def runtime_state(self) -> dict[str, str]:
        """Return the replication runtime state (docs/replication.md), empty for a file device."""
        if isinstance(self._device, ReplicationClient):
            return self._device.runtime_state()
        return {}

    async def resync_progress(self) -> dict[str, dict[str, int]]:
        """Return the progress of each running resync, by replica id (empty for a file device)."""
        if isinstance(self._device, ReplicationClient):
            return self._device.resync_progress()
        return {}

    async def add_replica(self, replica_id: Any, address: Any, ha_level: Any) -> dict[str, bool]:
        """Connect to a new empty replica and start its full copy; a known replica is a no-op.

        The replica joins the write set, and the volume takes `ha_level`, once the copy is done.
        Returns {"added": False} when `replica_id` is a replica already.
        """
        replicas = self._require_replicas("mount.add_replica")
        if not isinstance(replica_id, str) or not replica_id or not isinstance(address, str):
            raise InvalidArgument("mount.add_replica takes a node id, an address and an ha level")
        if replica_id in replicas.addresses:
            return {"added": False}
        client = await _open_connection(address, replicas.peer_socket, replicas.secret)
        try:
            added = replicas.device.add_replica(replica_id, client, _check_ha(ha_level))
        except BaseException:
            with trio.CancelScope(shield=True):
                await client.aclose()
            raise
        if not added:
            await client.aclose()
            return {"added": False}
        replicas.clients.append(client)
        replicas.addresses[replica_id] = address
        replicas.nursery.start_soon(_resync_added, replicas.device, replica_id)
        return {"added": True}

    async def remove_replica(self, replica_id: Any, ha_level: Any) -> dict[str, bool]:
        """Stop all I/O to a replica and drop it; returns once pxd recorded the write set."""
        replicas = self._require_replicas("mount.remove_replica")
        if not isinstance(replica_id, str):
            raise InvalidArgument("mount.remove_replica takes a node id and an ha level")
        if replica_id not in replicas.addresses:
            return {"removed": False}
        await replicas.device.remove_replica(replica_id, _check_ha(ha_level))
        del replicas.addresses[replica_id]
        return {"removed": True}

    def _require_replicas(self, method: str) -> _Replicas:
        if self._replicas is None:
            raise InvalidArgument(
                f"{method}: the volume is mounted without replica ids, so its replica set is fixed"
            )
        return self._replicas

    async def grow(self, size: Any) -> dict[str, int]:
        """Grow the volume to `size` bytes; the size it already has is a no-op."""
        if isinstance(size, bool) or not isinstance(size, int):
            raise InvalidArgument(f"mount.grow takes a size in bytes, not {size!r}")
        if size != self._volume.superblock.size:
            await self._volume.grow(size)
        return {"size": self._volume.superblock.size}


async def _start_control(
    nursery: trio.Nursery,
    volume: Volume,
    meter: IoMeter,
    device: BlockDevice,
    replicas: _Replicas | None,
    args: argparse.Namespace,
) -> None:
    """Serve the control socket before "ready", so pxd can connect as soon as it reads it."""
    server = RpcServer(
        _Control(volume, meter, device, replicas).handlers(),
        secret=read_secret(args.secret_file),
        name="mount control rpc",
    )
    await nursery.start(functools.partial(server.serve_unix, args.control_socket, mode=0o600))


def _fuse_init(volume: Volume, mountpoint: str, meter: IoMeter) -> Operations:
    operations = Operations(volume, meter, mountpoint)
    try:
        pyfuse3.init(operations, mountpoint, set(MOUNT_OPTIONS))
    except RuntimeError as exc:
        raise InvalidArgument(f"cannot mount on {mountpoint}: {exc}") from None
    return operations


async def _serve_requests(operations: Operations) -> None:
    """Run the FUSE loop with the tasks that drop stale caches and poll for requests beside it."""
    # The invalidation thread uses the FUSE session, so it must be done before pyfuse3.close:
    # cancelling waits for a running call, which ends once the mount is gone.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(operations.invalidate_stale_caches)
        nursery.start_soon(POLLER.run)
        try:
            await pyfuse3.main()
        except* ConnectionAbortedError:
            # After a lazy unmount the kernel may abort the connection when the last user of
            # the mount goes away; the read on /dev/fuse then fails with ECONNABORTED. That
            # ends the session as an unmount does, and the volume is still closed cleanly.
            log.info("the kernel closed the FUSE connection")
        nursery.cancel_scope.cancel()


async def _shielded(step: Callable[[], Awaitable[None]]) -> None:
    with trio.CancelScope(shield=True):
        await step()


async def _stop_on_signal(signals: AsyncIterator[int], session: _Session) -> None:
    async for signum in signals:
        log.info("signal %d received, unmounting %s", signum, session.mountpoint)
        session.detached = await _detach(session.mountpoint)
        with trio.move_on_after(UNMOUNT_GRACE):
            await session.main_done.wait()
        if not session.main_done.is_set():
            log.warning(
                "%s is still in use %g s after the unmount; stopping anyway",
                session.mountpoint,
                UNMOUNT_GRACE,
            )
            pyfuse3.terminate()
        return


async def _detach(mountpoint: str) -> bool:
    """Lazily unmount while the FUSE loop still serves the writes the kernel flushes."""
    result = await trio.run_process(
        ["fusermount3", "-u", "-z", mountpoint],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    if result.returncode != 0:
        log.warning(
            "fusermount3 -u -z %s failed: %s",
            mountpoint,
            result.stderr.decode(errors="replace").strip(),
        )
        pyfuse3.terminate()
        return False
    return True
