"""Logins in progress: the registry behind ``POST /api/logins`` and
``trioproxy accounts login``.

Theory of operation
-------------------
``LoginRegistry.start(flow)`` begins a login and returns its :class:`Login` (an id, and the
user code + verification URL, or the authorize URL). A device login first asks the auth
server for a user code (in the caller, so an auth server that refuses answers the request
that asked), then polls in a task of the registry (``login.py``). A browser login makes a
PKCE pair and a random state, and its task runs the loopback callback listener on
``callback_port`` (best effort: when the port is taken, the login still works with the
redirect URL pasted back through :meth:`LoginRegistry.complete`, which checks the state
before anything else; a wrong state is refused and the login keeps waiting).

A login that gets its tokens stores them exactly as an import does
(``importing.import_auth_jsons`` on the auth.json the Codex CLI would write), so a login as an
account that already exists (same ChatGPT account id) updates it in place, which is how an
account in ``reauth_required`` is fixed; refresh and quota polling see it at once.

States: ``pending``, then one of ``succeeded`` (with the account id), ``failed`` (with a
reason), ``expired`` (its deadline passed, or the auth server said the code expired) or
``cancelled``.

Resource handling: the registry's nursery (``run``, in the app nursery; or the CLI's) owns
every login task, and each task runs inside a cancel scope whose deadline is the login's
(``timeout`` seconds, at most the 15 minutes the Codex CLI allows a device code): an
abandoned login ends by itself and leaves nothing behind, no task and no listener (the
listener is a task of the login's own nursery). At most ``MAX_PENDING`` logins run at once;
finished ones are kept for ``FINISHED_TTL`` seconds (at most ``MAX_FINISHED``) so their
outcome can be read, then forgotten.

Error handling: requests about logins raise :class:`ProxyError` with the codes the README
lists (``unknown_login``, ``login_expired``, ``login_not_pending``,
``login_state_mismatch``, ...). A failed login keeps a reason without token text.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import httpx
import structlog
import trio

from trioproxy.accounts.authfile import AuthFileError
from trioproxy.accounts.importing import Imported
from trioproxy.accounts.login import (
    DEFAULT_CALLBACK_PORT,
    DEVICE_MAX_WAIT,
    AuthClient,
    LoginError,
    Pkce,
    Tokens,
    auth_json,
    authorize_url,
    code_from_redirect,
    new_pkce,
    new_state,
    redirect_uri,
    serve_callback,
    wait_for_device_grant,
)
from trioproxy.logs import get_logger
from trioproxy.protocol.errors import ProxyError

FLOWS = ("device", "browser")
MAX_PENDING = 16
MAX_FINISHED = 64
FINISHED_TTL = 600.0
ADOPT_TIMEOUT = 30.0  # storing a finished login's account
COMPLETE_WAIT = 60.0  # how long complete() waits for the code exchange after a pasted URL

log = get_logger("trioproxy.login")

#: stores the auth.json of a finished login, as an import does
Adopt = Callable[[dict[str, Any], float], Awaitable[Imported]]


@attrs.define(eq=False)
class Login:
    id: str
    flow: str
    created_at: float  # unix seconds
    expires_at: float  # unix seconds: the login's deadline
    status: str = "pending"
    user_code: str | None = None
    verification_url: str | None = None
    authorize_url: str | None = None
    redirect_uri: str | None = None
    callback_listening: bool = False
    account: Imported | None = None
    reason: str | None = None
    reason_code: str | None = None
    finished_at: float | None = None
    done: trio.Event = attrs.field(factory=trio.Event)
    _state: str = ""
    _pasted: str | None = None
    _arrived: trio.Event = attrs.field(factory=trio.Event)
    _scope: trio.CancelScope | None = None
    _cancel_requested: bool = False

    def view(self) -> dict[str, Any]:
        """What a client may see (no state, no verifier, no tokens)."""
        view: dict[str, Any] = {
            "id": self.id,
            "flow": self.flow,
            "status": self.status,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
        }
        if self.flow == "device":
            view.update(user_code=self.user_code, verification_url=self.verification_url)
        else:
            view.update(
                authorize_url=self.authorize_url,
                redirect_uri=self.redirect_uri,
                callback_listening=self.callback_listening,
            )
        if self.account is not None:
            view.update(
                account_id=self.account.account_id,
                email=self.account.email,
                plan=self.account.plan,
                created=self.account.created,
            )
        if self.reason is not None:
            view.update(reason=self.reason, reason_code=self.reason_code)
        return view

    def _deliver(self, target: str) -> bool:
        """A redirect from the callback listener: accepted if its state is this login's."""
        if self.status != "pending" or self._arrived.is_set():
            return False
        try:
            code_from_redirect(target, self._state)
        except LoginError as exc:
            if exc.code != "login_denied":  # a refusal with the right state ends the login
                log.warning("login callback refused", login=self.id, reason=exc.code)
                return False
        self._pasted = target
        self._arrived.set()
        return True


@attrs.define(eq=False)
class LoginRegistry:
    http: httpx.AsyncClient
    auth_base_url: str
    adopt: Adopt
    callback_port: int = DEFAULT_CALLBACK_PORT
    timeout: float = DEVICE_MAX_WAIT
    logins: dict[str, Login] = attrs.field(factory=dict)
    _nursery: trio.Nursery | None = None

    @property
    def client(self) -> AuthClient:
        return AuthClient(self.http, self.auth_base_url)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the login tasks until cancelled (start it in the app nursery)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    # -- requests -------------------------------------------------------------------------
    async def start(self, flow: str) -> Login:
        if flow not in FLOWS:
            raise ProxyError.of(
                400, 'flow must be "device" or "browser".', "invalid_login_flow", param="flow"
            )
        if self._nursery is None:
            raise ProxyError.of(503, "Logins are not available now.", "draining")
        self._prune()
        if sum(1 for login in self.logins.values() if login.status == "pending") >= MAX_PENDING:
            raise ProxyError.of(
                429,
                f"{MAX_PENDING} logins are already pending; finish or cancel one first.",
                "too_many_logins",
            )
        now = time.time()
        timeout = min(self.timeout, DEVICE_MAX_WAIT)
        login = Login(
            id=f"login_{secrets.token_hex(8)}",
            flow=flow,
            created_at=now,
            expires_at=now + timeout,
        )
        deadline = trio.current_time() + timeout
        if flow == "device":
            try:
                device = await self.client.request_device_code(now)
            except LoginError as exc:
                raise ProxyError.of(
                    502, f"Login could not start: {exc.message}.", exc.code
                ) from None
            if device.expires_at is not None and device.expires_at < login.expires_at:
                deadline -= login.expires_at - device.expires_at
                login.expires_at = device.expires_at
            login.user_code = device.user_code
            login.verification_url = device.verification_url
            self.logins[login.id] = login
            self._nursery.start_soon(self._run, login, deadline, self._device, device)
        else:
            login._state = new_state()
            self.logins[login.id] = login
            await self._nursery.start(self._run_browser, login, deadline, new_pkce())
        log.info("login started", login=login.id, flow=flow)
        return login

    def get(self, login_id: str) -> Login:
        self._prune()
        login = self.logins.get(login_id)
        if login is None:
            raise ProxyError.of(404, f"No login {login_id}.", "unknown_login")
        return login

    async def complete(self, login_id: str, url: str) -> Login:
        """A redirect URL pasted back (browser flow): checked, then the code exchanged; the
        finished login is returned."""
        login = self.get(login_id)
        self._check_pending(login)
        if login.flow != "browser":
            raise ProxyError.of(
                400, "Only a browser login takes a redirect URL.", "invalid_login_flow"
            )
        try:
            code_from_redirect(url, login._state)
        except LoginError as exc:
            if exc.code in ("login_state_mismatch", "invalid_redirect_url"):
                raise ProxyError.of(
                    400, f"{exc.message}.", exc.code, param="redirect_url"
                ) from None
        if not login._deliver(url):
            raise ProxyError.of(409, "This login already has its redirect.", "login_not_pending")
        with trio.move_on_after(COMPLETE_WAIT):
            await login.done.wait()
        return login

    async def cancel(self, login_id: str) -> Login:
        login = self.get(login_id)
        self._check_pending(login)
        login._cancel_requested = True
        if login._scope is not None:
            login._scope.cancel()
        with trio.move_on_after(COMPLETE_WAIT):
            await login.done.wait()
        return login

    def _check_pending(self, login: Login) -> None:
        if login.status == "expired":
            raise ProxyError.of(
                410, f"Login {login.id} has expired; start a new one.", "login_expired"
            )
        if login.status != "pending":
            raise ProxyError.of(409, f"Login {login.id} is {login.status}.", "login_not_pending")

    def _prune(self) -> None:
        now = time.time()
        finished = sorted(
            (x for x in self.logins.values() if x.finished_at is not None),
            key=lambda x: x.finished_at or 0.0,
        )
        for index, login in enumerate(finished):
            if (
                len(finished) - index > MAX_FINISHED
                or now - (login.finished_at or now) > FINISHED_TTL
            ):
                del self.logins[login.id]

    # -- the login tasks ----------------------------------------------------------------
    async def _run(
        self,
        login: Login,
        deadline: float,
        body: Callable[..., Awaitable[Tokens]],
        *args: Any,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """One login to its end: ``body`` gets the tokens, then they are stored; whatever
        happens, the login ends in a final state by its deadline."""
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(login=login.id)
        try:
            with trio.CancelScope(deadline=deadline) as scope:
                login._scope = scope
                try:
                    tokens = await body(login, *args, task_status=task_status)
                    # tokens in hand are stored whatever happens now: the auth server has
                    # spent the code, so a login cut here would lose them (bounded)
                    with trio.CancelScope(shield=True), trio.fail_after(ADOPT_TIMEOUT):
                        stored = await self.adopt(auth_json(tokens, time.time()), time.time())
                except LoginError as exc:
                    self._finish(
                        login,
                        "expired" if exc.code == "login_expired" else "failed",
                        exc.message,
                        exc.code,
                    )
                except AuthFileError as exc:
                    self._finish(
                        login, "failed", f"the tokens could not be stored: {exc}", "login_failed"
                    )
                else:
                    login.account = stored
                    self._finish(login, "succeeded")
                    log.info(
                        "login stored the account",
                        account=stored.account_id,
                        created=stored.created,
                    )
            if scope.cancelled_caught and login.status == "pending":
                if login._cancel_requested:
                    self._finish(login, "cancelled", "the login was cancelled", "login_cancelled")
                else:
                    self._finish(
                        login, "expired", "the login was not finished in time", "login_expired"
                    )
        except Exception:
            log.exception("login failed unexpectedly")
            self._finish(login, "failed", "the login failed unexpectedly", "login_failed")
        finally:
            if login.status == "pending":  # the registry itself is shutting down
                self._finish(login, "cancelled", "the proxy is shutting down", "login_cancelled")
            login.done.set()

    def _finish(
        self, login: Login, status: str, reason: str | None = None, code: str | None = None
    ) -> None:
        if login.status != "pending":
            return
        login.status, login.reason, login.reason_code = status, reason, code
        login.finished_at = time.time()
        if status != "succeeded":
            log.info("login ended", status=status, reason=code)

    async def _device(
        self, login: Login, device: Any, *, task_status: trio.TaskStatus[None]
    ) -> Tokens:
        task_status.started()
        client = self.client
        grant = await wait_for_device_grant(client, device)
        return await client.exchange(
            grant.code, grant.pkce.verifier, f"{client.base}/deviceauth/callback"
        )

    async def _run_browser(
        self, login: Login, deadline: float, pkce: Pkce, *, task_status: trio.TaskStatus[None]
    ) -> None:
        await self._run(login, deadline, self._browser, pkce, task_status=task_status)

    async def _browser(
        self, login: Login, pkce: Pkce, *, task_status: trio.TaskStatus[None]
    ) -> Tokens:
        async with trio.open_nursery() as listener:
            port = self.callback_port
            try:
                port = await listener.start(serve_callback, self.callback_port, login._deliver)
                login.callback_listening = True
            except OSError as exc:
                log.warning(
                    "login callback port unavailable; paste the redirect URL instead",
                    port=self.callback_port,
                    error=exc.strerror or type(exc).__name__,
                )
            login.redirect_uri = redirect_uri(port)
            login.authorize_url = authorize_url(
                self.auth_base_url, login.redirect_uri, pkce, login._state
            )
            task_status.started()
            await login._arrived.wait()
            listener.cancel_scope.cancel()  # the listener ends with the redirect
        assert login._pasted is not None
        code = code_from_redirect(login._pasted, login._state)
        return await self.client.exchange(code, pkce.verifier, login.redirect_uri)
