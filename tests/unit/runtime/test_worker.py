"""The worker's event writer: training hands each window over and goes on; the store gets every
event, in order, also after a stall or an outage; a lost lease stops the writing."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
import sqlalchemy as sa

from stepstream.kernel.events import LogEvent, StepEvent
from stepstream_service.config import Settings
from stepstream_service.runtime.worker import Worker, _JobRun
from stepstream_service.store import NewJob, Store
from tests.conftest import ENGINES


@pytest.fixture(params=ENGINES)
def store(request, database):
    s = Store(database(request.param))
    yield s
    s.close()


def claimed(store: Store, worker: str = "w1"):
    store.create_job(NewJob(name="j"))
    job = store.claim(worker, 30.0)
    assert job is not None
    return job


def make_run(store: Store, tmp_path, job) -> _JobRun:
    settings = Settings(data_dir=tmp_path / "data", heartbeat_seconds=60)
    worker = Worker(settings, store, "w1", devices=["CPU:0"])
    return _JobRun(worker, job)


def step(n: int) -> StepEvent:
    return StepEvent(n, 1.0 / n, 0.5, None, 0.01, 100.0, 1000.0, time.time())


def stored_steps(store: Store, job_id: str) -> list[int]:
    return [e.payload["step"] for e in store.read_events(job_id, 0, 10_000) if e.kind == "step"]


def test_every_event_reaches_the_store_in_order_with_the_live_progress(store, tmp_path):
    job = claimed(store)
    with make_run(store, tmp_path, job) as run:
        run.emit(LogEvent("built", time.time()))
        for window in range(5):
            for n in range(window * 20 + 1, window * 20 + 21):
                run.emit(step(n))
            assert run.should_stop() is False
        run.flush()
        assert stored_steps(store, job.id) == list(range(1, 101))
    row = store.get_job(job.id)
    assert (row.step, row.loss, row.accuracy) == (100, 0.01, 0.5)
    kinds = [e.kind for e in store.read_events(job.id, 0, 10_000)]
    assert kinds.index("log") < kinds.index("step")


def test_training_does_not_wait_for_a_stalled_store(tmp_path):
    """SQLite's write lock held elsewhere: should_stop() returns at once, the window stays
    pending, and it is written, in order, once the lock is released."""
    path = tmp_path / "store.db"
    store = Store(f"sqlite:///{path}")
    job = claimed(store)
    with make_run(store, tmp_path, job) as run:
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            for window in range(2):
                for n in range(window * 50 + 1, window * 50 + 51):
                    run.emit(step(n))
                # Writing inline would wait out SQLite's 10 s busy timeout here.
                answered = threading.Thread(target=run.should_stop)
                answered.start()
                answered.join(timeout=5)
                assert not answered.is_alive(), "should_stop() waited for the store"
            assert stored_steps(store, job.id) == []
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        run.flush()
        assert stored_steps(store, job.id) == list(range(1, 101))
    store.close()


def test_events_wait_out_a_store_outage_and_arrive_in_order(tmp_path):
    """The store answers errors for a while (its lock is held past the busy timeout):
    nothing emitted meanwhile is lost or reordered."""
    path = tmp_path / "store.db"
    store = Store(f"sqlite:///{path}")
    # Fail fast instead of queueing for 10 s, so the outage is a real error in a short test.
    sa.event.listen(
        store.engine, "connect", lambda conn, _: conn.execute("PRAGMA busy_timeout=100")
    )
    store.engine.dispose()
    job = claimed(store)
    with make_run(store, tmp_path, job) as run:
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            for n in range(1, 301):
                run.emit(step(n))
                if n % 30 == 0:
                    assert run.should_stop() is False
                    time.sleep(0.1)
            assert run.store_down
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        run.flush()
        assert not run.store_down
        assert stored_steps(store, job.id) == list(range(1, 301))
    store.close()


def test_a_lost_lease_stops_the_writing_and_the_training(store, tmp_path):
    job = claimed(store)
    with make_run(store, tmp_path, job) as run:
        run.emit(step(1))
        run.flush()
        with store.engine.begin() as conn:  # another worker took the job over
            conn.execute(
                sa.text("UPDATE jobs SET lease_owner = 'w2' WHERE id = :id"), {"id": job.id}
            )
        run.emit(step(2))
        run.should_stop()
        run.flush()
        assert run.lost and run.should_stop() is True
        run.emit(step(3))
    assert stored_steps(store, job.id) == [1]


def test_the_writer_thread_ends_with_the_run(store, tmp_path):
    job = claimed(store)
    with make_run(store, tmp_path, job) as run:
        run.emit(step(1))
    assert not run.writer.is_alive() and not run.beater.is_alive()
    assert stored_steps(store, job.id) == [1]


def test_a_job_that_does_not_fit_is_refused_before_anything_is_allocated(
    store, tmp_path, monkeypatch
):
    from stepstream.kernel.spec import JobSpec
    from stepstream_service.engine import footprint
    from stepstream_service.errors import OutOfMemory

    worker = Worker(Settings(data_dir=tmp_path / "data"), store, "w1", devices=["CPU:0"])
    limit = footprint.Memory(8 * 2**30, 2**30, 2**30, "the container's memory limit (test)")
    monkeypatch.setattr(footprint, "headroom", lambda: limit)
    job = claimed(store)
    wide = JobSpec.parse(
        {
            "dataset": {"name": "synthetic_classification", "num_features": 8},
            "model": {"architecture": "mlp", "hidden_units": [16384] * 4},
        }
    )
    with pytest.raises(OutOfMemory, match=r"needs about 1\d\.\d GiB.*has 7\.0 GiB free"):
        worker._check_memory(job, wide)
    worker._check_memory(job, JobSpec.parse({"dataset": "linear", "model": "linear"}))


def test_each_attempt_says_where_it_starts(store, tmp_path):
    from stepstream_service.store.artifacts import record_checkpoint

    worker = Worker(Settings(data_dir=tmp_path / "data"), store, "w1", devices=["CPU:0"])
    job = claimed(store)
    workdir = worker.settings.job_dir(job.id)
    assert worker._attempt(job, workdir) == "attempt 1 on worker w1"
    folder = workdir / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "step-000000040.keras").write_bytes(b"weights")
    record_checkpoint(folder, 40)
    job.attempts = 2
    # Only up to the last step whose events are stored: past it the history would have a hole.
    job.step = 39
    assert worker._attempt(job, workdir) == (
        "attempt 2 on worker w1, starting from step 0 (no intact checkpoint)"
    )
    job.step = 40
    assert worker._attempt(job, workdir) == "attempt 2 on worker w1, resuming from step 40"
    (folder / "step-000000040.keras").write_bytes(b"damaged")
    assert worker._attempt(job, workdir) == (
        "attempt 2 on worker w1, starting from step 0 (no intact checkpoint)"
    )


def test_a_failed_jobs_tensorboard_files_reach_a_remote_artifact_store(store, tmp_path):
    """Whatever the run wrote is stored however it ended; here its loss became NaN."""
    from stepstream_service.store.artifacts import ArtifactStore

    artifacts = ArtifactStore(f"memory://tb-{tmp_path.name}")
    spec = {
        "dataset": {"name": "linear", "noise": 10.0},
        "model": "linear",
        "optimizer": {"name": "sgd", "learning_rate": 1e6},
        "training": {"steps": 200, "batch_size": 100},
    }
    store.create_job(NewJob(name="nan", spec=spec))
    job = store.claim("w1", 30.0)
    settings = Settings(data_dir=tmp_path / "data", heartbeat_seconds=60)
    worker = Worker(settings, store, "w1", artifacts=artifacts, devices=["CPU:0"])
    worker.run_job(job)
    assert store.get_job(job.id).error_reason == "non_finite_loss"
    stored = artifacts.files(f"jobs/{job.id}/tensorboard")
    assert any(name.startswith("events.out.tfevents.1") for name in stored), stored
    assert all(size > 0 for size in stored.values())
