"""What the pages show, made from the management API's answers: plain values in, plain
values out (no I/O), so the templates only lay them out.

* :func:`account_rows`: ``GET /api/accounts`` (and the last hour of ``GET /api/usage`` per
  account) as the pool's rows: state, both windows with where each figure came from.
* :func:`decision_text`: a request's routing decisions as sentences.
* :func:`usage_charts`: ``GET /api/usage`` rows as chart series (one per key, account or
  model) and the table under each chart.
* Formatting filters for the templates (:data:`FILTERS`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import attrs

from trioproxy.keys.options import format_budget_spec

STATE_LABELS = {
    "active": "active",
    "exhausted": "exhausted",
    "reauth_required": "reauth required",
    "deactivated": "deactivated",
    "paused": "paused",
}
WINDOW_NAMES = {"primary": "5h", "secondary": "weekly"}


# -- formatting -------------------------------------------------------------------------------
def utc(timestamp: float | None, *, seconds: bool = False) -> str:
    """``2026-12-02 12:00 UTC`` (``-`` for None)."""
    if timestamp is None:
        return "-"
    moment = datetime.fromtimestamp(float(timestamp), UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC" if seconds else "%Y-%m-%d %H:%M UTC")


def span(seconds: float | None) -> str:
    """A duration in its two largest units: ``45s``, ``12m 5s``, ``4h 12m``, ``3d 2h``."""
    if seconds is None or math.isinf(seconds):
        return "-"
    left = max(0, round(seconds))
    units = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
    parts: list[str] = []
    for name, size in units:
        if left >= size or (name == "s" and not parts):
            parts.append(f"{left // size}{name}")
            left %= size
        if len(parts) == 2:
            break
    return " ".join(parts)


def ago(seconds: float | None) -> str:
    return "-" if seconds is None else f"{span(seconds)} ago"


def number(value: float | int | None) -> str:
    """``1,234,567``; ``-`` for None."""
    if value is None:
        return "-"
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"


def short_number(value: float | int | None) -> str:
    """``950``, ``12.3k``, ``4.5M``."""
    if value is None:
        return "-"
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.1f}{suffix}"
    return f"{value:.0f}"


def money(value: float | None) -> str:
    return "-" if value is None else f"${value:,.4f}" if value < 1 else f"${value:,.2f}"


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def policy_summary(policy: Mapping[str, Any] | None) -> str:
    """A key's policy in one line: ``models=gpt-5*; effort<=medium; 5h:tokens=2M``."""
    policy = policy or {}
    parts = []
    if policy.get("models") is not None:
        parts.append("models=" + ",".join(policy["models"]))
    if policy.get("max_reasoning_effort") is not None:
        parts.append(f"effort<={policy['max_reasoning_effort']}")
    parts += [format_budget_spec(budget) for budget in policy.get("budgets") or ()]
    for name in ("max_sessions", "max_requests"):
        if policy.get(name) is not None:
            parts.append(f"{name}={policy[name]}")
    if policy.get("accounts") is not None:
        parts.append("accounts=" + ",".join(policy["accounts"]))
    return "; ".join(parts) or "no policy (operator key)"


FILTERS: dict[str, Callable[..., str]] = {
    "utc": utc,
    "span": span,
    "ago": ago,
    "number": number,
    "short_number": short_number,
    "money": money,
    "percent": percent,
    "policy_summary": policy_summary,
    "budget_spec": format_budget_spec,
}


# -- the pool ---------------------------------------------------------------------------------
@attrs.frozen
class WindowCell:
    """One usage window of an account as the pool shows it."""

    name: str  # 5h, weekly, or the window's length
    used_percent: float  # effective: 0 once the window has reset
    reset_at: float | None
    source: str | None
    age_seconds: float | None

    @property
    def level(self) -> str:
        """``ok``, ``warn`` (75 % and up) or ``full`` (100 %)."""
        return "full" if self.used_percent >= 100 else "warn" if self.used_percent >= 75 else "ok"


@attrs.frozen
class AccountRow:
    account_id: str
    email: str | None
    plan: str | None
    state: str
    state_label: str
    state_reason: str | None
    exhausted_until: float | None
    windows: tuple[WindowCell | None, WindowCell | None]
    lock_until: float | None
    requests_1h: int
    tokens_1h: int
    in_flight: int


def _window(name: str, view: Mapping[str, Any] | None) -> WindowCell | None:
    if not view:
        return None
    minutes = view.get("window_minutes")
    label = WINDOW_NAMES[name]
    if isinstance(minutes, int | float) and minutes:
        label = span(minutes * 60).replace(" 0m", "").replace(" 0h", "")
    used = view.get("effective_used_percent")
    if used is None:
        used = view.get("used_percent") or 0.0
    return WindowCell(
        label,
        float(used),
        view.get("reset_at"),
        view.get("source"),
        view.get("age_seconds"),
    )


def account_rows(
    accounts: Iterable[Mapping[str, Any]], usage: Iterable[Mapping[str, Any]]
) -> list[AccountRow]:
    """The pool's rows from ``GET /api/accounts``'s ``accounts`` and the rows of a
    ``GET /api/usage?group_by=account&bucket=total`` answer."""
    by_account: dict[str, tuple[int, int]] = {}
    for row in usage:
        account_id = str(row.get("account_id") or "")
        requests, tokens = by_account.get(account_id, (0, 0))
        by_account[account_id] = (
            requests + int(row.get("requests") or 0),
            tokens + int(row.get("tokens") or 0),
        )
    rows = []
    for view in accounts:
        quota = view.get("quota") or {}
        state = str(view.get("state"))
        requests, tokens = by_account.get(str(view.get("account_id")), (0, 0))
        rows.append(
            AccountRow(
                account_id=str(view.get("account_id")),
                email=view.get("email"),
                plan=view.get("plan"),
                state=state,
                state_label=STATE_LABELS.get(state, state),
                state_reason=view.get("state_reason"),
                exhausted_until=view.get("exhausted_until"),
                windows=(
                    _window("primary", quota.get("primary")),
                    _window("secondary", quota.get("secondary")),
                ),
                lock_until=quota.get("usage_limit_until"),
                requests_1h=requests,
                tokens_1h=tokens,
                in_flight=int(view.get("in_flight") or 0),
            )
        )
    return rows


def pool_windows(pool: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """The pool's windows (``GET /api/accounts``'s ``pool``) that it has, named."""
    limits = pool.get("rate_limit") or {}
    found = []
    for key, name in (("primary_window", "5h"), ("secondary_window", "weekly")):
        window = limits.get(key)
        if window:
            seconds = window.get("limit_window_seconds")
            label = span(seconds).replace(" 0m", "").replace(" 0h", "") if seconds else name
            found.append((label, window))
    return found


# -- the request log --------------------------------------------------------------------------
def _candidate_text(candidate: Mapping[str, Any], now: float | None) -> str:
    parts = [str(candidate.get("account"))]
    if candidate.get("headroom") is not None:
        parts.append(f"headroom {candidate['headroom']:.0f}%")
    reset = candidate.get("next_reset")
    if reset is not None:
        parts.append(f"next reset {utc(reset)}")
    if candidate.get("source"):
        age = candidate.get("age")
        parts.append(
            f"figures from {candidate['source']}"
            + (f", {span(age)} old" if age is not None else "")
        )
    else:
        parts.append("no figures yet")
    return " ".join(parts[:1]) + " (" + ", ".join(parts[1:]) + ")"


def decision_text(decisions: object, now: float | None = None) -> list[str]:
    """A request's routing decisions (the ``decision`` of a request record), one sentence
    each: the strategy, what it chose and why, the candidates with the figures it used, the
    accounts left out and why."""
    if not decisions:
        return ["No routing decision (the request did not reach routing)."]
    if isinstance(decisions, str):
        return [decisions]
    if isinstance(decisions, Mapping):
        decisions = [decisions]
    if not isinstance(decisions, list):
        return [str(decisions)]
    lines = []
    for number_, decision in enumerate(decisions, 1):
        if not isinstance(decision, Mapping):
            lines.append(str(decision))
            continue
        chosen = decision.get("chosen")
        head = f"Attempt {number_}: {decision.get('strategy')} "
        head += (
            f"chose {chosen} ({decision.get('reason')})."
            if chosen
            else f"found no account ({decision.get('reason')})."
        )
        candidates = decision.get("candidates") or []
        if candidates:
            head += " Candidates: " + "; ".join(_candidate_text(c, now) for c in candidates) + "."
        excluded = decision.get("excluded") or []
        if excluded:
            head += (
                " Left out: "
                + "; ".join(f"{e.get('account')} ({e.get('why')})" for e in excluded)
                + "."
            )
        if decision.get("model_filter") is not None:
            head += (
                " Plans serving the model: " + (", ".join(decision["model_filter"]) or "none") + "."
            )
        if decision.get("session_key"):
            head += f" Session {decision['session_key']}."
        lines.append(head)
    return lines


def decision_summary(decisions: object) -> str:
    """The routing in a few words: ``headroom → acct-1`` (``, 2 attempts`` when failover
    tried more than one account)."""
    if not isinstance(decisions, list) or not decisions:
        return "no routing"
    last = decisions[-1] if isinstance(decisions[-1], Mapping) else {}
    chosen = last.get("chosen") or "no account"
    more = f", {len(decisions)} attempts" if len(decisions) > 1 else ""
    return f"{last.get('strategy', '?')} → {chosen}{more}"


# -- usage charts -----------------------------------------------------------------------------
GROUP_FIELDS = {"key": "key_id", "account": "account_id", "model": "model"}
METRICS = (
    ("requests", "Requests", number),
    ("tokens", "Tokens", short_number),
    ("cost_usd", "Estimated cost (USD)", money),
)


@attrs.frozen
class Chart:
    """One chart: a series per group over the buckets, and its table."""

    metric: str
    title: str
    times: list[float]  # the buckets' starts
    series: list[tuple[str, list[float]]]  # (group value, one value per bucket)
    totals: list[tuple[str, float]]  # (group value, its sum), largest first

    def table(self) -> list[tuple[float, list[float]]]:
        """The buckets where something was used, each with every series' value."""
        rows = []
        for index, at in enumerate(self.times):
            values = [series[index] for _, series in self.series]
            if any(values):
                rows.append((at, values))
        return rows

    def as_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "title": self.title,
            "times": self.times,
            "series": [{"label": label, "values": values} for label, values in self.series],
        }


def _buckets(since: float, until: float, bucket: str) -> list[float]:
    size = 3600 if bucket == "hour" else 86400
    start = since - since % size
    return [float(t) for t in range(int(start), int(until), size)]


def usage_charts(
    rows: Sequence[Mapping[str, Any]],
    group: str,
    bucket: str,
    since: float,
    until: float,
    names: Mapping[str, str] | None = None,
) -> list[Chart]:
    """Requests, tokens and cost by bucket for each value of ``group`` (``key``,
    ``account``, ``model``), from the rows of ``GET /api/usage?group_by=<group>``; every
    bucket from ``since`` to ``until`` has a point (0 when nothing was used). A value
    ``names`` knows is shown as ``name (value)``."""
    field = GROUP_FIELDS[group]
    times = _buckets(since, until, bucket)
    index = {t: i for i, t in enumerate(times)}
    names = names or {}

    def label_of(row: Mapping[str, Any]) -> str:
        value = str(row.get(field) or "-")
        return f"{names[value]} ({value})" if value in names else value

    labels = sorted({label_of(row) for row in rows})
    charts = []
    for metric, title, _ in METRICS:
        values = {label: [0.0] * len(times) for label in labels}
        for row in rows:
            at = index.get(float(row.get("start") or 0))
            if at is not None:
                values[label_of(row)][at] += float(row.get(metric) or 0)
        totals = sorted(
            ((label, sum(v)) for label, v in values.items()), key=lambda item: (-item[1], item[0])
        )
        charts.append(
            Chart(metric, title, times, [(label, values[label]) for label in labels], totals)
        )
    return charts
