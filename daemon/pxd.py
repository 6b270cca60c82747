"""pxd, the pxfs node daemon: `pxd --data-dir DIR --socket PATH [--etcd URL,... --listen H:P]`.

Logs go to stderr. SIGINT and SIGTERM unmount every volume (the next start mounts them again),
close the sockets and exit 0. A failure to start prints "pxd: <reason>" and exits 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from pxfs.config import CONFIG_FILE, Config, load_config, parse_endpoints, parse_listen
from pxfs.errors import PxfsError
from pxfs.node import Node
from pxfs.sdnotify import Notifier

log = logging.getLogger("pxd")

# Priorities of sd-daemon(3), which journald reads from the start of each line.
_JOURNAL_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"<{_JOURNAL_PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line of pxd."""
    parser = argparse.ArgumentParser(
        prog="pxd",
        description="The pxfs node daemon: replica store, volume catalog and FUSE mounts.",
    )
    parser.add_argument(
        "--data-dir", type=Path, metavar="DIR",
        help="directory for the replicas, the catalog, the node id and the cluster secret "
        "(default /var/lib/pxfs)",
    )  # fmt: skip
    parser.add_argument(
        "--socket", type=Path, metavar="PATH",
        help="unix socket of the control RPC, used by pxctl and the sidecar "
        "(default /run/pxfs/pxd.sock)",
    )  # fmt: skip
    parser.add_argument(
        "--peer-socket", type=Path, metavar="PATH",
        help="unix socket of the peer RPC, used by mount children "
        "(default peer.sock in the directory of --socket)",
    )  # fmt: skip
    parser.add_argument(
        "--etcd", metavar="URL[,URL...]",
        help="client URLs of the etcd that stores the cluster catalog; without it the catalog "
        "is DIR/catalog.json and the node is a cluster of its own",
    )  # fmt: skip
    parser.add_argument(
        "--listen", metavar="HOST:PORT",
        help="address of the peer RPC over TCP, served with --etcd only "
        "(default node_ip and peer_port of the configuration, 127.0.0.1:9002)",
    )  # fmt: skip
    parser.add_argument(
        "--secret-file", type=Path, metavar="FILE",
        help="the cluster secret, the same file on every node (default DIR/cluster.secret, "
        "created if missing)",
    )  # fmt: skip
    parser.add_argument(
        "--config", type=Path, metavar="FILE",
        help=f"TOML configuration file; flags override its keys (default {CONFIG_FILE}, "
        "read only if it exists)",
    )  # fmt: skip
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"],
        help="lowest level of the messages written to stderr (default info)",
    )  # fmt: skip
    return parser.parse_args(argv)


def _stderr_is_journal() -> bool:
    # systemd sets JOURNAL_STREAM to "device:inode" of the stream it connected to the journal.
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        info = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{info.st_dev}:{info.st_ino}"


def setup_logging(level: str) -> None:
    """Log to stderr, with journald priority prefixes when stderr is the journal."""
    handler = logging.StreamHandler(sys.stderr)
    if _stderr_is_journal():
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # httpx logs every request to etcd at INFO, and the lease and status refreshes send one
    # every few seconds.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def build_config(args: argparse.Namespace) -> Config:
    """Read the configuration file and apply the command-line flags over it."""
    config = load_config(args.config)
    if args.listen is not None:
        parse_listen(args.listen, config.peer_port)
    return config.replace(
        data_dir=args.data_dir,
        control_socket=args.socket,
        peer_socket=args.peer_socket,
        etcd_endpoints=parse_endpoints(args.etcd) if args.etcd is not None else None,
        listen=args.listen,
    )


async def _stop_on_signal(node: Node, signals: AsyncIterator[int], notifier: Notifier) -> None:
    async for signum in signals:
        if node.stopping:
            log.info("received %s again; pxd is already stopping", signal.Signals(signum).name)
            continue
        log.info("received %s; stopping", signal.Signals(signum).name)
        notifier.stopping("unmounting volumes")
        node.stop()


async def serve(config: Config, secret_file: Path | None = None) -> None:
    """Run the node until SIGINT or SIGTERM, then stop it.

    Under systemd (Type=notify) pxd sends READY=1 once both sockets listen and the volumes of
    the last run are mounted again, and STOPPING=1 when a signal starts the shutdown.
    """
    node = Node(config, secret_file=secret_file)
    notifier = Notifier.from_environment()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, node, signals, notifier)
            async with trio.open_nursery() as node_nursery:
                await node_nursery.start(node.run)
                # A signal during start-up has already sent STOPPING=1, and a READY=1 after
                # it would make systemd consider the service started again.
                if not node.stopping:
                    notifier.ready(f"serving {config.control_socket}")
            nursery.cancel_scope.cancel()


def _startup_failure(exc: BaseException) -> str | None:
    """Return the message for an expected failure, or None for a bug that needs its traceback."""
    if isinstance(exc, PxfsError):
        return exc.message
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}"
    if isinstance(exc, BaseExceptionGroup):
        messages = [_startup_failure(inner) for inner in exc.exceptions]
        if messages and all(message is not None for message in messages):
            return "; ".join(message for message in messages if message is not None)
    return None


def main(argv: list[str] | None = None) -> int:
    """Run pxd; return its exit status."""
    args = parse_args(argv)
    setup_logging(args.log_level)
    try:
        config = build_config(args)
        trio.run(serve, config, args.secret_file)
    except (PxfsError, OSError, BaseExceptionGroup) as exc:
        message = _startup_failure(exc)
        if message is None:
            raise
        print(f"pxd: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
