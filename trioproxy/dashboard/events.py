"""The live page's server-sent events: a snapshot every second.

:class:`SnapshotStream` is the body of the ``GET /dashboard/events`` answer, iterated by the
request's own handler task (quart-trio's: the request's nursery), so the stream lives
exactly as long as that request: it ends when the client leaves (the server tells the app
``http.disconnect`` and the handler's nursery is cancelled, the wait between snapshots with
it), when the proxy starts draining (``stop`` is set: the stream ends at once, so a drain
never waits for dashboards), when the session ends, and at shutdown (the server cancels its
connections). It starts no task of its own; each wait is a cancel scope that closes before
the next snapshot is handed out.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import attrs
import trio


def sse_message(event: str, data: str) -> bytes:
    """One SSE message: ``event:`` and one ``data:`` line per line of ``data``."""
    lines = [f"event: {event}"] + [f"data: {line}" for line in data.splitlines() or [""]]
    return ("\n".join(lines) + "\n\n").encode("utf-8")


@attrs.define(eq=False)
class SnapshotStream:
    """``render()`` at once, then every ``interval`` seconds, as ``snapshot`` events,
    while ``still_valid()`` and until ``stop`` is set (see the module docstring)."""

    render: Callable[[], Awaitable[str]]
    still_valid: Callable[[], Awaitable[bool]]
    stop: trio.Event
    interval: float = 1.0
    sent: int = attrs.field(default=0, init=False)

    def __aiter__(self) -> SnapshotStream:
        return self

    async def __anext__(self) -> bytes:
        if self.sent:
            with trio.move_on_after(self.interval):
                await self.stop.wait()
        if self.stop.is_set() or not await self.still_valid():
            raise StopAsyncIteration
        self.sent += 1
        return sse_message("snapshot", await self.render())
