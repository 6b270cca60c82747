"""Polling for the next FUSE request for a moment after each reply, instead of sleeping.

pyfuse3 waits for the next request with trio's wait_readable, so an idle mount child sleeps in
epoll_wait and the kernel has to wake it for each request. A client that sends one request
after the other, such as a database or fio with the psync engine, pays that wake-up on every
request. On the 2-core virtual machines of docs/benchmarks.md, polling cut a 4 KiB read served
from the block cache from about 73 to 55 us (13,700 to 18,000 reads a second).

`RequestPoller.run` keeps a task yielding to trio for `window` seconds after each reply. While a
task is runnable, trio's loop calls epoll_wait with a timeout of 0, so a request that arrives
in that window is read at once. Polling starts only after a request that came within `window`
of the reply before it. So a mount whose requests come seldom spends no CPU on it, and a burst
of requests costs at most one window of polling after its last reply. The price is CPU during a
burst: while requests keep coming within the window, the mount child keeps one core busy, even
where each request needs only a fraction of the time between two of them.
"""

from __future__ import annotations

import math

import trio

#: Seconds of polling after a reply. A window of 1 ms measured the same as this one.
WINDOW = 0.0002


class RequestPoller:
    """Keeps the trio loop polling for `window` seconds after each reply within a burst."""

    def __init__(self, window: float = WINDOW) -> None:
        self._window = window
        self._last_reply = -math.inf
        self._in_burst = False
        self._wake: trio.Event | None = None

    @property
    def polling(self) -> bool:
        """Whether the loop is kept awake now."""
        return self._wake is not None and self._wake.is_set()

    def request_started(self) -> None:
        """Record a request, which belongs to a burst if the last reply was within the window."""
        self._in_burst = trio.current_time() - self._last_reply < self._window

    def request_replied(self) -> None:
        """Record a reply, and start polling if its request belongs to a burst."""
        self._last_reply = trio.current_time()
        if self._in_burst and self._wake is not None:
            self._wake.set()

    async def run(self) -> None:
        """Poll after each reply within a burst, until cancelled."""
        self._wake = trio.Event()
        try:
            while True:
                await self._wake.wait()
                while trio.current_time() - self._last_reply < self._window:
                    await trio.lowlevel.checkpoint()
                self._wake = trio.Event()
        finally:
            self._wake = None
