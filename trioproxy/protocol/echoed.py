"""State a client echoes back, which belongs to one account (sans-IO).

Upstream gives an account's answers a header the client is to send back on its later
requests: ``x-codex-turn-state``, an opaque sticky-routing token, in a response head or a
WebSocket handshake. The Codex CLI keeps it for the rest of the turn and sends it with every
later request of that turn (and on the handshake of a socket it reopens). Its value means
something to the account that issued it only.

The proxy keeps nothing for it. It hands the value to its client marked with the account
that issued it (:func:`for_client`: ``tp1.<account tag>.<upstream value>``, the tag a short
hash of the account id, no id in clear), and reads the mark back when the client echoes it
(:func:`outgoing_raw`, :func:`outgoing_text`): the request goes upstream with upstream's own
value to that account only. To any other account (a failover, a conversation moved or
re-anchored elsewhere) the header is dropped, as is a value without the proxy's mark (one
that came in a ``response.metadata`` event, or from anywhere else): that account starts the
turn afresh and issues its own. Routing sends a request that echoes a marked value back to
its account while that account can serve (:func:`issuer_tag`; ``sessions/failover.py``).

Nothing is remembered per turn, so nothing grows with the traffic, and a proxy restart
changes nothing.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Sequence

#: response headers whose value the client sends back, and which belong to one account
ECHOED = frozenset({"x-codex-turn-state"})
_ECHOED_RAW = frozenset(name.encode() for name in ECHOED)
_MARK = "tp1."


@functools.lru_cache(maxsize=4096)
def account_tag(account_id: str) -> str:
    """A short, stable label of an account (no id in clear)."""
    return hashlib.sha256(account_id.encode()).hexdigest()[:12]


def mark(account_id: str, value: str) -> str:
    """An echoed value as the client gets it: marked with its account."""
    return f"{_MARK}{account_tag(account_id)}.{value}"


def unmark(value: str) -> tuple[str, str] | None:
    """(account tag, upstream's value) of a marked value; None for any other."""
    if not value.startswith(_MARK):
        return None
    tag, dot, upstream = value[len(_MARK) :].partition(".")
    return (tag, upstream) if dot and tag and upstream else None


def for_client(
    account_id: str, headers: Iterable[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """An answer's raw headers (lower-case names) as its client gets them: echoed ones
    marked with ``account_id``."""
    return [
        (name, mark(account_id, value.decode("latin-1")).encode("latin-1"))
        if name in _ECHOED_RAW
        else (name, value)
        for name, value in headers
    ]


def _upstream_value(account_id: str, value: str) -> str | None:
    found = unmark(value)
    if found is None or found[0] != account_tag(account_id):
        return None
    return found[1]


def outgoing_raw(
    account_id: str, headers: Sequence[tuple[bytes, bytes]]
) -> Sequence[tuple[bytes, bytes]]:
    """A client's raw headers for a request to ``account_id``: an echoed header only if
    that account issued it, with upstream's value. (Unchanged, not copied, when none is
    echoed: this runs on every turn.)"""
    if not any(name.lower() in _ECHOED_RAW for name, _ in headers):
        return headers
    out = []
    for name, value in headers:
        if name.lower() in _ECHOED_RAW:
            upstream = _upstream_value(account_id, value.decode("latin-1"))
            if upstream is None:
                continue
            value = upstream.encode("latin-1")
        out.append((name, value))
    return out


def outgoing_text(account_id: str, headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """``outgoing_raw`` for headers as text (a WebSocket handshake's)."""
    out = []
    for name, value in headers:
        if name.lower() in ECHOED:
            upstream = _upstream_value(account_id, value)
            if upstream is None:
                continue
            value = upstream
        out.append((name, value))
    return out


def issuer_tag(headers: Iterable[tuple[str, str]] | Iterable[tuple[bytes, bytes]]) -> str | None:
    """The account tag of the echoed value a client's headers carry, if it is marked."""
    for name, value in headers:
        text = name.decode("latin-1") if isinstance(name, bytes) else name
        if text.lower() in ECHOED:
            raw = value.decode("latin-1") if isinstance(value, bytes) else value
            found = unmark(raw)
            if found is not None:
                return found[0]
    return None
