"""Persistence: SQLAlchemy Core on a sync engine, called from async code through
:meth:`Store.run` (one bounded ``to_thread`` helper). SQLite by default, PostgreSQL for
several replicas; schema migrations (Alembic) run when the store opens."""

from trioproxy.store.records import (
    ACCOUNT_STATES,
    AccountRecord,
    ApiKeyRecord,
    StoreError,
    StoreStatistics,
)
from trioproxy.store.store import Store

__all__ = [
    "ACCOUNT_STATES",
    "AccountRecord",
    "ApiKeyRecord",
    "Store",
    "StoreError",
    "StoreStatistics",
]
