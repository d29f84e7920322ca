"""store.gangs and the claims that gather them: a job across workers (runtime.machines) is
claimed with its members in one transaction or not at all; a member claims nothing while its
gang runs; a gang at the head of the queue keeps idle workers from smaller jobs until it can
start; one that no set of workers can ever form blocks nobody; a queued gang says why it
waits."""

from __future__ import annotations

from stepstream_service.store import JobState, NewJob
from stepstream_service.store.fairshare import EVEN
from stepstream_service.store.pending import pending

LIVE = 60.0


def register(store, *names, gpus=0):
    for i, name in enumerate(names):
        devices = [f"GPU:{g}" for g in range(gpus)] if gpus else ["CPU:0"]
        store.register_worker(name, "host", devices, address=f"127.0.0.1:{7000 + i}")


def gang(store, machines=2, devices=None, name="gang", needs="any"):
    job, _ = store.create_job(
        NewJob(name=name, machines=machines, devices=devices or machines, needs=needs)
    )
    return job


def small(store, name="small"):
    job, _ = store.create_job(NewJob(name=name))
    return job


def claim(store, worker, gpus=0):
    return store.claim(worker, 30, gpus=gpus, devices=gpus or 1, live_within=LIVE)


def test_a_gang_is_claimed_with_its_members_in_one_go(store):
    register(store, "w1", "w2", "w3")
    job = gang(store, machines=3)
    got = claim(store, "w2")
    assert got.id == job.id and got.state == JobState.RUNNING
    assert got.gang == ["127.0.0.1:7001", "127.0.0.1:7000", "127.0.0.1:7002"]  # chief first
    parts = {w: store.gang_part(w) for w in ("w1", "w2", "w3")}
    assert parts["w2"] is None  # the chief holds the lease instead
    assert (parts["w1"].rank, parts["w3"].rank) == (1, 2)
    assert parts["w1"].addresses == got.gang and parts["w1"].attempt == 1
    assert store.busy_workers() == {"w1", "w2", "w3"}


def test_a_member_claims_nothing_while_its_gang_runs_and_is_free_after(store):
    register(store, "w1", "w2")
    job = gang(store)
    claim(store, "w1")
    small(store)
    assert claim(store, "w2") is None
    part = store.gang_part("w2")
    assert store.part_live(job.id, part.attempt)
    store.finish(job.id, "w1", JobState.SUCCEEDED)
    assert not store.part_live(job.id, part.attempt) and store.gang_part("w2") is None
    assert claim(store, "w2").name == "small"  # a finished gang holds nobody


def test_too_few_idle_workers_leave_the_gang_queued_and_hold_back_small_jobs(store):
    register(store, "w1", "w2", "w3")
    busy = small(store, "busy")
    assert claim(store, "w3").id == busy.id
    job = gang(store, machines=3)
    small(store, "later")
    # Three workers exist but one is busy: nothing is taken, and the idle ones wait for the
    # gang rather than start the later small job (which would starve it).
    assert claim(store, "w1") is None and claim(store, "w2") is None
    assert store.get_job(job.id).state == JobState.QUEUED
    assert store.gang_part("w1") is None and store.gang_part("w2") is None
    assert pending(store, store.get_job(job.id), EVEN, LIVE).reason == (
        "waiting for 3 workers with 1 device each, 2 idle"
    )
    store.finish(busy.id, "w3", JobState.SUCCEEDED)
    assert claim(store, "w1").id == job.id
    assert claim(store, "w3") is None  # a member now
    assert claim(store, "w2") is None


def test_a_gang_no_workers_can_form_blocks_nobody_and_says_why(store):
    register(store, "w1", "w2")
    job = gang(store, machines=3)
    later = small(store, "later")
    assert claim(store, "w1").id == later.id
    assert pending(store, store.get_job(job.id), EVEN, LIVE).reason == (
        "waiting for 3 workers with 1 device each; 2 such registered"
    )


def test_a_gang_of_two_gpus_each_needs_workers_of_two_gpus(store):
    register(store, "cpu1", "cpu2")
    job = gang(store, machines=2, devices=4)
    assert claim(store, "cpu1") is None
    register(store, "g1", "g2", gpus=2)
    assert claim(store, "g1", gpus=2).id == job.id
    assert store.gang_part("g2").rank == 1
    assert store.gang_part("cpu1") is None and store.gang_part("cpu2") is None


def test_a_worker_without_an_address_joins_no_gang(store):
    store.register_worker("old", "host", ["CPU:0"])  # no address: an older worker
    register(store, "w1")
    job = gang(store)
    assert claim(store, "w1") is None and claim(store, "old") is None
    assert store.get_job(job.id).state == JobState.QUEUED


def test_a_requeued_gang_is_gathered_again_and_the_old_part_is_over(store):
    register(store, "w1", "w2")
    job = gang(store)
    claim(store, "w1")
    first = store.gang_part("w2")
    store.finish(job.id, "w1", JobState.QUEUED)  # a replica was lost: the job goes back
    assert not store.part_live(job.id, first.attempt)
    again = claim(store, "w2")  # any of them may lead the next attempt
    assert again.id == job.id and again.attempts == 2
    second = store.gang_part("w1")
    assert (second.rank, second.attempt) == (1, 2)
    assert store.gang_intact(job.id, 2, 1, LIVE)
    register(store, "w1")  # its worker started anew: the part it held is given up
    assert not store.gang_intact(job.id, 2, 1, LIVE) and store.gang_part("w1") is None
