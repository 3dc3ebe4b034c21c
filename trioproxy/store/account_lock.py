"""The lock on one account's tokens across processes, taken around a token refresh.

Upstream rotates refresh tokens: of two processes that refresh the same account with the same
refresh token, the second gets ``refresh_token_reused`` and the account needs a new login. On
PostgreSQL every replica therefore refreshes under a transaction-level advisory lock on the
account (``pg_advisory_xact_lock``, keyed on the account id), held by a connection of its own
from before it reads the stored tokens until after it has stored the rotated ones. A replica
that waited for the lock reads the tokens the winner stored and uses them instead of calling.

The lock belongs to that connection's transaction: it is released when the ``async with``
block ends, whatever ends it, and by the server if the process dies (its connection closes).
Waiting for it is bounded by ``lock_timeout`` (the wait runs in a worker thread, which trio
cannot interrupt).

On SQLite (one process) there is nothing to lock across; the block gets the stored record all
the same, so a refresh always starts from the newest stored tokens.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import sqlalchemy as sa
import trio

from trioproxy.store.records import AccountRecord

if TYPE_CHECKING:
    from trioproxy.store.store import Store

#: First key of the two-key advisory lock: the namespace of account-token locks ("tokn").
_LOCK_NAMESPACE = 0x746F6B6E


@asynccontextmanager
async def account_lock(
    store: Store, account_id: str, *, lock_wait: float, limiter: trio.CapacityLimiter
) -> AsyncIterator[AccountRecord | None]:
    """Hold the cross-process lock on ``account_id``'s tokens for the block; yields the
    account as stored once the lock is held (None if it was removed).

    Error handling: a lock not granted within ``lock_wait`` seconds, or a database error, is a
    :class:`sqlalchemy.exc.SQLAlchemyError` raised on entry.
    """
    engine = store.engine
    if engine.dialect.name != "postgresql":
        yield await store.run(store.get_account, account_id)
        return

    def take() -> tuple[sa.Connection, AccountRecord | None]:
        conn = engine.connect()
        try:
            conn.execute(
                sa.text("SELECT set_config('lock_timeout', :ms, true)"),
                {"ms": f"{max(1, int(lock_wait * 1000))}ms"},
            )
            conn.execute(
                sa.text("SELECT pg_advisory_xact_lock(:ns, hashtext(:account))"),
                {"ns": _LOCK_NAMESPACE, "account": account_id},
            )
            return conn, store.get_account(account_id)
        except BaseException:
            conn.close()
            raise

    def give_back(conn: sa.Connection) -> None:
        try:
            conn.rollback()  # ends the transaction, and with it the lock; nothing was written
        finally:
            conn.close()

    conn, record = await trio.to_thread.run_sync(take, limiter=limiter)
    try:
        yield record
    finally:
        with trio.CancelScope(shield=True):
            # not on ``limiter``: its threads may all be waiting for locks held elsewhere
            await trio.to_thread.run_sync(give_back, conn)
