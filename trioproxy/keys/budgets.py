"""Budget counters: what a key spent in each of its budget windows (sans-IO).

A :class:`Counter` counts one :class:`~trioproxy.keys.policy.Budget`'s window. Times are unix
seconds given by the caller (the proxy passes its pool clock, which follows trio's clock,
so ``trio.testing.MockClock`` moves windows too).

* A **calendar** window is one running total and the window's start; when ``now`` passes
  the window's end the total starts again from zero. Days start at 00:00 UTC, weeks on
  Monday, months on the 1st.
* A **rolling** window of length ``W`` is kept in :data:`SLOTS` slots of ``W / SLOTS``
  seconds each (a 5 h window: 5-minute slots); what was spent in the slot that began
  ``W`` ago drops out as a whole. A rolling budget is therefore exact to one slot: it may
  allow a request up to one slot earlier than an exact sliding window would.

``exceeded(now)`` tells whether a limit is reached (a new request is refused then);
``frees_at(now)`` when the usage falls back under every limit (``Retry-After``).
Counters serialize to JSON (``as_json``/``from_json``) for the store.

Replicas: each process counts what it charged itself and writes that as its own row. What
the other replicas wrote is summed into one counter (:meth:`Counter.summed`) and set as the
counter's ``elsewhere``: every reading (``used``, ``exceeded``, ``used_fraction``,
``frees_at``, ``resets_at``) adds it, while ``add`` and ``as_json`` touch only this
process's own counts.
"""

from __future__ import annotations

import calendar
import datetime as dt
from collections.abc import Mapping
from typing import Any

import attrs

from trioproxy.keys.policy import LIMITS, Budget

SLOTS = 60


@attrs.define
class Spend:
    """Counts of one request, or of many added up."""

    requests: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float = 0.0

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def get(self, name: str) -> float:
        return float(getattr(self, name))

    def add(self, other: Spend) -> None:
        self.requests += other.requests
        self.input_tokens += other.input_tokens
        self.cached_input_tokens += other.cached_input_tokens
        self.output_tokens += other.output_tokens
        self.reasoning_tokens += other.reasoning_tokens
        self.cost_usd += other.cost_usd

    def subtract(self, other: Spend) -> None:
        self.requests -= other.requests
        self.input_tokens -= other.input_tokens
        self.cached_input_tokens -= other.cached_input_tokens
        self.output_tokens -= other.output_tokens
        self.reasoning_tokens -= other.reasoning_tokens
        self.cost_usd -= other.cost_usd

    def as_list(self) -> list[float]:
        return [
            self.requests,
            self.input_tokens,
            self.cached_input_tokens,
            self.output_tokens,
            self.reasoning_tokens,
            round(self.cost_usd, 9),
        ]

    @classmethod
    def from_list(cls, value: Any) -> Spend:
        if not isinstance(value, list) or len(value) != 6:
            return cls()
        try:
            requests, input_tokens, cached, output, reasoning = (int(v) for v in value[:5])
            return cls(requests, input_tokens, cached, output, reasoning, float(value[5]))
        except (TypeError, ValueError):
            return cls()

    def as_json(self) -> dict[str, float]:
        return {name: self.get(name) for name in LIMITS}


def calendar_start(window: str, now: float) -> float:
    """The start of the calendar ``window`` (daily, weekly, monthly; UTC) that holds ``now``."""
    day = now - now % 86400
    if window == "daily":
        return day
    if window == "weekly":
        weekday = dt.datetime.fromtimestamp(day, dt.UTC).weekday()  # Monday = 0
        return day - weekday * 86400
    if window == "monthly":
        date = dt.datetime.fromtimestamp(day, dt.UTC)
        return calendar.timegm((date.year, date.month, 1, 0, 0, 0))
    raise ValueError(f"{window} has no calendar form")


def calendar_end(window: str, start: float) -> float:
    if window == "daily":
        return start + 86400
    if window == "weekly":
        return start + 7 * 86400
    date = dt.datetime.fromtimestamp(start, dt.UTC)
    year, month = (date.year + 1, 1) if date.month == 12 else (date.year, date.month + 1)
    return calendar.timegm((year, month, 1, 0, 0, 0))


@attrs.define(eq=False)
class Counter:
    """What was spent in one budget's window (see the module docstring)."""

    budget: Budget
    start: float = 0.0  # calendar: the current window's start
    end: float = 0.0  # calendar: the current window's end
    #: spent in the window: calendar, since ``start``; rolling, the sum of ``slots``
    total: Spend = attrs.field(factory=Spend)
    #: rolling: slot index -> spent, oldest first (times only grow)
    slots: dict[int, Spend] = attrs.field(factory=dict)
    #: what the other replicas counted for the same budget (read from the store)
    elsewhere: Counter | None = None

    @property
    def slot_seconds(self) -> float:
        return self.budget.seconds / SLOTS

    def _advance(self, now: float) -> None:
        if self.budget.reset == "calendar":
            if not self.start <= now < self.end:
                start = calendar_start(self.budget.window, now)
                if start != self.start:
                    self.start, self.total = start, Spend()
                self.end = calendar_end(self.budget.window, start)
            return
        oldest = int(now // self.slot_seconds) - SLOTS + 1
        slots = self.slots
        while slots:
            first = next(iter(slots))
            if first >= oldest:
                break
            self.total.subtract(slots.pop(first))

    def _all(self, now: float) -> Spend:
        """Own and elsewhere's counts in the window."""
        self._advance(now)
        if self.elsewhere is None:
            return self.total
        other = self.elsewhere
        other._advance(now)
        if self.budget.reset == "calendar" and other.start != self.start:
            return self.total
        both = attrs.evolve(self.total)
        both.add(other.total)
        return both

    def _all_slots(self) -> dict[int, Spend]:
        if self.elsewhere is None:
            return self.slots
        merged: dict[int, Spend] = {}
        for slots in (self.slots, self.elsewhere.slots):
            for index, spend in slots.items():
                into = merged.get(index)
                if into is None:
                    into = merged[index] = Spend()
                into.add(spend)
        return dict(sorted(merged.items()))

    @classmethod
    def summed(cls, budget: Budget, counters: list[Counter], now: float) -> Counter:
        """One counter holding what ``counters`` (other replicas' ones) counted in the
        window of ``now``."""
        total = cls(budget)
        total._advance(now)
        for counter in counters:
            counter._advance(now)
            if budget.reset == "calendar":
                if counter.start == total.start:
                    total.total.add(counter.total)
                continue
            for index, spend in counter.slots.items():
                into = total.slots.get(index)
                if into is None:
                    into = total.slots[index] = Spend()
                into.add(spend)
                total.total.add(spend)
        total.slots = dict(sorted(total.slots.items()))
        return total

    def add(self, spend: Spend, now: float) -> None:
        self._advance(now)
        self.total.add(spend)
        if self.budget.reset == "rolling":
            index = int(now // self.slot_seconds)
            slot = self.slots.get(index)
            if slot is None:
                slot = self.slots[index] = Spend()
            slot.add(spend)

    def used(self, now: float) -> Spend:
        return attrs.evolve(self._all(now))

    def window(self, now: float) -> tuple[float, float]:
        """The window's start and end (rolling: the window that ends now)."""
        if self.budget.reset == "calendar":
            start = calendar_start(self.budget.window, now)
            return start, calendar_end(self.budget.window, start)
        return now - self.budget.seconds, now

    def exceeded(self, now: float) -> str | None:
        """The first limit reached (used >= limit), or None."""
        total = self._all(now)
        for name, limit in self.budget.limits.items():
            if _value(total, name) >= limit:
                return name
        return None

    def frees_at(self, now: float) -> float:
        """When the usage falls under every limit again (``now`` if it is under them)."""
        if self.exceeded(now) is None:
            return now
        if self.budget.reset == "calendar":
            return self.end
        used = self.used(now)
        slots = self._all_slots()
        for index in slots:
            used.subtract(slots[index])
            if all(_value(used, name) < limit for name, limit in self.budget.limits.items()):
                # slot ``index`` leaves the window when the slot SLOTS later begins
                return (index + SLOTS) * self.slot_seconds
        return now + self.budget.seconds

    def resets_at(self, now: float) -> float:
        """When the oldest usage in the window leaves it (calendar: the window's end)."""
        self._all(now)  # advances both
        if self.budget.reset == "calendar":
            return self.end
        slots = self._all_slots()
        if not slots:
            return now + self.budget.seconds
        return (next(iter(slots)) + SLOTS) * self.slot_seconds

    def used_fraction(self, now: float) -> float:
        """The largest share of a limit used (1.0 and more: spent)."""
        total = self._all(now)
        return max(_value(total, name) / limit for name, limit in self.budget.limits.items())

    def as_json(self) -> dict[str, Any]:
        if self.budget.reset == "calendar":
            return {"start": self.start, "total": self.total.as_list()}
        return {"slots": {str(i): s.as_list() for i, s in self.slots.items()}}

    @classmethod
    def from_json(cls, budget: Budget, value: Mapping[str, Any] | None) -> Counter:
        counter = cls(budget)
        if not isinstance(value, Mapping):
            return counter
        if budget.reset == "calendar":
            start = value.get("start")
            if isinstance(start, int | float):
                counter.start = float(start)
                counter.end = calendar_end(budget.window, counter.start)
                counter.total = Spend.from_list(value.get("total"))
            return counter
        slots = value.get("slots")
        if isinstance(slots, Mapping):
            loaded: dict[int, Spend] = {}
            for index, spend in slots.items():
                try:
                    loaded[int(index)] = Spend.from_list(spend)
                except ValueError:
                    continue
            for index in sorted(loaded):
                counter.slots[index] = loaded[index]
                counter.total.add(loaded[index])
        return counter

    def seed(self, hours: list[Mapping[str, Any]], now: float) -> None:
        """Count hourly usage rows (``hour`` and the store's usage counts): what a new
        budget starts from. Each hour is counted from its start, so a rolling window counts
        an hour that began before it only if that start is inside it (a restored rolling
        budget may count up to an hour less than an exact one)."""
        start = self.window(now)[0]
        for row in hours:
            hour = float(row["hour"])
            if hour < start:
                continue
            spend = Spend(
                requests=int(row.get("requests") or 0),
                input_tokens=int(row.get("input_tokens") or 0),
                cached_input_tokens=int(row.get("cached_tokens") or 0),
                output_tokens=int(row.get("output_tokens") or 0),
                reasoning_tokens=int(row.get("reasoning_tokens") or 0),
                cost_usd=float(row.get("cost_usd") or 0.0),
            )
            self.add(spend, max(hour, start))


def _value(spend: Spend, name: str) -> float:
    return float(spend.tokens) if name == "tokens" else spend.get(name)
