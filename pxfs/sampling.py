"""I/O statistics of pxd's volumes: sampling the mount children and the stats methods."""

from __future__ import annotations

import logging
import time
from typing import Any

import trio

from pxfs.catalog import VolumeRecord
from pxfs.errors import InvalidArgument, PxfsError
from pxfs.nodebase import MountChild, NodeBase, now_ns
from pxfs.stats import LIVE_WINDOW, Counters

log = logging.getLogger(__name__)

#: Seconds between two samples of a mount child's I/O counters, and how long one may take.
SAMPLE_INTERVAL = 1.0
SAMPLE_TIMEOUT = 2.0
#: Seconds between two saves of the I/O statistics that changed. A crash of pxd loses the I/O
#: counted since the last save.
SAVE_INTERVAL = 10.0


class StatsSampling(NodeBase):
    """Samples the I/O counters of every mount child and serves the volume.stats* methods."""

    async def volume_stats(self, ref: Any, cumulative: Any = True) -> dict[str, int]:
        """Return the I/O totals since the volume was created; not `cumulative`: the live ones."""
        if not isinstance(cumulative, bool):
            raise InvalidArgument(f"cumulative must be true or false, not {cumulative!r}")
        if not cumulative:
            return await self.volume_stats_live(ref)
        record = await self._catalog().find_volume(ref)
        stats = self._stats().get(record["id"])
        age_ms = max(0, (now_ns() - record.get("ctime_ns", 0)) // 1_000_000)
        return await self._stats_report(record, stats.totals, age_ms)

    async def volume_stats_live(self, ref: Any) -> dict[str, int]:
        """Return the I/O of the last 2 seconds through the volume's mount."""
        record = await self._catalog().find_volume(ref)
        if not self._child_running(record["id"]):
            return await self._stats_report(record, Counters(), int(LIVE_WINDOW * 1000))
        counters, interval_ms, _ = self._stats().get(record["id"]).live(trio.current_time())
        return await self._stats_report(record, counters, interval_ms)

    async def _stats_report(
        self, record: VolumeRecord, counters: Counters, interval_ms: int
    ) -> dict[str, int]:
        stats = self._stats().get(record["id"])
        in_flight = stats.in_flight if self._child_running(record["id"]) else 0
        return {
            **counters.to_report(),
            "io_progress": in_flight,
            "bytes_used": await self._usage(record["id"]),
            "interval_ms": interval_ms,
        }

    async def volume_stats_history(self, ref: Any) -> dict[str, list[dict[str, Any]]]:
        """Return the hourly, daily and monthly I/O sums of the volume, oldest first."""
        record = await self._catalog().find_volume(ref)
        history = self._stats().get(record["id"]).history
        history.roll_up(time.time())
        return history.report()

    async def _sample_periodically(self, child: MountChild, process: trio.Process) -> None:
        """Sample the I/O counters of `process` about once a second until it exits."""
        while child.process is process and not child.exited.is_set():
            await self._sample(child)
            await trio.sleep(SAMPLE_INTERVAL)

    async def _sample(self, child: MountChild) -> None:
        """Fold one sample of the child's counters into the volume's statistics."""
        try:
            sample = await self._call_child(child, SAMPLE_TIMEOUT, "mount.stats")
        except PxfsError as exc:
            if child.exited.is_set():
                return
            # The child is starting, stopping or stuck, and the next sample tries again. Only
            # the first failure in a row is a warning, so a stuck child does not flood the log.
            level = logging.DEBUG if child.sample_failures else logging.WARNING
            child.sample_failures += 1
            log.log(level, "volume %s: sampling I/O counters failed: %s", child.vol_id, exc.message)
            return
        child.sample_failures = 0
        try:
            self._stats().get(child.vol_id).apply_sample(sample, time.time(), trio.current_time())
        except ValueError as exc:
            log.warning(
                "volume %s: invalid I/O counters from the mount child: %s", child.vol_id, exc
            )

    async def _save_stats_periodically(self) -> None:
        while True:
            await trio.sleep(SAVE_INTERVAL)
            await self._stats().save_changed()
