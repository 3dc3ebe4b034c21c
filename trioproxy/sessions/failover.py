"""The failover engine: one turn's way through the pool, for every transport.

An HTTP turn, a WebSocket turn, a bridged turn and the upstream connect a WebSocket session
makes before its handshake is answered all go through :func:`run`. The caller gives an
:class:`Attempt`: ``open`` opens the turn on an account (the transport's part: a POST, or a
message on the conversation's upstream socket, up to upstream's first event), ``serve``
relays it once it is open, and ``failed`` tells the caller's transport what a failure
changed (a WebSocket conversation drops a socket it can no longer trust, and recovers a lost
anchor by re-anchoring). Everything else happens here, the same way for all of them:

* the account: the conversation's pinned account (hard affinity, ``protocol/affinity.py``)
  unless an operator paused it, else its current one, or the one that issued the turn state
  the request echoes (``protocol/echoed.py``), while it can serve and has a free slot; else
  the one routing picks (``Pool.select``), preferring an account whose per-account slots
  are free; every routing decision goes to the request's record;
* its token: proactively refreshed when due, and refreshed once after a 401, then the same
  account is tried again;
* each failure classified by the one table of ``protocol/failures.py``: what the pool learns
  (exhausted until a reset, deactivated), whether the pin is reset, where the next attempt
  goes;
* the give-up answer when no account is left: ``429 usage_limit_reached`` when the whole pool
  is limited, the local ``429 proxy_overloaded`` when accounts were only busy, the last
  upstream error when it is the request's or upstream's, else ``503 no_available_account``
  naming why.

Resource handling: the account's ``stream`` slot is held for the whole turn (``open`` and
``serve``), its ``create`` slot and the global ``create`` work slot until upstream's first
event; each with ``async with``, so every exit gives them back.

Bounds: at most ``max_failover_attempts`` attempts end in a failure that moves on (another
account, or a reconnect of a pinned conversation); re-anchoring after upstream lost an
anchor is a recovery, not a failover, and may happen at most ``MAX_RECOVERIES`` times more.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Generic, Protocol, TypeVar

import attrs
import structlog

from trioproxy.accounts.pool import Account, Decision, RequestInfo
from trioproxy.accounts.refresh import RefreshError
from trioproxy.admission import Overloaded
from trioproxy.logs import get_logger
from trioproxy.protocol.affinity import Affinity, Event, step
from trioproxy.protocol.errors import ProxyError, error_envelope
from trioproxy.protocol.failures import (
    Kind,
    Then,
    UpstreamFailure,
    refresh_failure,
)
from trioproxy.reqlog import RequestRecord
from trioproxy.sessions.context import ProxyContext

log = get_logger("trioproxy.failover")
MAX_RECOVERIES = 2
T = TypeVar("T")


@attrs.define(eq=False)
class Access:
    """An account's token for one attempt: the current one (refreshed first when due), or a
    fresh one once upstream refused it (single flight per account, ``accounts/refresh.py``).
    Refresh failures are failures of the account (``reauth``, ``token_unavailable``)."""

    ctx: ProxyContext
    account: Account
    used: str | None = None  # the token the attempt sent (or its connection was opened with)

    async def token(self) -> str:
        if self.used is None:
            self.used = await self._call(self.ctx.tokens.token_for(self.account))
        return self.used

    async def renew(self) -> None:
        """Upstream refused ``used``: get a fresh token (one refresh however many ask)."""
        assert self.used is not None
        self.used = await self._call(self.ctx.tokens.refresh_after_401(self.account, self.used))

    async def _call(self, pending: Awaitable[str]) -> str:
        try:
            return await pending
        except RefreshError as exc:
            raise refresh_failure(exc.reason, permanent=exc.permanent) from None


class Attempt(Protocol[T]):
    """The transport's part of a turn (see the module docstring)."""

    async def open(self, account: Account, access: Access) -> T:
        """Open the turn on ``account``; raise :class:`UpstreamFailure` if upstream refused."""

    async def serve(self, account: Account, opened: T) -> None:
        """Relay the opened turn to the client."""

    async def failed(self, failure: UpstreamFailure) -> None:
        """What a failure changes for the transport. For a ``continuity`` failure: make the
        next attempt send the turn without the lost anchor, or raise the answer."""


@attrs.define(eq=False)
class Routing:
    """Where a conversation's turns may go: routing's view of it (session key, model) and
    its affinity, which the engine steps."""

    info: RequestInfo
    affinity: Affinity = attrs.field(factory=Affinity)

    def step(self, event: Event, account: str | None = None) -> None:
        self.affinity = step(self.affinity, event, account)

    def for_model(self, model: str | None) -> RequestInfo:
        """Routing's view of a turn for ``model`` (the conversation's, with the turn's model:
        kept, since a conversation's turns nearly always name the same one)."""
        if model is not None and model != self.info.model:
            self.info = attrs.evolve(self.info, model=model)
        return self.info


@attrs.define(eq=False)
class _Tries(Generic[T]):
    """One run of the engine: what was tried and why it failed."""

    ctx: ProxyContext
    routing: Routing
    attempt: Attempt[T]
    record: RequestRecord
    slots: bool
    prefer: str | None = None  # the account that issued the turn state the request echoes
    excluded: dict[str, str] = attrs.field(factory=dict)
    decision: Decision | None = None
    last: UpstreamFailure | None = None
    busy: Overloaded | None = None
    failovers: int = 0
    recoveries: int = 0

    def choose(self, info: RequestInfo) -> Account | None:
        """The pinned account; else the conversation's current account (or, for a turn that
        starts one, the account its echoed turn state came from) while it can serve and has a
        free slot (soft affinity); else routing's pick (an account with a free slot first)."""
        ctx, routing = self.ctx, self.routing
        affinity = routing.affinity
        pinned = affinity.pinned_to()
        allowed = info.accounts
        if pinned is not None:
            account = ctx.pool.accounts.get(pinned)
            if (
                account is not None
                and not account.paused
                and (allowed is None or pinned in allowed)
            ):
                return account
            routing.step(Event.ACCOUNT_FAILURE)  # removed, paused, or no longer the client's
        excluded = self.excluded
        busy_ids = ctx.admission.full_accounts()
        current_id = affinity.account or self.prefer
        current = ctx.pool.accounts.get(current_id) if current_id else None
        if (
            current is not None
            and (allowed is None or current.account_id in allowed)
            and current.account_id not in excluded
            and current.account_id not in busy_ids
            and current.route(ctx.pool.clock.now())[0] is None
        ):
            return current
        busy = {a: "at_capacity" for a in busy_ids if a not in excluded}
        decision = ctx.pool.select(info, {**excluded, **busy} if busy else excluded)
        if decision.chosen is None and busy:
            decision = ctx.pool.select(info, excluded)  # every candidate is busy: wait
        self.decision = decision
        self.record.decisions.append(decision)
        return ctx.pool.accounts[decision.chosen] if decision.chosen is not None else None

    async def once(self, account: Account) -> None:
        """One attempt on ``account``: open (with its slots held), then serve."""
        ctx = self.ctx
        account_id = account.account_id
        self.record.account_id = account_id
        structlog.contextvars.bind_contextvars(account=account_id)
        if not self.slots:
            opened = await self.opened(account)
            self.routing.step(Event.BIND, account_id)
            await self.attempt.serve(account, opened)
            return
        admission = ctx.admission
        admitted = False
        try:
            async with admission.account_slot(account_id, "stream"):
                account.in_flight += 1
                try:
                    async with (
                        admission.account_slot(account_id, "create"),
                        admission.work("create"),
                    ):
                        admitted = True
                        opened = await self.opened(account)
                    self.routing.step(Event.BIND, account_id)
                    await self.attempt.serve(account, opened)
                finally:
                    account.in_flight -= 1
        except Overloaded as exc:
            if admitted:
                raise
            raise _Busy(exc) from None

    async def opened(self, account: Account) -> T:
        """``attempt.open``, and once more with a fresh token after a 401."""
        access = Access(self.ctx, account)
        try:
            return await self.attempt.open(account, access)
        except UpstreamFailure as failure:
            if failure.kind is not Kind.UNAUTHORIZED or access.used is None:
                raise
            await self.attempt.failed(failure)
            try:
                await access.renew()
            except UpstreamFailure:
                raise failure from None  # the 401 stands: the account cannot serve
            return await self.attempt.open(account, access)

    async def fail(self, account: Account, failure: UpstreamFailure) -> None:
        """Apply the table of ``protocol/failures.py`` to a failure on ``account``; raise
        the answer when the client is to get it now."""
        self.last = failure
        routing = self.routing
        then = failure.then
        log.info(
            "upstream refused",
            account=account.account_id,
            kind=failure.kind.value,
            status=failure.status,
            code=failure.code,
            then=then.value,
        )
        learn(self.ctx, account, failure)
        if then is Then.RECOVER:
            self.recoveries += 1
            if self.recoveries > MAX_RECOVERIES:
                raise failure.answer()
            await self.attempt.failed(failure)  # the next attempt re-anchors, or the answer
            return
        await self.attempt.failed(failure)
        if then is Then.ANSWER:
            routing.step(Event.REQUEST_FAILURE)
            raise failure.answer()
        if then is Then.NEXT_ACCOUNT:
            routing.step(Event.ACCOUNT_FAILURE)
            self.excluded[account.account_id] = failure.kind.value
        else:  # RETRY: a pinned conversation reconnects to its account
            if routing.affinity.may_move:
                self.excluded[account.account_id] = failure.kind.value
            routing.step(Event.CLOSED_BEFORE_CREATED)
        self.failovers += 1

    def give_up(self) -> ProxyError:
        """The answer once no attempt is left (see the module docstring)."""
        ctx, last = self.ctx, self.last
        among = self.routing.info.accounts  # a client limited to some accounts: those
        if self.busy is not None and (last is None or not ctx.pool.all_usage_limited(among)):
            return ProxyError(429, self.busy.envelope(), self.busy.headers())
        if ctx.pool.all_usage_limited(among):
            return exhausted_answer(ctx, among)
        if last is not None and last.then in (Then.RETRY, Then.RECOVER, Then.ANSWER):
            answer = last.answer()
            if last.then is Then.RETRY and answer.status < 500:
                answer.status = 502
            return answer
        # account-side problems (tokens, deactivation) are not the client's to fix
        return no_account_answer(ctx, self.decision)


class _Busy(Exception):
    """The account's per-account slots were all taken (after the configured wait)."""

    def __init__(self, overloaded: Overloaded) -> None:
        super().__init__(overloaded.lane)
        self.overloaded = overloaded


async def run(
    ctx: ProxyContext,
    routing: Routing,
    attempt: Attempt[T],
    record: RequestRecord,
    *,
    info: RequestInfo | None = None,
    slots: bool = True,
    prefer: str | None = None,
) -> None:
    """Run one turn (see the module docstring); raises :class:`ProxyError` with the answer
    when it cannot be served. ``info`` overrides ``routing.info`` for this turn (the turn's
    model); ``slots=False`` takes no per-account slot (a connect that relays nothing);
    ``prefer`` is the account that issued the turn state the request echoes."""
    tries = _Tries(ctx, routing, attempt, record, slots, prefer)
    info = info or routing.info
    while tries.failovers < ctx.settings.max_failover_attempts:
        account = tries.choose(info)
        if account is None:
            break
        try:
            await tries.once(account)
            return
        except _Busy as busy:
            tries.busy = busy.overloaded
            if not routing.affinity.may_move:  # a pinned conversation waits its turn
                raise ProxyError(429, tries.busy.envelope(), tries.busy.headers()) from None
            tries.excluded[account.account_id] = "at_capacity"
            tries.failovers += 1
        except UpstreamFailure as failure:
            await tries.fail(account, failure)
    raise tries.give_up()


def learn(ctx: ProxyContext, account: Account, failure: UpstreamFailure) -> None:
    """What a failure teaches the pool about the account."""
    if failure.kind is Kind.USAGE_LIMIT:
        ctx.pool.mark_exhausted(account.account_id, failure.resets_at)
    elif failure.kind is Kind.DEACTIVATED:
        reason = failure.message[:300] or "deactivated"
        account.record = attrs.evolve(account.record, state="deactivated", state_reason=reason)
        ctx.store_later(
            lambda: ctx.store.set_account_state(account.account_id, "deactivated", reason)
        )


def exhausted_answer(ctx: ProxyContext, among: frozenset[str] | None = None) -> ProxyError:
    """Every active account (of ``among``: a client's account group) is usage-limited: the
    shape the Codex CLI shows as a usage limit, with the earliest reset."""
    resets_at = ctx.pool.earliest_reset(among)
    now = ctx.pool.clock.now()
    body = error_envelope(
        "Every account in the pool has reached its usage limit."
        if among is None
        else "Every account this API key may use has reached its usage limit.",
        "usage_limit_reached",
        "usage_limit_reached",
        plan_type="pool",
        resets_at=int(resets_at) if resets_at else None,
        resets_in_seconds=max(0, int(resets_at - now)) if resets_at else None,
    )
    headers = [("retry-after", str(max(1, int(resets_at - now))))] if resets_at else []
    return ProxyError(429, body, headers)


def no_account_answer(ctx: ProxyContext, decision: Decision | None) -> ProxyError:
    if not ctx.pool.accounts:
        why = "no accounts are configured; import a Codex auth.json with `trioproxy accounts import PATH`"
    elif decision is not None and decision.excluded:
        why = "; ".join(f"{a}: {w}" for a, w in decision.excluded)
    else:
        why = "no account can serve this request"
    return ProxyError.of(503, f"No account available: {why}.", "no_available_account")
