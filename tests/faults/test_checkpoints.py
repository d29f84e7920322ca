"""Checkpoints and retries: a damaged or missing checkpoint is found out, the retry resumes from
the newest intact one and says so, a resumed job's history holds each step once, and every
failure, whatever ended it, leaves its final result before its terminal state."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from pathlib import Path

import pytest

from stepstream.client import TrainingClient
from stepstream.kernel.events import ResultEvent, StepEvent, from_payload
from stepstream_service.config import Settings
from stepstream_service.runtime.worker import Worker
from stepstream_service.store import NewEvent, NewJob, Store
from tests.conftest import ENGINES
from tests.integration.conftest import ServiceProcess
from tests.integration.test_service import classes, wait_for_step

from .conftest import assert_intact

STEPS = 1000
DAMAGES = ("truncated", "deleted", "marker")


# ------------------------------------------------------------------ damaged checkpoints (7, 8)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _damage(folder: Path, how: str) -> tuple[int, int]:
    """Damage the job's checkpoints as `how` says; (newest step, the one before it)."""
    # A save the kill cut short may have left a step-N.partial.keras: not a checkpoint.
    kept = sorted(p for p in folder.iterdir() if re.fullmatch(r"step-\d+\.keras", p.name))
    newest, older = kept[-2:][::-1]
    if how == "truncated":
        data = newest.read_bytes()
        newest.write_bytes(data[: len(data) // 2])
    elif how == "deleted":
        newest.unlink()
    else:
        marker = folder / "latest.json"
        text = marker.read_bytes()
        marker.write_bytes(text[: len(text) // 2])
    return int(newest.stem.split("-")[1]), int(older.stem.split("-")[1])


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """Three jobs checkpointing every 100 steps; their workers are killed past step 250, each
    job's checkpoints are damaged one way, and the retries run to the end. Per damage:
    (newest step, older step, final info, events, metrics)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    url = f"sqlite:///{folder / 'trainer.db'}"
    svc = ServiceProcess(
        folder / "data",
        workers=3,
        # Room for a heartbeat starved by three workers on CI's two cores.
        lease_seconds=4,
        store=url,
    )
    try:
        # All three ready before any job is sent, so the jobs run side by side and none ends
        # before the kill.
        with contextlib.closing(Store(url)) as store:
            end = time.monotonic() + 120
            while len(store.live_workers(60)) < 3:
                assert time.monotonic() < end, "the workers never became ready"
                time.sleep(0.1)
        with TrainingClient(svc.address) as c:
            jobs = {
                how: c.submit(classes(STEPS, f"ckpt-{how}", checkpoint_every=100))
                for how in DAMAGES
            }
            for job in jobs.values():
                wait_for_step(job, 250, timeout=120)
            pids = svc.worker_pids()
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            end = time.monotonic() + 10
            while not all(_gone(pid) for pid in pids):
                assert time.monotonic() < end, "killed workers did not die"
                time.sleep(0.01)
            damaged = {
                how: _damage(svc.data_dir / "jobs" / job.id / "checkpoints", how)
                for how, job in jobs.items()
            }
            out = {}
            for how, job in jobs.items():
                info = job.wait(timeout=180)
                out[how] = (*damaged[how], info, list(job.stream()), job.metrics())
        yield out
    finally:
        svc.stop()


def _logs(events) -> list[str]:
    return [e.message for e in events if e.kind == "log"]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_retry_resumes_from_the_newest_intact_checkpoint_and_says_why(resumed, how):
    newest, older, info, events, _ = resumed[how]
    assert info.state == "SUCCEEDED" and info.attempts == 2, (info, _logs(events))
    assert_intact(events, steps=STEPS, final="SUCCEEDED")
    said = [m for m in _logs(events) if "resumed from checkpoint at step" in m]
    assert len(said) == 1, _logs(events)
    if how == "truncated":
        assert said[0] == (
            f"checkpoint at step {newest} is damaged (sha256 mismatch); "
            f"resumed from checkpoint at step {older}"
        )
    elif how == "deleted":
        assert said[0] == (
            f"checkpoint at step {newest} is missing; resumed from checkpoint at step {older}"
        )
    else:  # both checkpoints are intact: the newest is found without the marker
        assert "latest.json" in said[0] and "unreadable" in said[0], said[0]
        assert said[0].endswith(f"resumed from checkpoint at step {newest}")


@pytest.mark.parametrize("how", DAMAGES)
def test_a_resumed_history_has_one_point_per_step_and_shows_the_attempts(resumed, how):
    newest, older, _, events, metrics = resumed[how]
    assert metrics.total_points == STEPS
    assert metrics.steps == list(range(1, STEPS + 1))
    # The history keeps the attempt that finished: its values, not the first attempt's.
    start = newest if how == "marker" else older
    last = {e.step: e.loss for e in events if e.kind == "step"}
    assert metrics.loss[start:] == [last[s] for s in range(start + 1, STEPS + 1)]
    attempts = [m for m in _logs(events) if m.startswith("attempt ")]
    assert len(attempts) == 2, attempts
    assert attempts[0].startswith("attempt 1 on worker ")
    assert attempts[1].startswith("attempt 2 on worker ")
    assert attempts[1].endswith(f", resuming from step {start}")


# ---------------------------------------------------------------- every failure has a result (9)


@pytest.fixture(params=ENGINES)
def store(request, database):
    s = Store(database(request.param))
    yield s
    s.close()


def _history(store: Store, job_id: str):
    rows = store.read_events(job_id, 0, 10_000)
    return [from_payload(r.kind, r.payload, seq=r.seq, time=r.time) for r in rows]


def _ends_with_a_failed_result(events, reason: str, steps: int) -> ResultEvent:
    assert_intact(events, steps=steps, final="FAILED")
    result, last = events[-2], events[-1]
    assert result.kind == "result", [e.kind for e in events[-3:]]
    assert [e for e in events if e.kind == "result"] == [result]
    assert result.outcome == "failed" and result.stop_reason == reason
    assert result.failure is not None and result.failure.reason == reason
    assert last.failure == result.failure
    assert result.steps == steps
    return result


@pytest.mark.parametrize(
    ("raised", "reason"),
    [(RuntimeError("a framework bug"), "internal_error"), (MemoryError(), "out_of_memory")],
)
def test_a_job_failing_in_the_worker_ends_with_its_result(
    store, tmp_path, monkeypatch, raised, reason
):
    from stepstream_service.engine import trainer

    def train(spec, emit, should_stop, **_):
        for n in range(1, 6):
            emit(StepEvent(n, 1.0, 0.5, None, 0.01, 10.0, 100.0, time.time()))
        should_stop()
        raise raised

    monkeypatch.setattr(trainer, "train", train)
    store.create_job(NewJob(name="j", spec=classes(20, "boom"), total_steps=20))
    job = store.claim("w1", 30.0)
    worker = Worker(Settings(data_dir=tmp_path / "data"), store, "w1", devices=["CPU:0"])
    worker.run_job(job)
    _ends_with_a_failed_result(_history(store, job.id), reason, steps=5)
    # The worker goes on: it is not the job's failure.
    failure = store.get_job(job.id).failure
    assert failure.reason == reason
    # What the framework said stays in the operator's log, not in what the tenant is shown.
    assert "a framework bug" not in failure.message


def test_a_job_whose_worker_was_lost_for_the_last_time_ends_with_its_result(store):
    store.create_job(NewJob(name="j", spec=classes(20, "lost"), total_steps=20, max_attempts=1))
    job = store.claim("w1", 1.0)
    steps = [
        NewEvent.of(StepEvent(n, 1.0, 0.5, None, 0.01, 10.0, 100.0, time.time())) for n in (1, 2, 3)
    ]
    store.append_events(job.id, "w1", steps, {"step": 3})
    assert store.rescue(now=time.time() + 60) == [(job.id, "FAILED")]
    result = _ends_with_a_failed_result(_history(store, job.id), "worker_lost", steps=3)
    assert "attempts used up" in result.failure.message
