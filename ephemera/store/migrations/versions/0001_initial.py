"""The environment and environment_event tables.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "environment",
        sa.Column("uid", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(253), nullable=False, index=True),
        sa.Column("repository", sa.String(140), nullable=False, index=True),
        sa.Column("pull_request", sa.Integer, nullable=False),
        sa.Column("commit_sha", sa.String(40), nullable=False),
        sa.Column("namespace", sa.String(63)),
        sa.Column("phase", sa.String(32), nullable=False, index=True),
        sa.Column("message", sa.Text),
        sa.Column("installation_id", sa.BigInteger),
        sa.Column("created_at", sa.DateTime(timezone=True)),
        sa.Column("ready_at", sa.DateTime(timezone=True)),
        sa.Column("destroyed_at", sa.DateTime(timezone=True), index=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "environment_event",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column(
            "environment_uid",
            sa.String(64),
            sa.ForeignKey("environment.uid", ondelete="CASCADE"),
            nullable=False,
            index=True,
        ),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("from_phase", sa.String(32)),
        sa.Column("to_phase", sa.String(32), nullable=False),
        sa.Column("reason", sa.String(128), nullable=False),
        sa.Column("message", sa.Text),
    )


def downgrade() -> None:
    op.drop_table("environment_event")
    op.drop_table("environment")
