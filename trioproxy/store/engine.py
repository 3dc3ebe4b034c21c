"""Engine construction and schema migrations.

SQLite: every connection gets WAL journaling (readers never block the writer), a busy
timeout (a second process, e.g. the CLI next to the server, waits instead of failing) and
``synchronous=NORMAL`` (durable enough with WAL). pysqlite's own transaction handling is
switched off and SQLAlchemy emits ``BEGIN`` itself, so DDL is transactional and writers can
ask for ``BEGIN IMMEDIATE`` (take the write lock up front: a deferred transaction that reads
and then writes can fail at once with SQLITE_BUSY, whatever the busy timeout).

Migrations: Alembic's script directory in ``migrations/`` runs inside one write
transaction at every open (on PostgreSQL under an advisory lock, so replicas starting
together migrate once). Up to date is a no-op.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool

from trioproxy.store.records import StoreError

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 10_000
#: Execution option read by the SQLite ``begin`` hook: "IMMEDIATE" for writers.
BEGIN_MODE = "trioproxy_sqlite_begin"
_PG_MIGRATION_LOCK = 0x7472696F  # "trio"
#: A PostgreSQL replica's connection pool: the store's worker threads (4) use at most 4 at a
#: time; the rest covers the store listener and token refreshes, which hold one connection
#: each while their account's lock is held. Beyond the pool, ``PG_POOL_OVERFLOW`` more are
#: opened on demand and closed when returned; a caller waits ``PG_POOL_TIMEOUT`` for one.
PG_POOL_SIZE = 8
PG_POOL_OVERFLOW = 8
PG_POOL_TIMEOUT = 30.0
#: The newest revision in ``migrations/versions`` (a test keeps the two in step). Opening an
#: up-to-date store compares against it and never imports Alembic, which keeps CLI commands
#: quick to start.
HEAD_REVISION = "0005"


def safe_url(url: str) -> str:
    """The URL with its password masked, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<unparseable database URL>"


def create_engine(url: str) -> sa.Engine:
    """A sync engine for ``url`` with the SQLite settings described above.

    ``hide_parameters`` keeps bound values (ciphertexts, key hashes) out of error messages.
    """
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError as exc:
        raise StoreError(f"database URL is not valid: {exc}") from None
    if parsed.get_backend_name() == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")  # psycopg 3, not psycopg2
        return sa.create_engine(
            parsed,
            hide_parameters=True,
            pool_pre_ping=True,
            pool_size=PG_POOL_SIZE,
            max_overflow=PG_POOL_OVERFLOW,
            pool_timeout=PG_POOL_TIMEOUT,
        )
    if parsed.get_backend_name() != "sqlite":
        raise StoreError(
            f"unsupported database {parsed.get_backend_name()!r}: use sqlite:/// or postgresql://"
        )
    database = parsed.database or ""
    options: dict[str, Any] = {}
    if database in ("", ":memory:"):
        # One shared connection, or each pooled connection would be a separate database.
        options = {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
    else:
        path = Path(database)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Created here so that it is private (SQLite gives -wal/-shm the same mode); an empty
        # file is an empty database.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    engine = sa.create_engine(parsed, hide_parameters=True, **options)
    sa.event.listen(engine, "connect", _sqlite_on_connect)
    sa.event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (see module docstring)
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _sqlite_on_begin(connection: sa.Connection) -> None:
    mode = connection.get_execution_options().get(BEGIN_MODE, "")
    connection.exec_driver_sql("BEGIN IMMEDIATE" if mode == "IMMEDIATE" else "BEGIN")


def writer(engine: sa.Engine) -> sa.Engine:
    """The same engine (shared pool) whose SQLite transactions take the write lock up front."""
    return engine.execution_options(**{BEGIN_MODE: "IMMEDIATE"})


def alembic_config() -> Any:
    """An ``alembic.config.Config`` pointing at ``migrations/``."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    return config


def head_revision() -> str | None:
    """The newest migration in the script directory (asks Alembic)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(connection: sa.Connection) -> str | None:
    """Where the database's schema is (its ``alembic_version`` row), None before the first."""
    if not sa.inspect(connection).has_table("alembic_version"):
        return None
    return connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()


def migrate(connection: sa.Connection) -> None:
    """Bring the schema to the newest revision inside ``connection``'s write transaction.

    Error handling: a database migrated by a newer trioproxy (an unknown revision) and
    other migration failures are a :class:`StoreError`.
    """
    if connection.dialect.name == "postgresql":
        connection.execute(
            sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK}
        )
    current = current_revision(connection)
    if current == HEAD_REVISION:
        return
    from alembic import command
    from alembic.util.exc import CommandError

    config = alembic_config()
    config.attributes["connection"] = connection
    try:
        command.upgrade(config, "head")
    except CommandError as exc:
        raise StoreError(
            f"cannot migrate the store's schema from revision {current}: {exc} "
            "(was it created by a newer trioproxy?)"
        ) from None


def describe_error(exc: sa.exc.SQLAlchemyError) -> str:
    """The driver's message (SQLAlchemy's own adds the statement)."""
    orig = getattr(exc, "orig", None)
    return str(orig) if orig is not None else type(exc).__name__
