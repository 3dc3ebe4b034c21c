"""What replicas on one database coordinate through it: leases and shared documents.

A **lease** (``meta`` row ``lease:<name>``: the holder's name and when the lease ends) lets
one process at a time do a job that must not run twice, such as polling upstream's usage
figures or sending alerts. :func:`take_lease` grants it to ``holder`` when nobody holds it,
when its holder's term has run out, or to its own holder again (a renewal); the check and
the write are one transaction (the row locked on PostgreSQL, the database on SQLite), so two
processes can never both be granted it. :func:`drop_lease` gives it up at once (a process
stopping cleanly); a process that dies simply stops renewing, and the lease is free when its
term ends. Terms are in each process's wall-clock time: clocks of replicas must agree to
well under a term (NTP does).

A **shared document** (``meta`` row ``doc:<name>``, JSON) is what one process learned for all
of them, like the model lists the lease holder fetched; saving one moves the version counter
``<name>_version`` (and notifies the other processes, ``store/listener.py``).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from trioproxy.store import schema

if TYPE_CHECKING:
    from trioproxy.store.store import Store

_LEASE = "lease:"
_DOC = "doc:"


def take_lease(
    store: Store, name: str, holder: str, term: float, *, now: float | None = None
) -> bool:
    """Grant (or renew) lease ``name`` to ``holder`` for ``term`` seconds; False when another
    holder's term is still running."""
    now = time.time() if now is None else now
    m = schema.meta
    key = _LEASE + name
    try:
        with store.write() as conn:
            row = conn.execute(
                sa.select(m.c.value_text, m.c.value_num).where(m.c.name == key).with_for_update()
            ).one_or_none()
            if row is None:
                conn.execute(m.insert().values(name=key, value_text=holder, value_num=now + term))
                return True
            current, until = row
            if current != holder and until is not None and until > now:
                return False
            conn.execute(
                m.update().where(m.c.name == key).values(value_text=holder, value_num=now + term)
            )
            return True
    except sa.exc.IntegrityError:
        return False  # another process inserted the row first: it holds the lease


def drop_lease(store: Store, name: str, holder: str) -> None:
    """Give lease ``name`` up if ``holder`` holds it."""
    m = schema.meta
    with store.write() as conn:
        conn.execute(m.delete().where(m.c.name == _LEASE + name, m.c.value_text == holder))


def lease_holder(store: Store, name: str) -> tuple[str, float] | None:
    """Who holds lease ``name`` and until when (None: nobody ever took it or it was given up)."""
    m = schema.meta
    with store.read() as conn:
        row = conn.execute(
            sa.select(m.c.value_text, m.c.value_num).where(m.c.name == _LEASE + name)
        ).one_or_none()
    return None if row is None else (str(row[0]), float(row[1] or 0.0))


def save_document(store: Store, name: str, value: Any, *, now: float | None = None) -> None:
    """Store ``value`` (JSON) as shared document ``name`` and move ``<name>_version``."""
    from trioproxy.store.store import bump_version, dialect_insert

    now = time.time() if now is None else now
    m = schema.meta
    text = json.dumps(value, separators=(",", ":"))
    with store.write() as conn:
        insert = dialect_insert(conn, m).values(name=_DOC + name, value_text=text, value_num=now)
        conn.execute(
            insert.on_conflict_do_update(
                index_elements=[m.c.name],
                set_={
                    "value_num": insert.excluded.value_num,
                    "value_text": insert.excluded.value_text,
                },
            )
        )
        bump_version(conn, f"{name}_version", now)


def load_document(store: Store, name: str) -> Any:
    """Shared document ``name`` (None when there is none or it cannot be read)."""
    m = schema.meta
    with store.read() as conn:
        text = conn.execute(
            sa.select(m.c.value_text).where(m.c.name == _DOC + name)
        ).scalar_one_or_none()
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def document_version(store: Store, name: str) -> float:
    """The version counter of shared document ``name`` (0.0 before it is first saved)."""
    m = schema.meta
    with store.read() as conn:
        value = conn.execute(
            sa.select(m.c.value_num).where(m.c.name == f"{name}_version")
        ).scalar_one_or_none()
    return float(value or 0.0)
