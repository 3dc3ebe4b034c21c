"""Account and key records as the store keeps them (re-exported for the pool)."""

from trioproxy.store import AccountRecord, ApiKeyRecord

__all__ = ["AccountRecord", "ApiKeyRecord"]
