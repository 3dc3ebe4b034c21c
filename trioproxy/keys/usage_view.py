"""A budgeted key's own usage in the upstream ``GET /wham/usage`` shape (sans-IO).

The Codex CLI's ``/status`` reads the pool usage endpoints. For a client whose key has
budgets, the proxy answers with the key's budgets as the windows: the shortest budget is
the primary window, the longest (when there are two or more) the secondary; each window's
``used_percent`` is the largest share of any of its limits used, and its reset is when the
oldest usage leaves a rolling window or when a calendar window ends. The pool's plan and
credits stay as they are. A key without budgets (and a loopback client) sees the pool.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

from trioproxy.keys.budgets import Counter


class Budgeted(Protocol):
    counters: dict[str, Counter]

    def spent(self, now: float) -> tuple[str, str, float] | None: ...


def _window(counter: Counter, now: float) -> dict[str, Any]:
    reset_at = counter.frees_at(now) if counter.exceeded(now) else counter.resets_at(now)
    return {
        "used_percent": min(100, round(counter.used_fraction(now) * 100)),
        "limit_window_seconds": int(counter.budget.seconds),
        "reset_after_seconds": max(0, math.ceil(reset_at - now)),
        "reset_at": math.ceil(reset_at),
    }


def key_usage(pool_view: dict[str, Any], key: Budgeted, now: float) -> dict[str, Any]:
    """``pool_view`` (the pool's usage) with its rate limit replaced by ``key``'s budgets."""
    counters = sorted(key.counters.values(), key=lambda c: c.budget.seconds)
    spent = key.spent(now) is not None
    primary = counters[0]
    secondary = counters[-1] if len(counters) > 1 else None
    return {
        **pool_view,
        "rate_limit": {
            "allowed": not spent,
            "limit_reached": spent,
            "primary_window": _window(primary, now),
            "secondary_window": _window(secondary, now) if secondary is not None else None,
        },
        "rate_limit_reached_type": {"kind": "rate_limit_reached"} if spent else None,
    }
