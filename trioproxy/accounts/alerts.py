"""Alerts: JSON events about accounts and the pool, POSTed to an optional webhook.

Theory of operation
-------------------
:class:`PoolWatcher` (a task in the app nursery) compares each account's status (``active``,
``exhausted``, ``reauth_required``, ``deactivated``, ``disabled``) and the pool's (is every
account in rotation exhausted?) with what it saw last, whenever the pool reports a change and
at least every ``tick`` seconds (a reset happens by the clock alone, without any signal).
Each transition becomes an event:

==========================  ======================================================
event                       when
==========================  ======================================================
``account.exhausted``       an account in rotation ran out of quota (429 or 100 %)
``account.recovered``       an exhausted account has quota again (its reset passed)
``account.reauth_required`` token refresh failed for good; ``fix`` says how
``account.deactivated``     upstream says the account or workspace is deactivated
``pool.exhausted``          every account in rotation is exhausted
``pool.recovered``          some account in rotation has quota again
==========================  ======================================================

:meth:`AlertSender.emit` is synchronous and never blocks: it appends to a bounded deque (when
full, the oldest event is dropped and ``dropped`` counts it) and wakes the sender.
:meth:`AlertSender.run` (its own task in the app nursery) POSTs one event at a time, each
attempt bounded by ``timeout``, retried ``retries`` times with doubling backoff; then the
event is given up (``failed``). A webhook that is down, refuses, or accepts and never answers
only delays other alerts; requests never wait for it.

The sender also keeps the last ``max_recent`` alerts (:class:`Alert`: when, what, which
account, a one-line summary) with their delivery, for ``GET /api/alerts`` and the dashboard:

=============  ===============================================  ===========================
delivery       meaning                                          leaves it
=============  ===============================================  ===========================
``pending``    queued or being sent (``attempts`` so far,       ``delivered``, ``failed``,
               ``last_error`` of the last one)                  ``dropped``
``delivered``  the webhook answered 2xx                         -
``failed``     every attempt failed; ``last_error`` says why    -
``dropped``    pushed out of a full queue before it was sent    -
``not_sent``   no webhook is configured (only logged)           -
=============  ===============================================  ===========================

Resource handling: the sender uses the shared httpx client with its own per-request timeout;
nothing outlives the nursery that runs :meth:`AlertSender.run`.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import attrs
import httpx
import trio

from trioproxy.accounts.pool import Pool
from trioproxy.accounts.records import RELOGIN_COMMAND, relogin_hint
from trioproxy.logs import get_logger

log = get_logger("trioproxy.alerts")


DELIVERY_STATES = ("pending", "delivered", "failed", "dropped", "not_sent")


@attrs.define(eq=False)
class Alert:
    """One alert as raised (``event``, the webhook's body) and how its delivery went."""

    event: dict[str, Any]
    delivery: str
    attempts: int = 0
    last_error: str | None = None

    def view(self) -> dict[str, Any]:
        event = self.event
        return {
            "time": event.get("time"),
            "event": event["event"],
            "account_id": event.get("account_id"),
            "email": event.get("email"),
            "summary": summary(event),
            "delivery": self.delivery,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "details": event,
        }


def summary(event: Mapping[str, Any]) -> str:
    """An alert in one sentence (the dashboard's and the API's ``summary``)."""
    kind = event["event"]
    who = event.get("email") or event.get("account_id") or "?"
    until = event.get("until")
    if kind == "account.exhausted":
        return f"{who} ran out of quota" + (
            f" until {_utc(until)}" if until else " (its reset is not known)"
        )
    if kind == "account.recovered":
        return f"{who} has quota again"
    if kind == "account.reauth_required":
        return f"{who} needs a new sign-in: {event.get('fix')}"
    if kind == "account.deactivated":
        return f"{who} is deactivated: {event.get('reason')}"
    if kind == "pool.exhausted":
        reset = event.get("earliest_reset")
        first = f"; the first is back at {_utc(reset)}" if reset else ""
        return f"every account in rotation ({event.get('accounts')}) ran out of quota{first}"
    if kind == "pool.recovered":
        return "an account in rotation has quota again"
    return str(kind)


def _utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M UTC")


@attrs.frozen
class AlertStatistics:
    queued: int
    sent: int
    failed: int
    dropped: int
    attempts: int
    emitted: int


@attrs.define(eq=False)
class AlertSender:
    url: str | None
    http: httpx.AsyncClient | None
    max_queue: int = 256
    timeout: float = 5.0
    retries: int = 3
    backoff: float = 1.0
    max_recent: int = 200
    _queue: collections.deque[Alert] = attrs.field(init=False)
    _recent: collections.deque[Alert] = attrs.field(init=False)
    _wake: trio.Event = attrs.field(factory=trio.Event)
    sent: int = 0
    failed: int = 0
    dropped: int = 0
    attempts: int = 0
    emitted: int = 0

    def __attrs_post_init__(self) -> None:
        self._queue = collections.deque()
        self._recent = collections.deque(maxlen=self.max_recent)

    def emit(self, event: dict[str, Any]) -> None:
        """Queue ``event`` for delivery (never blocks; drops the oldest when full)."""
        self.emitted += 1
        log.info("alert", **{k: v for k, v in event.items() if k != "event"}, alert=event["event"])
        alert = Alert(event, "pending" if self.url else "not_sent")
        self._recent.append(alert)
        if not self.url:
            return
        if len(self._queue) >= self.max_queue:
            self._queue.popleft().delivery = "dropped"
            self.dropped += 1
        self._queue.append(alert)
        self._wake.set()

    def recent(self) -> list[dict[str, Any]]:
        """The last :attr:`max_recent` alerts, newest first, with their delivery."""
        return [alert.view() for alert in reversed(self._recent)]

    def statistics(self) -> AlertStatistics:
        return AlertStatistics(
            len(self._queue), self.sent, self.failed, self.dropped, self.attempts, self.emitted
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            while not self._queue:
                await self._wake.wait()
                self._wake = trio.Event()
            await self._deliver(self._queue.popleft())

    async def _deliver(self, alert: Alert) -> None:
        assert self.url is not None and self.http is not None
        event = alert.event
        delay = self.backoff
        for attempt in range(1 + self.retries):
            self.attempts += 1
            alert.attempts += 1
            try:
                with trio.fail_after(self.timeout):
                    response = await self.http.post(self.url, json=event, timeout=self.timeout)
                if response.status_code < 300:
                    self.sent += 1
                    alert.delivery = "delivered"
                    return
                why = f"status {response.status_code}"
            except (httpx.HTTPError, trio.TooSlowError) as exc:
                why = type(exc).__name__ + (f": {exc}"[:200] if str(exc) else "")
            alert.last_error = why
            if attempt < self.retries:
                await trio.sleep(delay)
                delay *= 2
        self.failed += 1
        alert.delivery = "failed"
        log.warning("alert not delivered", alert=event["event"], reason=why)


@attrs.define(eq=False)
class PoolWatcher:
    """Turns pool transitions into alert events (see the module docstring)."""

    pool: Pool
    sender: AlertSender
    tick: float = 1.0
    min_gap: float = 0.1  # under load the pool changes all the time: look at most this often
    _seen: dict[str, str] | None = None
    _pool_exhausted: bool = False

    def check(self) -> None:
        """Compare with the last look and emit an event per transition (synchronous)."""
        now = self.pool.clock.now()
        statuses = {a.account_id: a.status(now) for a in self.pool.accounts.values()}
        pool_exhausted = self.pool.all_usage_limited()
        if self._seen is None:  # the first look is the baseline
            self._seen, self._pool_exhausted = statuses, pool_exhausted
            return
        for account_id, status in statuses.items():
            # an account first seen exhausted or deactivated (it changed within the same
            # look as its import) still gets its event: imports are active
            before = self._seen.get(account_id, "active")
            if before == status:
                continue
            account = self.pool.accounts[account_id]
            base = {"time": now, "account_id": account_id, "email": account.record.email}
            if status == "exhausted":
                until = account.exhausted_until(now)
                self.sender.emit(
                    {
                        "event": "account.exhausted",
                        **base,
                        "until": None if until == float("inf") else until,
                    }
                )
            elif status == "active" and before == "exhausted":
                self.sender.emit({"event": "account.recovered", **base})
            elif status == "reauth_required":
                self.sender.emit(
                    {
                        "event": "account.reauth_required",
                        **base,
                        "reason": account.record.state_reason,
                        "command": RELOGIN_COMMAND,
                        "fix": relogin_hint(account.record.email),
                    }
                )
            elif status == "deactivated":
                self.sender.emit(
                    {"event": "account.deactivated", **base, "reason": account.record.state_reason}
                )
        if pool_exhausted != self._pool_exhausted:
            active = self.pool.in_rotation()
            if pool_exhausted:
                self.sender.emit(
                    {
                        "event": "pool.exhausted",
                        "time": now,
                        "accounts": len(active),
                        "earliest_reset": self.pool.earliest_reset(),
                    }
                )
            else:
                self.sender.emit({"event": "pool.recovered", "time": now, "accounts": len(active)})
        self._seen, self._pool_exhausted = statuses, pool_exhausted

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.check()
        task_status.started()
        while True:
            with trio.move_on_after(self.tick):
                await self.pool.wait_changed()
            self.check()
            await trio.sleep(self.min_gap)
