"""Quota state of one account, merged from every signal (sans-IO: no trio, no I/O).

Theory of operation
-------------------
Four signals say something about an account's usage windows:

================  ======================================================  =================
source            where it comes from                                     what it carries
================  ======================================================  =================
``headers``       ``x-codex-*`` headers of a response or WebSocket upgrade  both windows
``event``         a ``codex.rate_limits`` event inside a stream            both windows
``poll``          ``GET {UPSTREAM}/wham/usage`` (the usage poller)         both windows, plan
``usage_limit``   a 429 ``usage_limit_reached`` with ``resets_at``         a lock until then
================  ======================================================  =================

Every window figure keeps the source and the unix time it was learned (``Window.source``,
``Window.at``). :func:`merge` folds one :class:`Observation` into a :class:`QuotaState`:

* **Fresher evidence wins.** A window figure is replaced only by an observation at least as
  recent as the one it came from; an older observation that arrives late (a poll that was
  slow to answer) does not overwrite a newer header.
* **A 429 lock holds.** An exhaustion learned from ``usage_limit_reached`` is a *lock* until
  its ``resets_at``. No poll, header or event lifts it, however fresh: upstream just refused a
  request, while a usage figure may lag (an account re-opened on such a figure gets 429s
  again). The lock lifts by itself at ``resets_at``; only a fresher 429 replaces it.
* A window whose ``reset_at`` has passed counts as empty: the window rolled over, whatever its
  last figure said.
* **A window can be missing.** Some accounts have only a weekly (secondary) window: upstream
  then sends no primary figure (``primary_window: null`` in ``/wham/usage``, ``"primary":
  null`` in ``codex.rate_limits``, no ``x-codex-primary-*`` headers). Every signal is read
  window by window, so a secondary-only one is learned like any other. A signal that reports
  the account's windows as a whole (an :class:`Observation` with ``complete``: a poll, an
  event, headers with a figure) and leaves one out says the account has no such window now:
  an older figure of it is dropped, so a stale full window keeps nobody exhausted, and an
  account is exhausted, or has headroom, by the windows it has.

:func:`merge` is pure and total; ``tests/test_quota.py`` checks the lock rule with hypothesis.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import attrs

SOURCES = ("headers", "event", "poll", "usage_limit")
#: Lock length when a 429 carries no usable ``resets_at``.
DEFAULT_LOCK_SECONDS = 300.0


@attrs.frozen
class Window:
    """One usage window as last learned: percent used, when it resets, where it came from."""

    used_percent: float
    reset_at: float | None
    window_minutes: int | None
    source: str
    at: float

    def effective_used(self, now: float) -> float:
        """Percent used now (0 once the window has rolled over)."""
        if self.reset_at is not None and self.reset_at <= now:
            return 0.0
        return max(0.0, min(100.0, self.used_percent))

    def view(self, now: float) -> dict[str, Any]:
        return {
            "used_percent": self.used_percent,
            "effective_used_percent": self.effective_used(now),
            "window_minutes": self.window_minutes,
            "reset_at": self.reset_at,
            "source": self.source,
            "learned_at": self.at,
            "age_seconds": round(max(0.0, now - self.at), 1),
        }


@attrs.frozen
class WindowReading:
    """A window as one signal reports it (any field may be missing)."""

    used_percent: float | None = None
    reset_at: float | None = None
    window_minutes: int | None = None


@attrs.frozen
class Observation:
    """One signal about one account, at unix time ``at``."""

    source: str
    at: float
    primary: WindowReading | None = None
    secondary: WindowReading | None = None
    resets_at: float | None = None  # usage_limit only
    plan: str | None = None
    complete: bool = False  # reports every window the account has (a missing one: none)


@attrs.frozen
class QuotaState:
    """Everything known of an account's quota. Build new ones with :func:`merge`."""

    primary: Window | None = None
    secondary: Window | None = None
    lock_until: float | None = None  # a 429 said so; holds until then
    lock_at: float | None = None
    plan: str | None = None

    def locked(self, now: float) -> bool:
        return self.lock_until is not None and self.lock_until > now

    def windows(self) -> tuple[tuple[str, Window], ...]:
        return tuple(
            (n, w) for n, w in (("primary", self.primary), ("secondary", self.secondary)) if w
        )

    def exhausted_until(self, now: float) -> float | None:
        """None when the account has quota now, else when it should have some again (the
        latest of the lock and of every full window's reset; ``inf`` when unknown)."""
        # (runs for every account on every routing decision: plain loops, no lists)
        until = self.lock_until if self.lock_until is not None and self.lock_until > now else None
        for window in (self.primary, self.secondary):
            if window is not None and window.effective_used(now) >= 100.0:
                reset = window.reset_at if window.reset_at is not None else float("inf")
                if until is None or reset > until:
                    until = reset
        return until

    def stable_until(self, now: float) -> float:
        """Until when ``exhausted_until`` and ``headroom`` keep the values they have at
        ``now``: the next lock end or window reset after it (time changes nothing else)."""
        until = math.inf
        if self.lock_until is not None and self.lock_until > now:
            until = self.lock_until
        for window in (self.primary, self.secondary):
            if window is not None and window.reset_at is not None and now < window.reset_at < until:
                until = window.reset_at
        return until

    def headroom(self, now: float) -> float:
        """Percent left in the tightest window (0 while exhausted, 100 when nothing is known)."""
        if self.exhausted_until(now) is not None:
            return 0.0
        used = 0.0
        for window in (self.primary, self.secondary):
            if window is not None:
                used = max(used, window.effective_used(now))
        return max(0.0, 100.0 - used)

    def next_reset(self, now: float) -> float | None:
        """The earliest future reset of a window that has something used."""
        resets = [
            w.reset_at
            for _, w in self.windows()
            if w.reset_at is not None and w.reset_at > now and w.effective_used(now) > 0
        ]
        return min(resets) if resets else None

    def view(self, now: float) -> dict[str, Any]:
        return {
            "primary": self.primary.view(now) if self.primary else None,
            "secondary": self.secondary.view(now) if self.secondary else None,
            "usage_limit_until": self.lock_until if self.locked(now) else None,
            "usage_limit_learned_at": self.lock_at if self.locked(now) else None,
            "headroom": round(self.headroom(now), 1),
            "exhausted_until": self.exhausted_until(now),
        }

    # -- persistence (JSON in the store) -------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> QuotaState:
        if not isinstance(data, Mapping):
            return cls()
        try:
            windows = {
                name: Window(**data[name]) if isinstance(data.get(name), Mapping) else None
                for name in ("primary", "secondary")
            }
            return cls(
                windows["primary"],
                windows["secondary"],
                _num(data.get("lock_until")),
                _num(data.get("lock_at")),
                data.get("plan") if isinstance(data.get("plan"), str) else None,
            )
        except (TypeError, ValueError):
            return cls()


def _merge_window(
    old: Window | None, reading: WindowReading | None, source: str, at: float, complete: bool
) -> Window | None:
    if reading is None or reading.used_percent is None:
        if complete and old is not None and old.at <= at:
            return None  # the account has no such window (any more)
        return old
    if old is not None and old.at > at:
        return old  # older evidence arriving late
    same_window = old is not None and (
        reading.window_minutes is None or old.window_minutes == reading.window_minutes
    )
    return Window(
        used_percent=float(reading.used_percent),
        reset_at=reading.reset_at
        if reading.reset_at is not None
        else (old.reset_at if same_window and old is not None else None),
        window_minutes=reading.window_minutes
        if reading.window_minutes is not None
        else (old.window_minutes if old is not None else None),
        source=source,
        at=at,
    )


def merge(state: QuotaState, obs: Observation) -> QuotaState:
    """``state`` with ``obs`` folded in (see the module docstring for the rules)."""
    lock_until, lock_at = state.lock_until, state.lock_at
    if obs.source == "usage_limit":
        until = obs.resets_at if obs.resets_at is not None and obs.resets_at > obs.at else None
        until = until if until is not None else obs.at + DEFAULT_LOCK_SECONDS
        if lock_at is None or obs.at >= lock_at or lock_until is None or lock_until <= obs.at:
            lock_until, lock_at = until, obs.at
        elif until > lock_until:
            lock_until = until  # an older 429 that reaches further still holds
    return QuotaState(
        primary=_merge_window(state.primary, obs.primary, obs.source, obs.at, obs.complete),
        secondary=_merge_window(state.secondary, obs.secondary, obs.source, obs.at, obs.complete),
        lock_until=lock_until,
        lock_at=lock_at,
        plan=obs.plan or state.plan,
    )


def combine(mine: QuotaState, theirs: QuotaState) -> QuotaState:
    """What two processes know of one account, together: each window as the more recent
    reading has it, and the more recent 429 lock (another replica's state, read from the
    store, folded into this one's)."""
    lock_until, lock_at = mine.lock_until, mine.lock_at
    if theirs.lock_at is not None and (lock_at is None or theirs.lock_at > lock_at):
        lock_until, lock_at = theirs.lock_until, theirs.lock_at
    return QuotaState(
        primary=_newer(mine.primary, theirs.primary),
        secondary=_newer(mine.secondary, theirs.secondary),
        lock_until=lock_until,
        lock_at=lock_at,
        plan=mine.plan or theirs.plan,
    )


def _newer(mine: Window | None, theirs: Window | None) -> Window | None:
    if theirs is None or (mine is not None and mine.at >= theirs.at):
        return mine
    return theirs


# -- readers: one per signal shape ----------------------------------------------------------
def _num(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number else None  # NaN is no figure


def _int(value: Any) -> int | None:
    number = _num(value)
    return int(number) if number is not None else None


def from_headers(headers: Mapping[str, str], at: float) -> Observation | None:
    """``x-codex-*`` headers (lower-case names); None when they carry no figure (either
    window may be missing: an account with a weekly window only sends no primary one)."""
    if (
        "x-codex-primary-used-percent" not in headers
        and "x-codex-secondary-used-percent" not in headers
    ):
        return None

    def reading(name: str) -> WindowReading | None:
        used = _num(headers.get(f"x-codex-{name}-used-percent"))
        if used is None:
            return None
        reset = _num(headers.get(f"x-codex-{name}-reset-at"))
        after = _num(headers.get(f"x-codex-{name}-reset-after-seconds"))
        if reset is None and after is not None:
            reset = at + after
        return WindowReading(used, reset, _int(headers.get(f"x-codex-{name}-window-minutes")))

    primary, secondary = reading("primary"), reading("secondary")
    if primary is None and secondary is None:
        return None
    return Observation("headers", at, primary, secondary, complete=True)


def from_event(event: Mapping[str, Any], at: float) -> Observation | None:
    """A ``codex.rate_limits`` event."""
    limits = event.get("rate_limits")
    if not isinstance(limits, Mapping):
        return None

    def reading(name: str) -> WindowReading | None:
        window = limits.get(name)
        if not isinstance(window, Mapping) or _num(window.get("used_percent")) is None:
            return None
        return WindowReading(
            _num(window.get("used_percent")),
            _num(window.get("reset_at")) or _num(window.get("resets_at")),
            _int(window.get("window_minutes")),
        )

    plan = event.get("plan_type")
    primary, secondary = reading("primary"), reading("secondary")
    return Observation(
        "event",
        at,
        primary,
        secondary,
        plan=plan if isinstance(plan, str) else None,
        complete=primary is not None or secondary is not None,  # (no figure: says nothing)
    )


def from_usage(payload: Mapping[str, Any], at: float) -> Observation | None:
    """A ``GET /wham/usage`` body."""
    limit = payload.get("rate_limit")
    if not isinstance(limit, Mapping):
        return None

    def reading(name: str) -> WindowReading | None:
        window = limit.get(f"{name}_window")
        if not isinstance(window, Mapping) or _num(window.get("used_percent")) is None:
            return None
        reset = _num(window.get("reset_at"))
        after = _num(window.get("reset_after_seconds"))
        if reset is None and after is not None:
            reset = at + after
        seconds = _num(window.get("limit_window_seconds"))
        return WindowReading(
            _num(window.get("used_percent")), reset, int(seconds // 60) if seconds else None
        )

    plan = payload.get("plan_type")
    primary, secondary = reading("primary"), reading("secondary")
    return Observation(
        "poll",
        at,
        primary,
        secondary,
        plan=plan if isinstance(plan, str) else None,
        complete=primary is not None or secondary is not None,  # (no figure: says nothing)
    )


def from_usage_limit(resets_at: float | None, at: float) -> Observation:
    return Observation("usage_limit", at, resets_at=resets_at)
