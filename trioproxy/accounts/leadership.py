"""Jobs that one replica at a time does for all of them, under a lease in the store.

:meth:`Lease.lead` takes the store's lease ``name`` (``store/coordination.py``) whenever it is
free and, while this process holds it, runs ``jobs`` in a nursery of its own next to a task that
renews the lease every third of its term. Losing the lease (another holder took it after a
term ran out, or the store could not be reached for most of a term) cancels that nursery:
the jobs stop before anyone else can have started them, and it goes back to asking.
Leaving it (shutdown) gives the lease up, so another replica takes over at its
next ask instead of after a whole term.

Bounds: a replica that dies is replaced within one term plus one ask interval
(``term + term / 3``); jobs never run in two processes at once as long as their clocks agree
to within the margin kept before a term's end (a third of the term).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from trioproxy.logs import get_logger
from trioproxy.store import Store
from trioproxy.store.coordination import drop_lease, lease_holder, take_lease

log = get_logger("trioproxy.accounts")

#: seconds a lease is granted for (renewed every third of it)
LEASE_TERM = 15.0


@attrs.define(eq=False)
class Lease:
    """Lease ``name`` of the store, asked for as ``holder``; ``held`` says whether this
    process holds it now (and so runs its jobs)."""

    store: Store
    name: str
    holder: str
    term: float = LEASE_TERM
    held: bool = False

    def view(self) -> dict[str, Any]:
        return {"name": self.name, "holder": self.holder, "held": self.held, "term": self.term}

    async def lead(
        self,
        jobs: Callable[[trio.Nursery], Awaitable[None]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run ``jobs`` (which start their tasks in the nursery they are given) whenever this
        process holds the lease; until cancelled."""
        task_status.started()
        try:
            while True:
                if await self._ask():
                    log.info("lease taken: its jobs run here", lease=self.name, holder=self.holder)
                    self.held = True
                    try:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(self._keep, nursery.cancel_scope)
                            await jobs(nursery)
                    finally:
                        self.held = False
                    log.warning("lease lost: its jobs stopped here", lease=self.name)
                await trio.sleep(self.term / 3)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                try:
                    await self.store.run(drop_lease, self.store, self.name, self.holder)
                except Exception:
                    log.exception("giving up a lease failed", lease=self.name)

    async def _ask(self) -> bool:
        try:
            return await self.store.run(take_lease, self.store, self.name, self.holder, self.term)
        except Exception:
            log.exception("asking for a lease failed", lease=self.name)
            return False

    async def _keep(self, jobs_scope: trio.CancelScope) -> None:
        """Renew the lease every third of its term; cancel ``jobs_scope`` once it cannot be
        proven held (refused, or not renewed for two thirds of a term)."""
        held_until = trio.current_time() + self.term
        while True:
            await trio.sleep(self.term / 3)
            asked_at = trio.current_time()
            if await self._ask():
                held_until = asked_at + self.term
            elif trio.current_time() >= held_until - self.term / 3 or await self._taken():
                jobs_scope.cancel(reason=f"lease {self.name} lost")
                return

    async def _taken(self) -> bool:
        """Whether another holder has the lease (False when the store cannot say)."""
        try:
            current = await self.store.run(lease_holder, self.store, self.name)
        except Exception:
            return False
        return current is not None and current[0] != self.holder
