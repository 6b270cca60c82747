"""Trio mode for the tests in this folder: every async test here runs under pytest-trio."""

import inspect
from pathlib import Path

import pytest

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the coroutine tests of this folder as trio tests."""
    for item in items:
        function = getattr(item, "function", None)
        if function is None or not inspect.iscoroutinefunction(function):
            continue
        if _HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.trio)
