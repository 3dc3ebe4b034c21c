"""Account and key records as the store keeps them (re-exported for the pool), and how an
account that needs a new sign-in is fixed (said the same way by ``accounts list`` and the
``account.reauth_required`` alert), and the name a paused account's state is shown by."""

from trioproxy.store import AccountRecord, ApiKeyRecord

__all__ = [
    "PAUSED",
    "RELOGIN_COMMAND",
    "STORED_PAUSED",
    "AccountRecord",
    "ApiKeyRecord",
    "relogin_hint",
    "shown_state",
]

#: the stored state (``store.records.ACCOUNT_STATES``) of an account an operator paused, and
#: the name the API, the commands and the dashboard show it by
STORED_PAUSED = "disabled"
PAUSED = "paused"


def shown_state(stored: str) -> str:
    """A stored account state as users see it (``disabled`` is ``paused``)."""
    return PAUSED if stored == STORED_PAUSED else stored


#: The command that fixes an account in ``reauth_required``: signing in again as the same
#: ChatGPT account updates it in place (same id, history kept; docs/accounts.md).
RELOGIN_COMMAND = "trioproxy accounts login --device"


def relogin_hint(email: str | None, command: str = RELOGIN_COMMAND) -> str:
    """What to do about an account whose tokens no longer work."""
    who = f" as {email}" if email else ""
    return f"run `{command}` and sign in{who}; it updates the account in place"
