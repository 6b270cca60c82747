"""A full file system under a volume, under pxd's data directory and under the sidecar's state.

Each must give ENOSPC or a clear error, keep every file it had intact, and work again once
space returns. Needs root to mount a small tmpfs, which each test creates and removes itself;
the pxd test also needs /dev/fuse.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import trio
from nodeproc import Node

from pxfs import errors
from pxfs.api.dockerrefs import RefStore
from pxfs.errors import NoSpace
from pxfs.volume.check import check_volume
from pxfs.volume.device import FileDevice
from pxfs.volume.format import ROOT_INO, device_blocks
from pxfs.volume.namespace import Volume

MIB = 1024 * 1024
GIB = 1024 * MIB
#: Far larger than the disk under it: the volume is thin and the disk fills first.
VOLUME_SIZE = 1024 * MIB
DISK_SIZE = "32m"
#: Enough small files that their records need ring blocks the journal never wrote before.
METADATA_FILES = 1500
#: Files with long names whose unlink records need more ring blocks than the journal keeps
#: written ahead of its head.
DELETED_FILES = 20000
#: Creates on the full disk ahead of the delete: their records fill about 1.5 MiB of the ring.
QUEUED_FILES = 5000

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a tmpfs")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with _tmpfs(tmp_path / "disk", DISK_SIZE) as disk:
        yield disk


@contextlib.contextmanager
def _tmpfs(disk: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of `size` at `disk` for the duration of the block."""
    disk.mkdir()
    options = f"size={size}"
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


@contextlib.asynccontextmanager
async def _opened(device: FileDevice) -> AsyncIterator[Volume]:
    """Open the volume on `device` for the block, and close it at the end."""
    async with trio.open_nursery() as nursery:
        volume = await Volume.open(device, nursery=nursery)
        yield volume
        await volume.close()
        nursery.cancel_scope.cancel()


async def _fill_then_recover(path: Path) -> None:
    device = FileDevice.open(str(path), create_blocks=device_blocks(VOLUME_SIZE))
    try:
        await Volume.format(device, "disk-full", VOLUME_SIZE)
        async with _opened(device) as volume:
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
        assert await check_volume(device) == []
        async with _opened(device) as volume:
            again = volume.lookup(ROOT_INO, b"again").ino
            assert await volume.read(again, 0, len(data)) == data
            assert volume.lookup(ROOT_INO, b"renamed").ino
    finally:
        device.close()


def test_volume_recovers_after_the_disk_fills(small_disk: Path) -> None:
    trio.run(_fill_then_recover, small_disk / "vol.dev")


async def _delete_on_a_full_disk(path: Path) -> None:
    device = FileDevice.open(str(path), create_blocks=device_blocks(VOLUME_SIZE))
    try:
        await Volume.format(device, "delete-on-full", VOLUME_SIZE)
        async with _opened(device) as volume:
            directory = volume.mkdir(ROOT_INO, b"dir", 0o755, 0, 0).ino
            names = [b"file-%05d-" % index + b"n" * 200 for index in range(DELETED_FILES)]
            for name in names:
                volume.create(directory, name, 0o644, 0, 0)
            fill = volume.create(ROOT_INO, b"fill", 0o644, 0, 0).ino
            assert await _fill(volume, fill) > 8 * MIB
            used = _used_bytes(path.parent)
            # Records that free nothing, queued on the full disk ahead of the delete.
            for index in range(QUEUED_FILES):
                volume.create(ROOT_INO, b"queued-%05d-" % index + b"n" * 200, 0o644, 0, 0)

            volume.unlink(ROOT_INO, b"fill")
            for name in names:
                volume.unlink(directory, name)
            # Each failed sync writes the records that fit, and the next one finds the space.
            for _ in range(3):
                try:
                    await volume.sync()
                    break
                except NoSpace:
                    pass
            else:
                raise AssertionError("the delete never became durable on the full disk")
            # The ring keeps the space that the unlink records took; the fill file's comes back.
            assert _used_bytes(path.parent) < used - 4 * MIB
            again = volume.create(ROOT_INO, b"again", 0o644, 0, 0).ino
            await volume.write(again, 0, os.urandom(4 * MIB))
            await volume.sync()
        assert await check_volume(device) == []
        async with _opened(device) as volume:
            assert [name for name, _ in volume.opendir(directory)] == [b".", b".."]
            with pytest.raises(errors.NotFound):
                volume.lookup(ROOT_INO, b"fill")
    finally:
        device.close()


def test_delete_on_a_full_disk_frees_space(small_disk: Path) -> None:
    trio.run(_delete_on_a_full_disk, small_disk / "vol.dev")


def _fill_disk(disk: Path, leave: int = 0) -> Path:
    """Fill the file system of `disk` with one file, then free about `leave` bytes of it."""
    filler = disk / "filler"
    chunk = b"\xff" * MIB
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            os.write(fd, chunk)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


# --- the sidecar's reference counts -------------------------------------------------------------


def test_docker_refs_survive_a_full_disk(tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "disk", "1m") as disk:
        asyncio.run(_refs_on_a_full_disk(disk / "sidecar" / "docker-refs.json"))


async def _refs_on_a_full_disk(path: Path) -> None:
    refs = RefStore(path)
    # A file of several pages, so that a write into the last free page of the disk is short.
    for index in range(200):
        await refs.add("111", "vol-a", f"container-{index:04d}-" + "c" * 40)
    before = path.read_bytes()
    assert len(before) > 3 * 4096
    filler = _fill_disk(path.parent.parent, leave=4096)

    with pytest.raises(errors.NoSpace) as failure:
        await refs.add("111", "vol-a", "one-more")
    assert "docker-refs.json" in failure.value.message
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == ["docker-refs.json"]
    assert len(RefStore.load(path).volume_ids()) == 1

    filler.unlink()
    await refs.add("111", "vol-a", "one-more")
    saved = json.loads(path.read_text())
    assert "one-more" in saved["volumes"]["111"]["containers"]
    assert len(saved["volumes"]["111"]["containers"]) == 201


# --- pxd with its data directory on a full disk -------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_and_fsync(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _wait_for_log(node: Node, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in node.log_text():
        assert time.monotonic() < deadline, f"pxd never logged {text!r}:\n{node.log_text()}"
        time.sleep(0.2)


def _run_pxd_on_a_small_disk(tmp_path: Path, scenario: Callable[[Node, Path, Path], None]) -> None:
    """Run `scenario(node, disk, mountpoint)` with pxd started on a 64 MiB tmpfs at `disk`."""
    mountpoint = tmp_path / "mnt"
    with _tmpfs(tmp_path / "disk", "64m") as disk:
        node = Node(tmp_path / "node")
        node.data_dir = disk / "data"
        try:
            node.root.mkdir()
            node.start()
            scenario(node, disk, mountpoint)
        finally:
            node.cleanup([mountpoint])


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
def test_pxd_data_dir_on_a_full_disk(tmp_path: Path) -> None:
    _run_pxd_on_a_small_disk(tmp_path, _run_pxd_on_a_full_disk)


def _run_pxd_on_a_full_disk(node: Node, disk: Path, mountpoint: Path) -> None:
    node.mount_volume("full-a", mountpoint, size=GIB)
    _write_and_fsync(mountpoint / "kept", os.urandom(2 * MIB))
    kept_digest = _sha256(mountpoint / "kept")
    catalog = node.data_dir / "catalog.json"
    catalog_before = json.loads(catalog.read_text())
    filler = _fill_disk(disk)

    # A create needs a replica and a catalog record: it fails with NoSpace and changes nothing.
    result = node.pxctl("volume", "create", "full-b", "--size", "1")
    assert result.returncode == errors.NoSpace.exit_code, result.stderr
    assert "Traceback" not in result.stderr
    assert json.loads(catalog.read_text()) == catalog_before
    assert not (node.data_dir / "catalog.json.tmp").exists()
    assert sorted(os.listdir(node.data_dir / "replicas")) == [_only_volume_id(catalog_before)]

    # Writes to the volume fail with ENOSPC at fsync, and the file written before stays.
    with pytest.raises(OSError) as failure:
        _write_and_fsync(mountpoint / "lost", os.urandom(4 * MIB))
    assert failure.value.errno == errno.ENOSPC
    (mountpoint / "lost").unlink()
    _wait_for_log(node, "saving I/O statistics failed")
    assert _sha256(mountpoint / "kept") == kept_digest

    filler.unlink()
    _wait_for_log(node, "saving I/O statistics works again")
    assert node.log_text().count("saving I/O statistics failed") == 1
    created = node.pxctl("volume", "create", "full-b", "--size", "1")
    assert created.returncode == 0, created.stderr
    _write_and_fsync(mountpoint / "again", os.urandom(4 * MIB))
    for stats_file in (node.data_dir / "stats").iterdir():
        json.loads(stats_file.read_text())

    # A restart finds the catalog intact and mounts the volume again.
    assert node.stop() == 0
    node.start()
    assert _sha256(mountpoint / "kept") == kept_digest
    names = sorted(record["name"] for record in node.call("volume.list", {}))
    assert names == ["full-a", "full-b"]
    node.call("volume.unmount", "full-a", str(mountpoint))
    node.call("volume.detach", "full-a")
    for name in names:
        node.call("volume.delete", name)


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
def test_full_disk_unmount_keeps_data(tmp_path: Path) -> None:
    _run_pxd_on_a_small_disk(tmp_path, _unmount_on_a_full_disk)


def _unmount_on_a_full_disk(node: Node, disk: Path, mountpoint: Path) -> None:
    node.mount_volume("full-u", mountpoint, size=GIB)
    durable = os.urandom(MIB)
    _write_and_fsync(mountpoint / "durable", durable)
    filler = _fill_disk(disk)

    # Every write is durable, so only the catalog write fails, and the path keeps the volume.
    catalog_full = node.pxctl("host", "unmount", "full-u", str(mountpoint))
    assert catalog_full.returncode == errors.NoSpace.exit_code, catalog_full.stdout
    assert "catalog" in catalog_full.stderr
    assert os.path.ismount(mountpoint)
    assert (mountpoint / "durable").read_bytes() == durable

    # Not fsync'd: the data waits in the mount child, which cannot store it.
    data = os.urandom(4 * MIB)
    (mountpoint / "unsaved").write_bytes(data)

    failed = node.pxctl("host", "unmount", "full-u", str(mountpoint))
    assert failed.returncode == errors.NoSpace.exit_code, failed.stdout
    assert "it stays mounted" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert (mountpoint / "unsaved").read_bytes() == data

    filler.unlink()
    unmounted = node.pxctl("host", "unmount", "full-u", str(mountpoint))
    assert unmounted.returncode == 0, unmounted.stderr
    node.call("volume.mount", "full-u", str(mountpoint))
    assert (mountpoint / "unsaved").read_bytes() == data
    assert (mountpoint / "durable").read_bytes() == durable
    node.call("volume.unmount", "full-u", str(mountpoint))


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
def test_stop_on_full_disk_logs_error(tmp_path: Path) -> None:
    _run_pxd_on_a_small_disk(tmp_path, _stop_on_a_full_disk)


def _stop_on_a_full_disk(node: Node, disk: Path, mountpoint: Path) -> None:
    node.mount_volume("full-s", mountpoint, size=GIB)
    filler = _fill_disk(disk)
    (mountpoint / "unsaved").write_bytes(os.urandom(4 * MIB))

    assert node.stop() == 0
    lines = [line for line in node.log_text().splitlines() if "writes that do not fit" in line]
    assert len(lines) == 1, node.log_text()
    assert " ERROR " in lines[0]
    filler.unlink()


def _only_volume_id(catalog: dict[str, object]) -> str:
    volumes = catalog["volumes"]
    assert isinstance(volumes, dict) and len(volumes) == 1
    return str(next(iter(volumes)))
