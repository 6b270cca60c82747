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
handlers, `mount.sync` makes every write so far durable, `mount.grow(size)` grows the mounted
volume online, and `mount.runtime_state` returns the replication client's runtime state.
`mount.add_replica` and `mount.remove_replica` change the replica set of a volume mounted with
replica ids, for a change of its ha level.

The mount uses allow_other and default_permissions (fuseops.MOUNT_OPTIONS), and FUSE's own
defaults nosuid and nodev: device nodes on a volume can be created but not opened.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pyfuse3
import trio

from pxfs.cachesize import fit_cache_to_memory
from pxfs.cgroups import find_cgroup_memory
from pxfs.errors import Corrupted, InvalidArgument, NotFound, PxfsError
from pxfs.fuseops import MOUNT_OPTIONS, POLLER, DroppedReplyFilter, Operations
from pxfs.mountcontrol import start_control
from pxfs.mountdevice import Replicas, open_device
from pxfs.stats import IoMeter
from pxfs.volume.check import check_volume
from pxfs.volume.device import BlockDevice
from pxfs.volume.journal import read_superblock
from pxfs.volume.namespace import Volume

log = logging.getLogger(__name__)

#: Seconds to wait for the kernel to let go of a detached mount before stopping anyway.
UNMOUNT_GRACE = 10.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line of the mount child."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    return args


def _build_parser() -> argparse.ArgumentParser:
    # The order of the add_argument calls is the order of the options in --help.
    parser = argparse.ArgumentParser(prog="python -m daemon.mount", description=__doc__)
    parser.add_argument("--mountpoint", help="directory to mount the volume on")
    _add_source_options(parser)
    _add_replica_options(parser)
    _add_size_options(parser)
    parser.add_argument(
        "--control-socket",
        metavar="PATH",
        help="unix socket on which to serve pxd's mount.stats and mount.grow (needs --secret-file)",
    )
    _add_tls_options(parser)
    parser.add_argument("--check", action="store_true", help="check the volume, mount nothing")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return parser


def _add_source_options(parser: argparse.ArgumentParser) -> None:
    """Add --device-file and --peer-socket, the two sources of blocks, and what the socket needs."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--device-file", help="sparse file that stores the volume's blocks")
    source.add_argument("--peer-socket", help="unix socket of the replica store of pxd")
    parser.add_argument("--secret-file", help="cluster secret for --peer-socket")
    parser.add_argument("--volume-id", help="volume id for --peer-socket")
    parser.add_argument("--epoch", type=int, help="attach epoch for --peer-socket")


def _add_replica_options(parser: argparse.ArgumentParser) -> None:
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


def _add_size_options(parser: argparse.ArgumentParser) -> None:
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


def _add_tls_options(parser: argparse.ArgumentParser) -> None:
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


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with a usage error for the combinations of options that argparse cannot express."""
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
        async with open_device(args) as (device, replicas):
            if args.check:
                return await _check(device)
            if args.format_size is not None:
                await _format_if_blank(device, args.format_size)
            await _serve(device, replicas, args, signals)
    return 0


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
    replicas: Replicas | None,
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
                await start_control(nursery, volume, meter, device, replicas, args)
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
