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
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from pxfs import errors, units
from pxfs.api.osd import volume_to_osd
from pxfs.config import Config
from pxfs.rpc import BlockingClient

SOCKET_ENV = "PXFS_SOCKET"
MAX_HA_LEVEL = 3
#: Exit code of `volume check` when the check found problems.
CHECK_FAILED_EXIT = errors.Corrupted.exit_code
_LABEL_WIDTH = 16

Command = Callable[[BlockingClient, argparse.Namespace], int]


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
    record = client.call("volume.create", request)
    if args.json:
        _print_json(volume_to_osd(record, _node_id(client)))
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
        _print_json([volume_to_osd(record, node_id) for record in records])
        return 0
    header = ["ID", "NAME", "SIZE", "HA", "SHARED", "ENCRYPTED", "IO_PRIORITY", "STATUS"]
    rows = [_list_row(record) for record in records]
    _print_table(header, rows)
    return 0


def volume_inspect(client: BlockingClient, args: argparse.Namespace) -> int:
    """Print each volume's details as aligned text, or as the REST API's JSON list."""
    records = [client.call("volume.inspect", ref) for ref in args.refs]
    if args.json:
        node_id = _node_id(client)
        _print_json([volume_to_osd(record, node_id) for record in records])
        return 0
    for index, record in enumerate(records):
        if index:
            print()
        print("\n".join(inspect_lines(record)))
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
        _print_json({"clean": clean, "problems": problems})
    elif clean and not problems:
        print(f"Volume {args.ref} is clean")
    else:
        print(f"Volume {args.ref} has {len(problems)} problem(s):")
        for problem in problems:
            print(f"  {problem}")
    return 0 if clean and not problems else CHECK_FAILED_EXIT


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


def node_status(client: BlockingClient, args: argparse.Namespace) -> int:
    """Print the status of this node."""
    status = client.call("node.status")
    if args.json:
        _print_json(status)
    else:
        print("\n".join(status_lines(status)))
    return 0


# --- Output -------------------------------------------------------------------------------------


def inspect_lines(record: Mapping[str, Any]) -> list[str]:
    """Return the `volume inspect` text of one volume record."""
    attached_on = record.get("attached_on") or ""
    mounted = record.get("mounted")
    paths = mounted if mounted is not None else record.get("mount_paths") or []
    labels = ",".join(
        f"{key}={value}" for key, value in sorted((record.get("labels") or {}).items())
    )
    fields = [
        ("Name", record["name"]),
        ("Size", units.format_size(int(record["size"]))),
        ("Format", "fuse"),
        ("HA", str(record["ha_level"])),
        ("IO Priority", "LOW"),
        ("Creation time", format_time(record.get("ctime_ns", 0))),
        ("Shared", "no"),
        ("Status", "up"),
        ("State", f"Attached: {attached_on}" if attached_on else "detached"),
        ("Mount paths", ", ".join(str(path) for path in paths) or "none"),
        ("Labels", labels or "none"),
        ("Epoch", str(record.get("epoch", 0))),
        ("Bytes used", units.format_size(int(record.get("usage") or 0))),
    ]
    lines = [f"Volume{' ' * (_LABEL_WIDTH - 6)}:  {record['id']}"]
    lines += [f"\t{label:<{_LABEL_WIDTH}}:  {value}" for label, value in fields]
    lines.append("\tReplica sets on nodes:")
    lines.append("\t\tSet 0")
    for node in record.get("replica_nodes") or []:
        lines.append(f"\t\t\tNode\t:  {node}")
    return lines


def status_lines(status: Mapping[str, Any]) -> list[str]:
    """Return the `status` text of a node.status result."""
    state = status.get("status", "unknown")
    headline = "pxfs is operational" if state == "up" else f"pxfs is {state}"
    capacity = int(status.get("capacity_bytes") or 0)
    used = int(status.get("used_bytes") or 0)
    free = int(status.get("free_bytes") or 0)
    fields = [
        ("Hostname", status.get("hostname", "")),
        ("IP", status.get("ip", "")),
        ("Version", status.get("version", "")),
        ("Data directory", status.get("data_dir", "")),
        ("Volumes", f"{status.get('volumes', 0)} ({status.get('mounted', 0)} mounted)"),
        ("Capacity", units.format_size(capacity)),
        ("Used", units.format_size(used)),
        ("Free", units.format_size(free)),
        ("Started", format_time(status.get("started_ns", 0))),
    ]
    lines = [f"Status: {headline}", f"Node ID: {status.get('node_id', '')}"]
    lines += [f"\t{label:<{_LABEL_WIDTH}}:  {value}" for label, value in fields]
    return lines


def format_time(ns: int | None) -> str:
    """Format nanoseconds since the epoch the way pxctl prints times, in UTC."""
    if not ns:
        return "-"
    return time.strftime("%b %d %H:%M:%S UTC %Y", time.gmtime(int(ns) / 1e9))


def _list_row(record: Mapping[str, Any]) -> list[str]:
    attached_on = record.get("attached_on") or ""
    status = f"up - attached on {attached_on}" if attached_on else "up - detached"
    size = units.format_size(int(record["size"]))
    return [
        str(record["id"]),
        record["name"],
        size,
        str(record["ha_level"]),
        "no",
        "no",
        "LOW",
        status,
    ]


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [len(title) for title in header]
    for row in rows:
        widths = [max(width, len(cell)) for width, cell in zip(widths, row, strict=True)]
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        print("  ".join(cells).rstrip())


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=4, sort_keys=True))


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
