"""Jobs: their rows, and the one way a job changes state.

Every state change goes through `transition()`, which refuses to leave a terminal state,
stamps times, and writes the state-change event in the same transaction.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from stepstream.kernel.events import StateEvent
from stepstream.kernel.failures import Failure
from stepstream.kernel.states import TERMINAL, JobState
from stepstream_service.errors import TrainerError
from stepstream_service.store.database import Database
from stepstream_service.store.errors import (
    AlreadyExists,
    JobFinished,
    JobNotFound,
    LeaseLost,
    QueueFull,
)
from stepstream_service.store.events import EventLog, NewEvent
from stepstream_service.store.schema import events, jobs

QUEUE_CHANNEL = "trainer_queue"
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
    mae: float | None
    test_metrics: dict[str, float]
    model_path: str | None
    last_seq: int
    needs: str = "any"
    worker: str | None = None
    tenant: str = ""
    stored_bytes: int = 0
    devices: int = 1
    machines: int = 1
    gang: list[str] | None = None  # the addresses of its replicas while a gang runs it

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def failure(self) -> Failure | None:
        if not self.error_reason:
            return None
        return Failure(self.error_reason, self.error_message or "", self.error_step)

    @classmethod
    def from_row(cls, row: Any) -> Job:
        d = dict(row._mapping)
        d["spec"] = json.loads(d["spec"])
        d["labels"] = json.loads(d["labels"])
        d["test_metrics"] = json.loads(d["test_metrics"])
        d["state"] = JobState(d["state"])
        d["gang"] = json.loads(d["gang"]) if d.get("gang") else None
        d["cancel_requested"] = bool(d["cancel_requested"])
        return cls(**d)


@dataclass(frozen=True)
class NewJob:
    """What a submission asks for: everything the store needs to queue a job."""

    name: str
    spec: dict[str, Any] = field(default_factory=dict)
    spec_hash: str = ""  # a request_id used again must come with the same hash
    labels: dict[str, str] = field(default_factory=dict)
    priority: int = 0
    request_id: str | None = None
    max_attempts: int = 3
    total_steps: int = 0
    needs: str = "any"  # "gpu": only a worker with a GPU claims it
    tenant: str = ""
    devices: int = 1  # only a worker holding this many devices claims it
    machines: int = 1  # or, when more than 1, that many workers holding their share each


def new_job_id() -> str:
    return f"job-{uuid.uuid4().hex[:20]}"


class Jobs(EventLog, Database):
    """The jobs table: create, read, list, change state, cancel, prune."""

    def create_job(self, new: NewJob, *, max_queued: int | None = None) -> tuple[Job, bool]:
        """(job, created). A repeated request_id (within the tenant) returns the first job when
        its spec is the same, and raises AlreadyExists when it is not. With `max_queued`, a
        tenant that already has that many jobs waiting gets QueueFull."""
        try:
            return self._create_job(new, max_queued)
        except sa.exc.IntegrityError:
            # Two replicas raced with the same request_id; the loser answers with the winner.
            if not new.request_id:
                raise
            return self._create_job(new, max_queued)

    def _create_job(self, new: NewJob, max_queued: int | None) -> tuple[Job, bool]:
        request_id, tenant = new.request_id, new.tenant
        now = time.time()
        with self.engine.begin() as conn:
            if request_id:
                row = conn.execute(
                    sa.select(jobs).where(
                        (jobs.c.tenant == tenant) & (jobs.c.request_id == request_id)
                    )
                ).first()
                if row is not None:
                    existing = Job.from_row(row)
                    if existing.spec_hash != new.spec_hash:
                        raise AlreadyExists(
                            f"request_id {request_id!r} was used for job {existing.id} "
                            "with a different spec"
                        )
                    return existing, False
            if max_queued is not None:
                if self.postgres:
                    # Concurrent submits of one tenant count and insert one after another;
                    # taken before any row lock, so it cannot deadlock with the event lock.
                    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(sa.func.hashtext(tenant))))
                # Counting stops at the limit: a long queue must not make every submit slower.
                waiting = (
                    sa.select(jobs.c.id)
                    .where((jobs.c.tenant == tenant) & (jobs.c.state == JobState.QUEUED.value))
                    .limit(max_queued)
                    .subquery()
                )
                queued = conn.execute(sa.select(sa.func.count()).select_from(waiting)).scalar_one()
                if queued >= max_queued:
                    raise QueueFull(
                        f"{queued} jobs already queued for this tenant; the limit is "
                        f"{max_queued} (max_queued_per_tenant): wait for some to start"
                    )
            return self._insert_job(conn, new, now), True

    def _insert_job(self, conn: sa.Connection, new: NewJob, now: float) -> Job:
        """Queue a new job in the caller's transaction: its row, its first event, the wakeup."""
        job_id = new_job_id()
        conn.execute(
            jobs.insert().values(
                id=job_id,
                name=new.name,
                spec=json.dumps(new.spec, sort_keys=True),
                labels=json.dumps(new.labels, sort_keys=True),
                state=JobState.QUEUED.value,
                priority=new.priority,
                request_id=new.request_id or None,
                spec_hash=new.spec_hash,
                created_at=now,
                queued_at=now,
                attempts=0,
                max_attempts=new.max_attempts,
                cancel_requested=False,
                step=0,
                total_steps=new.total_steps,
                test_metrics="{}",
                last_seq=0,
                needs=new.needs,
                tenant=new.tenant,
                devices=new.devices,
                machines=new.machines,
            )
        )
        self._append(conn, job_id, [NewEvent.of(StateEvent(JobState.QUEUED, 0, time.time()))])
        self._notify(conn, QUEUE_CHANNEL, job_id)
        return Job.from_row(conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).one())

    def get_job(self, job_id: str, tenant: str | None = None) -> Job:
        """The job; with `tenant`, only that tenant's (another's is as unknown as a missing
        one, so ids reveal nothing)."""
        with self.reader.connect() as conn:
            return self._get(conn, job_id, tenant=tenant)

    def _get(
        self, conn: sa.Connection, job_id: str, *, lock: bool = False, tenant: str | None = None
    ) -> Job:
        query = sa.select(jobs).where(jobs.c.id == job_id)
        if tenant is not None:
            query = query.where(jobs.c.tenant == tenant)
        row = conn.execute(self._locked(query) if lock else query).first()
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
        tenant: str | None = None,
    ) -> list[Job]:
        """Newest first; `after` is the (created_at, id) of the last job of the previous page."""
        query = sa.select(jobs).order_by(jobs.c.created_at.desc(), jobs.c.id.desc())
        if tenant is not None:
            query = query.where(jobs.c.tenant == tenant)
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
            # Streamed: a label filter reads rows until the page is full, never all at once.
            query = query.limit(limit if not wanted else None).execution_options(yield_per=50)
            for row in conn.execute(query):
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
        held_by: str | None = None,
        failure: Failure | None = None,
        **values: Any,
    ) -> None:
        """The one way a job changes state, inside the caller's transaction, which has read
        `job` with its row locked. With `held_by`, only while that worker holds the lease."""
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
        if failure is not None:
            values.update(
                error_reason=failure.reason,
                error_message=failure.message,
                error_step=failure.step,
            )
        where = (jobs.c.id == job.id) & (jobs.c.state == job.state.value)
        if held_by is not None:
            where &= jobs.c.lease_owner == held_by
        done = conn.execute(jobs.update().where(where).values(state=to.value, **values))
        if done.rowcount != 1:
            raise LeaseLost(f"job {job.id} is no longer held by {held_by}")
        if to == JobState.QUEUED:
            self._notify(conn, QUEUE_CHANNEL, job.id)
        attempt = values.get("attempts", job.attempts)
        self._append(conn, job.id, [NewEvent.of(StateEvent(to, attempt, now, failure))])

    def cancel(self, job_id: str, tenant: str | None = None) -> Job:
        """QUEUED becomes CANCELLED at once; RUNNING becomes CANCELLING and its worker stops it."""
        with self.engine.begin() as conn:
            job = self._get(conn, job_id, lock=True, tenant=tenant)
            if job.terminal:
                raise JobFinished(f"job {job_id} already {job.state.value.lower()}")
            if job.state == JobState.QUEUED:
                self.transition(conn, job, JobState.CANCELLED, cancel_requested=True)
            elif job.state == JobState.RUNNING:
                self.transition(conn, job, JobState.CANCELLING, cancel_requested=True)
            return self._get(conn, job_id)

    def prune(
        self, *, finished_before: float | None = None, keep_last: int | None = None
    ) -> list[str]:
        """Delete finished jobs (and their events) that ended before `finished_before`, or
        beyond the newest `keep_last` finished ones; never a queued or running job. Returns
        the ids deleted, for their artifacts to go too."""
        terminal = [s.value for s in TERMINAL]
        doomed: set[str] = set()
        with self.engine.begin() as conn:
            if finished_before is not None:
                rows = conn.execute(
                    sa.select(jobs.c.id).where(
                        jobs.c.state.in_(terminal) & (jobs.c.finished_at < finished_before)
                    )
                )
                doomed.update(r[0] for r in rows)
            if keep_last is not None:
                rows = conn.execute(
                    sa.select(jobs.c.id)
                    .where(jobs.c.state.in_(terminal))
                    .order_by(jobs.c.finished_at.desc(), jobs.c.id.desc())
                    .offset(keep_last)
                )
                doomed.update(r[0] for r in rows)
            ids = sorted(doomed)
            for chunk in range(0, len(ids), 500):
                some = ids[chunk : chunk + 500]
                conn.execute(events.delete().where(events.c.job_id.in_(some)))
                # The state is checked again here: a job cannot be pruned unless finished.
                conn.execute(jobs.delete().where(jobs.c.id.in_(some) & jobs.c.state.in_(terminal)))
        return ids
