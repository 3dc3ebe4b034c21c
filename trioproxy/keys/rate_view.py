"""A budgeted key's budgets in the places the Codex CLI reads rate limits (sans-IO).

The Codex CLI shows (``/status``) and records the rate limits it last read from a turn's
answer: the ``x-codex-primary-*`` / ``x-codex-secondary-*`` response headers (HTTP, and the
WebSocket handshake) and ``codex.rate_limits`` events (WebSocket). For a client whose key
has budgets, the proxy puts the key's budgets there instead of the serving account's
windows: the shortest budget is the primary window, the longest (with two or more) the
secondary, each with the largest share of any of its limits used and its reset. So a team
member sees their own remaining budget, not the account's. The same view answers the pool
usage endpoints (``usage_view.py``).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

from trioproxy.keys.budgets import Counter

RawHeaders = list[tuple[bytes, bytes]]
_FAMILIES = (b"x-codex-primary-", b"x-codex-secondary-")


class Budgeted(Protocol):
    counters: dict[str, Counter]


def windows(key: Budgeted, now: float) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The key's primary and secondary windows (None where it has none)."""
    counters = sorted(key.counters.values(), key=lambda c: c.budget.seconds)
    if not counters:
        return None, None
    primary = _window(counters[0], now)
    return primary, _window(counters[-1], now) if len(counters) > 1 else None


def _window(counter: Counter, now: float) -> dict[str, Any]:
    spent = counter.exceeded(now) is not None
    reset_at = counter.frees_at(now) if spent else counter.resets_at(now)
    return {
        "used_percent": min(100.0, round(counter.used_fraction(now) * 100, 1)),
        "window_minutes": int(counter.budget.seconds // 60),
        "reset_at": math.ceil(reset_at),
        "reset_after_seconds": max(0, math.ceil(reset_at - now)),
    }


def rate_limit_headers(key: Budgeted, now: float) -> list[tuple[str, str]]:
    """The key's windows as ``x-codex-*`` rate-limit headers."""
    out: list[tuple[str, str]] = []
    for name, window in zip(("primary", "secondary"), windows(key, now), strict=True):
        if window is None:
            continue
        out += [
            (f"x-codex-{name}-used-percent", f"{window['used_percent']:.1f}"),
            (f"x-codex-{name}-window-minutes", str(window["window_minutes"])),
            (f"x-codex-{name}-reset-at", str(window["reset_at"])),
            (f"x-codex-{name}-reset-after-seconds", str(window["reset_after_seconds"])),
        ]
    return out


def rewrite_headers(headers: RawHeaders, key: Budgeted, now: float) -> RawHeaders:
    """``headers`` (upstream's) with the account's rate-limit windows replaced by the key's."""
    kept = [(k, v) for k, v in headers if not k.lower().startswith(_FAMILIES)]
    return kept + [(k.encode(), v.encode()) for k, v in rate_limit_headers(key, now)]


def rewrite_event(event: dict[str, Any], key: Budgeted, now: float) -> dict[str, Any]:
    """A ``codex.rate_limits`` event with the key's windows in place of the account's."""
    primary, secondary = windows(key, now)
    limits: dict[str, Any] = {}
    for name, window in (("primary", primary), ("secondary", secondary)):
        limits[name] = (
            None
            if window is None
            else {
                "used_percent": window["used_percent"],
                "window_minutes": window["window_minutes"],
                "reset_at": window["reset_at"],
            }
        )
    return {**event, "rate_limits": limits}
