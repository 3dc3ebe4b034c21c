"""A key's policy: which models and reasoning efforts it may use, its budgets, its
concurrency caps and the accounts it may use (sans-IO).

The stored and served form is a JSON object (every field optional)::

    {
      "models": ["gpt-5.1-codex*", "re:^gpt-5(\\.\\d+)?$"],
      "max_reasoning_effort": "medium",
      "budgets": [{"window": "5h", "tokens": 2000000, "requests": 500},
                  {"window": "monthly", "reset": "calendar", "cost_usd": 50}],
      "max_sessions": 4,
      "max_requests": 8,
      "accounts": ["acct-1", "acct-2"]
    }

``models``: exact names, shell-style patterns (``*``, ``?``, ``[...]``) or regular
expressions written ``re:<expression>`` (matched against the whole name).
``max_reasoning_effort``: one of :data:`EFFORTS`; a request asking for more is refused (one
that names no effort is let through: upstream picks the model's default).
``budgets``: a window (:data:`WINDOWS`), how it resets (``rolling``, or ``calendar`` in UTC:
days start at 00:00, weeks on Monday, months on the 1st; ``5h`` is rolling only) and at
least one limit of :data:`LIMITS`.
``max_sessions``: WebSocket sessions open at once; ``max_requests``: requests and
WebSocket turns in flight at once. ``accounts``: the account ids the key may be routed to.

:func:`parse_policy` checks a policy and raises :class:`PolicyError` (with the offending
field) for anything it cannot use, so a malformed policy is refused before it is stored.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

#: reasoning efforts, weakest first
EFFORTS: tuple[str, ...] = ("none", "minimal", "low", "medium", "high", "xhigh")
#: budget windows and their lengths in seconds (``monthly`` rolling: 30 days)
WINDOWS: dict[str, float] = {
    "5h": 5 * 3600.0,
    "daily": 86400.0,
    "weekly": 7 * 86400.0,
    "monthly": 30 * 86400.0,
}
RESETS = ("rolling", "calendar")
#: what a budget may limit; ``tokens`` is input + output (cached input is part of the input,
#: reasoning part of the output, as upstream's usage counts them)
LIMITS: tuple[str, ...] = (
    "requests",
    "tokens",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cost_usd",
)
FIELDS = ("models", "max_reasoning_effort", "budgets", "max_sessions", "max_requests", "accounts")
MAX_BUDGETS = 8
MAX_PATTERNS = 64


class PolicyError(ValueError):
    """A policy that cannot be used; ``param`` names the field (``budgets[0].window``)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@attrs.frozen
class Budget:
    """One budget: ``limits`` maps names of :data:`LIMITS` to their ceilings."""

    window: str
    reset: str
    limits: Mapping[str, float]

    @property
    def seconds(self) -> float:
        return WINDOWS[self.window]

    @property
    def name(self) -> str:
        """``<window>/<reset>``: what names the budget's counters."""
        return f"{self.window}/{self.reset}"

    def as_json(self) -> dict[str, Any]:
        return {"window": self.window, "reset": self.reset, **self.limits}


@attrs.frozen
class ModelRule:
    """A ``models`` entry, compiled."""

    text: str
    pattern: re.Pattern[str]

    def matches(self, model: str) -> bool:
        return self.pattern.fullmatch(model) is not None


@attrs.frozen
class Policy:
    """A parsed policy (see the module docstring). The empty policy allows everything."""

    models: tuple[ModelRule, ...] | None = None
    max_reasoning_effort: str | None = None
    budgets: tuple[Budget, ...] = ()
    max_sessions: int | None = None
    max_requests: int | None = None
    accounts: frozenset[str] | None = None

    def allows_model(self, model: str | None) -> bool:
        if self.models is None:
            return True
        return model is not None and any(rule.matches(model) for rule in self.models)

    def allowed_models(self) -> list[str]:
        return [rule.text for rule in self.models or ()]

    def allows_effort(self, effort: str | None) -> bool:
        if self.max_reasoning_effort is None or effort is None:
            return True
        if effort not in EFFORTS:
            return False  # an effort nobody knows cannot be shown to be under the cap
        return EFFORTS.index(effort) <= EFFORTS.index(self.max_reasoning_effort)

    def allowed_efforts(self) -> list[str]:
        if self.max_reasoning_effort is None:
            return list(EFFORTS)
        return list(EFFORTS[: EFFORTS.index(self.max_reasoning_effort) + 1])

    def as_json(self) -> dict[str, Any]:
        """The policy's JSON form, with only the fields that are set."""
        value: dict[str, Any] = {}
        if self.models is not None:
            value["models"] = self.allowed_models()
        if self.max_reasoning_effort is not None:
            value["max_reasoning_effort"] = self.max_reasoning_effort
        if self.budgets:
            value["budgets"] = [budget.as_json() for budget in self.budgets]
        if self.max_sessions is not None:
            value["max_sessions"] = self.max_sessions
        if self.max_requests is not None:
            value["max_requests"] = self.max_requests
        if self.accounts is not None:
            value["accounts"] = sorted(self.accounts)
        return value


def parse_policy(value: object) -> Policy:
    """Check and parse a policy's JSON form (None or ``{}``: the empty policy)."""
    if value is None:
        return Policy()
    if not isinstance(value, Mapping):
        raise PolicyError("A policy is a JSON object.", "policy")
    unknown = sorted(set(value) - set(FIELDS))
    if unknown:
        raise PolicyError(
            f"Unknown policy field {unknown[0]!r}; known: {', '.join(FIELDS)}.", unknown[0]
        )
    return Policy(
        models=_models(value.get("models")),
        max_reasoning_effort=_effort(value.get("max_reasoning_effort")),
        budgets=_budgets(value.get("budgets")),
        max_sessions=_cap(value.get("max_sessions"), "max_sessions"),
        max_requests=_cap(value.get("max_requests"), "max_requests"),
        accounts=_accounts(value.get("accounts")),
    )


def merge_policy(current: Mapping[str, Any] | None, change: Mapping[str, Any]) -> dict[str, Any]:
    """``current`` with the fields of ``change`` replaced (a field set to null is removed);
    the result is not checked (parse it)."""
    merged = dict(current or {})
    for name, field in change.items():
        if field is None:
            merged.pop(name, None)
        else:
            merged[name] = field
    return merged


def _strings(value: object, param: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise PolicyError(f"{param} is a list of non-empty strings.", param)
    return list(value)


def _models(value: object) -> tuple[ModelRule, ...] | None:
    if value is None:
        return None
    texts = _strings(value, "models")
    if not texts or len(texts) > MAX_PATTERNS:
        raise PolicyError(f"models lists 1 to {MAX_PATTERNS} names or patterns.", "models")
    rules = []
    for index, text in enumerate(texts):
        if text.startswith("re:"):
            try:
                pattern = re.compile(text[3:])
            except re.error as exc:
                raise PolicyError(
                    f"models[{index}]: the regular expression {text[3:]!r} does not compile: {exc}.",
                    f"models[{index}]",
                ) from None
        else:
            pattern = re.compile(fnmatch.translate(text))
        rules.append(ModelRule(text, pattern))
    return tuple(rules)


def _effort(value: object) -> str | None:
    if value is None:
        return None
    if value not in EFFORTS:
        raise PolicyError(
            f"max_reasoning_effort is one of {', '.join(EFFORTS)}.", "max_reasoning_effort"
        )
    return str(value)


def _cap(value: object, param: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100_000:
        raise PolicyError(f"{param} is an integer from 1 to 100000.", param)
    return value


def _accounts(value: object) -> frozenset[str] | None:
    if value is None:
        return None
    accounts = _strings(value, "accounts")
    if not accounts:
        raise PolicyError("accounts lists at least one account id.", "accounts")
    return frozenset(accounts)


def _budgets(value: object) -> tuple[Budget, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_BUDGETS:
        raise PolicyError(f"budgets is a list of at most {MAX_BUDGETS} budgets.", "budgets")
    budgets = tuple(_budget(item, f"budgets[{i}]") for i, item in enumerate(value))
    names = [budget.name for budget in budgets]
    for name in names:
        if names.count(name) > 1:
            raise PolicyError(f"Two budgets share the window {name}; merge them.", "budgets")
    return budgets


def _budget(item: object, param: str) -> Budget:
    if not isinstance(item, Mapping):
        raise PolicyError(f"{param} is a JSON object.", param)
    window = item.get("window")
    if window not in WINDOWS:
        raise PolicyError(
            f"{param}.window is one of {', '.join(WINDOWS)} (not {window!r}).", f"{param}.window"
        )
    reset = item.get("reset", "rolling" if window == "5h" else "calendar")
    if reset not in RESETS or (window == "5h" and reset != "rolling"):
        allowed = "rolling" if window == "5h" else " or ".join(RESETS)
        raise PolicyError(f"{param}.reset is {allowed} for a {window} window.", f"{param}.reset")
    unknown = sorted(set(item) - {"window", "reset", *LIMITS})
    if unknown:
        raise PolicyError(
            f"{param}: unknown field {unknown[0]!r}; limits are {', '.join(LIMITS)}.",
            f"{param}.{unknown[0]}",
        )
    limits: dict[str, float] = {}
    for name in LIMITS:
        if name not in item:
            continue
        limit = item[name]
        integral = name != "cost_usd"
        valid = (
            not isinstance(limit, bool)
            and isinstance(limit, int | float)
            and math.isfinite(limit)
            and limit > 0
            and (not integral or float(limit).is_integer())
        )
        if not valid:
            kind = "a positive number" if not integral else "a positive integer"
            raise PolicyError(f"{param}.{name} is {kind} (not {limit!r}).", f"{param}.{name}")
        limits[name] = int(limit) if integral else float(limit)
    if not limits:
        raise PolicyError(f"{param} sets no limit; set one of {', '.join(LIMITS)}.", param)
    return Budget(str(window), str(reset), limits)


def unknown_accounts(policy: Policy, known: Iterable[str]) -> list[str]:
    """The policy's account ids that are not in ``known``."""
    return sorted((policy.accounts or frozenset()) - set(known))
