"""The account pool: runtime state of each ChatGPT account and the routing decision.

Account states
--------------
=================  =============================================  ==========================
state              meaning                                        leaves it
=================  =============================================  ==========================
active             in rotation                                    any of the below
exhausted          a 429 ``usage_limit_reached`` said so          at ``resets_at`` (checked
                   (``exhausted_until``)                           at selection time)
reauth_required    refresh failed permanently                     re-import
deactivated        upstream says the account is deactivated       re-import
disabled           an operator took it out                        an operator
=================  =============================================  ==========================

``select()`` is synchronous and returns a ``Decision`` record (candidates, exclusions with
reasons, choice) that the caller logs and acts on. Strategies: ``headroom`` (default: most
quota left, with soft stickiness by session key so prompt caches stay warm),
``round_robin`` and ``fill_first``.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import trio

from trioproxy.accounts.records import AccountRecord

STRATEGIES = ("headroom", "round_robin", "fill_first")
MAX_STICKY = 100_000


@attrs.define(eq=False)
class UnixClock:
    """Unix seconds anchored to trio's clock, so ``MockClock`` moves resets and expiry too."""

    offset: float | None = None

    def now(self) -> float:
        if self.offset is None:
            self.offset = time.time() - trio.current_time()
        return self.offset + trio.current_time()


@attrs.define(eq=False)
class QuotaView:
    """What the proxy last learned of an account's windows (source and unix time kept)."""

    primary_used: float | None = None
    secondary_used: float | None = None
    primary_reset_at: float | None = None
    secondary_reset_at: float | None = None
    source: str | None = None
    updated_at: float | None = None

    def headroom(self) -> float:
        used = max(self.primary_used or 0.0, self.secondary_used or 0.0)
        return max(0.0, 100.0 - used)

    def view(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.define(eq=False)
class Account:
    record: AccountRecord
    exhausted_until: float | None = None
    quota: QuotaView = attrs.field(factory=QuotaView)
    in_flight: int = 0
    last_selected: float = 0.0
    refresh_lock: trio.Lock = attrs.field(factory=trio.Lock)
    refresh_blocked_until: float = 0.0
    last_refresh_error: str | None = None

    @property
    def account_id(self) -> str:
        return self.record.account_id

    @property
    def state(self) -> str:
        return self.record.state

    def availability(self, now: float) -> str | None:
        """None when the account can serve now, else why not."""
        if self.record.state != "active":
            return self.record.state
        if self.exhausted_until is not None and self.exhausted_until > now:
            return f"usage_limit until {int(self.exhausted_until)}"
        return None

    def view(self, now: float) -> dict[str, Any]:
        record = self.record
        return {
            "account_id": record.account_id,
            "email": record.email,
            "plan": record.plan,
            "state": "exhausted"
            if self.exhausted_until and self.exhausted_until > now and record.state == "active"
            else record.state,
            "state_reason": record.state_reason,
            "exhausted_until": self.exhausted_until
            if self.exhausted_until and self.exhausted_until > now
            else None,
            "access_expires_at": record.access_expires_at,
            "last_refresh": record.last_refresh,
            "quota": self.quota.view(),
            "in_flight": self.in_flight,
        }


@attrs.frozen
class RequestInfo:
    """What routing looks at in a request."""

    session_key: str | None = None
    model: str | None = None


@attrs.frozen
class Decision:
    strategy: str
    chosen: str | None
    reason: str
    candidates: tuple[tuple[str, float], ...]
    excluded: tuple[tuple[str, str], ...]
    session_key: str | None

    def record(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "chosen": self.chosen,
            "reason": self.reason,
            "candidates": [{"account": a, "headroom": h} for a, h in self.candidates],
            "excluded": [{"account": a, "why": w} for a, w in self.excluded],
            "session_key": self.session_key,
        }


@attrs.define(eq=False)
class Pool:
    strategy: str = "headroom"
    clock: UnixClock = attrs.field(factory=UnixClock)
    accounts: dict[str, Account] = attrs.field(factory=dict)
    sticky: collections.OrderedDict[str, str] = attrs.field(factory=collections.OrderedDict)
    _rr: int = 0

    # -- membership -----------------------------------------------------------------------
    def sync(self, records: Iterable[AccountRecord]) -> None:
        """Bring the pool in line with the store (keeps runtime state of known accounts)."""
        seen = set()
        for record in records:
            seen.add(record.account_id)
            account = self.accounts.get(record.account_id)
            if account is None:
                self.accounts[record.account_id] = Account(record)
            else:
                if (
                    record.updated_at != account.record.updated_at
                    and record.state == "active"
                    and account.record.state != "active"
                ):
                    account.exhausted_until = None  # re-imported: give it a fresh start
                account.record = record
        for gone in set(self.accounts) - seen:
            del self.accounts[gone]

    # -- routing --------------------------------------------------------------------------
    def select(self, info: RequestInfo, exclude: Mapping[str, str] | None = None) -> Decision:
        now = self.clock.now()
        exclude = exclude or {}
        ordered = sorted(self.accounts.values(), key=lambda a: (a.record.created_at, a.account_id))
        candidates: list[Account] = []
        excluded: list[tuple[str, str]] = []
        for account in ordered:
            why = exclude.get(account.account_id) or account.availability(now)
            if why:
                excluded.append((account.account_id, why))
            else:
                candidates.append(account)
        listed = tuple((a.account_id, round(a.quota.headroom(), 1)) for a in candidates)
        if not candidates:
            return Decision(
                self.strategy, None, "no_candidate", listed, tuple(excluded), info.session_key
            )
        chosen: Account
        reason = self.strategy
        sticky_id = self.sticky.get(info.session_key) if info.session_key else None
        sticky = next((a for a in candidates if a.account_id == sticky_id), None)
        if sticky is not None and self.strategy != "round_robin":
            chosen, reason = sticky, "sticky"
        elif self.strategy == "round_robin":
            chosen = candidates[self._rr % len(candidates)]
            self._rr += 1
        elif self.strategy == "fill_first":
            chosen = candidates[0]
        else:
            chosen = max(
                candidates, key=lambda a: (a.quota.headroom(), -a.in_flight, -a.last_selected)
            )
        chosen.last_selected = now
        if info.session_key:
            self.sticky[info.session_key] = chosen.account_id
            self.sticky.move_to_end(info.session_key)
            while len(self.sticky) > MAX_STICKY:
                self.sticky.popitem(last=False)
        return Decision(
            self.strategy, chosen.account_id, reason, listed, tuple(excluded), info.session_key
        )

    def earliest_reset(self) -> float | None:
        now = self.clock.now()
        resets = [
            a.exhausted_until
            for a in self.accounts.values()
            if a.record.state == "active" and a.exhausted_until and a.exhausted_until > now
        ]
        return min(resets) if resets else None

    def all_usage_limited(self) -> bool:
        now = self.clock.now()
        active = [a for a in self.accounts.values() if a.record.state == "active"]
        return bool(active) and all(a.exhausted_until and a.exhausted_until > now for a in active)

    # -- quota signals --------------------------------------------------------------------
    def mark_exhausted(self, account_id: str, resets_at: float | None) -> None:
        account = self.accounts.get(account_id)
        if account is None:
            return
        now = self.clock.now()
        account.exhausted_until = resets_at if resets_at and resets_at > now else now + 300.0
        account.quota.primary_used = 100.0
        account.quota.source, account.quota.updated_at = "usage_limit_reached", now

    def learn_headers(self, account_id: str, headers: Iterable[tuple[str, str]]) -> None:
        """Rate-limit headers (``x-codex-primary-used-percent`` ...) of a response."""
        account = self.accounts.get(account_id)
        if account is None:
            return
        values = {k.lower(): v for k, v in headers if k.lower().startswith("x-codex-")}
        if "x-codex-primary-used-percent" not in values:
            return
        self._learn(
            account,
            "headers",
            _float(values.get("x-codex-primary-used-percent")),
            _float(values.get("x-codex-secondary-used-percent")),
            _float(values.get("x-codex-primary-reset-at")),
            _float(values.get("x-codex-secondary-reset-at")),
        )

    def learn_event(self, account_id: str, event: Mapping[str, Any]) -> None:
        """A ``codex.rate_limits`` event."""
        account = self.accounts.get(account_id)
        limits = event.get("rate_limits")
        if account is None or not isinstance(limits, dict):
            return
        primary = limits.get("primary") or {}
        secondary = limits.get("secondary") or {}
        self._learn(
            account,
            "rate_limits_event",
            _float(primary.get("used_percent")),
            _float(secondary.get("used_percent")),
            _float(primary.get("reset_at")),
            _float(secondary.get("reset_at")),
        )

    def _learn(
        self,
        account: Account,
        source: str,
        p: float | None,
        s: float | None,
        pr: float | None,
        sr: float | None,
    ) -> None:
        now = self.clock.now()
        quota = account.quota
        if p is not None:
            quota.primary_used = p
        if s is not None:
            quota.secondary_used = s
        quota.primary_reset_at = pr or quota.primary_reset_at
        quota.secondary_reset_at = sr or quota.secondary_reset_at
        quota.source, quota.updated_at = source, now


def _float(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
