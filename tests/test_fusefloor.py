"""tools/fusefloor.py: the do-nothing pyfuse3 filesystem that tools/bench.py measures."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FLOOR = REPO / "tools" / "fusefloor.py"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"
)


def wait_mounted(path: Path, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not os.path.ismount(path):
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        assert time.monotonic() < deadline, "the floor did not mount in 30 s"
        time.sleep(0.05)


def check_floor(mountpoint: Path) -> None:
    """Check the one file of a mounted floor, its dropped writes and its missing xattrs."""
    assert os.listdir(mountpoint) == ["fio.data"]
    data = mountpoint / "fio.data"
    assert data.stat().st_size == 2 << 20
    fd = os.open(data, os.O_RDWR)
    try:
        assert os.pwrite(fd, b"x" * 4096, 8192) == 4096
        os.fsync(fd)
        # The write left its page in the page cache; once that is dropped, a read reaches the
        # floor, which kept nothing.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(fd, 4096, 8192) == bytes(4096)
    finally:
        os.close(fd)
    with pytest.raises(OSError) as raised:
        os.getxattr(data, "security.capability")
    assert raised.value.errno == errno.ENODATA
    with pytest.raises(FileNotFoundError):
        (mountpoint / "other").stat()


def test_floor_drops_writes(tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with subprocess.Popen(
        [sys.executable, str(FLOOR), str(mountpoint), "--size-mib", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    ) as process:  # fmt: skip
        try:
            wait_mounted(mountpoint, process)
            check_floor(mountpoint)
        finally:
            subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False)
            assert process.wait(timeout=30) == 0
        assert process.stdout is not None and process.stdout.read() == b"ready\n"
    assert not os.path.ismount(mountpoint)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["absent"], "is not a directory"),
        (["/"], "is already a mountpoint"),
        (["/", "--size-mib", "0"], "--size-mib must be between 1 and"),
        (["/", "--size-mib", str(2**43)], "--size-mib must be between 1 and"),
    ],
)
def test_floor_rejects_bad_arguments(tmp_path: Path, arguments: list[str], message: str) -> None:
    arguments = [str(tmp_path / "absent") if arg == "absent" else arg for arg in arguments]
    result = subprocess.run(
        [sys.executable, str(FLOOR), *arguments], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert message in result.stderr
