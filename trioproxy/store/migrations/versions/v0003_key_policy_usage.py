"""Keys for a team: a key's policy, expiry, disabling and rotation; usage by hour (key,
account, model); each key's budget counters; the request log names the key and counts
reasoning tokens and the estimated cost.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("policy", sa.Text, nullable=True))
        batch.add_column(sa.Column("expires_at", sa.Double, nullable=True))
        batch.add_column(sa.Column("disabled_at", sa.Double, nullable=True))
        batch.add_column(sa.Column("rotated_at", sa.Double, nullable=True))
        batch.add_column(sa.Column("updated_at", sa.Double, nullable=True))
    with op.batch_alter_table("request_log") as batch:
        batch.add_column(sa.Column("key_id", sa.Text, nullable=True))
        batch.add_column(sa.Column("reasoning_tokens", sa.Integer, nullable=True))
        batch.add_column(sa.Column("cost_usd", sa.Double, nullable=True))
    op.create_table(
        "usage_hourly",
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
    )
    op.create_index("ix_usage_hourly_key", "usage_hourly", ["key_id", "hour"])
    op.create_table(
        "key_counters",
        sa.Column("key_id", sa.Text, nullable=False),
        sa.Column("replica", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.PrimaryKeyConstraint("key_id", "replica"),
    )
    meta = sa.table(
        "meta",
        sa.column("name", sa.Text),
        sa.column("value_num", sa.Double),
        sa.column("value_text", sa.Text),
    )
    op.bulk_insert(meta, [{"name": "keys_version", "value_num": 0.0, "value_text": None}])


def downgrade() -> None:
    op.execute("DELETE FROM meta WHERE name = 'keys_version'")
    op.drop_table("key_counters")
    op.drop_index("ix_usage_hourly_key", table_name="usage_hourly")
    op.drop_table("usage_hourly")
    with op.batch_alter_table("request_log") as batch:
        batch.drop_column("cost_usd")
        batch.drop_column("reasoning_tokens")
        batch.drop_column("key_id")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("updated_at")
        batch.drop_column("rotated_at")
        batch.drop_column("disabled_at")
        batch.drop_column("expires_at")
        batch.drop_column("policy")
