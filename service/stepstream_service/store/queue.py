"""The queue on top of the jobs table: claims, leases and their renewal, finishing, and the
rescue of jobs whose worker stopped answering."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from stepstream.kernel.events import ResultEvent
from stepstream.kernel.failures import Failure
from stepstream.kernel.states import JobState
from stepstream_service.store.errors import LeaseLost
from stepstream_service.store.events import NewEvent
from stepstream_service.store.fairshare import EVEN, FairShare, Usage, Waiting
from stepstream_service.store.gangs import Gangs
from stepstream_service.store.jobs import QUEUE_CHANNEL, Job, Jobs
from stepstream_service.store.schema import jobs, workers


class Queue(Jobs, Gangs):
    """Workers take jobs from here: fair share between tenants, then priority and age."""

    def claim(
        self,
        worker: str,
        lease_seconds: float,
        *,
        gpus: int = 0,
        devices: int = 1,
        share: FairShare = EVEN,
        live_within: float = 15.0,
    ) -> Job | None:
        """Take the next queued job this worker can run (see store.fairshare for which), and
        lease it: one asking for at most `devices` devices, and none that needs a GPU when
        the worker has none. A job on one worker has all its devices there, so it is claimed
        whole or not at all, and no job holds part of what it needs while it waits.

        A job across several workers (runtime.machines) is led by the worker that claims it,
        which takes idle workers (seen in the last `live_within` seconds) as the other ranks in
        the same transaction (store.gangs). When too few are idle the job stays queued and this
        worker takes nothing else: the gang at the head of its order reserves it, so a stream
        of small jobs never starves a large one, and since an idle worker holds nothing, two
        gangs never deadlock. A member of a gang that runs claims nothing.

        On PostgreSQL, rows another claimer holds are skipped (FOR UPDATE SKIP LOCKED), so many
        workers claim different jobs at once without waiting for each other.
        """
        # One device each on a gang's other workers is what runtime.machines adds.
        fits = (jobs.c.state == JobState.QUEUED.value) & (
            jobs.c.devices <= devices * jobs.c.machines
        )
        if gpus == 0:
            fits &= jobs.c.needs != "gpu"
        with self.engine.begin() as conn:
            if self._serving(conn, worker):
                return None
            waiting = self._waiting(conn, fits)
            if any(row.machines > 1 for row in waiting):
                passed = self._impossible(conn, worker, live_within)
                if passed:
                    fits &= jobs.c.id.not_in(passed)
                    waiting = self._waiting(conn, fits)
            if not waiting:
                return None
            order = share.order(
                (Waiting(*row[:3]) for row in waiting),
                self.running_usage(conn) if len(waiting) > 1 or share.max_running else {},
            )
            for tenant in order:
                query = (
                    sa.select(jobs)
                    .where(fits & (jobs.c.tenant == tenant))
                    .order_by(jobs.c.priority.desc(), jobs.c.queued_at, jobs.c.id)
                    .limit(1)
                )
                row = conn.execute(self._locked(query, skip_locked=True)).first()
                if row is None:  # another worker is taking it
                    continue
                job = Job.from_row(row)
                if job.machines > 1 and self._gather(conn, worker, job, live_within) is None:
                    return None  # reserved for the gang: see above
                self.transition(
                    conn,
                    job,
                    JobState.RUNNING,
                    lease_owner=worker,
                    worker=worker,
                    lease_expires_at=time.time() + lease_seconds,
                    attempts=job.attempts + 1,
                )
                if job.machines > 1:
                    self._notify(conn, QUEUE_CHANNEL, job.id)  # wakes the members
                return self._get(conn, job.id)
            return None

    def _waiting(self, conn: sa.Connection, fits: Any) -> list[Any]:
        """Per tenant with a job that fits: its highest priority, its oldest queued time, and
        the most workers one of them spans."""
        return conn.execute(
            sa.select(
                jobs.c.tenant,
                sa.func.max(jobs.c.priority),
                sa.func.min(jobs.c.queued_at),
                sa.func.max(jobs.c.machines).label("machines"),
            )
            .where(fits)
            .group_by(jobs.c.tenant)
        ).all()

    def running_usage(self, conn: sa.Connection) -> dict[str, Usage]:
        """Each tenant's running jobs and the devices they hold."""
        held = (JobState.RUNNING.value, JobState.CANCELLING.value)
        rows = conn.execute(
            sa.select(jobs.c.tenant, sa.func.count(), sa.func.sum(jobs.c.devices))
            .where(jobs.c.state.in_(held))
            .group_by(jobs.c.tenant)
        ).all()
        return {tenant: Usage(int(n), int(d or 0)) for tenant, n, d in rows}

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
                    # The worker never wrote its result: the job's history still ends with
                    # one, then the FAILED state (the same transaction, in that order).
                    result = ResultEvent(
                        outcome="failed",
                        steps=job.step,
                        stop_reason=failure.reason,
                        failure=failure,
                        duration_seconds=max(0.0, now - (job.started_at or now)),
                        time=now,
                    )
                    self._append(conn, job.id, [NewEvent.of(result)])
                    self.transition(conn, job, JobState.FAILED, failure=failure)
                    acted.append((job.id, JobState.FAILED))
        return acted
