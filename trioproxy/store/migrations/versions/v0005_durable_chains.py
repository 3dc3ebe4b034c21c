"""Durable response chains: each conversation's remembered turns, so that a replica that did
not serve a conversation's last turn can re-anchor its next one (used with PostgreSQL).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "durable_chains",
        sa.Column("conversation", sa.Text, primary_key=True),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
    )
    op.create_index("ix_durable_chains_updated_at", "durable_chains", ["updated_at"])
    op.create_table(
        "durable_chain_nodes",
        sa.Column("response_id", sa.Text, primary_key=True),
        sa.Column("conversation", sa.Text, nullable=False),
        sa.Column("parent", sa.Text, nullable=True),
        sa.Column("account", sa.Text, nullable=False),
        sa.Column("input", sa.LargeBinary, nullable=False),
        sa.Column("output", sa.LargeBinary, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
    )
    op.create_index(
        "ix_durable_chain_nodes_conversation",
        "durable_chain_nodes",
        ["conversation", "created_at"],
    )


def downgrade() -> None:
    op.drop_table("durable_chain_nodes")
    op.drop_table("durable_chains")
