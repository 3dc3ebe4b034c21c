"""A budgeted key's own usage in the upstream ``GET /wham/usage`` shape (sans-IO).

The Codex CLI's ``/status`` reads the pool usage endpoints. For a client whose key has
budgets, the proxy answers with the key's budgets as the windows: the shortest budget is
the primary window, the longest (when there are two or more) the secondary; each window's
``used_percent`` is the largest share of any of its limits used, and its reset is when the
oldest usage leaves a rolling window or when a calendar window ends. The pool's plan and
credits stay as they are. A key without budgets (and a loopback client) sees the pool.
"""

from __future__ import annotations

from typing import Any, Protocol

from trioproxy.keys.budgets import Counter
from trioproxy.keys.rate_view import windows


class Budgeted(Protocol):
    counters: dict[str, Counter]

    def spent(self, now: float) -> tuple[str, str, float] | None: ...


def _usage_window(window: dict[str, Any] | None) -> dict[str, Any] | None:
    if window is None:
        return None
    return {
        "used_percent": round(window["used_percent"]),
        "limit_window_seconds": window["window_minutes"] * 60,
        "reset_after_seconds": window["reset_after_seconds"],
        "reset_at": window["reset_at"],
    }


def key_usage(pool_view: dict[str, Any], key: Budgeted, now: float) -> dict[str, Any]:
    """``pool_view`` (the pool's usage) with its rate limit replaced by ``key``'s budgets."""
    primary, secondary = windows(key, now)
    spent = key.spent(now) is not None
    return {
        **pool_view,
        "rate_limit": {
            "allowed": not spent,
            "limit_reached": spent,
            "primary_window": _usage_window(primary),
            "secondary_window": _usage_window(secondary),
        },
        "rate_limit_reached_type": {"kind": "rate_limit_reached"} if spent else None,
    }
