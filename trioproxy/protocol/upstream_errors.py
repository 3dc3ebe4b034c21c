"""Who is at fault when upstream says no, and what the proxy does about it (sans-IO).

An upstream answer before the first byte reached the client is one of:

=================  ===========================================  =============================
kind               upstream said                                 proxy action
=================  ===========================================  =============================
usage_limit        429 ``usage_limit_reached`` (or                account exhausted until
                   ``response.failed`` with that code)           ``resets_at``; next account
unauthorized       401 (not deactivated)                         refresh once, retry; a second
                                                                 401 -> next account
deactivated        401/403 saying the account or workspace       account out of rotation;
                   is deactivated                                next account
forbidden          402, 403                                      next account
overloaded         503 ``server_is_overloaded`` / ``slow_down``  next account
server_error       5xx                                           next account
transport          connect/read failure, close before output     next account
continuity         400 ``previous_response_not_found``           re-anchor (WebSocket), else a
                                                                 sanitized answer
request            any other 4xx                                 pass through, no failover
=================  ===========================================  =============================
"""

from __future__ import annotations

import json
import re
from typing import Any

import attrs

# the account itself cannot serve: the pin is reset and the client is not blamed
ACCOUNT_LEVEL = frozenset({"usage_limit", "unauthorized", "deactivated", "forbidden", "reauth"})
FAILOVER_KINDS = frozenset(
    {
        "usage_limit",
        "unauthorized",
        "deactivated",
        "forbidden",
        "overloaded",
        "server_error",
        "transport",
    }
)
_DEACTIVATED = re.compile(
    r"deactivated|account has been disabled|workspace .*(disabled|deleted)", re.I
)
_RESPONSE_ID = re.compile(r"resp_[A-Za-z0-9_-]+")


@attrs.frozen
class UpstreamFailure:
    kind: str
    status: int
    body: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = ()
    resets_at: float | None = None

    @property
    def failover(self) -> bool:
        return self.kind in FAILOVER_KINDS

    @property
    def code(self) -> str | None:
        error = self.body.get("error")
        if isinstance(error, dict):
            return error.get("code") or error.get("type")
        return None


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        return {
            "error": {
                "message": raw[:500].decode("utf-8", "replace"),
                "type": "upstream_error",
                "code": None,
                "param": None,
            }
        }
    if isinstance(value, dict):
        if isinstance(value.get("error"), str):
            return {
                "error": {
                    "message": value.get("error_description") or value["error"],
                    "type": "upstream_error",
                    "code": value["error"],
                    "param": None,
                }
            }
        if "error" not in value and "detail" in value:
            return {
                "error": {
                    "message": str(value["detail"]),
                    "type": "upstream_error",
                    "code": None,
                    "param": None,
                }
            }
        return value
    return {
        "error": {
            "message": str(value)[:500],
            "type": "upstream_error",
            "code": None,
            "param": None,
        }
    }


def classify(
    status: int, body: dict[str, Any], headers: tuple[tuple[str, str], ...] = ()
) -> UpstreamFailure:
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    assert isinstance(error, dict)
    code = str(error.get("code") or "")
    type_ = str(error.get("type") or "")
    message = str(error.get("message") or "")
    resets_at = error.get("resets_at")
    resets = float(resets_at) if isinstance(resets_at, int | float) else None
    if status == 429 and "usage_limit_reached" in (code, type_):
        kind = "usage_limit"
    elif status in (401, 403) and (code == "account_deactivated" or _DEACTIVATED.search(message)):
        kind = "deactivated"
    elif status == 401:
        kind = "unauthorized"
    elif status in (402, 403):
        kind = "forbidden"
    elif status == 503 and code in ("server_is_overloaded", "slow_down"):
        kind = "overloaded"
    elif status >= 500:
        kind = "server_error"
    elif code == "websocket_connection_limit_reached":
        kind = "transport"  # reconnect (and re-anchor); the account is fine
    elif status == 400 and code == "previous_response_not_found":
        kind = "continuity"
    else:
        kind = "request"
    return UpstreamFailure(kind, status, body, headers, resets)


def classify_failed_event(event: dict[str, Any]) -> UpstreamFailure | None:
    """A ``response.failed`` (or WebSocket ``error``) event that arrived before any output."""
    if event.get("type") == "error":
        status = event.get("status") or event.get("status_code")
        if not isinstance(status, int):
            return None
        return classify(
            status, {"error": event.get("error") or {}}, tuple((event.get("headers") or {}).items())
        )
    response = event.get("response") or {}
    error = response.get("error") if isinstance(response, dict) else None
    if isinstance(error, dict) and error.get("code") == "usage_limit_reached":
        return UpstreamFailure(
            "usage_limit", 429, {"error": {**error, "type": "usage_limit_reached"}}
        )
    return None


def sanitize_message(message: str) -> str:
    """Remove upstream response ids from a message (a last line of defense)."""
    return _RESPONSE_ID.sub("resp_[redacted]", message)


def sanitize_envelope(body: dict[str, Any]) -> dict[str, Any]:
    error = body.get("error")
    if not isinstance(error, dict):
        return body
    clean = {k: (sanitize_message(v) if isinstance(v, str) else v) for k, v in error.items()}
    return {**body, "error": clean}
