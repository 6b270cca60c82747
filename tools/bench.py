"""Measure pxfs beside the raw filesystem and GlusterFS replica 3 on the same disk, in one run.

    python tools/bench.py [--work-dir DIR] [--size-mib 1024] [--seconds 30] [--files 10000]
                          [--tree DIR]
                          [--systems raw,pxfs_ha1,pxfs_ha3,glusterfs_r3,fuse_floor]
                          [--json FILE] [--smoke]

Every system gets the same jobs in a directory under DIR: fio (psync engine) sequential write of
--size-mib with bs=1M and a final fsync, sequential read after dropping caches, random 4 KiB
reads and writes for --seconds each, then create, stat (warm and after dropping caches) and
unlink of --files empty files, then a real workload: copy --tree (the Python standard library by
default) onto the filesystem, `git init && git add -A && git commit`, and `git status`, each timed.

The systems are raw (DIR/raw), pxfs ha 1 (a private pxd on DIR/node, so it never touches a
running node), pxfs ha 3 (a private cluster of etcd and three pxd nodes started by tools/cluster
in DIR/cluster, the volume mounted on node 1 at DIR/mnt-pxfs3), and GlusterFS replica 3: a
private glusterd on DIR/gluster with three bricks in DIR/gluster/bricks, FUSE-mounted on
DIR/mnt-gluster. The FUSE floor (tools/fusefloor.py on DIR/mnt-floor, a pyfuse3 filesystem
that drops every write) gets the fio jobs only: its rates are an upper bound for pxfs's request
loop on pyfuse3 on this machine. --systems picks some of them. Everything the tool starts
is stopped and unmounted at the end, even after a failure, Ctrl-C or SIGTERM. It prints a table
with the pxfs/raw, pxfs/GlusterFS, pxfs ha 3/GlusterFS and pxfs/floor ratios, writes the same
figures as JSON, and reports progress on stderr. --smoke runs tiny sizes so the test suite can
check that the tool still works. Needs root (drop_caches, FUSE), fio and git. pxfs ha 3 needs
etcd; GlusterFS is measured when glusterd is installed (Debian: glusterfs-server,
glusterfs-client).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchcommon import (
    TEARDOWN_FAILURES,
    BenchError,
    leftover_mounts,
    raise_interrupt,
    register_teardown,
    teardown_outcome,
    work_directory,
)

from pxfs import errors
from pxfs.blockingclient import BlockingClient
from pxfs.orphanchild import process_state

GIB = 1024**3
START_TIMEOUT = 30.0

# Every glusterfsd brick and the self-heal daemon fetch their volfile from glusterd on this port
# of the brick host (glusterd 10.3 passes no port to them), so the private glusterd must use it.
GLUSTERD_PORT = 24007
GLUSTER_VOLUME = "pxfsbench"

FIGURES = {
    "seq_write": ("sequential write, 1 MiB + fsync", "MiB/s"),
    "seq_read": ("sequential read, 1 MiB, cold", "MiB/s"),
    "rand_read_4k": ("random read, 4 KiB", "MiB/s"),
    "rand_write_4k": ("random write, 4 KiB", "MiB/s"),
    "create": ("create", "ops/s"),
    "stat_warm": ("stat, warm", "ops/s"),
    "stat_cold": ("stat, after dropping caches", "ops/s"),
    "unlink": ("unlink", "ops/s"),
    "copy_tree": ("copy the tree", "s"),
    "git_commit": ("git init, add -A, commit", "s"),
    "git_status": ("git status", "s"),
}

SYSTEMS = {
    "raw": "raw",
    "pxfs_ha1": "pxfs ha 1",
    "pxfs_ha3": "pxfs ha 3",
    "glusterfs_r3": "GlusterFS r3",
    "fuse_floor": "FUSE floor",
}

Figures = dict[str, float]


def progress(system: str, step: str) -> None:
    """Write one progress line with the system and the job to stderr."""
    stamp = time.strftime("%H:%M:%S")
    print(f"bench {stamp} [{SYSTEMS.get(system, system)}] {step}", file=sys.stderr, flush=True)


def drop_caches() -> None:
    """Write back dirty pages and drop the page cache, so reads reach the filesystem."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


# The jobs.


def run_job(command: list[str], **options: Any) -> subprocess.CompletedProcess[str]:
    """Run a job's command like subprocess.run, and on an interrupt stop it before going on.

    subprocess.run kills only the child it started, and waits only a moment for it. fio runs
    each job in a process of its own, which could then outlive the teardown. So the job gets a
    process group of its own, and an interrupt kills the whole group and waits for the child.
    """
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, **options,
    ) as process:  # fmt: skip
        try:
            stdout, stderr = process.communicate()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                print(f"bench: {command[0]} (pid {process.pid}) did not exit", file=sys.stderr)
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def run_fio(directory: Path, name: str, rw: str, bs: str, size_mib: int, seconds: int) -> float:
    """Run one fio job in `directory` and return its bandwidth in MiB/s."""
    command = [
        "fio", f"--name={name}", f"--directory={directory}", f"--rw={rw}", f"--bs={bs}",
        f"--size={size_mib}M", "--ioengine=psync", "--numjobs=1", "--output-format=json",
        "--filename=fio.data",
    ]  # fmt: skip
    if rw in ("write", "randwrite"):
        command.append("--end_fsync=1")
    if rw.startswith("rand"):
        command += [f"--runtime={seconds}", "--time_based"]
    result = run_job(command)
    if result.returncode != 0:
        raise BenchError(f"fio {name} in {directory} failed: {result.stderr.strip()}")
    output = result.stdout
    job = json.loads(output[output.index("{") :])["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    return float(side["bw_bytes"]) / (1024 * 1024)


def time_rate(count: int, step: Callable[[int], object]) -> float:
    """Call step(i) for i in range(count) and return the calls per second."""
    start = time.perf_counter()
    for i in range(count):
        step(i)
    return count / (time.perf_counter() - start)


def time_call(action: Callable[[], object]) -> float:
    """Call action() once and return the seconds it took."""
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def fio_rates(
    system: str, directory: Path, size_mib: int, seconds: int, *, remove: bool = True
) -> Figures:
    """Run the four fio jobs in `directory` and return their bandwidths.

    With `remove`, fio's file is deleted afterwards.
    """
    progress(system, f"sequential write, {size_mib} MiB")
    figures = {"seq_write": run_fio(directory, "seqwrite", "write", "1M", size_mib, seconds)}
    drop_caches()
    progress(system, "sequential read after dropping caches")
    figures["seq_read"] = run_fio(directory, "seqread", "read", "1M", size_mib, seconds)
    progress(system, f"random 4 KiB reads, {seconds} s")
    figures["rand_read_4k"] = run_fio(directory, "randread", "randread", "4k", size_mib, seconds)
    progress(system, f"random 4 KiB writes, {seconds} s")
    figures["rand_write_4k"] = run_fio(directory, "randwrite", "randwrite", "4k", size_mib, seconds)
    if remove:
        os.unlink(directory / "fio.data")
    return figures


def metadata_rates(system: str, directory: Path, files: int) -> Figures:
    """Create, stat (warm and after dropping caches) and unlink `files` empty files."""
    tree = directory / "meta"
    tree.mkdir()
    names = [tree / f"f{i:06d}" for i in range(files)]

    def create(i: int) -> None:
        os.close(os.open(names[i], os.O_CREAT | os.O_WRONLY, 0o644))

    progress(system, f"create {files} files")
    rates = {"create": time_rate(files, create)}
    progress(system, "stat, warm")
    rates["stat_warm"] = time_rate(files, lambda i: os.stat(names[i]))
    drop_caches()
    progress(system, "stat after dropping caches")
    rates["stat_cold"] = time_rate(files, lambda i: os.stat(names[i]))
    progress(system, f"unlink {files} files")
    rates["unlink"] = time_rate(files, lambda i: os.unlink(names[i]))
    tree.rmdir()
    return rates


def run_git(checkout: Path, *args: str) -> None:
    """Run one git command in `checkout`, isolated from the user's and the system's config."""
    environment = dict(os.environ, GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull)
    command = [
        "git", "-c", "user.name=pxfs bench", "-c", "user.email=bench@localhost",
        "-c", "gc.auto=0", *args,
    ]  # fmt: skip
    result = run_job(command, cwd=checkout, env=environment)
    if result.returncode != 0:
        raise BenchError(f"git {args[0]} in {checkout} failed: {result.stderr.strip()}")


def workload_times(system: str, directory: Path, tree: Path) -> Figures:
    """Copy `tree` into `directory`, commit it to a new git repository and run git status."""
    checkout = directory / "tree"
    progress(system, f"copy {tree}")
    times = {"copy_tree": time_call(lambda: shutil.copytree(tree, checkout, symlinks=True))}

    def commit() -> None:
        run_git(checkout, "init", "-q")
        run_git(checkout, "add", "-A")
        run_git(checkout, "commit", "-q", "-m", "x")

    progress(system, "git init, add -A, commit")
    times["git_commit"] = time_call(commit)
    progress(system, "git status")
    times["git_status"] = time_call(lambda: run_git(checkout, "status"))
    shutil.rmtree(checkout)
    return times


def measure(system: str, directory: Path, args: argparse.Namespace) -> Figures:
    """Run every job in `directory` and return the figures by name."""
    figures = fio_rates(system, directory, args.size_mib, args.seconds)
    figures.update(metadata_rates(system, directory, args.files))
    figures.update(workload_times(system, directory, args.tree))
    return figures


# Mounts and processes the benchmark owns.


def is_mounted(path: Path) -> bool:
    """Return whether `path` is a mount point, counting a dead FUSE mount as mounted."""
    try:
        return os.path.ismount(path)
    except OSError:
        return True


def unmount(path: Path) -> None:
    """Unmount a FUSE mount, retrying while it is busy. Raises BenchError if it stays mounted."""
    for _ in range(20):
        if not is_mounted(path):
            return
        if subprocess.run(["fusermount3", "-u", str(path)], capture_output=True).returncode == 0:
            return
        time.sleep(0.5)
    raise BenchError(f"unmount of {path} failed; unmount it by hand: fusermount3 -u {path}")


def stop_process(pid: int, label: str) -> None:
    """Send SIGTERM to `pid` and wait up to 30 s for it to exit, then SIGKILL and 5 s more."""
    for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists() or process_state(pid) == "Z":
                return
            time.sleep(0.1)
        print(f"bench: {label} (pid {pid}) did not exit after {sig.name}", file=sys.stderr)


def process_cmdline(pid: int) -> list[str]:
    """Return the command line of `pid`, or [] if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


# pxfs.


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
             "--socket", str(self.socket), "--log-level", "warning"],
            cwd=Path(__file__).resolve().parent.parent,
            start_new_session=True,
        )  # fmt: skip
        client = BlockingClient(self.socket)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                client.call("node.status")
                return client
            except errors.Unavailable:
                if self.process.poll() is not None:
                    break
                time.sleep(0.1)
        self.stop()
        raise BenchError("pxd failed to start; its log is on stderr above")

    def stop(self) -> None:
        """Stop pxd (it unmounts its volumes) and wait for it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)


def measure_pxfs_ha1(work: Path, args: argparse.Namespace) -> Figures:
    """Start a private pxd, mount a volume with one replica, measure it, tear it all down."""
    mountpoint = work / "mnt-pxfs"
    mountpoint.mkdir(exist_ok=True)
    node = Node(work / "node")
    node.root.mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:
        progress("pxfs_ha1", f"start pxd in {node.root}")
        register_teardown(stack, "stop pxd", node.stop)
        client = node.start()
        size = max(2 * GIB, 4 * args.size_mib * 1024 * 1024)
        client.call("volume.create", {"name": "bench", "size": size, "ha_level": 1, "labels": {}})
        register_teardown(stack, "delete the volume", lambda: client.call("volume.delete", "bench"))
        client.call("volume.attach", "bench")
        register_teardown(stack, "detach the volume", lambda: client.call("volume.detach", "bench"))
        client.call("volume.mount", "bench", str(mountpoint))
        register_teardown(
            stack, "unmount the volume",
            lambda: client.call("volume.unmount", "bench", str(mountpoint)),
        )  # fmt: skip
        figures = measure("pxfs_ha1", mountpoint, args)
    return figures


CLUSTER_TOOL = Path(__file__).resolve().parent / "cluster"
CLUSTER_NODES = 3
#: The longest cluster directory whose nodes' unix sockets still fit in the 107 bytes of a
#: socket path: a mount child listens on DIR/nodeN/data/mnt/ID.sock, with ids of 19 digits.
CLUSTER_DIR_MAX = 107 - len("/node1/data/mnt/.sock") - 19


def pxfs_ha3_unavailable() -> str | None:
    """Return why pxfs ha 3 cannot be measured on this host, or None if it can."""
    if shutil.which("etcd") is None:
        return "etcd is not installed (apt-get install etcd-server), and the cluster needs it"
    return None


def run_cluster_tool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run tools/cluster with `args`; raises BenchError when it fails."""
    result = run_job([sys.executable, str(CLUSTER_TOOL), *args], cwd=CLUSTER_TOOL.parent.parent)
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()
        raise BenchError(f"tools/cluster {' '.join(args)} failed: {output}")
    return result


def stop_cluster(directory: Path) -> None:
    """Stop what tools/cluster started in `directory`, if it got as far as writing its state."""
    if (directory / "cluster.json").exists():
        run_cluster_tool("stop", "--dir", str(directory))


def wait_nodes_online(client: BlockingClient, count: int) -> None:
    """Wait until the first node sees `count` nodes online, so placement can use them all."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        nodes = client.call("cluster.nodes")
        if sum(1 for node in nodes if node.get("online")) >= count:
            return
        time.sleep(0.2)
    raise BenchError(f"the cluster did not show {count} nodes online in {START_TIMEOUT:.0f} s")


@contextlib.contextmanager
def cluster_directory(work: Path) -> Iterator[Path]:
    """Yield WORK/cluster, or a new short directory in /tmp when that path is too long."""
    directory = (work / "cluster").resolve()
    if len(str(directory)) <= CLUSTER_DIR_MAX:
        yield directory
        return
    short = Path(tempfile.mkdtemp(prefix="pxfs-bench-", dir="/tmp"))
    try:
        yield short
    finally:
        if not leftover_mounts(short):
            shutil.rmtree(short, ignore_errors=True)


def measure_pxfs_ha3(work: Path, args: argparse.Namespace) -> Figures:
    """Start three local nodes, mount an ha 3 volume on node 1, measure it, tear it all down."""
    mountpoint = work / "mnt-pxfs3"
    mountpoint.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        directory = stack.enter_context(cluster_directory(work))
        progress("pxfs_ha3", f"start etcd and {CLUSTER_NODES} pxd nodes in {directory}")
        register_teardown(stack, "stop the cluster", lambda: stop_cluster(directory))
        run_cluster_tool("start", str(CLUSTER_NODES), "--dir", str(directory))
        state = json.loads((directory / "cluster.json").read_text())
        client = stack.enter_context(BlockingClient(state["nodes"][0]["socket"]))
        wait_nodes_online(client, CLUSTER_NODES)
        size = max(2 * GIB, 4 * args.size_mib * 1024 * 1024)
        client.call("volume.create", {"name": "bench3", "size": size, "ha_level": 3, "labels": {}})
        register_teardown(
            stack, "delete the ha 3 volume", lambda: client.call("volume.delete", "bench3")
        )
        client.call("volume.attach", "bench3")
        register_teardown(
            stack, "detach the ha 3 volume", lambda: client.call("volume.detach", "bench3")
        )
        client.call("volume.mount", "bench3", str(mountpoint))
        register_teardown(
            stack, "unmount the ha 3 volume",
            lambda: client.call("volume.unmount", "bench3", str(mountpoint)),
        )  # fmt: skip
        figures = measure("pxfs_ha3", mountpoint, args)
    return figures


# GlusterFS.


def loopback_host() -> str:
    """Return this host's name if it resolves only to 127.x addresses, else localhost.

    The gluster CLI rejects 127.0.0.1 as a brick host but accepts a name that resolves to it.
    """
    name = socket.gethostname()
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(name, None, socket.AF_INET)}
    except socket.gaierror:
        return "localhost"
    if addresses and all(address.startswith("127.") for address in addresses):
        return name
    return "localhost"


def port_in_use(port: int) -> bool:
    """Return whether something accepts TCP connections on 127.0.0.1:`port`."""
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def glusterfs_unavailable() -> str | None:
    """Return why GlusterFS cannot be measured here, or None if it can."""
    missing = [name for name in ("glusterd", "gluster", "glusterfs") if shutil.which(name) is None]
    if missing:
        return (
            f"{', '.join(missing)} not installed "
            "(apt-get install glusterfs-server glusterfs-client)"
        )
    if port_in_use(GLUSTERD_PORT):
        return (
            f"port {GLUSTERD_PORT} on 127.0.0.1 is in use, probably by another glusterd; "
            "the bricks can only reach their glusterd on that port"
        )
    return None


GLUSTERD_VOLFILE = """\
volume management
    type mgmt/glusterd
    option working-directory {state}
    option run-directory {run}
    option logging-directory {log}
    option glusterd-sockfile {sockfile}
    option transport-type socket
    option transport.socket.bind-address 127.0.0.1
    option transport.socket.listen-port {port}
    option ping-timeout 0
    option event-threads 1
end-volume
"""


class Gluster:
    """A private glusterd of the benchmark, with its state, run and log directories under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / "state"
        self.run_dir = root / "run"
        self.log_dir = root / "log"
        self.sockfile = self.run_dir / "glusterd.socket"
        self.process: subprocess.Popen[bytes] | None = None
        # glusterd 10.3 puts brick sockets in /var/run/gluster even with a run-directory, so
        # the benchmark notes the ones its own daemons use and removes them at the end.
        self.foreign_sockets: set[Path] = set()

    def start(self) -> None:
        """Write a private glusterd.vol, start glusterd in the foreground and wait for its CLI."""
        # NOTE: even with a private working-directory, glusterd 10.3 creates the empty
        # /var/lib/glusterd/ss_brick, /var/lib/glusterd/geo-replication/gsyncd_template.conf and
        # /var/run/gluster/snaps if they are missing. They are left in place for the package.
        for directory in (self.state, self.run_dir, self.log_dir):
            directory.mkdir(parents=True, exist_ok=True)
        if len(str(self.sockfile)) >= 108:
            raise BenchError(f"socket path {self.sockfile} is too long; use a shorter --work-dir")
        volfile = self.root / "glusterd.vol"
        volfile.write_text(
            GLUSTERD_VOLFILE.format(
                state=self.state, run=self.run_dir, log=self.log_dir, sockfile=self.sockfile,
                port=GLUSTERD_PORT,
            )
        )  # fmt: skip
        log_file = self.log_dir / "glusterd.log"
        self.process = subprocess.Popen(
            ["glusterd", "--no-daemon", "-f", str(volfile),
             "-p", str(self.run_dir / "glusterd.pid"), "-l", str(log_file)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"glusterd exited with {self.process.returncode}; see {log_file}")
            if self.sockfile.exists() and self.cli("volume", "list", check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise BenchError(f"glusterd timed out after {START_TIMEOUT:.0f} s; see {log_file}")

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run one gluster CLI command against this glusterd, without prompts."""
        command = [
            "gluster", "--mode=script", f"--glusterd-sock={self.sockfile}",
            f"--log-file={self.log_dir / 'cli.log'}", *args,
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            output = (result.stderr or result.stdout).strip()
            raise BenchError(f"gluster {' '.join(args)} failed: {output}")
        return result

    def wait_bricks_online(self, volume: str, count: int) -> None:
        """Wait until `count` bricks of `volume` are online, and note their sockets."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            status = self.cli("volume", "status", volume, "--xml", check=False)
            online = 0
            if status.returncode == 0:
                root = ElementTree.fromstring(status.stdout)
                for node in root.iter("node"):
                    if node.findtext("path", "").startswith("/") and node.findtext("status") == "1":
                        online += 1
            if online >= count:
                self.note_sockets()
                return
            time.sleep(0.5)
        raise BenchError(f"timed out waiting for the bricks of {volume}; see {self.log_dir}")

    def child_pids(self) -> list[int]:
        """Return the pids of bricks and daemons this glusterd started, from its pid files."""
        pids = []
        for pid_file in self.run_dir.rglob("*.pid"):
            if pid_file.name == "glusterd.pid":
                continue
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_file.read_text().strip())
                if str(self.run_dir) in " ".join(process_cmdline(pid)):
                    pids.append(pid)
        return pids

    def note_sockets(self) -> None:
        """Record the unix sockets outside the run directory that this glusterd's children use."""
        for pid in self.child_pids():
            cmdline = process_cmdline(pid)
            for flag, value in zip(cmdline, cmdline[1:], strict=False):
                if flag == "-S" and not value.startswith(str(self.run_dir)):
                    self.foreign_sockets.add(Path(value))

    def stop(self) -> None:
        """Stop glusterd by pid, then any brick or daemon it left, then remove their sockets."""
        if self.process is not None and self.process.poll() is None:
            self.note_sockets()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        for pid in self.child_pids():
            stop_process(pid, "a GlusterFS brick or daemon")
        for path in self.foreign_sockets:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def mount_glusterfs(gluster: Gluster, host: str, mountpoint: Path) -> None:
    """FUSE-mount the benchmark volume on `mountpoint` and wait until statvfs succeeds."""
    command = [
        "glusterfs", f"--volfile-server={host}", f"--volfile-id={GLUSTER_VOLUME}",
        f"--log-file={gluster.log_dir / 'mount.log'}",
        f"--pid-file={gluster.run_dir / 'mount.pid'}", str(mountpoint),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise BenchError(f"glusterfs mount failed: {result.stderr.strip()}; see {gluster.log_dir}")
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if is_mounted(mountpoint):
            with contextlib.suppress(OSError):
                os.statvfs(mountpoint)
                return
        time.sleep(0.2)
    raise BenchError(f"timed out waiting for the mount on {mountpoint}; see {gluster.log_dir}")


def stop_mount_client(gluster: Gluster) -> None:
    """Stop the glusterfs client process if unmounting left it running."""
    with contextlib.suppress(OSError, ValueError):
        pid = int((gluster.run_dir / "mount.pid").read_text().strip())
        if "glusterfs" in " ".join(process_cmdline(pid)):
            stop_process(pid, "the glusterfs client")


def measure_glusterfs(work: Path, args: argparse.Namespace) -> Figures:
    """Start a private glusterd, create and mount a replica 3 volume, measure, tear it down."""
    gluster = Gluster(work / "gluster")
    volume = GLUSTER_VOLUME
    host = loopback_host()
    bricks = [work / "gluster" / "bricks" / f"brick{i}" for i in (1, 2, 3)]
    for brick in bricks:
        brick.mkdir(parents=True, exist_ok=True)
    mountpoint = work / "mnt-gluster"
    mountpoint.mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:
        progress("glusterfs_r3", f"start glusterd in {gluster.root}, bricks on host {host}")
        register_teardown(stack, "stop glusterd", gluster.stop)
        gluster.start()
        # The CLI rejects three bricks on one server, here also on the root filesystem, without
        # "force".
        gluster.cli(
            "volume", "create", volume, "replica", "3",
            *(f"{host}:{brick}" for brick in bricks), "force",
        )  # fmt: skip
        register_teardown(
            stack, "delete the volume", lambda: gluster.cli("volume", "delete", volume)
        )
        # A failed start may leave some bricks running, and gluster.stop ends them by pid.
        gluster.cli("volume", "start", volume)
        register_teardown(stack, "stop the volume", lambda: gluster.cli("volume", "stop", volume))
        gluster.wait_bricks_online(volume, len(bricks))
        register_teardown(stack, "stop the glusterfs client", lambda: stop_mount_client(gluster))
        register_teardown(stack, "unmount GlusterFS", lambda: unmount(mountpoint))
        mount_glusterfs(gluster, host, mountpoint)
        figures = measure("glusterfs_r3", mountpoint, args)
    return figures


# The report.


def ratio(numerator: Figures | None, denominator: Figures | None, name: str) -> float | None:
    """Return numerator[name] / denominator[name].

    Returns None when either set of figures or either figure is missing, or the denominator
    is 0.
    """
    if numerator is None or denominator is None or not denominator.get(name):
        return None
    if name not in numerator:
        return None
    return numerator[name] / denominator[name]


def format_cell(value: float | None, width: int, digits: int) -> str:
    """Format one table cell, with a dash for a missing value."""
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


#: The ratio columns: (JSON key, table header, numerator system, denominator system).
RATIOS = (
    ("pxfs_raw", "pxfs/raw", "pxfs_ha1", "raw"),
    ("pxfs_glusterfs", "pxfs/GlusterFS", "pxfs_ha1", "glusterfs_r3"),
    ("pxfs_ha3_glusterfs", "ha3/GlusterFS", "pxfs_ha3", "glusterfs_r3"),
    ("pxfs_floor", "pxfs/floor", "pxfs_ha1", "fuse_floor"),
)


def print_table(results: dict[str, Figures | None], not_measured: dict[str, str]) -> None:
    """Print the figures of every system side by side with the pxfs ratios."""
    header = f"{'figure':<34}{'unit':<7}"
    header += "".join(f"{label:>14}" for label in SYSTEMS.values())
    header += "".join(f"{title:>16}" for _, title, _, _ in RATIOS)
    print(header)
    for name, (label, unit) in FIGURES.items():
        line = f"{label:<34}{unit:<7}"
        for system in SYSTEMS:
            figures = results[system]
            digits = 2 if unit == "s" else 1
            line += format_cell(None if figures is None else figures.get(name), 14, digits)
        for _, _, numerator, denominator in RATIOS:
            line += format_cell(ratio(results[numerator], results[denominator], name), 16, 2)
        print(line)
    for system, reason in not_measured.items():
        print(f"{SYSTEMS[system]}: not measured: {reason}")
    print(
        "pxfs/raw, pxfs/GlusterFS and pxfs/floor divide the pxfs ha 1 figure by the other one, "
        "ha3/GlusterFS the pxfs ha 3 one; for figures in s, lower is better. The FUSE floor "
        "stores nothing, so it runs the fio jobs only."
    )


def build_report(
    args: argparse.Namespace, results: dict[str, Figures | None], not_measured: dict[str, str]
) -> dict[str, object]:
    """Collect the figures, units, ratios and parameters of a run for the JSON file."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "parameters": {
            "size_mib": args.size_mib, "seconds": args.seconds, "files": args.files,
            "tree": str(args.tree), "smoke": args.smoke, "gluster_host": loopback_host(),
            "systems": args.systems,
        },
        "units": {name: unit for name, (_, unit) in FIGURES.items()},
        "systems": results,
        "not_measured": not_measured,
        "ratios": {
            key: {name: ratio(results[top], results[bottom], name) for name in FIGURES}
            for key, _, top, bottom in RATIOS
        },
    }  # fmt: skip


# The command.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line. --smoke replaces the sizes with tiny ones."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="where every system's files and state go "
        "(default: a new temporary directory, removed afterwards)",
    )
    parser.add_argument("--size-mib", type=int, default=1024, help="fio file size in MiB")
    parser.add_argument("--seconds", type=int, default=30, help="duration of each random job in s")
    parser.add_argument("--files", type=int, default=10000, help="files to create, stat, unlink")
    parser.add_argument(
        "--tree",
        type=Path,
        help="directory tree to copy and commit to git "
        "(default: the Python standard library; its json package with --smoke)",
    )
    parser.add_argument(
        "--systems",
        type=parse_systems,
        default=list(SYSTEMS),
        help=f"comma-separated systems to measure (default: all of {','.join(SYSTEMS)})",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes (8 MiB, 1 s, 200 files), to test the tool"
    )

    args = parser.parse_args(argv)
    if args.smoke:
        args.size_mib, args.seconds, args.files = 8, 1, 200
    if args.tree is None:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        args.tree = stdlib / "json" if args.smoke else stdlib

    for name in ("size_mib", "seconds", "files"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.tree.is_dir():
        parser.error(f"--tree {args.tree} is not a directory")
    return args


def parse_systems(text: str) -> list[str]:
    """Parse --systems: known system names separated by commas, in the order of SYSTEMS."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SYSTEMS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown system {', '.join(unknown) or 'list'!r}: choose from {', '.join(SYSTEMS)}"
        )
    return [name for name in SYSTEMS if name in names]


def check_prerequisites() -> None:
    """Raise BenchError when a tool every run needs is missing or the user is not root."""
    if os.geteuid() != 0:
        raise BenchError("run as root: dropping caches and mounting FUSE need it")
    for tool, package in (("fio", "fio"), ("git", "git"), ("fusermount3", "fuse3")):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not installed (apt-get install {package})")


def unavailable_systems(args: argparse.Namespace) -> dict[str, str]:
    """Return why each system that this run does not measure is left out."""
    not_measured = {name: "not chosen with --systems" for name in SYSTEMS}
    for name in args.systems:
        del not_measured[name]
    reasons = {"pxfs_ha3": pxfs_ha3_unavailable, "glusterfs_r3": glusterfs_unavailable}
    for name, check in reasons.items():
        reason = check() if name in args.systems else None
        if reason is not None:
            not_measured[name] = reason
    return not_measured


def run(args: argparse.Namespace, work: Path) -> dict[str, object]:
    """Measure every system in `work`, print the table and return the report."""
    results: dict[str, Figures | None] = dict.fromkeys(SYSTEMS)
    not_measured = unavailable_systems(args)
    measurers: dict[str, Callable[[Path, argparse.Namespace], Figures]] = {
        "raw": measure_raw,
        "pxfs_ha1": measure_pxfs_ha1,
        "pxfs_ha3": measure_pxfs_ha3,
        "glusterfs_r3": measure_glusterfs,
        "fuse_floor": measure_fuse_floor,
    }
    for system, measurer in measurers.items():
        if system in not_measured:
            progress(system, f"not measured: {not_measured[system]}")
        else:
            results[system] = measurer(work, args)

    print_table(results, not_measured)
    return build_report(args, results, not_measured)


def measure_raw(work: Path, args: argparse.Namespace) -> Figures:
    """Measure the directory `raw` in the work directory."""
    raw_dir = work / "raw"
    raw_dir.mkdir(exist_ok=True)
    return measure("raw", raw_dir, args)


FLOOR_TOOL = Path(__file__).resolve().parent / "fusefloor.py"


def measure_fuse_floor(work: Path, args: argparse.Namespace) -> Figures:
    """Mount tools/fusefloor.py, run the fio jobs on it, then unmount it and stop it."""
    mountpoint = work / "mnt-floor"
    mountpoint.mkdir(exist_ok=True)
    log_path = work / "fusefloor.log"
    command = [sys.executable, str(FLOOR_TOOL), str(mountpoint), "--size-mib", str(args.size_mib)]
    with contextlib.ExitStack() as stack, log_path.open("wb") as log:
        progress("fuse_floor", f"mount {FLOOR_TOOL.name} on {mountpoint}")
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
        register_teardown(stack, "stop the FUSE floor", lambda: stop_process(process.pid, "floor"))
        register_teardown(stack, "unmount the FUSE floor", lambda: unmount(mountpoint))
        deadline = time.monotonic() + START_TIMEOUT
        while not is_mounted(mountpoint):
            if process.poll() is not None:
                output = log_path.read_text(errors="replace").strip()
                raise BenchError(
                    f"the FUSE floor failed to mount, exit status {process.returncode}: {output}"
                )
            if time.monotonic() > deadline:
                raise BenchError(
                    f"timed out after {START_TIMEOUT:.0f} s waiting for the FUSE floor to mount"
                )
            time.sleep(0.05)
        return fio_rates("fuse_floor", mountpoint, args.size_mib, args.seconds, remove=False)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print its table and write the JSON file."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        check_prerequisites()
        with work_directory(args.work_dir, "pxfs-bench-") as work:
            report = run(args, work)
    except (BenchError, errors.PxfsError) as error:
        print(f"bench: {error}", file=sys.stderr)
        print(f"bench: {teardown_outcome()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"bench: interrupted; {teardown_outcome()}", file=sys.stderr)
        return 130
    if TEARDOWN_FAILURES:
        print(f"bench: {teardown_outcome()}", file=sys.stderr)
        return 1
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
