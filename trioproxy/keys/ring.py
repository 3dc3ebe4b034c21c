"""The key ring: every API key in memory, who a request is, and what it spent.

Theory of operation
-------------------
The server holds every key (:class:`KeyState`: its record, parsed policy, budget counters
and concurrency lanes) in memory, indexed by the SHA-256 of its secret, so authorizing a
request is one hash and one dictionary lookup. :meth:`KeyRing.authenticate` answers a
:class:`Client`: the key (or ``loopback`` for a loopback client of a proxy without keys).
The fronts ask the client to :meth:`Client.check` a turn before anything goes upstream
(model, reasoning effort, budgets) and hold its :meth:`Client.request_slot` /
:meth:`Client.session_slot` leases (``admission.Lane``) for as long as the turn or session
runs, so a key's concurrency cap is released by leaving the ``async with``, like every
other slot.

When a request ends, :meth:`KeyRing.charge` (synchronous, no I/O) prices its usage and adds
it to the hour's usage bucket (key, account, model) and to the key's budget counters. The
ring's task (:meth:`KeyRing.run`, in the app nursery) writes what changed every
``flush_interval`` seconds in one transaction (``Store.flush_usage``) and reloads the keys
when another writer (the CLI, the management API, another replica) changed them. A process
killed outright loses what was counted since the last write: at most ``flush_interval``
seconds of accounting. At shutdown the task writes what is left (shielded, bounded).

Budgets are enforced from the in-memory counters: a request is refused once a limit is
reached; a turn already running finishes and is counted, so a budget can be overshot by
the turns in flight when it was reached.

Replicas: each one writes its own counters (under ``replica``, its name) and, at every
write, reads the rows the others wrote since its last look; their sum becomes each
counter's ``elsewhere``, so limits apply to what all replicas spent together. A replica sees
another's spending up to two write intervals late (theirs, then its own read), so a key can
overshoot by what the other replicas charge it in that time, besides the turns in flight.
A new budget starts from the key's stored hourly usage (which all replicas share) in one
process only, the one ``seeds_budgets`` names (the lease holder), or it would be counted
once per replica.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import attrs
import trio

from trioproxy.accounts.pool import UnixClock
from trioproxy.admission import Lane
from trioproxy.keys.budgets import Counter, Spend
from trioproxy.keys.policy import WINDOWS, Policy, parse_policy
from trioproxy.keys.prices import PriceTable
from trioproxy.keys.rate_view import rate_limit_headers
from trioproxy.logs import get_logger
from trioproxy.protocol.errors import ProxyError, error_envelope
from trioproxy.reqlog import RequestRecord
from trioproxy.store import Store
from trioproxy.store.records import ApiKeyRecord

log = get_logger("trioproxy.keys")

LOOPBACK = "loopback"
#: routes whose records are not requests (a WebSocket handshake's upstream connect); a
#: prewarm (``generate: false``: no output, no tokens) is not counted either
UNCOUNTED_ROUTES = frozenset({"connect"})
USAGE_KEY = tuple[float, str, str, str]  # hour, key, account, model
#: a key's ``last_used_at`` is written at most this often (seconds)
LAST_USED_RESOLUTION = 60.0


def digest(presented: str) -> str:
    return hashlib.sha256(presented.encode("utf-8", "replace")).hexdigest()


@attrs.define(eq=False)
class KeyState:
    """One key as the server holds it."""

    record: ApiKeyRecord
    policy: Policy
    counters: dict[str, Counter] = attrs.field(factory=dict)  # by budget name
    #: other replicas' counters: replica -> budget name -> JSON state
    elsewhere: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    requests: Lane | None = None
    sessions: Lane | None = None
    touched_at: float = 0.0  # last ``last_used_at`` queued for the store

    @property
    def key_id(self) -> str:
        return self.record.key_id

    def apply(self, record: ApiKeyRecord, policy: Policy) -> list[str]:
        """Take a changed record and policy, keeping the counters of budgets that stay;
        returns the names of new budgets (to be seeded)."""
        self.record, self.policy = record, policy
        counters = {}
        new = []
        for budget in policy.budgets:
            old = self.counters.get(budget.name)
            if old is not None and old.budget.limits != budget.limits:
                old = attrs.evolve(old, budget=budget)
            if old is None:
                new.append(budget.name)
                old = Counter(budget)
            counters[budget.name] = old
        self.counters = counters
        self.requests = _lane(self.requests, f"key:{self.key_id}:requests", policy.max_requests)
        self.sessions = _lane(self.sessions, f"key:{self.key_id}:sessions", policy.max_sessions)
        return new

    def spent(self, now: float) -> tuple[str, str, float] | None:
        """The first budget whose limit is reached: (budget name, limit name, frees at)."""
        for name, counter in self.counters.items():
            limit = counter.exceeded(now)
            if limit is not None:
                return name, limit, counter.frees_at(now)
        return None

    def budgets_view(self, now: float) -> list[dict[str, Any]]:
        view = []
        for counter in self.counters.values():
            start, end = counter.window(now)
            view.append(
                {
                    **counter.budget.as_json(),
                    "used": counter.used(now).as_json(),
                    "used_percent": round(counter.used_fraction(now) * 100, 1),
                    "window_start": start,
                    "window_end": end,
                    "resets_at": counter.resets_at(now),
                    "exceeded": counter.exceeded(now),
                }
            )
        return view


def _lane(current: Lane | None, name: str, limit: int | None) -> Lane | None:
    if limit is None:
        return None
    if current is not None and current.limit == limit:
        return current
    return Lane(name, limit, 0.0, code="key_concurrency_exceeded")


@attrs.define(eq=False)
class Client:
    """Who a request is: a key, or ``loopback`` (a proxy without keys)."""

    key_id: str
    key: KeyState | None = None

    @property
    def accounts(self) -> frozenset[str] | None:
        """The accounts this client may be routed to (None: any)."""
        return self.key.policy.accounts if self.key is not None else None

    def check(self, model: str | None, effort: str | None, now: float) -> None:
        """Refuse a turn the key may not run: a model or effort outside its policy (403),
        a budget spent (429 ``key_budget_exceeded``)."""
        key = self.key
        if key is None:
            return
        policy = key.policy
        if not policy.allows_model(model):
            raise ProxyError(
                403,
                error_envelope(
                    f"This API key may not use model {model!r}; allowed: "
                    f"{', '.join(policy.allowed_models())}.",
                    "invalid_request_error",
                    "model_not_allowed",
                    "model",
                    allowed=policy.allowed_models(),
                ),
            )
        if not policy.allows_effort(effort):
            raise ProxyError(
                403,
                error_envelope(
                    f"This API key may not use reasoning effort {effort!r}; allowed: "
                    f"{', '.join(policy.allowed_efforts())}.",
                    "invalid_request_error",
                    "reasoning_effort_not_allowed",
                    "reasoning.effort",
                    allowed=policy.allowed_efforts(),
                ),
            )
        self.check_budget(now)

    def check_budget(self, now: float) -> None:
        key = self.key
        if key is None:
            return
        spent = key.spent(now)
        if spent is None:
            return
        budget, limit, frees_at = spent
        wait = max(1, math.ceil(frees_at - now))
        raise ProxyError(
            429,
            error_envelope(
                f"This API key's {budget} budget is spent ({limit}); it frees up in {wait} s.",
                "usage_limit_reached",
                "key_budget_exceeded",
                None,
                plan_type="key",
                budget=budget,
                limit=limit,
                resets_at=math.ceil(frees_at),
                resets_in_seconds=wait,
            ),
            [("retry-after", str(wait)), *rate_limit_headers(key, now)],
        )

    @contextlib.asynccontextmanager
    async def request_slot(self) -> AsyncIterator[None]:
        """Hold one of the key's request slots (``max_requests``) for the ``async with``."""
        lane = self.key.requests if self.key is not None else None
        if lane is None:
            yield
            return
        async with lane.lease():
            yield

    @contextlib.asynccontextmanager
    async def session_slot(self) -> AsyncIterator[None]:
        """Hold one of the key's session slots (``max_sessions``) for the ``async with``."""
        lane = self.key.sessions if self.key is not None else None
        if lane is None:
            yield
            return
        async with lane.lease():
            yield


LOOPBACK_CLIENT = Client(LOOPBACK)


@attrs.frozen
class KeyRingStatistics:
    keys: int
    active: int
    pending_buckets: int
    dirty_counters: int
    flushes_total: int
    flush_failures_total: int
    last_flush_at: float | None


@attrs.define(eq=False)
class KeyRing:
    """See the module docstring."""

    store: Store
    clock: UnixClock = attrs.field(factory=UnixClock)
    prices: PriceTable = attrs.field(factory=PriceTable)
    replica: str = "default"
    #: whether this process starts new budgets from the stored usage (see the docstring)
    seeds_budgets: Callable[[], bool] = lambda: True
    _elsewhere_seen: float = 0.0
    flush_interval: float = 1.0
    keys: dict[str, KeyState] = attrs.field(factory=dict)
    version: float = -1.0
    #: keys that are not revoked (with none, only loopback clients are admitted); counted
    #: when the keys are read, not on every request
    active: int = 0
    _by_digest: dict[str, KeyState] = attrs.field(factory=dict)
    _usage: dict[USAGE_KEY, list[float]] = attrs.field(factory=dict)
    _dirty: set[str] = attrs.field(factory=set)
    _touched: dict[str, float] = attrs.field(factory=dict)
    _flushes: int = 0
    _failures: int = 0
    _last_flush: float | None = None
    _flush_lock: trio.Lock = attrs.field(factory=trio.Lock)

    # -- keys ---------------------------------------------------------------------------------

    async def load(self) -> None:
        """Read the keys and this replica's counters (at start, and when keys changed)."""
        version = await self.store.run(self.store.keys_version)
        records = await self.store.run(self.store.list_api_keys)
        stored = await self.store.run(self.store.load_key_counters, self.replica)
        now = self.clock.now()
        seen = set()
        for record in records:
            seen.add(record.key_id)
            try:
                policy = parse_policy(record.policy)
            except ValueError:
                log.warning("stored policy is unusable; key refused", key=record.key_id)
                policy = Policy(models=())
            state = self.keys.get(record.key_id)
            fresh = state is None
            if state is None:
                state = self.keys[record.key_id] = KeyState(record, policy)
            new = state.apply(record, policy)
            if fresh and record.key_id in stored:
                new = _restore(state, stored[record.key_id])
            if new and self.seeds_budgets():
                await self._seed(state, new, now)
            if new:
                _sum_elsewhere(state, now)
        for key_id in set(self.keys) - seen:
            del self.keys[key_id]
        self._by_digest = {k.record.key_hash: k for k in self.keys.values()}
        self.active = sum(1 for k in self.keys.values() if k.record.revoked_at is None)
        self.version = version

    async def _seed(self, state: KeyState, names: Iterable[str], now: float) -> None:
        """Start new budgets from the key's stored hourly usage and what is not written yet."""
        longest = max(WINDOWS.values()) + 31 * 86400  # a calendar month may start 31 days ago
        rows = await self.store.run(self.store.key_usage_by_hour, state.key_id, now - longest)
        pending: dict[float, list[float]] = {}
        for (hour, key_id, account_id, _), counts in self._usage.items():
            if key_id == state.key_id and account_id:
                into = pending.setdefault(hour, [0.0] * len(counts))
                for i, value in enumerate(counts):
                    into[i] += value
        rows += [{"hour": hour, **_counts_dict(counts)} for hour, counts in pending.items()]
        for name in names:
            state.counters[name].seed(sorted(rows, key=lambda r: float(r["hour"])), now)
            self._dirty.add(state.key_id)

    async def reload_if_changed(self) -> None:
        if await self.store.run(self.store.keys_version) != self.version:
            await self.load()

    def authenticate(self, presented: str) -> Client:
        """The key that ``presented`` is, or ProxyError(401/403) naming why not."""
        state = self._by_digest.get(digest(presented))
        if state is None:
            raise ProxyError.of(401, "Invalid API key.", "invalid_api_key")
        status = state.record.status(self.clock.now())
        if status == "revoked":
            raise ProxyError.of(401, "This API key was revoked.", "api_key_revoked")
        if status == "expired":
            raise ProxyError.of(401, "This API key has expired.", "api_key_expired")
        if status == "disabled":
            raise ProxyError.of(403, "This API key is disabled.", "api_key_disabled")
        now = self.clock.now()
        if now - state.touched_at >= LAST_USED_RESOLUTION:
            state.touched_at = self._touched[state.key_id] = now
        return Client(state.key_id, state)

    # -- accounting ---------------------------------------------------------------------------
    def charge(self, record: RequestRecord) -> None:
        """Count a finished request (synchronous; written by the next flush)."""
        if record.route in UNCOUNTED_ROUTES or record.prewarm:
            return
        input_tokens = record.input_tokens or 0
        cached = record.cached_tokens or 0
        output = record.output_tokens or 0
        reasoning = record.reasoning_tokens or 0
        cost = self.prices.cost(record.model, input_tokens, cached, output)
        record.cost_usd = round(cost, 9) if record.input_tokens is not None else None
        now = self.clock.now()
        key_id = record.key_id or LOOPBACK
        error = 1.0 if (record.status or 0) >= 400 or record.error_code else 0.0
        bucket = (now - now % 3600, key_id, record.account_id or "", record.model or "")
        counts = self._usage.get(bucket)
        if counts is None:
            counts = self._usage[bucket] = [0.0] * 7
        for i, value in enumerate((1, error, input_tokens, cached, output, reasoning, cost)):
            counts[i] += value
        state = self.keys.get(key_id)
        if state is None or not state.counters or record.account_id is None:
            return  # refused before reaching an account: nothing was spent
        spend = Spend(1, input_tokens, cached, output, reasoning, cost)
        for counter in state.counters.values():
            counter.add(spend, now)
        self._dirty.add(key_id)

    async def flush(self) -> None:
        """Write the usage and counters gathered since the last write (one transaction)."""
        async with self._flush_lock:
            usage, self._usage = self._usage, {}
            dirty, self._dirty = self._dirty, set()
            touched, self._touched = self._touched, {}
            if not usage and not dirty and not touched:
                return
            now = self.clock.now()
            buckets = [
                {"hour": h, "key_id": k, "account_id": a, "model": m, **_counts_dict(c)}
                for (h, k, a, m), c in usage.items()
            ]
            counters = {
                key_id: json.dumps(
                    {n: c.as_json() for n, c in self.keys[key_id].counters.items()},
                    separators=(",", ":"),
                )
                for key_id in dirty
                if key_id in self.keys
            }
            try:
                write = functools.partial(
                    self.store.flush_usage,
                    buckets,
                    counters,
                    replica=self.replica,
                    last_used=touched,
                    now=now,
                )
                await self.store.run(write)
            except Exception:
                self._failures += 1
                log.exception("usage write failed; kept for the next one", buckets=len(buckets))
                for bucket, counts in usage.items():  # put it back (new counts added on top)
                    into = self._usage.setdefault(bucket, [0.0] * 7)
                    for i, value in enumerate(counts):
                        into[i] += value
                self._dirty |= dirty
                self._touched = {**touched, **self._touched}
                return
            self._flushes += 1
            self._last_flush = now

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write every ``flush_interval`` seconds and pick up changed keys, until cancelled;
        then write what is left (shielded, at most 10 s)."""
        task_status.started()
        try:
            while True:
                await trio.sleep(self.flush_interval)
                await self.flush()
                try:
                    await self.reload_if_changed()
                    await self.read_elsewhere()
                except Exception:
                    log.exception("key reload failed")
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await self.flush()

    async def read_elsewhere(self) -> None:
        """Take the counters other replicas wrote since the last look."""
        rows = await self.store.run(
            self.store.other_key_counters, self.replica, self._elsewhere_seen
        )
        changed = set()
        for key_id, replica, text, written in rows:
            self._elsewhere_seen = max(self._elsewhere_seen, written)
            state = self.keys.get(key_id)
            if state is None:
                continue
            try:
                value = json.loads(text)
            except ValueError:
                continue
            state.elsewhere[replica] = value if isinstance(value, dict) else {}
            changed.add(key_id)
        now = self.clock.now()
        for key_id in changed:
            _sum_elsewhere(self.keys[key_id], now)

    def statistics(self) -> KeyRingStatistics:
        now = self.clock.now()
        return KeyRingStatistics(
            keys=len(self.keys),
            active=sum(1 for k in self.keys.values() if k.record.status(now) == "active"),
            pending_buckets=len(self._usage),
            dirty_counters=len(self._dirty),
            flushes_total=self._flushes,
            flush_failures_total=self._failures,
            last_flush_at=self._last_flush,
        )


def _counts_dict(counts: list[float]) -> dict[str, Any]:
    requests, errors, input_tokens, cached, output, reasoning, cost = counts
    return {
        "requests": int(requests),
        "errors": int(errors),
        "input_tokens": int(input_tokens),
        "cached_tokens": int(cached),
        "output_tokens": int(output),
        "reasoning_tokens": int(reasoning),
        "cost_usd": round(cost, 9),
    }


def _sum_elsewhere(state: KeyState, now: float) -> None:
    """Set each counter's ``elsewhere`` to the sum of the other replicas' counters."""
    for name, counter in state.counters.items():
        theirs = [
            Counter.from_json(counter.budget, counters[name])
            for counters in state.elsewhere.values()
            if name in counters
        ]
        counter.elsewhere = Counter.summed(counter.budget, theirs, now) if theirs else None


def _restore(state: KeyState, text: str) -> list[str]:
    """Restore a key's counters from their stored JSON; returns the budgets it lacked."""
    try:
        stored = json.loads(text)
    except ValueError:
        stored = {}
    if not isinstance(stored, dict):
        stored = {}
    missing = []
    for name, counter in list(state.counters.items()):
        if name in stored:
            state.counters[name] = Counter.from_json(counter.budget, stored[name])
        else:
            missing.append(name)
    return missing
