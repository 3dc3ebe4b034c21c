"""The account pool: runtime state of each ChatGPT account and the routing decision.

Account states
--------------
=================  =============================================  ==========================
state              meaning                                        leaves it
=================  =============================================  ==========================
active             in rotation                                    any of the below
exhausted          a 429 ``usage_limit_reached`` locked it, or    at the lock's ``resets_at``
                   a window is at 100 % (``quota.py``)            / the window's reset
                                                                  (checked at selection time)
reauth_required    refresh failed permanently                     re-import
deactivated        upstream (a request or the usage poller) says  re-import
                   the account or workspace is deactivated
paused             an operator took it out (stored as             an operator (resume)
                   ``disabled``)
=================  =============================================  ==========================

A paused account is never chosen: not by routing, not as a conversation's current account,
not as the account a conversation is pinned to (the pin is reset, as when the account is
removed); a turn already running on it finishes. Resuming keeps what was learned of it (a
429 lock included); a re-import after a sign-in problem starts it afresh.

``exhausted`` is not stored: it is what the merged :class:`~trioproxy.accounts.quota.QuotaState`
says at the current time, so a reset needs no timer.

``select()`` is synchronous and returns a ``Decision`` record (candidates with the quota figures
used, exclusions with reasons, choice) that the caller logs and acts on. Strategies:
``headroom`` (default: most quota left, with soft stickiness by session key so prompt caches
stay warm), ``reset_drain`` (the account whose window resets soonest first, so quota that is
about to be renewed is used rather than lost; sticky too), ``round_robin`` and ``fill_first``.

Model filter: the model registry (``registry.py``) tells, for a model, which plans serve it,
but only when it holds an authoritative (fetched) list for that model; plans it has no list
for are allowed. When the filter would leave no candidate it is dropped (upstream decides), so
a partial or stale registry never produces a local "no account supports this model".
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import trio

from trioproxy.accounts import quota as q
from trioproxy.accounts.records import STORED_PAUSED, AccountRecord, shown_state

STRATEGIES = ("headroom", "reset_drain", "round_robin", "fill_first")
MAX_STICKY = 20_000

#: model -> plans that serve it (None: no authoritative answer, do not filter)
ModelPlans = Callable[[str], frozenset[str] | None]


@attrs.define(eq=False)
class UnixClock:
    """Unix seconds anchored to trio's clock, so ``MockClock`` moves resets and expiry too."""

    offset: float | None = None

    def now(self) -> float:
        if self.offset is None:
            self.offset = time.time() - trio.current_time()
        return self.offset + trio.current_time()


@attrs.define(eq=False)
class PollState:
    """The usage poller's bookkeeping for one account (see ``poller.py``)."""

    next_at: float = 0.0
    unauthorized_streak: int = 0
    cooldown_until: float | None = None
    last_ok_at: float | None = None
    last_error: str | None = None
    polls: int = 0

    def view(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.define(eq=False)
class Account:
    record: AccountRecord
    quota: q.QuotaState = attrs.field(factory=q.QuotaState)
    in_flight: int = 0
    last_selected: float = 0.0
    refresh_blocked_until: float = 0.0
    last_refresh_error: str | None = None
    poll: PollState = attrs.field(factory=PollState)
    # (quota, record, valid from, valid until, availability, headroom): what routing reads,
    # kept while neither the quota state nor the record was replaced and no window reset or
    # lock end passed
    _route: tuple[q.QuotaState, AccountRecord, float, float, str | None, float] | None = (
        attrs.field(default=None, init=False, repr=False)
    )

    @property
    def account_id(self) -> str:
        return self.record.account_id

    @property
    def state(self) -> str:
        return self.record.state

    @property
    def paused(self) -> bool:
        return self.record.state == STORED_PAUSED

    @property
    def plan(self) -> str | None:
        return self.record.plan or self.quota.plan

    def exhausted_until(self, now: float) -> float | None:
        return self.quota.exhausted_until(now)

    def status(self, now: float) -> str:
        """``active``, ``exhausted`` or the stored state as shown (reauth_required,
        deactivated, paused)."""
        if self.record.state != "active":
            return shown_state(self.record.state)
        return "exhausted" if self.exhausted_until(now) is not None else "active"

    def availability(self, now: float) -> str | None:
        """None when the account can serve now, else why not."""
        if self.record.state != "active":
            return shown_state(self.record.state)
        until = self.exhausted_until(now)
        if until is not None:
            when = "unknown reset" if until == float("inf") else f"until {int(until)}"
            return f"usage_limit {when}"
        return None

    def route(self, now: float) -> tuple[str | None, float]:
        """``(availability(now), quota.headroom(now))``, computed again only when the quota
        or the record changed or a window reset (or lock end) passed: routing reads this
        for every account on every decision."""
        cached = self._route
        if (
            cached is not None
            and cached[0] is self.quota
            and cached[1] is self.record
            and cached[2] <= now < cached[3]
        ):
            return cached[4], cached[5]
        quota = self.quota
        why = self.availability(now)
        headroom = quota.headroom(now)
        self._route = (quota, self.record, now, quota.stable_until(now), why, headroom)
        return why, headroom

    def view(self, now: float) -> dict[str, Any]:
        record = self.record
        until = self.exhausted_until(now) if record.state == "active" else None
        return {
            "account_id": record.account_id,
            "email": record.email,
            "plan": record.plan,
            "state": self.status(now),
            "state_reason": record.state_reason,
            "exhausted_until": None if until == float("inf") else until,
            "access_expires_at": record.access_expires_at,
            "last_refresh": record.last_refresh,
            "quota": self.quota.view(now),
            "poll": self.poll.view(),
            "in_flight": self.in_flight,
        }


@attrs.frozen
class RequestInfo:
    """What routing looks at in a request."""

    session_key: str | None = None
    model: str | None = None
    accounts: frozenset[str] | None = None  # the only accounts it may use (None: any)


@attrs.frozen
class Candidate:
    """An account selection looked at, with the quota figures it used."""

    account_id: str
    headroom: float
    next_reset: float | None
    source: str | None  # where the freshest figure came from
    age: float | None  # seconds since it was learned


@attrs.frozen
class Decision:
    """What routing decided and why. The candidates' figures are read from the quota states
    as they were at the decision (``QuotaState`` is immutable) when someone asks for them,
    which is the request-log writer, off the request's path."""

    strategy: str
    chosen: str | None
    reason: str
    considered: tuple[tuple[str, q.QuotaState], ...]  # each candidate's quota state then
    at: float  # unix time of the decision
    excluded: tuple[tuple[str, str], ...]
    session_key: str | None
    model_filter: tuple[str, ...] | None = None  # plans allowed by the registry, if applied

    @property
    def candidates(self) -> tuple[Candidate, ...]:
        return tuple(_candidate(a, quota, self.at) for a, quota in self.considered)

    def record(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "chosen": self.chosen,
            "reason": self.reason,
            "candidates": [
                {
                    "account": c.account_id,
                    "headroom": c.headroom,
                    "next_reset": c.next_reset,
                    "source": c.source,
                    "age": c.age,
                }
                for c in self.candidates
            ],
            "excluded": [{"account": a, "why": w} for a, w in self.excluded],
            "session_key": self.session_key,
            "model_filter": list(self.model_filter) if self.model_filter is not None else None,
        }


def _candidate(account_id: str, quota: q.QuotaState, now: float) -> Candidate:
    windows = [w for _, w in quota.windows()]
    fresh = max(windows, key=lambda w: w.at, default=None)
    return Candidate(
        account_id,
        round(quota.headroom(now), 1),
        quota.next_reset(now),
        fresh.source if fresh else None,
        round(now - fresh.at, 1) if fresh else None,
    )


@attrs.define(eq=False)
class Pool:
    strategy: str = "headroom"
    clock: UnixClock = attrs.field(factory=UnixClock)
    accounts: dict[str, Account] = attrs.field(factory=dict)
    sticky: collections.OrderedDict[str, str] = attrs.field(factory=collections.OrderedDict)
    model_plans: ModelPlans | None = None
    _rr: int = 0
    _ordered: list[Account] | None = None  # routing order (oldest import first); sync resets
    _model_cache: dict[str, frozenset[str] | None] = attrs.field(factory=dict)
    #: accounts whose quota changed since the last :meth:`take_dirty` (persisted off-path)
    _dirty: set[str] = attrs.field(factory=set)
    #: set on every change a watcher may care about (quota, membership, state)
    _changed: trio.Event = attrs.field(factory=trio.Event)
    #: accounts added or re-imported (the poller polls them at once)
    _fresh: set[str] = attrs.field(factory=set)
    #: set when accounts are added, removed or re-imported (wakes the poller)
    _membership: trio.Event = attrs.field(factory=trio.Event)

    # -- membership -----------------------------------------------------------------------
    def sync(self, records: Iterable[AccountRecord]) -> None:
        """Bring the pool in line with the store (keeps runtime state of known accounts)."""
        seen = set()
        for record in records:
            seen.add(record.account_id)
            account = self.accounts.get(record.account_id)
            if account is None:
                self.accounts[record.account_id] = Account(record)
                self._fresh.add(record.account_id)
            else:
                if record.updated_at != account.record.updated_at and record.state == "active":
                    if account.record.state == STORED_PAUSED:
                        # resumed: what was learned of it holds; its figures are as old as
                        # the pause (the poller skips paused accounts)
                        self._fresh.add(record.account_id)
                    elif account.record.state != "active":
                        self.fresh_start(record.account_id)  # re-imported
                    elif record.access_token != account.record.access_token:
                        self._fresh.add(record.account_id)  # new tokens (a re-import)
                account.record = record
        for gone in set(self.accounts) - seen:
            del self.accounts[gone]
        self._ordered = None
        self.notify()
        self.wake_membership()

    def fresh_start(self, account_id: str) -> None:
        """An operator re-imported the account: forget what was learned of it (a 429 lock
        included: the operator says it is fine; one more 429 would lock it again) and poll
        it at once."""
        account = self.accounts.get(account_id)
        if account is None:
            return
        account.quota = q.QuotaState(plan=account.quota.plan)
        account.poll = PollState()
        account.refresh_blocked_until = 0.0
        self._fresh.add(account_id)
        self._dirty.add(account_id)
        self.notify()
        self.wake_membership()

    def restore_quota(self, saved: Mapping[str, Mapping[str, Any]]) -> None:
        """Quota states saved by a previous run (a 429 lock survives a restart)."""
        for account_id, data in saved.items():
            account = self.accounts.get(account_id)
            if account is not None:
                account.quota = q.QuotaState.from_json(data)

    def absorb_quota(self, saved: Mapping[str, Mapping[str, Any]]) -> int:
        """Fold in quota states other replicas saved (``quota.combine``); the number of
        accounts whose state changed. What is absorbed is not marked dirty: it is in the
        store already."""
        changed = 0
        for account_id, data in saved.items():
            account = self.accounts.get(account_id)
            if account is not None:
                combined = q.combine(account.quota, q.QuotaState.from_json(data))
                if combined != account.quota:
                    account.quota = combined
                    changed += 1
        if changed:
            self.notify()
        return changed

    def take_fresh(self) -> set[str]:
        fresh, self._fresh = self._fresh, set()
        return fresh

    def take_dirty(self) -> dict[str, dict[str, Any]]:
        """Quota states changed since the last call, as JSON (for the store)."""
        dirty, self._dirty = self._dirty, set()
        return {a: self.accounts[a].quota.to_json() for a in dirty if a in self.accounts}

    def notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def wake_membership(self) -> None:
        self._membership.set()
        self._membership = trio.Event()

    async def wait_membership(self) -> None:
        await self._membership.wait()

    # -- routing --------------------------------------------------------------------------
    def invalidate_models(self) -> None:
        """The model registry changed: forget the plan filters derived from the old one."""
        self._model_cache.clear()

    def plans_for(self, model: str | None) -> frozenset[str] | None:
        if not model or self.model_plans is None:
            return None
        if model not in self._model_cache:
            if len(self._model_cache) > 1000:
                self._model_cache.clear()
            self._model_cache[model] = self.model_plans(model)
        return self._model_cache[model]

    def select(self, info: RequestInfo, exclude: Mapping[str, str] | None = None) -> Decision:
        """Choose an account for ``info``: those that can serve now and are not in
        ``exclude`` (account -> why), narrowed by the model filter, then the strategy's pick."""
        now = self.clock.now()
        candidates, excluded, headroom = self._available(now, exclude or {}, info.accounts)
        candidates, model_filter = self._filter_by_model(info.model, candidates, excluded)
        listed = tuple((a.record.account_id, a.quota) for a in candidates)
        if not candidates:
            return Decision(
                self.strategy, None, "no_candidate", listed, now, tuple(excluded), info.session_key
            )
        chosen, reason = self._choose(info.session_key, candidates, headroom, now)
        chosen.last_selected = now
        if info.session_key:
            self._stick(info.session_key, chosen.account_id)
        return Decision(
            self.strategy,
            chosen.account_id,
            reason,
            listed,
            now,
            tuple(excluded),
            info.session_key,
            model_filter,
        )

    def _available(
        self, now: float, exclude: Mapping[str, str], allowed: frozenset[str] | None = None
    ) -> tuple[list[Account], list[tuple[str, str]], dict[str, float]]:
        """The accounts that can serve now (oldest import first) among ``allowed`` (None:
        all), the others with why not, and each candidate's headroom."""
        ordered = self._ordered
        if ordered is None or len(ordered) != len(self.accounts):
            ordered = self._ordered = sorted(
                self.accounts.values(), key=lambda a: (a.record.created_at, a.account_id)
            )
        # (this runs for every account on every turn: each id is read once)
        candidates: list[Account] = []
        excluded: list[tuple[str, str]] = []
        headroom: dict[str, float] = {}
        for account in ordered:
            account_id = account.record.account_id
            if allowed is not None and account_id not in allowed:
                continue  # not this client's: not a candidate, and not worth listing
            why, room = account.route(now)
            if exclude:
                why = exclude.get(account_id) or why
            if why:
                excluded.append((account_id, why))
            else:
                candidates.append(account)
                headroom[account_id] = room
        return candidates, excluded, headroom

    def _filter_by_model(
        self, model: str | None, candidates: list[Account], excluded: list[tuple[str, str]]
    ) -> tuple[list[Account], tuple[str, ...] | None]:
        """The candidates whose plan serves ``model`` and the plans allowed, when the registry
        knows and some candidate remains; else the candidates unchanged and None. The
        accounts filtered out are appended to ``excluded``."""
        plans = self.plans_for(model)
        if plans is None or not candidates:
            return candidates, None
        allowed = [a for a in candidates if a.plan is None or a.plan in plans]
        if not allowed or len(allowed) == len(candidates):
            return candidates, None
        excluded += [
            (a.account_id, f"model {model} not in plan {a.plan}")
            for a in candidates
            if a not in allowed
        ]
        return allowed, tuple(sorted(plans))

    def _choose(
        self,
        session_key: str | None,
        candidates: list[Account],
        headroom: Mapping[str, float],
        now: float,
    ) -> tuple[Account, str]:
        """The strategy's pick among ``candidates`` (not empty) and the reason to log."""
        sticky_id = self.sticky.get(session_key) if session_key else None
        sticky = (
            next((a for a in candidates if a.record.account_id == sticky_id), None)
            if sticky_id is not None
            else None
        )
        if sticky is not None and self.strategy != "round_robin":
            return sticky, "sticky"
        if self.strategy == "round_robin":
            chosen = candidates[self._rr % len(candidates)]
            self._rr += 1
        elif self.strategy == "fill_first":
            chosen = candidates[0]
        elif self.strategy == "reset_drain":
            chosen = min(
                candidates,
                key=lambda a: (
                    a.quota.next_reset(now) or float("inf"),
                    -headroom[a.account_id],
                    a.in_flight,
                    a.last_selected,
                ),
            )
        else:
            chosen = max(
                candidates,
                key=lambda a: (headroom[a.record.account_id], -a.in_flight, -a.last_selected),
            )
        return chosen, self.strategy

    def _stick(self, session_key: str, account_id: str) -> None:
        """Remember the session's account (the most recent :data:`MAX_STICKY` sessions)."""
        self.sticky[session_key] = account_id
        self.sticky.move_to_end(session_key)
        while len(self.sticky) > MAX_STICKY:
            self.sticky.popitem(last=False)

    def in_rotation(self) -> list[Account]:
        return [a for a in self.accounts.values() if a.record.state == "active"]

    def earliest_reset(self, among: frozenset[str] | None = None) -> float | None:
        """When the first exhausted account in rotation (of ``among``, when given) should
        serve again."""
        now = self.clock.now()
        resets = [
            until
            for a in self._rotation(among)
            if (until := a.exhausted_until(now)) is not None and until != float("inf")
        ]
        return min(resets) if resets else None

    def all_usage_limited(self, among: frozenset[str] | None = None) -> bool:
        """Every account in rotation (of ``among``, when given) is usage-limited."""
        now = self.clock.now()
        active = self._rotation(among)
        return bool(active) and all(a.exhausted_until(now) is not None for a in active)

    def _rotation(self, among: frozenset[str] | None) -> list[Account]:
        accounts = self.in_rotation()
        return accounts if among is None else [a for a in accounts if a.account_id in among]

    # -- quota signals --------------------------------------------------------------------
    def observe(self, account_id: str, observation: q.Observation | None) -> None:
        """Fold one signal into the account's quota state (``quota.merge``)."""
        account = self.accounts.get(account_id)
        if account is None or observation is None:
            return
        account.quota = q.merge(account.quota, observation)
        self._dirty.add(account_id)
        self.notify()

    def mark_exhausted(self, account_id: str, resets_at: float | None) -> None:
        """A 429 ``usage_limit_reached``: locked until ``resets_at`` whatever polls say."""
        self.observe(account_id, q.from_usage_limit(resets_at, self.clock.now()))

    def learn_headers(self, account_id: str, headers: Iterable[tuple[str, str]]) -> None:
        """Rate-limit headers (``x-codex-primary-used-percent`` ...) of a response."""
        values = {k.lower(): v for k, v in headers if k.lower().startswith("x-codex-")}
        self.learn_codex_headers(account_id, values)

    def learn_codex_headers(self, account_id: str, values: Mapping[str, str]) -> None:
        """``learn_headers`` for the ``x-codex-*`` headers alone, names in lower case."""
        self.observe(account_id, q.from_headers(values, self.clock.now()))

    def learn_event(self, account_id: str, event: Mapping[str, Any]) -> None:
        """A ``codex.rate_limits`` event."""
        self.observe(account_id, q.from_event(event, self.clock.now()))

    def learn_usage(self, account_id: str, payload: Mapping[str, Any], at: float) -> None:
        """A ``GET /wham/usage`` body, fetched at ``at`` (when the poll was sent)."""
        self.observe(account_id, q.from_usage(payload, at))

    def set_state(self, account_id: str, state: str, reason: str | None) -> None:
        account = self.accounts.get(account_id)
        if account is not None:
            account.record = attrs.evolve(account.record, state=state, state_reason=reason)
            self.notify()
