"""The pool's usage, in the upstream ``GET /wham/usage`` shape (what ``GET
/backend-api/wham/usage`` and ``GET /api/codex/usage`` answer). Semantics: docs/quota.md.

Synchronous and I/O-free: it reads the pool's merged quota states at one instant.
"""

from __future__ import annotations

import collections
from typing import Any

from trioproxy.accounts.pool import Account, Pool

DEFAULT_WINDOW_MINUTES = {"primary": 300, "secondary": 10080}


def _used(account: Account, name: str, now: float) -> float | None:
    """The account's percent used in window ``name`` now (None when nothing is known)."""
    window = getattr(account.quota, name)
    used = window.effective_used(now) if window is not None else None
    if account.quota.locked(now) and name == "primary":
        # a 429 lock with no full window on record: the account is spent for the client
        full = any(w.effective_used(now) >= 100.0 for _, w in account.quota.windows())
        if not full:
            return 100.0
    return used


def _window(
    accounts: list[Account], name: str, now: float, exhausted: bool, pool: Pool
) -> dict[str, Any]:
    figures = [(a, u) for a in accounts if (u := _used(a, name, now)) is not None]
    used = sum(u for _, u in figures) / len(figures) if figures else 0.0
    minutes = collections.Counter(
        w.window_minutes
        for a in accounts
        if (w := getattr(a.quota, name)) is not None and w.window_minutes
    )
    window_minutes = minutes.most_common(1)[0][0] if minutes else DEFAULT_WINDOW_MINUTES[name]
    reset_at: float | None = None
    if exhausted:
        reset_at = pool.earliest_reset()
    if reset_at is None:
        resets = []
        for account, percent in figures:
            window = getattr(account.quota, name)
            if percent > 0 and window is not None and window.reset_at and window.reset_at > now:
                resets.append(window.reset_at)
        reset_at = min(resets) if resets else now + window_minutes * 60
    return {
        "used_percent": round(used),
        "limit_window_seconds": window_minutes * 60,
        "reset_after_seconds": max(0, int(reset_at - now)),
        "reset_at": int(reset_at),
    }


def _weekly_only(accounts: list[Account], now: float) -> bool:
    """Whether the pool's accounts have a weekly (secondary) window only: some has a
    secondary figure, none a primary one or a 429 lock (which shows as a full primary)."""
    return any(a.quota.secondary is not None for a in accounts) and not any(
        a.quota.primary is not None or a.quota.locked(now) for a in accounts
    )


def pool_usage(pool: Pool) -> dict[str, Any]:
    """The pool as one account, in the upstream usage shape (see docs/quota.md). A pool
    whose accounts have a weekly window only answers ``primary_window: null``, as upstream
    does for such an account."""
    now = pool.clock.now()
    accounts = pool.in_rotation()
    exhausted = not accounts or pool.all_usage_limited()
    plans = collections.Counter(a.plan for a in accounts if a.plan)
    primary = (
        None if _weekly_only(accounts, now) else _window(accounts, "primary", now, exhausted, pool)
    )
    return {
        "plan_type": plans.most_common(1)[0][0] if plans else "plus",
        "rate_limit": {
            "allowed": not exhausted,
            "limit_reached": exhausted,
            "primary_window": primary,
            "secondary_window": _window(
                accounts, "secondary", now, exhausted and primary is None, pool
            ),
        },
        "credits": {"has_credits": False, "unlimited": False, "balance": "0"},
        "additional_rate_limits": [],
        "rate_limit_reached_type": {"kind": "rate_limit_reached"} if exhausted else None,
    }
