"""A long-lived worker process: imports TensorFlow once, then claims and trains jobs.

One worker per GPU (pinned by CUDA_VISIBLE_DEVICES, set by the supervisor), or N on the CPU.
It registers the devices it sees, so a job that needs a GPU is claimed only by a worker with one.
A writer thread puts events in the store, one transaction per reporting window; the lease is
renewed while the job runs, and a cancel request is seen at the next renewal. Checkpoints and the
model go to the artifact store, so a retry on another machine resumes where this one stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import sqlalchemy.exc

from stepstream.kernel.events import Event, ResultEvent
from stepstream.kernel.failures import Failure
from stepstream.kernel.spec import JobSpec, SpecError
from stepstream_service.config import WORKER_RETIRED, Settings
from stepstream_service.engine.datasets import DataPaths
from stepstream_service.errors import TrainerError
from stepstream_service.store import QUEUE_CHANNEL, Job, JobState, LeaseLost, NewEvent, Store
from stepstream_service.store.artifacts import ArtifactStore, pull_checkpoint, push_checkpoint
from stepstream_service.store.wakeups import Wakeups

log = logging.getLogger(__name__)
# The database is restarting or unreachable: what the worker has is kept and written later.
STORE_DOWN = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _JobRun:
    """Feeds one job's events to the store and answers the trainer's should_stop().

    The store is written by a thread of its own, one transaction per reporting window: a
    commit takes a few milliseconds that training would otherwise wait for (about 3% of the
    seed job's time), while the device runs the next window without holding the GIL.
    """

    def __init__(self, worker: Worker, job: Job):
        self.worker, self.job = worker, job
        self.workdir = worker.settings.job_dir(job.id)
        self.cancel = False
        self.lost = False
        self.store_down = False
        # Events not yet handed to the store, oldest first; `writing` while a batch is in flight.
        self.pending: list[Event] = []
        self.writing = False
        self.changed = threading.Condition()
        # Its own thread: one device call may outlast the lease, and the lease must not lapse.
        self.done = threading.Event()
        self.beater = threading.Thread(target=self._beat, name=f"heartbeat-{job.id}", daemon=True)
        self.writer = threading.Thread(target=self._write, name=f"events-{job.id}", daemon=True)

    def __enter__(self) -> _JobRun:
        self.beater.start()
        self.writer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        with self.changed:
            self.changed.notify_all()
        self.beater.join(timeout=10)
        self.writer.join(timeout=10)

    def _beat(self) -> None:
        worker = self.worker
        while not self.done.wait(worker.settings.heartbeat_seconds):
            try:
                self.cancel = worker.store.heartbeat(
                    self.job.id, worker.id, worker.settings.lease_seconds
                )
            except LeaseLost:
                self.lost = True
                return
            except Exception:  # the store may be down for a moment; the lease has slack
                log.warning("job %s: heartbeat failed; trying again", self.job.id, exc_info=True)

    def emit(self, event: Event) -> None:
        if self.lost:
            return
        if event.kind == "checkpoint":
            # Durable before anyone is told of it: a retry elsewhere resumes from this one.
            push_checkpoint(self.worker.artifacts, self.workdir, self.job.id)
        with self.changed:
            self.pending.append(event)
            if event.kind not in ("step", "log"):
                self.changed.notify_all()

    def should_stop(self) -> bool:
        # Called once per reporting window, right after that window's step events.
        with self.changed:
            self.changed.notify_all()
        return self.cancel or self.lost or self.worker.stopping.is_set()

    def _write(self) -> None:
        """Write what is pending, in order. While the store is down the events stay here and
        training goes on; they are written, still in order, once it is back."""
        batch: list[Event] = []
        while not self.lost:
            with self.changed:
                while not self.pending and not batch and not self.done.is_set():
                    self.changed.wait()
                if not self.pending and not batch:
                    return
                batch += self.pending
                self.pending = []
                self.writing = True
            try:
                self.worker.store.append_events(
                    self.job.id, self.worker.id, [NewEvent.of(e) for e in batch], _progress(batch)
                )
                batch, self.store_down = [], False
            except LeaseLost:
                log.warning("job %s: lease lost; stopping without writing more", self.job.id)
                self.lost = True
            except STORE_DOWN as exc:
                if not self.store_down:
                    log.warning(
                        "job %s: store unavailable (%s); events kept",
                        self.job.id,
                        type(exc).__name__,
                    )
                self.store_down = True
            finally:
                with self.changed:
                    self.writing = bool(batch)
                    self.changed.notify_all()
            if batch and self.done.wait(0.5):
                return

    def flush(self) -> None:
        """Wait until every event emitted so far is in the store, or the lease is lost, or
        this worker is stopping while the store is down (the events are then given up)."""
        with self.changed:
            self.changed.notify_all()
            while (self.pending or self.writing) and not self.lost:
                if self.store_down and self.worker.stopping.is_set():
                    return
                self.changed.wait(0.5)


def resident_mib() -> int:
    """This process's resident memory in MiB (Linux); 0 where /proc is not there."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE") // (1024 * 1024)


def _progress(batch: list[Event]) -> dict[str, Any]:
    """The job row's live step, loss and accuracy: from the batch's last step event."""
    for event in reversed(batch):
        if event.kind == "step":
            return {
                "step": event.step,
                "loss": event.loss,
                "accuracy": event.accuracy,
                "mae": event.mae,
            }
    return {}


class Worker:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        worker_id: str | None = None,
        *,
        artifacts: ArtifactStore | None = None,
        wakeups: Wakeups | None = None,
        devices: list[str] | None = None,
    ):
        self.settings, self.store = settings, store
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.stopping = threading.Event()
        self.paths = DataPaths(data_dir=settings.data_dir)
        self.artifacts = artifacts or ArtifactStore(
            settings.artifacts_url, settings.artifact_options
        )
        self.wakeups = wakeups or Wakeups(settings.store_url, (QUEUE_CHANNEL,))
        self.devices = devices if devices is not None else ["CPU:0"]
        self.gpus = sum(1 for d in self.devices if d.startswith("GPU"))
        self.jobs_run = 0
        self.retired = False

    def run(self) -> None:
        self.store.register_worker(self.id, socket.gethostname(), self.devices)
        log.info("worker %s: ready, devices %s", self.id, ", ".join(self.devices))
        idle = (
            self.settings.notify_poll_seconds
            if self.wakeups.listening
            else self.settings.poll_seconds
        )
        seen = time.monotonic()
        baseline = resident_mib()
        while not self.stopping.is_set():
            try:
                job = self.store.claim(self.id, self.settings.lease_seconds, gpus=self.gpus)
                if job is None and time.monotonic() - seen > self.settings.worker_seen_seconds:
                    self.store.worker_seen(self.id)
                    seen = time.monotonic()
            except Exception as exc:  # the store may be restarting; jobs wait in it meanwhile
                log.warning("worker %s: claiming failed (%s); retrying", self.id, exc)
                self.stopping.wait(1.0)
                continue
            if job is None:
                self.wakeups.wait(QUEUE_CHANNEL, idle)
                continue
            self.run_job(job)
            seen = time.monotonic()
            self.jobs_run += 1
            reason = self._retirement(resident_mib() - baseline)
            if reason:
                log.info("worker %s: %s; a fresh process takes over", self.id, reason)
                self.retired = True
                break
        with contextlib.suppress(Exception):
            self.store.worker_seen(self.id, stopped=True)
        log.info("worker %s: stopped", self.id)

    def _retirement(self, grown_mib: int) -> str | None:
        s = self.settings
        if self.jobs_run >= s.worker_max_jobs:
            return f"{self.jobs_run} jobs run"
        if grown_mib > s.worker_max_growth_mib:
            return (
                f"memory grew by {grown_mib} MiB over {self.jobs_run} jobs "
                f"(worker_max_growth_mib {s.worker_max_growth_mib})"
            )
        return None

    def run_job(self, job: Job) -> None:
        log.info("job %s: attempt %d on worker %s", job.id, job.attempts, self.id)
        with _JobRun(self, job) as run:
            self._run(job, run)

    def _inputs(self, job: Job, spec: JobSpec, workdir: Path) -> None:
        """Fetch what an earlier attempt or an upload left in the artifact store."""
        if job.attempts > 1:
            step = pull_checkpoint(self.artifacts, workdir, job.id)
            if step is not None:
                log.info("job %s: checkpoint at step %d fetched", job.id, step)
        path = spec.dataset.path
        if spec.dataset.name == "npz" and path and not Path(path).is_absolute():
            local = self.settings.data_dir / path
            if not local.is_file() and self.artifacts.exists(path):
                self.artifacts.get(path, local)

    def _run(self, job: Job, run: _JobRun) -> None:
        from stepstream_service.engine.trainer import NoGPU, train

        try:
            spec = JobSpec.parse(job.spec)
            self._inputs(job, spec, run.workdir)
            result = train(
                spec,
                run.emit,
                run.should_stop,
                workdir=run.workdir,
                paths=self.paths,
                resume=job.attempts > 1,
                job_id=job.id,
                handing_back=lambda: self.stopping.is_set() and not run.cancel,
            )
            if result.outcome == "succeeded" and result.model_path:
                key = f"jobs/{job.id}/model.keras"
                self.artifacts.put(Path(result.model_path), key)
                result = dataclasses.replace(result, model_path=key)
        except (TrainerError, NoGPU, SpecError) as exc:
            self._fail(run, getattr(exc, "reason", "invalid_spec"), str(exc))
            return
        except MemoryError:
            # numpy refuses an allocation larger than the machine (a dataset too big to hold).
            message = "out of memory while preparing the job; use a smaller dataset or model"
            self._fail(run, "out_of_memory", message)
            return
        except Exception as exc:  # a bug or a framework error: fail the job, keep the worker
            log.exception("job %s: training raised", job.id)
            self._fail(run, "internal_error", f"{type(exc).__name__}: {exc}")
            return
        run.flush()
        if run.lost:
            return
        self._finish(run, result)

    def _finish_when_stored(self, job_id: str, to: JobState, **values: Any) -> None:
        while True:
            try:
                self.store.finish(job_id, self.id, to, **values)
                return
            except STORE_DOWN as exc:
                log.warning("job %s: store unavailable (%s); retrying", job_id, exc)
                if self.stopping.wait(0.5):
                    raise

    def _finish(self, run: _JobRun, result: ResultEvent) -> None:
        job_id = run.job.id
        try:
            if result.outcome == "succeeded":
                self._finish_when_stored(
                    job_id,
                    JobState.SUCCEEDED,
                    model_path=result.model_path,
                    test_metrics=json.dumps(result.test_metrics),
                )
            elif result.outcome == "cancelled" and (run.cancel or not self.stopping.is_set()):
                self._finish_when_stored(job_id, JobState.CANCELLED)
            elif result.outcome == "cancelled":
                # Stopped because this worker is shutting down: hand the job back.
                self._finish_when_stored(job_id, JobState.QUEUED)
            else:
                failure = result.failure or Failure("failed", result.stop_reason)
                self._finish_when_stored(job_id, JobState.FAILED, failure=failure)
        except LeaseLost:
            log.warning("job %s: lease lost before the result was recorded", job_id)
        log.info(
            "job %s: %s (%s) after %d steps",
            job_id,
            result.outcome,
            result.stop_reason,
            result.steps,
        )

    def _fail(self, run: _JobRun, reason: str, message: str) -> None:
        run.flush()
        log.warning("job %s: failed: %s: %s", run.job.id, reason, message)
        with contextlib.suppress(LeaseLost):
            failure = Failure(reason, message, run.job.step or None)
            self._finish_when_stored(run.job.id, JobState.FAILED, failure=failure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stepstream_service.runtime.worker")
    parser.add_argument("--worker-id", default=None)
    args = parser.parse_args(argv)
    settings = Settings()
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    from stepstream_service.engine.trainer import (
        devices,
    )  # imports the framework once, before any job

    store = Store(settings.store_url)
    wakeups = Wakeups(settings.store_url, (QUEUE_CHANNEL,)).start()
    worker = Worker(settings, store, args.worker_id, wakeups=wakeups, devices=devices())
    signal.signal(signal.SIGTERM, lambda *_: worker.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: worker.stopping.set())
    worker.run()
    wakeups.stop()
    store.close()
    return WORKER_RETIRED if worker.retired else 0


if __name__ == "__main__":
    raise SystemExit(main())
