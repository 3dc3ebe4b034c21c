"""Account and key records as the store keeps them (re-exported for the pool), and how an
account that needs a new sign-in is fixed (said the same way by ``accounts list`` and the
``account.reauth_required`` alert)."""

from trioproxy.store import AccountRecord, ApiKeyRecord

__all__ = ["RELOGIN_COMMAND", "AccountRecord", "ApiKeyRecord", "relogin_hint"]

#: The command that fixes an account in ``reauth_required``: signing in again as the same
#: ChatGPT account updates it in place (same id, history kept; docs/accounts.md).
RELOGIN_COMMAND = "trioproxy accounts login --device"


def relogin_hint(email: str | None, command: str = RELOGIN_COMMAND) -> str:
    """What to do about an account whose tokens no longer work."""
    who = f" as {email}" if email else ""
    return f"run `{command}` and sign in{who}; it updates the account in place"
