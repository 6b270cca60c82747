"""pxctl's argument parser: the verbs, their options and help texts, and the argument checks."""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from pxfs import errors, units
from pxfs.clicommands import (
    cluster_list,
    host_attach,
    host_detach,
    host_mount,
    host_unmount,
    node_status,
    volume_check,
    volume_create,
    volume_delete,
    volume_ha_update,
    volume_inspect,
    volume_list,
    volume_scrub,
    volume_stats,
    volume_update,
    volume_verify,
)

SOCKET_ENV = "PXFS_SOCKET"
MAX_HA_LEVEL = 3
#: Default seconds between two lines of `volume stats`. The window of volume.stats_live is
#: 2 s, so consecutive lines overlap by a second.
DEFAULT_INTERVAL = 1.0
MIN_INTERVAL = 0.1
MAX_INTERVAL = 3600.0

_STATS_DESCRIPTION = """\
Print the I/O of a volume over the last 2 seconds, one line per interval. SVC TIME is the mean
service time inside pxfs, (read_ms + write_ms) / (reads + writes): the time from the start of
the mount child's read or write handler to its reply. The time that a request waits in the
kernel, in /dev/fuse and in the FUSE dispatch is not counted, so the latency that an
application sees (fio's lat) is higher, and the gap grows with the queue depth. IO DEPTH counts
the requests inside those handlers at the moment of the sample, not the requests that the
kernel has queued.
"""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one `pxctl: ...` line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        """Print the usage error as one line and exit with InvalidArgument's exit code."""
        print(f"pxctl: {message} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(errors.InvalidArgument.exit_code)


# --- Argument types -----------------------------------------------------------------------------


def parse_text(text: str) -> str:
    """Parse a volume name or id, or a filter value, that must be valid UTF-8."""
    # Python decodes a non-UTF-8 argument with surrogateescape, and the lone surrogates in the
    # result have no UTF-8 form to send to pxd.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"invalid argument {text!r}: not valid UTF-8") from None
    return text


def parse_path(text: str) -> str:
    """Parse the PATH of host mount and unmount: a non-empty path in valid UTF-8."""
    # os.path.abspath("") is the working directory, so an empty PATH would mount there.
    if not text:
        raise argparse.ArgumentTypeError("invalid path '': expected a directory")
    return parse_text(text)


def parse_name_option(text: str) -> str:
    """Parse the NAME of a new volume by the volume name rules of pxfs.units."""
    try:
        return units.validate_name(text)
    except errors.InvalidArgument as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def parse_size_option(text: str) -> int:
    """Parse --size: a number of GiB, or a size with a suffix such as 512M or 2T."""
    try:
        return units.parse_size(text)
    except errors.InvalidArgument as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def parse_repl_option(text: str) -> int:
    """Parse --repl: the number of replicas, 1 to 3."""
    # str.isdigit alone accepts other scripts' digits, such as the Arabic-Indic one.
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_HA_LEVEL:
        raise argparse.ArgumentTypeError(
            f"invalid replica count {text!r}: expected 1 to {MAX_HA_LEVEL}"
        )
    return int(text)


def parse_interval_option(text: str) -> float:
    """Parse --interval: seconds between two lines of `volume stats`, 0.1 to 3600."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    # The comparison is False for NaN, so NaN is rejected with the other bad values.
    if not MIN_INTERVAL <= seconds <= MAX_INTERVAL:
        raise argparse.ArgumentTypeError(
            f"invalid interval {text!r}: expected {MIN_INTERVAL:g} to {MAX_INTERVAL:g} seconds"
        )
    return seconds


def parse_count_option(text: str) -> int:
    """Parse --count: a positive number of lines."""
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: expected a positive integer")
    return int(text)


def parse_nodes_option(text: str) -> list[str]:
    """Parse --nodes: comma-separated node ids or IPs."""
    nodes = [node.strip() for node in parse_text(text).split(",")]
    if not all(nodes):
        raise argparse.ArgumentTypeError(
            f"invalid node list {text!r}: expected node ids or IPs separated by commas"
        )
    return nodes


def parse_labels(text: str) -> dict[str, str]:
    """Parse --label: comma-separated KEY=VALUE pairs."""
    labels: dict[str, str] = {}
    for pair in parse_text(text).split(","):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"invalid label {pair!r}: expected KEY=VALUE")
        if key.strip() in labels:
            raise argparse.ArgumentTypeError(f"duplicate label key {key.strip()!r}")
        labels[key.strip()] = value.strip()
    return labels


# --- Parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Build the pxctl command-line parser."""
    parser = _Parser(prog="pxctl", description="Manage the pxfs volumes of this node.")
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help=f"pxd's control socket (default: ${SOCKET_ENV}, else /run/pxfs/pxd.sock)",
    )
    _add_json(parser, default=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_volume_commands(commands)
    _add_host_commands(commands)
    _add_node_commands(commands)
    return parser


def _add_json(parser: argparse.ArgumentParser, default: Any = argparse.SUPPRESS) -> None:
    # Subcommands suppress the default, so that `pxctl -j volume list` keeps the global flag.
    parser.add_argument(
        "-j", "--json", action="store_true", default=default, help="print JSON instead of text"
    )


def _add_volume_commands(commands: Any) -> None:
    volume = commands.add_parser("volume", aliases=["v"], help="create, list and manage volumes")
    verbs = volume.add_subparsers(dest="verb", metavar="VERB", required=True)
    # `pxctl volume --help` lists the verbs in the order that they are added.
    _add_volume_create_command(verbs)
    _add_volume_listing_commands(verbs)
    delete = verbs.add_parser("delete", aliases=["d"], help="delete a detached volume")
    delete.add_argument("ref", metavar="NAME|ID", type=parse_text, help="volume name or id")
    delete.set_defaults(func=volume_delete)
    _add_volume_check_commands(verbs)
    _add_volume_update_commands(verbs)
    _add_volume_stats_command(verbs)


def _add_volume_create_command(verbs: Any) -> None:
    create = verbs.add_parser("create", aliases=["c"], help="create a volume")
    create.add_argument(
        "name", metavar="NAME", type=parse_name_option, help="name of the new volume"
    )
    create.add_argument(
        "--size",
        type=parse_size_option,
        default=units.parse_size("1"),
        help="size in GiB, or with a suffix such as 512M or 2T (default: 1)",
    )
    create.add_argument(
        "--repl", type=parse_repl_option, default=1, help="number of replicas, 1 to 3 (default: 1)"
    )
    create.add_argument(
        "--label",
        type=parse_labels,
        action="append",
        metavar="KEY=VALUE,...",
        help="labels to set, comma-separated; may be repeated",
    )
    create.add_argument(
        "--nodes",
        type=parse_nodes_option,
        metavar="ID,...",
        help="node ids or IPs to place the replicas on, one per replica (default: pxd chooses)",
    )
    _add_json(create)
    create.set_defaults(func=volume_create)


def _add_volume_listing_commands(verbs: Any) -> None:
    listing = verbs.add_parser("list", aliases=["l"], help="list the volumes")
    listing.add_argument("--name", type=parse_text, help="list only the volume of this name")
    listing.add_argument(
        "--label",
        type=parse_labels,
        metavar="KEY=VALUE,...",
        help="list only volumes with these labels",
    )
    _add_json(listing)
    listing.set_defaults(func=volume_list)

    inspect = verbs.add_parser("inspect", aliases=["i"], help="show the details of volumes")
    inspect.add_argument(
        "refs", nargs="+", metavar="NAME|ID", type=parse_text, help="volume names or ids"
    )
    _add_json(inspect)
    inspect.set_defaults(func=volume_inspect)


def _add_volume_check_commands(verbs: Any) -> None:
    check = verbs.add_parser(
        "check", help="check the filesystem of a detached volume; exit 0 only when clean"
    )
    check.add_argument("ref", metavar="NAME|ID", type=parse_text, help="volume name or id")
    _add_json(check)
    check.set_defaults(func=volume_check)

    verify = verbs.add_parser(
        "verify",
        help="compare the replicas of a volume block by block; exit 0 only when identical",
    )
    verify.add_argument("ref", metavar="NAME|ID", type=parse_text, help="volume name or id")
    verify.add_argument(
        "--check-data",
        action="store_true",
        help="also read every written block and check it against its checksum",
    )
    _add_json(verify)
    verify.set_defaults(func=volume_verify)

    scrub = verbs.add_parser(
        "scrub",
        help="check every block copy of a volume and repair bad copies from good replicas",
    )
    scrub.add_argument("ref", metavar="NAME|ID", type=parse_text, help="volume name or id")
    _add_json(scrub)
    scrub.set_defaults(func=volume_scrub)


def _add_volume_update_commands(verbs: Any) -> None:
    update = verbs.add_parser("update", help="resize a volume or change its labels")
    update.add_argument("ref", metavar="NAME|ID", type=parse_text, help="volume name or id")
    update.add_argument(
        "--size",
        type=parse_size_option,
        help="new size in GiB, or with a suffix such as 512M or 2T; volumes only grow",
    )
    update.add_argument(
        "--label",
        type=parse_labels,
        action="append",
        metavar="KEY=VALUE,...",
        help="labels to set, comma-separated; KEY= removes a label; may be repeated",
    )
    _add_json(update)
    update.set_defaults(func=volume_update)

    ha_update = verbs.add_parser("ha-update", help="change the number of replicas of a volume")
    ha_update.add_argument("ref", metavar="NAME|ID", type=parse_text, help="volume name or id")
    ha_update.add_argument(
        "--repl", type=parse_repl_option, required=True, help="new number of replicas, 1 to 3"
    )
    ha_update.add_argument(
        "--nodes",
        type=parse_nodes_option,
        metavar="ID,...",
        help="node ids or IPs for the new replicas, one per replica added (default: pxd chooses)",
    )
    ha_update.set_defaults(func=volume_ha_update)


def _add_volume_stats_command(verbs: Any) -> None:
    stats = verbs.add_parser(
        "stats",
        help="show the I/O of a volume, one line per interval",
        description=_STATS_DESCRIPTION,
    )
    stats.add_argument("ref", metavar="NAME|ID", type=parse_text, help="volume name or id")
    stats.add_argument(
        "--interval",
        type=parse_interval_option,
        default=DEFAULT_INTERVAL,
        metavar="SECONDS",
        help=f"seconds between two lines (default: {DEFAULT_INTERVAL:g})",
    )
    stats.add_argument(
        "--count",
        type=parse_count_option,
        metavar="N",
        help="stop after N lines (default: run until interrupted)",
    )
    _add_json(stats)
    stats.set_defaults(func=volume_stats)


def _add_host_commands(commands: Any) -> None:
    host = commands.add_parser("host", help="attach, detach, mount and unmount volumes here")
    verbs = host.add_subparsers(dest="verb", metavar="VERB", required=True)

    attach = verbs.add_parser("attach", help="attach a volume on this node")
    attach.add_argument("ref", metavar="NAME|ID", type=parse_text, help="volume name or id")
    attach.set_defaults(func=host_attach)

    detach = verbs.add_parser("detach", help="detach an unmounted volume from this node")
    detach.add_argument("ref", metavar="NAME|ID", type=parse_text, help="volume name or id")
    detach.set_defaults(func=host_detach)

    mount = verbs.add_parser("mount", help="mount an attached volume at an empty directory")
    mount.add_argument("ref", metavar="NAME|ID", type=parse_text, help="volume name or id")
    mount.add_argument(
        "path", metavar="PATH", type=parse_path, help="existing empty directory to mount on"
    )
    mount.set_defaults(func=host_mount)

    unmount = verbs.add_parser("unmount", help="unmount a volume from a directory")
    unmount.add_argument("ref", metavar="NAME|ID", type=parse_text, help="volume name or id")
    unmount.add_argument(
        "path", metavar="PATH", type=parse_path, help="directory the volume is mounted on"
    )
    unmount.set_defaults(func=host_unmount)


def _add_node_commands(commands: Any) -> None:
    cluster = commands.add_parser("cluster", help="show the nodes of the cluster")
    cluster_verbs = cluster.add_subparsers(dest="verb", metavar="VERB", required=True)
    cluster_list_parser = cluster_verbs.add_parser(
        "list", aliases=["l"], help="list the nodes of the cluster"
    )
    _add_json(cluster_list_parser)
    cluster_list_parser.set_defaults(func=cluster_list)

    status = commands.add_parser("status", help="show the status of this node")
    _add_json(status)
    status.set_defaults(func=node_status)
