"""store.queue: the claim order, leases, rescue, and who may claim what."""

from __future__ import annotations

import threading
import time

import pytest

from stepstream_service.store import JobState, LeaseLost, NewEvent, NewJob
from tests.unit.store.conftest import make


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


def test_a_job_that_needs_a_gpu_is_claimed_only_by_a_gpu_worker(store):
    gpu_job, _ = store.create_job(NewJob(name="g", needs="gpu"))
    any_job = make(store, "a")
    assert store.claim("cpu-worker", 30, gpus=0).id == any_job.id
    assert store.claim("cpu-worker", 30, gpus=0) is None
    assert store.claim("gpu-worker", 30, gpus=1).id == gpu_job.id


def test_a_rescue_racing_a_heartbeat_never_requeues_a_renewed_lease(store):
    make(store)
    job = store.claim("w", 0.05)
    time.sleep(0.1)
    store.heartbeat(job.id, "w", 30)  # renewed before the rescuer looked again
    assert store.rescue() == []
    assert store.get_job(job.id).state == JobState.RUNNING
