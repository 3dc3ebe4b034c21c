"""Codex ``auth.json`` data: turning it into an :class:`AccountRecord` (files and other
proxies' stores are found and read by ``peers.py``).

The shape the Codex CLI writes when it signs in with ChatGPT::

    {"auth_mode": "chatgpt", "OPENAI_API_KEY": null,
     "tokens": {"id_token": JWT, "access_token": JWT, "refresh_token": "...", "account_id": "..."},
     "last_refresh": "2026-11-21T09:44:06.123456Z"}

Claims are read from the JWTs without checking signatures (the proxy is not the audience;
upstream checks them), so unsigned ``alg: none`` tokens are fine. Error messages name the
file's problem and never quote token text.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from trioproxy.store.records import AccountRecord

AUTH_CLAIM = "https://api.openai.com/auth"
PROFILE_CLAIM = "https://api.openai.com/profile"


class AuthFileError(ValueError):
    """An auth.json cannot be imported; the message says why (without token text)."""


def jwt_claims(token: str, *, name: str = "token") -> dict[str, Any]:
    """The claims of a JWT, signature not checked; :class:`AuthFileError` if unreadable."""
    import jwt  # here: PyJWT pulls in much of ``cryptography``, which most commands never need

    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise AuthFileError(f"{name} is not a readable JWT ({type(exc).__name__})") from None
    if not isinstance(claims, dict):
        raise AuthFileError(f"{name} is not a readable JWT (claims are not an object)")
    return claims


def access_token_expiry(token: str) -> float | None:
    """The ``exp`` claim of an access token (unix seconds), None if it has none or is not a
    JWT (for tokens returned by a refresh, where failing would lose the new token)."""
    try:
        exp = jwt_claims(token).get("exp")
    except AuthFileError:
        return None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


def parse_auth_json(data: Mapping[str, Any], *, now: float) -> AccountRecord:
    """An active :class:`AccountRecord` (created and updated at ``now``) from auth.json data.

    Error handling: an API-key auth.json, missing tokens, tokens that are not JWTs and a
    missing account id are :class:`AuthFileError`.
    """
    if not isinstance(data, Mapping):
        raise AuthFileError("not an auth.json: the JSON is not an object")
    tokens = data.get("tokens")
    if not tokens:
        if data.get("OPENAI_API_KEY"):
            raise AuthFileError(
                "this auth.json holds an API key, not ChatGPT tokens "
                "(sign in with `codex login` and choose ChatGPT)"
            )
        raise AuthFileError('not a ChatGPT auth.json: no "tokens"')
    if not isinstance(tokens, Mapping):
        raise AuthFileError('not a ChatGPT auth.json: "tokens" is not an object')
    for field in ("access_token", "refresh_token"):
        if not isinstance(tokens.get(field), str) or not tokens[field]:
            raise AuthFileError(f"tokens.{field} is missing")
    access_token: str = tokens["access_token"]
    refresh_token: str = tokens["refresh_token"]
    id_token = tokens.get("id_token") or None
    if id_token is not None and not isinstance(id_token, str):
        raise AuthFileError("tokens.id_token is not a string")

    access = jwt_claims(access_token, name="tokens.access_token")
    identity = jwt_claims(id_token, name="tokens.id_token") if id_token else {}
    auth = {**_object(access.get(AUTH_CLAIM)), **_object(identity.get(AUTH_CLAIM))}
    profile = {**_object(access.get(PROFILE_CLAIM)), **_object(identity.get(PROFILE_CLAIM))}

    account_id = _text(tokens.get("account_id")) or _text(auth.get("chatgpt_account_id"))
    if not account_id:
        raise AuthFileError("no account id (tokens.account_id or the chatgpt_account_id claim)")
    exp = access.get("exp")
    return AccountRecord(
        account_id=account_id,
        email=_text(identity.get("email")) or _text(profile.get("email")),
        plan=_text(auth.get("chatgpt_plan_type")),
        user_id=_text(auth.get("chatgpt_user_id")) or _text(auth.get("user_id")),
        access_token=access_token,
        refresh_token=refresh_token,
        id_token=id_token,
        access_expires_at=float(exp) if isinstance(exp, int | float) else None,
        last_refresh=_last_refresh(data.get("last_refresh"), access, now),
        state="active",
        state_reason=None,
        created_at=now,
        updated_at=now,
    )


def _object(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _last_refresh(value: object, access: Mapping[str, Any], now: float) -> float:
    """``last_refresh`` (ISO 8601, naive = UTC) as unix seconds; when absent or unreadable, the
    access token's ``iat``, else ``now``."""
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            return parsed.timestamp()
    iat = access.get("iat")
    return float(iat) if isinstance(iat, int | float) else now
