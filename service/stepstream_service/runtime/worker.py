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
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy.exc

from stepstream.kernel import names
from stepstream.kernel.events import Event, LogEvent, ResultEvent
from stepstream.kernel.failures import Failure
from stepstream.kernel.spec import JobSpec, SpecError
from stepstream_service.config import WORKER_RETIRED, Settings
from stepstream_service.engine import footprint, sources
from stepstream_service.engine.datasets import DataPaths
from stepstream_service.engine.model_cache import ModelCache
from stepstream_service.engine.tensorboard import FOLDER as BOARD_FOLDER
from stepstream_service.errors import OutOfMemory, TrainerError
from stepstream_service.store import QUEUE_CHANNEL, Job, JobState, LeaseLost, NewEvent, Store
from stepstream_service.store.artifacts import (
    ArtifactStore,
    CheckpointScan,
    pull_checkpoint,
    pull_folder,
    push_checkpoint,
    push_folder,
)
from stepstream_service.store.errors import StorageQuotaExceeded
from stepstream_service.store.fairshare import FairShare
from stepstream_service.store.gangs import GangPart
from stepstream_service.store.quota import check_quota, count_artifacts
from stepstream_service.store.wakeups import Wakeups
from stepstream_service.store.workers import device_count

if TYPE_CHECKING:  # the engine imports the framework: the worker loads it once, in main()
    from stepstream_service.engine.trainer import ForkSource
    from stepstream_service.runtime.gang import Rank

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
        self.over_quota: str | None = None  # why the tenant's storage quota stopped it
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
        checked = float("-inf")
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
            # Less often than the lease: the usage is a sum over the tenant's jobs.
            since = time.monotonic() - checked
            if self.over_quota is None and since >= worker.settings.storage_check_seconds:
                checked = time.monotonic()
                self._check_storage()

    def _check_storage(self) -> None:
        """Stop the job once its tenant stores as much as its quota allows."""
        worker = self.worker
        limit = worker.settings.tenant_storage_bytes
        try:
            check_quota(worker.store, worker.artifacts, self.job.tenant, limit)
        except StorageQuotaExceeded as exc:
            log.warning("job %s: stopping: %s", self.job.id, exc)
            self.over_quota = f"stopped: {exc}"
        except Exception:  # the store may be down for a moment: the next beat looks again
            log.warning("job %s: storage check failed", self.job.id, exc_info=True)

    def settled(self, result: ResultEvent) -> ResultEvent:
        """A run stopped for its tenant's storage quota failed: nobody cancelled it."""
        if self.over_quota is None or self.cancel or result.stop_reason != "cancelled":
            return result
        failure = Failure(StorageQuotaExceeded.reason, self.over_quota, result.steps or None)
        return dataclasses.replace(
            result, outcome="failed", stop_reason=failure.reason, failure=failure
        )

    def emit(self, event: Event) -> None:
        if self.lost:
            return
        if event.kind == "result":
            event = self.settled(event)
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
        stop = self.cancel or self.lost or self.worker.stopping.is_set()
        return stop or self.over_quota is not None

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
                appended = self.worker.store.append_events(
                    self.job.id, self.worker.id, [NewEvent.of(e) for e in batch], _progress(batch)
                )
                self.cancel = self.cancel or appended.cancel_requested
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
        self.paths = DataPaths(
            data_dir=settings.data_dir,
            uploads=settings.data_dir / "uploads",
            urls=not settings.auth_configured,  # URLs read with the server's credentials
        )
        self.artifacts = artifacts or ArtifactStore(
            settings.artifacts_url, settings.artifact_options
        )
        self.wakeups = wakeups or Wakeups(settings.store_url, (QUEUE_CHANNEL,))
        self.devices = devices if devices is not None else ["CPU:0"]
        self.gpus = sum(1 for d in self.devices if d.startswith("GPU"))
        self.jobs_run = 0
        self.retired = False
        self.memory: int | None = None  # what a job must fit in here, once run() measured it
        # None when off: no job then pays for a cache key it would never use.
        self.models = (
            ModelCache(settings.model_cache_mib << 20) if settings.model_cache_mib else None
        )
        self.share = FairShare.of(settings)
        self.live_within = 3 * settings.worker_seen_seconds

    def run(self) -> None:
        # Measured once the framework is loaded: what is left is what a job can ever have.
        self.memory = footprint.worker_memory(self.gpus)
        self.store.register_worker(
            self.id, socket.gethostname(), self.devices, self.memory, self._gang_address()
        )
        log.info(
            "worker %s: ready, devices %s, memory %s",
            self.id,
            ", ".join(self.devices),
            footprint.size(self.memory) if self.memory else "unknown",
        )
        idle = (
            self.settings.notify_poll_seconds
            if self.wakeups.listening
            else self.settings.poll_seconds
        )
        seen = time.monotonic()
        baseline = resident_mib()
        while not self.stopping.is_set():
            try:
                job = self.store.claim(
                    self.id,
                    self.settings.lease_seconds,
                    gpus=self.gpus,
                    devices=device_count(self.devices),
                    share=self.share,
                    live_within=self.live_within,
                )
                part = self.store.gang_part(self.id) if job is None else None
                if job is None and time.monotonic() - seen > self.settings.worker_seen_seconds:
                    self.store.worker_seen(self.id)
                    seen = time.monotonic()
            except Exception as exc:  # the store may be restarting; jobs wait in it meanwhile
                log.warning("worker %s: claiming failed (%s); retrying", self.id, exc)
                self.stopping.wait(1.0)
                continue
            if part is not None:
                self.run_part(part)
                seen = time.monotonic()
                continue
            if job is None:
                self.wakeups.wait(QUEUE_CHANNEL, idle, until=self.stopping)
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

    def _gang_address(self) -> str:
        """Where a gang's replicas reach this worker's: a port free now, which its rank's
        process listens on while it serves a gang."""
        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        return f"{self.settings.gang_host or socket.gethostname()}:{port}"

    def _rank(
        self,
        job: Job,
        spec: JobSpec,
        addresses: list[str],
        rank: int,
        workdir: Path,
        source: ForkSource | None,
    ) -> Rank:
        """What rank `rank` of a gang trains with. Loading and saving a model read it through
        collectives, so every rank resumes from the same checkpoint (or forks the same one)
        and saves where the others do."""
        from stepstream_service.engine.distribution import Cluster
        from stepstream_service.runtime.gang import Rank

        gpus = spec.runtime.devices // spec.runtime.machines if self.gpus else 0
        return Rank(
            spec=job.spec,
            cluster=Cluster(tuple(addresses), rank, gpus, self.settings.gang_timeout_seconds),
            workdir=workdir,
            paths=self.paths,
            job_id=job.id,
            resume=job.attempts > 1,
            resume_upto=job.step,
            final_checkpoint=True,
            start_from=source,
        )

    def run_part(self, part: GangPart) -> None:
        """Serve as one rank of a gang led by another worker, until its attempt is over: the
        chief holds the lease and reports; this rank trains its share and reports nothing."""
        from stepstream_service.runtime.gang import train_rank, watch_part

        job = part.job
        log.info(
            "job %s: rank %d of %d on worker %s", job.id, part.rank, len(part.addresses), self.id
        )
        workdir = self.settings.data_dir / "gangs" / f"{job.id}-rank{part.rank}"
        done = threading.Event()
        seen = [time.monotonic()]

        def live() -> bool:  # and this worker is alive, though busy
            if time.monotonic() - seen[0] > self.settings.worker_seen_seconds:
                self.store.worker_seen(self.id)
                seen[0] = time.monotonic()
            return self.store.part_live(job.id, part.attempt)

        over = watch_part(live, self.settings.heartbeat_seconds, done)
        source = None
        try:
            spec = JobSpec.parse(job.spec)
            self._inputs(job, spec, workdir)
            self._attempt(job, workdir)  # the chief's checkpoint, which this rank loads too
            source = self._fork_source(job, workdir)
            rank = self._rank(job, spec, part.addresses, part.rank, workdir, source)
            stopping = self.stopping.is_set
            result = train_rank(
                self.settings, rank, lambda _: None, stopping, stopping, over.is_set
            )
            log.info(
                "job %s: rank %d: %s (%s)", job.id, part.rank, result.outcome, result.stop_reason
            )
        except TrainerError as exc:  # the chief reports the job's outcome
            log.warning("job %s: rank %d: %s", job.id, part.rank, exc)
        except Exception:
            log.exception("job %s: rank %d failed", job.id, part.rank)
        finally:
            done.set()
            shutil.rmtree(workdir, ignore_errors=True)
            if source is not None:
                shutil.rmtree(source.folder, ignore_errors=True)

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
        with _JobRun(self, job) as run:
            try:
                attempt = self._attempt(job, run.workdir)
            except Exception as exc:  # the store's URL and paths stay in the worker's log
                log.exception("job %s: fetching its checkpoint failed", job.id)
                reason = exc.reason if isinstance(exc, TrainerError) else "internal_error"
                message = "the checkpoint of an earlier attempt could not be fetched"
                self._fail(run, reason, f"{message} ({type(exc).__name__})")
                return
            log.info("job %s: %s", job.id, attempt)
            # In the job's events too: a resumed job's history shows where each attempt began.
            run.emit(LogEvent(attempt, time.time()))
            try:
                source = self._fork_source(job, run.workdir)
            except Exception as exc:  # the store's URL and paths stay in the worker's log
                log.exception("job %s: fetching the checkpoint it forks failed", job.id)
                reason = exc.reason if isinstance(exc, TrainerError) else "internal_error"
                forked = job.spec["init_from"].get("job")
                message = f"the checkpoint of {forked} to start from could not be fetched"
                self._fail(run, reason, f"{message} ({type(exc).__name__})")
                return
            try:
                self._run(job, run, source)
            finally:
                if source is not None:
                    shutil.rmtree(source.folder, ignore_errors=True)

    def _attempt(self, job: Job, workdir: Path) -> str:
        """Fetch the checkpoint an earlier attempt left; the line that starts this attempt."""
        said = f"attempt {job.attempts} on worker {self.id}"
        if job.attempts <= 1:
            return said
        try:  # an earlier attempt's TensorBoard files, which this one carries on
            pull_folder(self.artifacts, f"jobs/{job.id}/{BOARD_FOLDER}", workdir / BOARD_FOLDER)
        except Exception:
            log.warning("job %s: earlier TensorBoard files not fetched", job.id, exc_info=True)
        step = pull_checkpoint(self.artifacts, workdir, job.id, upto=job.step)
        if step is None:
            return f"{said}, starting from step 0 (no intact checkpoint)"
        return f"{said}, resuming from step {step}"

    def _fork_source(self, job: Job, workdir: Path) -> ForkSource | None:
        """For a fork (spec init_from) with no intact checkpoint of its own yet: the newest
        intact checkpoint of the job it forks (or the one at init_from.step), fetched into a
        folder of its own that the caller removes, and checked as a resume checks its own.
        None for any other job."""
        from stepstream_service.engine.trainer import ForkSource

        init = job.spec.get("init_from")
        if not isinstance(init, dict):
            return None
        if job.attempts > 1 and CheckpointScan(workdir / "checkpoints", job.step).newest_intact():
            return None  # _attempt fetched this job's own: training resumes from that
        step = init.get("step")
        step = step if isinstance(step, int) else None
        # A retry after steps were stored starts at or before the last of them, as a resume
        # does, so the history has no hole (the source may have moved on since).
        upto = step if step is not None else (job.step or None)
        # Outside the job's folder, whose files count as its artifacts.
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".fork-{job.id}-", dir=self.settings.data_dir))
        try:
            found = pull_checkpoint(self.artifacts, folder, init["job"], upto=upto)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        log.info("job %s: forks job %s (its checkpoint at step %s)", job.id, init["job"], found)
        return ForkSource(job=init["job"], folder=folder, step=step)

    def _inputs(self, job: Job, spec: JobSpec, workdir: Path) -> None:
        """Fetch what an upload left in the artifact store (the checkpoint: see _attempt)."""
        weights = getattr(spec.model, "weights", "none")  # a backbone's (keras_models loads it)
        local = self.settings.data_dir / weights
        if weights != "none" and not local.is_file() and self.artifacts.exists(weights):
            self.artifacts.get(weights, local)
        if spec.dataset.name not in names.FILE_DATASETS:
            return
        for path in (spec.dataset.path, spec.dataset.validation_path, spec.dataset.test_path):
            sources.fetch(self.artifacts, self.settings.data_dir, path)  # a key, or a glob

    def _check_memory(self, job: Job, spec: JobSpec) -> None:
        """Refuse, before anything is allocated, a job whose estimated peak does not fit in
        what this worker has free: on the CPU a failed allocation kills the whole process."""
        local = footprint.local_npz(self.settings.data_dir, spec.dataset.path)
        arrays = None
        if spec.dataset.name == "npz" and local is not None:
            with contextlib.suppress(TrainerError):  # a bad file: the loader says why
                arrays = footprint.npz_arrays(local)
        need = footprint.estimate(spec, arrays, local)
        if spec.model.architecture == "keras":
            from stepstream_service.engine import keras_models  # Keras: the worker has it

            need = keras_models.exact_footprint(spec, need)
        host = footprint.headroom()
        on_gpu = self.gpus > 0 and spec.runtime.device != "cpu"
        checks = []
        if on_gpu and self.memory:
            checks.append((need.model, self.memory, "its GPU's memory"))
        if host is not None:
            checks.append((need.data if on_gpu else need.total, host.free, host.source))
        for wanted, has, source in checks:
            if wanted > has:
                raise OutOfMemory(
                    f"out of memory: the job needs {need.describe()}; this worker has "
                    f"{footprint.size(has)} free ({source}); use a smaller batch or model"
                )
        log.info("job %s: needs %s", job.id, need.describe())

    def _run(self, job: Job, run: _JobRun, source: ForkSource | None = None) -> None:
        from stepstream_service.engine.trainer import NoGPU, train
        from stepstream_service.runtime.gang import ReplicaLost

        try:
            spec = JobSpec.parse(job.spec)
            self._inputs(job, spec, run.workdir)
            self._check_memory(job, spec)
            try:
                if spec.runtime.machines > 1:
                    result = self._lead_gang(job, spec, run, source)
                else:
                    result = train(
                        spec,
                        run.emit,
                        run.should_stop,
                        workdir=run.workdir,
                        paths=self.paths,
                        resume=job.attempts > 1,
                        # The history stored ends at job.step: a checkpoint past it would leave a
                        # hole.
                        resume_upto=job.step,
                        job_id=job.id,
                        handing_back=lambda: self.stopping.is_set() and not run.cancel,
                        start_from=source,
                        final_checkpoint=True,
                        models=self.models,
                    )
            finally:  # whatever was written, however the run ended
                self._keep_tensorboard(job, run.workdir)
            result = run.settled(result)
            if result.outcome == "succeeded" and spec.training.checkpoint_every:
                self._keep_final_state(job, run.workdir)
            if result.outcome == "succeeded" and result.model_path:
                key = f"jobs/{job.id}/model.keras"
                self.artifacts.put(Path(result.model_path), key)
                self._export(job, spec, run, Path(result.model_path))
                result = dataclasses.replace(result, model_path=key)
        except ReplicaLost as exc:
            self._retry(run, exc)
            return
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
            # A framework's message can hold server paths and internals: the log keeps it.
            message = (
                f"the worker failed unexpectedly ({type(exc).__name__}); the operator finds "
                f"the details in the worker's log under job {job.id}"
            )
            self._fail(run, "internal_error", message)
            return
        run.flush()
        if run.lost:
            return
        self._finish(run, result)

    def _lead_gang(
        self, job: Job, spec: JobSpec, run: _JobRun, source: ForkSource | None
    ) -> ResultEvent:
        """Train as the chief (rank 0) of the gang the claim gathered. A member gone (its
        worker started anew, or no longer seen) ends the attempt at once: a rank waiting for a
        peer to join would wait for ever."""
        from stepstream_service.runtime.gang import train_rank, watch_part

        rank = self._rank(job, spec, job.gang or [], 0, run.workdir, source)
        log.info(
            "job %s: leads a gang of %d: %s",
            job.id,
            len(rank.cluster.addresses),
            ", ".join(rank.cluster.addresses),
        )
        members = len(rank.cluster.addresses) - 1
        done = threading.Event()
        gone = watch_part(
            lambda: self.store.gang_intact(job.id, job.attempts, members, self.live_within),
            self.settings.heartbeat_seconds,
            done,
        )
        try:
            return train_rank(
                self.settings,
                rank,
                run.emit,
                run.should_stop,
                lambda: self.stopping.is_set() and not run.cancel,
                lambda: run.lost or gone.is_set(),
            )
        finally:
            done.set()

    def _retry(self, run: _JobRun, exc: TrainerError) -> None:
        """A replica was lost: the whole job goes back to the queue to resume from its last
        checkpoint on a gang gathered anew, or fails once its attempts are used up."""
        job = run.job
        if run.lost:  # the job is no longer this worker's to put back
            return
        if job.attempts >= job.max_attempts:
            self._fail(run, exc.reason, f"{exc}; attempts used up ({job.max_attempts})")
            return
        message = f"{exc}; the job goes back to the queue to resume from its last checkpoint"
        log.warning("job %s: %s", job.id, message)
        run.emit(LogEvent(message, time.time(), level="warning"))
        run.flush()
        # Once a dead member no longer looks alive: the next gang is gathered without it.
        self.stopping.wait(self.live_within)
        with contextlib.suppress(LeaseLost):
            self._finish_when_stored(job.id, JobState.QUEUED)

    def _keep_final_state(self, job: Job, workdir: Path) -> None:
        """The checkpoint of the last step (which no event announced, see train) to the
        artifact store: what a fork of this job starts from, on any machine. Not a reason to
        fail the job: a fork would then start from the checkpoint before it."""
        try:
            push_checkpoint(self.artifacts, workdir, job.id)
        except Exception:
            log.warning("job %s: its final checkpoint not stored", job.id, exc_info=True)

    def _keep_tensorboard(self, job: Job, workdir: Path) -> None:
        """The job's TensorBoard files to the artifact store (a view of the job: never a
        reason to fail it)."""
        try:
            push_folder(self.artifacts, workdir / BOARD_FOLDER, f"jobs/{job.id}/{BOARD_FOLDER}")
        except Exception:
            log.warning("job %s: TensorBoard files not stored", job.id, exc_info=True)

    def _export(self, job: Job, spec: JobSpec, run: _JobRun, model: Path) -> None:
        """The exports the spec asks for, beside model.keras in the store. One that fails is
        said in the job's events; the job has still succeeded, and a download converts again
        (saying why it cannot)."""
        from stepstream_service.engine.export import ARTIFACTS, ExportError, export

        for fmt in spec.export:
            try:
                path = export(model, fmt, run.workdir / ARTIFACTS[fmt])
                self.artifacts.put(path, f"jobs/{job.id}/{ARTIFACTS[fmt]}")
                run.emit(LogEvent(f"exported the model to {fmt}", time.time()))
            except ExportError as exc:
                log.warning("job %s: %s", job.id, exc)
                run.emit(LogEvent(str(exc), time.time(), level="warning"))

    def _finish_when_stored(self, job_id: str, to: JobState, **values: Any) -> None:
        if to.terminal:
            self._count_artifacts(job_id)
        while True:
            try:
                self.store.finish(job_id, self.id, to, **values)
                return
            except STORE_DOWN as exc:
                log.warning("job %s: store unavailable (%s); retrying", job_id, exc)
                if self.stopping.wait(0.5):
                    raise

    def _count_artifacts(self, job_id: str) -> None:
        """What the job leaves in the artifact store counts to its tenant's storage quota."""
        try:
            count_artifacts(self.store, self.artifacts, job_id)
        except Exception:  # never a reason to leave the job unfinished
            log.warning("job %s: its artifacts could not be measured", job_id, exc_info=True)

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
                # A gang hands back when one of its members is shutting down.
                handed = result.stop_reason == "handed_back" and not run.cancel
                self._finish_when_stored(job_id, JobState.QUEUED if handed else JobState.CANCELLED)
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
        job = run.job
        run.flush()
        log.warning("job %s: failed: %s: %s", job.id, reason, message)
        step = job.step
        with contextlib.suppress(*STORE_DOWN, TrainerError):
            step = self.store.get_job(job.id).step  # the progress this attempt wrote
        failure = Failure(reason, message, step or None)
        # Whatever ended the job, its history ends with the result, then the FAILED state.
        run.emit(
            ResultEvent(
                outcome="failed",
                steps=step,
                stop_reason=reason,
                failure=failure,
                duration_seconds=max(0.0, time.time() - (job.started_at or time.time())),
                time=time.time(),
            )
        )
        run.flush()
        with contextlib.suppress(LeaseLost):
            self._finish_when_stored(job.id, JobState.FAILED, failure=failure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stepstream_service.runtime.worker")
    parser.add_argument("--worker-id", default=None)
    parser.add_argument(
        "--parent-pid", type=int, default=None, help="the supervisor: when it dies, stop"
    )
    parser.add_argument(
        "--slot-lock", type=Path, default=None, help="held for life: one worker per device slot"
    )
    args = parser.parse_args(argv)
    settings = Settings()
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    from stepstream_service.runtime.signals import stop_event
    from stepstream_service.runtime.slots import SlotLock, Watchdog, die_with_parent

    who = args.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    # One event for every reason to stop, set even before the worker exists (a signal or a
    # dead supervisor while the framework loads or the slot is awaited).
    stopping = stop_event()
    if args.parent_pid is not None:
        if not die_with_parent(args.parent_pid):
            log.warning("worker %s: its supervisor is gone before it started; exiting", who)
            return 0
        Watchdog(args.parent_pid, stopping, settings.grace_seconds, who).start()
    # Before any device is touched (devices() below takes the GPU's memory on some backends).
    if args.slot_lock is not None and not SlotLock(args.slot_lock, who).acquire(stopping):
        return 0
    from stepstream_service.runtime.threads import configure_tensorflow

    # Before the framework's runtime starts (the import below, then devices()): the pools'
    # sizes cannot change after.
    configure_tensorflow(settings, who)
    # The framework, imported once before any job; the CPU split before its runtime starts.
    from stepstream_service.engine.distribution import split_cpu, visible_devices

    split_cpu(settings.cpu_devices)
    store = Store(settings.store_url)
    wakeups = Wakeups(settings.store_url, (QUEUE_CHANNEL,)).start()
    worker = Worker(settings, store, args.worker_id, wakeups=wakeups, devices=visible_devices())
    worker.stopping = stopping
    worker.run()
    wakeups.stop()
    store.close()
    return WORKER_RETIRED if worker.retired else 0


if __name__ == "__main__":
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is in the store by now, and the framework's own teardown at exit takes
    # seconds while the slot stays locked: a successor waits on it, so it is skipped.
    os._exit(code)
