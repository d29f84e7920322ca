"""A job may span several workers (runtime.machines): the gang's addresses on the job, and
on each worker where its gang's replicas reach it and which gang it is a member of.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("machines", sa.Integer, nullable=False, server_default="1"))
        batch.add_column(sa.Column("gang", sa.Text))
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("address", sa.String(300)))
        batch.add_column(sa.Column("gang_job", sa.String(64)))
        batch.add_column(sa.Column("gang_attempt", sa.Integer))
        batch.add_column(sa.Column("gang_rank", sa.Integer))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        for column in ("gang_rank", "gang_attempt", "gang_job", "address"):
            batch.drop_column(column)
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("gang")
        batch.drop_column("machines")
