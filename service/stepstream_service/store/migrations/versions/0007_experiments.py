"""Experiments (hyperparameter searches) and their trials, each trial one job.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "experiments",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("spec", sa.Text, nullable=False),
        sa.Column("spec_hash", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(128)),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("finished_at", sa.Float),
        sa.Column("owner", sa.String(128)),
        sa.Column("owner_expires_at", sa.Float),
        sa.Column("best_trial", sa.Integer),
        sa.Column("best_value", sa.Float),
        sa.Column("message", sa.Text),
        sa.Column("last_seq", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("tenant", "request_id", name="uq_experiments_tenant_request"),
    )
    op.create_index("ix_experiments_state", "experiments", ["state"])
    op.create_index("ix_experiments_tenant_created", "experiments", ["tenant", "created_at"])
    op.create_table(
        "trials",
        sa.Column("experiment_id", sa.String(64), primary_key=True),
        sa.Column("number", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("params", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("value", sa.Float),
        sa.Column("step", sa.BigInteger, nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("seen_seq", sa.BigInteger, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("finished_at", sa.Float),
    )
    op.create_index("ix_trials_job", "trials", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_trials_job", "trials")
    op.drop_table("trials")
    op.drop_index("ix_experiments_tenant_created", "experiments")
    op.drop_index("ix_experiments_state", "experiments")
    op.drop_table("experiments")
