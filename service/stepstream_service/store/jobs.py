"""Jobs, their states and leases, the workers, and the append-only event log.

Two engines, one schema (store.schema): SQLite in WAL mode is the embedded default,
PostgreSQL is for scale-out. Every state change goes through `transition()`, which refuses to
leave a terminal state, stamps times, and writes the state-change event in the same transaction.

On PostgreSQL, write transactions lock the job rows they change (claims skip rows another
claimer holds), and every transaction that appends events takes one advisory lock just before
its insert and holds it to commit, so event ids become visible in increasing order and the event
tail can read "everything after id N" without missing a slower, earlier transaction. Callers
append last in their transaction, so that lock is never held while waiting for a row.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event

from stepstream.kernel.events import Event, StateEvent, to_payload
from stepstream.kernel.failures import Failure
from stepstream.kernel.states import TERMINAL, JobState
from stepstream_service.errors import TrainerError
from stepstream_service.store import schema
from stepstream_service.store.schema import events, jobs, workers

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


class QueueFull(TrainerError):
    """A tenant has as many jobs waiting as it may."""

    reason = "queue_full"


class LeaseLost(TrainerError):
    """A worker wrote for a job it no longer holds (its lease expired and it was re-claimed)."""

    reason = "lease_lost"


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
        d["cancel_requested"] = bool(d["cancel_requested"])
        return cls(**d)


EVENT_COLUMNS = (
    events.c.id,
    events.c.job_id,
    events.c.seq,
    events.c.kind,
    events.c.payload,
    events.c.time,
)


@dataclass(frozen=True)
class EventRow:
    """One event as read back; `from_row` takes `EVENT_COLUMNS` in this order."""

    id: int
    job_id: str
    seq: int
    kind: str
    payload: dict[str, Any]
    time: float

    @classmethod
    def from_row(cls, row: Any) -> EventRow:
        """From a row of `EVENT_COLUMNS`, by position: building a mapping per row cost more
        than the query, and every watcher that attaches reads up to a thousand rows."""
        id_, job_id, seq, kind, payload, at = row
        return cls(id_, job_id, seq, kind, json.loads(payload), at)


@dataclass
class NewEvent:
    kind: str
    payload: dict[str, Any]
    time: float = field(default_factory=time.time)

    @classmethod
    def of(cls, event: Event) -> NewEvent:
        return cls(event.kind, to_payload(event), event.time)


def new_job_id() -> str:
    return f"job-{uuid.uuid4().hex[:20]}"


def engine_url(url: str) -> str:
    """postgresql:// and postgres:// URLs use psycopg 3 (SQLAlchemy's default is psycopg2)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


# Held from an event insert to its commit, so event ids commit in increasing order.
_EVENT_LOCK = 0x74726576  # "trev"
QUEUE_CHANNEL = "trainer_queue"
EVENTS_CHANNEL = "trainer_events"


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    host: str
    devices: list[str]
    gpus: int
    started_at: float
    seen_at: float
    stopped_at: float | None


class Store:
    """The jobs table, the queue on top of it, the workers, and the event log."""

    def __init__(self, url: str, *, create: bool = True):
        self.url = engine_url(url)
        self.dialect = sa.make_url(self.url).get_backend_name()
        self.postgres = self.dialect == "postgresql"
        if self.postgres:
            # pre_ping: after a database restart, stale pooled connections are replaced, not used.
            self.engine = sa.create_engine(self.url, pool_pre_ping=True, pool_size=10)
            self.reader = self.engine
        else:
            self.engine = sa.create_engine(self.url)
            sa_event.listen(self.engine, "connect", _sqlite_pragmas)
            sa_event.listen(self.engine, "begin", _sqlite_begin_immediate)
            # Reads get their own engine without the write lock, so WAL readers never wait.
            self.reader = sa.create_engine(self.url)
            sa_event.listen(self.reader, "connect", _sqlite_pragmas)
        schema.check(self.engine, create=create)
        mark = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
        self._insert_events = (
            f"INSERT INTO events (job_id, seq, kind, payload, time) "
            f"VALUES ({', '.join([mark] * 5)})"
        )
        # The event tail polls 20 times a second and a watcher that attaches may read a
        # thousand events: as driver SQL, neither builds an SQL expression and its cache key
        # on every call, which took more of a poll than the query did.
        columns = ", ".join(c.name for c in EVENT_COLUMNS)
        self._events_of_job = (
            f"SELECT {columns} FROM events WHERE job_id = {mark} AND seq > {mark} "
            f"ORDER BY seq LIMIT {mark}"
        )
        self._events_since = (
            f"SELECT {columns} FROM events WHERE id > {mark} ORDER BY id LIMIT {mark}"
        )

    def close(self) -> None:
        self.engine.dispose()
        self.reader.dispose()

    def _locked(self, query: sa.Select, *, skip_locked: bool = False) -> sa.Select:
        # SQLite's BEGIN IMMEDIATE already serialises writers; FOR UPDATE is PostgreSQL's way.
        return query.with_for_update(skip_locked=skip_locked) if self.postgres else query

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
        needs: str = "any",
        tenant: str = "",
        max_queued: int | None = None,
    ) -> tuple[Job, bool]:
        """(job, created). A repeated request_id (within the tenant) returns the first job when
        its spec is the same, and raises AlreadyExists when it is not. With `max_queued`, a
        tenant that already has that many jobs waiting gets QueueFull."""
        fields = dict(
            name=name,
            spec=spec,
            spec_hash=spec_hash,
            labels=labels,
            priority=priority,
            request_id=request_id,
            max_attempts=max_attempts,
            total_steps=total_steps,
            needs=needs,
            tenant=tenant,
            max_queued=max_queued,
        )
        try:
            return self._create_job(**fields)
        except sa.exc.IntegrityError:
            # Two replicas raced with the same request_id; the loser answers with the winner.
            if not request_id:
                raise
            return self._create_job(**fields)

    def _create_job(
        self,
        *,
        name: str,
        spec: dict[str, Any],
        spec_hash: str,
        labels: dict[str, str],
        priority: int,
        request_id: str | None,
        max_attempts: int,
        total_steps: int,
        needs: str,
        tenant: str,
        max_queued: int | None,
    ) -> tuple[Job, bool]:
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
                    if existing.spec_hash != spec_hash:
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
                    needs=needs,
                    tenant=tenant,
                )
            )
            self._append(conn, job_id, [NewEvent.of(StateEvent(JobState.QUEUED, 0, time.time()))])
            self._notify(conn, QUEUE_CHANNEL, job_id)
            return Job.from_row(
                conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).one()
            ), True

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

    # ---------------------------------------------------------------- queue and leases

    def claim(self, worker: str, lease_seconds: float, *, gpus: int = 0) -> Job | None:
        """Take the highest-priority, oldest queued job this worker can run, and lease it.

        On PostgreSQL, rows another claimer holds are skipped (FOR UPDATE SKIP LOCKED), so many
        workers claim different jobs at once without waiting for each other.
        """
        query = sa.select(jobs).where(jobs.c.state == JobState.QUEUED.value)
        if gpus == 0:
            query = query.where(jobs.c.needs != "gpu")
        query = query.order_by(jobs.c.priority.desc(), jobs.c.queued_at, jobs.c.id).limit(1)
        with self.engine.begin() as conn:
            row = conn.execute(self._locked(query, skip_locked=True)).first()
            if row is None:
                return None
            job = Job.from_row(row)
            self.transition(
                conn,
                job,
                JobState.RUNNING,
                lease_owner=worker,
                worker=worker,
                lease_expires_at=time.time() + lease_seconds,
                attempts=job.attempts + 1,
            )
            return self._get(conn, job.id)

    def heartbeat(self, job_id: str, worker: str, lease_seconds: float) -> bool:
        """Extend the lease; True when the job should stop (cancel requested)."""
        with self.engine.begin() as conn:
            now = time.time()
            cancel = conn.execute(
                jobs.update()
                .where((jobs.c.id == job_id) & (jobs.c.lease_owner == worker))
                .values(lease_expires_at=now + lease_seconds)
                .returning(jobs.c.cancel_requested)
            ).scalar_one_or_none()
            if cancel is None:
                raise LeaseLost(f"job {job_id} is no longer held by {worker}")
            conn.execute(workers.update().where(workers.c.id == worker).values(seen_at=now))
            return bool(cancel)

    def finish(
        self,
        job_id: str,
        worker: str,
        to: JobState,
        *,
        failure: Failure | None = None,
        **values: Any,
    ) -> None:
        with self.engine.begin() as conn:
            job = self._get(conn, job_id, lock=True)
            if job.state == JobState.CANCELLING and to == JobState.QUEUED:
                to = JobState.CANCELLED  # a job being cancelled is not handed back to the queue
            self.transition(conn, job, to, held_by=worker, failure=failure, **values)

    def rescue(self, now: float | None = None) -> list[tuple[str, JobState]]:
        """Requeue (or fail, when attempts are used up) jobs whose lease expired.

        Every server replica runs this; a row another rescuer (or the job's own worker) holds
        is skipped, and the expiry is checked again on the locked row.
        """
        now = time.time() if now is None else now
        acted = []
        query = sa.select(jobs).where(
            jobs.c.state.in_([JobState.RUNNING.value, JobState.CANCELLING.value])
            & (jobs.c.lease_expires_at < now)
        )
        with self.engine.begin() as conn:
            for row in conn.execute(self._locked(query, skip_locked=True)).all():
                job = Job.from_row(row)
                if job.state == JobState.CANCELLING:
                    self.transition(conn, job, JobState.CANCELLED)
                    acted.append((job.id, JobState.CANCELLED))
                elif job.attempts < job.max_attempts:
                    self.transition(conn, job, JobState.QUEUED)
                    acted.append((job.id, JobState.QUEUED))
                else:
                    failure = Failure(
                        "worker_lost",
                        f"the worker running it stopped answering, {job.attempts} time(s); "
                        f"attempts used up ({job.max_attempts})",
                        job.step,
                    )
                    self.transition(conn, job, JobState.FAILED, failure=failure)
                    acted.append((job.id, JobState.FAILED))
        return acted

    # ---------------------------------------------------------------- retention

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

    # ---------------------------------------------------------------- workers

    def register_worker(self, worker: str, host: str, devices: list[str]) -> None:
        """A worker says which devices it has, at start-up; claims use it to place GPU jobs."""
        now = time.time()
        gpus = sum(1 for d in devices if "GPU" in d.upper())
        values = dict(
            host=host, devices=json.dumps(devices), gpus=gpus, seen_at=now, stopped_at=None
        )
        with self.engine.begin() as conn:
            done = conn.execute(workers.update().where(workers.c.id == worker).values(**values))
            if done.rowcount == 0:
                conn.execute(workers.insert().values(id=worker, started_at=now, **values))

    def worker_seen(self, worker: str, *, stopped: bool = False) -> None:
        now = time.time()
        values: dict[str, Any] = {"seen_at": now}
        if stopped:
            values["stopped_at"] = now
        with self.engine.begin() as conn:
            conn.execute(workers.update().where(workers.c.id == worker).values(**values))

    def live_workers(self, within: float) -> list[WorkerInfo]:
        """Workers seen in the last `within` seconds and not stopped."""
        since = time.time() - within
        with self.reader.connect() as conn:
            rows = conn.execute(
                sa.select(workers)
                .where((workers.c.seen_at >= since) & workers.c.stopped_at.is_(None))
                .order_by(workers.c.id)
            )
            return [WorkerInfo(**{**r._mapping, "devices": json.loads(r.devices)}) for r in rows]

    def busy_workers(self) -> set[str]:
        with self.reader.connect() as conn:
            rows = conn.execute(
                sa.select(jobs.c.lease_owner).where(
                    jobs.c.state.in_([JobState.RUNNING.value, JobState.CANCELLING.value])
                    & jobs.c.lease_owner.is_not(None)
                )
            )
            return {r[0] for r in rows}

    # ---------------------------------------------------------------- events

    def append_events(
        self, job_id: str, worker: str, new: list[NewEvent], progress: dict[str, Any]
    ) -> int:
        """Append events written by the worker holding the job; a worker that lost its lease
        is refused (LeaseLost), so a stale worker cannot interleave with the new attempt."""
        with self.engine.begin() as conn:
            update = jobs.update().where((jobs.c.id == job_id) & (jobs.c.lease_owner == worker))
            done = conn.execute(update.values(**progress) if progress else update.values(id=job_id))
            if done.rowcount != 1:
                raise LeaseLost(f"job {job_id} is no longer held by {worker}")
            return self._append(conn, job_id, new)

    def _append(self, conn: sa.Connection, job_id: str, new: list[NewEvent]) -> int:
        """Give the events the job's next sequence numbers and insert them; the last statement
        of its transaction that touches a row (see the module's note on the event lock)."""
        last = conn.execute(
            jobs.update()
            .where(jobs.c.id == job_id)
            .values(last_seq=jobs.c.last_seq + len(new))
            .returning(jobs.c.last_seq)
        ).scalar_one()
        if not new:
            return last
        if self.postgres:
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_EVENT_LOCK})")
        first = last - len(new)
        # Straight to the driver's executemany: a window of step events is one call, without
        # SQLAlchemy's per-row parameter processing on the training hot path.
        conn.exec_driver_sql(
            self._insert_events,
            [
                (job_id, first + i + 1, e.kind, json.dumps(e.payload, allow_nan=True), e.time)
                for i, e in enumerate(new)
            ],
        )
        self._notify(conn, EVENTS_CHANNEL, job_id)
        return last

    def _notify(self, conn: sa.Connection, channel: str, job_id: str) -> None:
        # Delivered at commit, ids only: listeners read the data from the tables.
        if self.postgres:
            conn.execute(sa.select(sa.func.pg_notify(channel, job_id)))

    def read_events(self, job_id: str, after_seq: int = 0, limit: int = 1000) -> list[EventRow]:
        with self.reader.connect() as conn:
            rows = conn.exec_driver_sql(self._events_of_job, (job_id, after_seq, limit))
            return [EventRow.from_row(r) for r in rows]

    def events_since(self, event_id: int, limit: int = 5000) -> list[EventRow]:
        """Every job's events after the global id `event_id`, oldest first (the event tail)."""
        with self.reader.connect() as conn:
            rows = conn.exec_driver_sql(self._events_since, (event_id, limit))
            return [EventRow.from_row(r) for r in rows]

    def last_event_id(self) -> int:
        with self.reader.connect() as conn:
            return conn.execute(
                sa.select(sa.func.coalesce(sa.func.max(events.c.id), 0))
            ).scalar_one()


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
