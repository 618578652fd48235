"""environment.pull_request as a 64-bit integer, as the CRD's pullRequest (int64) allows.

A 32-bit column refused PR numbers above 2,147,483,647 with a DataError.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # SQLite's INTEGER already holds 64 bits: only PostgreSQL needs the column changed (and in place,
    # where a batch copy on SQLite would drop and re-create a table that events refer to).
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column("environment", "pull_request", type_=sa.BigInteger(), existing_type=sa.Integer())


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column("environment", "pull_request", type_=sa.Integer(), existing_type=sa.BigInteger())
