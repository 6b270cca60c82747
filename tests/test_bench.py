"""tools/bench.py in --smoke mode: every system it can measure, its report and its teardown."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from benchproc import interrupt_at, mounts_under, processes_mentioning

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "tools" / "bench.py"
RUN_TIMEOUT = 300
GLUSTERD_PORT = 24007

FIGURES = [
    "seq_write", "seq_read", "rand_read_4k", "rand_write_4k", "create", "stat_warm",
    "stat_cold", "unlink", "copy_tree", "git_commit", "git_status",
]  # fmt: skip
FIO_FIGURES = ["seq_write", "seq_read", "rand_read_4k", "rand_write_4k"]


def _missing_prerequisite() -> str | None:
    if os.geteuid() != 0:
        return "needs root (drop_caches, FUSE mounts)"
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse"
    for tool in ("fio", "git", "fusermount3"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


_MISSING = _missing_prerequisite()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")


def glusterd_installed() -> bool:
    """Tell whether the GlusterFS server and client the benchmark drives are installed."""
    return all(shutil.which(name) for name in ("glusterd", "gluster", "glusterfs"))


def glusterd_port_busy() -> bool:
    """Tell whether another glusterd already listens on the port the bricks must reach."""
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", GLUSTERD_PORT)) == 0


def cluster_dirs(stderr: str) -> list[str]:
    """Return the cluster directories that the progress lines of a run name."""
    marker = "[pxfs ha 3] start etcd and 3 pxd nodes in "
    return [line.split(marker, 1)[1].strip() for line in stderr.splitlines() if marker in line]


def assert_nothing_left(tmp_path: Path, stderr: str) -> None:
    """Assert that no mount or process of the run is left, the cluster's included."""
    assert mounts_under(tmp_path) == []
    assert processes_mentioning(str(tmp_path)) == []
    for directory in cluster_dirs(stderr):
        assert processes_mentioning(directory) == [], directory
        assert mounts_under(Path(directory)) == [], directory


def bench_command(tmp_path: Path) -> list[str]:
    """Return the smoke-run command line with its work directory and JSON file under tmp_path."""
    return [
        sys.executable, str(BENCH), "--smoke", "--work-dir", str(tmp_path / "work"),
        "--json", str(tmp_path / "report.json"),
    ]  # fmt: skip


def etcd_installed() -> bool:
    """Tell whether etcd, which the three-node pxfs cluster needs, is installed."""
    return shutil.which("etcd") is not None


def expect_gluster() -> bool:
    """Tell whether this run must measure GlusterFS, skipping when another glusterd blocks it."""
    if not glusterd_installed():
        return False
    if glusterd_port_busy():
        pytest.skip(f"another glusterd listens on port {GLUSTERD_PORT}, which the bricks need")
    return True


def load_bench() -> ModuleType:
    """Import tools/bench.py, which is a script and not part of a package.

    benchcommon is imported again too, so that each test starts with no teardown failures.
    """
    sys.modules.pop("benchcommon", None)
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_measures_every_system(tmp_path: Path) -> None:
    with_gluster = expect_gluster()
    result = subprocess.run(
        bench_command(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    reason = report["not_measured"].get("glusterfs_r3", "")
    if with_gluster and "is in use" in reason:
        # Another glusterd took the port between the check above and the run.
        pytest.skip(reason)

    systems = report["systems"]
    with_ha3 = etcd_installed()
    measured = ["raw", "pxfs_ha1"] + (["pxfs_ha3"] if with_ha3 else [])
    measured += ["glusterfs_r3"] if with_gluster else []
    for system in measured:
        assert sorted(systems[system]) == sorted(FIGURES), system
        for name in FIGURES:
            assert systems[system][name] > 0, (system, name)
    # The floor stores nothing, so only the fio jobs run on it.
    assert sorted(systems["fuse_floor"]) == sorted(FIO_FIGURES)
    assert all(systems["fuse_floor"][name] > 0 for name in FIO_FIGURES)
    assert "fuse_floor" not in report["not_measured"]
    if with_ha3:
        assert "pxfs_ha3" not in report["not_measured"]
    else:
        assert systems["pxfs_ha3"] is None
        assert "etcd is not installed" in report["not_measured"]["pxfs_ha3"]
    if with_gluster:
        assert "glusterfs_r3" not in report["not_measured"]
    else:
        assert systems["glusterfs_r3"] is None
        assert "not installed" in report["not_measured"]["glusterfs_r3"]

    ratios = report["ratios"]
    for name in FIGURES:
        expected = systems["pxfs_ha1"][name] / systems["raw"][name]
        assert ratios["pxfs_raw"][name] == pytest.approx(expected), name
        if with_gluster:
            expected = systems["pxfs_ha1"][name] / systems["glusterfs_r3"][name]
            assert ratios["pxfs_glusterfs"][name] == pytest.approx(expected), name
        if with_gluster and with_ha3:
            expected = systems["pxfs_ha3"][name] / systems["glusterfs_r3"][name]
            assert ratios["pxfs_ha3_glusterfs"][name] == pytest.approx(expected), name
        else:
            assert ratios["pxfs_ha3_glusterfs"][name] is None, name
        if name in FIO_FIGURES:
            expected = systems["pxfs_ha1"][name] / systems["fuse_floor"][name]
            assert ratios["pxfs_floor"][name] == pytest.approx(expected), name
        else:
            assert ratios["pxfs_floor"][name] is None, name
    assert report["parameters"]["smoke"] is True
    assert report["units"]["seq_write"] == "MiB/s"
    assert report["units"]["git_status"] == "s"

    assert "pxfs/GlusterFS" in result.stdout
    assert "ha3/GlusterFS" in result.stdout
    assert "pxfs/floor" in result.stdout
    assert "[FUSE floor] random 4 KiB writes" in result.stderr
    assert "[raw] git status" in result.stderr
    assert "[pxfs ha 1] sequential write" in result.stderr
    if with_ha3:
        assert "[pxfs ha 3] git status" in result.stderr
        assert len(cluster_dirs(result.stderr)) == 1
    if with_gluster:
        assert "[GlusterFS r3] git status" in result.stderr

    assert_nothing_left(tmp_path, result.stderr)
    assert not (tmp_path / "work" / "raw" / "fio.data").exists()


def test_sigterm_tears_everything_down(tmp_path: Path) -> None:
    with_gluster = expect_gluster()
    # Interrupt inside the last system's jobs, so every kind of teardown has something to undo.
    if with_gluster:
        marker = "[GlusterFS r3] random 4 KiB reads"
    elif etcd_installed():
        marker = "[pxfs ha 3] random 4 KiB reads"
    else:
        marker = "[pxfs ha 1] random 4 KiB"
    seen, rest, returncode = interrupt_at(bench_command(tmp_path), REPO, marker, RUN_TIMEOUT)
    output = "".join(seen) + rest
    assert any(marker in line for line in seen), output[-4000:]

    assert returncode == 130, output[-4000:]
    assert "interrupted; everything it started is stopped" in output
    assert "teardown step" not in output
    assert_nothing_left(tmp_path, output)
    assert not (tmp_path / "report.json").exists()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--files", "0"], "--files must be at least 1"),
        (["--seconds", "-1"], "--seconds must be at least 1"),
        (["--tree", "/nonexistent/tree"], "--tree /nonexistent/tree is not a directory"),
        (["--systems", "raw,zfs"], "unknown system 'zfs'"),
    ],
)
def test_invalid_arguments_rejected(tmp_path: Path, arguments: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--work-dir", str(tmp_path / "work"), *arguments],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "work").exists()


def test_systems_limits_the_run(tmp_path: Path) -> None:
    result = subprocess.run(
        [*bench_command(tmp_path), "--systems", "raw"],
        cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["systems"]["raw"]["create"] > 0
    for system in ("pxfs_ha1", "pxfs_ha3", "glusterfs_r3", "fuse_floor"):
        assert report["systems"][system] is None
        assert report["not_measured"][system] == "not chosen with --systems"
    assert report["parameters"]["systems"] == ["raw"]
    assert "[pxfs ha 1] sequential write" not in result.stderr


def test_failed_job_tears_the_cluster_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    if not etcd_installed():
        pytest.skip("etcd is not installed")
    bench = load_bench()
    mounted = []

    def fail_job(system: str, directory: Path, args: object) -> None:
        mounted.append(bench.is_mounted(directory))
        raise bench.BenchError("injected job failure")

    monkeypatch.setattr(bench, "measure", fail_job)
    args = bench.parse_args(["--smoke", "--work-dir", str(tmp_path / "work")])
    with pytest.raises(bench.BenchError, match="injected job failure"):
        bench.measure_pxfs_ha3(tmp_path / "work", args)

    assert mounted == [True]
    stderr = capfd.readouterr().err
    (directory,) = cluster_dirs(stderr)
    assert_nothing_left(tmp_path, stderr)
    assert bench.TEARDOWN_FAILURES == []
    if not directory.startswith(str(tmp_path)):
        # The work path was too long for the nodes' sockets: the cluster's own directory is gone.
        assert not Path(directory).exists()


def test_failed_job_tears_glusterfs_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not expect_gluster():
        pytest.skip("glusterd is not installed")
    bench = load_bench()
    mounted = []

    def fail_job(system: str, directory: Path, args: object) -> None:
        mounted.append(bench.is_mounted(directory))
        raise bench.BenchError("injected job failure")

    monkeypatch.setattr(bench, "measure", fail_job)
    args = bench.parse_args(["--smoke", "--work-dir", str(tmp_path / "work")])
    with pytest.raises(bench.BenchError, match="injected job failure"):
        bench.measure_glusterfs(tmp_path / "work", args)

    assert mounted == [True]
    assert mounts_under(tmp_path) == []
    assert processes_mentioning(str(tmp_path)) == []
    assert bench.TEARDOWN_FAILURES == []
    history = (tmp_path / "work" / "gluster" / "log" / "cmd_history.log").read_text()
    assert "volume stop pxfsbench : SUCCESS" in history
    assert "volume delete pxfsbench : SUCCESS" in history
