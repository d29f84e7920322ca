"""store.jobs: idempotent creation, ids, transitions, cancel, lists, tenants, pruning."""

from __future__ import annotations

import time

import pytest

from stepstream_service.store import (
    AlreadyExists,
    JobFinished,
    JobNotFound,
    JobState,
    NewJob,
    Store,
)
from tests.unit.store.conftest import make


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
