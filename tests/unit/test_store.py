"""The store: idempotent creation, the queue order, transitions, leases, the event log."""

from __future__ import annotations

import threading
import time

import pytest

from trainer_service.store import (
    AlreadyExists,
    JobFinished,
    JobNotFound,
    JobState,
    LeaseLost,
    NewEvent,
    Store,
)


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    yield s
    s.close()


def make(store, name="j", priority=0, request_id=None, spec_hash="h", max_attempts=3):
    job, _ = store.create_job(
        name=name,
        spec={"name": name},
        spec_hash=spec_hash,
        labels={},
        priority=priority,
        request_id=request_id,
        max_attempts=max_attempts,
    )
    return job


def test_create_is_idempotent_per_request_id(store):
    first, created = store.create_job(name="a", spec={}, spec_hash="h1", labels={}, request_id="r1")
    again, created_again = store.create_job(
        name="a", spec={}, spec_hash="h1", labels={}, request_id="r1"
    )
    assert created and not created_again and again.id == first.id
    with pytest.raises(AlreadyExists, match="different spec"):
        store.create_job(name="a", spec={}, spec_hash="h2", labels={}, request_id="r1")


def test_ids_are_prefixed_and_unknown_ids_are_not_found(store):
    assert make(store).id.startswith("job-")
    with pytest.raises(JobNotFound):
        store.get_job("job-nope")


def test_claim_takes_higher_priority_first_then_fifo(store):
    low = make(store, "low", priority=0)
    high1 = make(store, "high1", priority=5)
    high2 = make(store, "high2", priority=5)
    order = [store.claim("w", 30).id for _ in range(3)]
    assert order == [high1.id, high2.id, low.id]
    assert store.claim("w", 30) is None


def test_claim_stamps_and_leases(store):
    make(store)
    job = store.claim("w1", 30)
    assert job.state == JobState.RUNNING and job.lease_owner == "w1" and job.attempts == 1
    assert job.started_at is not None and job.lease_expires_at > time.time()


def test_two_claimers_never_get_the_same_job(store):
    for i in range(30):
        make(store, f"j{i}")
    got: list[str] = []

    def claimer(name):
        while (job := store.claim(name, 30)) is not None:
            got.append(job.id)

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 30 == len(set(got))


def test_terminal_states_are_final(store):
    make(store)
    job = store.claim("w", 30)
    store.finish(job.id, "w", JobState.SUCCEEDED)
    done = store.get_job(job.id)
    assert done.state == JobState.SUCCEEDED and done.finished_at is not None
    with store.engine.begin() as conn, pytest.raises(JobFinished):
        store.transition(conn, done, JobState.QUEUED)
    with pytest.raises(JobFinished):
        store.cancel(job.id)


def test_cancel_queued_and_running(store):
    queued = make(store, "q")
    assert store.cancel(queued.id).state == JobState.CANCELLED
    make(store, "r")
    running = store.claim("w", 30)
    assert store.cancel(running.id).state == JobState.CANCELLING
    assert store.heartbeat(running.id, "w", 30) is True
    store.finish(running.id, "w", JobState.CANCELLED)
    assert store.get_job(running.id).state == JobState.CANCELLED


def test_expired_lease_is_retried_then_failed(store):
    make(store, max_attempts=2)
    job = store.claim("w1", 0.01)
    assert store.rescue(time.time() + 1) == [(job.id, JobState.QUEUED)]
    again = store.claim("w2", 0.01)
    assert again.id == job.id and again.attempts == 2
    assert store.rescue(time.time() + 1) == [(job.id, JobState.FAILED)]
    failed = store.get_job(job.id)
    assert failed.error_reason == "worker_lost" and "attempts used up" in failed.error_message


def test_a_worker_that_lost_its_lease_cannot_write(store):
    make(store)
    job = store.claim("old", 0.01)
    store.rescue(time.time() + 1)
    store.claim("new", 30)
    with pytest.raises(LeaseLost):
        store.append_events(job.id, "old", [NewEvent("log", {"message": "late"})], {})
    with pytest.raises(LeaseLost):
        store.heartbeat(job.id, "old", 30)
    with pytest.raises(LeaseLost):
        store.finish(job.id, "old", JobState.SUCCEEDED)


def test_event_log_is_ordered_and_resumable(store):
    make(store)
    job = store.claim("w", 30)
    base = store.get_job(job.id).last_seq  # QUEUED and RUNNING state events
    assert [e.payload["state"] for e in store.read_events(job.id)] == ["QUEUED", "RUNNING"]
    last = store.append_events(
        job.id,
        "w",
        [NewEvent("step", {"step": i}) for i in range(1, 11)],
        {"step": 10, "loss": 0.5},
    )
    assert last == base + 10
    tail = store.read_events(job.id, after_seq=base + 4)
    assert [e.payload["step"] for e in tail] == [5, 6, 7, 8, 9, 10]
    assert [e.seq for e in tail] == list(range(base + 5, base + 11))
    assert store.get_job(job.id).step == 10
    everything = store.events_since(0)
    assert [e.id for e in everything] == sorted(e.id for e in everything)


def test_list_filters_and_pages(store):
    for i in range(5):
        store.create_job(
            name=f"n{i}", spec={}, spec_hash="h", labels={"team": "a" if i % 2 else "b"}
        )
    page1 = store.list_jobs(limit=2)
    page2 = store.list_jobs(limit=2, after=(page1[-1].created_at, page1[-1].id))
    assert len(page1) == 2 and len(page2) == 2 and not {j.id for j in page1} & {j.id for j in page2}
    assert {j.name for j in store.list_jobs(labels={"team": "a"})} == {"n1", "n3"}
    assert [j.name for j in store.list_jobs(name="n4")] == ["n4"]
    assert len(store.list_jobs(states=[JobState.QUEUED])) == 5
    assert store.queue_depth()["QUEUED"] == 5


def test_everything_survives_reopening(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    first = Store(url)
    job = make(first)
    first.close()
    again = Store(url)
    assert again.get_job(job.id).state == JobState.QUEUED
    assert again.claim("w", 30).id == job.id
    again.close()
