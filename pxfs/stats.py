"""I/O statistics of volumes: the mount child's counters, pxd's live window and history.

The mount child counts the reads and writes that its FUSE handlers serve with an `IoMeter`.
Its counters start at zero with each child process. pxd samples them about once a second and
folds the growth since the previous sample into the volume's `VolumeStats`:

- `totals`: cumulative counters since the volume was created;
- a live window of recent samples, from which the last 2 seconds are computed;
- `History`: hourly, daily and monthly sums. An hourly entry older than 24 hours, or beyond the
  24th, is added into the daily entry of its day. A daily entry older than 31 days, or beyond
  the 31st, is added into the monthly entry of its month. Monthly entries older than 12 months
  are dropped.

`StatsStore` keeps the totals and history of each volume in DIR/stats/<id>.json, written
atomically. A file that cannot be read is logged, renamed to <id>.json.corrupt and replaced by
empty statistics, so a damaged file never stops pxd.

Times spent are kept in nanoseconds and reported in milliseconds. `io_ns` is the time during
which at least one request was in flight, like the io_ticks of /proc/diskstats.
"""

from __future__ import annotations

import bisect
import calendar
import collections
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import trio

from pxfs.datadir import write_file_atomically

log = logging.getLogger(__name__)

STATS_DIR = "stats"
FORMAT_VERSION = 1
#: Seconds of I/O that volume.stats_live covers.
LIVE_WINDOW = 2.0
#: Age in seconds after which a sample is dropped from the live window, because it no longer
#: describes the present.
WINDOW_KEEP = LIVE_WINDOW + 3.0
HOUR = 3600
DAY = 24 * HOUR
MAX_HOURLY = 24
MAX_DAILY = 31
MAX_MONTHLY = 12
TIERS = ("hourly", "daily", "monthly")


@dataclass
class Counters:
    """I/O counters of one volume: requests, bytes and nanoseconds spent."""

    reads: int = 0
    read_bytes: int = 0
    read_ns: int = 0
    writes: int = 0
    write_bytes: int = 0
    write_ns: int = 0
    io_ns: int = 0

    def plus(self, other: Counters) -> Counters:
        """Return the sum of these counters and `other`, field by field."""
        return Counters(*(a + b for a, b in zip(self._values(), other._values(), strict=True)))

    def growth_since(self, earlier: Counters) -> Counters:
        """Return how much each field grew since `earlier`, never below zero."""
        values = zip(self._values(), earlier._values(), strict=True)
        return Counters(*(max(0, now - then) for now, then in values))

    def covers(self, earlier: Counters) -> bool:
        """True if no field is below its value in `earlier`."""
        return all(now >= then for now, then in zip(self._values(), earlier._values(), strict=True))

    def is_zero(self) -> bool:
        """True if every field is zero."""
        return not any(self._values())

    def to_dict(self) -> dict[str, int]:
        """Return the fields by name, as they are stored."""
        return dataclasses.asdict(self)

    def to_report(self) -> dict[str, int]:
        """Return the keys of the OSD Stats object, with times in milliseconds."""
        return {
            "reads": self.reads,
            "read_ms": self.read_ns // 1_000_000,
            "read_bytes": self.read_bytes,
            "writes": self.writes,
            "write_ms": self.write_ns // 1_000_000,
            "write_bytes": self.write_bytes,
            "io_ms": self.io_ns // 1_000_000,
        }

    @classmethod
    def from_dict(cls, values: Any) -> Counters:
        """Build counters from a stored or sampled map. Raises ValueError if one is invalid."""
        if not isinstance(values, dict):
            raise ValueError(f"expected a map of counters, not {values!r:.100}")
        fields = {}
        for name in COUNTER_FIELDS:
            value = values.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"counter {name!r} is missing or invalid: {value!r:.100}")
            fields[name] = value
        return cls(**fields)

    def _values(self) -> tuple[int, ...]:
        return dataclasses.astuple(self)


COUNTER_FIELDS = tuple(f.name for f in dataclasses.fields(Counters))


# The mount child's side


class IoMeter:
    """The counters of the requests that a mount child serves, and the number in flight."""

    def __init__(self, clock: Any = time.monotonic_ns) -> None:
        #: A random id per process, so pxd notices a restarted child, whose counters restart.
        self.boot_id = secrets.token_hex(8)
        self.counters = Counters()
        self.in_flight = 0
        self._clock = clock
        self._busy_since = 0

    def measure(self, kind: str) -> _Request:
        """Return a context manager that counts one "read" or "write" request."""
        return _Request(self, kind)

    def snapshot(self) -> dict[str, Any]:
        """Return the counters as pxd samples them, with the busy time up to now."""
        counters = dataclasses.replace(self.counters)
        if self.in_flight:
            counters.io_ns += self._clock() - self._busy_since
        return {"boot_id": self.boot_id, "in_flight": self.in_flight, **counters.to_dict()}

    def _begin(self) -> int:
        now: int = self._clock()
        if self.in_flight == 0:
            self._busy_since = now
        self.in_flight += 1
        return now

    def _end(self, kind: str, started: int, nbytes: int | None) -> None:
        now: int = self._clock()
        self.in_flight -= 1
        if self.in_flight == 0:
            self.counters.io_ns += now - self._busy_since
        if nbytes is None:
            return
        if kind == "read":
            self.counters.reads += 1
            self.counters.read_bytes += nbytes
            self.counters.read_ns += now - started
        else:
            self.counters.writes += 1
            self.counters.write_bytes += nbytes
            self.counters.write_ns += now - started


class _Request:
    """One request in flight. Set `nbytes` when it succeeds, or it counts as failed."""

    __slots__ = ("_meter", "_kind", "_started", "nbytes")

    def __init__(self, meter: IoMeter, kind: str) -> None:
        self._meter = meter
        self._kind = kind
        self._started = 0
        self.nbytes: int | None = None

    def __enter__(self) -> _Request:
        self._started = self._meter._begin()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # A failed request leaves the in-flight count but is not counted as served.
        self._meter._end(self._kind, self._started, self.nbytes if exc is None else None)


# History


def hour_start(wall: float) -> int:
    """Return the start of the UTC hour that contains `wall` (seconds since the epoch)."""
    return int(wall) // HOUR * HOUR


def day_start(wall: float) -> int:
    """Return the start of the UTC day that contains `wall`."""
    return int(wall) // DAY * DAY


def month_start(wall: float, months_back: int = 0) -> int:
    """Return the start of the UTC month that contains `wall`, `months_back` months earlier."""
    moment = time.gmtime(int(wall))
    index = moment.tm_year * 12 + moment.tm_mon - 1 - months_back
    return calendar.timegm((index // 12, index % 12 + 1, 1, 0, 0, 0))


def format_start(start: int) -> str:
    """Return `start` in RFC 3339 form, UTC: 2026-12-04T17:00:00Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start))


@dataclass
class Entry:
    """The counters summed over one hour, day or month, from `start` (UTC epoch seconds)."""

    start: int
    counters: Counters


@dataclass
class History:
    """Hourly, daily and monthly sums of a volume's I/O, each tier oldest first."""

    hourly: list[Entry] = field(default_factory=list)
    daily: list[Entry] = field(default_factory=list)
    monthly: list[Entry] = field(default_factory=list)

    def add(self, wall: float, counters: Counters) -> None:
        """Add I/O done at `wall` into its hour, then roll up what aged out."""
        if not counters.is_zero():
            _add_into(self.hourly, hour_start(wall), counters)
        self.roll_up(wall)

    def roll_up(self, wall: float) -> None:
        """Move entries that are too old, or too many, into the next tier (or drop them)."""
        oldest_hour = hour_start(wall) - (MAX_HOURLY - 1) * HOUR
        while len(self.hourly) > MAX_HOURLY or (self.hourly and self.hourly[0].start < oldest_hour):
            entry = self.hourly.pop(0)
            _add_into(self.daily, day_start(entry.start), entry.counters)

        oldest_day = day_start(wall) - (MAX_DAILY - 1) * DAY
        while len(self.daily) > MAX_DAILY or (self.daily and self.daily[0].start < oldest_day):
            entry = self.daily.pop(0)
            _add_into(self.monthly, month_start(entry.start), entry.counters)

        oldest_month = month_start(wall, MAX_MONTHLY - 1)
        while len(self.monthly) > MAX_MONTHLY or (
            self.monthly and self.monthly[0].start < oldest_month
        ):
            self.monthly.pop(0)

    def report(self) -> dict[str, list[dict[str, Any]]]:
        """Return the tiers as volume.stats_history returns them."""
        return {
            name: [
                {"start": format_start(entry.start), **entry.counters.to_report()}
                for entry in getattr(self, name)
            ]
            for name in TIERS
        }

    def to_dict(self) -> dict[str, list[dict[str, int]]]:
        """Return the tiers in their stored form."""
        return {
            name: [
                {"start": entry.start, **entry.counters.to_dict()} for entry in getattr(self, name)
            ]
            for name in TIERS
        }

    @classmethod
    def from_dict(cls, stored: Any) -> History:
        """Build the tiers from their stored form. Raises ValueError if it is invalid."""
        if not isinstance(stored, dict):
            raise ValueError("history is not a map")
        tiers = {}
        for name in TIERS:
            entries = stored.get(name)
            if not isinstance(entries, list):
                raise ValueError(f"history tier {name!r} is missing or not a list")
            tiers[name] = [_entry_from_dict(item) for item in entries]
            starts = [entry.start for entry in tiers[name]]
            if starts != sorted(set(starts)):
                raise ValueError(f"history tier {name!r} is not in order of time")
        return cls(**tiers)


def _add_into(tier: list[Entry], start: int, counters: Counters) -> None:
    """Add `counters` into the entry of `start`, inserting it in order if there is none."""
    # The clock may have been set back, so the entry is not always the last one.
    index = bisect.bisect_left([entry.start for entry in tier], start)
    if index < len(tier) and tier[index].start == start:
        tier[index].counters = tier[index].counters.plus(counters)
    else:
        tier.insert(index, Entry(start, counters))


def _entry_from_dict(item: Any) -> Entry:
    if not isinstance(item, dict):
        raise ValueError(f"history entry is not a map: {item!r:.100}")
    start = item.get("start")
    if isinstance(start, bool) or not isinstance(start, int):
        raise ValueError(f"history entry has no valid start: {item!r:.100}")
    return Entry(start, Counters.from_dict(item))


# pxd's side


@dataclass
class VolumeStats:
    """The I/O statistics that pxd keeps for one volume: totals, live window, history."""

    totals: Counters = field(default_factory=Counters)
    history: History = field(default_factory=History)
    #: The recent samples as (monotonic time, totals at that time), oldest first.
    window: collections.deque[tuple[float, Counters]] = field(default_factory=collections.deque)
    in_flight: int = 0
    #: True when the totals or history changed since they were last saved.
    dirty: bool = False
    _boot_id: str | None = None
    _last: Counters = field(default_factory=Counters)

    def apply_sample(self, sample: Any, wall: float, monotonic: float) -> None:
        """Add the growth in a sample of the mount child's counters to the totals and history.

        Raises ValueError if the sample is invalid.
        """
        counters = Counters.from_dict(sample)
        boot_id, in_flight = sample.get("boot_id"), sample.get("in_flight")
        if not isinstance(boot_id, str) or isinstance(in_flight, bool):
            raise ValueError(f"sample has no valid boot_id: {sample!r:.200}")
        if not isinstance(in_flight, int) or in_flight < 0:
            raise ValueError(f"sample has no valid in_flight: {sample!r:.200}")
        if boot_id != self._boot_id:
            # A new child process, whose counters started at zero.
            self._boot_id, self._last = boot_id, Counters()
        elif not counters.covers(self._last):
            # An older sample arrived after a newer one. The counters of one child only grow,
            # so it adds nothing.
            return
        growth = counters.growth_since(self._last)
        self._last = counters
        self.in_flight = in_flight
        if not growth.is_zero():
            self.totals = self.totals.plus(growth)
            self.dirty = True
        self.history.add(wall, growth)
        self.window.append((monotonic, self.totals))
        self._prune(monotonic)

    def child_stopped(self) -> None:
        """Forget the live state of a mount child that is gone."""
        self.window.clear()
        self.in_flight = 0

    def live(self, monotonic: float) -> tuple[Counters, int, int]:
        """Return the I/O of the last LIVE_WINDOW s, the ms it covers and the requests in flight."""
        self._prune(monotonic)
        if len(self.window) < 2:
            return Counters(), int(LIVE_WINDOW * 1000), self.in_flight if self.window else 0
        end_time, end = self.window[-1]
        base_time, base = self.window[0]
        for sample_time, totals in self.window:
            if sample_time > end_time - LIVE_WINDOW:
                break
            base_time, base = sample_time, totals
        return end.growth_since(base), round((end_time - base_time) * 1000), self.in_flight

    def _prune(self, monotonic: float) -> None:
        while self.window and self.window[0][0] < monotonic - WINDOW_KEEP:
            self.window.popleft()

    def to_dict(self) -> dict[str, Any]:
        """Return the stored form: format, totals and history."""
        return {
            "format": FORMAT_VERSION,
            "totals": self.totals.to_dict(),
            "history": self.history.to_dict(),
        }

    @classmethod
    def from_dict(cls, stored: Any) -> VolumeStats:
        """Build a VolumeStats from its stored form. Raises ValueError if it is invalid."""
        if not isinstance(stored, dict) or stored.get("format") != FORMAT_VERSION:
            raise ValueError(f"unknown format; expected format {FORMAT_VERSION}")
        return cls(
            totals=Counters.from_dict(stored.get("totals")),
            history=History.from_dict(stored.get("history")),
        )


class StatsStore:
    """The VolumeStats of every volume, loaded on first use and saved under DIR/stats."""

    def __init__(self, data_dir: Path) -> None:
        self.directory = data_dir / STATS_DIR
        self.directory.mkdir(mode=0o700, exist_ok=True)
        self._volumes: dict[str, VolumeStats] = {}
        #: Volumes whose last save failed; their next failures are logged at DEBUG.
        self._failing: set[str] = set()

    def get(self, vol_id: str) -> VolumeStats:
        """Return the statistics of `vol_id`, loading them from disk the first time."""
        stats = self._volumes.get(vol_id)
        if stats is None:
            stats = self._volumes[vol_id] = self._load(vol_id)
        return stats

    async def save_changed(self) -> None:
        """Write the file of every volume whose statistics changed since the last save."""
        for vol_id, stats in list(self._volumes.items()):
            if stats.dirty:
                await self.save(vol_id)

    async def save(self, vol_id: str) -> None:
        """Write the statistics of `vol_id` atomically.

        A failure is logged, not raised, and leaves the volume marked for the next save.
        """
        stats = self._volumes.get(vol_id)
        if stats is None:
            return
        data = json.dumps(stats.to_dict(), sort_keys=True).encode() + b"\n"
        stats.dirty = False
        try:
            await trio.to_thread.run_sync(write_file_atomically, self._path(vol_id), data)
        except OSError as exc:
            stats.dirty = True
            # A full disk fails each save, every 10 s, until space returns. Only the first
            # failure is an error.
            level = logging.DEBUG if vol_id in self._failing else logging.ERROR
            log.log(level, "volume %s: saving I/O statistics failed: %s", vol_id, exc)
            self._failing.add(vol_id)
            return
        if vol_id in self._failing:
            self._failing.discard(vol_id)
            log.info("volume %s: saving I/O statistics works again", vol_id)

    def delete(self, vol_id: str) -> None:
        """Forget the statistics of a deleted volume and remove its file."""
        self._volumes.pop(vol_id, None)
        self._failing.discard(vol_id)
        path = self._path(vol_id)
        for stale in (path, path.with_name(path.name + ".corrupt")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)

    def _path(self, vol_id: str) -> Path:
        return self.directory / f"{vol_id}.json"

    def _load(self, vol_id: str) -> VolumeStats:
        path = self._path(vol_id)
        try:
            return VolumeStats.from_dict(json.loads(path.read_bytes()))
        except FileNotFoundError:
            return VolumeStats()
        except (OSError, ValueError) as exc:
            # json.JSONDecodeError and UnicodeDecodeError are ValueErrors too.
            log.error(
                "volume %s: I/O statistics file %s is unreadable (%s); keeping it as %s.corrupt "
                "and starting from zero",
                vol_id,
                path,
                exc,
                path.name,
            )
            with contextlib.suppress(OSError):
                os.replace(path, path.with_name(path.name + ".corrupt"))
            return VolumeStats()
