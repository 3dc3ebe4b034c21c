"""Signing a ChatGPT account in the way the Codex CLI does (``codex-rs/login``;
docs/accounts.md has the protocol and its sources): the device code flow and the browser
flow with PKCE, against ``auth_base_url``.

Theory of operation
-------------------
The sans-IO half builds and reads what goes over the wire: :func:`new_pkce` and
:func:`new_state` (random, URL-safe), :func:`authorize_url`, :func:`code_from_redirect`
(the ``code`` of a callback or pasted redirect URL, after checking its ``state``),
:func:`classify_poll` (what a device-code poll answer means) and :func:`auth_json` (the
auth.json the Codex CLI would write for the tokens, so a login is stored exactly like an
import).

:class:`AuthClient` does the three HTTP calls with the shared httpx client: the user code
request, one poll, the code exchange. :func:`wait_for_device_grant` polls at the server's
interval (``slow_down`` adds ``SLOW_DOWN_STEP`` seconds, as RFC 8628 says) until the code is
approved, denied or expired. :func:`serve_callback` is the loopback listener of the browser
flow: it binds 127.0.0.1 only and lives exactly as long as the task that runs it.

Resource handling: nothing here starts a task of its own; the listener is a task of the
caller's nursery (a login's, in ``logins.py``), so it is closed when the login ends, and
each of its connections is answered and closed within ``CALLBACK_READ_TIMEOUT``.

Error handling: every failure is a :class:`LoginError` with a ``code`` and a message meant
for the operator. Tokens, codes, verifiers and states never appear in messages or logs.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import attrs
import h11
import httpx
import trio

from trioproxy.accounts.refresh import CLIENT_ID, oauth_error_code
from trioproxy.logs import get_logger

SCOPE = "openid profile email offline_access api.connectors.read api.connectors.invoke"
ORIGINATOR = "codex_cli_rs"
CALLBACK_PATH = "/auth/callback"
DEFAULT_CALLBACK_PORT = 1455
DEVICE_MAX_WAIT = 15 * 60.0  # the Codex CLI gives up on a device code after 15 minutes
SLOW_DOWN_STEP = 5.0
MIN_POLL_INTERVAL = 0.1  # a server that asks for 0 s is still not polled in a tight loop
MAX_POLLS = 100_000  # with the deadline, bounds the poll loop
CALLBACK_READ_TIMEOUT = 10.0
CALLBACK_MAX_HEAD = 16 * 1024
MAX_CALLBACK_CONNECTIONS = 1000  # per listener, with the login's deadline

log = get_logger("trioproxy.login")


class LoginError(Exception):
    """A login cannot go on (or this step of it failed); ``code`` says how."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@attrs.frozen(repr=False)
class Pkce:
    verifier: str
    challenge: str

    def __repr__(self) -> str:
        return "Pkce(<hidden>)"


def s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def new_pkce() -> Pkce:
    """64 random bytes as URL-safe base64 (no padding), and their S256 challenge."""
    verifier = base64.urlsafe_b64encode(secrets.token_bytes(64)).rstrip(b"=").decode()
    return Pkce(verifier, s256(verifier))


def new_state() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def redirect_uri(port: int) -> str:
    return f"http://localhost:{port}{CALLBACK_PATH}"


def authorize_url(auth_base_url: str, redirect: str, pkce: Pkce, state: str) -> str:
    """The URL the operator opens, with the parameters the Codex CLI sends."""
    query = {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": redirect,
        "scope": SCOPE,
        "code_challenge": pkce.challenge,
        "code_challenge_method": "S256",
        "id_token_add_organizations": "true",
        "codex_cli_simplified_flow": "true",
        "state": state,
        "originator": ORIGINATOR,
    }
    return f"{auth_base_url.rstrip('/')}/oauth/authorize?{urlencode(query)}"


def code_from_redirect(url: str, state: str) -> str:
    """The authorization code of a redirect URL (a full URL, or its path and query); the
    state must be ``state``. ``LoginError``: ``login_state_mismatch``, ``login_denied``
    (the redirect carries an ``error``) or ``invalid_redirect_url``."""
    parts = urlsplit(url.strip())
    if parts.path and parts.path != CALLBACK_PATH:
        raise LoginError("invalid_redirect_url", f"not a login callback URL (path {parts.path})")
    params = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if not params:
        raise LoginError("invalid_redirect_url", "the URL has no code and state")
    if not secrets.compare_digest(params.get("state", ""), state):
        raise LoginError("login_state_mismatch", "the URL's state is not this login's")
    if params.get("error"):
        detail = params.get("error_description") or params["error"]
        raise LoginError("login_denied", f"the sign-in was refused: {detail[:200]}")
    if not params.get("code"):
        raise LoginError("invalid_redirect_url", "the URL has no authorization code")
    return params["code"]


@attrs.frozen(repr=False)
class Tokens:
    id_token: str
    access_token: str
    refresh_token: str

    def __repr__(self) -> str:
        return "Tokens(<hidden>)"


def auth_json(tokens: Tokens, now: float) -> dict[str, Any]:
    """What ``codex login`` writes to auth.json for these tokens (its account id is read
    from the id token's ``chatgpt_account_id`` claim by the import)."""
    from datetime import UTC, datetime

    return {
        "auth_mode": "chatgpt",
        "OPENAI_API_KEY": None,
        "tokens": {
            "id_token": tokens.id_token,
            "access_token": tokens.access_token,
            "refresh_token": tokens.refresh_token,
        },
        "last_refresh": datetime.fromtimestamp(now, UTC).isoformat().replace("+00:00", "Z"),
    }


@attrs.frozen(repr=False)
class DeviceCode:
    device_auth_id: str
    user_code: str
    verification_url: str
    interval: float
    expires_at: float | None  # unix seconds, when the server says

    def __repr__(self) -> str:
        return f"DeviceCode({self.user_code})"


@attrs.frozen(repr=False)
class Grant:
    """What an approved device code gives: an authorization code and its PKCE pair."""

    code: str
    pkce: Pkce

    def __repr__(self) -> str:
        return "Grant(<hidden>)"


PENDING, SLOW_DOWN, EXPIRED, DENIED, FAILED = (
    "pending",
    "slow_down",
    "expired",
    "denied",
    "failed",
)


def classify_poll(status: int, body: Any) -> str:
    """What a device-code poll answered: ``pending`` (403/404, as the Codex CLI reads
    them), ``slow_down``, ``expired``, ``denied`` or ``failed`` (anything else)."""
    code = oauth_error_code(body)
    if code == "slow_down":
        return SLOW_DOWN
    if code in ("expired_token", "token_expired", "deviceauth_expired"):
        return EXPIRED
    if code in ("access_denied", "authorization_declined"):
        return DENIED
    if status in (403, 404):
        return PENDING
    return FAILED


@attrs.define(eq=False)
class AuthClient:
    """The login calls to ``{auth_base_url}``."""

    http: httpx.AsyncClient
    auth_base_url: str
    timeout: float = 30.0

    @property
    def base(self) -> str:
        return self.auth_base_url.rstrip("/")

    async def _post(self, path: str, **kwargs: Any) -> httpx.Response:
        try:
            with trio.fail_after(self.timeout):
                return await self.http.post(f"{self.base}{path}", **kwargs)
        except (httpx.HTTPError, trio.TooSlowError) as exc:
            raise LoginError(
                "auth_server_unavailable",
                f"the auth server could not be reached ({type(exc).__name__})",
            ) from None

    async def request_device_code(self, now: float) -> DeviceCode:
        response = await self._post(
            "/api/accounts/deviceauth/usercode", json={"client_id": CLIENT_ID}
        )
        if response.status_code == 404:
            raise LoginError("login_failed", "the auth server does not offer device code login")
        data = _json(response)
        if response.status_code != 200 or not isinstance(data, dict):
            raise LoginError("login_failed", _refusal("the user code request", response, data))
        user_code = data.get("user_code") or data.get("usercode")
        device_auth_id = data.get("device_auth_id")
        if not isinstance(user_code, str) or not isinstance(device_auth_id, str):
            raise LoginError("login_failed", "the auth server's user code answer is incomplete")
        try:
            interval = float(str(data.get("interval", "5")).strip() or 5)
        except ValueError:
            interval = 5.0
        expires_at = data.get("expires_at")
        expires_in = data.get("expires_in")
        if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
            expires_at = now + float(expires_in)
        return DeviceCode(
            device_auth_id=device_auth_id,
            user_code=user_code,
            verification_url=f"{self.base}/codex/device",
            interval=max(0.0, interval),
            expires_at=float(expires_at) if isinstance(expires_at, int | float) else None,
        )

    async def poll(self, device: DeviceCode) -> tuple[str, Grant | None]:
        response = await self._post(
            "/api/accounts/deviceauth/token",
            json={"device_auth_id": device.device_auth_id, "user_code": device.user_code},
        )
        data = _json(response)
        if response.status_code == 200 and isinstance(data, dict):
            code, verifier = data.get("authorization_code"), data.get("code_verifier")
            challenge = data.get("code_challenge")
            if isinstance(code, str) and isinstance(verifier, str) and isinstance(challenge, str):
                return "approved", Grant(code, Pkce(verifier, challenge))
            raise LoginError("login_failed", "the auth server's grant is incomplete")
        outcome = classify_poll(response.status_code, data)
        if outcome == FAILED:
            raise LoginError("login_failed", _refusal("a device code poll", response, data))
        return outcome, None

    async def exchange(self, code: str, verifier: str, redirect: str) -> Tokens:
        """``grant_type=authorization_code`` (form-encoded, as the Codex CLI sends it)."""
        response = await self._post(
            "/oauth/token",
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirect,
                "client_id": CLIENT_ID,
                "code_verifier": verifier,
            },
        )
        data = _json(response)
        if response.status_code != 200 or not isinstance(data, dict):
            error = oauth_error_code(data)
            kind = (
                "login_expired"
                if error == "invalid_grant" and "expired" in _error_message(data)
                else "login_failed"
            )
            raise LoginError(kind, _refusal("the code exchange", response, data))
        fields = [data.get(k) for k in ("id_token", "access_token", "refresh_token")]
        if not all(isinstance(f, str) and f for f in fields):
            raise LoginError("login_failed", "the code exchange answered without all three tokens")
        return Tokens(*(str(f) for f in fields))


async def wait_for_device_grant(client: AuthClient, device: DeviceCode) -> Grant:
    """Poll until the code is approved (its grant), denied (``login_denied``) or expired
    (``login_expired``); the caller bounds the time (the login's deadline)."""
    interval = device.interval
    for _ in range(MAX_POLLS):
        await trio.sleep(max(interval, MIN_POLL_INTERVAL))
        outcome, grant = await client.poll(device)
        if grant is not None:
            return grant
        if outcome == SLOW_DOWN:
            interval += SLOW_DOWN_STEP
            log.info("device code poll slowed down", interval=interval)
        elif outcome == EXPIRED:
            raise LoginError("login_expired", "the device code expired before it was approved")
        elif outcome == DENIED:
            raise LoginError("login_denied", "the sign-in was refused")
    raise LoginError("login_expired", "the device code was never approved")


DeliverRedirect = Callable[[str], bool]

_PAGE_OK = (
    b"<!doctype html><title>trioproxy</title><p>Sign-in received. You can close this tab;"
    b" trioproxy finishes the login.</p>"
)
_PAGE_MISMATCH = (
    b"<!doctype html><title>trioproxy</title><p>State mismatch: this is not the pending login.</p>"
)


async def serve_callback(
    port: int,
    deliver: DeliverRedirect,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on 127.0.0.1:``port`` for the browser's redirect to ``/auth/callback`` until
    cancelled; report the bound port. ``deliver(target)`` gets each callback's request
    target and says whether it was accepted (a state mismatch is answered 400 and the
    listener keeps waiting). ``OSError`` if the port cannot be bound."""
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    bound = listeners[0].socket.getsockname()[1]
    try:
        async with trio.open_nursery() as nursery:
            task_status.started(bound)
            for _ in range(MAX_CALLBACK_CONNECTIONS):
                stream = await listeners[0].accept()
                nursery.start_soon(_answer_callback, stream, deliver)
    finally:
        for listener in listeners:
            await listener.aclose()


async def _answer_callback(stream: trio.SocketStream, deliver: DeliverRedirect) -> None:
    async with stream:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=CALLBACK_MAX_HEAD)
        request = None
        with trio.move_on_after(CALLBACK_READ_TIMEOUT):
            try:
                request = await _read_head(stream, conn)
            except (h11.RemoteProtocolError, trio.BrokenResourceError):
                return
        if request is None:
            return
        target = request.target.decode("latin-1")
        if request.method != b"GET" or urlsplit(target).path != CALLBACK_PATH:
            status, body = 404, b"Not Found"
        elif deliver(target):
            status, body = 200, _PAGE_OK
        else:
            status, body = 400, _PAGE_MISMATCH
        headers = [
            ("content-type", "text/html; charset=utf-8"),
            ("content-length", str(len(body))),
            ("connection", "close"),
        ]
        wire = conn.send(h11.Response(status_code=status, headers=headers)) or b""
        wire += (conn.send(h11.Data(data=body)) or b"") + (conn.send(h11.EndOfMessage()) or b"")
        # the answer goes out even when the login ends with this very callback (which
        # closes the listener): shielded, and bounded
        with trio.CancelScope(shield=True), trio.move_on_after(CALLBACK_READ_TIMEOUT):
            try:
                await stream.send_all(wire)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return


async def _read_head(stream: trio.SocketStream, conn: h11.Connection) -> h11.Request | None:
    """The request head (at most ``CALLBACK_MAX_HEAD`` bytes: h11 refuses more)."""
    for _ in range(CALLBACK_MAX_HEAD):
        event = conn.next_event()
        if isinstance(event, h11.Request):
            return event
        if event is not h11.NEED_DATA:
            return None
        data = await stream.receive_some(4096)
        if not data:
            return None
        conn.receive_data(data)
    return None


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _error_message(data: Any) -> str:
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict):
            return str(error.get("message") or "").lower()
        return str(data.get("error_description") or "").lower()
    return ""


def _refusal(what: str, response: httpx.Response, data: Any) -> str:
    code = oauth_error_code(data)
    return f"{what} was refused (status {response.status_code}{', ' + code if code else ''})"
