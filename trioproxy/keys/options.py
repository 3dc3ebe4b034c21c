"""What people type about keys, read once for the management API and the CLI (sans-IO):
budget specs, expiry times and policy changes.

Budget spec
    ``WINDOW[:RESET]:LIMIT=VALUE[,LIMIT=VALUE...]``, e.g. ``5h:tokens=2000000,requests=500``,
    ``monthly:calendar:cost_usd=50``, ``daily:rolling:output_tokens=100k``. ``WINDOW`` is one
    of :data:`~trioproxy.keys.policy.WINDOWS`, ``RESET`` ``rolling`` or ``calendar`` (left
    out: ``rolling`` for ``5h``, ``calendar`` otherwise), ``LIMIT`` one of
    :data:`~trioproxy.keys.policy.LIMITS`. A value is a number (``_`` may group digits) with
    an optional ``k`` (thousand) or ``M`` (million) suffix. :func:`parse_budget_spec` turns
    a spec into the budget's JSON form; the API takes specs in a policy's ``budgets`` list
    as well as objects.

Time
    :func:`parse_when`: unix seconds (a number, or a string of one), an ISO-8601 date or
    date and time (UTC when it names no offset; a date alone is its 00:00 UTC), or a span
    from now: a number and a unit, ``s``, ``m``, ``h``, ``d`` or ``w`` (``30d``, ``12h``).

Policy
    :func:`checked_policy` parses a policy's JSON form (spec strings in ``budgets``
    included) and returns its normalized form, which is what is stored.
    :func:`policy_change` builds the change the CLI's options ask for, to merge with
    :func:`~trioproxy.keys.policy.merge_policy` as the API's ``PATCH`` does.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from trioproxy.keys.policy import LIMITS, RESETS, WINDOWS, PolicyError, parse_policy

SPEC_FORM = "WINDOW[:RESET]:LIMIT=VALUE[,LIMIT=VALUE...]"
WHEN_FORMS = (
    "unix seconds, an ISO-8601 date or date and time (2030-01-31, 2030-01-31T18:00Z; UTC "
    "without an offset) or a span from now (45s, 90m, 12h, 30d, 2w)"
)
#: the latest moment a time may name (the end of year 9999)
LATEST = 253402300799.0
_SPAN = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_SPAN_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
_NUMBER = re.compile(r"[+-]?\d+(?:\.\d*)?|[+-]?\.\d+")
_VALUE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)([kKmM]?)")
_SUFFIXES = {"": 1, "k": 1_000, "m": 1_000_000}


def parse_when(value: object, now: float) -> float:
    """A moment as unix seconds (see the module docstring); anything else is a ValueError
    that names the accepted forms."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{value!r} is not a time; use {WHEN_FORMS}")
    if isinstance(value, str):
        text = value.strip()
        span = _SPAN.fullmatch(text.lower())
        if span is not None:
            seconds = float(span.group(1)) * _SPAN_UNITS[span.group(2)]
            if seconds <= 0:
                raise ValueError(f"{value!r}: a span from now is longer than zero")
            moment = now + seconds
        elif _NUMBER.fullmatch(text):
            moment = float(text)
        else:
            moment = _iso(value)
    else:
        moment = float(value)
    if not math.isfinite(moment) or not 0 < moment <= LATEST:
        raise ValueError(f"{value!r} is not a time from 1970 to 9999")
    return moment


def _iso(text: str) -> float:
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a time; use {WHEN_FORMS}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def parse_budget_spec(text: str) -> dict[str, Any]:
    """A budget spec (see the module docstring) as the budget's JSON form, e.g.
    ``{"window": "5h", "tokens": 2000000}``. A spec that cannot be read, or names an unknown
    window, reset or limit, is a ValueError; the values' ranges are the policy's to check."""
    head, colon, tail = text.strip().rpartition(":")
    if not colon or not head or not tail:
        raise ValueError(f"{text!r} is not a budget; write {SPEC_FORM}, e.g. 5h:tokens=2000000")
    window, _, reset = (part.strip() for part in head.partition(":"))
    if window not in WINDOWS:
        raise ValueError(f"{text!r}: the window is one of {', '.join(WINDOWS)}, not {window!r}")
    budget: dict[str, Any] = {"window": window}
    if reset:
        if reset not in RESETS:
            raise ValueError(f"{text!r}: the reset is rolling or calendar, not {reset!r}")
        budget["reset"] = reset
    for item in tail.split(","):
        name, equals, amount = (part.strip() for part in item.partition("="))
        if not equals or not name:
            raise ValueError(f"{text!r}: {item.strip()!r} is not LIMIT=VALUE")
        if name not in LIMITS:
            raise ValueError(f"{text!r}: the limit is one of {', '.join(LIMITS)}, not {name!r}")
        if name in budget:
            raise ValueError(f"{text!r}: {name} is given twice")
        budget[name] = _amount(text, name, amount)
    return budget


def _amount(text: str, name: str, amount: str) -> int | float:
    match = _VALUE.fullmatch(amount.replace("_", ""))
    if match is None:
        raise ValueError(
            f"{text!r}: {name}={amount} is not a positive number (e.g. 500, 2.5, 100k, 2M)"
        )
    value = float(match.group(1)) * _SUFFIXES[match.group(2).lower()]
    return int(value) if value.is_integer() else value


def expand_budget_specs(value: object) -> object:
    """A policy's JSON form with the spec strings in its ``budgets`` list read into
    objects (anything else is left for :func:`parse_policy` to judge)."""
    if not isinstance(value, Mapping) or not isinstance(value.get("budgets"), list):
        return value
    budgets = []
    for index, item in enumerate(value["budgets"]):
        if isinstance(item, str):
            try:
                item = parse_budget_spec(item)
            except ValueError as exc:
                raise PolicyError(str(exc), f"budgets[{index}]") from None
        budgets.append(item)
    return {**value, "budgets": budgets}


def checked_policy(value: object) -> dict[str, Any] | None:
    """A policy's JSON form checked and normalized (resets filled in, only the fields that
    are set); None for the empty policy. A policy that cannot be used is a PolicyError."""
    policy = parse_policy(expand_budget_specs(value))
    return policy.as_json() or None


def policy_change(
    *,
    policy_json: str | None = None,
    models: Sequence[str] = (),
    max_effort: str | None = None,
    budgets: Sequence[str] = (),
    max_sessions: int | None = None,
    max_requests: int | None = None,
    accounts: Sequence[str] = (),
    clear_models: bool = False,
    clear_budgets: bool = False,
) -> dict[str, Any]:
    """The policy change the CLI's options ask for: the fields of ``policy_json`` (a JSON
    object; a field set to null is removed), then each option given, which replaces its
    field (``--model`` and ``--budget`` are repeated for a list). Budget specs are read
    here; the policy is checked once merged (:func:`checked_policy`)."""
    change: dict[str, Any] = {}
    if policy_json is not None:
        try:
            loaded = json.loads(policy_json)
        except ValueError as exc:
            raise PolicyError(f"--policy-json is not JSON: {exc}.", "policy") from None
        if not isinstance(loaded, dict):
            raise PolicyError("--policy-json is a JSON object.", "policy")
        change.update(loaded)
    if clear_models:
        change["models"] = None
    if clear_budgets:
        change["budgets"] = None
    if models:
        change["models"] = list(models)
    if budgets:
        read = []
        for index, spec in enumerate(budgets):
            try:
                read.append(parse_budget_spec(spec))
            except ValueError as exc:
                raise PolicyError(str(exc), f"budgets[{index}]") from None
        change["budgets"] = read
    for name, given in (
        ("max_reasoning_effort", max_effort),
        ("max_sessions", max_sessions),
        ("max_requests", max_requests),
    ):
        if given is not None:
            change[name] = given
    if accounts:
        change["accounts"] = list(accounts)
    return change


def format_budget_spec(budget: Mapping[str, Any]) -> str:
    """A budget's JSON form as a spec (:func:`parse_budget_spec` reads it back): the reset
    when it is not the window's default, round values with ``k`` or ``M``."""
    window = str(budget.get("window"))
    default = "rolling" if window == "5h" else "calendar"
    head = window if budget.get("reset", default) == default else f"{window}:{budget['reset']}"
    limits = ",".join(
        f"{name}={_short(budget[name])}" for name in LIMITS if budget.get(name) is not None
    )
    return f"{head}:{limits}"


def _short(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        for suffix, scale in (("M", 1_000_000), ("k", 1_000)):
            if value >= scale and value % scale == 0:
                return f"{value // scale}{suffix}"
    return str(value)
