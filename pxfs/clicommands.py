"""Handlers of pxctl's verbs, which call pxd over the control socket and print its replies."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

from pxfs import errors
from pxfs.api import osd
from pxfs.api.osd import volume_to_osd
from pxfs.blockingclient import BlockingClient
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

#: Exit code of `volume check` when the check found problems.
CHECK_FAILED_EXIT = errors.Corrupted.exit_code
#: Exit code of `volume verify` when the replicas differ, and of `volume scrub` when a block
#: has no good copy left.
VERIFY_FAILED_EXIT = 1
#: Seconds that `volume verify` and `volume scrub` wait for pxd: they read every replica.
SCRUB_TIMEOUT = 86400.0

#: The handler of a verb, which returns the exit code of pxctl.
Command = Callable[[BlockingClient, argparse.Namespace], int]


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
