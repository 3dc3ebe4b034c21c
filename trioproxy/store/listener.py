"""Changes made by other processes, as soon as PostgreSQL tells of them.

Every write that bumps one of the store's version counters (``accounts_version``,
``quota_version``, ``keys_version``) also sends ``NOTIFY trioproxy, '<name>'`` in the same
transaction (PostgreSQL delivers it on commit). :func:`listen` holds a connection of its own
that ``LISTEN``s on that channel and calls ``on_change(name)`` for each notification; right
after every (re)connection it calls ``on_change("*")``, since anything may have changed while
it was not listening. It waits on the connection's socket with trio (no thread), so
cancelling it is immediate.

On SQLite (one process, or the CLI beside the server) there is nothing to listen to: it
returns at once, and the caller's periodic poll is all there is. A lost connection is logged
and reopened after a pause that doubles up to a minute; meanwhile the poll still runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
import trio

from trioproxy.logs import get_logger

CHANNEL = "trioproxy"
CONNECT_TIMEOUT = 10
_MAX_PAUSE = 60.0

log = get_logger("trioproxy.store")


async def listen(
    engine: sa.Engine,
    on_change: Callable[[str], None],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Call ``on_change`` for every change to the store at ``engine`` notified by other
    processes, until cancelled."""
    task_status.started()
    if engine.dialect.name != "postgresql":
        return
    import psycopg

    dsn = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    pause = 1.0
    while True:
        conn: Any = None
        try:
            conn = await trio.to_thread.run_sync(
                lambda: psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
            )
            await trio.to_thread.run_sync(conn.execute, f"LISTEN {CHANNEL}")
            pause = 1.0
            on_change("*")
            while True:
                await trio.lowlevel.wait_readable(conn.fileno())
                for notification in conn.notifies(timeout=0):
                    on_change(notification.payload)
        except psycopg.Error as exc:
            log.warning(
                "store listener lost its connection",
                error=type(exc).__name__,
                retry_in=pause,
            )
        finally:
            if conn is not None:
                conn.close()
        await trio.sleep(pause)
        pause = min(pause * 2, _MAX_PAUSE)
