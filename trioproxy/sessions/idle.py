"""An idle timer as one restartable task: a cancel scope whose deadline moves.

``begin()`` marks work pending (a request received, from the moment it is read) and
``end()`` its end; the timer runs only while nothing is pending, and fires ``timeout``
seconds after the last work ended (or after start).
Restarting is moving the deadline, not spawning a task, so a session has exactly one timer
for its whole life.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import attrs
import trio


@attrs.define(eq=False)
class IdleTimer:
    timeout: float
    _busy: int = 0
    _deadline: float = math.inf
    _scope: trio.CancelScope | None = None
    settled: trio.Event = attrs.field(factory=trio.Event)  # set each time work drops to zero

    @property
    def busy_count(self) -> int:
        return self._busy

    def _set(self, deadline: float) -> None:
        self._deadline = deadline
        if self._scope is not None:
            self._scope.deadline = deadline

    def begin(self) -> None:
        self._busy += 1
        self._set(math.inf)

    def end(self) -> None:
        self._busy -= 1
        if self._busy == 0:
            self._set(trio.current_time() + self.timeout)
            self.settled.set()
            self.settled = trio.Event()

    @contextmanager
    def busy(self) -> Iterator[None]:
        self.begin()
        try:
            yield
        finally:
            self.end()

    async def run(self, on_idle: Callable[[], Awaitable[None]]) -> None:
        """Wait until idle for ``timeout`` seconds, then call ``on_idle`` once and return."""
        if self._busy == 0 and self._deadline == math.inf:
            self._deadline = trio.current_time() + self.timeout
        while True:
            with trio.CancelScope(deadline=self._deadline) as scope:
                self._scope = scope
                await trio.sleep_forever()
            self._scope = None
            if self._busy == 0 and trio.current_time() >= self._deadline:
                await on_idle()
                return
