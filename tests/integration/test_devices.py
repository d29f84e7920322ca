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
from pathlib import Path

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


# Jobs across workers (runtime.machines): two worker processes of one server stand in for two
# machines; their replicas talk over gRPC on loopback.
# Idle workers say they are alive every second: a killed one is soon passed over.
ACROSS = {"gang_host": "127.0.0.1", "gang_timeout_seconds": 15, "worker_seen_seconds": 1}
DATA = {
    "name": "synthetic_classification",
    "num_samples": 1216,
    "num_features": 10,
    "num_classes": 3,
    "noise": 3.0,
}


def across(machines: int, steps: int, name: str, **training) -> dict:
    return {
        "name": name,
        "model": {"architecture": "mlp", "hidden_units": [16]},
        "optimizer": {"name": "adam", "learning_rate": 0.01},
        "dataset": DATA,
        "metrics": ["accuracy"],
        "training": {"steps": steps, "batch_size": 32, "seed": 3, "shuffle": False, **training},
        "runtime": {"devices": machines, "machines": machines, "steps_per_execution": 10},
    }


def test_a_job_across_two_workers_trains_as_one_device_does(start_service):
    svc = start_service(workers=2, **ACROSS)
    with TrainingClient(svc.address) as c:
        alone = c.submit({**across(1, 150, "alone"), "runtime": {"steps_per_execution": 10}})
        one = alone.wait(timeout=180)
        job = c.submit(across(2, 150, "pair", eval_every=50, checkpoint_every=50))
        info = job.wait(timeout=240)
        events = list(job.stream())
    assert one.state == "SUCCEEDED", one.failure
    assert info.state == "SUCCEEDED", info.failure
    assert steps_of(events) == list(range(1, 151))  # every step once, from the chief
    assert any("on each of 2 workers" in m for m in logs_of(events))
    assert abs(info.test_metrics["accuracy"] - one.test_metrics["accuracy"]) <= 0.01
    evals = [e for e in events if e.kind == "eval"]
    assert [e.step for e in evals] == [50, 100, 150]


def worker_ids(svc) -> dict[str, int]:
    """Each worker process of the server by its worker id."""
    out = {}
    for pid in svc.worker_pids():
        args = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
        out[args[args.index("--worker-id") + 1]] = pid
    return out


@pytest.mark.parametrize("dies", ["member", "chief"])
def test_a_gang_that_loses_a_worker_resumes_from_its_checkpoint_on_a_new_gang(start_service, dies):
    svc = start_service(workers=2, lease_seconds=3, **ACROSS)
    with TrainingClient(svc.address) as c:
        job = c.submit(across(2, 1200, "survivor", checkpoint_every=100))
        wait_for_step(job, 250, timeout=180)
        chief = job.info().worker
        (pid,) = [p for w, p in worker_ids(svc).items() if (w == chief) == (dies == "chief")]
        os.kill(pid, signal.SIGKILL)  # its rank dies with it; the supervisor starts anew
        info = job.wait(timeout=400)
        events = list(job.stream())
    assert info.state == "SUCCEEDED", info.failure
    assert info.attempts == 2
    logs = logs_of(events)
    if dies == "member":  # the chief saw it go; a dead chief's lease runs out instead
        assert any("back to the queue to resume from its last checkpoint" in m for m in logs)
    resumed = [m for m in logs if m.startswith("resumed from checkpoint at step")]
    assert len(resumed) == 1 and int(resumed[0].rsplit(" ", 1)[1]) >= 200
    assert set(steps_of(events)) == set(range(1, 1201))


def test_a_gang_is_cancelled_whole_and_its_workers_are_free_again(start_service):
    svc = start_service(workers=2, **ACROSS)
    with TrainingClient(svc.address) as c:
        job = c.submit(across(2, 100000, "cancelled"))
        wait_for_step(job, 50, timeout=180)
        job.cancel()
        info = job.wait(timeout=120)
        # Both workers are free: two jobs run side by side after it.
        after = [c.submit(classes(20, f"after{i}")) for i in range(2)]
        done = [j.wait(timeout=120) for j in after]
    assert info.state == "CANCELLED"
    assert [d.state for d in done] == ["SUCCEEDED"] * 2
    assert {d.worker for d in done} == set(worker_ids(svc))


def test_a_gang_waiting_for_workers_says_how_many(start_service):
    svc = start_service(workers=1, **ACROSS)
    with TrainingClient(svc.address) as c:
        job = c.submit(across(2, 30, "waits"))
        svc.wait_for_workers(1)
        want = "waiting for 2 workers with 1 device each; 1 such registered"
        end = time.monotonic() + 60
        while job.info().pending_reason != want and time.monotonic() < end:
            time.sleep(0.1)  # the worker registers once TensorFlow is loaded
        info = job.info()
    assert info.state == "QUEUED" and info.pending_reason == want
