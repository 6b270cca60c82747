"""Trio mode for the tests in this folder: every async test here runs under pytest-trio."""

import inspect
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from etcdproc import EtcdProcess, start_etcd

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the coroutine tests of this folder as trio tests."""
    for item in items:
        function = getattr(item, "function", None)
        if function is None or not inspect.iscoroutinefunction(function):
            continue
        if _HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.trio)


@pytest.fixture
def tiny_fs(tmp_path):
    """A 1 MiB tmpfs under tmp_path, unmounted afterwards: a disk that fills at once."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "pxfs-test", str(mountpoint)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip()}")
    yield mountpoint
    if subprocess.run(["umount", str(mountpoint)]).returncode != 0:
        subprocess.run(["umount", "-l", str(mountpoint)], check=True)


@pytest.fixture(scope="module")
def shared_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    """One etcd for the tests of a module, which work under key prefixes of their own."""
    etcd = start_etcd(tmp_path_factory.mktemp("etcd"))
    yield etcd
    etcd.stop()


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[EtcdProcess]:
    """An etcd of this test alone, which it may stop, pause and restart."""
    etcd = start_etcd(tmp_path / "etcd")
    yield etcd
    etcd.stop()
