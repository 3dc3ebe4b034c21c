"""The login side of ``auth.openai.com``: what the Codex CLI talks to when it signs in
(``codex-rs/login``; docs/accounts.md has the protocol with its sources).

Device code (``codex login --device-auth``)::

    POST /api/accounts/deviceauth/usercode  {"client_id"}
         -> 200 {"device_auth_id", "user_code", "interval": "5", "expires_at"}
    POST /api/accounts/deviceauth/token     {"device_auth_id", "user_code"}
         -> 403 {"error": {"code": "authorization_pending"}}   not approved yet
         -> 403 {"error": {"code": "slow_down"}}               polled before ``interval``
                                                               (the interval grows by 5 s)
         -> 400 {"error": {"code": "expired_token"}}           the code's time is up
         -> 400 {"error": {"code": "access_denied"}}           the user said no
         -> 200 {"authorization_code", "code_challenge", "code_verifier"}
    then the code exchange below, with ``redirect_uri = {issuer}/deviceauth/callback``.

The Codex CLI reads only the status of a poll: 403 and 404 mean "not yet", anything else
but 200 ends the login. The codes in the bodies are the mock's (RFC 8628's names).

Browser (``codex login``)::

    GET  /oauth/authorize?response_type=code&client_id&redirect_uri&scope&code_challenge
         &code_challenge_method=S256&state&...
         -> 200 a sign-in page while the request waits for the (mock) user; once approved,
            302 to ``redirect_uri?code=...&state=...`` (denied: ``?error=access_denied``)
    POST /oauth/token  grant_type=authorization_code&code&redirect_uri&client_id&code_verifier
         (form-encoded) -> 200 {"id_token", "access_token", "refresh_token", ...}

The code exchange checks PKCE (``BASE64URL(SHA256(code_verifier)) == code_challenge``), the
client id and the redirect URI; a code works once. The id token has the real claim layout
(``accounts.py``). The mock user is the control API: ``POST /__mock__/logins/approve``
(``{"account_id", "user_code"}`` or ``{"account_id", "state"}``) signs a pending device
code or authorize request in as a mock account, ``POST /__mock__/logins/deny`` refuses it,
``GET /__mock__/logins`` lists what waits.

Faults at ``on=usercode`` (the user code request), ``on=deviceauth`` (the polls),
``on=authorize`` and ``on=token``:
``slow`` (answer after ``first_event_delay``), ``server_error``, ``stall``, and
``slow_down``, ``denied``, ``expired_code`` (the poll answers so; ``denied`` at authorize
redirects with ``access_denied``; ``expired_code`` at the token endpoint answers
``invalid_grant``).
"""

from __future__ import annotations

import secrets
import string
from typing import Any
from urllib.parse import urlsplit

from trioproxy.harness.mock_upstream.accounts import CODEX_CLIENT_ID
from trioproxy.harness.mock_upstream.backend import MockBackend
from trioproxy.harness.mock_upstream.errors import Failure, err, invalid_request
from trioproxy.harness.mock_upstream.faults import Fault
from trioproxy.harness.mock_upstream.http_routes import apply_point_fault
from trioproxy.harness.mock_upstream.login_state import (
    DEVICE_CALLBACK_PATH,
    AuthorizeRequest,
    DeviceCode,
    LoginBook,
    s256,
)
from trioproxy.harness.mock_upstream.recorder import RequestRecord
from trioproxy.harness.mock_upstream.transport import Exchange, Request
from trioproxy.harness.mock_upstream.writers import reply

SLOW_DOWN_STEP = 5  # seconds added to a device code's interval by each slow_down (RFC 8628)
_USER_CODE_ALPHABET = string.ascii_uppercase + string.digits


def _user_code() -> str:
    pick = [secrets.choice(_USER_CODE_ALPHABET) for _ in range(8)]
    return "".join(pick[:4]) + "-" + "".join(pick[4:])


async def _point_fault(
    backend: MockBackend, on: str, exchange: Exchange, record: RequestRecord
) -> Fault | None:
    fault = await apply_point_fault(backend, on, exchange, record, None)
    if fault is not None and fault.kind == "slow":
        await exchange.pause(float(fault.params["first_event_delay"]))
    return fault


def _json_body(backend: MockBackend, request: Request) -> dict[str, Any]:
    body = backend.decode_json(request)
    if not isinstance(body, dict):
        raise invalid_request("The body must be a JSON object.", "invalid_request")
    return body


async def device_usercode(
    backend: MockBackend, request: Request, exchange: Exchange, record: RequestRecord
) -> None:
    body = _json_body(backend, request)
    record.body = body
    await _point_fault(backend, "usercode", exchange, record)
    if body.get("client_id") != CODEX_CLIENT_ID:
        raise invalid_request("Unknown client_id.", "invalid_client", "client_id")
    now = backend.clock.now()
    device = DeviceCode(
        device_auth_id=f"deviceauth_{secrets.token_hex(12)}",
        user_code=_user_code(),
        expires_at=now + backend.config.device_code_ttl,
        interval=backend.config.device_interval,
    )
    backend.logins.devices[device.device_auth_id] = device
    await reply(
        exchange,
        record,
        200,
        {
            "device_auth_id": device.device_auth_id,
            "user_code": device.user_code,
            "interval": str(device.interval),  # a string, as the real server sends it
            "expires_at": int(device.expires_at),
        },
    )


def _poll_failure(code: str, message: str, status: int) -> Failure:
    return Failure(status, err(message, "invalid_request_error", code))


PENDING = ("authorization_pending", "The user has not yet approved this device code.", 403)
SLOW_DOWN = ("slow_down", "Polling too fast; wait the interval between polls.", 403)
EXPIRED = ("expired_token", "The device code has expired. Start the login again.", 400)
DENIED = ("access_denied", "The user denied the device code.", 400)


async def device_token(
    backend: MockBackend, request: Request, exchange: Exchange, record: RequestRecord
) -> None:
    body = _json_body(backend, request)
    record.body = body
    book: LoginBook = backend.logins
    device = book.devices.get(str(body.get("device_auth_id")))
    if device is None or device.user_code != body.get("user_code"):
        raise invalid_request("Unknown device code.", "invalid_request", "device_auth_id")
    fault = await _point_fault(backend, "deviceauth", exchange, record)
    now = backend.clock.now()
    forced = fault.kind if fault is not None else None
    if forced == "expired_code" or now >= device.expires_at:
        book.devices.pop(device.device_auth_id, None)
        raise _poll_failure(*EXPIRED)
    if forced == "denied" or device.status == "denied":
        book.devices.pop(device.device_auth_id, None)
        raise _poll_failure(*DENIED)
    too_soon = (
        device.interval > 0
        and device.last_poll is not None
        and now - device.last_poll < device.interval * 0.9
    )
    device.last_poll = now
    if forced == "slow_down" or (too_soon and device.status == "pending"):
        device.interval += SLOW_DOWN_STEP
        raise _poll_failure(*SLOW_DOWN)
    if device.status != "approved":
        raise _poll_failure(*PENDING)
    assert device.account_id is not None
    del book.devices[device.device_auth_id]
    verifier = secrets.token_urlsafe(48)
    challenge = s256(verifier)
    code = book.new_code(device.account_id, DEVICE_CALLBACK_PATH, challenge, now, device=True)
    record.account = device.account_id
    await reply(
        exchange,
        record,
        200,
        {"authorization_code": code, "code_challenge": challenge, "code_verifier": verifier},
    )


def _redirect_allowed(uri: str) -> bool:
    """Loopback callbacks on ``/auth/callback`` (the real allow-list names ports 1455 and
    1457; the mock takes any port, so tests can use free ones)."""
    parts = urlsplit(uri)
    return (
        parts.scheme == "http"
        and parts.hostname in ("localhost", "127.0.0.1")
        and parts.path == "/auth/callback"
    )


async def authorize(
    backend: MockBackend, request: Request, exchange: Exchange, record: RequestRecord
) -> None:
    params = {k: v[-1] for k, v in request.query.items()}
    record.body = {k: v for k, v in params.items() if k not in ("state", "code_challenge")}
    fault = await _point_fault(backend, "authorize", exchange, record)
    for name, expected in (("response_type", "code"), ("code_challenge_method", "S256")):
        if params.get(name) != expected:
            raise invalid_request(f"{name} must be {expected}.", "invalid_request", name)
    if params.get("client_id") != CODEX_CLIENT_ID:
        raise invalid_request("Unknown client_id.", "invalid_client", "client_id")
    for name in ("state", "code_challenge", "redirect_uri"):
        if not params.get(name):
            raise invalid_request(f"{name} is missing.", "invalid_request", name)
    if not _redirect_allowed(params["redirect_uri"]):
        raise invalid_request("redirect_uri is not allowed.", "invalid_request", "redirect_uri")
    book: LoginBook = backend.logins
    pending = book.authorizes.get(params["state"])
    if pending is None:
        pending = book.authorizes[params["state"]] = AuthorizeRequest(
            state=params["state"],
            redirect_uri=params["redirect_uri"],
            code_challenge=params["code_challenge"],
            scope=params.get("scope", ""),
            params=params,
        )
    if fault is not None and fault.kind == "denied":
        pending.status = "denied"
    if pending.status == "pending":
        page = (
            b"<!doctype html><title>Sign in - mock ChatGPT</title>"
            b"<p>Waiting for the mock user: POST /__mock__/logins/approve"
            b' {"account_id": ..., "state": ...}</p>'
        )
        record.status = 200
        await exchange.respond(200, [("content-type", "text/html; charset=utf-8")], page)
        return
    del book.authorizes[pending.state]
    record.status = 302
    await exchange.respond(302, [("location", pending.redirect())], b"")


async def device_page(
    backend: MockBackend, request: Request, exchange: Exchange, record: RequestRecord
) -> None:
    """The verification URL the user opens (``{issuer}/codex/device``)."""
    record.status = 200
    page = (
        b"<!doctype html><title>Enter code - mock ChatGPT</title><p>Enter your one-time code.</p>"
    )
    await exchange.respond(200, [("content-type", "text/html; charset=utf-8")], page)


async def exchange_code(
    backend: MockBackend,
    body: dict[str, Any],
    exchange: Exchange,
    record: RequestRecord,
    fault: Fault | None,
) -> None:
    """``grant_type=authorization_code`` at ``POST /oauth/token``."""
    book: LoginBook = backend.logins
    code = str(body.get("code") or "")
    grant = book.codes.get(code)
    if fault is not None and fault.kind == "expired_code" and grant is not None:
        del book.codes[code]
        raise invalid_request("The authorization code has expired.", "invalid_grant", status=400)
    if grant is None:
        raise invalid_request("Invalid or already used authorization code.", "invalid_grant")
    now = backend.clock.now()
    del book.codes[code]  # a code works once, whatever the outcome
    if now >= grant.expires_at:
        raise invalid_request("The authorization code has expired.", "invalid_grant")
    if body.get("client_id") != CODEX_CLIENT_ID:
        raise invalid_request("Unknown client_id.", "invalid_client", "client_id")
    redirect_uri = str(body.get("redirect_uri") or "")
    if grant.device:
        redirect_ok = urlsplit(redirect_uri).path == DEVICE_CALLBACK_PATH
    else:
        redirect_ok = redirect_uri == grant.redirect_uri
    if not redirect_ok:
        raise invalid_request(
            "redirect_uri does not match the authorization request.", "invalid_grant"
        )
    if s256(str(body.get("code_verifier") or "")) != grant.code_challenge:
        raise invalid_request("code_verifier does not match the code_challenge.", "invalid_grant")
    account = backend.accounts.get(grant.account_id)
    if account is None:
        raise invalid_request("The account no longer exists.", "invalid_grant")
    record.account = account.account_id
    access = account.mint(now)
    refresh = account.new_refresh_token()
    book.exchanges += 1
    await reply(
        exchange,
        record,
        200,
        {
            "id_token": account.id_token,
            "access_token": access,
            "refresh_token": refresh,
            "expires_in": int(account.token_ttl),
            "token_type": "Bearer",
            "scope": "openid profile email offline_access",
        },
    )


def redacted(body: Any) -> Any:
    """A token request as recorded: codes, verifiers and refresh tokens hidden."""
    if not isinstance(body, dict):
        return body
    hidden = ("refresh_token", "code", "code_verifier")
    return {k: ("<redacted>" if k in hidden else v) for k, v in body.items()}
