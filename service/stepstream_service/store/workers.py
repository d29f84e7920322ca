"""The workers: which are alive, what they can run, which hold a job."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from stepstream_service.store.database import Database
from stepstream_service.store.schema import workers


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    host: str
    devices: list[str]
    gpus: int
    started_at: float
    seen_at: float
    stopped_at: float | None
    memory_bytes: int | None = None  # what a job must fit in on it; None: not told
    address: str | None = None  # where a gang's replicas reach it; None: it joins none
    gang_job: str | None = None  # the gang it last served as a member (see store.gangs)
    gang_attempt: int | None = None
    gang_rank: int | None = None


def device_count(devices: list[str]) -> int:
    """The devices a worker trains one job on: its GPUs when it has any, else its CPU devices
    (one, or the logical ones it split its CPU into)."""
    gpus = sum(1 for d in devices if "GPU" in d.upper())
    return gpus or max(1, sum(1 for d in devices if "CPU" in d.upper()))


class Workers(Database):
    """The workers table."""

    def register_worker(
        self,
        worker: str,
        host: str,
        devices: list[str],
        memory_bytes: int | None = None,
        address: str | None = None,
    ) -> None:
        """A worker says which devices it has, at start-up; claims use it to place GPU jobs.
        `memory_bytes` is what a job must fit in on it; submit refuses a job no worker holds.
        `address` ("host:port") is where a gang's replicas reach it; None: it joins none."""
        now = time.time()
        gpus = sum(1 for d in devices if "GPU" in d.upper())
        values = dict(
            host=host,
            devices=json.dumps(devices),
            gpus=gpus,
            seen_at=now,
            stopped_at=None,
            memory_bytes=memory_bytes,
            address=address,
            gang_job=None,
            gang_attempt=None,
            gang_rank=None,
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
