"""Why a queued job waits, and where it stands: what GetJob and `trainer show` say of it."""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import sqlalchemy as sa

from stepstream.kernel.states import JobState
from stepstream_service.store.fairshare import FairShare, Usage, Waiting
from stepstream_service.store.gangs import gang_devices, per_machine
from stepstream_service.store.jobs import Job
from stepstream_service.store.schema import jobs
from stepstream_service.store.workers import WorkerInfo, device_count

if TYPE_CHECKING:
    from stepstream_service.store import Store


@dataclass(frozen=True)
class Pending:
    position: int  # 1: the next job a free worker that fits it takes
    reason: str


def pending(store: Store, job: Job, share: FairShare, live_within: float) -> Pending:
    """`job`'s place in the queue (fair share, then priority and age, as claims go; the
    per-tenant cap left aside) and the first reason that holds it back."""
    with store.reader.connect() as conn:
        rows = conn.execute(
            sa.select(jobs.c.id, jobs.c.tenant, jobs.c.priority, jobs.c.queued_at, jobs.c.devices)
            .where(jobs.c.state == JobState.QUEUED.value)
            .order_by(jobs.c.priority.desc(), jobs.c.queued_at, jobs.c.id)
        ).all()
        usage = store.running_usage(conn)
    position = _position(rows, usage, dataclasses.replace(share, max_running=None), job.id)
    return Pending(position, _reason(store, job, share, usage, position, live_within))


def _position(rows, usage: dict[str, Usage], share: FairShare, job_id: str) -> int:
    """Claims played forward: each takes the first job of the tenant fair share serves next,
    whose devices then count as that tenant's."""
    queues: dict[str, deque] = {}
    for row in rows:
        queues.setdefault(row.tenant, deque()).append(row)
    usage = dict(usage)
    for position in range(1, len(rows) + 1):
        heads = (Waiting(t, q[0].priority, q[0].queued_at) for t, q in queues.items())
        tenant = share.order(heads, usage)[0]
        row = queues[tenant].popleft()
        if row.id == job_id:
            return position
        if not queues[tenant]:
            del queues[tenant]
        held = usage.get(tenant, Usage())
        usage[tenant] = Usage(held.jobs + 1, held.devices + row.devices)
    return len(rows) + 1  # queued since the read above


def _reason(
    store: Store,
    job: Job,
    share: FairShare,
    usage: dict[str, Usage],
    position: int,
    live_within: float,
) -> str:
    live = store.live_workers(live_within)
    if not live:
        return "no worker is running; the job starts when one registers"
    kind = [w for w in live if w.gpus] if job.needs == "gpu" else live
    if not kind:
        return "no worker with a GPU has registered"
    if job.machines > 1:
        return _gang_reason(store, job, kind, share, usage, position)
    n = job.devices
    wanted = f"{n} device{'s' if n != 1 else ''}"
    capable = [w for w in kind if _holds(w) >= n]
    if not capable:
        largest = max(_holds(w) for w in kind)
        return f"waiting for {wanted} on one worker; the largest worker holds {largest}"
    held = usage.get(job.tenant, Usage())
    if share.capped(held):
        return f"tenant quota: {held.jobs} of {share.max_running} running"
    busy = store.busy_workers()
    if all(w.id in busy for w in capable):
        free = sum(_holds(w) for w in kind if w.id not in busy)
        return f"waiting for {wanted}, {free} free"
    ahead = position - 1
    if ahead:
        return f"{ahead} job{'s' if ahead != 1 else ''} ahead of it"
    return "next to start"


def _gang_reason(
    store: Store,
    job: Job,
    kind: list[WorkerInfo],
    share: FairShare,
    usage: dict[str, Usage],
    position: int,
) -> str:
    per = per_machine(job)
    wanted = f"{job.machines} workers with {per} device{'s' if per != 1 else ''} each"
    able = [w for w in kind if w.address and gang_devices(w.gpus) >= per]
    if len(able) < job.machines:
        return f"waiting for {wanted}; {len(able)} such registered"
    held = usage.get(job.tenant, Usage())
    if share.capped(held):
        return f"tenant quota: {held.jobs} of {share.max_running} running"
    busy = store.busy_workers()
    idle = sum(1 for w in able if w.id not in busy)
    if idle < job.machines:
        return f"waiting for {wanted}, {idle} idle"
    ahead = position - 1
    if ahead:
        return f"{ahead} job{'s' if ahead != 1 else ''} ahead of it"
    return "next to start"


def _holds(worker: WorkerInfo) -> int:
    return device_count(worker.devices)
