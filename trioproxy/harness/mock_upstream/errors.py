"""The mock's error answers as plain values (sans-IO): the JSON envelopes the real backend
answers with, the ``Failure`` that carries one to the code that writes it, and the error of
each error fault and of a full quota window."""

from __future__ import annotations

from typing import Any

import attrs

from trioproxy.harness.mock_upstream import responses as plans
from trioproxy.harness.mock_upstream.accounts import MockAccount
from trioproxy.harness.mock_upstream.faults import Fault

DEACTIVATED_MESSAGE = (
    "Your OpenAI account has been deactivated, please check your email for more information. "
    "If you feel this is an error, contact us through our help center at help.openai.com."
)
TOKEN_INVALIDATED_MESSAGE = (
    "Your authentication token has been invalidated. Please try signing in again."
)
REFRESH_INVALIDATED_MESSAGE = (
    "Your refresh token has been invalidated. Please try signing in again."
)
CONNECTION_LIMIT_MESSAGE = (
    "Responses websocket connection limit reached (60 minutes). "
    "Create a new websocket connection to continue."
)


def err(
    message: str, type_: str, code: str | None, param: str | None = None, **extra: Any
) -> dict[str, Any]:
    """An error envelope: ``{"error": {message, type, param, code, ...}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code, **extra}}


def prev_not_found(response_id: str) -> dict[str, Any]:
    return err(
        f"Previous response with id '{response_id}' not found.",
        "invalid_request_error",
        "previous_response_not_found",
        "previous_response_id",
    )


@attrs.define(eq=False)
class Failure(Exception):
    """An error answer: HTTP status + envelope (or, on a socket, an ``error`` event)."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = attrs.field(factory=dict)


def invalid_request(
    message: str, code: str | None, param: str | None = None, status: int = 400
) -> Failure:
    """A ``Failure`` of type ``invalid_request_error``."""
    return Failure(status, err(message, "invalid_request_error", code, param))


# error faults that always answer the same: kind -> (status, message, type, code)
_FIXED_FAULTS: dict[str, tuple[int, str, str, str]] = {
    "token_invalidated": (
        401,
        TOKEN_INVALIDATED_MESSAGE,
        "invalid_request_error",
        "token_invalidated",
    ),
    "account_deactivated": (
        401,
        DEACTIVATED_MESSAGE,
        "invalid_request_error",
        "account_deactivated",
    ),
    "overloaded": (
        503,
        "Our servers are currently overloaded. Please try again later.",
        "server_error",
        "server_is_overloaded",
    ),
    "connection_limit": (
        400,
        CONNECTION_LIMIT_MESSAGE,
        "invalid_request_error",
        "websocket_connection_limit_reached",
    ),
}


def usage_limit_failure(
    account: MockAccount | None, now: float, resets_in: float, status: int
) -> Failure:
    """The ``usage_limit`` fault's answer; its headers agree with the body (the primary
    window full until ``resets_at``)."""
    resets_at = int(now + resets_in)
    headers = account.rate_limit_headers(now) if account else {}
    headers["x-codex-primary-used-percent"] = "100.0"
    headers["x-codex-primary-reset-at"] = str(resets_at)
    headers["x-codex-primary-reset-after-seconds"] = str(int(resets_in))
    return Failure(
        status,
        err(
            "The usage limit has been reached",
            "usage_limit_reached",
            None,
            plan_type=account.plan if account else "plus",
            resets_at=resets_at,
            resets_in_seconds=int(resets_in),
        ),
        headers,
    )


def fault_failure(fault: Fault, account: MockAccount | None, now: float) -> Failure | None:
    """The error answer of a fault that answers with an error (None for the others)."""
    kind, params = fault.kind, fault.params
    if kind == "usage_limit":
        return usage_limit_failure(account, now, params["resets_in"], int(params["status"]))
    if kind == "server_error":
        return Failure(
            int(params["status"]),
            err("An error occurred while processing your request.", "server_error", "server_error"),
        )
    if kind == "previous_response_not_found":
        return Failure(400, prev_not_found(plans.new_id("resp")))
    if kind == "connection_limit":
        return Failure(
            int(params["status"]) or 400,
            err(
                CONNECTION_LIMIT_MESSAGE,
                "invalid_request_error",
                "websocket_connection_limit_reached",
            ),
        )
    fixed = _FIXED_FAULTS.get(kind)
    if fixed is None:
        return None
    status, message, type_, code = fixed
    return Failure(status, err(message, type_, code))


def quota_failure(account: MockAccount, now: float) -> Failure | None:
    """``429 usage_limit_reached`` if one of the account's windows is full."""
    blocked = account.blocking_window(now)
    if blocked is None:
        return None
    _, window = blocked
    headers = account.rate_limit_headers(now)
    return Failure(
        429,
        err(
            "The usage limit has been reached",
            "usage_limit_reached",
            None,
            plan_type=account.plan,
            resets_at=int(window.reset_at),
            resets_in_seconds=max(0, round(window.reset_at - now)),
        ),
        headers,
    )
