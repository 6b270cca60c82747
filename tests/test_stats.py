"""pxfs.stats: counters, the live window, history roll-up and persistence, with set clocks."""

from __future__ import annotations

import calendar
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import trio

from pxfs.stats import (
    DAY,
    HOUR,
    Counters,
    History,
    IoMeter,
    StatsStore,
    VolumeStats,
    format_start,
    hour_start,
    month_start,
)

#: 2026-12-04T17:20:00Z
NOW = calendar.timegm((2026, 12, 4, 17, 20, 0))


def sample(boot: str = "a", in_flight: int = 0, **counters: int) -> dict[str, Any]:
    """A mount.stats reply with the given counters, the others zero."""
    return {"boot_id": boot, "in_flight": in_flight, **Counters(**counters).to_dict()}


class FakeClock:
    """A monotonic nanosecond clock that moves only when a test sets it."""

    def __init__(self) -> None:
        self.now = 1_000_000_000

    def __call__(self) -> int:
        return self.now


# IoMeter


def test_meter_counts_reads_and_writes() -> None:
    clock = FakeClock()
    meter = IoMeter(clock)
    with meter.measure("read") as request:
        clock.now += 3_000_000
        request.nbytes = 4096
    with meter.measure("write") as request:
        clock.now += 5_000_000
        request.nbytes = 100
    snap = meter.snapshot()
    assert snap["reads"] == 1
    assert snap["read_bytes"] == 4096
    assert snap["read_ns"] == 3_000_000
    assert snap["writes"] == 1
    assert snap["write_bytes"] == 100
    assert snap["write_ns"] == 5_000_000
    assert snap["io_ns"] == 8_000_000
    assert snap["in_flight"] == 0


def test_meter_busy_time_counts_overlap_once() -> None:
    clock = FakeClock()
    meter = IoMeter(clock)
    first = meter.measure("read").__enter__()
    clock.now += 1_000_000
    second = meter.measure("read").__enter__()
    assert meter.snapshot()["in_flight"] == 2
    clock.now += 1_000_000
    assert meter.snapshot()["io_ns"] == 2_000_000
    first.nbytes = second.nbytes = 10
    first.__exit__(None, None, None)
    clock.now += 1_000_000
    second.__exit__(None, None, None)
    snap = meter.snapshot()
    assert snap["io_ns"] == 3_000_000
    assert snap["read_ns"] == 2_000_000 + 2_000_000
    assert snap["reads"] == 2


def test_meter_failed_request_not_counted() -> None:
    meter = IoMeter(FakeClock())
    with pytest.raises(OSError), meter.measure("write") as request:
        request.nbytes = 10
        raise OSError("device gone")
    snap = meter.snapshot()
    assert snap["writes"] == 0
    assert snap["write_bytes"] == 0
    assert snap["in_flight"] == 0


def test_meter_boot_ids_differ() -> None:
    assert IoMeter().boot_id != IoMeter().boot_id


# VolumeStats: samples and the live window


def test_samples_add_growth_to_totals() -> None:
    stats = VolumeStats()
    stats.apply_sample(sample(reads=2, read_bytes=100), NOW, 10.0)
    stats.apply_sample(sample(reads=5, read_bytes=400, writes=1), NOW + 1, 11.0)
    assert stats.totals == Counters(reads=5, read_bytes=400, writes=1)
    assert stats.dirty


def test_restarted_child_counters_start_over() -> None:
    stats = VolumeStats()
    stats.apply_sample(sample("first", reads=10), NOW, 10.0)
    stats.apply_sample(sample("second", reads=3), NOW + 1, 11.0)
    assert stats.totals.reads == 13


def test_stale_sample_ignored() -> None:
    stats = VolumeStats()
    stats.apply_sample(sample(reads=10), NOW, 10.0)
    stats.apply_sample(sample(reads=4), NOW, 10.5)
    stats.apply_sample(sample(reads=12), NOW + 1, 11.0)
    assert stats.totals.reads == 12


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [],
        {"boot_id": "a", "in_flight": 0},
        {**sample(), "reads": -1},
        {**sample(), "reads": True},
        {**sample(), "boot_id": 7},
        {**sample(), "in_flight": "1"},
    ],
)
def test_invalid_sample_rejected(bad: Any) -> None:
    stats = VolumeStats()
    with pytest.raises(ValueError):
        stats.apply_sample(bad, NOW, 1.0)
    assert stats.totals.is_zero()


def test_live_covers_last_two_seconds() -> None:
    stats = VolumeStats()
    for second in range(6):
        stats.apply_sample(sample(reads=second * 10, in_flight=second), NOW + second, second)
    counters, interval_ms, in_flight = stats.live(5.0)
    assert counters.reads == 20
    assert interval_ms == 2000
    assert in_flight == 5


def test_live_with_short_history_covers_what_exists() -> None:
    stats = VolumeStats()
    stats.apply_sample(sample(reads=1), NOW, 10.0)
    stats.apply_sample(sample(reads=4), NOW, 11.0)
    counters, interval_ms, _ = stats.live(11.0)
    assert counters.reads == 3
    assert interval_ms == 1000


def test_live_single_sample_is_zero() -> None:
    stats = VolumeStats()
    stats.apply_sample(sample(reads=5, in_flight=2), NOW, 10.0)
    counters, interval_ms, in_flight = stats.live(10.0)
    assert counters.is_zero()
    assert interval_ms == 2000
    assert in_flight == 2


def test_live_forgets_old_samples() -> None:
    stats = VolumeStats()
    stats.apply_sample(sample(reads=1), NOW, 10.0)
    stats.apply_sample(sample(reads=9), NOW, 11.0)
    counters, _, in_flight = stats.live(60.0)
    assert counters.is_zero()
    assert in_flight == 0


def test_child_stopped_clears_live_state() -> None:
    stats = VolumeStats()
    stats.apply_sample(sample(reads=1, in_flight=3), NOW, 10.0)
    stats.apply_sample(sample(reads=9, in_flight=3), NOW, 11.0)
    stats.child_stopped()
    counters, _, in_flight = stats.live(11.0)
    assert counters.is_zero()
    assert in_flight == 0
    assert stats.totals.reads == 9


# History


def test_month_start_crosses_years() -> None:
    assert format_start(month_start(NOW)) == "2026-12-01T00:00:00Z"
    assert format_start(month_start(NOW, 12)) == "2025-12-01T00:00:00Z"
    assert format_start(month_start(NOW, 13)) == "2025-11-01T00:00:00Z"


def test_history_sums_within_hour() -> None:
    history = History()
    history.add(NOW, Counters(reads=1))
    history.add(NOW + 600, Counters(reads=2, read_ns=5_000_000))
    report = history.report()
    assert report["hourly"] == [
        {
            "start": "2026-12-04T17:00:00Z",
            "reads": 3,
            "read_ms": 5,
            "read_bytes": 0,
            "writes": 0,
            "write_ms": 0,
            "write_bytes": 0,
            "io_ms": 0,
        }
    ]
    assert report["daily"] == []
    assert report["monthly"] == []


def test_history_zero_growth_adds_no_entry() -> None:
    history = History()
    history.add(NOW, Counters())
    assert history.hourly == []


def test_hourly_rolls_into_daily_after_24_hours() -> None:
    history = History()
    start = NOW - 30 * HOUR
    for hour in range(31):
        history.add(start + hour * HOUR, Counters(writes=1))
    assert len(history.hourly) == 24
    assert history.hourly[0].start == (NOW // HOUR - 23) * HOUR
    assert sum(entry.counters.writes for entry in history.daily) == 7
    total = sum(entry.counters.writes for entry in history.hourly + history.daily)
    assert total == 31
    # The seven oldest hours (10:20 on Dec 3 to 16:20) are all on Dec 3.
    assert [format_start(entry.start) for entry in history.daily] == ["2026-12-03T00:00:00Z"]


def test_daily_rolls_into_monthly_at_day_boundary() -> None:
    history = History()
    # One write on each day from Oct 20 to Dec 4; hourly entries age into days, days into months.
    first = calendar.timegm((2026, 10, 20, 12, 0, 0))
    days = (NOW - first) // DAY + 1
    for day in range(days):
        history.add(first + day * DAY, Counters(writes=1))
    assert len(history.daily) <= 31
    assert [format_start(e.start) for e in history.monthly] == [
        "2026-10-01T00:00:00Z",
        "2026-11-01T00:00:00Z",
    ]
    grand_total = sum(
        entry.counters.writes for entry in history.hourly + history.daily + history.monthly
    )
    assert grand_total == days
    oldest_day = history.daily[0].start
    assert oldest_day >= (NOW // DAY - 30) * DAY


def test_monthly_keeps_twelve_months() -> None:
    history = History()
    for months_back in range(20, -1, -1):
        history.add(month_start(NOW, months_back) + 5 * DAY, Counters(reads=1))
    assert len(history.monthly) <= 12
    assert history.monthly[0].start >= month_start(NOW, 11)
    assert all(len(getattr(history, tier)) <= limit for tier, limit in
               (("hourly", 24), ("daily", 31), ("monthly", 12)))  # fmt: skip


def test_full_hourly_tier_rolls_oldest_by_count() -> None:
    history = History()
    for hour in range(24):
        history.add(NOW + hour * HOUR, Counters(reads=1))
    # The clock is set back, so a 25th hour comes in that is not too old to stay.
    history.add(NOW - 5 * HOUR, Counters(reads=1))
    assert len(history.hourly) == 24
    assert history.hourly[0].start == hour_start(NOW)
    assert [format_start(e.start) for e in history.daily] == ["2026-12-04T00:00:00Z"]
    assert history.daily[0].counters.reads == 1


def test_clock_set_back_inserts_in_order() -> None:
    history = History()
    history.add(NOW, Counters(reads=1))
    history.add(NOW - 3 * HOUR, Counters(reads=2))
    history.add(NOW - HOUR, Counters(reads=4))
    starts = [entry.start for entry in history.hourly]
    assert starts == sorted(starts)
    assert [entry.counters.reads for entry in history.hourly] == [2, 4, 1]


def test_query_later_rolls_up_idle_history() -> None:
    history = History()
    history.add(NOW, Counters(reads=1))
    history.roll_up(NOW + 40 * DAY)
    assert history.hourly == []
    assert history.daily == []
    assert [format_start(e.start) for e in history.monthly] == ["2026-12-01T00:00:00Z"]


# Persistence


def save(store: StatsStore, vol_id: str) -> None:
    trio.run(store.save, vol_id)


def test_store_round_trip(tmp_path: Path) -> None:
    store = StatsStore(tmp_path)
    stats = store.get("7")
    stats.apply_sample(sample(reads=3, write_bytes=9), NOW, 1.0)
    save(store, "7")
    assert not stats.dirty
    path = tmp_path / "stats" / "7.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / "stats" / "7.json.tmp").exists()

    again = StatsStore(tmp_path).get("7")
    assert again.totals == Counters(reads=3, write_bytes=9)
    assert again.history.to_dict() == stats.history.to_dict()


def test_store_save_changed_only_dirty(tmp_path: Path) -> None:
    store = StatsStore(tmp_path)
    store.get("1").apply_sample(sample(reads=1), NOW, 1.0)
    store.get("2")
    trio.run(store.save_changed)
    assert (tmp_path / "stats" / "1.json").exists()
    assert not (tmp_path / "stats" / "2.json").exists()


def test_store_delete_removes_file(tmp_path: Path) -> None:
    store = StatsStore(tmp_path)
    store.get("1").apply_sample(sample(reads=1), NOW, 1.0)
    save(store, "1")
    (tmp_path / "stats" / "1.json.corrupt").write_bytes(b"{not json")
    store.delete("1")
    assert not (tmp_path / "stats" / "1.json").exists()
    assert not (tmp_path / "stats" / "1.json.corrupt").exists()
    assert store.get("1").totals.is_zero()


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe",
        b"[]",
        json.dumps({"format": 99, "totals": {}, "history": {}}).encode(),
        json.dumps({"format": 1, "totals": {"reads": "x"}, "history": {}}).encode(),
        json.dumps(
            {
                "format": 1,
                "totals": Counters().to_dict(),
                "history": {"hourly": [{"start": 5}], "daily": [], "monthly": []},
            }
        ).encode(),
        json.dumps(
            {
                "format": 1,
                "totals": Counters().to_dict(),
                "history": {
                    "hourly": [
                        {"start": 7200, **Counters().to_dict()},
                        {"start": 3600, **Counters().to_dict()},
                    ],
                    "daily": [],
                    "monthly": [],
                },
            }
        ).encode(),
    ],
)
def test_corrupt_file_logged_and_replaced(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "stats"
    directory.mkdir()
    (directory / "5.json").write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="pxfs.stats"):
        stats = StatsStore(tmp_path).get("5")
    assert stats.totals.is_zero()
    assert stats.history.hourly == []
    assert any("unreadable" in record.getMessage() for record in caplog.records)
    assert (directory / "5.json.corrupt").read_bytes() == content
    assert not (directory / "5.json").exists()


def test_corrupt_file_replaced_by_next_save(tmp_path: Path) -> None:
    directory = tmp_path / "stats"
    directory.mkdir()
    (directory / "5.json").write_bytes(b"garbage")
    store = StatsStore(tmp_path)
    store.get("5").apply_sample(sample(reads=2), NOW, 1.0)
    save(store, "5")
    assert StatsStore(tmp_path).get("5").totals.reads == 2
