"""A pxfs mount child (`python -m daemon.mount`) on a device file, run as a real subprocess."""

from __future__ import annotations

import select
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


def is_mounted(path: Path) -> bool:
    """Return whether PATH is a mount point of this mount namespace."""
    with open("/proc/self/mountinfo") as mountinfo:
        return any(line.split()[4] == str(path) for line in mountinfo)


class MountChild:
    """One mount child process serving a device file at a mount point."""

    def __init__(
        self, device: Path, mountpoint: Path, log: Path, format_size: int | None = None
    ) -> None:
        self.device = device
        self.mountpoint = mountpoint
        self.log = log
        self.format_size = format_size
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, format_size: int | None = None) -> None:
        """Start the child, formatting a missing device to the given size, and wait for `ready`."""
        size = format_size if format_size is not None else self.format_size
        argv = [sys.executable, "-m", "daemon.mount", "--mountpoint", str(self.mountpoint)]
        argv += ["--device-file", str(self.device)]
        if size is not None:
            argv += ["--format-size", str(size)]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, cwd=REPO)
        assert self.process.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline and self.process.poll() is None:
            readable, _, _ = select.select([self.process.stdout], [], [], 0.2)
            if readable:
                line = self.process.stdout.readline()
                assert line == b"ready\n", f"child printed {line!r}: {self.log.read_text()}"
                return
        raise AssertionError(f"mount child not ready in time: {self.log.read_text()}")

    def stop(self) -> None:
        """Stop with SIGTERM; the child must exit 0 and leave nothing mounted."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        self.reap(0)

    def remount(self) -> None:
        """Stop the child and start a new one on the same device."""
        self.stop()
        self.start()

    def reap(self, expected_status: int) -> None:
        """Wait for the child to exit with `expected_status` and check it left no mount."""
        assert self.process is not None
        assert self.process.wait(STOP_TIMEOUT) == expected_status, self.log.read_text()
        self._forget_process()
        assert not is_mounted(self.mountpoint)

    def kill(self) -> None:
        """Kill with SIGKILL, as a crash would, and detach the dead mount."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(STOP_TIMEOUT)
        self._forget_process()
        subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=False)

    def cleanup(self) -> None:
        """Kill a child that is still running and detach what it left mounted."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
            self._forget_process()
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=False)

    def check(self) -> subprocess.CompletedProcess[str]:
        """Run the offline consistency check of the device."""
        argv = [sys.executable, "-m", "daemon.mount", "--device-file", str(self.device)]
        return subprocess.run(
            argv + ["--check"], capture_output=True, text=True, cwd=REPO, timeout=120
        )

    def errors_logged(self) -> list[str]:
        """Return the error and traceback lines of the child's log."""
        lines = self.log.read_text().splitlines()
        return [line for line in lines if " ERROR " in line or "Traceback" in line]

    def _forget_process(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        self.process.stdout.close()
        self.process = None
