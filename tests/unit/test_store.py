"""The store: idempotent creation, the queue order, transitions, leases, the event log."""

from __future__ import annotations

import threading
import time

import pytest

from stepstream_service.store import (
    AlreadyExists,
    JobFinished,
    JobNotFound,
    JobState,
    LeaseLost,
    NewEvent,
    NewJob,
    Store,
)
from tests.conftest import ENGINES


@pytest.fixture(params=ENGINES)
def store(request, database):
    s = Store(database(request.param))
    yield s
    s.close()


def make(store, name="j", priority=0, request_id=None, spec_hash="h", max_attempts=3):
    job, _ = store.create_job(
        NewJob(
            name=name,
            spec={"name": name},
            spec_hash=spec_hash,
            priority=priority,
            request_id=request_id,
            max_attempts=max_attempts,
        )
    )
    return job


def test_create_is_idempotent_per_request_id(store):
    first, created = store.create_job(NewJob(name="a", spec_hash="h1", request_id="r1"))
    again, created_again = store.create_job(NewJob(name="a", spec_hash="h1", request_id="r1"))
    assert created and not created_again and again.id == first.id
    with pytest.raises(AlreadyExists, match="different spec"):
        store.create_job(NewJob(name="a", spec_hash="h2", request_id="r1"))


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
    store.finish(job.id, "w1", JobState.SUCCEEDED)
    done = store.get_job(job.id)
    assert done.lease_owner is None and done.worker == "w1"  # who ran it outlives the lease


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
        store.create_job(NewJob(name=f"n{i}", labels={"team": "a" if i % 2 else "b"}))
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


def test_a_job_that_needs_a_gpu_is_claimed_only_by_a_gpu_worker(store):
    gpu_job, _ = store.create_job(NewJob(name="g", needs="gpu"))
    any_job = make(store, "a")
    assert store.claim("cpu-worker", 30, gpus=0).id == any_job.id
    assert store.claim("cpu-worker", 30, gpus=0) is None
    assert store.claim("gpu-worker", 30, gpus=1).id == gpu_job.id


def test_workers_advertise_devices_and_go_quiet(store):
    store.register_worker("w-gpu", "host-a", ["CPU:0", "GPU:0", "GPU:1"])
    store.register_worker("w-cpu", "host-b", ["CPU:0"])
    live = {w.id: w for w in store.live_workers(60)}
    assert live["w-gpu"].gpus == 2 and live["w-gpu"].devices[-1] == "GPU:1"
    assert live["w-cpu"].gpus == 0 and live["w-cpu"].host == "host-b"
    store.worker_seen("w-cpu", stopped=True)
    assert [w.id for w in store.live_workers(60)] == ["w-gpu"]
    make(store)
    job = store.claim("w-gpu", 30, gpus=2)
    assert store.busy_workers() == {"w-gpu"} and job.lease_owner == "w-gpu"


def test_a_rescue_racing_a_heartbeat_never_requeues_a_renewed_lease(store):
    make(store)
    job = store.claim("w", 0.05)
    time.sleep(0.1)
    store.heartbeat(job.id, "w", 30)  # renewed before the rescuer looked again
    assert store.rescue() == []
    assert store.get_job(job.id).state == JobState.RUNNING


def test_tenants_see_only_their_own_jobs(store):
    mine, _ = store.create_job(NewJob(name="a", tenant="team-a"))
    theirs, _ = store.create_job(NewJob(name="b", tenant="team-b"))
    assert store.get_job(mine.id, tenant="team-a").tenant == "team-a"
    with pytest.raises(JobNotFound, match=f"no job '{theirs.id}'"):
        store.get_job(theirs.id, tenant="team-a")
    with pytest.raises(JobNotFound):
        store.cancel(theirs.id, tenant="team-a")
    assert [j.id for j in store.list_jobs(tenant="team-a")] == [mine.id]
    assert {j.id for j in store.list_jobs()} == {mine.id, theirs.id}  # no tenant: all of them


def test_a_request_id_is_unique_within_a_tenant_only(store):
    a, _ = store.create_job(NewJob(name="a", request_id="r", tenant="x"))
    b, created = store.create_job(NewJob(name="b", spec_hash="other", request_id="r", tenant="y"))
    assert created and a.id != b.id  # tenant y learns nothing of tenant x's request
    again, created = store.create_job(NewJob(name="a", request_id="r", tenant="x"))
    assert not created and again.id == a.id


def test_a_tenant_may_queue_only_so_many_jobs(store):
    from stepstream_service.store import QueueFull

    for i in range(2):
        store.create_job(NewJob(name=f"q{i}", tenant="t"), max_queued=2)
    with pytest.raises(QueueFull, match="max_queued_per_tenant"):
        store.create_job(NewJob(name="q2", tenant="t"), max_queued=2)
    store.create_job(NewJob(name="o", tenant="other"), max_queued=2)
    store.claim("w", 30)  # one of t's starts: room for another
    store.create_job(NewJob(name="q3", tenant="t"), max_queued=2)


def test_pruning_deletes_old_finished_jobs_and_never_live_ones(store):
    old = [make(store, f"old{i}") for i in range(3)]
    for job in old:
        claimed = store.claim("w", 30)
        assert claimed.id == job.id
        store.finish(claimed.id, "w", JobState.SUCCEEDED)
    running = make(store, "running")
    store.claim("w", 30)
    queued = make(store, "queued")
    assert store.prune(keep_last=1) == sorted(j.id for j in old[:2])
    left = {j.id for j in store.list_jobs()}
    assert left == {old[2].id, running.id, queued.id}
    assert store.read_events(old[0].id) == []
    assert store.prune(finished_before=time.time() + 1) == [old[2].id]
    assert {j.id for j in store.list_jobs()} == {running.id, queued.id}
