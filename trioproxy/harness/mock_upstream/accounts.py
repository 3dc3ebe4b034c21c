"""Mock ChatGPT accounts: unsigned JWTs with the real claims, rotating refresh tokens, and
quota windows that count requests.

Theory of operation
-------------------
Each account has a *primary* (5 h) and a *secondary* (7 d) window. Every generating request
(not a prewarm) uses one unit of each; ``used_percent = used / limit``. When either window is
full, requests get ``429 usage_limit_reached`` with that window's ``resets_at`` until the
window rolls over. An account made ``weekly_only`` (the control API's account patch) has the
secondary window alone, as some real plans do: no ``x-codex-primary-*`` headers, ``"primary":
null`` in ``codex.rate_limits`` and ``primary_window: null`` in ``/wham/usage``, and only the
weekly window can refuse it.

Turn state: every answer carries an ``x-codex-turn-state`` the account issued
(``ts_<account>_<hex>``, remembered in ``turn_states``); a request that echoes one the account
issued gets it back, one that echoes another account's is counted (``Stats.foreign_turn_states``)
and, with ``MockConfig.strict_turn_state``, refused with ``400 invalid_turn_state``. Time is ``MockTime``: unix seconds derived from ``trio.current_time()`` so a
``MockClock`` moves quota resets and token expiry too.

Tokens: an access token is valid while it is in ``access_tokens`` and not expired (several
can be valid at once, like the real backend after a refresh). A refresh token is single use:
presenting one that was already rotated answers ``refresh_token_reused``.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from typing import Any

import attrs
import trio

CODEX_CLIENT_ID = "app_EMoamEEZ73f0CkXaXp7hrann"
AUTH_CLAIM = "https://api.openai.com/auth"
PROFILE_CLAIM = "https://api.openai.com/profile"


@attrs.define(eq=False)
class MockTime:
    """Unix time anchored to trio's clock (so ``MockClock`` drives it)."""

    offset: float | None = None
    skew: float = 0.0  # moved by the control API to jump quota resets and token expiry

    def now(self) -> float:
        if self.offset is None:
            self.offset = time.time() - trio.current_time()
        return self.offset + self.skew + trio.current_time()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_jwt(claims: dict[str, Any]) -> str:
    """An ``alg: none`` JWT with a dummy signature segment.

    Nobody verifies it, but the Codex CLI rejects an ``auth.json`` whose tokens do not have
    three non-empty segments (it then runs unauthenticated, silently)."""
    header = b64url(json.dumps({"alg": "none", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = b64url(json.dumps(claims, separators=(",", ":")).encode())
    return f"{header}.{payload}.{_DUMMY_SIGNATURE}"


_DUMMY_SIGNATURE = b64url(b"trioproxy-mock-unsigned")


def jwt_claims(token: str) -> dict[str, Any]:
    """Decode a JWT's payload without checking its signature."""
    try:
        payload = token.split(".")[1]
        padded = payload + "=" * (-len(payload) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
    except (IndexError, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}


@attrs.define(eq=False)
class QuotaWindow:
    """A rolling usage window counted in requests."""

    window_minutes: int
    limit: int
    started_at: float
    used: int = 0

    @property
    def reset_at(self) -> float:
        return self.started_at + self.window_minutes * 60

    def roll(self, now: float) -> None:
        if now >= self.reset_at:
            self.used = 0
            self.started_at = now

    def used_percent(self) -> float:
        if self.limit <= 0:
            return 100.0
        return min(100.0, round(self.used * 100.0 / self.limit, 1))

    def exhausted(self) -> bool:
        return self.used >= self.limit

    def exhaust(self, now: float, resets_in: float) -> None:
        """Fill the window so that it resets ``resets_in`` seconds from ``now``."""
        self.used = self.limit
        self.started_at = now + resets_in - self.window_minutes * 60

    def snapshot(self, now: float) -> dict[str, Any]:
        return {
            "used_percent": self.used_percent(),
            "used": self.used,
            "limit": self.limit,
            "window_minutes": self.window_minutes,
            "reset_at": int(self.reset_at),
            "reset_after_seconds": max(0, int(self.reset_at - now)),
        }


@attrs.define(eq=False)
class MockAccount:
    account_id: str
    email: str
    plan: str
    user_id: str
    primary: QuotaWindow
    secondary: QuotaWindow
    token_ttl: float
    refresh_token: str = ""
    id_token: str = ""
    access_tokens: dict[str, float] = attrs.field(factory=dict)
    used_refresh_tokens: set[str] = attrs.field(factory=set)
    deactivated: bool = False
    weekly_only: bool = False  # no primary window (see the module docstring)
    turn_states: set[str] = attrs.field(factory=set)  # the x-codex-turn-state values it issued
    refresh_mode: str = "ok"  # ok | expired | invalidated: how POST /oauth/token answers
    refresh_count: int = 0
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    _serial: int = 0

    # -- tokens ---------------------------------------------------------------------------
    def mint(self, now: float) -> str:
        """Issue a new access token (and id token); old access tokens stay valid until exp."""
        self._serial += 1
        exp = int(now + self.token_ttl)
        auth = {
            "chatgpt_account_id": self.account_id,
            "chatgpt_plan_type": self.plan,
            "chatgpt_user_id": self.user_id,
            "user_id": self.user_id,
        }
        access = unsigned_jwt(
            {
                "aud": ["https://api.openai.com/v1"],
                "client_id": CODEX_CLIENT_ID,
                "exp": exp,
                "iat": int(now),
                "iss": "https://auth.openai.com",
                "jti": f"{self.account_id}-{self._serial}-{secrets.token_hex(4)}",
                "scp": ["openid", "profile", "email", "offline_access"],
                "sub": self.user_id,
                AUTH_CLAIM: auth,
                PROFILE_CLAIM: {"email": self.email, "email_verified": True},
            }
        )
        self.id_token = unsigned_jwt(
            {
                "aud": [CODEX_CLIENT_ID],
                "email": self.email,
                "email_verified": True,
                "exp": exp,
                "iat": int(now),
                "iss": "https://auth.openai.com",
                "sub": self.user_id,
                AUTH_CLAIM: {**auth, "organizations": []},
            }
        )
        self.access_tokens[access] = float(exp)
        return access

    def new_refresh_token(self) -> str:
        if self.refresh_token:
            self.used_refresh_tokens.add(self.refresh_token)
        self.refresh_token = f"rt_{self.account_id}_{secrets.token_urlsafe(18)}"
        return self.refresh_token

    def current_access_token(self, now: float) -> str:
        valid = [t for t, exp in self.access_tokens.items() if exp > now]
        return valid[-1] if valid else self.mint(now)

    def revoke_access_tokens(self) -> None:
        self.access_tokens.clear()

    def expire_access_tokens(self, now: float) -> None:
        for token in self.access_tokens:
            self.access_tokens[token] = now - 1

    def auth_json(self, now: float) -> dict[str, Any]:
        """A Codex ``auth.json`` for this account (what ``codex login`` would write)."""
        access = self.current_access_token(now)
        return {
            "auth_mode": "chatgpt",
            "OPENAI_API_KEY": None,
            "tokens": {
                "id_token": self.id_token,
                "access_token": access,
                "refresh_token": self.refresh_token,
                "account_id": self.account_id,
            },
            "last_refresh": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime(now)),
        }

    # -- quota ------------------------------------------------------------------------------
    def roll(self, now: float) -> None:
        self.primary.roll(now)
        self.secondary.roll(now)

    def windows(self) -> tuple[tuple[str, QuotaWindow], ...]:
        """The account's windows: the secondary alone for a ``weekly_only`` account."""
        if self.weekly_only:
            return (("secondary", self.secondary),)
        return (("primary", self.primary), ("secondary", self.secondary))

    def issue_turn_state(self) -> str:
        value = f"ts_{self.account_id}_{secrets.token_hex(8)}"
        self.turn_states.add(value)
        return value

    def blocking_window(self, now: float) -> tuple[str, QuotaWindow] | None:
        self.roll(now)
        for name, window in self.windows():
            if window.exhausted():
                return name, window
        return None

    def charge(self, input_tokens: int, output_tokens: int) -> None:
        self.primary.used += 1
        self.secondary.used += 1
        self.requests += 1
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens

    def rate_limit_headers(self, now: float) -> dict[str, str]:
        self.roll(now)
        headers: dict[str, str] = {}
        for name, window in self.windows():
            headers[f"x-codex-{name}-used-percent"] = f"{window.used_percent():.1f}"
            headers[f"x-codex-{name}-window-minutes"] = str(window.window_minutes)
            headers[f"x-codex-{name}-reset-at"] = str(int(window.reset_at))
            headers[f"x-codex-{name}-reset-after-seconds"] = str(max(0, int(window.reset_at - now)))
        if not self.weekly_only:
            headers["x-codex-primary-over-secondary-limit-percent"] = "0"
        headers["x-codex-credits-has-credits"] = "false"
        headers["x-codex-credits-unlimited"] = "false"
        headers["x-codex-credits-balance"] = "0"
        headers["x-codex-active-limit"] = "codex"
        blocked = self.blocking_window(now)
        if blocked is not None:
            headers["x-codex-rate-limit-reached-type"] = f"{blocked[0]}_window"
        return headers

    def rate_limits_event(self, now: float) -> dict[str, Any]:
        self.roll(now)

        def window(w: QuotaWindow) -> dict[str, Any]:
            return {
                "used_percent": w.used_percent(),
                "window_minutes": w.window_minutes,
                "reset_at": int(w.reset_at),
            }

        return {
            "type": "codex.rate_limits",
            "plan_type": self.plan,
            "rate_limits": {
                "primary": None if self.weekly_only else window(self.primary),
                "secondary": window(self.secondary),
            },
            "credits": {"has_credits": False, "unlimited": False, "balance": "0"},
            "metered_limit_name": "codex",
        }

    def usage_payload(self, now: float) -> dict[str, Any]:
        """The ``GET /wham/usage`` body."""
        self.roll(now)

        def window(w: QuotaWindow) -> dict[str, Any]:
            return {
                "used_percent": int(w.used_percent()),
                "limit_window_seconds": w.window_minutes * 60,
                "reset_after_seconds": max(0, int(w.reset_at - now)),
                "reset_at": int(w.reset_at),
            }

        blocked = self.blocking_window(now)
        return {
            "plan_type": self.plan,
            "rate_limit": {
                "allowed": blocked is None,
                "limit_reached": blocked is not None,
                "primary_window": None if self.weekly_only else window(self.primary),
                "secondary_window": window(self.secondary),
            },
            "credits": {"has_credits": False, "unlimited": False, "balance": "0"},
            "additional_rate_limits": [],
            "rate_limit_reached_type": {"kind": "rate_limit_reached"} if blocked else None,
        }

    def control_view(self, now: float) -> dict[str, Any]:
        """What ``GET /__mock__/accounts`` shows (tokens included: this is a test fixture)."""
        self.roll(now)
        return {
            "account_id": self.account_id,
            "email": self.email,
            "plan": self.plan,
            "deactivated": self.deactivated,
            "weekly_only": self.weekly_only,
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "refresh_count": self.refresh_count,
            "primary": self.primary.snapshot(now),
            "secondary": self.secondary.snapshot(now),
            "access_token": self.current_access_token(now),
            "refresh_token": self.refresh_token,
            "id_token": self.id_token,
        }


def make_account(
    index: int,
    now: float,
    *,
    plan: str = "plus",
    primary_limit: int = 1000,
    secondary_limit: int = 10000,
    token_ttl: float = 10 * 24 * 3600,
    account_id: str | None = None,
    email: str | None = None,
) -> MockAccount:
    account = MockAccount(
        account_id=account_id or f"acct-mock-{index}",
        email=email or f"user{index}@mock.example",
        plan=plan,
        user_id=f"user-mock-{index}",
        primary=QuotaWindow(300, primary_limit, now),
        secondary=QuotaWindow(10080, secondary_limit, now),
        token_ttl=token_ttl,
    )
    account.mint(now)
    account.new_refresh_token()
    return account
