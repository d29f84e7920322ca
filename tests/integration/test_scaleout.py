"""Scale-out on the real PostgreSQL: many workers, workers on other machines, several API
replicas, shared artifacts on S3 (moto), and the database itself restarting mid-run."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from stepstream.client import TrainingClient
from tests.conftest import BUCKET
from tests.integration.conftest import WorkerHost

from .test_service import classes, wait_for_step

pytestmark = pytest.mark.slow


@pytest.fixture
def hosts(tmp_path):
    started: list[WorkerHost] = []

    def start(name: str, store: str, **kwargs) -> WorkerHost:
        host = WorkerHost(tmp_path, name, store, **kwargs)
        started.append(host)
        return host

    yield start
    for host in started:
        host.stop()


@pytest.fixture
def engine():
    """Scale-out is PostgreSQL's: every service here runs on it."""
    return "postgresql"


@pytest.fixture
def pg(database):
    return database("postgresql")


def tiny(name: str) -> dict:
    return classes(30, name)


def test_three_workers_run_thirty_jobs_each_exactly_once(start_service, pg):
    svc = start_service(workers=3, store=pg, lease_seconds=10)
    svc.wait_for_workers(3)
    with TrainingClient(svc.address) as c:
        jobs = [c.submit(tiny(f"many-{i}")) for i in range(30)]
        infos = [job.wait(timeout=300) for job in jobs]
        histories = [list(job.stream()) for job in jobs]
    assert [i.state for i in infos] == ["SUCCEEDED"] * 30
    assert [i.attempts for i in infos] == [1] * 30
    for events in histories:
        states = [e.state for e in events if e.kind == "state"]
        assert states == ["QUEUED", "RUNNING", "SUCCEEDED"]
        assert [e.step for e in events if e.kind == "step"] == list(range(1, 31))
    # The pool shared the work: more than one worker ran jobs.
    assert len({i.worker for i in infos}) > 1


def test_a_dead_machines_job_resumes_from_its_checkpoint_on_another(
    start_service, hosts, pg, s3, tmp_path
):
    """Machine A dies mid-job; after its lease expires, machine B resumes the job from the
    checkpoint A wrote to the shared S3 artifact store (B's own disk never had it)."""
    artifacts = f"s3://{BUCKET}/scaleout-{os.getpid()}-{time.monotonic_ns()}"
    shared = {"artifacts": artifacts, "artifact_options": json.dumps(s3), "lease_seconds": 2}
    api = start_service(workers=0, store=pg, **shared)
    with TrainingClient(api.address) as c:
        a = hosts("machine-a", pg, **shared)
        job = c.submit(classes(3000, "travels", checkpoint_every=100))
        wait_for_step(job, 350, timeout=120)
        assert job.info().worker.startswith(a.id_prefix)
        a.kill()
        b = hosts("machine-b", pg, **shared)
        info = job.wait(timeout=180)
        events = list(job.stream())
        downloaded = job.download_model(tmp_path / "model.keras")
    assert info.state == "SUCCEEDED" and info.attempts == 2
    assert info.worker.startswith(b.id_prefix)
    resumed = [e.message for e in events if e.kind == "log" and "resumed from" in e.message]
    assert len(resumed) == 1 and int(resumed[0].rsplit(" ", 1)[1]) >= 300
    assert not (a.data_dir / "jobs" / job.id / "model.keras").exists()
    assert (b.data_dir / "jobs" / job.id / "checkpoints" / "latest.json").exists()
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert {e.step for e in events if e.kind == "step"} == set(range(1, 3001))
    assert Path(downloaded).stat().st_size > 0


def test_a_watcher_on_one_replica_sees_every_step_of_a_job_submitted_to_another(
    start_service, hosts, pg, tmp_path
):
    replica_a = start_service(tmp_path / "a", workers=0, store=pg)
    replica_b = start_service(tmp_path / "b", workers=0, store=pg)
    hosts("worker", pg, artifacts=tmp_path / "shared")
    with TrainingClient(replica_a.address) as a, TrainingClient(replica_b.address) as b:
        submitted = a.submit(classes(400, "crosses"))
        watched = b.job(submitted.name)
        events = list(watched.stream())
        listed = [j.name for j in b.jobs()]
    assert submitted.name in listed
    assert [e.step for e in events if e.kind == "step"] == list(range(1, 401))
    assert [e.state for e in events if e.kind == "state"][-1] == "SUCCEEDED"
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


def test_a_gpu_job_waits_for_a_gpu_worker_and_the_pool_is_listed(start_service, pg):
    svc = start_service(workers=1, store=pg)
    svc.wait_for_workers(1)
    with TrainingClient(svc.address) as c:
        gpu_job = c.submit({**classes(10, "wants-gpu"), "runtime": {"device": "gpu"}})
        cpu_job = c.submit(classes(10, "any-device"))
        assert cpu_job.wait(timeout=120).state == "SUCCEEDED"
        time.sleep(1.0)
        assert gpu_job.info().state == "QUEUED"  # never handed to the CPU-only worker
        gpu_job.cancel()
    out = re.findall(r"trainer_workers\{status=\"(\w+)\"\} (\S+)", _scrape(svc.metrics_url))
    assert sum(float(v) for _, v in out) == 1.0


def _scrape(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def test_notifications_wake_idle_workers_and_the_event_tail(start_service, pg):
    """With the safety-net poll at two minutes, only NOTIFY can make this job start, stream and
    finish within a minute."""
    svc = start_service(workers=1, store=pg, notify_poll_seconds=120)
    end = time.monotonic() + 60
    while 'trainer_workers{status="idle"} 1.0' not in _scrape(svc.metrics_url):
        assert time.monotonic() < end, "the worker never registered"
        time.sleep(0.2)
    time.sleep(1.0)  # it has looked at the empty queue and now waits
    with TrainingClient(svc.address) as c:
        started = time.monotonic()
        job = c.submit(classes(50, "woken"))
        events = list(job.stream())  # ends only when the tail delivers the terminal event
        took = time.monotonic() - started
        info = job.info()
    assert info.state == "SUCCEEDED" and took < 60, took
    assert [e.step for e in events if e.kind == "step"] == list(range(1, 51))
