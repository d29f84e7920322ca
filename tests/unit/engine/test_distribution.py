"""One job on several devices (runtime.devices): data-parallel over logical CPU devices, which
must be made before TensorFlow starts, so the jobs run in a process of their own
(tests/unit/engine/distributed_run.py). The 2-device job trains as the 1-device one does, streams
every step once with the global values, resumes on 2 devices and on 1, stops when asked, and a
job asking for more devices than the process holds fails saying so."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
DATA = {
    "name": "synthetic_classification",
    "num_samples": 1216,  # whole batches of 32; a test split of 243, split unevenly
    "num_features": 10,
    "num_classes": 3,
    "noise": 3.0,
}
UNEVEN = {**DATA, "num_samples": 1205}
STEPS = 150


def spec(devices: int, data: dict = DATA, **training) -> dict:
    return {
        "name": f"on{devices}",
        "model": {"architecture": "mlp", "hidden_units": [16]},
        "optimizer": {"name": "adam", "learning_rate": 0.01},
        "dataset": data,
        "metrics": ["accuracy"],
        "training": {"steps": STEPS, "batch_size": 32, "seed": 3, **training},
        "runtime": {"devices": devices},
    }


def run_plan(plan: dict) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "tests.unit.engine.distributed_run", json.dumps(plan)],
        cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    w = tmp_path_factory.mktemp("devices")
    # In order, in one process of two logical CPU devices sharing one model cache.
    jobs = {
        # Unshuffled: the two see the same batches in the same order.
        "one": {"spec": spec(1, shuffle=False)},
        "two": {"spec": spec(2, shuffle=False, eval_every=50, checkpoint_every=50)},
        "again": {"spec": spec(2, shuffle=False, eval_every=50, checkpoint_every=50)},
        "resumed_on_two": {
            "spec": spec(2, shuffle=False, eval_every=50, checkpoint_every=50),
            "copy_from": str(w / "two"),
            "resume": True,
        },
        "resumed_on_one": {
            "spec": spec(1, shuffle=False, checkpoint_every=50),
            "copy_from": str(w / "two"),
            "resume": True,
        },
        # Each epoch ends in a batch of 21, shared 11 and 10.
        "uneven_one": {"spec": spec(1, UNEVEN, shuffle=False)},
        "uneven_two": {"spec": spec(2, UNEVEN, shuffle=False)},
        "stopped": {
            "spec": {**spec(2), "runtime": {"devices": 2, "steps_per_execution": 10}},
            "stop_at": 30,
        },
        "too_many": {"spec": spec(4)},
    }
    for name, job in jobs.items():
        job["workdir"] = str(w / name)
    lines = run_plan({"split": 2, "cache": True, "jobs": list(jobs.values())})
    assert len(lines) == len(jobs)
    return dict(zip(jobs, lines, strict=True))


def test_two_devices_train_as_one_and_stream_every_global_step_once(results):
    one, two = results["one"], results["two"]
    assert two["outcome"] == "succeeded"
    assert two["steps"] == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in two["losses"])
    assert all(0.0 <= a <= 1.0 for a in two["accuracies"])
    # Global values: the whole batch's loss and accuracy, as the single device streams them
    # (a replica's own would be half the batch's; summed ones would pass 1).
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-3, abs=1e-4)
    assert two["accuracies"] == pytest.approx(one["accuracies"], abs=1e-6)
    assert abs(two["test"]["accuracy"] - one["test"]["accuracy"]) <= 0.01
    assert [e["accuracy"] for e in two["evals"]] and all(
        0.0 <= e["accuracy"] <= 1.0 for e in two["evals"]
    )
    assert two["checkpoints"] == [50, 100]
    said = "data-parallel on 2 devices (CPU:0, CPU:1): global batch 32, 16 per device"
    assert said in two["logs"]
    # Several steps per device call, as on one device (Keras's own loop for that fails under
    # tf.distribute; engine.distribution.train_function runs instead).
    (window,) = re.findall(r"(\d+) per device call", "\n".join(two["logs"]))
    assert int(window) > 1
    assert not any("data-parallel" in m for m in one["logs"])


def test_uneven_last_batches_stream_global_values_and_train_to_the_same_accuracy(results):
    one, two = results["uneven_one"], results["uneven_two"]
    assert two["steps"] == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in two["losses"])
    # Step 38 is the first uneven batch: up to there both train on the same numbers; its
    # accuracy is over all 21 examples, not the mean of the two shares' (11 and 10).
    assert two["losses"][:37] == pytest.approx(one["losses"][:37], rel=1e-3, abs=1e-4)
    assert two["accuracies"][37] == pytest.approx(one["accuracies"][37], abs=1e-6)
    assert all(0.0 <= a <= 1.0 for a in two["accuracies"])
    # Keras weighs the shares' losses equally, not by size: the steps after differ a little.
    assert abs(two["test"]["accuracy"] - one["test"]["accuracy"]) <= 0.01


def test_a_kept_two_device_model_is_reused_for_the_next_job_of_its_shape(results):
    again = results["again"]
    assert "traced program reused" in "\n".join(again["logs"])
    assert again["losses"] == pytest.approx(results["two"]["losses"], rel=1e-5, abs=1e-6)


def test_a_two_device_checkpoint_resumes_on_two_devices_and_on_one(results):
    two = results["two"]
    for name in ("resumed_on_two", "resumed_on_one"):
        resumed = results[name]
        assert resumed["outcome"] == "succeeded", name
        assert "resumed from checkpoint at step 100" in resumed["logs"], name
        assert resumed["steps"] == list(range(101, STEPS + 1)), name
        assert resumed["losses"] == pytest.approx(two["losses"][100:], rel=1e-3, abs=1e-4)


def test_a_stop_request_stops_a_two_device_job(results):
    stopped = results["stopped"]
    assert (stopped["outcome"], stopped["stop_reason"]) == ("cancelled", "cancelled")
    assert stopped["steps"] == list(range(1, 31))  # seen at the end of the window it falls in


def test_a_job_asking_for_more_devices_than_the_worker_holds_fails_saying_so(results):
    failed = results["too_many"]
    assert failed["reason"] == "not_enough_devices"
    assert failed["message"] == (
        "the job asks for 4 devices (runtime.devices); this worker has 2: CPU:0, CPU:1"
    )
