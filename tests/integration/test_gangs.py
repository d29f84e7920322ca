"""One job across workers (runtime.machines), through the service: two worker processes of
one server stand in for two machines, their replicas talking over gRPC on loopback. The job
trains as one device does and streams every step once; a gang that loses its chief or a
member resumes from its checkpoint on a new gang; cancel and max_duration stop every rank and
free both workers; a gang waiting for workers says how many."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from stepstream.client import TrainingClient
from tests.integration.test_devices import logs_of, steps_of
from tests.integration.test_service import classes, wait_for_step

# The claims and reasons run on both engines in tests/unit/store/test_gangs.py.
pytestmark = [pytest.mark.slow, pytest.mark.parametrize("engine", ["sqlite"])]

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


def test_a_gang_cancelled_or_out_of_time_stops_whole_and_frees_its_workers(start_service):
    svc = start_service(workers=2, **ACROSS)
    with TrainingClient(svc.address) as c:
        job = c.submit(across(2, 100000, "cancelled"))
        wait_for_step(job, 50, timeout=180)
        job.cancel()
        cancelled = job.wait(timeout=120)
        # Each rank has a deadline of its own: the ranks agree to stop at the first.
        timed = c.submit(across(2, 100000, "timed", max_duration=8)).wait(timeout=180)
        # Both workers are free: two jobs run side by side after them.
        after = [c.submit(classes(20, f"after{i}")) for i in range(2)]
        done = [j.wait(timeout=120) for j in after]
    assert cancelled.state == "CANCELLED"
    assert timed.state == "FAILED" and timed.failure.reason == "max_duration_exceeded"
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
