"""Nothing is lost when a worker dies or the server restarts mid-job."""

from __future__ import annotations

import os
import signal

import pytest

from trainer_client.client import TrainingClient

from .test_service import classes, wait_for_step

pytestmark = pytest.mark.slow


def checkpointed(steps: int, name: str) -> dict:
    return classes(steps, name, checkpoint_every=100)


def succeeded_count(events) -> int:
    return sum(1 for e in events if e.kind == "state" and e.state == "SUCCEEDED")


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


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
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


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
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
