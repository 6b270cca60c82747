"""NodeBase._call_child: a mount child that cannot be reached raises ChildUnreachable."""

import types
from pathlib import Path

import pytest
import trio

from pxfs.errors import Unavailable
from pxfs.nodebase import ChildUnreachable, MountChild, NodeBase

SECRET = b"s" * 32


def child_at(path: Path) -> MountChild:
    return MountChild(vol_id="41", mountpoint=str(path.parent / "mnt"), control_socket=str(path))


async def call(child: MountChild, timeout: float = 5.0) -> None:
    node = types.SimpleNamespace(secret=SECRET)
    await NodeBase._call_child(node, child, timeout, "mount.sync")


async def test_missing_socket_is_unreachable(tmp_path: Path) -> None:
    with pytest.raises(ChildUnreachable, match="cannot connect to the mount child"):
        await call(child_at(tmp_path / "none.sock"))


async def test_failed_handshake_is_unreachable(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener.bind(str(path))
    listener.listen()

    async def close_each_connection() -> None:
        while True:
            connection, _ = await listener.accept()
            connection.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(close_each_connection)
        with pytest.raises(ChildUnreachable, match="cannot connect to the mount child"):
            await call(child_at(path))
        nursery.cancel_scope.cancel()
    listener.close()


async def test_silent_child_times_out_unreachable(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener.bind(str(path))
    # Connections wait in the backlog with no reply, as with a stopped child.
    listener.listen()
    with pytest.raises(ChildUnreachable, match="timed out after 0.5 s"):
        await call(child_at(path), timeout=0.5)
    listener.close()


def test_unreachable_travels_as_unavailable() -> None:
    assert issubclass(ChildUnreachable, Unavailable)
    assert ChildUnreachable("x").code == Unavailable.code
