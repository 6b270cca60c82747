"""The teardown and the work directory of tools/bench.py and tools/bench_scale.py.

A benchmark registers the undo of each step it takes on a contextlib.ExitStack, and runs in a
work directory that it removes afterwards if it made it. SIGTERM becomes KeyboardInterrupt, so
that a run stopped by `timeout` or `kill` gets the same teardown as Ctrl-C.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from pxfs import errors

# Names of the teardown steps that failed in this run; main reports them in its exit status.
TEARDOWN_FAILURES: list[str] = []


class BenchError(Exception):
    """The failure of a benchmark step, with a message that names the step and the next action."""


def register_teardown(stack: contextlib.ExitStack, step: str, action: Callable[[], object]) -> None:
    """Register `action` on `stack` so that its failure is reported and later steps still run."""

    def guarded() -> None:
        try:
            action()
        except (BenchError, errors.PxfsError, OSError, subprocess.SubprocessError) as error:
            TEARDOWN_FAILURES.append(step)
            # The script's name, such as "bench", starts every message of the tool.
            program = Path(sys.argv[0]).stem
            print(f"{program}: teardown step {step!r} failed: {error}", file=sys.stderr)

    stack.callback(guarded)


def teardown_outcome() -> str:
    """Describe whether every teardown step succeeded."""
    if TEARDOWN_FAILURES:
        return f"teardown failed at: {', '.join(TEARDOWN_FAILURES)} (details above)"
    return "everything it started is stopped"


def raise_interrupt(signum: int, frame: FrameType | None) -> None:
    """Turn SIGTERM into KeyboardInterrupt, so `timeout` gets the same teardown as Ctrl-C."""
    raise KeyboardInterrupt(f"signal {signum}")


def leftover_mounts(work: Path) -> list[str]:
    """Return the mount points under `work` that are still mounted."""
    prefix = str(work.resolve()) + "/"
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts]
    return [point for point in points if point.startswith(prefix)]


@contextlib.contextmanager
def work_directory(requested: Path | None, prefix: str) -> Iterator[Path]:
    """Yield the work directory, and remove it afterwards if it is a new temporary one.

    A new one is made in the system's temporary directory, its name starting with `prefix`.
    """
    work = requested or Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
    finally:
        # Removing a tree that still has a mount inside would delete files through that mount.
        if requested is None and not leftover_mounts(work):
            shutil.rmtree(work, ignore_errors=True)
