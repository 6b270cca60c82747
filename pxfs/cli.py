"""pxctl: the operator's command-line tool, with Portworx-style verbs, calling the local pxd.

pxctl talks to pxd over its control socket: --socket, else $PXFS_SOCKET, else
/run/pxfs/pxd.sock. A failure prints one line `pxctl: <message>` on stderr and exits with the
exit code of the error's class in pxfs.errors (9 when pxd is not running).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from pxfs import errors, units
from pxfs.api import osd
from pxfs.api.osd import volume_to_osd
from pxfs.cliformat import (
    format_rfc3339,
    inspect_lines,
    list_row,
    node_row,
    print_json,
    print_table,
    scrub_lines,
    stats_header,
    stats_line,
    status_lines,
    verify_lines,
)
from pxfs.config import Config
from pxfs.rpc import BlockingClient

SOCKET_ENV = "PXFS_SOCKET"
MAX_HA_LEVEL = 3
#: Exit code of `volume check` when the check found problems.
CHECK_FAILED_EXIT = errors.Corrupted.exit_code
#: Exit code of `volume verify` when the replicas differ, and of `volume scrub` when a block
#: has no good copy left.
VERIFY_FAILED_EXIT = 1
#: Seconds that `volume verify` and `volume scrub` wait for pxd: they read every replica.
SCRUB_TIMEOUT = 86400.0
#: Default seconds between two lines of `volume stats`. The window of volume.stats_live is
#: 2 s, so consecutive lines overlap by a second.
DEFAULT_INTERVAL = 1.0
MIN_INTERVAL = 0.1
MAX_INTERVAL = 3600.0

Command = Callable[[BlockingClient, argparse.Namespace], int]

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


# --- Volume commands ----------------------------------------------------------------------------


def volume_create(client: BlockingClient, args: argparse.Namespace) -> int:
    """Create a volume and print its id."""
    labels: dict[str, str] = {}
    for group in args.label or []:
        duplicates = sorted(set(labels) & set(group))
        if duplicates:
            raise errors.InvalidArgument(f"duplicate label key {duplicates[0]!r}")
        labels.update(group)
    request = {"name": args.name, "size": args.size, "ha_level": args.repl, "labels": labels}
    if args.nodes:
        request["nodes"] = osd.node_ids_from_ips(client.call("cluster.nodes"), args.nodes)
    record = client.call("volume.create", request)
    if args.json:
        print_json(volume_to_osd(record, _node_id(client)))
    else:
        print(f"Volume successfully created: {record['id']}")
    return 0


def volume_list(client: BlockingClient, args: argparse.Namespace) -> int:
    """Print the volumes as a table, or as the REST API's JSON list."""
    filters: dict[str, Any] = {}
    if args.name:
        filters["name"] = args.name
    if args.label:
        filters["labels"] = args.label
    records = client.call("volume.list", filters)
    if args.json:
        node_id = _node_id(client)
        print_json([volume_to_osd(record, node_id) for record in records])
        return 0
    header = ["ID", "NAME", "SIZE", "HA", "SHARED", "ENCRYPTED", "IO_PRIORITY", "STATUS"]
    rows = [list_row(record) for record in records]
    print_table(header, rows)
    return 0


def volume_inspect(client: BlockingClient, args: argparse.Namespace) -> int:
    """Print each volume's details as aligned text, or as the REST API's JSON list."""
    records = [client.call("volume.inspect", ref) for ref in args.refs]
    if args.json:
        node_id = _node_id(client)
        print_json([volume_to_osd(record, node_id) for record in records])
        return 0
    node_id = _node_id(client)
    for index, record in enumerate(records):
        if index:
            print()
        stats = client.call("volume.stats", record["id"], True)
        print("\n".join(inspect_lines(record, stats, node_id)))
    return 0


def volume_update(client: BlockingClient, args: argparse.Namespace) -> int:
    """Resize a volume or change its labels."""
    changes: dict[str, Any] = {}
    if args.size is not None:
        changes["size"] = args.size
    if args.label:
        changes["labels"] = _updated_labels(client, args.ref, args.label)
    if not changes:
        raise errors.InvalidArgument("volume update needs --size or --label")
    record = client.call("volume.update", args.ref, changes)
    if args.json:
        print_json(volume_to_osd(record, _node_id(client)))
    else:
        print(f"Update Volume: Volume update successful for volume {args.ref}")
    return 0


def _updated_labels(
    client: BlockingClient, ref: str, groups: list[dict[str, str]]
) -> dict[str, str]:
    """Merge --label groups into the volume's labels; an empty value removes the label."""
    # NOTE: volume.update replaces the whole label map, so labels set by another client between
    # this inspect and the update are lost.
    labels = dict(client.call("volume.inspect", ref).get("labels") or {})
    for group in groups:
        for key, value in group.items():
            if value:
                labels[key] = value
            else:
                labels.pop(key, None)
    return labels


def volume_ha_update(client: BlockingClient, args: argparse.Namespace) -> int:
    """Change the number of replicas of a volume."""
    current = int(client.call("volume.inspect", args.ref)["ha_level"])
    if current == args.repl:
        print(f"Volume {args.ref} already has {current} replica(s)")
        return 0
    changes: dict[str, Any] = {"ha_level": args.repl}
    if args.nodes:
        changes["nodes"] = osd.node_ids_from_ips(client.call("cluster.nodes"), args.nodes)
    client.call("volume.update", args.ref, changes)
    print(
        f"Update Volume Replication: Replication update started successfully for volume {args.ref}"
    )
    return 0


def volume_stats(client: BlockingClient, args: argparse.Namespace) -> int:
    """Print the I/O of the last 2 seconds of a volume, one line per interval."""
    # The first sample comes before the header, so an unknown volume prints only the error.
    stats = client.call("volume.stats_live", args.ref)
    if not args.json:
        print(stats_header())
    sample = 0
    while args.count is None or sample < args.count:
        if sample:
            time.sleep(args.interval)
            stats = client.call("volume.stats_live", args.ref)
        now = time.time()
        if args.json:
            print(json.dumps({"time": format_rfc3339(now), **stats}, sort_keys=True), flush=True)
        else:
            print(stats_line(stats, now), flush=True)
        sample += 1
    return 0


def volume_delete(client: BlockingClient, args: argparse.Namespace) -> int:
    """Delete a volume."""
    client.call("volume.delete", args.ref)
    print(f"Volume {args.ref} successfully deleted")
    return 0


def volume_check(client: BlockingClient, args: argparse.Namespace) -> int:
    """Check a detached volume's filesystem; exit 0 only when it is clean."""
    result = client.call("volume.check", args.ref)
    clean = bool(result.get("clean"))
    problems = [str(problem) for problem in result.get("problems") or []]
    if args.json:
        print_json({"clean": clean, "problems": problems})
    elif clean and not problems:
        print(f"Volume {args.ref} is clean")
    else:
        print(f"Volume {args.ref} has {len(problems)} problem(s):")
        for problem in problems:
            print(f"  {problem}")
    return 0 if clean and not problems else CHECK_FAILED_EXIT


def volume_verify(client: BlockingClient, args: argparse.Namespace) -> int:
    """Compare the replicas of a volume block by block; exit 0 only when they are identical."""
    client.timeout = SCRUB_TIMEOUT
    result = client.call("volume.verify", args.ref, args.check_data)
    if args.json:
        print_json(result)
    else:
        for line in verify_lines(args.ref, result):
            print(line)
    return 0 if result.get("identical") else VERIFY_FAILED_EXIT


def volume_scrub(client: BlockingClient, args: argparse.Namespace) -> int:
    """Check every block copy of a volume and repair bad ones; exit 0 unless a block is lost."""
    client.timeout = SCRUB_TIMEOUT
    result = client.call("volume.scrub", args.ref)
    if args.json:
        print_json(result)
    else:
        for line in scrub_lines(args.ref, result):
            print(line)
    return 0 if not result.get("lost_blocks") else VERIFY_FAILED_EXIT


# --- Host commands ------------------------------------------------------------------------------


def host_attach(client: BlockingClient, args: argparse.Namespace) -> int:
    """Attach a volume on this node."""
    record = client.call("volume.attach", args.ref)
    print(f"Volume {args.ref} successfully attached on node {record.get('attached_on', '')}")
    return 0


def host_detach(client: BlockingClient, args: argparse.Namespace) -> int:
    """Detach a volume from this node."""
    client.call("volume.detach", args.ref)
    print(f"Volume {args.ref} successfully detached")
    return 0


def host_mount(client: BlockingClient, args: argparse.Namespace) -> int:
    """Mount an attached volume at a directory of this host."""
    # pxd resolves paths in its own working directory, so a relative path is made absolute here.
    path = os.path.abspath(args.path)
    client.call("volume.mount", args.ref, path)
    print(f"Volume {args.ref} successfully mounted at {path}")
    return 0


def host_unmount(client: BlockingClient, args: argparse.Namespace) -> int:
    """Unmount a volume from a directory of this host."""
    path = os.path.abspath(args.path)
    client.call("volume.unmount", args.ref, path)
    print(f"Volume {args.ref} successfully unmounted from {path}")
    return 0


def cluster_list(client: BlockingClient, args: argparse.Namespace) -> int:
    """Print the nodes of the cluster as a table."""
    nodes = client.call("cluster.nodes")
    if args.json:
        print_json(nodes)
        return 0
    header = ["ID", "HOSTNAME", "IP", "CAPACITY", "USED", "FREE", "VOLUMES", "VERSION", "STATUS"]
    print_table(header, [node_row(node) for node in nodes])
    return 0


def node_status(client: BlockingClient, args: argparse.Namespace) -> int:
    """Print the status of this node."""
    status = client.call("node.status")
    if args.json:
        print_json(status)
    else:
        print("\n".join(status_lines(status)))
    return 0


def _node_id(client: BlockingClient) -> str:
    return str(client.call("node.status")["node_id"])


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
    return parser


def _add_json(parser: argparse.ArgumentParser, default: Any = argparse.SUPPRESS) -> None:
    # Subcommands suppress the default, so that `pxctl -j volume list` keeps the global flag.
    parser.add_argument(
        "-j", "--json", action="store_true", default=default, help="print JSON instead of text"
    )


def _add_volume_commands(commands: Any) -> None:
    volume = commands.add_parser("volume", aliases=["v"], help="create, list and manage volumes")
    verbs = volume.add_subparsers(dest="verb", metavar="VERB", required=True)

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

    delete = verbs.add_parser("delete", aliases=["d"], help="delete a detached volume")
    delete.add_argument("ref", metavar="NAME|ID", type=parse_text, help="volume name or id")
    delete.set_defaults(func=volume_delete)

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
    _add_volume_update_commands(verbs)


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


def socket_path(args: argparse.Namespace) -> str:
    """Return the control socket to use: --socket, else $PXFS_SOCKET, else the default."""
    return args.socket or os.environ.get(SOCKET_ENV) or str(Config().control_socket)


def main(argv: Sequence[str] | None = None) -> int:
    """Run pxctl and return its exit code."""
    args = build_parser().parse_args(argv)
    command: Command = args.func
    try:
        with BlockingClient(socket_path(args)) as client:
            return command(client, args)
    except errors.PxfsError as exc:
        print(f"pxctl: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("pxctl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (`pxctl volume list | head`); Python would print a
        # traceback when it flushes stdout at exit unless stdout points elsewhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
