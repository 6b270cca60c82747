"""A volume on a FileDevice whose file system fills up: it must recover once files are removed.

Needs root to mount a small tmpfs, which each test creates and removes itself.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from pxfs.errors import NoSpace
from pxfs.volume.check import check_volume
from pxfs.volume.device import FileDevice
from pxfs.volume.format import ROOT_INO, device_blocks
from pxfs.volume.namespace import Volume

MIB = 1024 * 1024
#: Far larger than the disk under it: the volume is thin and the disk fills first.
VOLUME_SIZE = 1024 * MIB
DISK_SIZE = "32m"
#: Enough small files that their records need ring blocks the journal never wrote before.
METADATA_FILES = 1500

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a tmpfs")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    options = f"size={DISK_SIZE}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def _used_bytes(path: Path) -> int:
    info = os.statvfs(path)
    return (info.f_blocks - info.f_bfree) * info.f_frsize


async def _fill(volume: Volume, ino: int) -> int:
    """Write 1 MiB pieces, syncing every 8 MiB, until NoSpace; return the bytes accepted."""
    chunk = os.urandom(MIB)
    offset = 0
    try:
        while offset < VOLUME_SIZE:
            await volume.write(ino, offset, chunk)
            offset += len(chunk)
            if offset % (8 * MIB) == 0:
                await volume.sync()
    except NoSpace:
        return offset
    raise AssertionError("the disk never filled")


async def _fill_then_recover(path: Path) -> None:
    device = FileDevice.open(str(path), create_blocks=device_blocks(VOLUME_SIZE))
    try:
        await Volume.format(device, "disk-full", VOLUME_SIZE)
        async with trio.open_nursery() as nursery:
            volume = await Volume.open(device, nursery=nursery)
            fill = volume.create(ROOT_INO, b"fill", 0o644, 0, 0).ino
            assert await _fill(volume, fill) > 8 * MIB
            directory = volume.mkdir(ROOT_INO, b"dir", 0o755, 0, 0).ino
            for index in range(METADATA_FILES):
                volume.create(directory, b"file-%04d-" % index + b"n" * 200, 0o644, 0, 0)
            volume.create(directory, b"new", 0o644, 0, 0)
            volume.rename(directory, b"new", ROOT_INO, b"renamed")
            volume.unlink(ROOT_INO, b"fill")
            with trio.fail_after(10):
                await volume.sync()
            assert _used_bytes(path.parent) < 8 * MIB
            again = volume.create(ROOT_INO, b"again", 0o644, 0, 0).ino
            data = os.urandom(4 * MIB)
            await volume.write(again, 0, data)
            await volume.sync()
            await volume.close()
            nursery.cancel_scope.cancel()
        assert await check_volume(device) == []
        async with trio.open_nursery() as nursery:
            volume = await Volume.open(device, nursery=nursery)
            again = volume.lookup(ROOT_INO, b"again").ino
            assert await volume.read(again, 0, len(data)) == data
            assert volume.lookup(ROOT_INO, b"renamed").ino
            await volume.close()
            nursery.cancel_scope.cancel()
    finally:
        device.close()


def test_volume_recovers_after_the_disk_fills(small_disk: Path) -> None:
    trio.run(_fill_then_recover, small_disk / "vol.dev")
