"""The idle timer under MockClock, and idle WebSocket sessions closed for real."""

from __future__ import annotations

import trio
import trio.testing

from trioproxy.sessions.idle import IdleTimer


async def test_fires_after_the_timeout_when_nothing_is_pending(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fired: list[float] = []
    timer = IdleTimer(120)

    async def on_idle() -> None:
        fired.append(trio.current_time())

    start = trio.current_time()
    await timer.run(on_idle)
    assert fired == [start + 120]


async def test_never_fires_while_work_is_pending_and_restarts_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fired: list[float] = []
    timer = IdleTimer(120)
    start = trio.current_time()

    async def on_idle() -> None:
        fired.append(trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(timer.run, on_idle)
        await trio.sleep(100)
        with timer.busy():  # a turn of 500 s: far past the timeout, no firing
            await trio.sleep(500)
        await trio.sleep(119)
        assert fired == []
        timer.begin()  # a request read, not yet started
        await trio.sleep(1000)
        assert fired == []
        timer.end()
    assert fired == [100 + 500 + 119 + 1000 + 120]
