"""A job counts the bytes it keeps stored (events, models, checkpoints): a tenant's quota.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("stored_bytes", sa.BigInteger, nullable=False, server_default="0")
        )
    # What the events already stored hold; artifacts are counted as jobs end from now on.
    op.execute(
        "UPDATE jobs SET stored_bytes = (SELECT COALESCE(SUM(LENGTH(events.payload)), 0) "
        "FROM events WHERE events.job_id = jobs.id)"
    )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("stored_bytes")
