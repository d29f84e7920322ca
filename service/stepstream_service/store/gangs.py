"""Gangs: one job across several workers (runtime.machines > 1).

The worker that claims such a job is its chief (rank 0, the holder of its lease); in the same
transaction it takes that many idle workers more as members, or the job stays queued: a gang
is claimed whole or not at all, and nobody holds part of one while waiting. A member learns
its part from its own row (`gang_job`, `gang_attempt`, `gang_rank`); the part is over once the
job leaves that attempt, however it ended. Every worker that can join one registers where the
gang's replicas reach it (`address`).

In a gang a CPU worker holds one device: TensorFlow's multi-worker strategy puts one replica
on a worker's CPU, however many logical devices the worker split it into.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from stepstream.kernel.states import JobState
from stepstream_service.store.database import Database
from stepstream_service.store.jobs import Job
from stepstream_service.store.schema import jobs, workers

HELD = (JobState.RUNNING.value, JobState.CANCELLING.value)


@dataclass(frozen=True)
class GangPart:
    """A member's share of a gang: the job, the attempt it serves, its rank, and every
    replica's address in rank order."""

    job: Job
    attempt: int
    rank: int
    addresses: list[str]


def per_machine(job: Job) -> int:
    return job.devices // max(1, job.machines)


def gang_devices(gpus: int) -> int:
    """The devices a worker brings to a gang: its GPUs, or its CPU as one."""
    return gpus or 1


def capable(row: Any, job: Job) -> bool:
    """Whether a worker row can take a rank of `job`."""
    if row.address is None or (job.needs == "gpu" and row.gpus == 0):
        return False
    return gang_devices(row.gpus) >= per_machine(job)


class Gangs(Database):
    """Gathering gangs inside a claim, and a member's view of its part."""

    def _live(self, conn: sa.Connection, within: float) -> list[Any]:
        """Workers seen in the last `within` seconds and not stopped."""
        since = time.time() - within
        return conn.execute(
            sa.select(workers.c.id, workers.c.gpus, workers.c.address).where(
                (workers.c.seen_at >= since) & workers.c.stopped_at.is_(None)
            )
        ).all()

    def busy_workers(self) -> set[str]:
        """Workers holding a job's lease, or serving a gang's live attempt."""
        with self.reader.connect() as conn:
            return self._busy(conn)

    def _busy(self, conn: sa.Connection) -> set[str]:
        """Workers holding a job's lease, or serving a gang's live attempt."""
        owners = conn.execute(
            sa.select(jobs.c.lease_owner).where(
                jobs.c.state.in_(HELD) & jobs.c.lease_owner.is_not(None)
            )
        ).scalars()
        members = conn.execute(
            sa.select(workers.c.id)
            .join(jobs, jobs.c.id == workers.c.gang_job)
            .where(jobs.c.state.in_(HELD) & (jobs.c.attempts == workers.c.gang_attempt))
        ).scalars()
        return {*owners, *members}

    def _serving(self, conn: sa.Connection, worker: str) -> bool:
        """Whether `worker` is a member of a gang that still runs; its row locked (on
        PostgreSQL) so no chief takes it while it claims a job of its own."""
        row = conn.execute(
            self._locked(
                sa.select(workers.c.gang_job, workers.c.gang_attempt).where(workers.c.id == worker)
            )
        ).first()
        if row is None or row.gang_job is None:
            return False
        return self._part_live(conn, row.gang_job, row.gang_attempt)

    def _part_live(self, conn: sa.Connection, job_id: str, attempt: int) -> bool:
        row = conn.execute(
            sa.select(jobs.c.state, jobs.c.attempts).where(jobs.c.id == job_id)
        ).first()
        return row is not None and row.state in HELD and row.attempts == attempt

    def _impossible(self, conn: sa.Connection, chief: str, within: float) -> set[str]:
        """Queued gangs this worker cannot lead now or no set of live workers can form: the
        claim passes over them, so a gang that never fits blocks nobody. (One that fits but
        waits for members to come free is not here: see _gather.)"""
        queued = conn.execute(
            sa.select(jobs).where((jobs.c.state == JobState.QUEUED.value) & (jobs.c.machines > 1))
        ).all()
        if not queued:
            return set()
        live = self._live(conn, within)
        me = next((w for w in live if w.id == chief), None)
        out = set()
        for row in queued:
            job = Job.from_row(row)
            able = sum(1 for w in live if capable(w, job))
            if me is None or not capable(me, job) or able < job.machines:
                out.add(job.id)
        return out

    def _gather(self, conn: sa.Connection, chief: str, job: Job, within: float) -> list[str] | None:
        """Take `job.machines - 1` idle workers besides the chief as the gang's members, and
        write every rank's address on the job; None (nothing taken) when too few are idle."""
        live = {w.id: w for w in self._live(conn, within)}
        busy = self._busy(conn)
        idle = sorted(
            w.id for w in live.values() if w.id != chief and w.id not in busy and capable(w, job)
        )
        wanted = job.machines - 1
        if len(idle) < wanted:
            return None
        # Rows another claimer holds (it is taking a job of its own) are passed over.
        query = sa.select(workers.c.id).where(workers.c.id.in_(idle)).order_by(workers.c.id)
        taken = conn.execute(self._locked(query, skip_locked=True)).scalars().all()[:wanted]
        if len(taken) < wanted:
            return None
        attempt = job.attempts + 1
        for rank, member in enumerate(taken, start=1):
            conn.execute(
                workers.update()
                .where(workers.c.id == member)
                .values(gang_job=job.id, gang_attempt=attempt, gang_rank=rank)
            )
        addresses = [live[chief].address, *(live[m].address for m in taken)]
        conn.execute(jobs.update().where(jobs.c.id == job.id).values(gang=json.dumps(addresses)))
        return taken

    def gang_part(self, worker: str) -> GangPart | None:
        """This worker's part in a gang that runs now, if it has one."""
        with self.reader.connect() as conn:
            row = conn.execute(
                sa.select(workers.c.gang_job, workers.c.gang_attempt, workers.c.gang_rank).where(
                    workers.c.id == worker
                )
            ).first()
            if row is None or row.gang_job is None:
                return None
            found = conn.execute(sa.select(jobs).where(jobs.c.id == row.gang_job)).first()
            if found is None:
                return None
            job = Job.from_row(found)
            if job.state.value not in HELD or job.attempts != row.gang_attempt or not job.gang:
                return None
            return GangPart(job, row.gang_attempt, row.gang_rank, job.gang)

    def part_live(self, job_id: str, attempt: int) -> bool:
        """Whether the gang attempt a member serves still runs."""
        with self.reader.connect() as conn:
            return self._part_live(conn, job_id, attempt)

    def gang_intact(self, job_id: str, attempt: int, members: int, within: float) -> bool:
        """Whether every member of the gang's attempt still serves it: its row names the
        attempt (a worker started anew has cleared it) and it was seen in the last `within`
        seconds (one whose machine died is not)."""
        since = time.time() - within
        with self.reader.connect() as conn:
            serving = conn.execute(
                sa.select(sa.func.count()).where(
                    (workers.c.gang_job == job_id)
                    & (workers.c.gang_attempt == attempt)
                    & (workers.c.seen_at >= since)
                    & workers.c.stopped_at.is_(None)
                )
            ).scalar_one()
        return serving == members
