"""The dashboard's admins in the store (table ``dashboard_admins``).

An admin is a name and a password hash (``trioproxy/dashboard/passwords.py`` makes and
checks it; the store only keeps the string). The functions take a :class:`Store` and do
blocking database I/O like its methods: the CLI calls them directly, async code through
``store.run(fn, store, ...)``.
"""

from __future__ import annotations

import time
from typing import Any

import attrs
import sqlalchemy as sa

from trioproxy.store import schema
from trioproxy.store.store import Store


@attrs.frozen(kw_only=True)
class AdminRecord:
    """One admin; the hash stays out of ``repr()``."""

    name: str
    password_hash: str = attrs.field(repr=False)
    created_at: float
    password_set_at: float
    last_login_at: float | None = None

    def public_view(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "created_at": self.created_at,
            "password_set_at": self.password_set_at,
            "last_login_at": self.last_login_at,
        }


def _record(row: sa.Row[Any]) -> AdminRecord:
    return AdminRecord(
        name=row.name,
        password_hash=row.password_hash,
        created_at=row.created_at,
        password_set_at=row.password_set_at,
        last_login_at=row.last_login_at,
    )


def list_admins(store: Store) -> list[AdminRecord]:
    """Every admin, by name."""
    t = schema.dashboard_admins
    with store._read() as conn:
        rows = conn.execute(sa.select(t).order_by(t.c.name)).all()
    return [_record(row) for row in rows]


def get_admin(store: Store, name: str) -> AdminRecord | None:
    t = schema.dashboard_admins
    with store._read() as conn:
        row = conn.execute(sa.select(t).where(t.c.name == name)).one_or_none()
    return None if row is None else _record(row)


def create_admin(
    store: Store, name: str, password_hash: str, *, now: float | None = None
) -> AdminRecord | None:
    """Add an admin; None, changing nothing, when one of that name exists."""
    now = time.time() if now is None else now
    t = schema.dashboard_admins
    try:
        with store._write() as conn:
            if conn.execute(sa.select(t.c.name).where(t.c.name == name)).first() is not None:
                return None
            conn.execute(
                t.insert().values(
                    name=name, password_hash=password_hash, created_at=now, password_set_at=now
                )
            )
    except sa.exc.IntegrityError:
        return None  # PostgreSQL: another replica added it between the SELECT and the INSERT
    return get_admin(store, name)


def create_first_admin(
    store: Store, name: str, password_hash: str, *, now: float | None = None
) -> AdminRecord | None:
    """Add an admin only when there is none at all (a server's first start); None when
    there already is one (another replica may have just added it)."""
    now = time.time() if now is None else now
    t = schema.dashboard_admins
    try:
        with store._write() as conn:
            if conn.execute(sa.select(t.c.name).limit(1)).first() is not None:
                return None
            conn.execute(
                t.insert().values(
                    name=name, password_hash=password_hash, created_at=now, password_set_at=now
                )
            )
    except sa.exc.IntegrityError:
        return None
    return get_admin(store, name)


def set_password(store: Store, name: str, password_hash: str, *, now: float | None = None) -> bool:
    """Replace an admin's password hash; False when there is no such admin."""
    now = time.time() if now is None else now
    t = schema.dashboard_admins
    with store._write() as conn:
        result = conn.execute(
            t.update()
            .where(t.c.name == name)
            .values(password_hash=password_hash, password_set_at=now)
        )
    return bool(result.rowcount)


def remove_admin(store: Store, name: str) -> bool:
    """Delete an admin; False when there was none of that name."""
    t = schema.dashboard_admins
    with store._write() as conn:
        result = conn.execute(t.delete().where(t.c.name == name))
    return bool(result.rowcount)


def record_login(store: Store, name: str, when: float) -> None:
    """Note an admin's successful sign-in."""
    t = schema.dashboard_admins
    with store._write() as conn:
        conn.execute(t.update().where(t.c.name == name).values(last_login_at=when))
