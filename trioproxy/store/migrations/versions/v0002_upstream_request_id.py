"""The request log keeps upstream's id of each answer (``upstream_request_id``) and the
client's address (``client``: the original client's, behind a trusted reverse proxy).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("request_log") as batch:
        batch.add_column(sa.Column("upstream_request_id", sa.Text, nullable=True))
        batch.add_column(sa.Column("client", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("request_log") as batch:
        batch.drop_column("client")
        batch.drop_column("upstream_request_id")
