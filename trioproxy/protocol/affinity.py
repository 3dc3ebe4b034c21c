"""Session affinity as a small state machine (sans-IO).

Theory of operation
-------------------
A downstream session is bound to at most one account. Its affinity is:

* ``UNBOUND``: no account yet, or the pin was reset; routing may choose any account.
* ``SOFT(a)``: on account ``a`` for prompt-cache locality only (a session key, or a request
  that names no ``previous_response_id``); the session may move if ``a`` cannot serve.
* ``HARD(a)``: a response created on ``a`` is the anchor of the conversation
  (``previous_response_id`` / turn state). The session never moves implicitly: a reconnect
  (after a close before ``response.created``, 1011 included) goes back to ``a``. Only an
  account-level failure (usage limit, 401 after refresh, deactivated, 402/403) resets the
  pin, and then the anchor must be re-anchored or the client told to resend.

Request-scoped failures (400, 404, context too long) change nothing. The table below is the
whole machine; ``step`` refuses anything not in it.
"""

from __future__ import annotations

import enum

import attrs


class Kind(enum.Enum):
    UNBOUND = "unbound"
    SOFT = "soft"
    HARD = "hard"


class Event(enum.Enum):
    BIND = "bind"  # connected to an account (chosen by routing, or the pinned one)
    CREATED = "created"  # upstream sent response.created: the anchor lives on that account
    UNANCHORED_REQUEST = "unanchored_request"  # a self-contained request (no previous_response_id)
    CLOSED_BEFORE_CREATED = (
        "closed_before_created"  # upstream closed / connection failed before output
    )
    ACCOUNT_FAILURE = "account_failure"  # the account itself cannot serve: pin reset
    REQUEST_FAILURE = "request_failure"  # the request was wrong: nothing changes


@attrs.frozen
class Affinity:
    kind: Kind = Kind.UNBOUND
    account: str | None = None

    @property
    def may_move(self) -> bool:
        """Whether routing may put the next connection on another account."""
        return self.kind is not Kind.HARD

    def pinned_to(self) -> str | None:
        """The account a reconnect must use, if any."""
        return self.account if self.kind is Kind.HARD else None


class InvalidTransition(ValueError):
    pass


# (state kind, event) -> next kind; BIND carries the account, the others keep it
TRANSITIONS: dict[tuple[Kind, Event], Kind] = {
    (Kind.UNBOUND, Event.BIND): Kind.SOFT,
    (Kind.SOFT, Event.BIND): Kind.SOFT,
    (Kind.HARD, Event.BIND): Kind.HARD,  # only to the same account (checked in step)
    (Kind.SOFT, Event.CREATED): Kind.HARD,
    (Kind.HARD, Event.CREATED): Kind.HARD,
    (Kind.UNBOUND, Event.UNANCHORED_REQUEST): Kind.UNBOUND,
    (Kind.SOFT, Event.UNANCHORED_REQUEST): Kind.SOFT,
    (Kind.HARD, Event.UNANCHORED_REQUEST): Kind.SOFT,
    (Kind.UNBOUND, Event.CLOSED_BEFORE_CREATED): Kind.UNBOUND,
    (Kind.SOFT, Event.CLOSED_BEFORE_CREATED): Kind.UNBOUND,  # soft may be rerouted
    (Kind.HARD, Event.CLOSED_BEFORE_CREATED): Kind.HARD,  # hard stays on its account
    (Kind.UNBOUND, Event.ACCOUNT_FAILURE): Kind.UNBOUND,
    (Kind.SOFT, Event.ACCOUNT_FAILURE): Kind.UNBOUND,
    (Kind.HARD, Event.ACCOUNT_FAILURE): Kind.UNBOUND,  # pin reset
    (Kind.UNBOUND, Event.REQUEST_FAILURE): Kind.UNBOUND,
    (Kind.SOFT, Event.REQUEST_FAILURE): Kind.SOFT,
    (Kind.HARD, Event.REQUEST_FAILURE): Kind.HARD,
}


def step(state: Affinity, event: Event, account: str | None = None) -> Affinity:
    """The state after ``event`` (``account`` only with BIND)."""
    nxt = TRANSITIONS.get((state.kind, event))
    if nxt is None:
        raise InvalidTransition(f"{event.value} is not allowed in {state.kind.value}")
    if event is Event.BIND:
        if account is None:
            raise InvalidTransition("bind needs an account")
        if state.kind is Kind.HARD and account != state.account:
            raise InvalidTransition(
                f"hard affinity to {state.account} cannot move to {account} implicitly"
            )
        return Affinity(nxt, account)
    if nxt is Kind.UNBOUND:
        return Affinity()
    return Affinity(nxt, state.account)
