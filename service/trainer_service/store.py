"""Jobs, their states and leases, and the append-only event log, in one relational store.

SQLite (a WAL file) is the embedded default; the schema is plain SQLAlchemy Core so the
PostgreSQL engine shares it. Every state change goes through `transition()`, which refuses to
leave a terminal state, stamps times, and writes the state-change event in the same transaction.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event

from trainer_service.errors import TrainerError


class JobState(str, Enum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLING = "CANCELLING"
    CANCELLED = "CANCELLED"


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
_ALLOWED = {
    JobState.QUEUED: {JobState.RUNNING, JobState.CANCELLED, JobState.FAILED},
    # RUNNING -> QUEUED is a retry after the worker was lost.
    JobState.RUNNING: {
        JobState.SUCCEEDED,
        JobState.FAILED,
        JobState.CANCELLING,
        JobState.CANCELLED,
        JobState.QUEUED,
    },
    JobState.CANCELLING: {JobState.CANCELLED, JobState.SUCCEEDED, JobState.FAILED},
}


class JobNotFound(TrainerError):
    reason = "not_found"


class AlreadyExists(TrainerError):
    reason = "already_exists"


class JobFinished(TrainerError):
    """The job is in a terminal state; nothing can change it any more."""

    reason = "job_finished"


class LeaseLost(TrainerError):
    """A worker wrote for a job it no longer holds (its lease expired and it was re-claimed)."""

    reason = "lease_lost"


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
    sa.Column("request_id", sa.String(128), unique=True),
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
    sa.Column("test_metrics", sa.Text, nullable=False, default="{}"),
    sa.Column("model_path", sa.Text),
    sa.Column("last_seq", sa.BigInteger, nullable=False, default=0),
    sa.Index("ix_jobs_queue", "state", "priority", "queued_at"),
    sa.Index("ix_jobs_created", "created_at", "id"),
)
events = sa.Table(
    "events",
    metadata,
    # A global, increasing id lets one tail read every job's new events in one query.
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(64), nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("time", sa.Float, nullable=False),
    sa.UniqueConstraint("job_id", "seq", name="uq_events_job_seq"),
)


@dataclass
class Job:
    id: str
    name: str
    spec: dict[str, Any]
    labels: dict[str, str]
    state: JobState
    priority: int
    request_id: str | None
    spec_hash: str
    created_at: float
    queued_at: float
    started_at: float | None
    finished_at: float | None
    attempts: int
    max_attempts: int
    lease_owner: str | None
    lease_expires_at: float | None
    cancel_requested: bool
    error_reason: str | None
    error_message: str | None
    error_step: int | None
    step: int
    total_steps: int
    loss: float | None
    accuracy: float | None
    test_metrics: dict[str, float]
    model_path: str | None
    last_seq: int

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @classmethod
    def from_row(cls, row: Any) -> Job:
        d = dict(row._mapping)
        d["spec"] = json.loads(d["spec"])
        d["labels"] = json.loads(d["labels"])
        d["test_metrics"] = json.loads(d["test_metrics"])
        d["state"] = JobState(d["state"])
        d["cancel_requested"] = bool(d["cancel_requested"])
        return cls(**d)


@dataclass(frozen=True)
class EventRow:
    id: int
    job_id: str
    seq: int
    kind: str
    payload: dict[str, Any]
    time: float

    @classmethod
    def from_row(cls, row: Any) -> EventRow:
        d = dict(row._mapping)
        d["payload"] = json.loads(d["payload"])
        return cls(**d)


@dataclass
class NewEvent:
    kind: str
    payload: dict[str, Any]
    time: float = field(default_factory=time.time)


def new_job_id() -> str:
    return f"job-{uuid.uuid4().hex[:20]}"


class Store:
    """The jobs table, the queue on top of it, and the event log."""

    def __init__(self, url: str):
        self.url = url
        self.engine = sa.create_engine(url)
        self.reader = self.engine
        if self.engine.dialect.name == "sqlite":
            sa_event.listen(self.engine, "connect", _sqlite_pragmas)
            sa_event.listen(self.engine, "begin", _sqlite_begin_immediate)
            # Reads get their own engine without the write lock, so WAL readers never wait.
            self.reader = sa.create_engine(url)
            sa_event.listen(self.reader, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)
        mark = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
        self._insert_events = (
            f"INSERT INTO events (job_id, seq, kind, payload, time) "
            f"VALUES ({', '.join([mark] * 5)})"
        )

    def close(self) -> None:
        self.engine.dispose()
        self.reader.dispose()

    # ---------------------------------------------------------------- jobs

    def create_job(
        self,
        *,
        name: str,
        spec: dict[str, Any],
        spec_hash: str,
        labels: dict[str, str],
        priority: int = 0,
        request_id: str | None = None,
        max_attempts: int = 3,
        total_steps: int = 0,
    ) -> tuple[Job, bool]:
        """(job, created). A repeated request_id returns the first job when its spec is the
        same, and raises AlreadyExists when it is not."""
        now = time.time()
        with self.engine.begin() as conn:
            if request_id:
                row = conn.execute(sa.select(jobs).where(jobs.c.request_id == request_id)).first()
                if row is not None:
                    existing = Job.from_row(row)
                    if existing.spec_hash != spec_hash:
                        raise AlreadyExists(
                            f"request_id {request_id!r} was used for job {existing.id} "
                            "with a different spec"
                        )
                    return existing, False
            job_id = new_job_id()
            conn.execute(
                jobs.insert().values(
                    id=job_id,
                    name=name,
                    spec=json.dumps(spec, sort_keys=True),
                    labels=json.dumps(labels, sort_keys=True),
                    state=JobState.QUEUED.value,
                    priority=priority,
                    request_id=request_id or None,
                    spec_hash=spec_hash,
                    created_at=now,
                    queued_at=now,
                    attempts=0,
                    max_attempts=max_attempts,
                    cancel_requested=False,
                    step=0,
                    total_steps=total_steps,
                    test_metrics="{}",
                    last_seq=0,
                )
            )
            self._append(conn, job_id, [_state_event(JobState.QUEUED, 0)])
            return Job.from_row(
                conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).one()
            ), True

    def get_job(self, job_id: str) -> Job:
        with self.reader.connect() as conn:
            return self._get(conn, job_id)

    def _get(self, conn: sa.Connection, job_id: str) -> Job:
        row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
        if row is None:
            raise JobNotFound(f"no job {job_id!r}")
        return Job.from_row(row)

    def list_jobs(
        self,
        *,
        states: Iterable[JobState] = (),
        labels: dict[str, str] | None = None,
        name: str | None = None,
        after: tuple[float, str] | None = None,
        limit: int = 50,
    ) -> list[Job]:
        """Newest first; `after` is the (created_at, id) of the last job of the previous page."""
        query = sa.select(jobs).order_by(jobs.c.created_at.desc(), jobs.c.id.desc())
        states = [s.value for s in states]
        if states:
            query = query.where(jobs.c.state.in_(states))
        if name:
            query = query.where(jobs.c.name == name)
        if after:
            created, job_id = after
            query = query.where(
                sa.or_(
                    jobs.c.created_at < created,
                    sa.and_(jobs.c.created_at == created, jobs.c.id < job_id),
                )
            )
        wanted = labels or {}
        out: list[Job] = []
        with self.reader.connect() as conn:
            # Labels are a JSON column, filtered here so both engines share one schema.
            for row in conn.execute(query.limit(limit if not wanted else None)):
                job = Job.from_row(row)
                if all(job.labels.get(k) == v for k, v in wanted.items()):
                    out.append(job)
                    if len(out) == limit:
                        break
        return out

    def queue_depth(self) -> dict[str, int]:
        with self.reader.connect() as conn:
            rows = conn.execute(sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state))
            counts = {s.value: 0 for s in JobState}
            counts.update({state: n for state, n in rows})
            return counts

    # ---------------------------------------------------------------- state

    def transition(
        self,
        conn: sa.Connection,
        job: Job,
        to: JobState,
        *,
        worker: str | None = None,
        error: tuple[str, str, int | None] | None = None,
        **values: Any,
    ) -> None:
        """The one way a job changes state, inside the caller's transaction."""
        if job.terminal:
            raise JobFinished(f"job {job.id} is {job.state.value}; it cannot become {to.value}")
        if to not in _ALLOWED[job.state]:
            raise TrainerError(f"job {job.id}: {job.state.value} -> {to.value} is not allowed")
        now = time.time()
        if to == JobState.RUNNING:
            values.setdefault("started_at", now)
        if to in TERMINAL:
            values.update(finished_at=now, lease_owner=None, lease_expires_at=None)
        if to == JobState.QUEUED:
            values.update(queued_at=now, lease_owner=None, lease_expires_at=None)
        if error is not None:
            values.update(error_reason=error[0], error_message=error[1], error_step=error[2])
        where = jobs.c.id == job.id
        if worker is not None:
            where &= jobs.c.lease_owner == worker
        done = conn.execute(jobs.update().where(where).values(state=to.value, **values))
        if done.rowcount != 1:
            raise LeaseLost(f"job {job.id} is no longer held by {worker}")
        self._append(conn, job.id, [_state_event(to, values.get("attempts", job.attempts), error)])

    def cancel(self, job_id: str) -> Job:
        """QUEUED becomes CANCELLED at once; RUNNING becomes CANCELLING and its worker stops it."""
        with self.engine.begin() as conn:
            job = self._get(conn, job_id)
            if job.terminal:
                raise JobFinished(f"job {job_id} already {job.state.value.lower()}")
            if job.state == JobState.QUEUED:
                self.transition(conn, job, JobState.CANCELLED, cancel_requested=True)
            elif job.state == JobState.RUNNING:
                self.transition(conn, job, JobState.CANCELLING, cancel_requested=True)
            return self._get(conn, job_id)

    # ---------------------------------------------------------------- queue and leases

    def claim(self, worker: str, lease_seconds: float) -> Job | None:
        """Take the highest-priority, oldest queued job and lease it to `worker`."""
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(jobs)
                .where(jobs.c.state == JobState.QUEUED.value)
                .order_by(jobs.c.priority.desc(), jobs.c.queued_at, jobs.c.id)
                .limit(1)
            ).first()
            if row is None:
                return None
            job = Job.from_row(row)
            self.transition(
                conn,
                job,
                JobState.RUNNING,
                lease_owner=worker,
                lease_expires_at=time.time() + lease_seconds,
                attempts=job.attempts + 1,
            )
            return self._get(conn, job.id)

    def heartbeat(self, job_id: str, worker: str, lease_seconds: float) -> bool:
        """Extend the lease; True when the job should stop (cancel requested)."""
        with self.engine.begin() as conn:
            done = conn.execute(
                jobs.update()
                .where((jobs.c.id == job_id) & (jobs.c.lease_owner == worker))
                .values(lease_expires_at=time.time() + lease_seconds)
            )
            if done.rowcount != 1:
                raise LeaseLost(f"job {job_id} is no longer held by {worker}")
            return bool(
                conn.execute(
                    sa.select(jobs.c.cancel_requested).where(jobs.c.id == job_id)
                ).scalar_one()
            )

    def finish(
        self,
        job_id: str,
        worker: str,
        to: JobState,
        *,
        error: tuple[str, str, int | None] | None = None,
        **values: Any,
    ) -> None:
        with self.engine.begin() as conn:
            job = self._get(conn, job_id)
            if job.state == JobState.CANCELLING and to == JobState.QUEUED:
                to = JobState.CANCELLED  # a job being cancelled is not handed back to the queue
            self.transition(conn, job, to, worker=worker, error=error, **values)

    def rescue(self, now: float | None = None) -> list[tuple[str, JobState]]:
        """Requeue (or fail, when attempts are used up) jobs whose lease expired."""
        now = time.time() if now is None else now
        acted = []
        with self.engine.begin() as conn:
            rows = conn.execute(
                sa.select(jobs).where(
                    jobs.c.state.in_([JobState.RUNNING.value, JobState.CANCELLING.value])
                    & (jobs.c.lease_expires_at < now)
                )
            ).all()
            for row in rows:
                job = Job.from_row(row)
                if job.state == JobState.CANCELLING:
                    self.transition(conn, job, JobState.CANCELLED)
                    acted.append((job.id, JobState.CANCELLED))
                elif job.attempts < job.max_attempts:
                    self.transition(conn, job, JobState.QUEUED)
                    acted.append((job.id, JobState.QUEUED))
                else:
                    error = (
                        "worker_lost",
                        f"the worker running it stopped answering, {job.attempts} time(s); "
                        f"attempts used up ({job.max_attempts})",
                        job.step,
                    )
                    self.transition(conn, job, JobState.FAILED, error=error)
                    acted.append((job.id, JobState.FAILED))
        return acted

    # ---------------------------------------------------------------- events

    def append_events(
        self, job_id: str, worker: str, new: list[NewEvent], progress: dict[str, Any]
    ) -> int:
        """Append events written by the worker holding the job; a worker that lost its lease
        is refused (LeaseLost), so a stale worker cannot interleave with the new attempt."""
        with self.engine.begin() as conn:
            held = conn.execute(
                sa.select(jobs.c.lease_owner).where(jobs.c.id == job_id)
            ).scalar_one_or_none()
            if held != worker:
                raise LeaseLost(f"job {job_id} is no longer held by {worker}")
            last = self._append(conn, job_id, new)
            if progress:
                conn.execute(jobs.update().where(jobs.c.id == job_id).values(**progress))
            return last

    def _append(self, conn: sa.Connection, job_id: str, new: list[NewEvent]) -> int:
        last = conn.execute(sa.select(jobs.c.last_seq).where(jobs.c.id == job_id)).scalar_one()
        if not new:
            return last
        # Straight to the driver's executemany: a window of step events is one call, without
        # SQLAlchemy's per-row parameter processing on the training hot path.
        conn.exec_driver_sql(
            self._insert_events,
            [
                (job_id, last + i + 1, e.kind, json.dumps(e.payload, allow_nan=True), e.time)
                for i, e in enumerate(new)
            ],
        )
        last += len(new)
        conn.execute(jobs.update().where(jobs.c.id == job_id).values(last_seq=last))
        return last

    def read_events(self, job_id: str, after_seq: int = 0, limit: int = 1000) -> list[EventRow]:
        with self.reader.connect() as conn:
            rows = conn.execute(
                sa.select(events)
                .where((events.c.job_id == job_id) & (events.c.seq > after_seq))
                .order_by(events.c.seq)
                .limit(limit)
            )
            return [EventRow.from_row(r) for r in rows]

    def events_since(self, event_id: int, limit: int = 5000) -> list[EventRow]:
        """Every job's events after the global id `event_id`, oldest first (the event tail)."""
        with self.reader.connect() as conn:
            rows = conn.execute(
                sa.select(events).where(events.c.id > event_id).order_by(events.c.id).limit(limit)
            )
            return [EventRow.from_row(r) for r in rows]

    def last_event_id(self) -> int:
        with self.reader.connect() as conn:
            return conn.execute(
                sa.select(sa.func.coalesce(sa.func.max(events.c.id), 0))
            ).scalar_one()


def _state_event(
    state: JobState, attempt: int, error: tuple[str, str, int | None] | None = None
) -> NewEvent:
    payload: dict[str, Any] = {"state": state.value, "attempt": attempt}
    if error is not None:
        payload["error"] = {"reason": error[0], "message": error[1], "step": error[2]}
    return NewEvent("state", payload)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets readers (the API, the tail) run while a worker writes; busy_timeout makes
    # writers queue up rather than fail.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def _sqlite_begin_immediate(conn: sa.Connection) -> None:
    # Take the write lock at BEGIN so two claimers cannot both read the same queued job.
    conn.exec_driver_sql("BEGIN IMMEDIATE")
