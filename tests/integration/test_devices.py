"""One job on many devices, through the service: workers that split their CPU into logical
devices (TRAINER_CPU_DEVICES) stand in for multi-GPU machines. A job asking for N devices runs
only on a worker holding N; one that waits is told why; a replica killed mid-job is retried
from its checkpoint; two gangs on three devices never deadlock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from stepstream.client import TrainingClient
from tests.integration.conftest import WorkerHost
from tests.integration.test_service import classes, wait_for_step

# The claims and reasons run on both engines in tests/unit/store/test_fairshare.py; here the
# embedded store is enough to show the engine and the workers doing their part.
pytestmark = [pytest.mark.slow, pytest.mark.parametrize("engine", ["sqlite"])]


def on_devices(n: int, steps: int, name: str, **training) -> dict:
    spec = classes(steps, name, **training)
    spec["runtime"] = {"devices": n}
    spec["training"]["batch_size"] = 32
    return spec


def steps_of(events) -> list[int]:
    return [e.step for e in events if e.kind == "step"]


def logs_of(events) -> list[str]:
    return [e.message for e in events if e.kind == "log"]


def test_a_queued_job_says_where_it_stands_and_why(start_service):
    svc = start_service(workers=0)
    with TrainingClient(svc.address) as c:
        first, second = c.submit(classes(10, "first")), c.submit(classes(10, "second"))
        one, two = first.info(), second.info()
    assert (one.queue_position, two.queue_position) == (1, 2)
    assert one.pending_reason == "no worker is running; the job starts when one registers"


def test_a_two_device_job_runs_data_parallel_on_a_worker_of_two(start_service):
    svc = start_service(workers=1, cpu_devices=2)
    with TrainingClient(svc.address) as c:
        job = c.submit(on_devices(2, 60, "pair"))
        info = job.wait(timeout=180)
        events = list(job.stream())
    assert info.state == "SUCCEEDED", info.failure
    assert steps_of(events) == list(range(1, 61))  # every step once, global values
    assert all(0.0 <= e.accuracy <= 1.0 for e in events if e.kind == "step")
    assert any("data-parallel on 2 devices" in m for m in logs_of(events))


def test_a_job_waiting_for_devices_says_so_until_a_worker_that_holds_them_comes(
    start_service, tmp_path
):
    svc = start_service(workers=1)  # one device
    with TrainingClient(svc.address) as c:
        job = c.submit(on_devices(2, 30, "waits"))
        svc.wait_for_workers(1)
        info = job.info()
        end = time.monotonic() + 60
        # The worker registers once TensorFlow is loaded.
        while "no worker is running" in info.pending_reason and time.monotonic() < end:
            time.sleep(0.1)
            info = job.info()
        assert info.state == "QUEUED"
        assert info.queue_position == 1
        assert info.pending_reason == (
            "waiting for 2 devices on one worker; the largest worker holds 1"
        )
        shown = subprocess.run(
            [sys.executable, "-m", "stepstream.cli", "show", info.id, "-o", "table"],
            env={**os.environ, "TRAINER_ADDRESS": svc.address},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "#1 in the queue: waiting for 2 devices on one worker" in shown
        # A machine with two devices joins: the job runs there.
        host = WorkerHost(tmp_path, "pair", svc.store_url, cpu_devices=2)
        try:
            info = job.wait(timeout=180)
        finally:
            host.stop()
    assert info.state == "SUCCEEDED", info.failure
    assert info.worker.startswith(host.id_prefix)
    assert info.pending_reason == ""  # told only while queued


def test_a_killed_replica_retries_the_whole_job_from_its_checkpoint(start_service):
    svc = start_service(workers=1, cpu_devices=2, lease_seconds=2)
    with TrainingClient(svc.address) as c:
        job = c.submit(on_devices(2, 400, "survivor", checkpoint_every=50))
        wait_for_step(job, 120)
        (worker,) = svc.worker_pids()
        os.kill(worker, signal.SIGKILL)  # both replicas live in it: the whole gang dies
        info = job.wait(timeout=240)
        events = list(job.stream())
    assert info.state == "SUCCEEDED" and info.attempts == 2
    resumed = [m for m in logs_of(events) if m.startswith("resumed from checkpoint at step")]
    assert len(resumed) == 1 and int(resumed[0].rsplit(" ", 1)[1]) >= 100
    assert set(steps_of(events)) == set(range(1, 401))


def test_two_gangs_on_three_devices_both_finish(start_service, tmp_path):
    svc = start_service(workers=1, cpu_devices=2)
    host = WorkerHost(tmp_path, "single", svc.store_url)  # one more device, alone
    try:
        with TrainingClient(svc.address) as c:
            jobs = [c.submit(on_devices(2, 40, f"gang{i}")) for i in range(2)]
            small = c.submit(classes(20, "small"))
            infos = [j.wait(timeout=240) for j in [*jobs, small]]
    finally:
        host.stop()
    assert [i.state for i in infos] == ["SUCCEEDED"] * 3
    # The gangs ran on the two-device worker, one after the other; never on the single one.
    assert all(not i.worker.startswith(host.id_prefix) for i in infos[:2])
