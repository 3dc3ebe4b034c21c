"""Frozen records the store hands out and takes in.

Tokens are plaintext in these records (the store encrypts them on the way to disk) and are
kept out of ``repr()`` so that a logged or printed record never shows one.
"""

from __future__ import annotations

from typing import Any

import attrs

#: Persistent account states. Short-lived states (cooling down, quota exhausted) live in the
#: pool's memory only; these are the ones that survive a restart.
ACCOUNT_STATES = frozenset({"active", "reauth_required", "deactivated", "disabled"})


class StoreError(Exception):
    """The store cannot be opened or used; the message names the cause and never holds
    token material."""


@attrs.frozen(kw_only=True)
class AccountRecord:
    """One ChatGPT account with its OAuth tokens.

    ``access_expires_at`` is the access token's ``exp`` claim (unix seconds) when it has one;
    ``last_refresh`` is when the tokens were last obtained (unix seconds). ``id_token`` may be
    absent for hand-made records; Codex always writes one.
    """

    account_id: str
    email: str | None
    plan: str | None
    user_id: str | None
    access_token: str = attrs.field(repr=False)
    refresh_token: str = attrs.field(repr=False)
    id_token: str | None = attrs.field(default=None, repr=False)
    access_expires_at: float | None = None
    last_refresh: float
    state: str = "active"
    state_reason: str | None = None
    created_at: float
    updated_at: float

    def public_view(self) -> dict[str, object]:
        """Everything but the tokens, as plain JSON-able values (for `accounts list --json`
        and the management API)."""
        return {
            "account_id": self.account_id,
            "email": self.email,
            "plan": self.plan,
            "user_id": self.user_id,
            "state": self.state,
            "state_reason": self.state_reason,
            "access_expires_at": self.access_expires_at,
            "last_refresh": self.last_refresh,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


@attrs.frozen(kw_only=True)
class ApiKeyRecord:
    """A client API key, without its secret (only a hash of it is stored).

    ``policy`` is the key's policy as stored (JSON-able; ``keys/policy.py`` reads it), None
    for a key without one. ``key_hash`` is the SHA-256 of the current secret (rotation
    changes it, nothing else)."""

    key_id: str
    name: str
    created_at: float
    last_used_at: float | None = None
    revoked_at: float | None = None
    policy: dict[str, Any] | None = None
    expires_at: float | None = None
    disabled_at: float | None = None
    rotated_at: float | None = None
    updated_at: float | None = None
    key_hash: str = attrs.field(default="", repr=False)

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def status(self, now: float) -> str:
        """``revoked``, ``disabled``, ``expired`` or ``active`` (the first that applies)."""
        if self.revoked_at is not None:
            return "revoked"
        if self.disabled_at is not None:
            return "disabled"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def public_view(self, now: float | None = None) -> dict[str, object]:
        view: dict[str, object] = {
            "key_id": self.key_id,
            "name": self.name,
            "created_at": self.created_at,
            "last_used_at": self.last_used_at,
            "revoked_at": self.revoked_at,
            "disabled_at": self.disabled_at,
            "expires_at": self.expires_at,
            "rotated_at": self.rotated_at,
            "policy": self.policy or {},
        }
        if now is not None:
            view["status"] = self.status(now)
        return view


@attrs.frozen
class StoreStatistics:
    """What :meth:`Store.statistics` reports: the dialect and the worker-thread limiter."""

    dialect: str
    max_threads: int
    threads_busy: int
    tasks_waiting: int
