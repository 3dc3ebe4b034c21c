"""The store on real SQLite files and a real PostgreSQL server: migrations, encryption at rest,
accounts, API keys, logs. Tests taking the ``store`` (or ``url``) fixture run on both."""

from __future__ import annotations

import io
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import sqlalchemy as sa
import trio
import trio.testing
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext

from tests.pg_support import PgServer
from trioproxy.accounts.authfile import parse_auth_json
from trioproxy.harness.mock_upstream.accounts import make_account
from trioproxy.store import AccountRecord, Store, StoreError, schema
from trioproxy.store.engine import HEAD_REVISION, MIGRATIONS_DIR, create_engine, head_revision

NOW = 1_700_000_000.0


def db_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'trioproxy.db'}"


def open_store(data_dir: Path, secret_key: str = "", **kw: int) -> Store:
    return Store.open(db_url(data_dir), data_dir=data_dir, secret_key=secret_key, **kw)


def account(
    index: int = 1, now: float = NOW, *, plan: str = "plus", email: str | None = None
) -> AccountRecord:
    mock = make_account(index, now, plan=plan, email=email)
    return parse_auth_json(mock.auth_json(now), now=now)


def raw_bytes(data_dir: Path) -> bytes:
    """Everything SQLite wrote: the database file and any WAL/shared-memory files."""
    return b"".join(p.read_bytes() for p in sorted(data_dir.glob("trioproxy.db*")))


def secrets_of(record: AccountRecord) -> list[str]:
    """The token texts and their JWT segments (payloads hold claims in base64)."""
    assert record.id_token is not None
    pieces = [record.access_token, record.refresh_token, record.id_token]
    for token in (record.access_token, record.id_token):
        pieces += [segment for segment in token.split(".") if len(segment) > 16]
    return pieces


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, data_dir: Path) -> str:
    if request.param == "sqlite":
        return db_url(data_dir)
    server: PgServer = request.getfixturevalue("pg_server")
    return server.database()


@pytest.fixture
def store(url: str, data_dir: Path) -> Iterator[Store]:
    with Store.open(url, data_dir=data_dir) as opened:
        yield opened


def stored_text(url: str, data_dir: Path) -> bytes:
    """Everything the database holds: SQLite's files (WAL included), or every row of every
    table of a PostgreSQL database."""
    if url.startswith("sqlite"):
        return raw_bytes(data_dir)
    engine = create_engine(url)
    metadata = sa.MetaData()
    with engine.connect() as conn:
        metadata.reflect(conn)
        rows = [repr(tuple(r)) for t in metadata.sorted_tables for r in conn.execute(t.select())]
    engine.dispose()
    return "\n".join(rows).encode()


def scalar(url: str, sql: str) -> Any:
    engine = create_engine(url)
    with engine.connect() as conn:
        value = conn.execute(sa.text(sql)).scalar()
    engine.dispose()
    return value


# -- opening, migrations ---------------------------------------------------------------------
def test_open_twice_is_idempotent_and_records_the_revision(data_dir: Path) -> None:
    with open_store(data_dir) as first:
        assert first.schema_version() == head_revision() == HEAD_REVISION == "0005"
        first.upsert_account(account())
    with open_store(data_dir) as second:
        assert second.schema_version() == "0005"
        assert [a.account_id for a in second.list_accounts()] == ["acct-mock-1"]
    with sqlite3.connect(data_dir / "trioproxy.db") as raw:
        assert raw.execute("SELECT version_num FROM alembic_version").fetchall() == [("0005",)]
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert stat.S_IMODE((data_dir / "trioproxy.db").stat().st_mode) == 0o600
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700


def test_a_store_of_the_first_release_is_upgraded_with_its_request_log_kept(
    data_dir: Path,
) -> None:
    data_dir.mkdir(exist_ok=True)
    engine = sa.create_engine(db_url(data_dir))
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0001")
        conn.execute(
            sa.text(
                "INSERT INTO request_log (time, request_id, status) VALUES (1.0, 'req_old', 200)"
            )
        )
    engine.dispose()
    with open_store(data_dir) as store:
        assert store.schema_version() == "0005"
        store.insert_request_logs([{"request_id": "req_new", "upstream_request_id": "up_1"}])
        rows = {r["request_id"]: r for r in store.recent_requests(10)}
    assert rows["req_old"]["status"] == 200 and rows["req_old"]["upstream_request_id"] is None
    assert rows["req_new"]["upstream_request_id"] == "up_1"


def test_migrations_produce_the_declared_schema(store: Store, url: str) -> None:
    engine = create_engine(url)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), schema.metadata) == []
    engine.dispose()


def test_migrations_render_for_postgresql() -> None:
    output = io.StringIO()
    config = Config(output_buffer=output)
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["dialect_name"] = "postgresql"
    command.upgrade(config, "head", sql=True)
    sql = output.getvalue()
    assert "CREATE TABLE accounts" in sql and "CREATE TABLE request_log" in sql
    assert "id BIGSERIAL NOT NULL" in sql and "DOUBLE PRECISION" in sql
    assert "INSERT INTO alembic_version (version_num) VALUES ('0001')" in sql


def test_database_from_a_newer_version_is_a_clear_error(
    store: Store, url: str, data_dir: Path
) -> None:
    store.close()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(StoreError, match="newer trioproxy"):
        Store.open(url, data_dir=data_dir)


def test_in_memory_database_is_shared_across_threads(tmp_path: Path) -> None:
    with Store.open("sqlite://", data_dir=tmp_path, secret_key="k") as memory:
        memory.upsert_account(account())
        seen: list[int] = []
        worker = threading.Thread(target=lambda: seen.append(len(memory.list_accounts())))
        worker.start()
        worker.join()
        assert seen == [1]


def test_unusable_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file, not a folder")
    with pytest.raises(StoreError, match=r"cannot use .*taken"):
        open_store(tmp_path / "taken")


def test_closed_store_refuses_work(store: Store) -> None:
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        store.list_accounts()


# -- encryption at rest ----------------------------------------------------------------------
def test_tokens_are_encrypted_at_rest(store: Store, url: str, data_dir: Path) -> None:
    record = account()
    store.upsert_account(record)
    store.update_tokens(
        record.account_id,
        access_token=record.access_token + "x",
        refresh_token=record.refresh_token + "y",
        id_token=None,
        access_expires_at=None,
        last_refresh=NOW,
    )
    store.close()
    raw = stored_text(url, data_dir)
    assert b"user1@mock.example" in raw  # the right file: plain columns are there
    for piece in secrets_of(record):
        assert piece.encode() not in raw
    engine = create_engine(url)
    with engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT access_token_enc, refresh_token_enc, id_token_enc FROM accounts")
        ).one()
    engine.dispose()
    assert all(value.startswith("gAAAAA") for value in row)  # Fernet tokens
    with Store.open(url, data_dir=data_dir) as reopened:
        stored = reopened.get_account(record.account_id)
        assert stored is not None
        assert stored.access_token == record.access_token + "x"
        assert stored.id_token == record.id_token


def test_secret_key_file_is_created_private_and_reused(data_dir: Path) -> None:
    with open_store(data_dir) as store:
        store.upsert_account(account())
    key_file = data_dir / "secret.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    content = key_file.read_text()
    with open_store(data_dir) as store:
        assert store.get_account("acct-mock-1") is not None
    assert key_file.read_text() == content
    # The file's content works as TRIOPROXY_SECRET_KEY (e.g. when moving to replicas).
    with open_store(data_dir, secret_key=content.strip()) as store:
        assert store.get_account("acct-mock-1") is not None


def test_explicit_secret_key_writes_no_key_file(data_dir: Path) -> None:
    with open_store(data_dir, secret_key="correct horse battery staple"):
        pass
    assert not (data_dir / "secret.key").exists()


def test_key_file_readable_by_others_is_refused(data_dir: Path) -> None:
    open_store(data_dir).close()
    os.chmod(data_dir / "secret.key", 0o644)
    with pytest.raises(StoreError, match="chmod 600"):
        open_store(data_dir)


def test_wrong_secret_key_is_a_clear_error(data_dir: Path) -> None:
    record = account()
    with open_store(data_dir, secret_key="one") as store:
        store.upsert_account(record)
    with pytest.raises(StoreError, match="different secret key") as caught:
        open_store(data_dir, secret_key="two")
    assert caught.value.__cause__ is None and caught.value.__context__ is None
    for piece in secrets_of(record):
        assert piece not in str(caught.value)


def test_lost_key_file_is_a_clear_error(data_dir: Path) -> None:
    open_store(data_dir).close()
    (data_dir / "secret.key").unlink()
    with pytest.raises(StoreError, match=r"different secret key than the key file .*secret\.key"):
        open_store(data_dir)


# -- accounts --------------------------------------------------------------------------------
def test_record_repr_hides_tokens() -> None:
    record = account()
    for text in (repr(record), str(record), str(record.public_view())):
        assert "acct-mock-1" in text
        for piece in secrets_of(record):
            assert piece not in text


def test_upsert_twice_updates_and_keeps_created_at(store: Store) -> None:
    first = account(1, NOW)
    stored, created = store.upsert_account(first, now=NOW)
    assert created and stored.created_at == NOW
    assert store.set_account_state("acct-mock-1", "reauth_required", "refresh_token_reused")
    later = account(1, NOW + 500, plan="pro", email="new@mock.example")
    stored, created = store.upsert_account(later, now=NOW + 500)
    assert not created
    got = store.get_account("acct-mock-1")
    assert got == stored
    assert (got.email, got.plan, got.access_token) == (
        "new@mock.example",
        "pro",
        later.access_token,
    )
    assert (got.created_at, got.updated_at) == (NOW, NOW + 500)
    assert (got.state, got.state_reason) == ("active", None)


def test_update_tokens_and_state(store: Store) -> None:
    record = account()
    store.upsert_account(record)
    assert store.update_tokens(
        "acct-mock-1",
        access_token="new-access",
        refresh_token="new-refresh",
        id_token=None,
        access_expires_at=NOW + 10,
        last_refresh=NOW + 1,
    )
    got = store.get_account("acct-mock-1")
    assert got is not None
    assert (got.access_token, got.refresh_token, got.id_token) == (
        "new-access",
        "new-refresh",
        record.id_token,
    )
    assert (got.access_expires_at, got.last_refresh) == (NOW + 10, NOW + 1)
    assert not store.update_tokens(
        "acct-nope",
        access_token="a",
        refresh_token="r",
        id_token="i",
        access_expires_at=None,
        last_refresh=NOW,
    )
    assert store.set_account_state("acct-mock-1", "disabled", "by admin")
    assert not store.set_account_state("acct-nope", "disabled", None)
    with pytest.raises(ValueError, match="unknown account state"):
        store.set_account_state("acct-mock-1", "cooling", None)


def test_remove_account(store: Store) -> None:
    store.upsert_account(account(1))
    store.upsert_account(account(2))
    assert store.remove_account("acct-mock-1")
    assert store.get_account("acct-mock-1") is None
    assert not store.remove_account("acct-mock-1")
    assert [a.account_id for a in store.list_accounts()] == ["acct-mock-2"]


def test_accounts_version_changes_on_every_write(store: Store, url: str, data_dir: Path) -> None:
    versions = [store.accounts_version()]
    assert versions == [0.0]
    store.upsert_account(account(1), now=NOW)
    versions.append(store.accounts_version())
    # Same timestamp again: the version must still move.
    store.upsert_account(account(1), now=NOW)
    versions.append(store.accounts_version())
    store.update_tokens(
        "acct-mock-1",
        access_token="a",
        refresh_token="r",
        id_token=None,
        access_expires_at=None,
        last_refresh=NOW,
        now=NOW,
    )
    versions.append(store.accounts_version())
    store.set_account_state("acct-mock-1", "disabled", None, now=NOW)
    versions.append(store.accounts_version())
    with Store.open(url, data_dir=data_dir) as other:  # the CLI, or another replica
        other.remove_account("acct-mock-1", now=NOW)
    versions.append(store.accounts_version())
    assert versions == sorted(set(versions)) and len(versions) == 6
    store.remove_account("acct-mock-1")
    store.set_account_state("acct-mock-1", "disabled", None)
    assert store.accounts_version() == versions[-1]


def test_two_stores_write_concurrently_without_lock_errors(url: str, data_dir: Path) -> None:
    stores = [Store.open(url, data_dir=data_dir), Store.open(url, data_dir=data_dir)]
    errors: list[BaseException] = []

    def writer(store: Store, offset: int) -> None:
        try:
            for i in range(30):
                store.upsert_account(account(offset + i))
                store.insert_request_logs([{"route": "test", "account_id": f"a{i}"}])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(s, 100 * n)) for n, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(stores[0].list_accounts()) == 60
    assert len(stores[1].recent_requests(limit=1000)) == 60
    for store in stores:
        store.close()


# -- API keys --------------------------------------------------------------------------------
def test_api_key_plaintext_is_never_stored(store: Store, url: str, data_dir: Path) -> None:
    record, plaintext = store.create_api_key("ci runner")
    prefix, key_id, secret = plaintext.split("_", 2)
    assert (prefix, key_id) == ("trx", record.key_id) and len(secret) >= 40
    assert store.list_api_keys() == [record]
    store.close()
    raw = stored_text(url, data_dir)
    assert record.key_id.encode() in raw
    assert secret.encode() not in raw and plaintext.encode() not in raw
    key_hash = scalar(url, "SELECT key_hash FROM api_keys")
    assert len(key_hash) == 64 and secret not in key_hash


def test_verify_api_key(store: Store) -> None:
    record, plaintext = store.create_api_key("laptop")
    _, other_plaintext = store.create_api_key("ci")
    assert store.active_api_key_count() == 2
    verified = store.verify_api_key(plaintext)
    assert verified is not None and verified.key_id == record.key_id
    last = plaintext[-1]
    near_miss = plaintext[:-1] + ("A" if last != "A" else "B")
    swapped = f"trx_{record.key_id}_{other_plaintext.split('_', 2)[2]}"
    for wrong in (near_miss, plaintext + "x", plaintext[:-1], swapped, "", "Bearer x", "trx_"):
        assert store.verify_api_key(wrong) is None, wrong
    for odd in (f"trx_{record.key_id}_é€😀", "trx_ffffffff_x", "trx_ÄÖ_x", "\x00"):
        assert store.verify_api_key(odd) is None  # never raises (digests are compared)
    assert store.revoke_api_key(record.key_id)
    assert store.verify_api_key(plaintext) is None
    assert store.revoke_api_key(record.key_id)  # idempotent; first revocation time kept
    assert not store.revoke_api_key("00000000")
    assert store.active_api_key_count() == 1
    assert store.verify_api_key(other_plaintext) is not None
    revoked = {k.key_id: k for k in store.list_api_keys()}[record.key_id]
    assert revoked.revoked and revoked.revoked_at is not None


def test_key_update_rotate_disable_expire(store: Store) -> None:
    record, plaintext = store.create_api_key(
        "laptop", policy={"max_requests": 2}, expires_at=NOW + 100, now=NOW
    )
    assert record.policy == {"max_requests": 2} and record.status(NOW) == "active"
    assert record.status(NOW + 100) == "expired"
    version = store.keys_version()
    changed = store.update_api_key(record.key_id, policy=None, expires_at=None, now=NOW + 1)
    assert changed is not None and changed.policy is None and changed.expires_at is None
    assert store.keys_version() > version
    disabled = store.update_api_key(record.key_id, disabled=True, now=NOW + 2)
    assert disabled is not None and disabled.status(NOW + 3) == "disabled"
    assert store.verify_api_key(plaintext) is None
    again = store.update_api_key(record.key_id, disabled=True, now=NOW + 5)
    assert again is not None and again.disabled_at == NOW + 2  # the first time is kept
    store.update_api_key(record.key_id, disabled=False)
    assert store.verify_api_key(plaintext) is not None
    rotated = store.rotate_api_key(record.key_id, now=NOW + 6)
    assert rotated is not None
    new_record, new_plaintext = rotated
    assert new_record.key_id == record.key_id and new_record.rotated_at == NOW + 6
    assert store.verify_api_key(plaintext) is None
    assert store.verify_api_key(new_plaintext) is not None
    assert store.update_api_key("00000000", name="x") is None
    assert store.rotate_api_key("00000000") is None
    store.revoke_api_key(record.key_id)
    with pytest.raises(ValueError, match="revoked"):
        store.update_api_key(record.key_id, disabled=False)
    with pytest.raises(ValueError, match="revoked"):
        store.rotate_api_key(record.key_id)


def test_usage_flush_adds_up_and_counters_replace(store: Store) -> None:
    record, _ = store.create_api_key("laptop", now=NOW)
    hour = NOW - NOW % 3600
    bucket = {
        "hour": hour,
        "key_id": record.key_id,
        "account_id": "acct-1",
        "model": "gpt-5",
        "requests": 2,
        "errors": 0,
        "input_tokens": 100,
        "cached_tokens": 40,
        "output_tokens": 10,
        "reasoning_tokens": 3,
        "cost_usd": 0.5,
    }
    store.flush_usage(
        [bucket], {record.key_id: '{"a":1}'}, replica="r1", last_used={record.key_id: NOW + 7}
    )
    store.flush_usage([{**bucket, "requests": 1}], {record.key_id: '{"a":2}'}, replica="r1")
    assert store.load_key_counters("r1") == {record.key_id: '{"a":2}'}
    assert store.load_key_counters("r2") == {}
    (row,) = store.key_usage_by_hour(record.key_id, NOW - 10)
    assert row["requests"] == 3 and row["input_tokens"] == 200 and row["cost_usd"] == 1.0
    assert store.key_usage_by_hour(record.key_id, NOW + 3600) == []
    assert store.get_api_key(record.key_id).last_used_at == NOW + 7  # type: ignore[union-attr]


def test_api_key_needs_a_name(store: Store) -> None:
    with pytest.raises(ValueError, match="name"):
        store.create_api_key("  ")


# -- request log -----------------------------------------------------------------------------
def test_request_logs_insert_and_recent(store: Store) -> None:
    decision = {"chosen": "acct-mock-1", "excluded": {"acct-mock-2": "cooling"}}
    store.insert_request_logs(
        [
            {"time": NOW, "request_id": "r1", "route": "/v1/responses", "status": 200},
            {
                "time": NOW + 1,
                "request_id": "r2",
                "transport": "ws",
                "account_id": "acct-mock-1",
                "model": "gpt-5.5",
                "status": 200,
                "ttfb_ms": 12.5,
                "duration_ms": 900.0,
                "input_tokens": 10,
                "output_tokens": 20,
                "cached_tokens": 5,
                "decision": decision,
            },
            {"request_id": "r3", "status": 429, "error_code": "proxy_overloaded", "decision": "x"},
        ]
    )
    store.insert_request_logs([])
    recent = store.recent_requests()
    assert [r["request_id"] for r in recent] == ["r3", "r2", "r1"]
    assert recent[1]["decision"] == decision and recent[0]["decision"] == "x"
    assert recent[1]["ttfb_ms"] == 12.5 and recent[1]["cached_tokens"] == 5
    assert recent[0]["time"] > NOW + 1 and recent[2]["route"] == "/v1/responses"
    assert [r["request_id"] for r in store.recent_requests(limit=1)] == ["r3"]
    with pytest.raises(ValueError, match="unknown request_log fields"):
        store.insert_request_logs([{"rout": "/typo"}])
    assert store.prune_request_logs(before=NOW + 0.5) == 1
    assert len(store.recent_requests()) == 2


# -- async use -------------------------------------------------------------------------------
async def test_run_calls_in_a_worker_thread(data_dir: Path) -> None:
    store = open_store(data_dir)
    main_thread = threading.get_ident()
    assert await store.run(threading.get_ident) != main_thread
    stored, created = await store.run(store.upsert_account, account())
    assert created and await store.run(store.get_account, stored.account_id) == stored

    busy = 0
    peak = 0
    lock = threading.Lock()

    def slow() -> None:
        nonlocal busy, peak
        with lock:
            busy += 1
            peak = max(peak, busy)
        time.sleep(0.02)
        with lock:
            busy -= 1

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(store.run, slow)
        await trio.testing.wait_all_tasks_blocked()
        assert store.statistics().tasks_waiting >= 1
    assert peak == 1  # SQLite: one worker thread
    assert attrs.asdict(store.statistics()) == {
        "dialect": "sqlite",
        "max_threads": 1,
        "threads_busy": 0,
        "tasks_waiting": 0,
    }


async def test_thread_limit_is_configurable(data_dir: Path) -> None:
    with open_store(data_dir, max_threads=3) as store:
        assert store.statistics().max_threads == 3
        assert await store.run(store.accounts_version) == 0.0
