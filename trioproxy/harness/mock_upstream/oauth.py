"""``POST /oauth/token``: the refresh grant of ``auth.openai.com``, with rotation, and the
authorization-code exchange that ends a login (``login.py``).

A refresh token is single use: a successful refresh mints a new access token and a new
refresh token, and the old refresh token is spent (presenting it again answers
``refresh_token_reused``). An account's ``refresh_mode`` (control API) makes its refresh
token expired or invalidated instead."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

import trio

from trioproxy.harness.mock_upstream.accounts import MockAccount
from trioproxy.harness.mock_upstream.backend import MockBackend
from trioproxy.harness.mock_upstream.errors import (
    REFRESH_INVALIDATED_MESSAGE,
    Failure,
    invalid_request,
)
from trioproxy.harness.mock_upstream.http_routes import apply_point_fault
from trioproxy.harness.mock_upstream.login import exchange_code, redacted
from trioproxy.harness.mock_upstream.recorder import RequestRecord
from trioproxy.harness.mock_upstream.transport import Exchange, Request
from trioproxy.harness.mock_upstream.writers import reply

REUSED_MESSAGE = (
    "Your refresh token has already been used to generate a new access token. "
    "Please try signing in again."
)


def token_request(backend: MockBackend, request: Request) -> Any:
    """The body of a token request: form-encoded or JSON."""
    content_type = (request.header("content-type") or "").lower()
    if "application/x-www-form-urlencoded" in content_type:
        return dict(parse_qsl(request.body.decode("utf-8", "replace")))
    return backend.decode_json(request)


def refusal(account: MockAccount | None, reused: MockAccount | None) -> Failure | None:
    """Why the refresh token is refused: spent, unknown, or its account's ``refresh_mode``."""
    if account is None:
        if reused is not None:
            return invalid_request(REUSED_MESSAGE, "refresh_token_reused", status=401)
        return invalid_request(REFRESH_INVALIDATED_MESSAGE, "refresh_token_invalidated", status=401)
    if account.refresh_mode == "expired":
        return invalid_request(
            "Your refresh token has expired. Please try signing in again.",
            "refresh_token_expired",
            status=401,
        )
    if account.refresh_mode == "invalidated":
        return invalid_request(REFRESH_INVALIDATED_MESSAGE, "refresh_token_invalidated", status=401)
    return None


async def oauth_token(
    backend: MockBackend, request: Request, exchange: Exchange, record: RequestRecord
) -> None:
    body = token_request(backend, request)
    record.body = redacted(body)
    if isinstance(body, dict) and body.get("grant_type") == "authorization_code":
        fault = await apply_point_fault(backend, "token", exchange, record, None)
        if fault is not None and fault.kind == "slow":
            await trio.sleep(fault.params["first_event_delay"])
        await exchange_code(backend, body, exchange, record, fault)
        return
    if (
        not isinstance(body, dict)
        or body.get("grant_type") != "refresh_token"
        or not body.get("refresh_token")
    ):
        raise invalid_request("Unsupported grant_type or missing refresh_token.", "invalid_request")
    token = str(body["refresh_token"])
    accounts = backend.accounts.values()
    account = next((a for a in accounts if a.refresh_token == token), None)
    reused = next((a for a in accounts if token in a.used_refresh_tokens), None)
    known = account or reused
    record.account = known.account_id if known is not None else None
    fault = await apply_point_fault(backend, "token", exchange, record, known)
    failure = refusal(account, reused)
    if failure is not None:
        raise failure
    assert account is not None
    access = account.mint(backend.clock.now())
    refresh = account.new_refresh_token()
    account.refresh_count += 1
    backend.stats.refreshes += 1
    if fault is not None and fault.kind == "slow":
        # the refresh took effect (the old refresh token is spent), the answer is late:
        # a client that gives up now has lost the only valid refresh token
        await trio.sleep(fault.params["first_event_delay"])
    await reply(
        exchange,
        record,
        200,
        {
            "access_token": access,
            "id_token": account.id_token,
            "refresh_token": refresh,
            "expires_in": int(account.token_ttl),
            "token_type": "Bearer",
            "scope": "openid profile email offline_access",
        },
    )
