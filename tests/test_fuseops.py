"""Tests of pxfs.fuseops that need no mount: the filter of pyfuse3's log."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from pxfs.fuseops import DroppedReplyFilter


def _pyfuse3_record(level: int, msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("pyfuse3", level, "handlers.pxi", 514, msg, args, None)


@pytest.fixture
def root_at_info() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)
    yield root
    root.setLevel(level)


def test_dropped_reply_lowered_and_hidden(root_at_info: logging.Logger) -> None:
    record = _pyfuse3_record(
        logging.ERROR, "fuse_release(): fuse_reply_* failed with %s", "No such file or directory"
    )
    assert DroppedReplyFilter().filter(record) is False
    assert record.levelno == logging.DEBUG
    assert record.levelname == "DEBUG"


def test_dropped_reply_shown_at_debug(root_at_info: logging.Logger) -> None:
    root_at_info.setLevel(logging.DEBUG)
    record = _pyfuse3_record(
        logging.ERROR, "fuse_write(): fuse_reply_* failed with %s", "No such file or directory"
    )
    assert DroppedReplyFilter().filter(record) is True
    assert record.levelname == "DEBUG"


@pytest.mark.parametrize(
    ("msg", "args"),
    [
        ("fuse_release(): fuse_reply_* failed with %s", ("Invalid argument",)),
        ("fuse_read(): something else failed with %s", ("No such file or directory",)),
    ],
    ids=["other-errno", "other-message"],
)
def test_other_errors_stay(root_at_info: logging.Logger, msg: str, args: tuple[str]) -> None:
    record = _pyfuse3_record(logging.ERROR, msg, *args)
    assert DroppedReplyFilter().filter(record) is True
    assert record.levelno == logging.ERROR
