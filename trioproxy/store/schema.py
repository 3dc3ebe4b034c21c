"""The tables as SQLAlchemy Core sees them today.

Migrations (``migrations/versions``) create and change the real tables; this module only
describes the current shape for queries. ``tests/test_store.py`` checks that the two agree
(Alembic's autogenerate comparison finds no difference after all migrations ran).

Portability: only types and constructs that SQLite and PostgreSQL both have. Times are unix
seconds as double precision; identifiers and ciphertexts are TEXT.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

metadata = sa.MetaData()

#: SQLite only auto-increments an ``INTEGER PRIMARY KEY``; PostgreSQL gets a BIGSERIAL.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

accounts = sa.Table(
    "accounts",
    metadata,
    sa.Column("account_id", sa.Text, primary_key=True),
    sa.Column("email", sa.Text, nullable=True),
    sa.Column("plan", sa.Text, nullable=True),
    sa.Column("user_id", sa.Text, nullable=True),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("state_reason", sa.Text, nullable=True),
    sa.Column("access_token_enc", sa.Text, nullable=False),
    sa.Column("refresh_token_enc", sa.Text, nullable=False),
    sa.Column("id_token_enc", sa.Text, nullable=True),
    sa.Column("access_expires_at", sa.Double, nullable=True),
    sa.Column("last_refresh", sa.Double, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("key_id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("key_hash", sa.Text, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("last_used_at", sa.Double, nullable=True),
    sa.Column("revoked_at", sa.Double, nullable=True),
    sa.Column("policy", sa.Text, nullable=True),  # JSON (keys/policy.py)
    sa.Column("expires_at", sa.Double, nullable=True),
    sa.Column("disabled_at", sa.Double, nullable=True),
    sa.Column("rotated_at", sa.Double, nullable=True),
    sa.Column("updated_at", sa.Double, nullable=True),
)

request_log = sa.Table(
    "request_log",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("time", sa.Double, nullable=False),
    sa.Column("request_id", sa.Text, nullable=True),
    sa.Column("route", sa.Text, nullable=True),
    sa.Column("transport", sa.Text, nullable=True),
    sa.Column("account_id", sa.Text, nullable=True),
    sa.Column("model", sa.Text, nullable=True),
    sa.Column("status", sa.Integer, nullable=True),
    sa.Column("error_code", sa.Text, nullable=True),
    sa.Column("ttfb_ms", sa.Double, nullable=True),
    sa.Column("duration_ms", sa.Double, nullable=True),
    sa.Column("input_tokens", sa.Integer, nullable=True),
    sa.Column("output_tokens", sa.Integer, nullable=True),
    sa.Column("cached_tokens", sa.Integer, nullable=True),
    sa.Column("decision", sa.Text, nullable=True),
    sa.Column("upstream_request_id", sa.Text, nullable=True),
    sa.Column("client", sa.Text, nullable=True),
    sa.Column("key_id", sa.Text, nullable=True),
    sa.Column("reasoning_tokens", sa.Integer, nullable=True),
    sa.Column("cost_usd", sa.Double, nullable=True),
    sa.Index("ix_request_log_time", "time"),
)

#: Usage by hour: one row per (hour, key, account, model); ``hour`` is the unix time of the
#: hour's start (UTC). ``key_id`` is ``loopback`` for clients admitted without a key,
#: ``account_id`` and ``model`` are empty when a request never reached one.
usage_hourly = sa.Table(
    "usage_hourly",
    metadata,
    sa.Column("hour", sa.Double, nullable=False),
    sa.Column("key_id", sa.Text, nullable=False),
    sa.Column("account_id", sa.Text, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("requests", sa.BigInteger, nullable=False),
    sa.Column("errors", sa.BigInteger, nullable=False),
    sa.Column("input_tokens", sa.BigInteger, nullable=False),
    sa.Column("cached_tokens", sa.BigInteger, nullable=False),
    sa.Column("output_tokens", sa.BigInteger, nullable=False),
    sa.Column("reasoning_tokens", sa.BigInteger, nullable=False),
    sa.Column("cost_usd", sa.Double, nullable=False),
    sa.PrimaryKeyConstraint("hour", "key_id", "account_id", "model"),
    sa.Index("ix_usage_hourly_key", "key_id", "hour"),
)
USAGE_COUNTS = (
    "requests",
    "errors",
    "input_tokens",
    "cached_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cost_usd",
)

#: Each key's budget counters (JSON, keys/budgets.py) as one replica last wrote them.
key_counters = sa.Table(
    "key_counters",
    metadata,
    sa.Column("key_id", sa.Text, nullable=False),
    sa.Column("replica", sa.Text, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.PrimaryKeyConstraint("key_id", "replica"),
)

#: Who may sign in to the dashboard (``trioproxy admin ...``, trioproxy/store/admins.py):
#: ``password_hash`` is ``scrypt$N$r$p$salt$hash`` (trioproxy/dashboard/passwords.py).
dashboard_admins = sa.Table(
    "dashboard_admins",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("password_hash", sa.Text, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("password_set_at", sa.Double, nullable=False),
    sa.Column("last_login_at", sa.Double, nullable=True),
)

#: Durable response chains (trioproxy/store/chains.py, docs/continuity.md), written with
#: PostgreSQL only: one row per conversation (the compressed bytes its turns take, when its
#: last turn was written), one per remembered turn (``input`` and ``output`` are the packed
#: blobs of ``protocol/chain.py``; ``size`` is what the turn is charged).
durable_chains = sa.Table(
    "durable_chains",
    metadata,
    sa.Column("conversation", sa.Text, primary_key=True),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Index("ix_durable_chains_updated_at", "updated_at"),
)
durable_chain_nodes = sa.Table(
    "durable_chain_nodes",
    metadata,
    sa.Column("response_id", sa.Text, primary_key=True),
    sa.Column("conversation", sa.Text, nullable=False),
    sa.Column("parent", sa.Text, nullable=True),
    sa.Column("account", sa.Text, nullable=False),
    sa.Column("input", sa.LargeBinary, nullable=False),
    sa.Column("output", sa.LargeBinary, nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Index("ix_durable_chain_nodes_conversation", "conversation", "created_at"),
)

#: Small named values: ``accounts_version`` (bumped by every account write, deletes
#: included), ``keys_version`` (bumped by every API key write) and ``key_check`` (a ciphertext that tells whether the secret key is right).
meta = sa.Table(
    "meta",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("value_num", sa.Double, nullable=True),
    sa.Column("value_text", sa.Text, nullable=True),
)

REQUEST_LOG_FIELDS = tuple(c.name for c in request_log.columns if c.name != "id")


def request_log_values(row: Mapping[str, Any], now: float) -> dict[str, Any]:
    """Column values for one request record: every field present (``time`` defaults to
    ``now``), ``decision`` as JSON text. An unknown key is a ValueError."""
    unknown = set(row) - set(REQUEST_LOG_FIELDS)
    if unknown:
        raise ValueError(f"unknown request_log fields: {sorted(unknown)}")
    values = {field: row.get(field) for field in REQUEST_LOG_FIELDS}
    if values["time"] is None:
        values["time"] = now
    decision = values["decision"]
    if decision is not None and not isinstance(decision, str):
        values["decision"] = json.dumps(decision, separators=(",", ":"), default=str)
    return values


def request_log_record(row: Mapping[Any, Any]) -> dict[str, Any]:
    """A stored request record as a dict, ``decision`` parsed back from JSON."""
    record = dict(row)
    if record["decision"] is not None:
        with contextlib.suppress(ValueError):  # else it was written as a plain string
            record["decision"] = json.loads(record["decision"])
    return record
