"""Events from the scheduler thread to one HTTP handler on the event loop, with at most one wake-up in flight.

The scheduler makes a token every few milliseconds per row; waking the event loop for each (a self-pipe write,
a loop turn, a queue put) costs the loop - and through the GIL the scheduler - work per token. Here the scheduler
appends under a lock and schedules a wake-up only when none is pending; the handler takes everything that arrived
since its last turn at once (and writes it as one SSE chunk).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque


class Mailbox:
    """A many-items-per-wake-up queue from any thread to ``loop``.

    Args:
        loop: The event loop the reader runs on.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: deque = deque()
        self._lock = threading.Lock()
        self._wake_pending = False
        self._waiter: asyncio.Future | None = None

    def put(self, item: object) -> None:
        """Deliver ``item`` (any thread). Dropped silently once the loop is closed (server shutdown)."""
        with self._lock:
            self._items.append(item)
            if self._wake_pending:
                return
            self._wake_pending = True
        try:
            self._loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # the event loop is gone
            pass

    def _wake(self) -> None:
        with self._lock:
            self._wake_pending = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _take(self) -> list:
        with self._lock:
            items = list(self._items)
            self._items.clear()
        return items

    async def get_all(self, timeout: float) -> list:
        """Every item delivered so far, waiting up to ``timeout`` seconds for the first; [] only when none came.

        A wake-up can find nothing (an earlier call took the items it announced): then it waits again.
        """
        deadline = self._loop.time() + timeout
        while True:
            items, remaining = self._take(), deadline - self._loop.time()
            if items or remaining <= 0:
                return items
            self._waiter = self._loop.create_future()
            try:
                await asyncio.wait_for(self._waiter, remaining)
            except asyncio.TimeoutError:  # noqa: UP041 - not the builtin TimeoutError before Python 3.11
                pass
            finally:
                self._waiter = None
