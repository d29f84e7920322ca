"""A long-lived worker process: imports TensorFlow once, then claims and trains jobs.

One worker per GPU (pinned by CUDA_VISIBLE_DEVICES, set by the supervisor), or N on the CPU.
Events reach the store in one transaction per reporting window; the lease is renewed while the
job runs, and a cancel request is seen at the next renewal.
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
from typing import Any

from trainer_client.events import Event, ResultEvent
from trainer_client.spec import JobSpec, SpecError
from trainer_service.config import Settings
from trainer_service.datasets import DataPaths
from trainer_service.errors import TrainerError
from trainer_service.store import Job, JobState, LeaseLost, NewEvent, Store

log = logging.getLogger(__name__)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


_SKIP = {"kind", "time", "seq"}
_FIELDS: dict[type, tuple[str, ...]] = {}


def event_payload(event: Event) -> dict[str, Any]:
    """The event's fields as JSON-ready values (dataclasses.asdict is slow on the hot path)."""
    names = _FIELDS.get(type(event))
    if names is None:
        names = _FIELDS[type(event)] = tuple(
            f.name for f in dataclasses.fields(event) if f.name not in _SKIP
        )
    payload = {name: getattr(event, name) for name in names}
    if payload.get("failure") is not None:
        payload["failure"] = dataclasses.asdict(payload["failure"])
    return payload


class _JobRun:
    """Feeds one job's events to the store and answers the trainer's should_stop()."""

    def __init__(self, worker: Worker, job: Job):
        self.worker, self.job = worker, job
        self.buffer: list[NewEvent] = []
        self.progress: dict[str, Any] = {}
        self.cancel = False
        self.lost = False
        # Its own thread: one device call may outlast the lease, and the lease must not lapse.
        self.done = threading.Event()
        self.beater = threading.Thread(target=self._beat, name=f"heartbeat-{job.id}", daemon=True)

    def __enter__(self) -> _JobRun:
        self.beater.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.beater.join(timeout=10)

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
        self.buffer.append(NewEvent(event.kind, event_payload(event), event.time))
        if event.kind == "step":
            value = event.accuracy if event.accuracy is not None else event.mae
            self.progress = {"step": event.step, "loss": event.loss, "accuracy": value}
        elif event.kind != "log":
            self.flush()

    def flush(self) -> None:
        if not self.buffer or self.lost:
            return
        try:
            self.worker.store.append_events(self.job.id, self.worker.id, self.buffer, self.progress)
        except LeaseLost:
            log.warning("job %s: lease lost; stopping without writing more", self.job.id)
            self.lost = True
        self.buffer, self.progress = [], {}

    def should_stop(self) -> bool:
        # Called once per reporting window, right after that window's step events.
        self.flush()
        return self.cancel or self.lost or self.worker.stopping.is_set()


class Worker:
    def __init__(self, settings: Settings, store: Store, worker_id: str | None = None):
        self.settings, self.store = settings, store
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.stopping = threading.Event()
        self.paths = DataPaths(data_dir=settings.data_dir)

    def run(self) -> None:
        log.info("worker %s: ready", self.id)
        while not self.stopping.is_set():
            job = self.store.claim(self.id, self.settings.lease_seconds)
            if job is None:
                self.stopping.wait(self.settings.poll_seconds)
                continue
            self.run_job(job)
        log.info("worker %s: stopped", self.id)

    def run_job(self, job: Job) -> None:
        log.info("job %s: attempt %d on worker %s", job.id, job.attempts, self.id)
        with _JobRun(self, job) as run:
            self._run(job, run)

    def _run(self, job: Job, run: _JobRun) -> None:
        from trainer_service.trainer import NoGPU, train

        try:
            spec = JobSpec.parse(job.spec)
            result = train(
                spec,
                run.emit,
                run.should_stop,
                workdir=self.settings.job_dir(job.id),
                paths=self.paths,
                resume=job.attempts > 1,
                job_id=job.id,
            )
        except (TrainerError, NoGPU, SpecError) as exc:
            self._fail(run, getattr(exc, "reason", "invalid_spec"), str(exc))
            return
        except Exception as exc:  # a bug or a framework error: fail the job, keep the worker
            log.exception("job %s: training raised", job.id)
            self._fail(run, "internal_error", f"{type(exc).__name__}: {exc}")
            return
        run.flush()
        if run.lost:
            return
        self._finish(run, result)

    def _finish(self, run: _JobRun, result: ResultEvent) -> None:
        job_id = run.job.id
        try:
            if result.outcome == "succeeded":
                self.store.finish(
                    job_id,
                    self.id,
                    JobState.SUCCEEDED,
                    model_path=result.model_path,
                    test_metrics=json.dumps(result.test_metrics),
                )
            elif result.outcome == "cancelled" and (run.cancel or not self.stopping.is_set()):
                self.store.finish(job_id, self.id, JobState.CANCELLED)
            elif result.outcome == "cancelled":
                # Stopped because this worker is shutting down: hand the job back.
                self.store.finish(job_id, self.id, JobState.QUEUED)
            else:
                f = result.failure
                error = (f.reason, f.message, f.step) if f else ("failed", result.stop_reason, None)
                self.store.finish(job_id, self.id, JobState.FAILED, error=error)
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
            self.store.finish(
                run.job.id, self.id, JobState.FAILED, error=(reason, message, run.job.step or None)
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trainer worker")
    parser.add_argument("--worker-id", default=None)
    args = parser.parse_args(argv)
    settings = Settings()
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    import keras  # noqa: F401  import the framework once, before the first job arrives

    store = Store(settings.store_url)
    worker = Worker(settings, store, args.worker_id)
    signal.signal(signal.SIGTERM, lambda *_: worker.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: worker.stopping.set())
    worker.run()
    store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
