"""The command line against a real server: Ctrl-C detaches from a followed job and says how to
re-attach, jobs are named by id prefix or display name, -o json|yaml|table, and the server's
field violations are listed. SQLite only: the store is not what these tests are about."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from stepstream.client import TrainingClient
from stepstream.kernel.states import JobState

from .conftest import ServiceProcess, service_env
from .test_service import classes


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    svc = ServiceProcess(folder / "data", workers=1, store=f"sqlite:///{folder / 'jobs.db'}")
    yield svc
    svc.stop()


def trainer(*args: str, address: str) -> list[str]:
    return [sys.executable, "-m", "stepstream.cli", *args, "--address", address]


def run(*args: str, address: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        trainer(*args, address=address),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=service_env(),
    )


def wait_for(predicate, timeout: float = 120, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


def interrupt(proc: subprocess.Popen) -> tuple[str, str]:
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    return out, err


HINT = re.compile(r"trainer watch (job-[0-9a-f]+) --after-seq (\d+) --address (\S+)")


def test_ctrl_c_detaches_and_the_printed_command_reattaches(server, tmp_path):
    spec = tmp_path / "detach.json"
    spec.write_text(json.dumps(classes(5_000_000, "detach-me")))
    address = server.address
    follow = subprocess.Popen(
        trainer("submit", str(spec), "--follow", address=address),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=service_env(),
    )
    job_id = follow.stdout.readline().strip().removeprefix("jobs/")
    with TrainingClient(address) as client:
        job = client.job(job_id)
        wait_for(lambda: job.info().step > 0, what="the first step")
        out, err = interrupt(follow)
        assert follow.returncode == 130, err
        assert "Traceback" not in err and out == ""
        assert f"detached from {job_id} (it keeps running)" in err
        found = HINT.search(err)
        assert found and found.group(1) == job_id and found.group(3) == address, err
        assert int(found.group(2)) > 0
        assert job.info().state == "RUNNING"

        # by its display name this time; Ctrl-C again
        watch = subprocess.Popen(
            trainer("watch", "detach-me", address=address),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=service_env(),
        )
        assert watch.stderr.readline().strip() == f"{job_id}: QUEUED"  # replayed from seq 0
        _, err = interrupt(watch)
        assert watch.returncode == 130 and "Traceback" not in err, err
        found = HINT.search(err)
        assert found and found.group(1) == job_id, err
        seq = int(found.group(2))

        job.cancel()
        wait_for(lambda: job.info().terminal, what="the cancel")
    again = run("watch", job_id, "--after-seq", str(seq), address=address)
    assert again.returncode == 3, again.stderr
    assert f"{job_id}: CANCELLED" in again.stderr and "QUEUED" not in again.stderr


def test_names_prefixes_and_output_formats(server, tmp_path):
    address = server.address
    with TrainingClient(address) as client:
        job = client.submit(classes(20, "fmt-quick"))
        job.wait(timeout=120)
    prefix = job.id.removeprefix("job-")[:10]

    listed = run("jobs", "-o", "json", address=address)
    assert listed.returncode == 0, listed.stderr
    (record,) = [r for r in json.loads(listed.stdout) if r["id"] == job.id]
    assert record["state"] == "SUCCEEDED" and record["display_name"] == "fmt-quick"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["end_time"])
    assert record["accuracy"] is not None and record["mae"] is None
    as_yaml = run("jobs", "-o", "yaml", address=address)
    assert job.id in [r["id"] for r in yaml.safe_load(as_yaml.stdout)]
    table = run("jobs", address=address)
    assert table.stdout.splitlines()[0].split()[:3] == ["ID", "NAME", "STATE"]
    assert re.search(rf"{job.id}\s+fmt-quick\s+SUCCEEDED\s+20/20", table.stdout)

    by_prefix = run("show", prefix, "-o", "table", address=address)
    assert by_prefix.returncode == 0, by_prefix.stderr
    assert f"Job:      {job.id}" in by_prefix.stdout and "State:    SUCCEEDED" in by_prefix.stdout
    by_name = run("show", "fmt-quick", "-o", "yaml", address=address)
    assert yaml.safe_load(by_name.stdout)["id"] == job.id
    assert json.loads(run("show", f"job-{prefix}", address=address).stdout)["id"] == job.id

    with TrainingClient(address) as client:
        twin = client.submit(classes(20, "fmt-quick"))
        twin.wait(timeout=120)
    ambiguous = run("cancel", "fmt-quick", address=address)
    assert ambiguous.returncode == 2
    assert "'fmt-quick' names 2 jobs" in ambiguous.stderr
    assert job.id in ambiguous.stderr and twin.id in ambiguous.stderr
    unknown = run("show", "no-such-job", address=address)
    assert unknown.returncode == 4 and "no job has the id or the name" in unknown.stderr

    bad_filter = run("jobs", "--state", "bogus", address=address)
    assert bad_filter.returncode == 4 and bad_filter.stdout == ""
    assert bad_filter.stderr.startswith("error: INVALID_ARGUMENT: filter: unknown job state")


def test_field_violations_of_a_refused_spec_are_listed(tmp_path):
    svc = ServiceProcess(
        tmp_path / "data", workers=0, store=f"sqlite:///{tmp_path / 'j.db'}", max_steps=100
    )
    try:
        spec = tmp_path / "big.yaml"
        spec.write_text(yaml.safe_dump(classes(1000, "too-long")))
        out = run("submit", str(spec), address=svc.address)
    finally:
        svc.stop()
    assert out.returncode == 4 and out.stdout == ""
    lines = out.stderr.splitlines()
    assert lines[0].startswith("error: INVALID_ARGUMENT: ")
    assert any(line.startswith("  spec.training.steps: ") for line in lines[1:]), out.stderr


def test_exports_and_tensorboard_files_download(server, tmp_path):
    """A job that exports ONNX: `download --format onnx` gives it, and one it did not export
    (tflite) is converted on download; `trainer tensorboard` writes a run folder per job that
    TensorBoard's reader reads, every streamed step in it."""
    import onnxruntime
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    address = server.address
    with TrainingClient(address) as client:
        job = client.submit({**classes(30, "exported", eval_every=10), "export": ["onnx"]})
        assert job.wait(timeout=120).state == JobState.SUCCEEDED
        events = list(job.stream())
    streamed = {e.step: e.loss for e in events if e.kind == "step"}
    assert sorted(streamed) == list(range(1, 31))
    evals = [e for e in events if e.kind == "eval"]

    onnx_file = tmp_path / "model.onnx"
    out = run("download", job.id, "--format", "onnx", "-o", str(onnx_file), address=address)
    assert out.returncode == 0 and out.stdout.strip() == str(onnx_file), out.stderr
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (given,) = session.get_inputs()
    (probabilities,) = session.run(None, {given.name: np.zeros((2, 8), "float32")})
    assert probabilities.shape == (2, 3)

    out = run("download", job.id, "--format", "tflite", "-o", str(tmp_path), address=address)
    assert out.returncode == 0, out.stderr
    converted = Path(out.stdout.strip())
    assert converted == tmp_path / "exported.tflite" and converted.stat().st_size > 0

    out = run("tensorboard", job.id, "-o", str(tmp_path / "runs"), address=address)
    assert out.returncode == 0, out.stderr
    folder = tmp_path / "runs" / f"exported-{job.id.removeprefix('job-')[:8]}"
    assert out.stdout.split() == [str(folder)]
    board = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    board.Reload()
    assert {s.step: s.value for s in board.Scalars("train/loss")} == streamed
    evaluated = board.Scalars(f"{evals[0].split}/loss")
    assert [(s.step, s.value) for s in evaluated] == [(e.step, e.values["loss"]) for e in evals]
    assert [e.step for e in evals] == [10, 20, 30]
