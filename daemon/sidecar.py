"""pxd-sidecar: serve the openstorage REST API and the Docker volume plugin of this node.

Under systemd (Type=notify) it sends READY=1 once the REST port and the plugin socket listen.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from pxfs import errors, sdnotify
from pxfs.api import app, auth, docker
from pxfs.api.server import ConnectionLimits
from pxfs.config import load_config

log = logging.getLogger(__name__)

#: Exit status for a configuration file that cannot be used, the same as pxd's.
CONFIG_ERROR_EXIT = 1
#: The sidecar's state directory under pxd's data_dir, so that moving data_dir moves it too.
STATE_SUBDIR = "sidecar"

_DESCRIPTION = """\
Serve the openstorage volume REST API (the routes under /v1/osd-volumes) on HOST:PORT and
Docker's volume plugin protocol (driver pxd) on a unix socket. Every request becomes a call to
pxd on its control socket, so the sidecar may start before pxd and returns 503 until pxd is up.
The only state it keeps is which containers use each Docker volume, in --state-dir, which
defaults to the directory sidecar under data_dir of the configuration, next to pxd's own data.
A REST address that is not loopback needs a bearer token file; with one, every REST request
needs "Authorization: Bearer TOKEN". SIGINT or SIGTERM stops it (exit 0). Defaults come from
the pxd configuration file; flags override it. A configuration file or token file that cannot be
used exits 1, as pxd does for its configuration.
"""

# journald reads a "<N>" prefix on each line of a service's stderr as the syslog priority.
_JOURNAL_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser of pxd-sidecar."""
    parser = argparse.ArgumentParser(prog="pxd-sidecar", description=_DESCRIPTION)
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="pxd configuration file to read the defaults from (default: /etc/pxfs/pxd.toml "
        "when it exists)",
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help="pxd's control socket, the unix socket that the sidecar calls "
        "(default: control_socket of the configuration, /run/pxfs/pxd.sock)",
    )
    parser.add_argument(
        "--rest",
        metavar="HOST:PORT",
        type=parse_address,
        help="address and TCP port of the REST API (default: rest_host:rest_port of the "
        "configuration, 127.0.0.1:9001); use [ADDRESS]:PORT for IPv6",
    )
    parser.add_argument(
        "--rest-token-file",
        metavar="FILE",
        type=Path,
        help="file of mode 0600 that contains the REST API's bearer token; required when the "
        "REST address is not loopback (default: rest_token_file of the configuration, none)",
    )
    parser.add_argument(
        "--plugin-socket",
        metavar="PATH",
        help="unix socket for Docker's volume plugin protocol, created with mode 0600 "
        "(default: plugin_socket of the configuration, /run/docker/plugins/pxd.sock, where "
        "dockerd looks for a plugin named pxd)",
    )
    parser.add_argument(
        "--docker-mount-base",
        metavar="DIR",
        help="directory under which Docker volumes are mounted, at DIR/NAME; created with mode "
        "0700 (default: docker_mount_base of the configuration, /var/lib/osd/mounts)",
    )
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        help=f"directory of {docker.REFS_FILE}, the containers that use each Docker volume; "
        f"created with mode 0700 at the first Mount (default: DATA_DIR/{STATE_SUBDIR}, with "
        "data_dir of the configuration, /var/lib/pxfs)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request (DEBUG)")
    return parser


def parse_address(text: str) -> tuple[str, int]:
    """Parse HOST:PORT or [IPV6]:PORT into a host and a port number."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"invalid address {text!r}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise argparse.ArgumentTypeError(
            f"invalid port in {text!r}: expected a number from 1 to 65535"
        )
    return host, int(port_text)


def setup_logging(verbose: bool) -> None:
    """Log to stderr, with journald priority prefixes when systemd's journal reads stderr."""
    handler = logging.StreamHandler()
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = _JOURNAL_PRIORITY.get(record.levelno, 6)
        return f"<{priority}>" + super().format(record)


def resolve_settings(args: argparse.Namespace) -> app.SidecarSettings:
    """Merge the flags over the configuration file."""
    config = load_config(args.config)
    host, port = args.rest if args.rest else (config.rest_host, config.rest_port)
    token_file = args.rest_token_file or config.rest_token_file
    return app.SidecarSettings(
        control_socket=args.socket or str(config.control_socket),
        host=host,
        port=port,
        plugin_socket=args.plugin_socket or str(config.plugin_socket),
        mount_base=os.path.abspath(args.docker_mount_base or config.docker_mount_base),
        state_dir=os.path.abspath(args.state_dir or config.data_dir / STATE_SUBDIR),
        token=auth.rest_token(host, token_file),
        rest_limits=ConnectionLimits(
            config.rest_max_connections, config.rest_max_connections_per_client
        ),
        max_requests=config.rest_max_requests,
        plugin_limits=ConnectionLimits(config.plugin_max_connections),
        plugin_mode=config.socket_mode,
        plugin_group=config.socket_gid(),
    )


def main(argv: list[str] | None = None) -> int:
    """Run pxd-sidecar and return its exit code."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        settings = resolve_settings(args)
    except errors.PxfsError as exc:
        # pxd exits 1 for the same configuration file, so both units fail alike. A token file
        # that cannot be used is part of the configuration too.
        print(f"pxd-sidecar: {exc.message}", file=sys.stderr)
        return CONFIG_ERROR_EXIT
    try:
        notifier = sdnotify.Notifier.from_environment()
        return asyncio.run(app.run_sidecar(settings, notify=notifier.notify))
    except errors.PxfsError as exc:
        print(f"pxd-sidecar: {exc.message}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
