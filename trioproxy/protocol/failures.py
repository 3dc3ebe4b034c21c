"""Who is at fault when upstream says no, and what the proxy does about it (sans-IO).

Every way a turn can fail before its first event reached the client becomes one
:class:`UpstreamFailure`, at the transport edge (``sessions/links.py``): an HTTP error
answer, a refused WebSocket handshake, an ``error`` / ``response.failed`` event that came
first, a connection that failed or closed, a token that could not be refreshed. Its class
says who is at fault, and its :class:`Kind` what the failover engine
(``sessions/failover.py``) does, from this one table:

==================  ==========================================  =======================  ========
kind                upstream said                               the pool learns          then
==================  ==========================================  =======================  ========
usage_limit         429 ``usage_limit_reached`` (or an           exhausted until          next
                    ``error``/``response.failed`` event with     ``resets_at``            account
                    that code)
unauthorized        401 (not deactivated), after one refresh     -                        next
deactivated         401/403 saying the account or workspace      deactivated              next
                    is deactivated
forbidden           402, 403                                     -                        next
reauth              the token refresh failed for good            reauth_required (by      next
                                                                 the token manager)
token_unavailable   the token refresh failed for now (5xx,       cooling down (by the     next
                    timeout)                                     token manager)
overloaded          503 ``server_is_overloaded`` / ``slow_down``  -                        retry
server_error        5xx                                          -                        retry
transport           connect/read failure, a close before         -                        retry
                    output, ``websocket_connection_limit_
                    reached``
continuity          400 ``previous_response_not_found``          -                        recover
request             any other 4xx                                -                        answer
==================  ==========================================  =======================  ========

An ``error`` or ``response.failed`` event that comes in a 200 stream before any output is
classified as the HTTP answer it stands for (:func:`classify_event`): by its ``status`` when
it has one, else by its code (``server_is_overloaded`` is a 503, ``server_error`` a 500...).

``next``: the account cannot serve; it is excluded for this request and a conversation's
pin to it is reset. ``retry``: the account is fine; the next attempt goes to another
account, or to the same one when the conversation is pinned to it. ``recover``: the turn
rebuilds its input (re-anchoring) and tries again. ``answer``: the client gets the error.

The classes: :class:`AccountFailure` (``next`` kinds: the account is at fault),
:class:`ServiceFailure` (``retry`` kinds: upstream or the way to it), :class:`RequestFailure`
(``recover`` and ``answer``: the request itself).
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from typing import Any

from trioproxy.protocol.echoed import ECHOED
from trioproxy.protocol.errors import ProxyError, error_envelope, upstream_envelope


class Kind(enum.Enum):
    USAGE_LIMIT = "usage_limit"
    UNAUTHORIZED = "unauthorized"
    DEACTIVATED = "deactivated"
    FORBIDDEN = "forbidden"
    REAUTH = "reauth"
    TOKEN_UNAVAILABLE = "token_unavailable"
    OVERLOADED = "overloaded"
    SERVER_ERROR = "server_error"
    TRANSPORT = "transport"
    CONTINUITY = "continuity"
    REQUEST = "request"


class Then(enum.Enum):
    """What the failover engine does after a failure (the table's last column)."""

    NEXT_ACCOUNT = "next"
    RETRY = "retry"
    RECOVER = "recover"
    ANSWER = "answer"


THEN: Mapping[Kind, Then] = {
    Kind.USAGE_LIMIT: Then.NEXT_ACCOUNT,
    Kind.UNAUTHORIZED: Then.NEXT_ACCOUNT,
    Kind.DEACTIVATED: Then.NEXT_ACCOUNT,
    Kind.FORBIDDEN: Then.NEXT_ACCOUNT,
    Kind.REAUTH: Then.NEXT_ACCOUNT,
    Kind.TOKEN_UNAVAILABLE: Then.NEXT_ACCOUNT,
    Kind.OVERLOADED: Then.RETRY,
    Kind.SERVER_ERROR: Then.RETRY,
    Kind.TRANSPORT: Then.RETRY,
    Kind.CONTINUITY: Then.RECOVER,
    Kind.REQUEST: Then.ANSWER,
}


class UpstreamFailure(Exception):
    """A turn failed before any output reached the client (see the module docstring).

    ``body`` is the envelope as upstream gave it (the client only ever sees it through
    :meth:`answer`, which sanitizes it)."""

    def __init__(
        self,
        kind: Kind,
        status: int,
        body: dict[str, Any],
        headers: tuple[tuple[str, str], ...] = (),
        resets_at: float | None = None,
    ) -> None:
        super().__init__(kind.value)
        self.kind = kind
        self.status = status
        self.body = body
        self.headers = headers
        self.resets_at = resets_at

    @property
    def then(self) -> Then:
        return THEN[self.kind]

    @property
    def code(self) -> str | None:
        error = self.body.get("error")
        if isinstance(error, dict):
            return error.get("code") or error.get("type")
        return None

    @property
    def message(self) -> str:
        error = self.body.get("error")
        return str(error.get("message") or "") if isinstance(error, dict) else ""

    def answer(self) -> ProxyError:
        """This failure as the client's answer: the status and sanitized envelope, with the
        rate-limit headers upstream sent along (not an account's echoed state: the client
        would send it to whichever account serves its retry)."""
        return ProxyError(
            self.status,
            upstream_envelope(self.body),
            [(k, v) for k, v in self.headers if k.startswith("x-codex-") and k not in ECHOED],
        )


class AccountFailure(UpstreamFailure):
    """The account cannot serve now (usage limit, credentials, deactivated, forbidden)."""


class ServiceFailure(UpstreamFailure):
    """Upstream, or the way to it, failed; the account is fine."""


class RequestFailure(UpstreamFailure):
    """The request itself was refused (a 4xx, or an anchor upstream does not hold)."""


_CLASS: Mapping[Then, type[UpstreamFailure]] = {
    Then.NEXT_ACCOUNT: AccountFailure,
    Then.RETRY: ServiceFailure,
    Then.RECOVER: RequestFailure,
    Then.ANSWER: RequestFailure,
}


def failure(
    kind: Kind,
    status: int,
    body: dict[str, Any],
    headers: tuple[tuple[str, str], ...] = (),
    resets_at: float | None = None,
) -> UpstreamFailure:
    """The failure of ``kind``, of the class the table gives it."""
    return _CLASS[THEN[kind]](kind, status, body, headers, resets_at)


def transport_failure(message: str) -> UpstreamFailure:
    """The connection failed or closed before output (the proxy's own words)."""
    return failure(
        Kind.TRANSPORT, 502, error_envelope(message, "upstream_error", "upstream_unavailable")
    )


def refresh_failure(reason: str, *, permanent: bool) -> UpstreamFailure:
    """The account's token could not be refreshed (for good, or for now)."""
    kind = Kind.REAUTH if permanent else Kind.TOKEN_UNAVAILABLE
    return failure(kind, 401, error_envelope(reason, "upstream_error", "token_refresh_failed"))


_DEACTIVATED = re.compile(
    r"deactivated|account has been disabled|workspace .*(disabled|deleted)", re.I
)


def parse_body(raw: bytes) -> dict[str, Any]:
    """An upstream error body as an envelope, whatever shape it came in (JSON envelope,
    OAuth-style ``{"error": "code"}``, ``{"detail": ...}``, or not JSON at all)."""
    try:
        value = json.loads(raw)
    except ValueError:
        return error_envelope(raw[:500].decode("utf-8", "replace"), "upstream_error")
    if not isinstance(value, dict):
        return error_envelope(str(value)[:500], "upstream_error")
    if isinstance(value.get("error"), str):
        return error_envelope(
            value.get("error_description") or value["error"], "upstream_error", value["error"]
        )
    if "error" not in value and "detail" in value:
        return error_envelope(str(value["detail"]), "upstream_error")
    return value


def classify(
    status: int, body: dict[str, Any], headers: tuple[tuple[str, str], ...] = ()
) -> UpstreamFailure:
    """The failure an upstream error answer (status and envelope) is."""
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    assert isinstance(error, dict)
    code = str(error.get("code") or "")
    type_ = str(error.get("type") or "")
    message = str(error.get("message") or "")
    resets_at = error.get("resets_at")
    resets = float(resets_at) if isinstance(resets_at, int | float) else None
    if status == 429 and "usage_limit_reached" in (code, type_):
        kind = Kind.USAGE_LIMIT
    elif status in (401, 403) and (code == "account_deactivated" or _DEACTIVATED.search(message)):
        kind = Kind.DEACTIVATED
    elif status == 401:
        kind = Kind.UNAUTHORIZED
    elif status in (402, 403):
        kind = Kind.FORBIDDEN
    elif status == 503 and code in ("server_is_overloaded", "slow_down"):
        kind = Kind.OVERLOADED
    elif status >= 500:
        kind = Kind.SERVER_ERROR
    elif code == "websocket_connection_limit_reached":
        kind = Kind.TRANSPORT  # reconnect (and re-anchor); the account is fine
    elif status == 400 and code == "previous_response_not_found":
        kind = Kind.CONTINUITY
    else:
        kind = Kind.REQUEST
    return failure(kind, status, body, headers, resets)


#: The HTTP status an error event that carries none stands for, by its code: the codes the
#: backend also answers with an HTTP error. An event with another code and no status is not
#: one the proxy acts on (the client gets it as it came).
EVENT_STATUS: Mapping[str, int] = {
    "usage_limit_reached": 429,
    "server_is_overloaded": 503,
    "slow_down": 503,
    "server_error": 500,
    "internal_server_error": 500,
    "websocket_connection_limit_reached": 400,
    "previous_response_not_found": 400,
}


def _event_status(error: Mapping[str, Any]) -> int | None:
    for key in ("code", "type"):
        status = EVENT_STATUS.get(str(error.get(key) or ""))
        if status is not None:
            return status
    return None


def classify_event(event: Mapping[str, Any]) -> UpstreamFailure | None:
    """The failure an ``error`` or ``response.failed`` event is, when it came before any
    output; None for an event that is not an error the proxy can act on.

    An ``error`` event with a ``status`` (``status_code``) is classified as an HTTP answer
    of that status; one without, and a ``response.failed``, by its code (``EVENT_STATUS``).
    A ``response.failed`` for a usage limit is a usage limit whatever its ``type``."""
    if event.get("type") == "error":
        error = event.get("error")
        error = error if isinstance(error, dict) else {}
        status = event.get("status") or event.get("status_code")
        if not isinstance(status, int) or isinstance(status, bool):
            status = _event_status(error)
            if status is None:
                return None
        headers = event.get("headers")
        return classify(
            status,
            {"error": error},
            tuple(headers.items()) if isinstance(headers, dict) else (),
        )
    response = event.get("response") or {}
    error = response.get("error") if isinstance(response, dict) else None
    if not isinstance(error, dict):
        return None
    if error.get("code") == "usage_limit_reached":
        resets = error.get("resets_at")
        return failure(
            Kind.USAGE_LIMIT,
            429,
            {"error": {**error, "type": "usage_limit_reached"}},
            resets_at=float(resets) if isinstance(resets, int | float) else None,
        )
    status = _event_status(error)
    return classify(status, {"error": error}) if status is not None else None
