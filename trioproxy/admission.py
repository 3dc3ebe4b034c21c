"""Admission: lanes, per-account caps and work limits, held only as async context managers.

One module, longer than most: :class:`Lease` is the only code that takes or gives back a slot,
and :class:`AccountSlot` and :class:`Admission` build on the lanes' private parts (semaphore,
shared totals), which would have to become public if the classes lived apart.

Theory of operation
-------------------
A *lane* is a named limit on concurrent work (``proxy_http``, ``proxy_websocket``,
``compact``, ``dashboard``; ``work:refresh``, ``work:connect``, ``work:create`` for the
expensive steps; ``account:stream`` and ``account:create`` per account). Each lane is one
:class:`trio.Semaphore` whose initial and maximum value is the limit. Separate lanes are
separate semaphores, so a flood on one never starves another.

A slot is taken by entering a :class:`Lease` and given back by leaving it::

    async with admission.lane("proxy_http").lease():          # 429 if full
        async with admission.account_slot(account_id, "stream"):
            async with admission.work("connect"):
                upstream = await pool.connect(...)
            ...relay...

Entering waits at most the lane's ``wait`` seconds (a :func:`trio.move_on_after` around
the acquire; ``0`` fails fast without waiting) and then raises :class:`Overloaded`. Waiters
are served in FIFO order: trio's semaphore hands a released slot straight to the oldest
waiter, so a newcomer cannot overtake a task that has been waiting.

Per-account caps are created lazily on first use and forgotten as soon as no task holds or
waits for a slot of that account, so memory is bounded by the number of accounts in use, not
by the number of accounts ever seen.

Resource handling
-----------------
The only calls that take or give back a slot are in :meth:`Lease.__aenter__` and
:meth:`Lease.__aexit__`; nothing else in trioproxy may call them. ``__aexit__`` releases
synchronously (no checkpoint), so it works the same in an already-cancelled ``finally`` and
whatever the exit: normal, exception, cancellation. A task cancelled while it waits leaves the
semaphore's queue in the same step (trio's abort protocol) and never owns a slot; a task that
was handed a slot just before its deadline keeps it and is admitted. A lease is single-use:
entering it twice is a :class:`RuntimeError`, and so is leaving one that was never entered.

Every component answers ``statistics()`` with a frozen record read by ``/api/admission``,
``/metrics`` and the tests; :meth:`Admission.idle` is true when every gauge is exactly zero.

Error handling
--------------
A full lane raises :class:`Overloaded` from ``__aenter__``; it carries the lane's name and
limit, and renders itself as the proxy's own 429 answer (:meth:`Overloaded.envelope`,
:meth:`Overloaded.headers`). Its ``type``/``code`` (``server_overloaded`` /
``proxy_overloaded``, or the code its lane was made with, such as a key's
``key_concurrency_exceeded``) and the ``x-trioproxy-overload`` header never occur in upstream errors,
and the Codex CLI retries a 429 whose type is not a usage-limit type, spaced by
``Retry-After``. Cancellation is never turned into :class:`Overloaded`: it propagates.
Invalid configuration (a limit below 1, a negative or NaN wait) is a :class:`ValueError` at
construction time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType, TracebackType
from typing import Any, Literal, Self, get_args

import attrs
import trio

__all__ = [
    "LANE_NAMES",
    "WORK_KINDS",
    "AccountCaps",
    "AccountKind",
    "AccountSlot",
    "AccountStatistics",
    "Admission",
    "AdmissionStatistics",
    "Lane",
    "LaneStatistics",
    "Lease",
    "Overloaded",
    "WorkKind",
]

AccountKind = Literal["stream", "create"]
WorkKind = Literal["refresh", "connect", "create"]

#: the request lanes, in the order they are shown.
LANE_NAMES: tuple[str, ...] = ("proxy_http", "proxy_websocket", "compact", "dashboard")
WORK_KINDS: tuple[str, ...] = get_args(WorkKind)
ACCOUNT_KINDS: tuple[str, ...] = get_args(AccountKind)


class Overloaded(Exception):
    """A lane is full: the proxy's own overload answer (429 + ``Retry-After``).

    ``lane`` names the lane (``proxy_websocket``, ``account:stream``, ``work:refresh``, ...),
    ``limit`` its limit, ``retry_after`` the delay advertised to the client in seconds.
    """

    status = 429

    def __init__(
        self, lane: str, limit: int, retry_after: int = 1, code: str = "proxy_overloaded"
    ) -> None:
        if retry_after < 1:
            raise ValueError(f"retry_after must be at least 1 second, not {retry_after}")
        self.lane = lane
        self.limit = limit
        self.retry_after = int(retry_after)
        self.code = code
        super().__init__(self.message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.lane, self.limit, self.retry_after, self.code))

    @property
    def message(self) -> str:
        return f"the {self.lane} lane is full (limit {self.limit})"

    def envelope(self) -> dict[str, Any]:
        """The OpenAI-style error body of the 429 answer."""
        return {
            "error": {
                "type": "server_overloaded",
                "code": self.code,
                "message": self.message,
                "param": None,
            }
        }

    def headers(self) -> list[tuple[str, str]]:
        """Headers of the 429 answer (besides content-type/length)."""
        return [("retry-after", str(self.retry_after)), ("x-trioproxy-overload", self.lane)]


@attrs.frozen
class LaneStatistics:
    """One lane at one instant. ``in_use`` counts held slots (a slot handed to a waiter that
    has not run yet counts as held); ``waiting`` counts tasks queued for a slot."""

    name: str
    limit: int
    in_use: int
    waiting: int
    rejected_total: int
    admitted_total: int


@attrs.frozen
class AccountStatistics:
    """Slots of one account in flight (held) and waited for."""

    account_id: str
    streams: int
    creates: int
    streams_waiting: int
    creates_waiting: int


@attrs.frozen
class AdmissionStatistics:
    """A snapshot of every lane. ``account_totals`` aggregates the per-account caps by kind
    (``stream``, ``create``): its ``limit`` is the per-account cap and its gauges are sums over
    accounts. ``accounts`` lists only accounts with a slot held or waited for."""

    lanes: Mapping[str, LaneStatistics]
    accounts: Mapping[str, AccountStatistics]
    work: Mapping[str, LaneStatistics]
    account_totals: Mapping[str, LaneStatistics]

    def all_lanes(self) -> list[LaneStatistics]:
        """Request lanes then work lanes (the ones that share the ``trioproxy_lane_*`` metrics)."""
        return [*self.lanes.values(), *self.work.values()]

    def as_json(self) -> dict[str, Any]:
        """The body of ``GET /api/admission``."""

        def lane(s: LaneStatistics) -> dict[str, Any]:
            return attrs.asdict(s)

        return {
            "lanes": {name: lane(s) for name, s in self.lanes.items()},
            "work": {name: lane(s) for name, s in self.work.items()},
            "accounts": {
                account_id: {
                    "streams": a.streams,
                    "creates": a.creates,
                    "streams_waiting": a.streams_waiting,
                    "creates_waiting": a.creates_waiting,
                }
                for account_id, a in self.accounts.items()
            },
            "account_totals": {kind: lane(s) for kind, s in self.account_totals.items()},
        }


@attrs.define(eq=False)
class _Totals:
    """Monotonic counters; shared by all per-account lanes of one kind so they outlive them."""

    admitted: int = 0
    rejected: int = 0


def _check_wait(name: str, wait: float) -> float:
    wait = float(wait)
    if math.isnan(wait) or wait < 0:
        raise ValueError(f"lane {name!r}: wait must be >= 0 seconds (or inf), not {wait}")
    return wait


class Lane:
    """A named limit on concurrent work. Take a slot with ``async with lane.lease():``.

    ``wait`` is how long entering waits for a free slot before raising :class:`Overloaded`
    (``0``: fail fast; ``math.inf``: until the caller's own deadline cancels the wait).
    """

    def __init__(
        self,
        name: str,
        limit: int,
        wait: float = 0.0,
        retry_after: int = 1,
        *,
        code: str = "proxy_overloaded",
        _totals: _Totals | None = None,
    ) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"lane {name!r}: limit must be an integer >= 1, not {limit!r}")
        if retry_after < 1:
            raise ValueError(f"lane {name!r}: retry_after must be >= 1 second")
        self.name = name
        self.limit = limit
        self.wait = _check_wait(name, wait)
        self.retry_after = int(retry_after)
        self.code = code
        self._semaphore = trio.Semaphore(limit, max_value=limit)
        self._totals = _totals if _totals is not None else _Totals()

    def __repr__(self) -> str:
        s = self.statistics()
        return f"<Lane {self.name} {s.in_use}/{s.limit} in use, {s.waiting} waiting>"

    def lease(self) -> Lease:
        """A single-use async context manager holding one slot of this lane."""
        return Lease(self)

    @property
    def in_use(self) -> int:
        return self.limit - self._semaphore.value

    @property
    def has_room(self) -> bool:
        """A lease entered now gets its slot at once."""
        return self._semaphore.value > 0

    @property
    def waiting(self) -> int:
        return self._semaphore.statistics().tasks_waiting

    def statistics(self) -> LaneStatistics:
        return LaneStatistics(
            name=self.name,
            limit=self.limit,
            in_use=self.in_use,
            waiting=self.waiting,
            rejected_total=self._totals.rejected,
            admitted_total=self._totals.admitted,
        )

    def overloaded(self) -> Overloaded:
        return Overloaded(self.name, self.limit, self.retry_after, self.code)


class Lease:
    """One slot of a :class:`Lane`, held between ``__aenter__`` and ``__aexit__``.

    These two methods are the only places where a slot is taken or given back.
    """

    __slots__ = ("_entered", "_held", "lane")

    def __init__(self, lane: Lane) -> None:
        self.lane = lane
        self._entered = False
        self._held = False

    @property
    def held(self) -> bool:
        return self._held

    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError("a Lease is single-use; call lane.lease() again")
        self._entered = True
        lane = self.lane
        semaphore = lane._semaphore
        try:
            # A free slot is taken at once, without a trip through the scheduler: a request
            # passes several leases before its first byte, and under load each trip waits
            # behind every other ready task (docs/performance.md). The request's own socket
            # operations are its checkpoints. A caller already cancelled is not admitted
            # (checkpoint_if_cancelled yields only then).
            await trio.lowlevel.checkpoint_if_cancelled()
            semaphore.acquire_nowait()
            self._held = True
        except trio.WouldBlock:
            pass
        if not self._held and lane.wait > 0:
            # acquire() either takes the slot and returns, or raises having taken nothing
            # (trio's cancellation is atomic), and nothing between its return and _held can
            # raise: no path out of __aenter__ owns a slot that __aexit__ would not give back
            with trio.move_on_after(lane.wait):
                await semaphore.acquire()
                self._held = True
        if not self._held:
            lane._totals.rejected += 1
            raise lane.overloaded()
        lane._totals.admitted += 1
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._entered:
            raise RuntimeError("leaving a Lease that was never entered")
        if self._held:
            self._held = False
            self.lane._semaphore.release()


@attrs.frozen
class AccountCaps:
    """Per-account limits: concurrent streams and concurrent ``response.create`` per account,
    each waited for up to ``wait`` seconds, or not at all when ``fail_fast``."""

    streams: int
    creates: int
    wait: float = 0.0
    fail_fast: bool = False

    def effective_wait(self) -> float:
        return 0.0 if self.fail_fast else self.wait


@attrs.define(eq=False)
class _Account:
    stream: Lane
    create: Lane
    users: int = 0  # tasks holding or waiting for a slot of this account


class AccountSlot:
    """One per-account slot (``stream`` or ``create``), held with ``async with``.

    The account's lanes are looked up (or created) on entry and forgotten on exit once no
    task holds or waits for them. The slot itself is a :class:`Lease`.
    """

    __slots__ = ("_account", "_admission", "_lease", "account_id", "kind")

    def __init__(self, admission: Admission, account_id: str, kind: AccountKind) -> None:
        self._admission = admission
        self.account_id = account_id
        self.kind = kind
        self._account: _Account | None = None
        self._lease: Lease | None = None

    async def __aenter__(self) -> Self:
        if self._account is not None:
            raise RuntimeError("an AccountSlot is single-use; call account_slot() again")
        account = self._account = self._admission._check_out(self.account_id)
        try:
            self._lease = (account.stream if self.kind == "stream" else account.create).lease()
            await self._lease.__aenter__()
        except BaseException:
            self._lease = None
            self._admission._check_in(self.account_id, account)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        account, lease = self._account, self._lease
        if account is None:
            raise RuntimeError("leaving an AccountSlot that was never entered")
        if lease is None:
            return  # already left: idempotent, like Lease
        self._lease = None
        try:
            await lease.__aexit__(exc_type, exc, tb)
        finally:
            self._admission._check_in(self.account_id, account)


class Admission:
    """All of the proxy's lanes, built from plain values (see the module docstring).

    ``lanes`` maps a request lane's name to ``(limit, wait)``; ``work`` maps a work kind
    (``refresh``, ``connect``, ``create``) to a limit (its wait is unbounded: the caller's
    deadline bounds it) or to ``(limit, wait)``.
    """

    def __init__(
        self,
        lanes: Mapping[str, tuple[int, float]],
        account_caps: AccountCaps,
        work: Mapping[str, int | tuple[int, float]],
        retry_after: int = 1,
    ) -> None:
        if retry_after < 1:
            raise ValueError("retry_after must be >= 1 second")
        unknown = set(work) - set(WORK_KINDS)
        if unknown:
            raise ValueError(f"unknown work kinds {sorted(unknown)}; known: {list(WORK_KINDS)}")
        self.retry_after = retry_after
        self._lanes = {
            name: Lane(name, limit, wait, retry_after) for name, (limit, wait) in lanes.items()
        }
        self._work: dict[str, Lane] = {}
        for kind in WORK_KINDS:
            spec = work.get(kind)
            if spec is None:
                raise ValueError(f"work limit for {kind!r} missing")
            limit, wait = (spec, math.inf) if isinstance(spec, int) else spec
            self._work[kind] = Lane(f"work:{kind}", limit, wait, retry_after)
        # Validate the caps once, with the names used in rejections.
        for kind, limit in (("stream", account_caps.streams), ("create", account_caps.creates)):
            Lane(f"account:{kind}", limit, account_caps.effective_wait(), retry_after)
        self.account_caps = account_caps
        self._account_totals = {kind: _Totals() for kind in ACCOUNT_KINDS}
        self._accounts: dict[str, _Account] = {}

    def lane(self, name: str) -> Lane:
        """The request lane ``name`` (a :class:`KeyError` names the known lanes)."""
        try:
            return self._lanes[name]
        except KeyError:
            raise KeyError(f"no lane {name!r}; known: {sorted(self._lanes)}") from None

    def lease(self, name: str) -> Lease:
        """``self.lane(name).lease()``: a slot of the request lane ``name``."""
        return self.lane(name).lease()

    def work(self, kind: WorkKind) -> Lease:
        """A lease on the global work lane ``kind`` (``refresh``, ``connect``, ``create``)."""
        try:
            return self._work[kind].lease()
        except KeyError:
            raise ValueError(f"unknown work kind {kind!r}; known: {list(WORK_KINDS)}") from None

    def account_slot(self, account_id: str, kind: AccountKind) -> AccountSlot:
        """A per-account slot: ``stream`` (a response in flight) or ``create`` (a
        ``response.create`` not yet answered by ``response.created``)."""
        if kind not in ACCOUNT_KINDS:
            raise ValueError(f"unknown account slot kind {kind!r}; known: {list(ACCOUNT_KINDS)}")
        return AccountSlot(self, account_id, kind)

    def full_accounts(self, kind: AccountKind = "stream") -> list[str]:
        """The accounts whose ``kind`` slots are all taken now (routing prefers another
        account then, instead of waiting). Only accounts with slots held are looked at."""
        return [
            account_id
            for account_id, account in self._accounts.items()
            if (lane := account.stream if kind == "stream" else account.create).in_use >= lane.limit
        ]

    def _check_out(self, account_id: str) -> _Account:
        account = self._accounts.get(account_id)
        if account is None:
            caps, wait = self.account_caps, self.account_caps.effective_wait()
            account = self._accounts[account_id] = _Account(
                stream=Lane(
                    "account:stream",
                    caps.streams,
                    wait,
                    self.retry_after,
                    _totals=self._account_totals["stream"],
                ),
                create=Lane(
                    "account:create",
                    caps.creates,
                    wait,
                    self.retry_after,
                    _totals=self._account_totals["create"],
                ),
            )
        account.users += 1
        return account

    def _check_in(self, account_id: str, account: _Account) -> None:
        account.users -= 1
        if account.users == 0 and self._accounts.get(account_id) is account:
            del self._accounts[account_id]

    def statistics(self) -> AdmissionStatistics:
        accounts = {
            account_id: AccountStatistics(
                account_id=account_id,
                streams=a.stream.in_use,
                creates=a.create.in_use,
                streams_waiting=a.stream.waiting,
                creates_waiting=a.create.waiting,
            )
            for account_id, a in self._accounts.items()
        }
        totals: dict[str, LaneStatistics] = {}
        for kind in ACCOUNT_KINDS:
            lanes = [a.stream if kind == "stream" else a.create for a in self._accounts.values()]
            counters = self._account_totals[kind]
            totals[kind] = LaneStatistics(
                name=f"account:{kind}",
                limit=self.account_caps.streams if kind == "stream" else self.account_caps.creates,
                in_use=sum(lane.in_use for lane in lanes),
                waiting=sum(lane.waiting for lane in lanes),
                rejected_total=counters.rejected,
                admitted_total=counters.admitted,
            )
        return AdmissionStatistics(
            lanes=MappingProxyType({n: lane.statistics() for n, lane in self._lanes.items()}),
            accounts=MappingProxyType(accounts),
            work=MappingProxyType({k: lane.statistics() for k, lane in self._work.items()}),
            account_totals=MappingProxyType(totals),
        )

    def idle(self) -> bool:
        """True when no slot of any lane or account is held or waited for."""
        return not self._accounts and all(
            lane.in_use == 0 and lane.waiting == 0
            for lane in (*self._lanes.values(), *self._work.values())
        )
