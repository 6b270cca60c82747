"""pxfs.sdnotify against real AF_UNIX datagram sockets on tmp_path and in the abstract namespace."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pxfs.sdnotify import Notifier, socket_address


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound at tmp_path/notify.sock, and its address."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        yield sock, str(path)


def test_without_socket_does_nothing() -> None:
    notifier = Notifier.from_environment({})
    assert not notifier.enabled
    assert notifier.notify("READY=1") is False
    assert notifier.ready() is False


def test_empty_variable_is_no_socket() -> None:
    assert not Notifier.from_environment({"NOTIFY_SOCKET": ""}).enabled


def test_ready_sent_to_path(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready() is True
    assert sock.recv(4096) == b"READY=1"


def test_assignments_share_one_datagram(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    assert Notifier(path).stopping("unmounting volumes") is True
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=unmounting volumes"


def test_status_newlines_are_joined(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    assert Notifier(path).ready("two\nlines") is True
    assert sock.recv(4096) == b"READY=1\nSTATUS=two lines"


def test_abstract_address() -> None:
    name = f"pxfs-sdnotify-test-{os.getpid()}-{threading.get_ident()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        assert Notifier("@" + name).notify("READY=1", "STATUS=up") is True
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"


def test_socket_address_forms() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@abc") == b"\0abc"
    for invalid in ("relative/path", "@", "vsock:2:1234"):
        with pytest.raises(ValueError, match="unsupported address"):
            socket_address(invalid)


def test_failure_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier(str(tmp_path / "missing.sock"))
    with caplog.at_level(logging.DEBUG, logger="pxfs.sdnotify"):
        assert notifier.ready() is False
        assert notifier.stopping() is False
    levels = [record.levelno for record in caplog.records]
    assert levels == [logging.WARNING, logging.DEBUG]
    assert "missing.sock" in caplog.records[0].getMessage()
    assert "READY=1" in caplog.records[0].getMessage()


def test_invalid_address_does_not_raise(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pxfs.sdnotify"):
        assert Notifier("relative.sock").ready() is False
    assert "unsupported address" in caplog.text


def test_full_queue_does_not_block(receiver: tuple[socket.socket, str]) -> None:
    # The test never reads from the receiver, so its queue fills and a blocking send hangs.
    _, path = receiver
    notifier = Notifier(path)
    results: list[bool] = []

    def send_until_rejected() -> None:
        for _ in range(20_000):
            results.append(notifier.notify("STATUS=" + "x" * 1024))
            if not results[-1]:
                return

    thread = threading.Thread(target=send_until_rejected, daemon=True)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive(), "notify() blocked on a full receive queue"
    assert results[0] is True
    assert results[-1] is False
