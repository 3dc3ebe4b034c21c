"""State a client echoes back, kept per account (sans-IO).

Upstream gives some of an account's answers a header the client is to send back on its
later requests: ``x-codex-turn-state``, an opaque sticky-routing token, in a response head,
a WebSocket handshake or a ``response.metadata`` event's ``headers``. The Codex CLI keeps it
for the rest of the turn and sends it with every later request of that turn (and on the
handshake of a socket it reopens). Its value means something to the account that issued it
only.

The proxy passes the header to its client as it came and remembers which account issued
each value (:class:`EchoedState`, most recent first, bounded). A request that carries one
goes upstream with it only to that account, so a conversation that stays on its account
keeps its sticky routing. To any other account (a failover, a conversation moved or
re-anchored elsewhere) the header is dropped, as is a value whose issuer the proxy does not
know (issued before a restart, or forgotten): that account starts the turn afresh and issues
its own. Routing keeps such a conversation where it is: a learned value routes requests that
echo it back to its account while that account can serve (``sessions/links.py`` makes it a
sticky session key of the pool).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence

import attrs

#: response headers whose value the client sends back, and which belong to one account
ECHOED = frozenset({"x-codex-turn-state"})
_ECHOED_RAW = frozenset(name.encode() for name in ECHOED)
MAX_REMEMBERED = 50_000


@attrs.define(eq=False)
class EchoedState:
    """Which account issued each echoed value (see the module docstring)."""

    max_entries: int = MAX_REMEMBERED
    issuers: collections.OrderedDict[tuple[str, str], str] = attrs.field(
        factory=collections.OrderedDict
    )

    def _learn(self, account_id: str, name: str, value: str) -> None:
        key = (name, value)
        self.issuers[key] = account_id
        self.issuers.move_to_end(key)
        while len(self.issuers) > self.max_entries:
            self.issuers.popitem(last=False)

    def issuer(self, name: str, value: str) -> str | None:
        return self.issuers.get((name, value))

    def learn_raw(
        self, account_id: str, headers: Iterable[tuple[bytes, bytes]]
    ) -> list[tuple[str, str]]:
        """An answer's raw headers (lower-case names), from ``account_id``; the echoed
        ones, as text."""
        learned = []
        for name, value in headers:
            if name in _ECHOED_RAW:
                pair = (name.decode("latin-1"), value.decode("latin-1"))
                self._learn(account_id, *pair)
                learned.append(pair)
        return learned

    def learn_text(
        self, account_id: str, headers: Iterable[tuple[str, object]]
    ) -> list[tuple[str, str]]:
        """Headers as text (a handshake's; an event's ``headers`` items); the echoed ones."""
        learned = []
        for name, value in headers:
            lower = name.lower()
            if lower in ECHOED and isinstance(value, str):
                self._learn(account_id, lower, value)
                learned.append((lower, value))
        return learned

    def learn_event(self, account_id: str, event: Mapping[str, object]) -> list[tuple[str, str]]:
        """A ``response.metadata`` event (its ``headers`` object, if any); the echoed ones."""
        headers = event.get("headers")
        if isinstance(headers, Mapping):
            return self.learn_text(account_id, ((str(k), v) for k, v in headers.items()))
        return []

    def outgoing_raw(
        self, account_id: str, headers: Sequence[tuple[bytes, bytes]]
    ) -> Sequence[tuple[bytes, bytes]]:
        """A client's raw headers for a request to ``account_id``: an echoed header only
        if that account issued its value. (Unchanged, not copied, when none is echoed: this
        runs on every turn.)"""
        if not any(name.lower() in _ECHOED_RAW for name, _ in headers):
            return headers
        out = []
        for name, value in headers:
            lower = name.lower()
            if lower in _ECHOED_RAW:
                owner = self.issuer(lower.decode("latin-1"), value.decode("latin-1"))
                if owner != account_id:
                    continue
            out.append((name, value))
        return out

    def outgoing_text(
        self, account_id: str, headers: Sequence[tuple[str, str]]
    ) -> list[tuple[str, str]]:
        """``outgoing_raw`` for headers as text (a WebSocket handshake's)."""
        return [
            (name, value)
            for name, value in headers
            if name.lower() not in ECHOED or self.issuer(name.lower(), value) == account_id
        ]
