"""Mount children: starting, supervising and stopping them (their binds: pxfs/binds.py).

Each mount child serves its volume's FUSE filesystem at a private mountpoint, DIR/mnt/<id>, and
pxd bind-mounts that onto every host path where the volume is mounted. So one child serves any
number of paths, and unmounting one path never disturbs the others. When a child dies, its
binds stay, so that every access to the volume's paths fails with ENOTCONN instead of reaching
the directories under them. pxd raises the epoch and starts a new child, with retries and
backoff, and puts a bind of the new child's mount beneath each old bind before it unmounts
the old one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from pxfs.binds import VolumeBinds
from pxfs.catalog import VolumeRecord
from pxfs.datadir import MOUNTS_DIR
from pxfs.errors import Busy, PxfsError, Unavailable
from pxfs.hostmounts import (
    is_mounted,
    lazy_unmount,
    syncfs,
)
from pxfs.nodebase import FencedVolume, MountChild, child_replica_order, replica_set
from pxfs.orphanchild import process_state, stop_orphan_child
from pxfs.tls import TlsFiles

log = logging.getLogger(__name__)

#: How long a mount child may take to print "ready", and to exit after SIGTERM.
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
#: How long the kernel may take to write a volume's dirty pages to its child before it stops.
SYNC_TIMEOUT = 30.0
#: Failed restarts in a row before pxd logs an error, and the backoff between restarts.
MAX_RESTARTS = 5
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
#: A child that ran this long before dying counts as healthy: its restart count starts over.
STABLE_AFTER = 60.0
#: The longest path of a unix socket that Linux accepts (sun_path is 108 bytes with the NUL).
MAX_SOCKET_PATH = 107
#: Seconds between two checks that the volume of each running mount child is still attached
#: here at the child's epoch.
ATTACHMENT_CHECK_INTERVAL = 3.0


class ChildSupervisor(VolumeBinds):
    """Starts one mount child per mounted volume, restarts it when it dies, binds its paths."""

    def _new_child(self, vol_id: str) -> MountChild:
        mounts = self.data_dir / MOUNTS_DIR
        child = MountChild(vol_id, str(mounts / vol_id), str(mounts / f"{vol_id}.sock"))
        self._mounts[vol_id] = child
        return child

    async def _child_argv(self, record: VolumeRecord, epoch: int) -> list[str]:
        argv = [
            sys.executable, "-m", "daemon.mount",
            "--peer-socket", str(self.peer_socket),
            "--secret-file", str(self.secret_file),
            "--volume-id", record["id"],
            "--epoch", str(epoch),
        ]  # fmt: skip
        nodes = child_replica_order(record["replica_nodes"], self.node_id)
        for node_id, address in zip(nodes, await self.peers.addresses(nodes), strict=True):
            argv += ["--replica", f"{node_id}={address}"]
        for node_id in record.get("out_of_sync") or []:
            argv += ["--out-of-sync", node_id]
        tls = TlsFiles.from_config(self.config)
        if tls is not None:
            argv += tls.child_arguments()
        return argv

    def _child_env(self) -> dict[str, Any]:
        # The child must import daemon.mount from the tree of this pxd, whatever its cwd; the
        # daemon and pxfs packages sit side by side.
        root = str(Path(__file__).resolve().parent.parent)
        path = os.environ.get("PYTHONPATH")
        env = dict(os.environ, PYTHONPATH=root + (os.pathsep + path if path else ""))
        return {"env": env, "cwd": "/"}

    async def _ensure_running(self, record: VolumeRecord) -> MountChild:
        child = self._mounts.get(record["id"])
        if child is not None and child.running:
            return child
        if child is None:
            # A child numbers its writes from the bottom of its epoch, so each one gets an epoch
            # that no earlier child of the volume wrote at, as a respawn does.
            record = await self._catalog().update_volume(record["id"], self._raise_epoch)
            child = self._new_child(record["id"])
            await self._spawn(child, record)
        else:
            await self._respawn(child)
        return child

    async def _respawn(self, child: MountChild) -> None:
        """Replace a dead child: raise the epoch, start a new one, bind its paths again."""
        paths = list(child.paths)
        await self._detach_dead_mount(child)
        child.paths.clear()
        try:
            record = await self._catalog().update_volume(child.vol_id, self._raise_epoch)
            await self._spawn(child, record)
        except BaseException:
            child.paths[:] = paths
            raise
        await self._bind_paths(child, paths)
        child.dead_device = None

    async def _spawn(self, child: MountChild, record: VolumeRecord) -> None:
        """Start the child at its private mountpoint and wait until it prints "ready"."""
        epoch = record["epoch"]
        process = await self._start_process(child, record)
        assert process.stdout is not None
        try:
            ready = await self._wait_ready(child, process.stdout)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._reap(child, process)
            raise

        if not ready:
            with trio.CancelScope(shield=True):
                status = await self._reap(child, process)
            raise Unavailable(
                f"mount child of volume {child.vol_id} failed to start (exit status {status}): "
                f"{child.last_error()}"
            )
        log.info(
            "volume %s: mount child pid %d ready at epoch %d", child.vol_id, process.pid, epoch
        )
        self._live_nursery().start_soon(self._supervise, child, process)
        self._live_nursery().start_soon(self._sample_periodically, child, process)

    async def _start_process(self, child: MountChild, record: VolumeRecord) -> trio.Process:
        epoch = record["epoch"]
        await lazy_unmount(child.mountpoint)
        await stop_orphan_child(child.vol_id, child.control_socket)
        if len(os.fsencode(child.control_socket)) > MAX_SOCKET_PATH:
            raise Unavailable(
                f"cannot start the mount child of volume {child.vol_id}: its control socket "
                f"path {child.control_socket} is longer than {MAX_SOCKET_PATH} bytes; use a "
                "data directory with a shorter path"
            )
        argv = await self._child_argv(record, epoch) + [
            "--mountpoint", child.mountpoint,
            "--size", str(record["size"]),
            "--control-socket", child.control_socket,
        ]  # fmt: skip
        try:
            os.makedirs(child.mountpoint, mode=0o700, exist_ok=True)
            process = await trio.lowlevel.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                **self._child_env(),
            )  # fmt: skip
        except OSError as exc:
            raise Unavailable(
                f"cannot start the mount child of volume {child.vol_id}: {exc}"
            ) from None

        child.generation += 1
        child.sample_failures = 0
        child.process, child.epoch, child.stopping = process, epoch, False
        child.replica_nodes = replica_set(record)
        child.exited, child.stderr_closed = trio.Event(), trio.Event()
        child.exit_status = None
        child.started_at = trio.current_time()
        assert process.stderr is not None
        self._live_nursery().start_soon(self._forward_stderr, child, process.stderr)
        return process

    async def _wait_ready(self, child: MountChild, stdout: trio.abc.ReceiveStream) -> bool:
        lines = _Lines(stdout)
        with trio.move_on_after(READY_TIMEOUT):
            while (line := await lines.next()) is not None:
                if line.strip() == "ready":
                    self._live_nursery().start_soon(_drain, stdout)
                    return True
                log.info("volume %s: mount child: %s", child.vol_id, line)
            return False
        log.error(
            "volume %s: mount child did not become ready within %g s", child.vol_id, READY_TIMEOUT
        )
        return False

    async def _reap(self, child: MountChild, process: trio.Process) -> int:
        """Kill a child that never became ready and clean up after it; return its status."""
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        status = await process.wait()
        with trio.move_on_after(1):
            await child.stderr_closed.wait()
        await lazy_unmount(child.mountpoint)
        child.exited.set()
        child.process = None
        return status

    async def _forward_stderr(self, child: MountChild, stream: trio.abc.ReceiveStream) -> None:
        """Copy the child's log to ours, keeping the last lines for error messages."""
        lines = _Lines(stream)
        while (line := await lines.next()) is not None:
            child.stderr_tail.append(line)
            _copy_to_stderr(line)
        child.stderr_closed.set()

    async def _supervise(self, child: MountChild, process: trio.Process) -> None:
        """Wait for the child to exit; start a new one unless pxd stopped it on purpose."""
        status = await process.wait()
        child.exit_status = status
        child.exited.set()
        if child.stopping or child.process is not process:
            return
        self._stats().get(child.vol_id).child_stopped()
        log.warning(
            "volume %s: mount child pid %d exited unexpectedly with status %d; remounting %s",
            child.vol_id,
            process.pid,
            status,
            ", ".join(child.paths),
        )
        await self._detach_dead_mount(child)
        if trio.current_time() - child.started_at > STABLE_AFTER:
            child.failures = 0
        await self._recover(child)

    async def _recover(self, child: MountChild) -> None:
        """Restart a dead child with exponential backoff until it starts or the volume goes.

        The delay doubles from FIRST_BACKOFF to MAX_BACKOFF and stays there, so a child that
        cannot start for a while, on a full disk for instance, comes back once it can.
        """
        while True:
            child.failures += 1
            if child.failures == MAX_RESTARTS + 1:
                log.error(
                    "volume %s: the mount child failed %d times in a row; trying again every "
                    "%g s, and every access to %s fails until then",
                    child.vol_id,
                    MAX_RESTARTS,
                    MAX_BACKOFF,
                    ", ".join(child.paths) or "its paths",
                )
            await trio.sleep(min(FIRST_BACKOFF * 2 ** (child.failures - 1), MAX_BACKOFF))
            generation = child.generation
            async with self._volume_locks[child.vol_id]:
                if self._gone(child) or child.generation != generation or child.running:
                    return
                try:
                    await self._respawn(child)
                except PxfsError as exc:
                    log.error(
                        "volume %s: restart %d of the mount child failed: %s",
                        child.vol_id,
                        child.failures,
                        exc.message,
                    )
                    continue
                except Exception:
                    # A bug here must not take down pxd and every other volume with it.
                    log.exception(
                        "volume %s: restart %d of the mount child failed",
                        child.vol_id,
                        child.failures,
                    )
                    continue
            log.info(
                "volume %s: mount child restarted; mounted again at %s",
                child.vol_id,
                ", ".join(child.paths) or "no path",
            )
            return

    async def _fence_lost_volumes(self) -> None:
        """Stop the mount children of volumes that a newer attach took away from this node.

        A node cut off from etcd and its peers cannot see the takeover; this runs once it can
        read the catalog again. Raises Unavailable when the catalog cannot be read.
        """
        running = [child for child in self._mounts.values() if child.running]
        if not running:
            return
        records = {record["id"]: record for record in await self._catalog().list_volumes()}
        for child in running:
            if child.vol_id in records:
                child.replica_nodes = replica_set(records[child.vol_id])
            if not self._lost(child, records.get(child.vol_id)):
                continue
            async with self._volume_locks[child.vol_id]:
                # A restart or an unmount may have replaced or stopped the child meanwhile.
                found = await self._catalog().get_volume(child.vol_id)
                record = found.record if found is not None else None
                if self._mounts.get(child.vol_id) is child and self._lost(child, record):
                    await self._fence(child, record)

    def _lost(self, child: MountChild, record: VolumeRecord | None) -> bool:
        """Tell whether a running child serves a volume that is no longer its to serve."""
        if not child.running or child.stopping:
            return False
        if record is None:
            return True
        return bool(record["attached_on"] != self.node_id or record["epoch"] > child.epoch)

    async def _fence(self, child: MountChild, record: VolumeRecord | None) -> None:
        """Unmount every path of a child whose volume was taken over, then stop the child."""
        where = (
            f"attached on node {record['attached_on'] or 'none'} at epoch {record['epoch']}"
            if record is not None
            else "deleted"
        )
        log.warning(
            "volume %s: %s, so the mount child of epoch %d stops; unmounting %s",
            child.vol_id,
            where,
            child.epoch,
            ", ".join(child.paths) or "no path",
        )
        # The paths go first, so no new open reaches the old child. Its writes fail meanwhile,
        # because the replicas and the catalog reject its epoch.
        child.stopping = True
        await self._detach_dead_paths(child)
        child.paths.clear()
        await self._stop_child(child, sync=False)

    async def _fence_self(self) -> None:
        """Stop the mount child of every volume that another node could take over from here.

        This runs when this node's etcd lease may lapse soon, before etcd can let another node
        attach its volumes. A volume whose only replica is here cannot move, so it stays.
        """
        children = [
            child
            for child in list(self._mounts.values())
            if child.running and not child.stopping and self._movable(child)
        ]
        # Every volume is cut off before pxd waits for any child to exit, because a child that
        # flushes to a replica out of reach takes seconds to go.
        for child in children:
            await self._cut_child_off(child)
        async with trio.open_nursery() as nursery:
            for child in children:
                nursery.start_soon(self._stop_fenced_child, child)

    async def _stop_fenced_child(self, child: MountChild) -> None:
        try:
            await self._stop_child(child, sync=False)
        except Exception:
            # One child that fails to stop must not leave the others running.
            log.exception("volume %s: stopping the fenced mount child failed", child.vol_id)

    def _movable(self, child: MountChild) -> bool:
        return any(node_id != self.node_id for node_id in child.replica_nodes)

    async def _cut_child_off(self, child: MountChild) -> None:
        """Unmount the paths of a child, SIGTERM it and remember the volume as fenced here."""
        others = [node_id for node_id in child.replica_nodes if node_id != self.node_id]
        log.warning(
            "volume %s: the etcd lease of this node may lapse, and then node %s can take the "
            "volume over; the mount child of epoch %d stops, unmounting %s",
            child.vol_id,
            ", ".join(others),
            child.epoch,
            ", ".join(child.paths) or "no path",
        )
        # No volume lock: an operation holding it may wait for etcd longer than the lease has
        # left. Marked as stopping, the child is not restarted by its supervisor.
        child.stopping = True
        self._self_fenced[child.vol_id] = FencedVolume(child, list(child.paths))
        await self._detach_dead_paths(child)
        child.paths.clear()
        if child.process is not None:
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)

    def _gone(self, child: MountChild) -> bool:
        return child.stopping or self._shutting_down or self._mounts.get(child.vol_id) is not child

    def _raise_epoch(self, record: VolumeRecord) -> VolumeRecord:
        if record["attached_on"] != self.node_id:
            raise Busy(f"volume {record['id']} is no longer attached on this node")
        record["epoch"] += 1
        return record

    async def _stop_child(self, child: MountChild, *, sync: bool = True) -> None:
        """SIGTERM the child, wait for it to exit and make sure its mountpoint is gone.

        With `sync`, the kernel first writes the volume's dirty pages to the child; a fenced
        child, whose every write fails, is stopped without.
        """
        child.stopping = True
        process = child.process
        if process is not None and child.running:
            if sync:
                await self._sync_kernel_cache(child)
            # The last I/O, the writeback that syncfs caused included, is counted before the
            # child goes.
            await self._sample(child)
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
                # A stopped child handles SIGTERM only once it runs again.
                process.send_signal(signal.SIGCONT)
            with trio.move_on_after(STOP_TIMEOUT) as scope:
                await child.exited.wait()
            if scope.cancelled_caught:
                log.error(
                    "volume %s: mount child pid %d did not exit within %g s; killing it",
                    child.vol_id,
                    process.pid,
                    STOP_TIMEOUT,
                )
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                with trio.move_on_after(STOP_TIMEOUT):
                    await child.exited.wait()
                if not child.exited.is_set():
                    log.error(
                        "volume %s: mount child pid %d survived SIGKILL for %g s",
                        child.vol_id,
                        process.pid,
                        STOP_TIMEOUT,
                    )
        if is_mounted(child.mountpoint):
            log.warning(
                "volume %s: %s is still mounted after its mount child exited",
                child.vol_id,
                child.mountpoint,
            )
            await lazy_unmount(child.mountpoint)
        child.process = None
        self._stats().get(child.vol_id).child_stopped()
        await self._stats().save(child.vol_id)
        if self._mounts.get(child.vol_id) is child:
            del self._mounts[child.vol_id]

    def _continue_if_stopped(self, child: MountChild) -> None:
        """Send SIGCONT to a child that a signal stopped, so that it can write back and exit.

        A stopped child would block the syncfs, the write-back and the SIGTERM of its stop, and
        its unwritten data would be lost when it is killed.
        """
        process = child.process
        if process is None or not child.running or process_state(process.pid) != "T":
            return
        log.warning(
            "volume %s: mount child pid %d is stopped; sending SIGCONT to stop it cleanly",
            child.vol_id,
            process.pid,
        )
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGCONT)

    async def _sync_kernel_cache(self, child: MountChild) -> None:
        """Have the kernel write the volume's dirty pages to the child before it is stopped."""
        self._continue_if_stopped(child)
        # The kernel's writeback cache can hold writes to files that are still open. A child
        # stopped before they reach it loses them, even on a clean shutdown.
        with trio.move_on_after(SYNC_TIMEOUT) as scope:
            try:
                await trio.to_thread.run_sync(syncfs, child.mountpoint, abandon_on_cancel=True)
            except OSError as exc:
                log.warning(
                    "volume %s: syncfs of %s failed: %s; recent writes may be lost",
                    child.vol_id,
                    child.mountpoint,
                    exc.strerror,
                )
        if scope.cancelled_caught:
            log.warning(
                "volume %s: syncfs of %s did not finish within %g s; recent writes may be lost",
                child.vol_id,
                child.mountpoint,
                SYNC_TIMEOUT,
            )


class _Lines:
    """Lines of text from a byte stream, without their newlines."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""
        self._eof = False

    async def next(self) -> str | None:
        """Return the next line, or None at the end of the stream."""
        while b"\n" not in self._buffer and not self._eof:
            data = await self._stream.receive_some(65536)
            self._eof = not data
            self._buffer += data
        if not self._buffer:
            return None
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode(errors="replace")


def _copy_to_stderr(line: str) -> None:
    """Write one line of a child's log to pxd's stderr, dropping it if stderr is unusable."""
    # The reader of pxd's stderr can go away first (`run-node | tee log`, then Ctrl-C). A
    # BrokenPipeError here must not stop pxd in the middle of unmounting its volumes.
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    async for _ in stream:
        pass
