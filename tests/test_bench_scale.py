"""tools/bench_scale.py in --smoke mode: the figures of each part, and its teardown."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from benchproc import interrupt_at, mounts_under, processes_mentioning

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "tools" / "bench_scale.py"
RUN_TIMEOUT = 300

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"
)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: pxd refuses control sockets longer than 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="pxbs-", dir="/tmp"))
    yield path
    if not mounts_under(path):
        shutil.rmtree(path, ignore_errors=True)


def parts() -> list[str]:
    """Return the parts this host can run: the cluster parts need etcd."""
    return ["mount", "resync", "copy"] if shutil.which("etcd") else ["mount"]


def bench_command(root: Path, chosen: list[str]) -> list[str]:
    """Return the smoke-run command line with its work directory and JSON file in `root`."""
    return [
        sys.executable, str(BENCH), "--smoke", "--parts", ",".join(chosen),
        "--work-dir", str(root / "work"), "--json", str(root / "report.json"),
    ]  # fmt: skip


def test_smoke_run_reports_every_part(short_dir: Path) -> None:
    chosen = parts()
    result = subprocess.run(
        bench_command(short_dir, chosen), cwd=REPO, capture_output=True, text=True,
        timeout=RUN_TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((short_dir / "report.json").read_text())
    assert sorted(report) == sorted(chosen)
    assert json.loads(result.stdout) == report

    mount = report["mount"]
    assert mount["files"] == 3000
    assert 0 < mount["mount_call_s"] <= mount["mount_to_first_stat_s"]
    assert mount["mount_child_peak_rss_mib"] > 10
    if "resync" in report:
        resync = report["resync"]
        assert resync["file_blocks_written"] == 16
        assert resync["device_blocks_missed"] >= resync["file_blocks_written"]
        assert resync["blocks_resynced"] == resync["device_blocks_missed"]
        assert resync["clean_after_start_s"] >= resync["clean_after_up_s"] > 0
        assert resync["tables_identical"] is True
    if "copy" in report:
        copy = report["copy"]
        assert copy["data_mib"] == 64
        # Every data block, plus the superblock, checkpoint and journal blocks written.
        assert copy["blocks_copied"] > 64 * 16
        assert copy["copy_mib_s"] > 0
        assert copy["update_to_clean_s"] >= copy["copy_s"]
        assert copy["tables_identical"] is True
        assert sorted(copy["cpu_s_per_gib"]) == ["mount_child", "source_pxd", "target_pxd"]
        assert all(seconds >= 0 for seconds in copy["cpu_s_per_gib"].values())

    assert mounts_under(short_dir) == []
    assert processes_mentioning(str(short_dir)) == []


def test_sigterm_tears_everything_down(short_dir: Path) -> None:
    chosen = parts()
    # Interrupt in the middle of the last part, with a volume mounted and a node stopped.
    marker = "[resync] write 16 blocks" if "resync" in chosen else "[mount] attach and mount"
    command = bench_command(short_dir, chosen[-2:])
    seen, rest, returncode = interrupt_at(command, REPO, marker, RUN_TIMEOUT)
    assert any(marker in line for line in seen), "".join(seen[-20:])
    assert returncode == 130, rest[-4000:]
    assert "interrupted" in rest
    assert not (short_dir / "report.json").exists()
    assert mounts_under(short_dir) == []
    assert processes_mentioning(str(short_dir)) == []


def test_unknown_part_rejected() -> None:
    command = [sys.executable, str(BENCH), "--parts", "mount,bogus"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "unknown parts ['bogus']" in result.stderr
