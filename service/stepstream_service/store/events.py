"""The append-only event log: `(job_id, seq)` per job, and a global id the event tail follows."""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import sqlalchemy as sa

from stepstream.kernel.events import Event, to_payload
from stepstream_service.store.database import Database
from stepstream_service.store.errors import LeaseLost
from stepstream_service.store.schema import events, jobs

# Held from an event insert to its commit, so event ids commit in increasing order.
_EVENT_LOCK = 0x74726576  # "trev"
EVENTS_CHANNEL = "trainer_events"


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


class Appended(NamedTuple):
    last_seq: int
    cancel_requested: bool


@dataclass
class NewEvent:
    kind: str
    payload: dict[str, Any]
    time: float = field(default_factory=time.time)

    @classmethod
    def of(cls, event: Event) -> NewEvent:
        return cls(event.kind, to_payload(event), event.time)


_SELECTED = ", ".join(c.name for c in EVENT_COLUMNS)


class EventLog(Database):
    """Events are appended inside the caller's transaction, last, and read by job or by id."""

    @functools.cached_property
    def _insert_events(self) -> str:
        return (
            f"INSERT INTO events (job_id, seq, kind, payload, time) "
            f"VALUES ({', '.join([self.mark] * 5)})"
        )

    # The event tail polls 20 times a second and a watcher that attaches may read a thousand
    # events: as driver SQL, neither builds an SQL expression and its cache key on every call,
    # which took more of a poll than the query did.
    @functools.cached_property
    def _events_of_job(self) -> str:
        return (
            f"SELECT {_SELECTED} FROM events WHERE job_id = {self.mark} AND seq > {self.mark} "
            f"ORDER BY seq LIMIT {self.mark}"
        )

    @functools.cached_property
    def _events_since(self) -> str:
        mark = self.mark
        return f"SELECT {_SELECTED} FROM events WHERE id > {mark} ORDER BY id LIMIT {mark}"

    def append_events(
        self, job_id: str, worker: str, new: list[NewEvent], progress: dict[str, Any]
    ) -> Appended:
        """Append events written by the worker holding the job; a worker that lost its lease
        is refused (LeaseLost), so a stale worker cannot interleave with the new attempt.
        Says whether the job was cancelled meanwhile: the worker hears it a window after the
        cancel, not a heartbeat after (a pruned trial stops at once)."""
        with self.engine.begin() as conn:
            update = jobs.update().where((jobs.c.id == job_id) & (jobs.c.lease_owner == worker))
            update = update.values(**progress) if progress else update.values(id=job_id)
            held = conn.execute(update.returning(jobs.c.cancel_requested)).first()
            if held is None:
                raise LeaseLost(f"job {job_id} is no longer held by {worker}")
            return Appended(self._append(conn, job_id, new), bool(held[0]))

    def _append(self, conn: sa.Connection, job_id: str, new: list[NewEvent]) -> int:
        """Give the events the job's next sequence numbers and insert them; the last statement
        of its transaction that touches a row (see the module's note on the event lock)."""
        payloads = [json.dumps(e.payload, allow_nan=True) for e in new]
        last = conn.execute(
            jobs.update()
            .where(jobs.c.id == job_id)
            .values(
                last_seq=jobs.c.last_seq + len(new),
                # What the tenant's storage quota counts (ASCII JSON: a character is a byte).
                stored_bytes=jobs.c.stored_bytes + sum(map(len, payloads)),
            )
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
                (job_id, first + i + 1, e.kind, payload, e.time)
                for i, (e, payload) in enumerate(zip(new, payloads, strict=True))
            ],
        )
        self._notify(conn, EVENTS_CHANNEL, job_id)
        return last

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
