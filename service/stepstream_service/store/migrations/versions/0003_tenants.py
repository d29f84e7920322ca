"""Jobs belong to a tenant; a request_id is unique within its tenant only.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# 0001 declared request_id UNIQUE without a name: PostgreSQL called it jobs_request_id_key,
# SQLite keeps it unnamed, so batch mode names it by this convention to drop it.
_NAMING = {"uq": "%(table_name)s_%(column_0_name)s_key"}


def upgrade() -> None:
    with op.batch_alter_table("jobs", naming_convention=_NAMING) as batch:
        batch.add_column(sa.Column("tenant", sa.String(64), nullable=False, server_default=""))
        batch.drop_constraint("jobs_request_id_key", type_="unique")
        batch.create_unique_constraint("uq_jobs_tenant_request", ["tenant", "request_id"])
        batch.create_index("ix_jobs_tenant_state", ["tenant", "state"])


def downgrade() -> None:
    with op.batch_alter_table("jobs", naming_convention=_NAMING) as batch:
        batch.drop_index("ix_jobs_tenant_state")
        batch.drop_constraint("uq_jobs_tenant_request", type_="unique")
        batch.create_unique_constraint("jobs_request_id_key", ["request_id"])
        batch.drop_column("tenant")
