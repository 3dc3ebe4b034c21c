"""The dashboard's forms read into management API bodies (no I/O).

A form field the API checks is passed on as typed, so the API's own error (with the field
it names) is what the operator sees; only the shape is made here: lists from text with one
entry a line (or comma-separated), numbers from digits, blanks as "not set".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_SPLIT = re.compile(r"[\n,]+")


class FormError(ValueError):
    """A field that cannot be read; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def entries(text: str | None) -> list[str]:
    """One entry a line or comma-separated, blanks left out."""
    return [item.strip() for item in _SPLIT.split(text or "") if item.strip()]


def lines(text: str | None) -> list[str]:
    """One entry a line (budget specs contain commas), blanks left out."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def _count(form: Mapping[str, str], field: str) -> int | str | None:
    value = (form.get(field) or "").strip()
    if not value:
        return None
    return int(value) if value.isdigit() else value  # the API names what is wrong with it


def key_policy(form: Mapping[str, str], accounts: list[str]) -> dict[str, Any]:
    """A key's whole policy from the key form: every field, None where the form leaves it
    blank (the API's PATCH removes a field set to None; POST drops them)."""
    models = entries(form.get("models"))
    return {
        "models": models or None,
        "max_reasoning_effort": (form.get("max_reasoning_effort") or "").strip() or None,
        "budgets": lines(form.get("budgets")) or None,
        "max_sessions": _count(form, "max_sessions"),
        "max_requests": _count(form, "max_requests"),
        "accounts": sorted(accounts) or None,
    }


def key_body(form: Mapping[str, str], accounts: list[str], *, creating: bool) -> dict[str, Any]:
    """The body of ``POST /api/keys`` (``creating``) or ``PATCH /api/keys/KEY_ID``."""
    name = (form.get("name") or "").strip()
    policy = key_policy(form, accounts)
    expires = (form.get("expires_at") or "").strip()
    if creating:
        body: dict[str, Any] = {"name": name}
        set_fields = {k: v for k, v in policy.items() if v is not None}
        if set_fields:
            body["policy"] = set_fields
        if expires:
            body["expires_at"] = expires
        return body
    body = {"policy": policy, "expires_at": expires or None}
    if name:
        body["name"] = name
    return body


def budget_lines(policy: Mapping[str, Any] | None, format_spec: Any) -> str:
    """A policy's budgets as the form shows them, one spec a line."""
    return "\n".join(format_spec(b) for b in (policy or {}).get("budgets") or ())
