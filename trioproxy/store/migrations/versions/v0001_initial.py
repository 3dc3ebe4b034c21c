"""First release: accounts, api_keys, request_log, meta.

Revision ID: 0001
Revises: (none)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

_BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "accounts",
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
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("key_hash", sa.Text, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("last_used_at", sa.Double, nullable=True),
        sa.Column("revoked_at", sa.Double, nullable=True),
    )
    op.create_table(
        "request_log",
        sa.Column("id", _BIG_ID, primary_key=True, autoincrement=True),
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
    )
    op.create_index("ix_request_log_time", "request_log", ["time"])
    meta = op.create_table(
        "meta",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("value_num", sa.Double, nullable=True),
        sa.Column("value_text", sa.Text, nullable=True),
    )
    op.bulk_insert(meta, [{"name": "accounts_version", "value_num": 0.0, "value_text": None}])


def downgrade() -> None:
    for table in ("meta", "request_log", "api_keys", "accounts"):
        op.drop_table(table)
