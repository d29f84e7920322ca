"""The relational schema shared by both engines, and its Alembic migrations.

The tables here describe the newest revision; the files in migrations/versions are the history
that brings any older database to it. A server checks the revision at start-up: a fresh database
is created, an older one must be upgraded with `trainer migrate`, and one written by a newer
version is refused rather than misread.
"""

from __future__ import annotations

import logging
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from stepstream_service.errors import TrainerError

log = logging.getLogger(__name__)
# Alembic says "Context impl ..." at every check; what changed is logged here instead.
logging.getLogger("alembic").setLevel(logging.WARNING)

MIGRATIONS = Path(__file__).with_name("migrations")
# Serialises concurrent start-ups of replicas on one fresh PostgreSQL database.
_MIGRATION_LOCK = 0x7472616D  # "tram"

metadata = sa.MetaData()
jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("spec", sa.Text, nullable=False),
    sa.Column("labels", sa.Text, nullable=False, default="{}"),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False, default=0),
    sa.Column("request_id", sa.String(128)),
    sa.Column("spec_hash", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("queued_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("max_attempts", sa.Integer, nullable=False, default=3),
    sa.Column("lease_owner", sa.String(128)),
    sa.Column("lease_expires_at", sa.Float),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("error_reason", sa.String(64)),
    sa.Column("error_message", sa.Text),
    sa.Column("error_step", sa.BigInteger),
    sa.Column("step", sa.BigInteger, nullable=False, default=0),
    sa.Column("total_steps", sa.BigInteger, nullable=False, default=0),
    sa.Column("loss", sa.Float),
    sa.Column("accuracy", sa.Float),
    sa.Column("mae", sa.Float),
    sa.Column("test_metrics", sa.Text, nullable=False, default="{}"),
    sa.Column("model_path", sa.Text),
    sa.Column("last_seq", sa.BigInteger, nullable=False, default=0),
    # "gpu" jobs are claimed only by workers with a GPU; "any" by every worker.
    sa.Column("needs", sa.String(8), nullable=False, default="any", server_default="any"),
    # Devices it trains on (runtime.devices), all held by the one worker that claims it.
    sa.Column("devices", sa.Integer, nullable=False, default=1, server_default="1"),
    # Workers it spans (runtime.machines); a gang's members, while it runs, are in `gang`.
    sa.Column("machines", sa.Integer, nullable=False, default=1, server_default="1"),
    sa.Column("gang", sa.Text),  # JSON list of "host:port", rank order; NULL for one worker
    sa.Column("worker", sa.String(128)),  # the last attempt's worker; the lease is cleared
    # "" when the server runs without authentication; else the token's tenant.
    sa.Column("tenant", sa.String(64), nullable=False, default="", server_default=""),
    # Bytes of its events' payloads, and of its artifacts once it ended: its tenant's quota.
    sa.Column("stored_bytes", sa.BigInteger, nullable=False, default=0, server_default="0"),
    sa.UniqueConstraint("tenant", "request_id", name="uq_jobs_tenant_request"),
    sa.Index("ix_jobs_tenant_state", "tenant", "state"),
    sa.Index("ix_jobs_queue", "state", "priority", "queued_at"),
    sa.Index("ix_jobs_created", "created_at", "id"),
)
events = sa.Table(
    "events",
    metadata,
    # A global, increasing id lets one tail read every job's new events in one query.
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("job_id", sa.String(64), nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("time", sa.Float, nullable=False),
    sa.UniqueConstraint("job_id", "seq", name="uq_events_job_seq"),
)
workers = sa.Table(
    "workers",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("host", sa.String(256), nullable=False),
    sa.Column("devices", sa.Text, nullable=False),  # JSON list, e.g. ["GPU:0"] or []
    sa.Column("gpus", sa.Integer, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("seen_at", sa.Float, nullable=False),
    sa.Column("stopped_at", sa.Float),
    # What a job must fit in on it (its GPU's memory, else its container's limit); unknown: NULL.
    sa.Column("memory_bytes", sa.BigInteger),
    # Where a gang's replicas reach it ("host:port"); NULL: it joins no gang.
    sa.Column("address", sa.String(300)),
    # The gang it is a member of: the job, its attempt, and its rank (the chief, rank 0,
    # holds the job's lease instead).
    sa.Column("gang_job", sa.String(64)),
    sa.Column("gang_attempt", sa.Integer),
    sa.Column("gang_rank", sa.Integer),
)

experiments = sa.Table(
    "experiments",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("tenant", sa.String(64), nullable=False, default=""),
    sa.Column("spec", sa.Text, nullable=False),
    sa.Column("spec_hash", sa.String(64), nullable=False),
    sa.Column("request_id", sa.String(128)),
    sa.Column("priority", sa.Integer, nullable=False, default=0),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
    # The server whose controller drives it, while its lease lasts.
    sa.Column("owner", sa.String(128)),
    sa.Column("owner_expires_at", sa.Float),
    sa.Column("best_trial", sa.Integer),
    sa.Column("best_value", sa.Float),
    sa.Column("message", sa.Text),
    # Raised by every change to it or its trials: WatchExperiment resumes after a seq.
    sa.Column("last_seq", sa.BigInteger, nullable=False, default=0),
    sa.UniqueConstraint("tenant", "request_id", name="uq_experiments_tenant_request"),
    sa.Index("ix_experiments_state", "state"),
    sa.Index("ix_experiments_tenant_created", "tenant", "created_at"),
)
trials = sa.Table(
    "trials",
    metadata,
    sa.Column("experiment_id", sa.String(64), primary_key=True),
    # Optuna's trial number in the experiment's study: one job per number, ever.
    sa.Column("number", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("job_id", sa.String(64), nullable=False),
    sa.Column("params", sa.Text, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("value", sa.Float),  # the objective: the last reported, then the final one
    sa.Column("step", sa.BigInteger, nullable=False, default=0),  # of that value
    sa.Column("reason", sa.Text),  # why it was pruned, failed or cancelled
    sa.Column("seen_seq", sa.BigInteger, nullable=False, default=0),  # its job's events read
    sa.Column("seq", sa.BigInteger, nullable=False, default=0),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
    sa.Index("ix_trials_job", "job_id"),
)


class SchemaError(TrainerError):
    reason = "schema"


def config(url: str, connection: sa.Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    return ScriptDirectory.from_config(config("sqlite://")).get_current_head()


def known_revisions() -> set[str]:
    return {s.revision for s in ScriptDirectory.from_config(config("sqlite://")).walk_revisions()}


def current(conn: sa.Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: sa.Engine) -> tuple[str | None, str]:
    """Bring the database to the newest revision: (revision before, revision after)."""
    with engine.begin() as conn:
        _lock(conn)
        before = current(conn)
        if before is None and sa.inspect(conn).has_table("jobs"):
            # Written before migrations existed: that schema is revision 0001.
            command.stamp(config(str(engine.url), conn), "0001")
            before = "0001"
        if before is not None and before not in known_revisions():
            raise SchemaError(_unknown(before))
        command.upgrade(config(str(engine.url), conn), "head")
        return before, current(conn)


def check(engine: sa.Engine, *, create: bool = True) -> None:
    """Refuse a database this version cannot use; create the schema in an empty one."""
    want = head()
    with engine.connect() as conn:
        have = current(conn)
        legacy = have is None and sa.inspect(conn).has_table("jobs")
    if have == want:
        return
    if have is None and not legacy and create:
        upgrade(engine)
        log.info("created the schema (revision %s) in %s", want, _safe(engine))
        return
    if have is not None and have not in known_revisions():
        raise SchemaError(_unknown(have))
    raise SchemaError(
        f"the database {_safe(engine)} is at schema revision {have or 'none (before migrations)'}"
        f"; this version needs {want}: run `trainer migrate --store URL` first"
    )


def _unknown(revision: str) -> str:
    return (
        f"the database is at schema revision {revision!r}, which this version does not know "
        f"(it knows up to {head()!r}); it was written by a newer version: upgrade the service"
    )


def _lock(conn: sa.Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")


def _safe(engine: sa.Engine) -> str:
    return engine.url.render_as_string(hide_password=True)
