"""Access tokens: proactive refresh, refresh after a 401, single-flight per account.

Theory of operation
-------------------
A request asks ``TokenManager.token_for(account)``. The token is refreshed first when the
access token's ``exp`` has passed (or is within ``EXPIRY_MARGIN``) or the last refresh is
older than 8 days (what the Codex CLI does). After an upstream 401 the caller asks
``refresh_after_401(account, stale_token)``.

Single flight: one refresh per account at a time. The first request that needs one starts a
*flight* and waits for it; the others join the flight in progress; a request whose token was
already replaced gets the new one without a call. So 100 requests that all hit a 401 cause
exactly one ``POST {AUTH_BASE_URL}/oauth/token``.

A flight is a task of the TokenManager's own nursery (``run``, in the app nursery), not of
the request that started it: upstream rotates refresh tokens, so once the auth server has
answered, the old refresh token is spent, and a call cancelled because its client left
would keep only the spent one (the next refresh gets ``refresh_token_reused`` and the
account needs a new login). A flight therefore ends only on its own terms, bounded by
``REFRESH_TIMEOUT``, whoever waits for it; a request that leaves stops waiting, nothing more.

Across processes (replicas on one PostgreSQL database) a flight calls the auth server only
under the database's lock on the account (``store/account_lock.py``), and first reads the
tokens as stored: when another replica rotated them meanwhile, the flight uses those and does
not call, so the refresh token it holds, already spent, is never sent. 300 requests on three
replicas that all find the same account expired cause one call.

The rotated refresh token is written to the store *before* the new access token is used (a
crash in between cannot lose the only valid refresh token), and before the lock is released. A permanent failure
(``refresh_token_expired`` / ``_reused`` / ``_invalidated`` or a 401) takes the account out
of rotation as ``reauth_required``; a transient one (5xx, timeout) is remembered for
``cooldown`` seconds, during which further attempts fail fast instead of hammering the auth
server.
"""

from __future__ import annotations

from typing import Any

import attrs
import httpx
import sqlalchemy as sa
import structlog
import trio

from trioproxy.accounts.pool import Account, Pool
from trioproxy.admission import Admission
from trioproxy.logs import get_logger
from trioproxy.store import AccountRecord, Store
from trioproxy.store.account_lock import account_lock

CLIENT_ID = "app_EMoamEEZ73f0CkXaXp7hrann"
STALE_AFTER = 8 * 24 * 3600
EXPIRY_MARGIN = 60.0
REFRESH_TIMEOUT = 30.0  # one flight, from the wait for a work slot to the stored tokens
PERMANENT_CODES = frozenset(
    {"refresh_token_expired", "refresh_token_reused", "refresh_token_invalidated", "invalid_grant"}
)

log = get_logger("trioproxy.refresh")


class RefreshError(Exception):
    """The account has no usable token now. ``permanent`` says whether it ever will."""

    def __init__(self, account_id: str, reason: str, *, permanent: bool) -> None:
        super().__init__(f"token refresh for {account_id} failed: {reason}")
        self.account_id = account_id
        self.reason = reason
        self.permanent = permanent


@attrs.define(eq=False)
class _Flight:
    """One refresh of one account in progress; every waiter gets its outcome."""

    done: trio.Event = attrs.field(factory=trio.Event)
    token: str | None = None
    error: RefreshError | None = None

    async def wait(self, account_id: str) -> str:
        await self.done.wait()
        if self.token is not None:
            return self.token
        error = self.error or RefreshError(account_id, "refresh interrupted", permanent=False)
        # a fresh exception per waiter (one raised in many tasks would pile up tracebacks)
        raise RefreshError(error.account_id, error.reason, permanent=error.permanent)


@attrs.define(eq=False)
class TokenManager:
    pool: Pool
    store: Store
    client: httpx.AsyncClient
    auth_base_url: str
    admission: Admission  # refreshes hold a slot of the global "refresh" work lane
    cooldown: float = 30.0
    refresh_calls: int = 0
    _flights: dict[str, _Flight] = attrs.field(factory=dict)
    #: threads that wait for accounts' database locks (apart from the store's own)
    _lock_threads: trio.CapacityLimiter = attrs.field(factory=lambda: trio.CapacityLimiter(4))
    _nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the refresh flights until cancelled (start it in the app nursery).

        Without it (a TokenManager used on its own), a flight runs in the task that starts it.
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def needs_refresh(self, account: Account) -> bool:
        now = self.pool.clock.now()
        record = account.record
        if record.access_expires_at is not None and record.access_expires_at <= now + EXPIRY_MARGIN:
            return True
        return now - record.last_refresh > STALE_AFTER

    async def token_for(self, account: Account) -> str:
        """A usable access token (refreshing proactively when due)."""
        if self.needs_refresh(account):
            return await self._refresh(account, account.record.access_token, "proactive_expiry")
        return account.record.access_token

    async def refresh_after_401(self, account: Account, stale_token: str) -> str:
        return await self._refresh(account, stale_token, "unauthorized_recovery")

    async def _refresh(self, account: Account, stale_token: str, reason: str) -> str:
        flight = self._flights.get(account.account_id)
        if flight is None:
            if account.record.access_token != stale_token and not self.needs_refresh(account):
                return account.record.access_token  # another task refreshed it already
            if account.record.state != "active":
                raise RefreshError(account.account_id, account.record.state, permanent=True)
            now = self.pool.clock.now()
            if account.refresh_blocked_until > now:
                raise RefreshError(
                    account.account_id,
                    account.last_refresh_error or "cooling down",
                    permanent=False,
                )
            flight = self._flights[account.account_id] = _Flight()
            if self._nursery is not None:
                self._nursery.start_soon(self._fly_apart, account, stale_token, reason, flight)
            else:
                await self._fly(account, stale_token, reason, flight)
        return await flight.wait(account.account_id)

    async def _fly_apart(
        self, account: Account, stale_token: str, reason: str, flight: _Flight
    ) -> None:
        """A flight in the manager's nursery: it started in a request's task, and logs as
        the account's refresh, not as that request."""
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(account=account.account_id)
        await self._fly(account, stale_token, reason, flight)

    async def _fly(self, account: Account, stale_token: str, reason: str, flight: _Flight) -> None:
        """One refresh call, to its end (see the module docstring); never raises but
        cancellation (the app shutting down)."""
        try:
            with trio.move_on_after(REFRESH_TIMEOUT):
                try:
                    flight.token = await self._call(account, stale_token, reason)
                except RefreshError as exc:
                    flight.error = exc
                except Exception:
                    log.exception("token refresh failed", account=account.account_id)
                    flight.error = RefreshError(
                        account.account_id, "refresh failed unexpectedly", permanent=False
                    )
            if flight.token is None and flight.error is None:
                try:
                    self._transient(account, f"no answer within {REFRESH_TIMEOUT:g} s")
                except RefreshError as exc:
                    flight.error = exc
        finally:
            del self._flights[account.account_id]
            flight.done.set()

    async def _call(self, account: Account, stale_token: str, reason: str) -> str:
        """Refresh under the account's database lock, unless another process (or this one's
        store watcher, meanwhile) already replaced ``stale_token`` with a usable token."""
        try:
            locked = account_lock(
                self.store,
                account.account_id,
                lock_wait=REFRESH_TIMEOUT,
                limiter=self._lock_threads,
            )
            async with locked as stored:
                if stored is not None:
                    self._adopt(account, stored)
                if account.record.access_token != stale_token and not self.needs_refresh(account):
                    return account.record.access_token
                return await self._call_auth_server(account, reason)
        except sa.exc.SQLAlchemyError as exc:
            return self._transient(account, f"account lock unavailable ({type(exc).__name__})")

    def _adopt(self, account: Account, stored: AccountRecord) -> None:
        """Take the tokens another process stored since ours were read."""
        if stored.state != "active":
            account.record = attrs.evolve(
                account.record, state=stored.state, state_reason=stored.state_reason
            )
            raise RefreshError(account.account_id, stored.state, permanent=True)
        if stored.refresh_token == account.record.refresh_token:
            return
        account.record = attrs.evolve(
            account.record,
            access_token=stored.access_token,
            refresh_token=stored.refresh_token,
            id_token=stored.id_token,
            access_expires_at=stored.access_expires_at,
            last_refresh=stored.last_refresh,
        )
        account.last_refresh_error = None
        log.info("token refreshed by another replica", account=account.account_id)

    async def _call_auth_server(self, account: Account, reason: str) -> str:
        body = {
            "client_id": CLIENT_ID,
            "grant_type": "refresh_token",
            "refresh_reason": reason,
            "refresh_token": account.record.refresh_token,
        }
        self.refresh_calls += 1
        try:
            async with self.admission.work("refresh"):
                response = await self.client.post(
                    f"{self.auth_base_url.rstrip('/')}/oauth/token",
                    json=body,
                    headers={"content-type": "application/json"},
                )
        except httpx.HTTPError as exc:
            return self._transient(account, f"auth server unreachable ({type(exc).__name__})")
        data: Any
        try:
            data = response.json()
        except ValueError:
            data = {}
        if response.status_code == 200 and isinstance(data, dict) and data.get("access_token"):
            return await self._store_tokens(account, data)
        code = oauth_error_code(data)
        if response.status_code == 401 or code in PERMANENT_CODES:
            await self._permanent(account, code or f"status {response.status_code}")
        return self._transient(account, code or f"status {response.status_code}")

    async def _store_tokens(self, account: Account, data: dict[str, Any]) -> str:
        from trioproxy.accounts.authfile import access_token_expiry

        record = account.record
        now = self.pool.clock.now()
        access = str(data["access_token"])
        refresh = str(data.get("refresh_token") or record.refresh_token)
        id_token = str(data["id_token"]) if data.get("id_token") else record.id_token
        expires = access_token_expiry(access)
        # persist first: the rotated refresh token is the only one upstream accepts now
        await self.store.run(
            lambda: self.store.update_tokens(
                record.account_id,
                access_token=access,
                refresh_token=refresh,
                id_token=id_token,
                access_expires_at=expires,
                last_refresh=now,
            )
        )
        account.record = attrs.evolve(
            record,
            access_token=access,
            refresh_token=refresh,
            id_token=id_token,
            access_expires_at=expires,
            last_refresh=now,
        )
        account.last_refresh_error = None
        log.info("token refreshed", account=record.account_id)
        return access

    async def _permanent(self, account: Account, code: str) -> None:
        reason = f"refresh failed: {code}"
        await self.store.run(
            lambda: self.store.set_account_state(account.account_id, "reauth_required", reason)
        )
        account.record = attrs.evolve(account.record, state="reauth_required", state_reason=reason)
        log.warning("account needs re-authentication", account=account.account_id, reason=code)
        raise RefreshError(account.account_id, reason, permanent=True)

    def _transient(self, account: Account, why: str) -> str:
        account.refresh_blocked_until = self.pool.clock.now() + self.cooldown
        account.last_refresh_error = why
        log.warning(
            "token refresh failed, cooling down",
            account=account.account_id,
            reason=why,
            seconds=self.cooldown,
        )
        raise RefreshError(account.account_id, why, permanent=False)


def oauth_error_code(data: Any) -> str | None:
    """The error code of an auth server's JSON answer (``{"error": {"code"}}``, ``{"error":
    "code"}`` or ``{"code"}``), if it has one."""
    if not isinstance(data, dict):
        return None
    error = data.get("error")
    if isinstance(error, dict):
        return str(error.get("code") or error.get("type") or "") or None
    if isinstance(error, str):
        return error
    code = data.get("code")
    return str(code) if code else None
