"""Dashboard sessions and the sign-in throttle: plain state in memory, no I/O, no tasks.

Sessions
--------
A sign-in opens a session: a random token (the cookie's value; the registry keys sessions
by its SHA-256, so the token itself is kept nowhere), the admin's name, a CSRF token the
pages send back with every change, and the admin's ``credential`` (when the password was
last set): a session whose admin was removed or got a new password is no longer valid.
A session ends when it is closed (sign-out), after ``idle_timeout`` without a request, or
``max_age`` after it opened. Expired sessions are dropped as they are found and by
:meth:`SessionRegistry.sweep`, which every sign-in runs, so the registry needs no task of its
own; at most ``max_sessions`` are kept (the oldest go first). Sessions live in the server's
memory: a restart signs everybody out.

Throttle
--------
Failed sign-ins are counted per client address and per admin name over a sliding
``window``. While either count is at its limit, sign-ins for that address or name are
refused without checking the password, until the oldest failure leaves the window (that
wait is the ``Retry-After``). A success clears the address's and the name's failures. At
most ``max_tracked`` addresses and names are remembered (the oldest are forgotten first).

Times are trio's clock (seconds), passed in by the caller.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import secrets

import attrs

TOKEN_BYTES = 32


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


@attrs.define(eq=False)
class Session:
    """One signed-in admin."""

    name: str
    csrf_token: str = attrs.field(repr=False)
    credential: float  # the admin's password_set_at when the session opened
    opened: float
    last_seen: float
    #: messages for the next page shown: (``ok`` or ``error``, text)
    notices: list[tuple[str, str]] = attrs.field(factory=list, repr=False)

    def take_notices(self) -> list[tuple[str, str]]:
        notices, self.notices = self.notices, []
        return notices

    def csrf_matches(self, presented: str | None) -> bool:
        """Whether ``presented`` is this session's CSRF token (constant-time)."""
        return presented is not None and hmac.compare_digest(
            presented.encode("utf-8", "replace"), self.csrf_token.encode("utf-8")
        )


@attrs.frozen
class SessionStatistics:
    sessions: int
    opened_total: int
    expired_total: int


@attrs.define(eq=False)
class SessionRegistry:
    """The open sessions (see the module docstring)."""

    idle_timeout: float = 8 * 3600.0
    max_age: float = 24 * 3600.0
    max_sessions: int = 1000
    _sessions: dict[str, Session] = attrs.field(factory=dict, init=False)
    opened_total: int = attrs.field(default=0, init=False)
    expired_total: int = attrs.field(default=0, init=False)

    def open(self, name: str, credential: float, now: float) -> tuple[str, Session]:
        """A new session for admin ``name``: its token (the cookie's value) and itself."""
        self.sweep(now)
        while len(self._sessions) >= self.max_sessions:
            del self._sessions[next(iter(self._sessions))]
        token = secrets.token_urlsafe(TOKEN_BYTES)
        session = Session(name, secrets.token_urlsafe(TOKEN_BYTES), credential, now, now)
        self._sessions[_digest(token)] = session
        self.opened_total += 1
        return token, session

    def find(self, token: str | None, now: float) -> Session | None:
        """The live session of ``token`` (its idle time starts again), or None."""
        if not token:
            return None
        key = _digest(token)
        session = self._sessions.get(key)
        if session is None:
            return None
        if self._expired(session, now):
            del self._sessions[key]
            self.expired_total += 1
            return None
        session.last_seen = now
        return session

    def close(self, token: str | None) -> None:
        """End the session of ``token`` (no session: nothing happens)."""
        if token:
            self._sessions.pop(_digest(token), None)

    def close_admin(self, name: str) -> int:
        """End every session of admin ``name``; how many there were."""
        keys = [key for key, session in self._sessions.items() if session.name == name]
        for key in keys:
            del self._sessions[key]
        return len(keys)

    def sweep(self, now: float) -> None:
        """Drop the expired sessions."""
        expired = [key for key, s in self._sessions.items() if self._expired(s, now)]
        for key in expired:
            del self._sessions[key]
        self.expired_total += len(expired)

    def _expired(self, session: Session, now: float) -> bool:
        return now - session.last_seen >= self.idle_timeout or now - session.opened >= self.max_age

    def statistics(self) -> SessionStatistics:
        return SessionStatistics(len(self._sessions), self.opened_total, self.expired_total)


@attrs.frozen
class ThrottleStatistics:
    tracked: int
    refused_total: int
    failures_total: int


@attrs.define(eq=False)
class LoginThrottle:
    """Failed sign-ins per address and per name (see the module docstring)."""

    per_address: int = 5
    per_name: int = 10
    window: float = 300.0
    max_tracked: int = 10_000
    _failures: dict[str, collections.deque[float]] = attrs.field(factory=dict, init=False)
    refused_total: int = attrs.field(default=0, init=False)
    failures_total: int = attrs.field(default=0, init=False)

    def _keys(self, address: str | None, name: str) -> list[tuple[str, int]]:
        return [(f"addr:{address or '-'}", self.per_address), (f"name:{name}", self.per_name)]

    def retry_after(self, address: str | None, name: str, now: float) -> float | None:
        """Seconds until a sign-in from ``address`` as ``name`` may be tried, or None when
        it may be tried now."""
        wait = 0.0
        for key, limit in self._keys(address, name):
            times = self._recent(key, now)
            if times is not None and len(times) >= limit:
                wait = max(wait, times[len(times) - limit] + self.window - now)
        if wait > 0:
            self.refused_total += 1
            return wait
        return None

    def failed(self, address: str | None, name: str, now: float) -> None:
        self.failures_total += 1
        for key, _ in self._keys(address, name):
            times = self._recent(key, now)
            if times is None:
                while len(self._failures) >= self.max_tracked:
                    del self._failures[next(iter(self._failures))]
                times = self._failures[key] = collections.deque()
            times.append(now)

    def succeeded(self, address: str | None, name: str) -> None:
        for key, _ in self._keys(address, name):
            self._failures.pop(key, None)

    def _recent(self, key: str, now: float) -> collections.deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def statistics(self) -> ThrottleStatistics:
        return ThrottleStatistics(len(self._failures), self.refused_total, self.failures_total)
