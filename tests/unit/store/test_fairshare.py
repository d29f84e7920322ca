"""store.fairshare and the claims that follow it: tenants by weight, gangs of devices claimed
whole, and what a queued job is told about its wait (store.pending)."""

from __future__ import annotations

import threading
from collections import Counter

from stepstream_service.store import NewJob
from stepstream_service.store.fairshare import EVEN, FairShare, Usage, Waiting
from stepstream_service.store.pending import pending

LIVE = 60.0


def submit(store, tenant="", devices=1, priority=0, needs="any", name="j"):
    job, _ = store.create_job(
        NewJob(name=name, tenant=tenant, devices=devices, priority=priority, needs=needs)
    )
    return job


def test_the_tenant_with_the_fewest_devices_per_weight_goes_first():
    waiting = [Waiting("a", 0, 1.0), Waiting("b", 0, 2.0), Waiting("c", 9, 3.0)]
    running = {"a": Usage(1, 4), "b": Usage(1, 1)}
    assert EVEN.order(waiting, running) == ["c", "b", "a"]
    assert FairShare({"a": 8}).order(waiting, running) == ["c", "a", "b"]  # 4/8 < 1/1
    # Nothing running anywhere: the first job's priority, then its age.
    assert EVEN.order(waiting, {}) == ["c", "a", "b"]
    assert FairShare(max_running=1).order(waiting, running) == ["c"]


def test_two_tenants_alternate_while_their_jobs_run(store):
    for _ in range(4):
        submit(store, "a")
    for _ in range(4):
        submit(store, "b")
    got = [store.claim(f"w{i}", 30).tenant for i in range(8)]
    assert got == ["a", "b"] * 4


def test_a_tenant_with_twice_the_weight_gets_twice_the_devices(store):
    for _ in range(9):
        submit(store, "a")
        submit(store, "b")
    share = FairShare({"a": 2})
    got = Counter(store.claim(f"w{i}", 30, share=share).tenant for i in range(9))
    assert got == {"a": 6, "b": 3}


def test_a_tenant_that_came_late_is_not_starved(store):
    for _ in range(10):
        submit(store, "busy")
    submit(store, "late")
    first, second = store.claim("w1", 30), store.claim("w2", 30)
    assert (first.tenant, second.tenant) == ("busy", "late")


def test_the_per_tenant_cap_holds_jobs_back_and_says_so(store):
    *_, third = [submit(store, "a") for _ in range(3)]
    share = FairShare(max_running=2)
    store.register_worker("w", "h", ["CPU:0"])
    assert store.claim("w1", 30, share=share) and store.claim("w2", 30, share=share)
    assert store.claim("w3", 30, share=share) is None  # a's third waits for one to end
    said = pending(store, third, share, LIVE)
    assert said.reason == "tenant quota: 2 of 2 running" and said.position == 1


def test_a_gang_is_claimed_whole_by_a_worker_that_holds_it(store):
    big = submit(store, devices=2, name="big")
    small = submit(store, name="small")
    # A one-device worker passes the 2-device job over (backfill)...
    assert store.claim("one", 30, devices=1).id == small.id
    assert store.claim("one-more", 30, devices=1) is None
    # ...and a worker holding 2 takes it, all of it, in one claim.
    got = store.claim("two", 30, devices=2)
    assert got.id == big.id and got.devices == 2


def test_a_stream_of_small_jobs_does_not_starve_a_big_one(store):
    big = submit(store, devices=2, name="big")
    for _ in range(5):
        submit(store, name="small")
    # The 2-device worker is free: it takes the big job, queued first, before any small one.
    assert store.claim("two", 30, devices=2).id == big.id


def test_two_gangs_and_three_devices_never_deadlock(store):
    """Workers of 2 and 1 devices (3 in all) and two 2-device jobs: one runs, the other waits
    holding nothing, and runs when the first ends: no job ever holds part of what it needs."""
    jobs = [submit(store, devices=2, name=f"g{i}") for i in range(2)]
    done: list[str] = []
    lock = threading.Lock()

    def work(worker, devices):
        while len(done) < 2:
            job = store.claim(worker, 30, devices=devices)
            if job is None:
                continue
            assert job.devices <= devices
            store.finish(job.id, worker, job.state.SUCCEEDED)
            with lock:
                done.append(job.id)

    threads = [threading.Thread(target=work, args=a) for a in (("two", 2), ("one", 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert sorted(done) == sorted(j.id for j in jobs)


def test_a_job_waiting_for_devices_is_told_the_numbers(store):
    store.register_worker("w1", "h", ["CPU:0", "CPU:1"])
    store.register_worker("w2", "h", ["CPU:0"])
    store.register_worker("w3", "h", ["CPU:0"])
    running = submit(store, devices=2, name="running")
    assert store.claim("w1", 30, devices=2).id == running.id
    big = submit(store, devices=2, name="big")
    said = pending(store, big, EVEN, LIVE)
    assert said.reason == "waiting for 2 devices, 2 free" and said.position == 1
    huge = submit(store, devices=4, name="huge")
    said = pending(store, huge, EVEN, LIVE)
    assert said.reason == "waiting for 4 devices on one worker; the largest worker holds 2"
    assert said.position == 2


def test_the_reasons_before_any_worker_can_run_it(store):
    job = submit(store, needs="gpu")
    assert pending(store, job, EVEN, LIVE).reason.startswith("no worker is running")
    store.register_worker("cpu", "h", ["CPU:0"])
    assert pending(store, job, EVEN, LIVE).reason == "no worker with a GPU has registered"
    store.register_worker("gpu", "h", ["CPU:0", "GPU:0"])
    assert pending(store, job, EVEN, LIVE).reason == "next to start"
    later = submit(store)
    later2 = submit(store)
    assert pending(store, later2, EVEN, LIVE).reason == "2 jobs ahead of it"
    assert pending(store, later, EVEN, LIVE).position == 2


def test_the_position_follows_fair_share(store):
    mine = [submit(store, "a") for _ in range(3)]
    theirs = submit(store, "b")
    store.register_worker("w", "h", ["CPU:0"])
    # b's only job goes second: a's first, then b's, then a's others.
    assert pending(store, theirs, EVEN, LIVE).position == 2
    assert pending(store, mine[2], EVEN, LIVE).position == 4
