"""Measure pxfs at scale: mounting a volume of many files, resync after an outage, copy rate.

    python tools/bench_scale.py [--parts mount,resync,copy] [--work-dir DIR] [--json FILE]
                                [--files 1000000] [--files-per-dir 1000]
                                [--volume-gib 10] [--fill-mib 1024] [--missed-mib 10]
                                [--copy-gib 2] [--smoke]

The parts, each chosen with --parts, each starting and stopping its own processes:

- mount: a private pxd (one node, no etcd) in DIR/mount gets a volume with --files empty files
  in directories of --files-per-dir. The files are created with the library, by the Volume
  calls that the FUSE handlers make, over a ReplicationClient to the node's own store, because
  FUSE creates about 1,000 files per second here. The volume is closed, which writes the same
  checkpoint an unmount writes. Then it is attached and mounted through pxd, and the tool
  times the mount call until the first stat of a file answers. It reads the mount child's
  peak resident memory (VmHWM in /proc/PID/status).
- resync: a cluster of etcd and two pxd nodes (tests/clusterproc.py) in DIR/resync. An ha 2
  volume of --volume-gib is mounted on node 1, and --fill-mib of one file is written while both
  nodes are up. Node 2 stops, --missed-mib of 64 KiB blocks at random offsets of that file are
  written and fsync'd, and node 2 starts again. The tool times how long the volume takes to
  show no out-of-sync replica and a clean runtime state, from the moment node 2 reports up,
  and compares the blocks resynced with the blocks written.
- copy: a cluster of two nodes in DIR/copy. An ha 1 volume on node 1 gets --copy-gib of data,
  and its ha level goes to 2 while it stays mounted, so the mount child copies every written
  block to node 2. The rate is the bytes copied over the time from the start of the copy to
  the replica joining the write set, both from the mount child's log. The CPU time that the
  mount child and the two pxd processes use meanwhile is reported per GiB copied.

Needs root and /dev/fuse; resync and copy need etcd. Everything the tool starts is stopped and
unmounted at the end, also after a failure, Ctrl-C or SIGTERM. --smoke runs tiny sizes, so that
tests/test_bench_scale.py can check that the tool still works.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from benchcommon import (
    TEARDOWN_FAILURES,
    BenchError,
    leftover_mounts,
    raise_interrupt,
    register_teardown,
    teardown_outcome,
    work_directory,
)

REPO = Path(__file__).resolve().parent.parent
# The cluster and node helpers of the test suite start and stop the real processes.
sys.path.insert(0, str(REPO / "tests"))

from clusterproc import Cluster, ClusterNode, lazy_unmount  # noqa: E402
from nodeproc import Node, mount_child_pids  # noqa: E402

from pxfs import errors  # noqa: E402
from pxfs.replication import ReplicationClient  # noqa: E402
from pxfs.rpc import RpcClient, read_secret  # noqa: E402
from pxfs.volume.format import ROOT_INO  # noqa: E402
from pxfs.volume.namespace import Volume  # noqa: E402

MIB = 1024 * 1024
GIB = 1024 * MIB
BLOCK = 64 * 1024
PARTS = ("mount", "resync", "copy")
#: Files created between two syncs of the volume while it is filled, which bounds the records
#: held in memory, as the background flush of a mounted volume does.
SYNC_EVERY = 50_000
#: Seconds that any one wait of the tool may take before it gives up.
WAIT_TIMEOUT = 300.0
#: Seconds between two polls of a volume's state while a resync is timed.
POLL_INTERVAL = 0.05
#: Seconds between two polls while a copy runs, whose time comes from the log: each poll is
#: work for pxd and the mount child, which would count in the copy's CPU time.
COPY_POLL_INTERVAL = 0.5
#: Bytes of each write that fills a file.
WRITE_CHUNK = 4 * MIB
ETCD = Path("/usr/bin/etcd")

Figures = dict[str, Any]


def progress(part: str, step: str) -> None:
    """Write one progress line to stderr."""
    stamp = time.strftime("%H:%M:%S")
    print(f"bench_scale {stamp} [{part}] {step}", file=sys.stderr, flush=True)


def wait_for(condition: Callable[[], Any], what: str, interval: float = POLL_INTERVAL) -> Any:
    """Poll `condition` until it returns a true value and return it; raises BenchError."""
    deadline = time.monotonic() + WAIT_TIMEOUT
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {WAIT_TIMEOUT:g} s waiting for {what}")
        time.sleep(interval)


def peak_rss_mib(pid: int) -> float:
    """Return the peak resident memory of `pid` in MiB (VmHWM)."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    if match is None:
        raise BenchError(f"/proc/{pid}/status has no VmHWM line")
    return int(match[1]) / 1024


def cpu_seconds(pid: int) -> float:
    """Return the user and system CPU time that `pid` has used, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of /proc/PID/stat, 11 and 12 after the name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write_file(path: Path, size: int) -> None:
    """Write `size` bytes of random data to `path` and fsync it."""
    chunk = os.urandom(WRITE_CHUNK)
    with open(path, "wb") as f:
        for offset in range(0, size, WRITE_CHUNK):
            f.write(chunk[: min(WRITE_CHUNK, size - offset)])
        f.flush()
        os.fsync(f.fileno())


def table_versions(node: ClusterNode, vol_id: str) -> bytes:
    """Return the versions column of a replica's block table, read from its file."""
    table = (node.replica_dir(vol_id) / "table").read_bytes()
    view = memoryview(table).cast("Q")
    return view[0::2].tobytes()


def differing_blocks(old: bytes, new: bytes) -> int:
    """Count the blocks whose version differs between two versions columns."""
    first, second = memoryview(old).cast("Q"), memoryview(new).cast("Q")
    count = abs(len(first) - len(second))
    return count + sum(1 for a, b in zip(first, second, strict=False) if a != b)


def resynced_blocks(state: dict[str, str], index: int) -> int:
    """Return the ResyncBlocks count of replica `index` in a runtime state map."""
    pairs = dict(re.findall(r"\{(\d+) (\d+)\}", state.get("ResyncBlocks", "")))
    return int(pairs.get(str(index), 0))


# The mount part.


async def fill_volume(
    peer_socket: Path, secret: bytes, vol_id: str, epoch: int, files: int, per_dir: int
) -> None:
    """Create `files` empty files in directories of `per_dir` through the node's store."""
    client = await RpcClient.connect_unix(peer_socket, secret)
    try:
        info = await client.call("store.info", vol_id)
        device = ReplicationClient(vol_id, epoch, info["nblocks"], [client])
        await device.open()
        volume = await Volume.open(device)
        try:
            for number in range(files):
                if number % per_dir == 0:
                    name = b"d%05d" % (number // per_dir)
                    directory = volume.mkdir(ROOT_INO, name, 0o755, 0, 0).ino
                    volume.forget(directory, 1)
                ino = volume.create(directory, b"f%07d" % number, 0o644, 0, 0).ino
                volume.forget(ino, 1)
                if (number + 1) % SYNC_EVERY == 0:
                    await volume.sync()
        finally:
            await volume.close()
    finally:
        await client.aclose()


def measure_mount(work: Path, args: argparse.Namespace, stack: contextlib.ExitStack) -> Figures:
    """Fill a volume with files, then time its mount and read the mount child's peak memory."""
    node = Node(work / "mount")
    mountpoint = work / "mount" / "mnt"
    mountpoint.mkdir(parents=True, exist_ok=True)
    stack.callback(node.cleanup, [mountpoint])
    progress("mount", f"start pxd in {node.root}")
    node.start()
    record = node.call("volume.create", {"name": "scale", "size": GIB, "ha_level": 1, "labels": {}})
    register_teardown(stack, "delete volume scale", lambda: node.call("volume.delete", "scale"))
    progress("mount", f"create {args.files} files with the library")
    started = time.monotonic()
    trio.run(
        fill_volume,
        node.socket.parent / "peer.sock",
        read_secret(node.data_dir / "cluster.secret"),
        record["id"],
        record["epoch"],
        args.files,
        args.files_per_dir,
    )
    fill_seconds = time.monotonic() - started

    progress("mount", "attach and mount")
    node.call("volume.attach", "scale")
    register_teardown(stack, "detach volume scale", lambda: node.call("volume.detach", "scale"))
    last = args.files - 1
    probe = mountpoint / f"d{last // args.files_per_dir:05d}" / f"f{last:07d}"
    started = time.monotonic()
    node.call("volume.mount", "scale", str(mountpoint))
    register_teardown(
        stack, "unmount volume scale", lambda: node.call("volume.unmount", "scale", str(mountpoint))
    )
    mounted = time.monotonic()
    wait_for(lambda: _stat_answers(probe), f"a stat of {probe}")
    answered = time.monotonic()
    (pid,) = mount_child_pids(str(node.root))
    figures = {
        "files": args.files,
        "fill_s": round(fill_seconds, 2),
        "mount_call_s": round(mounted - started, 2),
        "mount_to_first_stat_s": round(answered - started, 2),
        "mount_child_peak_rss_mib": round(peak_rss_mib(pid), 1),
    }
    progress("mount", f"figures: {figures}")
    return figures


def _stat_answers(path: Path) -> bool:
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    return True


# The cluster parts.


def start_cluster(root: Path, stack: contextlib.ExitStack, part: str) -> Cluster:
    """Start etcd and two pxd nodes under `root`; they are stopped when `stack` closes."""
    if not ETCD.exists():
        raise BenchError(f"the {part} part needs etcd ({ETCD}; apt-get install etcd-server)")
    cluster = Cluster(root, 2)
    stack.callback(cluster.stop)
    progress(part, f"start etcd and two pxd nodes in {root}")
    cluster.start()
    return cluster


def create_volume(node: ClusterNode, name: str, size: int, nodes: list[ClusterNode]) -> str:
    """Create a volume with a replica on each of `nodes`; return its id."""
    spec = {
        "name": name,
        "size": size,
        "ha_level": len(nodes),
        "labels": {},
        "nodes": [member.node_id for member in nodes],
    }
    return str(node.call("volume.create", spec)["id"])


def mount_volume(node: ClusterNode, name: str, path: Path, stack: contextlib.ExitStack) -> None:
    """Attach and mount a volume on `node`; undone when `stack` closes."""
    path.mkdir(parents=True, exist_ok=True)
    register_teardown(stack, f"delete volume {name}", lambda: node.call("volume.delete", name))
    node.call("volume.attach", name)
    register_teardown(stack, f"detach volume {name}", lambda: node.call("volume.detach", name))
    node.call("volume.mount", name, str(path))
    stack.callback(lazy_unmount, path)
    register_teardown(
        stack, f"unmount volume {name}", lambda: node.call("volume.unmount", name, str(path))
    )


def is_clean(node: ClusterNode, name: str) -> dict[str, Any] | None:
    """Return the volume record when no replica is out of sync and the state is clean."""
    record: dict[str, Any] = node.call("volume.inspect", name)
    if record.get("out_of_sync") or record.get("replica_nodes_next"):
        return None
    if record.get("runtime_state", {}).get("RuntimeState") != "clean":
        return None
    return record


def write_random_blocks(path: Path, file_blocks: int, count: int, seed: int) -> None:
    """Overwrite `count` distinct random 64 KiB blocks of the file, then fsync it."""
    rng = random.Random(seed)
    chosen = rng.sample(range(file_blocks), count)
    with open(path, "r+b") as f:
        for block in chosen:
            f.seek(block * BLOCK)
            f.write(rng.randbytes(BLOCK))
        f.flush()
        os.fsync(f.fileno())


def measure_resync(work: Path, args: argparse.Namespace, stack: contextlib.ExitStack) -> Figures:
    """Time how long an ha 2 volume takes to be clean after one node missed some writes."""
    cluster = start_cluster(work / "resync", stack, "resync")
    first, second = cluster.nodes
    size = args.volume_gib * GIB
    vol_id = create_volume(first, "missed", size, [first, second])
    path = work / "resync-mnt"
    mount_volume(first, "missed", path, stack)
    blob = path / "blob"
    progress("resync", f"write {args.fill_mib} MiB while both nodes are up")
    write_file(blob, args.fill_mib * MIB)
    # The benchmark starts the node again itself; this only covers a failure on the way.
    stack.callback(lambda: second.pxd is None and second.start())

    progress("resync", "stop node 2")
    if second.stop() != 0:
        raise BenchError("pxd of node 2 did not exit cleanly")
    stale = table_versions(second, vol_id)
    written = args.missed_mib * MIB // BLOCK
    progress("resync", f"write {written} blocks at random offsets and fsync")
    write_random_blocks(blob, args.fill_mib * MIB // BLOCK, written, seed=1)
    record = first.call("volume.inspect", "missed")
    if record["out_of_sync"] != [second.node_id]:
        raise BenchError(f"node 2 should be out of sync, the record shows {record['out_of_sync']}")
    missed = differing_blocks(stale, table_versions(first, vol_id))

    progress("resync", "start node 2 and wait until the volume is clean")
    launched = time.monotonic()
    second.start()
    returned = time.monotonic()
    record = wait_for(lambda: is_clean(first, "missed"), "the volume to be clean")
    clean = time.monotonic()
    index = record["replica_nodes"].index(second.node_id)
    identical = table_versions(first, vol_id) == table_versions(second, vol_id)
    figures = {
        "volume_gib": args.volume_gib,
        "file_blocks_written": written,
        "device_blocks_missed": missed,
        "blocks_resynced": resynced_blocks(record["runtime_state"], index),
        "clean_after_start_s": round(clean - launched, 2),
        "clean_after_up_s": round(clean - returned, 2),
        "tables_identical": identical,
    }
    progress("resync", f"figures: {figures}")
    return figures


def logged_copy(node: ClusterNode, vol_id: str) -> tuple[float, int] | None:
    """Return the seconds and blocks of the last resync that the node's log shows for `vol_id`."""
    started = finished = None
    copied = 0
    pattern = re.compile(r"^(\S+ \S+) \w+ \S+: volume " + vol_id + r": (.*)$")
    for line in node.log_text().splitlines():
        match = pattern.match(line)
        if match is None:
            continue
        at = datetime.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if "resync of replica" in match[2] and match[2].endswith("started"):
            started = at
        caught_up = re.search(r"caught up after copying (\d+) blocks", match[2])
        if caught_up and started is not None:
            finished, copied = at, int(caught_up[1])
    if started is None or finished is None:
        return None
    return finished - started, copied


def measure_copy(work: Path, args: argparse.Namespace, stack: contextlib.ExitStack) -> Figures:
    """Raise an ha 1 volume with data to ha 2 while mounted and measure the copy rate."""
    cluster = start_cluster(work / "copy", stack, "copy")
    first, second = cluster.nodes
    data_bytes = int(args.copy_gib * GIB)
    size = max(GIB, -(-2 * data_bytes // BLOCK) * BLOCK)
    vol_id = create_volume(first, "copied", size, [first])
    path = work / "copy-mnt"
    mount_volume(first, "copied", path, stack)
    progress("copy", f"write {data_bytes // MIB} MiB")
    write_file(path / "blob", data_bytes)

    progress("copy", "raise the ha level to 2 and wait for the copy")
    (child,) = mount_child_pids(str(first.root))
    assert first.pxd is not None and second.pxd is not None
    pids = {"mount_child": child, "source_pxd": first.pxd.pid, "target_pxd": second.pxd.pid}
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    started = time.monotonic()
    first.call("volume.update", "copied", {"ha_level": 2, "nodes": [second.node_id]})
    record = wait_for(
        lambda: is_clean(first, "copied"), "the new replica to join", COPY_POLL_INTERVAL
    )
    finished = time.monotonic()
    cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
    index = record["replica_nodes"].index(second.node_id)
    copied = resynced_blocks(record["runtime_state"], index)
    logged = logged_copy(first, vol_id)
    if logged is None:
        raise BenchError("the mount child's log shows no finished resync")
    seconds, logged_blocks = logged
    figures = {
        "data_mib": data_bytes // MIB,
        "blocks_copied": copied,
        "copy_s": round(seconds, 2),
        "copy_mib_s": round(logged_blocks * BLOCK / MIB / seconds, 1),
        "update_to_clean_s": round(finished - started, 2),
        "update_to_clean_mib_s": round(copied * BLOCK / MIB / (finished - started), 1),
        # CPU seconds per GiB copied, which the load of other work on the machine changes
        # less than the rate.
        "cpu_s_per_gib": {
            name: round(seconds * GIB / (copied * BLOCK), 2) for name, seconds in cpu.items()
        },
        "tables_identical": table_versions(first, vol_id) == table_versions(second, vol_id),
    }
    progress("copy", f"figures: {figures}")
    return figures


# The command line.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; --smoke replaces the sizes with tiny ones."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts to run")
    parser.add_argument("--work-dir", type=Path, help="directory for state (default: a new one)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--files", type=int, default=1_000_000, help="files of the mount part")
    parser.add_argument("--files-per-dir", type=int, default=1000, help="files per directory")
    parser.add_argument("--volume-gib", type=int, default=10, help="resync volume size, GiB")
    parser.add_argument("--fill-mib", type=int, default=1024, help="MiB written before the stop")
    parser.add_argument("--missed-mib", type=int, default=10, help="MiB written while stopped")
    parser.add_argument("--copy-gib", type=float, default=2.0, help="GiB of data to copy")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    args = parser.parse_args(argv)
    if args.smoke:
        args.files, args.files_per_dir = 3000, 1000
        args.volume_gib, args.fill_mib, args.missed_mib = 1, 16, 1
        args.copy_gib = 1 / 16
    args.parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; expected some of {', '.join(PARTS)}")
    if args.files < 1 or args.files_per_dir < 1:
        parser.error("--files and --files-per-dir must be at least 1")
    if args.missed_mib * MIB // BLOCK > args.fill_mib * MIB // BLOCK:
        parser.error("--missed-mib must not exceed --fill-mib")
    if args.fill_mib * MIB >= args.volume_gib * GIB:
        parser.error("--fill-mib must be smaller than the volume (--volume-gib)")
    return args


MEASURERS = {"mount": measure_mount, "resync": measure_resync, "copy": measure_copy}


def run(args: argparse.Namespace, work: Path) -> dict[str, Figures]:
    """Run each chosen part with a teardown of its own and return the figures by part."""
    results: dict[str, Figures] = {}
    for part in args.parts:
        with contextlib.ExitStack() as stack:
            results[part] = MEASURERS[part](work, args, stack)
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the figures as JSON and write them to --json."""
    args = parse_args(argv)
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("bench_scale: needs root and /dev/fuse", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        with work_directory(args.work_dir, "pxfs-bench-scale-") as work:
            results = run(args, work)
            left = leftover_mounts(work)
            if left:
                raise BenchError(f"mounts left after the teardown: {left}")
    except (BenchError, errors.PxfsError, AssertionError) as exc:
        print(f"bench_scale: {exc}", file=sys.stderr)
        print(f"bench_scale: {teardown_outcome()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"bench_scale: interrupted; {teardown_outcome()}", file=sys.stderr)
        return 130
    if TEARDOWN_FAILURES:
        print(f"bench_scale: {teardown_outcome()}", file=sys.stderr)
        return 1
    report = json.dumps(results, indent=2)
    print(report)
    if args.json:
        args.json.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
