"""Processes fail: workers and servers are killed or stopped mid-job, jobs outlive their
lease, diverge or run out of memory, cancels race completions, a watcher reads slowly. Nothing
is lost, and no job runs to completion twice."""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest

from stepstream.client import TrainingClient
from tests.conftest import DIVERGING, ENGINES
from tests.integration.test_service import classes, wait_for_step

from .conftest import assert_intact

pytestmark = pytest.mark.slow

# A polite stop on the embedded store, a hard kill on the shared one.
RESTARTS = [(signal.SIGTERM, "sqlite"), (signal.SIGKILL, "postgresql")]


def checkpointed(steps: int, name: str) -> dict:
    return classes(steps, name, checkpoint_every=100)


def succeeded_count(events) -> int:
    return sum(1 for e in events if e.kind == "state" and e.state == "SUCCEEDED")


@pytest.mark.parametrize("engine", ENGINES)
def test_killed_worker_job_is_retried_from_its_checkpoint(start_service):
    svc = start_service(workers=1, lease_seconds=2)
    with TrainingClient(svc.address) as c:
        job = c.submit(checkpointed(3000, "survivor"))
        wait_for_step(job, 350)
        (worker,) = svc.worker_pids()
        os.kill(worker, signal.SIGKILL)
        info = job.wait(timeout=120)
        events = list(job.stream())
    assert info.state == "SUCCEEDED" and info.attempts == 2
    assert succeeded_count(events) == 1
    states = [e.state for e in events if e.kind == "state"]
    assert states == ["QUEUED", "RUNNING", "QUEUED", "RUNNING", "SUCCEEDED"]
    logs = [e.message for e in events if e.kind == "log"]
    resumed = [m for m in logs if m.startswith("resumed from checkpoint at step")]
    assert len(resumed) == 1 and int(resumed[0].rsplit(" ", 1)[1]) >= 300
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    # Every step up to the end was streamed; the steps after the checkpoint twice.
    steps = {e.step for e in events if e.kind == "step"}
    assert steps == set(range(1, 3001))


def test_a_job_whose_attempts_are_used_up_fails_with_the_reason(start_service):
    svc = start_service(workers=1, lease_seconds=2)
    with TrainingClient(svc.address) as c:
        job = c.submit(checkpointed(100000, "doomed"), max_attempts=1)
        wait_for_step(job, 10)
        os.kill(svc.worker_pids()[0], signal.SIGKILL)
        info = job.wait(timeout=60)
    assert info.state == "FAILED" and info.failure.reason == "worker_lost"
    assert "attempts used up" in info.failure.message


@pytest.mark.parametrize(("how", "engine"), RESTARTS)
def test_a_server_restart_mid_job_loses_nothing(start_service, tmp_path, how):
    data = tmp_path / "restart"
    first = start_service(data, workers=1, lease_seconds=2)
    with TrainingClient(first.address) as c:
        job = c.submit(checkpointed(2500, "restarted"))
        waiting = c.submit(classes(20, "queued-behind"))  # one worker: this one stays queued
        seen = []
        for event in job.stream():
            seen.append(event)
            if event.kind == "step" and event.step >= 300:
                break
    first.stop(how)
    second = start_service(data, workers=1, lease_seconds=2)
    with TrainingClient(second.address) as c:
        job = c.job(job.name)
        rest = list(job.stream(after_seq=seen[-1].seq))
        info = job.info()
        everything = list(job.stream())
        assert c.job(waiting.name).wait(timeout=60).state == "SUCCEEDED"
    assert info.state == "SUCCEEDED" and succeeded_count(everything) == 1
    assert [e.seq for e in seen + rest] == [e.seq for e in everything]
    assert [e.seq for e in everything] == list(range(1, len(everything) + 1))
    assert {e.step for e in everything if e.kind == "step"} == set(range(1, 2501))


@pytest.mark.parametrize(("how", "engine"), RESTARTS)
def test_a_stream_resumes_by_itself_across_a_server_restart(start_service, tmp_path, how):
    data = tmp_path / "same-port"
    first = start_service(data, workers=1, lease_seconds=2)
    with TrainingClient(first.address) as c:
        job = c.submit(checkpointed(2000, "streamed"))
        events = []
        stream = job.stream()
        for event in stream:  # the same iterator, on through the restart
            events.append(event)
            if event.kind == "step" and event.step == 200:
                first.stop(how)
                start_service(data, workers=1, lease_seconds=2, port=first.port)
    assert events[-1].kind == "state" and events[-1].state == "SUCCEEDED"
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert {e.step for e in events if e.kind == "step"} == set(range(1, 2001))


@pytest.mark.parametrize("engine", ["postgresql"])
def test_a_device_call_longer_than_the_lease_is_not_redelivered(start_service):
    svc = start_service(workers=1, lease_seconds=1.5)
    spec = classes(5000, "long-window")
    spec["runtime"] = {"steps_per_execution": 5000}  # one device call, far past the lease
    with TrainingClient(svc.address) as c:
        job = c.submit(spec)
        info = job.wait(timeout=120)
        events = list(job.stream())
    assert info.state == "SUCCEEDED" and info.attempts == 1
    assert [e.state for e in events if e.kind == "state"] == ["QUEUED", "RUNNING", "SUCCEEDED"]


def test_a_sigtermed_worker_checkpoints_and_hands_its_job_back(start_service):
    """SIGTERM is a polite stop: the worker checkpoints where it is, gives the job back to the
    queue and exits; its restarted successor resumes from exactly that step."""
    svc = start_service(workers=1, lease_seconds=5)
    with TrainingClient(svc.address) as c:
        job = c.submit(classes(3000, "handed-back", checkpoint_every=100000))
        wait_for_step(job, 300)
        (worker,) = svc.worker_pids()
        os.kill(worker, signal.SIGTERM)
        info = job.wait(timeout=120)
        events = list(job.stream())
    states = assert_intact(events, steps=3000, final="SUCCEEDED")
    assert states == ["QUEUED", "RUNNING", "QUEUED", "RUNNING", "SUCCEEDED"]
    saved = [e.step for e in events if e.kind == "checkpoint"]
    resumed = [e.message for e in events if e.kind == "log" and "resumed from" in e.message]
    # No periodic checkpoints were asked for: the one there is was written at the hand-back.
    assert len(saved) == 1 and resumed == [f"resumed from checkpoint at step {saved[0]}"]
    assert info.attempts == 2 and saved[0] >= 300


@pytest.mark.parametrize("engine", ["postgresql"])
def test_a_server_sigterm_leaves_no_job_running(start_service, tmp_path):
    """Draining: a running job is checkpointed and back in the queue when the server exits."""
    data = tmp_path / "drained"
    first = start_service(data, workers=1, lease_seconds=30)
    with TrainingClient(first.address) as c:
        job = c.submit(classes(4000, "drained", checkpoint_every=100000))
        wait_for_step(job, 200)
    first.stop(signal.SIGTERM)
    # Lease 30 s: had the job been left RUNNING, nothing could take it for half a minute.
    second = start_service(data, workers=0)
    with TrainingClient(second.address) as c:
        assert c.job(job.name).info().state == "QUEUED"
    second.stop()
    third = start_service(data, workers=1, lease_seconds=30)
    with TrainingClient(third.address) as c:
        info = c.job(job.name).wait(timeout=120)
        events = list(c.job(job.name).stream())
    assert_intact(events, steps=4000, final="SUCCEEDED")
    assert info.attempts == 2


@pytest.mark.parametrize("engine", ENGINES)
def test_a_cancel_racing_completion_ends_in_exactly_one_state(start_service):
    svc = start_service(workers=2)
    outcomes = []
    with TrainingClient(svc.address) as c:
        for delay in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.5, 2.0):
            job = c.submit(classes(300, f"race-{delay}"))
            time.sleep(delay)
            try:
                job.cancel()
                answered = "cancel accepted"
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc
                answered = "already finished"
            info = job.wait(timeout=60)
            final = info.state
            events = list(job.stream())
            assert_intact(events, final=final)
            if answered == "already finished":
                assert final == "SUCCEEDED"
            else:
                assert final in ("CANCELLED", "SUCCEEDED")  # a cancel may arrive at the end
            outcomes.append(final)
    assert "CANCELLED" in outcomes  # the race was really run on both sides


def test_a_diverging_job_fails_with_its_step_and_the_worker_goes_on(start_service):
    svc = start_service(workers=1)
    with TrainingClient(svc.address) as c:
        nan = c.submit(DIVERGING)
        info = nan.wait(timeout=60)
        after = c.submit(classes(20, "after-nan")).wait(timeout=60)
        events = list(nan.stream())
    assert info.state == "FAILED" and info.failure.reason == "non_finite_loss"
    assert f"step {info.failure.step}" in info.failure.message
    assert_intact(events, final="FAILED")
    assert after.state == "SUCCEEDED"


def test_an_out_of_memory_job_fails_clearly_and_the_worker_survives(start_service):
    svc = start_service(workers=1)
    pids = svc.wait_for_workers(1)
    huge = {
        "name": "too-big",
        # A batch of 500,000 through 16,384 hidden units: activations of about 90 GiB.
        "model": {"architecture": "mlp", "hidden_units": [16384]},
        "dataset": {"name": "synthetic_classification", "num_samples": 500000, "num_features": 8},
        "training": {"steps": 1, "batch_size": 500000},
    }
    with TrainingClient(svc.address) as c:
        # Sized from its spec, it is refused at submit: no worker could hold it (or, before
        # the worker has registered, it is over max_job_bytes). tests/faults/test_memory.py
        # has a worker refuse one that got past submit.
        with pytest.raises(grpc.RpcError) as caught:
            c.submit(huge)
        after = c.submit(classes(20, "after-oom")).wait(timeout=60)
        assert [j.name for j in c.jobs()] == [after.name]  # the refused job was never queued
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "smaller batch" in caught.value.details() and "GiB" in caught.value.details()
    assert after.state == "SUCCEEDED"
    assert svc.worker_pids() == pids  # the same process: it was not killed or restarted


def test_a_slow_watcher_keeps_server_memory_bounded_and_still_gets_everything(start_service):
    """One event a second against a fast job: the server keeps no backlog for the watcher
    (the tail drops its buffer; the watcher re-reads the store), so memory stays flat."""
    svc = start_service(workers=1)
    svc.wait_for_workers(1)
    with TrainingClient(svc.address) as c:
        c.submit(classes(20, "warm-up")).wait(timeout=60)
        before = rss_mb(svc.proc.pid)
        job = c.submit(classes(15000, "fast"))
        stream = job.stream()
        slow = []
        for event in stream:
            slow.append(event)
            if len(slow) == 8:
                break
            time.sleep(1.0)
        job.wait(timeout=180)
        during = rss_mb(svc.proc.pid)
        slow.extend(stream)  # now drain the rest at full speed
    assert_intact(slow, steps=15000, final="SUCCEEDED")
    assert during - before < 100, f"server RSS grew {before:.0f} -> {during:.0f} MB"


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize(
    "quota", [{"worker_max_jobs": 2}, {"worker_max_growth_mib": 1}], ids=["jobs", "memory"]
)
def test_a_worker_is_replaced_after_its_quota_of_jobs_and_nothing_is_lost(start_service, quota):
    """Each job leaves a little memory in the framework; a worker retires after
    worker_max_jobs, or once its memory has grown by worker_max_growth_mib (here: after its
    first job, which alone loads tens of MiB), and a fresh process carries on with the queue."""
    svc = start_service(workers=1, **quota)
    (first,) = svc.wait_for_workers(1)
    with TrainingClient(svc.address) as c:
        jobs = [c.submit(classes(20, f"quota-{i}")) for i in range(3)]
        infos = [job.wait(timeout=120) for job in jobs]
        histories = [list(job.stream()) for job in jobs]
    assert [i.state for i in infos] == ["SUCCEEDED"] * 3
    for events in histories:
        assert_intact(events, steps=20, final="SUCCEEDED")
    assert first not in svc.worker_pids()  # the slot's process was replaced


@pytest.mark.parametrize("engine", ["postgresql"])
def test_a_submit_that_timed_out_is_retried_into_the_same_job(start_service):
    svc = start_service(workers=0)
    with TrainingClient(svc.address, timeout=0.000001) as hasty:
        with pytest.raises(grpc.RpcError) as err:
            hasty.submit(classes(20, "hasty"), request_id="same-one")
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with TrainingClient(svc.address) as c:
        job = c.submit(classes(20, "hasty"), request_id="same-one")
        listed = [j.name for j in c.jobs()]
        job.cancel()
    assert listed.count(job.name) == 1 and len(listed) <= 1
