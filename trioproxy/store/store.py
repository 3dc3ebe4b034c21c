"""The store: accounts (tokens encrypted at rest), client API keys and the request log.

Resource handling
-----------------
:meth:`Store.open` is synchronous: it creates the data folder, runs migrations and loads the
encryption key. Every other method is synchronous too and does blocking database I/O. Async
code calls them through :meth:`Store.run`, the one place that crosses into a worker thread,
bounded by a :class:`trio.CapacityLimiter` (one thread for SQLite, which has one writer
anyway; four for PostgreSQL by default). The CLI calls them directly. :meth:`Store.close`
disposes of the connection pool and is idempotent.

Error handling
--------------
Problems a user can fix (wrong secret key, unreadable key file, a database from a newer
version, an unreachable database) are :class:`StoreError` with a message naming the cause.
Token plaintext never reaches SQL (only ciphertext does), and bound parameters are kept out
of SQLAlchemy's error messages, so no exception text carries token material.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar

import attrs
import sqlalchemy as sa
import trio

from trioproxy.store import apikeys, request_query, schema
from trioproxy.store import engine as _engine
from trioproxy.store.crypto import TokenCipher
from trioproxy.store.listener import CHANNEL
from trioproxy.store.records import (
    ACCOUNT_STATES,
    AccountRecord,
    ApiKeyRecord,
    StoreError,
    StoreStatistics,
)
from trioproxy.store.request_query import RequestFilter

T = TypeVar("T")


class Unchanged:
    """The type of :data:`UNCHANGED`: an argument left out of an update."""


UNCHANGED = Unchanged()

#: accounts_version grows by at least this much per change (a float near 1.7e9 has ~2e-7 of
#: resolution, so smaller steps could vanish).
_VERSION_STEP = 0.001
_QUOTA_PREFIX = "quota:"


@attrs.define(eq=False, repr=False)
class Store:
    """Persistence for trioproxy; see the module docstring. Build it with :meth:`open`."""

    _engine: sa.Engine
    _cipher: TokenCipher
    _limiter: trio.CapacityLimiter
    url: str  #: the database URL with its password masked
    _closed: bool = False
    _writer: sa.Engine = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._writer = _engine.writer(self._engine)

    def __repr__(self) -> str:
        return f"<Store {self.url}{' closed' if self._closed else ''}>"

    # -- lifetime -----------------------------------------------------------------------------
    @classmethod
    def open(
        cls, url: str, *, data_dir: Path, secret_key: str = "", max_threads: int | None = None
    ) -> Store:
        """Open (creating and migrating as needed) the store at SQLAlchemy ``url``.

        ``data_dir`` is created (mode 0700) and holds ``secret.key`` when ``secret_key`` is
        empty. ``max_threads`` bounds :meth:`run` (default 1 for SQLite, 4 otherwise).
        """
        masked = _engine.safe_url(url)
        try:
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            cipher = TokenCipher.from_settings(secret_key, data_dir)
            engine = _engine.create_engine(url)
        except OSError as exc:
            where = exc.filename or data_dir
            raise StoreError(f"cannot use {where}: {exc.strerror or exc}") from None
        try:
            with _engine.writer(engine).begin() as conn:
                _engine.migrate(conn)
                cipher.check_store(conn, masked)
        except StoreError:
            engine.dispose()
            raise
        except sa.exc.SQLAlchemyError as exc:
            engine.dispose()
            raise StoreError(
                f"cannot open the store at {masked}: {_engine.describe_error(exc)}"
            ) from None
        if max_threads is None:
            max_threads = 1 if engine.dialect.name == "sqlite" else 4
        return cls(engine, cipher, trio.CapacityLimiter(max_threads), masked)

    def close(self) -> None:
        """Dispose of the connection pool (idempotent)."""
        if not self._closed:
            self._closed = True
            self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def run(self, fn: Callable[..., T], *args: Any, abandon_on_cancel: bool = False) -> T:
        """Run the blocking ``fn(*args)`` (usually a method of this store) in a worker thread.

        Cancellation waits for the call to finish (a write is never abandoned half-way), so
        callers that must stay responsive put a deadline around the whole operation. A read
        that must return at its deadline passes ``abandon_on_cancel``: a cancellation returns
        at once, and the thread finishes on its own (holding its slot of the limiter until
        then).
        """
        return await trio.to_thread.run_sync(
            functools.partial(fn, *args), limiter=self._limiter, abandon_on_cancel=abandon_on_cancel
        )

    @property
    def engine(self) -> sa.Engine:
        """The SQLAlchemy engine (for the store's own modules: locks, listeners)."""
        return self._engine

    def statistics(self) -> StoreStatistics:
        stats = self._limiter.statistics()
        return StoreStatistics(
            dialect=self._engine.dialect.name,
            max_threads=int(stats.total_tokens),
            threads_busy=stats.borrowed_tokens,
            tasks_waiting=stats.tasks_waiting,
        )

    def schema_version(self) -> str | None:
        """The Alembic revision the database is at."""
        with self._read() as conn:
            return _engine.current_revision(conn)

    def _read(self) -> sa.Connection:
        if self._closed:
            raise StoreError("the store is closed")
        return self._engine.connect()

    def _write(self) -> AbstractContextManager[sa.Connection]:
        """A connection in a write transaction (SQLite: BEGIN IMMEDIATE), committed on exit."""
        if self._closed:
            raise StoreError("the store is closed")
        return self._writer.begin()

    def read(self) -> sa.Connection:
        """A connection for reads (for the store's own modules, e.g. ``coordination.py``)."""
        return self._read()

    def write(self) -> AbstractContextManager[sa.Connection]:
        """A connection in a write transaction, committed on exit (the store's own modules)."""
        return self._write()

    # -- accounts ---------------------------------------------------------------------------
    def upsert_account(
        self, record: AccountRecord, *, now: float | None = None
    ) -> tuple[AccountRecord, bool]:
        """Insert ``record``, or update the stored account with the same id (tokens, email,
        plan, ...: everything but ``created_at``) and make it active again.

        Returns the stored record and whether it was created."""
        now = time.time() if now is None else now
        values: dict[str, Any] = {
            "email": record.email,
            "plan": record.plan,
            "user_id": record.user_id,
            "state": "active",
            "state_reason": None,
            "access_token_enc": self._cipher.encrypt(record.access_token),
            "refresh_token_enc": self._cipher.encrypt(record.refresh_token),
            "id_token_enc": None
            if record.id_token is None
            else self._cipher.encrypt(record.id_token),
            "access_expires_at": record.access_expires_at,
            "last_refresh": record.last_refresh,
            "updated_at": now,
        }
        for attempt in range(2):
            try:
                with self._write() as conn:
                    created_at, created = _insert_or_update(conn, record, values)
                    _bump_version(conn, "accounts_version", now)
                break
            except sa.exc.IntegrityError:
                # PostgreSQL: another writer inserted the same id between our SELECT and
                # INSERT; the second attempt sees the row and updates it.
                if attempt:
                    raise
        stored = attrs.evolve(
            record, state="active", state_reason=None, created_at=created_at, updated_at=now
        )
        return stored, created

    def get_account(self, account_id: str) -> AccountRecord | None:
        t = schema.accounts
        with self._read() as conn:
            row = conn.execute(sa.select(t).where(t.c.account_id == account_id)).one_or_none()
        return None if row is None else self._account_from_row(row)

    def list_accounts(self) -> list[AccountRecord]:
        """All accounts, oldest first."""
        t = schema.accounts
        with self._read() as conn:
            rows = conn.execute(sa.select(t).order_by(t.c.created_at, t.c.account_id)).all()
        return [self._account_from_row(row) for row in rows]

    def remove_account(self, account_id: str, *, now: float | None = None) -> bool:
        """Delete an account; False if there was none with that id."""
        t = schema.accounts
        with self._write() as conn:
            deleted = conn.execute(t.delete().where(t.c.account_id == account_id)).rowcount
            if deleted:
                m = schema.meta  # its saved quota state goes with it
                conn.execute(m.delete().where(m.c.name == _QUOTA_PREFIX + account_id))
                _bump_version(conn, "accounts_version", time.time() if now is None else now)
        return bool(deleted)

    def update_tokens(
        self,
        account_id: str,
        *,
        access_token: str,
        refresh_token: str,
        id_token: str | None,
        access_expires_at: float | None,
        last_refresh: float,
        now: float | None = None,
    ) -> bool:
        """Store refreshed tokens (``id_token=None`` keeps the stored id token).

        Returns False, changing nothing, if the account was removed meanwhile."""
        values: dict[str, Any] = {
            "access_token_enc": self._cipher.encrypt(access_token),
            "refresh_token_enc": self._cipher.encrypt(refresh_token),
            "access_expires_at": access_expires_at,
            "last_refresh": last_refresh,
        }
        if id_token is not None:
            values["id_token_enc"] = self._cipher.encrypt(id_token)
        return self._update_account(account_id, values, now)

    def set_account_state(
        self, account_id: str, state: str, reason: str | None, *, now: float | None = None
    ) -> bool:
        """Set the persistent state (one of :data:`ACCOUNT_STATES`); False if no such account."""
        if state not in ACCOUNT_STATES:
            raise ValueError(f"unknown account state {state!r}")
        return self._update_account(account_id, {"state": state, "state_reason": reason}, now)

    def _update_account(self, account_id: str, values: dict[str, Any], now: float | None) -> bool:
        now = time.time() if now is None else now
        t = schema.accounts
        with self._write() as conn:
            result = conn.execute(
                t.update().where(t.c.account_id == account_id).values(updated_at=now, **values)
            )
            if result.rowcount:
                _bump_version(conn, "accounts_version", now)
        return bool(result.rowcount)

    # -- quota (what the pool learned; survives a restart, read by `accounts list`) ----------
    def save_quota(
        self, states: Mapping[str, Mapping[str, Any]], *, now: float | None = None
    ) -> None:
        """Store each account's quota state (JSON) as a ``meta`` row ``quota:<account_id>``."""
        if not states:
            return
        now = time.time() if now is None else now
        m = schema.meta
        with self._write() as conn:
            insert = _dialect_insert(conn, m)
            upsert = insert.on_conflict_do_update(
                index_elements=[m.c.name],
                set_={
                    "value_num": insert.excluded.value_num,
                    "value_text": insert.excluded.value_text,
                },
            )
            conn.execute(
                upsert,
                [
                    {
                        "name": _QUOTA_PREFIX + account_id,
                        "value_num": now,
                        "value_text": json.dumps(state, separators=(",", ":")),
                    }
                    for account_id, state in states.items()
                ],
            )
            _bump_version(conn, "quota_version", now)

    def quota_version(self) -> float:
        """A number that grows whenever quota states are saved (by this or another process)."""
        return self._version("quota_version")

    def load_quota(self) -> dict[str, dict[str, Any]]:
        """The stored quota states by account id (unreadable rows are skipped)."""
        m = schema.meta
        with self._read() as conn:
            rows = conn.execute(
                sa.select(m.c.name, m.c.value_text).where(m.c.name.startswith(_QUOTA_PREFIX))
            ).all()
        states: dict[str, dict[str, Any]] = {}
        for name, text in rows:
            try:
                value = json.loads(text or "null")
            except ValueError:
                continue
            if isinstance(value, dict):
                states[name[len(_QUOTA_PREFIX) :]] = value
        return states

    def accounts_version(self) -> float:
        """A number that grows whenever an account is added, changed or removed (0.0 for a
        new store): a server polls it to pick up changes made by the CLI or other replicas."""
        return self._version("accounts_version")

    def _version(self, name: str) -> float:
        m = schema.meta
        with self._read() as conn:
            value = conn.execute(
                sa.select(m.c.value_num).where(m.c.name == name)
            ).scalar_one_or_none()
        return float(value or 0.0)

    def _account_from_row(self, row: sa.Row[Any]) -> AccountRecord:
        what = f"the tokens of account {row.account_id}"
        decrypt = functools.partial(self._cipher.decrypt, what=what)
        return AccountRecord(
            account_id=row.account_id,
            email=row.email,
            plan=row.plan,
            user_id=row.user_id,
            access_token=decrypt(row.access_token_enc),
            refresh_token=decrypt(row.refresh_token_enc),
            id_token=None if row.id_token_enc is None else decrypt(row.id_token_enc),
            access_expires_at=row.access_expires_at,
            last_refresh=row.last_refresh,
            state=row.state,
            state_reason=row.state_reason,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )

    # -- API keys ---------------------------------------------------------------------------
    def create_api_key(
        self,
        name: str,
        *,
        policy: Mapping[str, Any] | None = None,
        expires_at: float | None = None,
        now: float | None = None,
    ) -> tuple[ApiKeyRecord, str]:
        """Create a key; returns its record and its plaintext ``trx_<key_id>_<secret>``, which
        is shown this once: only its SHA-256 is stored. ``policy`` is stored as given (the
        caller has checked it)."""
        name = name.strip()
        if not name:
            raise ValueError("an API key needs a name")
        now = time.time() if now is None else now
        for _ in range(5):
            key_id, plaintext = apikeys.new_api_key()
            row = {
                "key_id": key_id,
                "name": name,
                "key_hash": apikeys.hash_api_key(plaintext),
                "policy": _policy_text(policy),
                "expires_at": expires_at,
                "created_at": now,
                "updated_at": now,
            }
            try:
                with self._write() as conn:
                    conn.execute(schema.api_keys.insert().values(**row))
                    _bump_version(conn, "keys_version", now)
            except sa.exc.IntegrityError:
                continue  # key_id collision: draw another
            record = self.get_api_key(key_id)
            assert record is not None
            return record, plaintext
        raise StoreError("could not allocate a unique API key id")

    def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        t = schema.api_keys
        with self._read() as conn:
            row = conn.execute(sa.select(t).where(t.c.key_id == key_id)).one_or_none()
        return None if row is None else _api_key_from_row(row)

    def list_api_keys(self) -> list[ApiKeyRecord]:
        """All keys, revoked ones included, oldest first."""
        t = schema.api_keys
        with self._read() as conn:
            rows = conn.execute(sa.select(t).order_by(t.c.created_at, t.c.key_id)).all()
        return [_api_key_from_row(row) for row in rows]

    def update_api_key(
        self,
        key_id: str,
        *,
        name: str | None = None,
        policy: Mapping[str, Any] | Unchanged | None = UNCHANGED,
        expires_at: float | Unchanged | None = UNCHANGED,
        disabled: bool | None = None,
        now: float | None = None,
    ) -> ApiKeyRecord | None:
        """Change a key that is not revoked: its name, policy (None: no policy), expiry
        (None: never), or disable/enable it (keeping the first disabling time). Arguments
        left out are unchanged. None if there is no such key; a revoked key is a
        ValueError (revocation is final)."""
        now = time.time() if now is None else now
        t = schema.api_keys
        values: dict[str, Any] = {"updated_at": now}
        if name is not None:
            if not name.strip():
                raise ValueError("an API key needs a name")
            values["name"] = name.strip()
        if not isinstance(policy, Unchanged):
            values["policy"] = _policy_text(policy)
        if not isinstance(expires_at, Unchanged):
            values["expires_at"] = expires_at
        with self._write() as conn:
            row = conn.execute(sa.select(t).where(t.c.key_id == key_id)).one_or_none()
            if row is None:
                return None
            if row.revoked_at is not None:
                raise ValueError(f"key {key_id} is revoked; revocation cannot be undone")
            if disabled is True and row.disabled_at is None:
                values["disabled_at"] = now
            elif disabled is False:
                values["disabled_at"] = None
            conn.execute(t.update().where(t.c.key_id == key_id).values(values))
            _bump_version(conn, "keys_version", now)
        return self.get_api_key(key_id)

    def rotate_api_key(
        self, key_id: str, *, now: float | None = None
    ) -> tuple[ApiKeyRecord, str] | None:
        """A new secret for a key that is not revoked (its id, policy, usage and budgets
        stay); the old secret stops working. Returns the record and the new plaintext, or
        None if there is no such key; a revoked key is a ValueError."""
        now = time.time() if now is None else now
        t = schema.api_keys
        plaintext = apikeys.new_secret(key_id)
        with self._write() as conn:
            row = conn.execute(sa.select(t.c.revoked_at).where(t.c.key_id == key_id)).first()
            if row is None:
                return None
            if row.revoked_at is not None:
                raise ValueError(f"key {key_id} is revoked; revocation cannot be undone")
            conn.execute(
                t.update()
                .where(t.c.key_id == key_id)
                .values(key_hash=apikeys.hash_api_key(plaintext), rotated_at=now, updated_at=now)
            )
            _bump_version(conn, "keys_version", now)
        record = self.get_api_key(key_id)
        assert record is not None
        return record, plaintext

    def revoke_api_key(self, key_id: str, *, now: float | None = None) -> bool:
        """Revoke a key (keeping the first revocation time); False if there is no such key."""
        t = schema.api_keys
        now = time.time() if now is None else now
        with self._write() as conn:
            conn.execute(
                t.update()
                .where(t.c.key_id == key_id, t.c.revoked_at.is_(None))
                .values(revoked_at=now, updated_at=now)
            )
            exists = conn.execute(sa.select(t.c.key_id).where(t.c.key_id == key_id)).first()
            if exists is not None:
                _bump_version(conn, "keys_version", now)
        return exists is not None

    def verify_api_key(self, presented: str, *, now: float | None = None) -> ApiKeyRecord | None:
        """The key's record if ``presented`` is a valid key that is neither revoked, disabled
        nor expired, else None (constant-time hash comparison)."""
        key_id = apikeys.key_id_of(presented)
        if key_id is None:
            return None
        t = schema.api_keys
        with self._read() as conn:
            row = conn.execute(sa.select(t).where(t.c.key_id == key_id)).one_or_none()
        if not apikeys.hash_matches(presented, None if row is None else row.key_hash):
            return None
        assert row is not None
        record = _api_key_from_row(row)
        if record.status(time.time() if now is None else now) != "active":
            return None
        return record

    def touch_api_keys(self, last_used: Mapping[str, float]) -> None:
        """Write keys' ``last_used_at`` (unix seconds by key id)."""
        if not last_used:
            return
        t = schema.api_keys
        with self._write() as conn:
            for key_id, when in last_used.items():
                conn.execute(t.update().where(t.c.key_id == key_id).values(last_used_at=when))

    def keys_version(self) -> float:
        """A number that grows whenever an API key is created, changed, rotated or revoked."""
        return self._version("keys_version")

    def active_api_key_count(self) -> int:
        """Unrevoked keys (zero means: clients are admitted from loopback only)."""
        t = schema.api_keys
        with self._read() as conn:
            count = conn.execute(
                sa.select(sa.func.count()).select_from(t).where(t.c.revoked_at.is_(None))
            ).scalar_one()
        return int(count)

    # -- usage and budget counters (keys/accounting.py) ---------------------------------------
    def flush_usage(
        self,
        buckets: Sequence[Mapping[str, Any]],
        counters: Mapping[str, str],
        *,
        replica: str,
        last_used: Mapping[str, float] | None = None,
        now: float | None = None,
    ) -> None:
        """Write one batch of accounting in one transaction: ``buckets`` are added to the
        hourly usage rows (each has ``hour``, ``key_id``, ``account_id``, ``model`` and the
        counts of :data:`schema.USAGE_COUNTS`), ``counters`` (key id -> JSON state) replace
        this replica's budget counters, ``last_used`` updates keys' ``last_used_at``."""
        now = time.time() if now is None else now
        u, c, k = schema.usage_hourly, schema.key_counters, schema.api_keys
        with self._write() as conn:
            # one statement each, executed for many rows (executemany)
            if buckets:
                insert = _dialect_insert(conn, u)
                conn.execute(
                    insert.on_conflict_do_update(
                        index_elements=["hour", "key_id", "account_id", "model"],
                        set_={
                            name: getattr(u.c, name) + getattr(insert.excluded, name)
                            for name in schema.USAGE_COUNTS
                        },
                    ),
                    list(buckets),
                )
            if counters:
                upsert = _dialect_insert(conn, c)
                conn.execute(
                    upsert.on_conflict_do_update(
                        index_elements=["key_id", "replica"],
                        set_={
                            "state": upsert.excluded.state,
                            "updated_at": upsert.excluded.updated_at,
                        },
                    ),
                    [
                        {"key_id": key_id, "replica": replica, "state": state, "updated_at": now}
                        for key_id, state in counters.items()
                    ],
                )
            if last_used:
                conn.execute(
                    k.update()
                    .where(k.c.key_id == sa.bindparam("touched_key"))
                    .values(last_used_at=sa.bindparam("touched_at")),
                    [{"touched_key": key, "touched_at": when} for key, when in last_used.items()],
                )

    def load_key_counters(self, replica: str) -> dict[str, str]:
        """This replica's stored budget counters: key id -> JSON state."""
        c = schema.key_counters
        with self._read() as conn:
            rows = conn.execute(
                sa.select(c.c.key_id, c.c.state).where(c.c.replica == replica)
            ).all()
        return {key_id: state for key_id, state in rows}

    def other_key_counters(self, replica: str, since: float) -> list[tuple[str, str, str, float]]:
        """Other replicas' budget counters written after ``since``: (key id, replica, JSON
        state, written at), oldest write first."""
        c = schema.key_counters
        with self._read() as conn:
            rows = conn.execute(
                sa.select(c.c.key_id, c.c.replica, c.c.state, c.c.updated_at)
                .where(c.c.replica != replica, c.c.updated_at > since)
                .order_by(c.c.updated_at)
            ).all()
        return [(k, r, state, float(at)) for k, r, state, at in rows]

    def key_usage_by_hour(self, key_id: str, since: float) -> list[dict[str, Any]]:
        """A key's usage summed over accounts and models, one dict per hour from the hour
        that holds ``since`` on, oldest first (to seed a budget that has no counters).
        Requests that reached no account (``account_id`` empty) spent nothing and are left
        out."""
        u = schema.usage_hourly
        hour_start = since - since % 3600
        columns = [sa.func.sum(getattr(u.c, name)).label(name) for name in schema.USAGE_COUNTS]
        with self._read() as conn:
            rows = conn.execute(
                sa.select(u.c.hour, *columns)
                .where(u.c.key_id == key_id, u.c.hour >= hour_start, u.c.account_id != "")
                .group_by(u.c.hour)
                .order_by(u.c.hour)
            ).all()
        return [dict(row._mapping) for row in rows]

    def usage_report(self, **filters: Any) -> list[dict[str, Any]]:
        """Usage summed by time bucket, key, account and model (see
        :func:`trioproxy.store.usage_report.usage_report` for ``filters``)."""
        from trioproxy.store.usage_report import usage_report

        with self._read() as conn:
            return usage_report(conn, **filters)

    # -- request log ------------------------------------------------------------------------
    def insert_request_logs(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append request records in one transaction.

        Keys are the ``request_log`` columns (``time`` defaults to now, others to NULL);
        ``decision`` may be any JSON-able value. An unknown key is a ValueError."""
        if not rows:
            return
        now = time.time()
        prepared = [schema.request_log_values(row, now) for row in rows]
        with self._write() as conn:
            conn.execute(schema.request_log.insert(), prepared)

    def recent_requests(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest ``limit`` request records, newest first, ``decision`` parsed."""
        t = schema.request_log
        with self._read() as conn:
            rows = conn.execute(sa.select(t).order_by(t.c.id.desc()).limit(limit)).all()
        return [schema.request_log_record(row._mapping) for row in rows]

    def prune_request_logs(self, before: float) -> int:
        """Delete request records older than ``before`` (unix seconds); returns how many."""
        t = schema.request_log
        with self._write() as conn:
            return int(conn.execute(t.delete().where(t.c.time < before)).rowcount)

    def query_requests(self, which: RequestFilter) -> list[dict[str, Any]]:
        """The request records ``which`` selects, newest first (``request_query.py``)."""
        with self._read() as conn:
            return request_query.query_requests(conn, which)

    def change_account_state(
        self,
        account_id: str,
        state: str,
        reason: str | None,
        *,
        only_from: frozenset[str],
        now: float | None = None,
    ) -> str | None:
        """Set the account's persistent state to ``state`` if it is one of ``only_from``,
        read and written in one transaction (the row locked on PostgreSQL), so a concurrent
        change of state is not overwritten. Returns the state it had before (the change was
        made if that is in ``only_from``), None if there is no such account."""
        if state not in ACCOUNT_STATES:
            raise ValueError(f"unknown account state {state!r}")
        now = time.time() if now is None else now
        t = schema.accounts
        with self._write() as conn:
            before = conn.execute(
                sa.select(t.c.state).where(t.c.account_id == account_id).with_for_update()
            ).scalar_one_or_none()
            if before in only_from:
                conn.execute(
                    t.update()
                    .where(t.c.account_id == account_id)
                    .values(state=state, state_reason=reason, updated_at=now)
                )
                _bump_version(conn, "accounts_version", now)
        return None if before is None else str(before)


def _dialect_insert(conn: sa.Connection, table: sa.Table) -> Any:
    """``INSERT`` with ``ON CONFLICT`` for this connection's dialect (SQLite, PostgreSQL)."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(table)
    from sqlalchemy.dialects import sqlite

    return sqlite.insert(table)


def _insert_or_update(
    conn: sa.Connection, record: AccountRecord, values: dict[str, Any]
) -> tuple[float, bool]:
    """Write an account row; returns its ``created_at`` and whether it was inserted."""
    t = schema.accounts
    where = t.c.account_id == record.account_id
    created_at: float | None = conn.execute(sa.select(t.c.created_at).where(where)).scalar()
    if created_at is not None:
        conn.execute(t.update().where(where).values(values))
        return created_at, False
    conn.execute(
        t.insert().values(account_id=record.account_id, created_at=record.created_at, **values)
    )
    return record.created_at, True


def _bump_version(conn: sa.Connection, name: str, now: float) -> None:
    """Move the version counter ``name`` on (creating it at ``now``); on PostgreSQL, tell
    the other processes too (``store/listener.py``; delivered when the transaction commits)."""
    m = schema.meta
    bumped = m.c.value_num + _VERSION_STEP
    result = conn.execute(
        m.update()
        .where(m.c.name == name)
        .values(value_num=sa.case((bumped > now, bumped), else_=sa.literal(now, sa.Double)))
    )
    if not result.rowcount:  # (two processes may both find it missing)
        insert = _dialect_insert(conn, m).values(name=name, value_num=now)
        conn.execute(insert.on_conflict_do_nothing(index_elements=[m.c.name]))
    if conn.dialect.name == "postgresql":
        conn.execute(
            sa.text("SELECT pg_notify(:channel, :name)"), {"channel": CHANNEL, "name": name}
        )


#: for the store's own modules (``coordination.py``)
bump_version = _bump_version
dialect_insert = _dialect_insert


def _policy_text(policy: Mapping[str, Any] | None) -> str | None:
    return None if not policy else json.dumps(policy, separators=(",", ":"), sort_keys=True)


def _api_key_from_row(row: sa.Row[Any]) -> ApiKeyRecord:
    policy: dict[str, Any] | None = None
    if row.policy:
        try:
            loaded = json.loads(row.policy)
        except ValueError:
            loaded = None
        policy = loaded if isinstance(loaded, dict) else None
    return ApiKeyRecord(
        key_id=row.key_id,
        name=row.name,
        created_at=row.created_at,
        last_used_at=row.last_used_at,
        revoked_at=row.revoked_at,
        policy=policy,
        expires_at=row.expires_at,
        disabled_at=row.disabled_at,
        rotated_at=row.rotated_at,
        updated_at=row.updated_at,
        key_hash=row.key_hash,
    )
