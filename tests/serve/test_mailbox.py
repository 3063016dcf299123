"""The scheduler-to-handler mailbox: every event arrives once and in order, many per wake-up, none after a timeout."""

from __future__ import annotations

import asyncio
import threading

from lorakit.serve.mailbox import Mailbox


def test_events_from_another_thread_arrive_in_order_with_few_wake_ups():
    async def main() -> tuple[list, int]:
        loop = asyncio.get_running_loop()
        box, wakes = Mailbox(loop), []
        original = box._wake
        box._wake = lambda: (wakes.append(1), original())[1]
        go = threading.Event()

        def produce() -> None:
            go.wait()
            for i in range(500):
                box.put(i)

        thread = threading.Thread(target=produce)
        thread.start()
        go.set()
        got: list = []
        while len(got) < 500:
            got += await box.get_all(5.0)
        thread.join()
        return got, len(wakes)

    got, wakes = asyncio.run(main())
    assert got == list(range(500))
    assert wakes < 500  # the loop was woken at most once per batch of events, not once per event


def test_get_all_returns_nothing_after_its_timeout_and_then_later_items():
    async def main() -> tuple[list, list]:
        box = Mailbox(asyncio.get_running_loop())
        empty = await box.get_all(0.01)
        asyncio.get_running_loop().call_later(0.01, lambda: threading.Thread(target=box.put, args=("x",)).start())
        return empty, await box.get_all(5.0)

    assert asyncio.run(main()) == ([], ["x"])


def test_a_wake_up_that_finds_nothing_is_not_a_timeout():
    async def main() -> list:
        box = Mailbox(asyncio.get_running_loop())
        box.put("a")  # announces a wake-up ...
        assert await box.get_all(0) == ["a"]  # ... but the items are taken before it runs
        later = asyncio.get_running_loop().call_later(0.05, box.put, "b")
        got = await box.get_all(5.0)  # the stale wake-up must not end the wait with []
        later.cancel()
        return got

    assert asyncio.run(main()) == ["b"]
