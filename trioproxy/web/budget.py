"""One budget for the request bytes a server holds in memory at once (no I/O, no trio).

Theory of operation: a :class:`ByteBudget` has a limit in bytes. Whatever holds request
bytes (an HTTP exchange for the body its app was handed, a WebSocket message while it is
assembled, an app for what it decodes from them) takes a :class:`Reservation` with
``with budget.reserve() as reservation:`` and calls ``reservation.grow(n)`` before it keeps
``n`` more bytes. A grow that would take the budget past its limit raises
:class:`BudgetFull` and charges nothing; the holder refuses its request (429, WebSocket close
1013) instead of keeping the bytes. Leaving the ``with`` block gives back everything the
reservation took, on every path: nothing is released by hand, so nothing can be forgotten
or given back twice.

The server puts its budget into every ASGI scope as
``scope["extensions"]["trioproxy.request_memory"]``, so an app charges what it makes of a
request (a decompressed body, a parsed copy) against the same limit.

The default limit (:func:`default_limit`) is an eighth of the memory the process may use (the
machine's, or its container's if that is smaller), at most 1 GiB.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs

GIB = 1024 * 1024 * 1024


class BudgetFull(Exception):
    """A reservation could not grow: the budget's limit would be passed."""

    def __init__(self, wanted: int, held: int, limit: int) -> None:
        super().__init__(f"{wanted} more bytes would pass the budget ({held} of {limit} held)")
        self.wanted = wanted
        self.held = held
        self.limit = limit


@attrs.frozen
class BudgetStatistics:
    held: int  # bytes reserved now
    limit: int
    peak: int  # the most ever held at once
    refused_total: int  # grows refused
    reservations: int  # reservations open now
    released_total: int  # bytes given back, ever


@attrs.define(eq=False)
class Reservation:
    """Bytes held against a budget; made only by :meth:`ByteBudget.reserve`."""

    _budget: ByteBudget
    held: int = 0
    _open: bool = True

    def grow(self, n: int) -> None:
        """Take ``n`` more bytes, or raise :class:`BudgetFull` and take nothing."""
        if n <= 0:
            return
        if not self._open:
            raise RuntimeError("the reservation was already given back")
        self._budget._take(n)
        self.held += n

    def give_back(self, n: int) -> None:
        """Give back ``n`` of the bytes taken (what was held for something now gone); the
        rest stays held until the block ends."""
        n = min(n, self.held)
        if n <= 0:
            return
        self._budget._give(n)
        self.held -= n


@attrs.define(eq=False)
class ByteBudget:
    """A limit on bytes held at once, shared by every reservation made from it."""

    limit: int
    _held: int = 0
    _peak: int = 0
    _refused: int = 0
    _reservations: int = 0
    _released: int = 0

    def __attrs_post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError(f"a budget needs a limit of at least 1 byte, not {self.limit}")

    @contextmanager
    def reserve(self) -> Iterator[Reservation]:
        """A reservation, empty at first; all it took is given back when the block ends."""
        reservation = Reservation(self)
        self._reservations += 1
        try:
            yield reservation
        finally:
            reservation._open = False
            self._held -= reservation.held
            self._released += reservation.held
            self._reservations -= 1
            reservation.held = 0

    def available(self) -> int:
        return self.limit - self._held

    def _give(self, n: int) -> None:
        self._held -= n
        self._released += n

    def _take(self, n: int) -> None:
        if self._held + n > self.limit:
            self._refused += 1
            raise BudgetFull(n, self._held, self.limit)
        self._held += n
        self._peak = max(self._peak, self._held)

    def statistics(self) -> BudgetStatistics:
        return BudgetStatistics(
            held=self._held,
            limit=self.limit,
            peak=self._peak,
            refused_total=self._refused,
            reservations=self._reservations,
            released_total=self._released,
        )


def memory_available() -> int:
    """The memory this process may use: the machine's, or its cgroup's limit if lower."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def default_limit() -> int:
    """An eighth of :func:`memory_available`, at most 1 GiB: 64 MiB in a 512 MiB container,
    beside the conversation budget's default (docs/memory.md)."""
    return min(GIB, memory_available() // 8)
