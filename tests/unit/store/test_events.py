"""store.events: the event log, by job and by global id."""

from __future__ import annotations

import threading

from stepstream_service.store import NewEvent
from tests.unit.store.conftest import make


def test_event_log_is_ordered_and_resumable(store):
    make(store)
    job = store.claim("w", 30)
    base = store.get_job(job.id).last_seq  # QUEUED and RUNNING state events
    assert [e.payload["state"] for e in store.read_events(job.id)] == ["QUEUED", "RUNNING"]
    last, cancelled = store.append_events(
        job.id,
        "w",
        [NewEvent("step", {"step": i}) for i in range(1, 11)],
        {"step": 10, "loss": 0.5},
    )
    assert last == base + 10 and not cancelled
    tail = store.read_events(job.id, after_seq=base + 4)
    assert [e.payload["step"] for e in tail] == [5, 6, 7, 8, 9, 10]
    assert [e.seq for e in tail] == list(range(base + 5, base + 11))
    assert store.get_job(job.id).step == 10
    everything = store.events_since(0)
    assert [e.id for e in everything] == sorted(e.id for e in everything)


def test_tail_reading_by_global_id_misses_nothing_under_concurrent_writers(store):
    """Events committed by concurrent transactions become visible in id order, so a reader that
    keeps only the last id it saw still sees every event exactly once."""
    writers = 4
    per_writer = 60 if store.postgres else 10  # SQLite's writers queue on one lock: slow, safe
    for i in range(writers):
        make(store, f"w{i}")
    held = [store.claim(f"w{i}", 30) for i in range(writers)]
    seen: list[tuple[str, int]] = []
    done = threading.Event()

    def tail():
        cursor = 0
        while True:
            finished = done.is_set()
            rows = store.events_since(cursor)
            if rows:
                cursor = rows[-1].id
                seen.extend((r.job_id, r.seq) for r in rows if r.kind == "step")
            elif finished:
                return

    def write(job):
        for i in range(per_writer):
            store.append_events(job.id, job.lease_owner, [NewEvent("step", {"step": i})], {})

    reader = threading.Thread(target=tail)
    reader.start()
    threads = [threading.Thread(target=write, args=(job,)) for job in held]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    reader.join()
    assert len(seen) == writers * per_writer == len(set(seen))


def test_appending_tells_the_worker_its_job_was_cancelled(store):
    """A cancel reaches the worker with its next window of events, not its next heartbeat."""
    make(store)
    job = store.claim("w", 30)
    assert not store.append_events(
        job.id, "w", [NewEvent("step", {"step": 1})], {}
    ).cancel_requested
    store.cancel(job.id)
    assert store.append_events(job.id, "w", [NewEvent("step", {"step": 2})], {}).cancel_requested
