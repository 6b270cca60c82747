"""Helpers that interrupt a run of a benchmark tool and find the mounts and processes it left."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def mounts_under(path: Path) -> list[str]:
    """Return the mount points below `path`."""
    prefix = str(path) + "/"
    with open("/proc/self/mounts") as mounts:
        return [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]


def processes_mentioning(marker: str) -> list[str]:
    """Return the command lines of running processes that contain `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def interrupt_at(
    command: list[str], cwd: Path, marker: str, timeout: float
) -> tuple[list[str], str, int]:
    """Run `command` and send it SIGTERM at the first line of its stderr that contains `marker`.

    Return the stderr lines up to that one, the rest of stderr and the exit status. Raises
    AssertionError if a line without the marker arrives more than `timeout` seconds after the start.
    """
    seen = []
    deadline = time.monotonic() + timeout
    with subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    ) as process:
        assert process.stderr is not None
        try:
            for line in process.stderr:
                seen.append(line)
                if marker in line:
                    process.send_signal(signal.SIGTERM)
                    break
                assert time.monotonic() < deadline, "".join(seen[-20:])
            rest = process.stderr.read()
            returncode = process.wait(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    return seen, rest, returncode
