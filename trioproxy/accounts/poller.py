"""The usage poller: ``GET {UPSTREAM}/wham/usage`` per account, into the pool's quota state.

Theory of operation
-------------------
One task (:meth:`UsagePoller.run`, started in the app nursery) owns a nursery in which each
poll runs as its own task, holding a slot of a :class:`trio.CapacityLimiter` with
``async with`` (at most ``concurrency`` polls in flight, all accounts together). Each account
in rotation has a ``next_at`` (``Account.poll``); after a poll it moves ``interval`` seconds
on, jittered by ``±jitter`` so accounts imported together do not poll together. An account
that was just added or re-imported (the pool's ``take_fresh``: an import through the API, or
one the store watcher picked up) is polled at once.

Answers:

============================  =================================================================
upstream said                 the poller
============================  =================================================================
200                           the figures go to ``Pool.learn_usage`` (merged, ``quota.py``)
401 (first of a streak)       one token refresh (``TokenManager``, single-flight), one retry
401 again                     no further refresh: the account's polls pause for a cooldown
                              that doubles with each 401 in a row (``interval * 2**n``, at most
                              ``max_cooldown``); a 200 ends the streak
401/403 saying deactivated    the account becomes ``deactivated`` (stored; out of rotation;
                              no more polls until it is re-imported)
anything else, or no answer   tried again after ``interval``
============================  =================================================================

The I/O goes through a :class:`UsageSource` (tokens, refresh, fetch), so the schedule can be
tested under ``MockClock`` with an in-memory source; :class:`HttpUsageSource` is the real one.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import attrs
import httpx
import trio

from trioproxy.accounts.pool import Account, Pool
from trioproxy.accounts.refresh import RefreshError, TokenManager
from trioproxy.logs import get_logger
from trioproxy.protocol.failures import Kind, classify, parse_body

log = get_logger("trioproxy.poller")


class UsageFetchError(Exception):
    """The usage endpoint could not be reached (transport error or timeout)."""


class UsageSource(Protocol):
    async def token(self, account: Account) -> str: ...
    async def refresh(self, account: Account, stale_token: str) -> str: ...
    async def fetch(self, account: Account, token: str) -> tuple[int, dict[str, Any]]: ...


@attrs.define(eq=False)
class HttpUsageSource:
    """The real source: the TokenManager and the shared httpx client."""

    tokens: TokenManager
    http: httpx.AsyncClient
    upstream: str
    timeout: float = 30.0

    async def token(self, account: Account) -> str:
        return await self.tokens.token_for(account)

    async def refresh(self, account: Account, stale_token: str) -> str:
        return await self.tokens.refresh_after_401(account, stale_token)

    async def fetch(self, account: Account, token: str) -> tuple[int, dict[str, Any]]:
        try:
            response = await self.http.get(
                f"{self.upstream}/wham/usage",
                headers={
                    "authorization": f"Bearer {token}",
                    "chatgpt-account-id": account.account_id,
                },
                timeout=self.timeout,
            )
        except httpx.HTTPError as exc:
            raise UsageFetchError(type(exc).__name__) from None
        return response.status_code, parse_body(response.content)


@attrs.define(eq=False)
class UsagePoller:
    pool: Pool
    source: UsageSource
    interval: float = 300.0
    concurrency: int = 4
    max_cooldown: float = 3600.0
    jitter: float = 0.1
    #: called (awaited) when an account is found deactivated: persist the state
    on_deactivated: Callable[[str, str], Awaitable[None]] | None = None
    rng: random.Random = attrs.field(factory=random.Random)
    _limiter: trio.CapacityLimiter = attrs.field(init=False)
    _in_flight: set[str] = attrs.field(factory=set)
    _wake: trio.Event = attrs.field(factory=trio.Event)

    def __attrs_post_init__(self) -> None:
        self._limiter = trio.CapacityLimiter(self.concurrency)

    def statistics(self) -> dict[str, Any]:
        stats = self._limiter.statistics()
        return {
            "in_flight": stats.borrowed_tokens,
            "waiting": stats.tasks_waiting,
            "concurrency": int(stats.total_tokens),
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll forever (until cancelled). Every poll task lives in this call's nursery."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_membership)
            task_status.started()
            while True:
                now = self.pool.clock.now()
                for account_id in self.pool.take_fresh():
                    account = self.pool.accounts.get(account_id)
                    if account is not None:
                        account.poll.next_at = now
                waiting = [
                    a for a in self.pool.in_rotation() if a.account_id not in self._in_flight
                ]
                for account in waiting:
                    if account.poll.next_at <= now:
                        self._in_flight.add(account.account_id)
                        nursery.start_soon(self._poll, account.account_id)
                upcoming = [
                    a.poll.next_at
                    for a in self.pool.in_rotation()
                    if a.account_id not in self._in_flight
                ]
                pause = min(upcoming, default=now + self.interval) - now
                with trio.move_on_after(max(pause, 0.0) if upcoming else self.interval):
                    await self._wake.wait()
                self._wake = trio.Event()

    async def _watch_membership(self) -> None:
        while True:
            await self.pool.wait_membership()
            self._wake.set()

    def _later(self, seconds: float) -> float:
        spread = 1.0 + self.rng.uniform(-self.jitter, self.jitter) if self.jitter else 1.0
        return self.pool.clock.now() + seconds * spread

    async def _poll(self, account_id: str) -> None:
        try:
            async with self._limiter:
                account = self.pool.accounts.get(account_id)
                if account is not None and account.record.state == "active":
                    await self._poll_once(account)
        except Exception:
            log.exception("usage poll failed", account=account_id)
            account = self.pool.accounts.get(account_id)
            if account is not None:
                account.poll.next_at = self._later(self.interval)
        finally:
            self._in_flight.discard(account_id)
            self._wake.set()  # the scheduler recomputes its next wake-up

    async def _poll_once(self, account: Account) -> None:
        poll = account.poll
        poll.polls += 1
        sent_at = self.pool.clock.now()
        try:
            token = await self.source.token(account)
            status, body = await self.source.fetch(account, token)
            failure = classify(status, body) if status >= 400 else None
            if (
                failure is not None
                and failure.kind is Kind.UNAUTHORIZED
                and poll.unauthorized_streak == 0
            ):
                token = await self.source.refresh(account, token)
                sent_at = self.pool.clock.now()
                status, body = await self.source.fetch(account, token)
                failure = classify(status, body) if status >= 400 else None
        except RefreshError as exc:
            poll.last_error = f"token refresh failed: {exc.reason}"
            self._cool_down(account)
            return
        except UsageFetchError as exc:
            poll.last_error = f"usage endpoint unreachable ({exc})"
            poll.next_at = self._later(self.interval)
            return
        if failure is None and status == 200:
            self.pool.learn_usage(account.account_id, body, sent_at)
            poll.unauthorized_streak, poll.cooldown_until, poll.last_error = 0, None, None
            poll.last_ok_at = self.pool.clock.now()
            poll.next_at = self._later(self.interval)
        elif failure is not None and failure.kind is Kind.DEACTIVATED:
            error = body.get("error")
            message = error.get("message") if isinstance(error, dict) else None
            reason = str(message or "deactivated")[:300]
            poll.last_error = reason
            self.pool.set_state(account.account_id, "deactivated", reason)
            log.warning("account deactivated", account=account.account_id, reason=reason)
            if self.on_deactivated is not None:
                await self.on_deactivated(account.account_id, reason)
        elif failure is not None and failure.kind is Kind.UNAUTHORIZED:
            poll.last_error = f"401 {failure.code or ''}".strip()
            self._cool_down(account)
        else:
            poll.last_error = f"status {status}"
            poll.next_at = self._later(self.interval)

    def _cool_down(self, account: Account) -> None:
        poll = account.poll
        poll.unauthorized_streak += 1
        pause = min(self.max_cooldown, self.interval * 2**poll.unauthorized_streak)
        poll.cooldown_until = poll.next_at = self.pool.clock.now() + pause
        log.info(
            "usage polls cooling down",
            account=account.account_id,
            seconds=pause,
            reason=poll.last_error,
        )
