"""Pausing an account (taking it out of rotation) and resuming it, for the management API
and ``trioproxy accounts pause|resume``.

A paused account is stored in the state ``disabled`` (``store.records.ACCOUNT_STATES``) and
shown as ``paused``; the pool never routes to it (``pool.py``). Only an account in rotation
(``active``, exhausted or not) can be paused: one that needs a new sign-in or is deactivated
keeps that state, which says what to fix. Pausing a paused account or resuming one that is
not paused changes nothing. The state is read and changed in one store transaction, so a
refresh that fails for good at the same moment is not overwritten.
"""

from __future__ import annotations

import attrs

from trioproxy.accounts.records import STORED_PAUSED, shown_state
from trioproxy.store import Store

PAUSE_REASON = "paused by an operator"


@attrs.frozen
class Outcome:
    """What a pause or resume did: ``before`` is the stored state it found (None: no such
    account), ``changed`` whether it changed it."""

    account_id: str
    verb: str  # "pause" or "resume"
    before: str | None
    changed: bool

    @property
    def refused(self) -> bool:
        """A pause of an account that is not in rotation."""
        return self.verb == "pause" and self.before not in (None, "active", STORED_PAUSED)

    def message(self) -> str:
        """One line for the operator."""
        if self.before is None:
            return f"No account {self.account_id}."
        if self.refused:
            return (
                f"Account {self.account_id} is {shown_state(self.before)}, not in rotation: "
                "only an account in rotation can be paused."
            )
        if self.changed:
            return f"{'Paused' if self.verb == 'pause' else 'Resumed'} account {self.account_id}."
        if self.verb == "pause":
            return f"Account {self.account_id} was already paused."
        return f"Account {self.account_id} is not paused ({shown_state(self.before)})."


def pause_account(store: Store, account_id: str) -> Outcome:
    """Take the account out of rotation (blocking: run it with ``store.run``)."""
    before = store.change_account_state(
        account_id, STORED_PAUSED, PAUSE_REASON, only_from=frozenset({"active"})
    )
    return Outcome(account_id, "pause", before, before == "active")


def resume_account(store: Store, account_id: str) -> Outcome:
    """Put a paused account back in rotation (blocking: run it with ``store.run``)."""
    before = store.change_account_state(
        account_id, "active", None, only_from=frozenset({STORED_PAUSED})
    )
    return Outcome(account_id, "resume", before, before == STORED_PAUSED)
