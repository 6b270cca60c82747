"""pxfs/hostmounts.py: resolving mount paths without a stat of the mountpoints on the way."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from pxfs import errors, hostmounts


@pytest.fixture
def mountpoints(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Replace mountinfo with a set of mountpoints that a test fills."""
    points: set[str] = set()
    monkeypatch.setattr(hostmounts, "mountinfo", lambda: dict.fromkeys(points, "fuse.pxfs"))
    return points


def test_parent_resolved_skips_mountpoints(
    tmp_path: Path, mountpoints: set[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    outer = tmp_path / "outer"
    outer.mkdir()
    mountpoints.add(str(outer))
    checked: list[str] = []
    real_islink = os.path.islink

    def islink(path: str) -> bool:
        checked.append(path)
        return real_islink(path)

    monkeypatch.setattr(os.path, "islink", islink)
    assert hostmounts.parent_resolved(str(outer / "inner")) == str(outer / "inner")
    assert str(outer) not in checked
    assert str(tmp_path) in checked


def test_parent_resolved_follows_links(tmp_path: Path, mountpoints: set[str]) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    assert hostmounts.parent_resolved(str(tmp_path / "link" / "m")) == str(real / "m")
    # The last component is never resolved, a link included.
    assert hostmounts.parent_resolved(str(tmp_path / "link")) == str(tmp_path / "link")


async def test_resolve_in_thread_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostmounts, "PATH_TIMEOUT", 0.2)
    release = threading.Event()

    def hang(path: str) -> str:
        release.wait(5)
        return path

    try:
        with pytest.raises(errors.Unavailable, match="did not return within 0.2 s"):
            await hostmounts.resolve_in_thread("/stuck", hang)
    finally:
        release.set()


async def test_resolve_in_thread_returns_result(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(tmp_path)
    assert await hostmounts.resolve_in_thread(str(tmp_path / "link")) == str(tmp_path)
