"""The dashboard's admins: a name and a salted scrypt hash of the password each.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "dashboard_admins",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("password_hash", sa.Text, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("password_set_at", sa.Double, nullable=False),
        sa.Column("last_login_at", sa.Double, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("dashboard_admins")
