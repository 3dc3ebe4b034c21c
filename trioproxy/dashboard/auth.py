"""Who may use the dashboard: admins signing in with a password, their sessions, and the
session as an operator's credential for the management API.

* **Sign-in.** ``POST /dashboard/login`` with a name and password. The password is checked
  against the admin's scrypt hash in a worker thread (at most :data:`HASHING_THREADS` at
  once: each costs 32 MiB); a name that is no admin is checked against a decoy hash, so
  both failures take the same time. Every attempt counts as a failure of its client
  address and name until it succeeds (``sessions.LoginThrottle``), so parallel guesses are
  throttled too; a throttled attempt is refused before any hashing.
* **Session.** A success opens a session (``sessions.SessionRegistry``) and sets its token
  as the cookie :data:`COOKIE`: ``HttpOnly`` (no script reads it), ``SameSite=Strict`` (no
  other site's page or link sends it), ``Secure`` when the request came over TLS, no expiry
  (it ends with the browser; the server ends it after its idle or maximum age). A session
  holds while its admin exists with the same password: the admins are read from the store
  at most every :data:`ADMINS_TTL` seconds, so removing an admin or setting its password
  (``trioproxy admin ...``, from any process) ends its sessions within that time.
* **CSRF.** Every session has a CSRF token, put in each page (a ``<meta>`` for scripts, a
  hidden field in each form). Every request that changes something (any method but GET,
  HEAD, OPTIONS) with a session must carry it, as the header :data:`CSRF_HEADER` or, for
  the dashboard's own forms, the field :data:`CSRF_FIELD`; it is compared in constant time.
  Requests from another origin are refused before this, at the edge (``app/edge.py``).
* **The management API.** A request with a valid session is an operator there
  (:meth:`DashboardAuth.operator`): the pages call the API as any operator would.
"""

from __future__ import annotations

import math
import time

import attrs
import trio
from quart import Request
from werkzeug.sansio.response import Response

from trioproxy.dashboard.passwords import (
    DECOY_HASH,
    generate_password,
    hash_password,
    verify_password,
)
from trioproxy.dashboard.sessions import LoginThrottle, Session, SessionRegistry
from trioproxy.keys.ring import Client
from trioproxy.logs import get_logger
from trioproxy.protocol.errors import ProxyError
from trioproxy.store import Store
from trioproxy.store import admins as admin_store

log = get_logger("trioproxy.dashboard")

COOKIE = "trioproxy_session"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
ADMINS_TTL = 2.0
HASHING_THREADS = 2
FIRST_ADMIN = "admin"


class SignInFailed(Exception):
    """Wrong name or password."""


class SignInThrottled(Exception):
    """Too many failed sign-ins from this address or for this name."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"retry after {retry_after:.0f} s")
        self.retry_after = retry_after


def csrf_refused() -> ProxyError:
    return ProxyError.of(
        403,
        f"This change needs the dashboard session's CSRF token ({CSRF_HEADER} header).",
        "csrf_token_invalid",
    )


@attrs.define(eq=False)
class DashboardAuth:
    """Sign-in, sessions and their checks (see the module docstring)."""

    store: Store
    sessions: SessionRegistry = attrs.field(factory=SessionRegistry)
    throttle: LoginThrottle = attrs.field(factory=LoginThrottle)
    _hashing: trio.CapacityLimiter = attrs.field(
        factory=lambda: trio.CapacityLimiter(HASHING_THREADS), init=False
    )
    _admins: dict[str, float] = attrs.field(factory=dict, init=False)
    _admins_read_at: float = attrs.field(default=-math.inf, init=False)
    _admins_lock: trio.Lock = attrs.field(factory=trio.Lock, init=False)

    async def _current_admins(self) -> dict[str, float]:
        """Admin name -> when its password was set, at most :data:`ADMINS_TTL` old."""
        async with self._admins_lock:
            if trio.current_time() - self._admins_read_at >= ADMINS_TTL:
                records = await self.store.run(admin_store.list_admins, self.store)
                self._admins = {r.name: r.password_set_at for r in records}
                self._admins_read_at = trio.current_time()
            return self._admins

    async def sign_in(self, name: str, password: str, address: str | None) -> tuple[str, Session]:
        """A new session's token and the session, for the right password.

        Raises :class:`SignInThrottled` (nothing was checked) or :class:`SignInFailed`."""
        now = trio.current_time()
        wait = self.throttle.retry_after(address, name, now)
        if wait is not None:
            log.warning("dashboard sign-in throttled", name=name, client=address)
            raise SignInThrottled(wait)
        self.throttle.failed(address, name, now)  # until it succeeds
        record = await self.store.run(admin_store.get_admin, self.store, name)
        stored = record.password_hash if record is not None else DECOY_HASH
        matches = await trio.to_thread.run_sync(
            verify_password, password, stored, limiter=self._hashing
        )
        if record is None or not matches:
            log.warning("dashboard sign-in failed", name=name, client=address)
            raise SignInFailed()
        log.info("dashboard sign-in", name=name, client=address)
        self.throttle.succeeded(address, name)
        await self.store.run(admin_store.record_login, self.store, name, time.time())
        self._admins[name] = record.password_set_at
        return self.sessions.open(name, record.password_set_at, trio.current_time())

    async def session(self, token: str | None) -> Session | None:
        """The live session of ``token`` whose admin still has the same password."""
        session = self.sessions.find(token, trio.current_time())
        if session is None:
            return None
        if (await self._current_admins()).get(session.name) != session.credential:
            self.sessions.close(token)
            return None
        return session

    async def request_session(self, request: Request) -> Session | None:
        return await self.session(request.cookies.get(COOKIE))

    async def operator(self, request: Request) -> Client | None:
        """The management API's client for a request with a live session, None without
        one (the request's key or address decides). A change without the session's CSRF
        token is refused (403 ``csrf_token_invalid``)."""
        token = request.cookies.get(COOKIE)
        if not token:
            return None
        session = await self.session(token)
        if session is None:
            return None
        if request.method not in SAFE_METHODS and not session.csrf_matches(
            request.headers.get(CSRF_HEADER)
        ):
            raise csrf_refused()
        return Client(f"dashboard:{session.name}")

    def set_cookie(self, response: Response, token: str, *, secure: bool) -> None:
        response.set_cookie(
            COOKIE, token, path="/", httponly=True, samesite="Strict", secure=secure
        )

    def clear_cookie(self, response: Response, *, secure: bool) -> None:
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="Strict", secure=secure)

    async def ensure_first_admin(self) -> None:
        """With no admin in the store, make :data:`FIRST_ADMIN` with a generated password
        and log that password, this once (it is stored only as a hash)."""
        if await self.store.run(admin_store.list_admins, self.store):
            return
        password = generate_password()
        hashed = await trio.to_thread.run_sync(
            hash_password, password, limiter=self._hashing, abandon_on_cancel=True
        )
        created = await self.store.run(
            admin_store.create_first_admin, self.store, FIRST_ADMIN, hashed
        )
        if created is None:
            return  # another replica made the first admin meanwhile
        log.warning(
            "dashboard admin created; its password is shown only this once",
            name=FIRST_ADMIN,
            password=password,
            hint="sign in at /dashboard; `trioproxy admin set-password admin` changes it",
        )
