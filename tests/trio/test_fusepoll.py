"""RequestPoller: when it keeps the loop polling and when it lets it sleep."""

from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from pxfs.fusepoll import RequestPoller

WINDOW = 0.001


@pytest.fixture
async def poller(mock_clock: trio.testing.MockClock) -> AsyncIterator[RequestPoller]:
    """A poller running in its own task, on a clock that moves only when the test jumps it."""
    poller = RequestPoller(WINDOW)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poller.run)
        await trio.testing.wait_all_tasks_blocked()
        yield poller
        nursery.cancel_scope.cancel()


def request(poller: RequestPoller) -> None:
    poller.request_started()
    poller.request_replied()


async def let_poller_run() -> None:
    """Give the poller task a few turns, since a task that polls is never blocked."""
    for _ in range(3):
        await trio.lowlevel.checkpoint()


async def test_polls_after_request_in_burst(
    poller: RequestPoller, mock_clock: trio.testing.MockClock
) -> None:
    request(poller)
    await let_poller_run()
    assert not poller.polling

    mock_clock.jump(WINDOW / 2)
    request(poller)
    await let_poller_run()
    assert poller.polling

    mock_clock.jump(WINDOW / 2)
    await let_poller_run()
    assert poller.polling, "polling stopped before the window after the last reply ended"


async def test_stops_polling_after_window(
    poller: RequestPoller, mock_clock: trio.testing.MockClock
) -> None:
    request(poller)
    mock_clock.jump(WINDOW / 2)
    request(poller)
    await let_poller_run()
    assert poller.polling

    mock_clock.jump(WINDOW * 2)
    await let_poller_run()
    assert not poller.polling


async def test_no_polling_for_seldom_requests(
    poller: RequestPoller, mock_clock: trio.testing.MockClock
) -> None:
    for _ in range(3):
        request(poller)
        await let_poller_run()
        assert not poller.polling
        mock_clock.jump(WINDOW * 2)
