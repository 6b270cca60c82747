"""Measure a pxfs volume beside the raw filesystem of its data directory, in one run.

    python tools/bench.py [--work-dir DIR] [--size-mib 1024] [--seconds 30] [--files 10000]
                          [--json FILE] [--smoke]

The tool starts its own pxd on DIR/pxd (so it never touches a running node), creates and mounts
a volume, and runs the same jobs on DIR/raw and on the mount: fio sequential write of
--size-mib with bs=1M and a final fsync, sequential read after dropping caches, random 4 KiB
reads and writes for --seconds each, then create, stat and unlink of --files files. It prints a
table with the pxfs/raw ratio and writes the same figures as JSON. --smoke runs tiny sizes so the
test suite can check that the tool still works. Needs root (drop_caches, FUSE) and fio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pxfs import errors
from pxfs.rpc import BlockingClient

GIB = 1024**3


def drop_caches() -> None:
    """Write back dirty pages and drop the page cache, so reads reach the filesystem."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def run_fio(directory: Path, name: str, rw: str, bs: str, size_mib: int, seconds: int) -> float:
    """Run one fio job in `directory` and return its bandwidth in MiB/s."""
    command = [
        "fio", f"--name={name}", f"--directory={directory}", f"--rw={rw}", f"--bs={bs}",
        f"--size={size_mib}M", "--ioengine=psync", "--numjobs=1", "--output-format=json",
        "--filename=fio.data",
    ]
    if rw in ("write", "randwrite"):
        command.append("--end_fsync=1")
    if rw.startswith("rand"):
        command += [f"--runtime={seconds}", "--time_based"]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    job = json.loads(output[output.index("{"):])["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    return float(side["bw_bytes"]) / (1024 * 1024)


def time_rate(count: int, step: Callable[[int], None]) -> float:
    """Call step(i) for i in range(count) and return the calls per second."""
    start = time.perf_counter()
    for i in range(count):
        step(i)
    return count / (time.perf_counter() - start)


def metadata_rates(directory: Path, files: int) -> dict[str, float]:
    """Create, stat (warm and after dropping caches) and unlink `files` empty files."""
    tree = directory / "meta"
    tree.mkdir()
    names = [tree / f"f{i:06d}" for i in range(files)]

    def create(i: int) -> None:
        os.close(os.open(names[i], os.O_CREAT | os.O_WRONLY, 0o644))

    rates = {"create": time_rate(files, create)}
    rates["stat_warm"] = time_rate(files, lambda i: os.stat(names[i]))
    drop_caches()
    rates["stat_cold"] = time_rate(files, lambda i: os.stat(names[i]))
    rates["unlink"] = time_rate(files, lambda i: os.unlink(names[i]))
    tree.rmdir()
    return rates


def measure(directory: Path, size_mib: int, seconds: int, files: int) -> dict[str, float]:
    """Run every job in `directory` and return the figures by name."""
    figures = {"seq_write": run_fio(directory, "seqwrite", "write", "1M", size_mib, seconds)}
    drop_caches()
    figures["seq_read"] = run_fio(directory, "seqread", "read", "1M", size_mib, seconds)
    figures["rand_read_4k"] = run_fio(directory, "randread", "randread", "4k", size_mib, seconds)
    figures["rand_write_4k"] = run_fio(directory, "randwrite", "randwrite", "4k", size_mib, seconds)
    os.unlink(directory / "fio.data")
    figures.update(metadata_rates(directory, files))
    return figures


class Node:
    """A pxd of the benchmark's own, on a private data directory and socket."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "pxd.sock"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> BlockingClient:
        """Start pxd and return a client once its control socket answers."""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "daemon.pxd", "--data-dir", str(self.root / "data"),
             "--socket", str(self.socket)],
            cwd=Path(__file__).resolve().parent.parent,
        )
        client = BlockingClient(self.socket)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                client.call("node.status")
                return client
            except errors.Unavailable:
                if self.process.poll() is not None:
                    break
                time.sleep(0.1)
        self.stop()
        raise SystemExit("bench: pxd did not start; see its log above")

    def stop(self) -> None:
        """Stop pxd (it unmounts its volumes) and wait for it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)


def print_table(raw: dict[str, float], pxfs: dict[str, float]) -> None:
    """Print the figures side by side with the pxfs/raw ratio."""
    units = {"seq_write": "MiB/s", "seq_read": "MiB/s", "rand_read_4k": "MiB/s",
             "rand_write_4k": "MiB/s"}
    print(f"{'figure':<16}{'unit':<8}{'raw':>12}{'pxfs ha1':>12}{'pxfs/raw':>10}")
    for name, raw_value in raw.items():
        unit = units.get(name, "ops/s")
        value = pxfs[name]
        print(f"{name:<16}{unit:<8}{raw_value:>12.1f}{value:>12.1f}{value / raw_value:>10.2f}")


def main() -> int:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, help="where raw files and pxd state go "
                        "(default: a new temporary directory, removed afterwards)")
    parser.add_argument("--size-mib", type=int, default=1024, help="fio file size in MiB")
    parser.add_argument("--seconds", type=int, default=30, help="duration of each random job")
    parser.add_argument("--files", type=int, default=10000, help="files to create, stat, unlink")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to test the tool")
    args = parser.parse_args()
    if args.smoke:
        args.size_mib, args.seconds, args.files = 8, 1, 200
    if shutil.which("fio") is None:
        print("bench: fio is not installed (apt-get install fio)", file=sys.stderr)
        return 1

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="pxfs-bench-"))
    raw_dir, mountpoint = work / "raw", work / "mnt"
    raw_dir.mkdir(parents=True, exist_ok=True)
    mountpoint.mkdir(exist_ok=True)
    print(f"bench: raw filesystem jobs in {raw_dir}", flush=True)
    raw = measure(raw_dir, args.size_mib, args.seconds, args.files)

    node = Node(work / "node")
    node.root.mkdir(exist_ok=True)
    try:
        client = node.start()
        size = max(2 * GIB, 4 * args.size_mib * 1024 * 1024)
        client.call("volume.create", {"name": "bench", "size": size, "ha_level": 1, "labels": {}})
        client.call("volume.attach", "bench")
        client.call("volume.mount", "bench", str(mountpoint))
        print(f"bench: pxfs jobs in {mountpoint}", flush=True)
        pxfs = measure(mountpoint, args.size_mib, args.seconds, args.files)
        client.call("volume.unmount", "bench", str(mountpoint))
        client.call("volume.detach", "bench")
        client.call("volume.delete", "bench")
    finally:
        node.stop()

    print_table(raw, pxfs)
    report = {"raw": raw, "pxfs_ha1": pxfs, "size_mib": args.size_mib, "seconds": args.seconds,
              "files": args.files}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
