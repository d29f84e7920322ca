"""The gRPC servicer: each RPC as store calls between a validated request and a response.

Conversions live in api.convert, the error table in api.errors, the watch fan-out in api.watch.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from stepstream.kernel import names
from stepstream.kernel.schema import schema_text
from stepstream.kernel.spec import JobSpec, SpecError, SpecLimits, fork_conflicts
from stepstream.kernel.states import TERMINAL, JobState
from stepstream.v1 import trainer_pb2 as pb
from stepstream.v1 import trainer_pb2_grpc
from stepstream_service.api.auth import Auth
from stepstream_service.api.convert import (
    job_id_of,
    job_to_proto,
    parse_filter,
    spec_hash,
    spec_of,
)
from stepstream_service.api.downloads import Downloads, chunks
from stepstream_service.api.errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    handled,
    violations,
)
from stepstream_service.api.experiments import ExperimentRpcs
from stepstream_service.api.history import history
from stepstream_service.api.watch import (
    MAX_PACE,
    PACE_PER_WATCHER,
    ProtoCache,
    is_terminal,
    next_run,
    until_tick,
)
from stepstream_service.config import Settings
from stepstream_service.engine import config_footprint, footprint, uploads
from stepstream_service.errors import DatasetInvalid, JobTooLarge, TrainerError
from stepstream_service.runtime.metrics import Metrics
from stepstream_service.runtime.tail import EventTail
from stepstream_service.store import Job, JobNotFound, NewJob, Store, WorkerInfo, quota
from stepstream_service.store.artifacts import ArtifactStore
from stepstream_service.store.fairshare import FairShare
from stepstream_service.store.pending import pending

log = logging.getLogger(__name__)

_UPLOAD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_CHECKPOINT_FILE = re.compile(r"^step-(\d+)\.keras$")  # as artifacts.checkpoint_name writes it
CHUNK = 1024 * 1024
RESERVED_THREADS = 32  # RPC threads kept for unary calls however many streams are open
LISTED_UPLOADS = 20  # a path that names no upload is answered with at most this many
LIST_CHUNK = 20  # jobs read from the store at a time while a ListJobs page is built
# Room left in a job's answer for what it gains after it is created: a failure message
# (bounded in kernel.failures), test metrics, the worker's id.
ANSWER_SLACK = 16 * 1024


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(
        self,
        settings: Settings,
        store: Store,
        tail: EventTail,
        metrics: Metrics,
        artifacts: ArtifactStore,
        auth: Auth | None = None,
    ):
        self.settings, self.store, self.tail, self.metrics = settings, store, tail, metrics
        self.artifacts = artifacts
        self.downloads = Downloads(artifacts, settings.export_seconds)
        self.auth = auth or Auth(None)
        s = settings
        self.limits = SpecLimits(s.max_steps, s.max_epochs, s.max_layers, s.max_units)
        self.watching: dict[str | None, int] = {}
        self.watching_lock = threading.Lock()
        self._upload_lock = threading.Lock()
        self._uploading: set[Path] = set()  # resumable uploads with a stream writing them now
        self.protos = ProtoCache()
        self.schema = schema_text()
        self.draining = False
        self.experiments = ExperimentRpcs(self)

    def _check_open(self) -> None:
        if self.draining:
            raise Unavailable("the server is shutting down; submit to another replica or retry")

    @handled
    def CreateJob(self, request, context):
        self._check_open()
        tenant = self.auth.tenant_of(context)
        bad: list[tuple[str, str]] = []
        refused: SpecError | InvalidArgument | None = None
        try:
            spec = spec_of(request.spec_json, self.limits, self.settings.max_spec_bytes)
        except (SpecError, InvalidArgument) as exc:
            spec, refused = None, exc
        if spec is not None:
            bad += [(f"spec.{field}", why) for field, why in self._foreign_paths(spec, tenant)]
        if request.priority and not -1000 <= request.priority <= 1000:
            bad.append(("priority", "must be between -1000 and 1000"))
        if len(request.request_id) > 128 or not request.request_id.isprintable():
            bad.append(("request_id", "at most 128 printable characters (no NUL or newline)"))
        if request.max_attempts < 0 or request.max_attempts > 100:
            bad.append(("max_attempts", "must be between 0 and 100"))
        if refused is not None:
            if not bad:
                raise refused  # the spec alone is wrong: its own error, every problem listed
            bad = violations(refused) + bad
        if bad:
            raise InvalidArgument.each(bad)
        assert spec is not None
        self._check_fork(spec, tenant)
        self._check_dataset(spec, tenant)
        self._check_weights(spec, tenant)
        self._check_storage(tenant)
        max_attempts = request.max_attempts or self.settings.max_attempts
        self._check_fits(spec)
        new = NewJob(
            name=spec.name,
            spec=spec.to_dict(),
            spec_hash=spec_hash(spec, request.priority, max_attempts),
            labels=spec.labels,
            priority=request.priority,
            request_id=request.request_id or None,
            max_attempts=max_attempts,
            total_steps=spec.training.steps or 0,
            needs="gpu" if spec.runtime.device == "gpu" else "any",
            devices=spec.runtime.devices,
            machines=spec.runtime.machines,
            tenant=tenant or "",
        )
        self._check_answer_fits(new)
        job, created = self.store.create_job(new, max_queued=self.settings.max_queued_per_tenant)
        if created:
            self.metrics.submissions.inc()
            log.info("job %s: created (%s)", job.id, spec.name)
        return job_to_proto(job)

    def _check_fork(self, spec: JobSpec, tenant: str | None) -> None:
        """A fork (spec init_from) names a job of its tenant whose checkpoint its model and
        optimizer can start from, past which it trains: INVALID_ARGUMENT naming the field
        otherwise, or FAILED_PRECONDITION while that job has no checkpoint yet."""
        init = spec.init_from
        if init is None:
            return
        try:
            source = self.store.get_job(init.job, tenant)
        except JobNotFound:  # another tenant's job reads the same as one that never was
            raise InvalidArgument("spec.init_from.job", f"{init.job} names no job") from None
        try:
            before = JobSpec.parse(source.spec)
        except SpecError:  # written by another version: the worker finds out what won't fit
            before = None
        problems = fork_conflicts(before, spec, source.id) if before is not None else []
        if problems:
            raise InvalidArgument.each([(f"spec.{p.field}", p.message) for p in problems])
        listed = self.artifacts.files(f"jobs/{source.id}/checkpoints")
        found = (_CHECKPOINT_FILE.match(name) for name in listed)
        steps = sorted(int(match[1]) for match in found if match)
        if not steps:
            yet = "" if source.terminal else " yet"
            raise FailedPrecondition(
                f"spec.init_from.job: {source.id} ({source.state.value}) has no checkpoint"
                f"{yet} to fork from; a job keeps checkpoints when its training.checkpoint_every "
                "is set: every that many steps, and its last step's when it succeeds"
            )
        start = steps[-1] if init.step == "latest" else init.step
        if start not in steps:
            kept = ", ".join(map(str, steps))
            raise InvalidArgument(
                "spec.init_from.step", f"{source.id} keeps checkpoints at steps {kept} only"
            )
        total = spec.training.steps
        if total is not None and total <= start:
            raise InvalidArgument(
                "spec.training.steps",
                f"{total} is not past step {start} of {source.id}, where the fork starts: "
                "it trains from there up to training.steps",
            )

    def _foreign_paths(self, spec: JobSpec, tenant: str | None) -> list[tuple[str, str]]:
        """(field, why) of each dataset path of a tenant's job that is not its own upload."""
        if tenant is None or spec.dataset.name not in names.FILE_DATASETS:
            return []
        mine, bad = f"uploads/{tenant}/", []
        for field in ("path", "validation_path", "test_path"):
            path = getattr(spec.dataset, field)
            if path is not None and (not path.startswith(mine) or ".." in path):
                where = f"must be one of your uploads, {mine}NAME.EXT as uploaded"
                bad.append((f"dataset.{field}", where))
        return bad

    @handled
    def GetJob(self, request, context):
        tenant = self.auth.tenant_of(context)
        job = self.store.get_job(job_id_of(request.name), tenant)
        message = job_to_proto(job)
        if job.state == JobState.QUEUED:
            within = 3 * self.settings.worker_seen_seconds
            waits = pending(self.store, job, FairShare.of(self.settings), within)
            message.queue_position, message.pending_reason = waits.position, waits.reason
        return message

    @handled
    def ListJobs(self, request, context):
        tenant = self.auth.tenant_of(context)
        where = parse_filter(request.filter)
        size = request.page_size or 50
        if not 0 < size <= 1000:
            raise InvalidArgument("page_size", "must be between 1 and 1000")
        after = None
        if len(request.page_token) > 512:
            raise InvalidArgument("page_token", "not a token this server gave out")
        if request.page_token:
            try:
                created, job_id = base64.urlsafe_b64decode(request.page_token).decode().split("|")
                if "\x00" in job_id:  # no id has one, and PostgreSQL refuses it in a query
                    raise ValueError(job_id)
                after = (float(created), job_id)
            except ValueError:
                raise InvalidArgument("page_token", "not a token this server gave out") from None
        page: list[pb.Job] = []
        budget, last, more = self._page_bytes(), None, True
        # A few jobs at a time, each made a message before the next are read: a tenant's
        # largest jobs, listed by many callers at once, never sit in memory a page at a time.
        while more and len(page) < size:
            chunk = min(size - len(page), LIST_CHUNK) + 1
            found = self.store.list_jobs(after=after, limit=chunk, tenant=tenant, **where)
            more = len(found) == chunk
            for job in found[: chunk - 1]:
                message = job_to_proto(job)
                budget -= message.ByteSize()
                if page and budget < 0:
                    break
                page.append(message)
                last = after = (job.created_at, job.id)
            else:
                continue
            more = True  # the page is full by size: what was not sent comes next
            break
        token = ""
        if more and last is not None:
            token = base64.urlsafe_b64encode(f"{last[0]!r}|{last[1]}".encode()).decode()
        return pb.ListJobsResponse(jobs=page, next_page_token=token)

    def _page_bytes(self) -> int:
        """The size a ListJobs answer stops growing at: well under the message limit, so that
        many concurrent listings of the largest jobs keep the server's memory bounded."""
        return max(self.settings.max_message_bytes // 8, 64 * 1024)

    def _check_answer_fits(self, new: NewJob) -> None:
        """A job is created only when every answer about it can be sent: its spec, labels
        and names, plus room for what it gains while running (failure message, metrics)."""
        preview = pb.Job(
            display_name=new.name,
            spec_json=json.dumps(new.spec),
            labels=new.labels,
            request_id=new.request_id or "",
        )
        size, limit = preview.ByteSize() + ANSWER_SLACK, self.settings.max_message_bytes
        if size > limit:
            raise InvalidArgument(
                "spec_json",
                f"the job's answer would be about {size} bytes, over this server's "
                f"limit of {limit} (max_message_bytes)",
            )

    @handled
    def CancelJob(self, request, context):
        tenant = self.auth.tenant_of(context)  # before the name: a stranger learns nothing
        job = self.store.cancel(job_id_of(request.name), tenant)
        log.info("job %s: cancel requested (%s)", job.id, job.state.value)
        return job_to_proto(job)

    @handled
    def WatchJob(self, request, context) -> Iterator[pb.WatchJobResponse | bytes]:
        tenant = self.auth.tenant_of(context)
        job_id = job_id_of(request.name)
        job = self.store.get_job(job_id, tenant)  # another tenant's job is not found
        release = self._take_watcher_slot(tenant)
        # The slot is free the moment the stream ends (deadline, cancel, disconnect), not when
        # this thread next wakes up to notice.
        context.add_callback(release)
        try:
            yield from self._watch(job, request.after_seq, context)
        finally:
            release()

    def _take_watcher_slot(self, tenant: str | None) -> Callable[[], None]:
        limit = self.settings.max_watchers_per_tenant
        # Each stream holds an RPC thread: leave some for everyone's unary calls.
        streams = max(self.settings.rpc_threads - RESERVED_THREADS, 1)
        with self.watching_lock:
            if sum(self.watching.values()) >= streams:
                raise ResourceExhausted(
                    f"this server has {streams} streams open, its most (rpc_threads - "
                    f"{RESERVED_THREADS}); retry shortly or through another replica"
                )
            if self.watching.get(tenant, 0) >= limit:
                raise ResourceExhausted(
                    f"this tenant already has {limit} streams open on this server "
                    "(max_watchers_per_tenant); close some first"
                )
            self.watching[tenant] = self.watching.get(tenant, 0) + 1
        released = threading.Event()

        def release() -> None:
            with self.watching_lock:
                if not released.is_set():
                    released.set()
                    self.watching[tenant] -= 1

        return release

    def _watch(self, job: Job, after_seq: int, context) -> Iterator[pb.WatchJobResponse | bytes]:
        # The snapshot is the job as it was when the call came; the events after `after_seq`
        # tell everything since, state changes included.
        yield pb.WatchJobResponse(snapshot=job_to_proto(job))
        job_id, cursor = job.id, max(after_seq, 0)
        if job.state in TERMINAL and cursor >= job.last_seq:
            return  # the terminal event is the last and the caller has it: nothing will follow
        # Subscribe before reading the store: whatever the read misses, the tail delivers,
        # and seq numbers drop what both deliver. A seeded buffer needs no read at all.
        sub = self.tail.subscribe(job_id, cursor)
        context.add_callback(sub.wake)  # an ended stream's thread stops waiting at once
        try:
            from_store, attaching = not sub.seeded, sub.seeded
            while context.is_active():
                if from_store:
                    rows = self.store.read_events(job_id, cursor, 1000)
                    from_store = len(rows) == 1000
                elif attaching:  # the seed at once, as a store read would be
                    rows, from_store = sub.take(timeout=0)
                    attaching = False
                else:
                    # Many watchers of one job: each gets fewer, larger messages, so the fan-out
                    # costs the machine little; a lone watcher still gets every window at once.
                    # They all wake on the same ticks and end their runs at the tick's cut, so
                    # they send the same runs of events and each message is built once
                    # (ProtoCache).
                    pace = min(PACE_PER_WATCHER * self.tail.watchers(job_id), MAX_PACE)
                    now = time.monotonic()
                    time.sleep(until_tick(now, pace))
                    upto = self.tail.cut(job_id, (pace, math.ceil(now / pace)))
                    rows, from_store = sub.take(timeout=1.0, upto=upto)
                batch, hole = next_run(rows, cursor)
                from_store = from_store or hole
                if batch:
                    cursor = batch[-1].seq
                    yield self.protos.response(batch)
                    if is_terminal(batch[-1]):
                        return
        finally:
            self.tail.unsubscribe(sub)

    @handled
    def GetJobMetrics(self, request, context):
        tenant = self.auth.tenant_of(context)
        job_id = job_id_of(request.name)
        self.store.get_job(job_id, tenant)
        # One value per step: after a resume, the attempt that went on (see api/history.py).
        found = history(self.store, job_id, request.max_points)
        steps, loss, accuracy, mae, rate = list(zip(*found.points, strict=True)) or [()] * 5
        return pb.JobMetrics(
            steps=steps,
            loss=loss,
            accuracy=accuracy,
            mae=mae,
            learning_rate=rate,
            evals=[
                pb.EvalEvent(step=e["step"], split=e["split"], values=e["values"])
                for e in found.evals
            ],
            total_points=found.total,
        )

    @handled
    def DownloadModel(self, request, context):
        tenant = self.auth.tenant_of(context)
        job = self.store.get_job(job_id_of(request.name), tenant)
        key, filename = self.downloads.model(job, request.format)
        size = self.artifacts.size(key)
        with self.artifacts.open(key) as f:
            yield from chunks(f, size, filename)

    @handled
    def DownloadArtifacts(self, request, context):
        tenant = self.auth.tenant_of(context)
        job = self.store.get_job(job_id_of(request.name), tenant)
        f, size, filename = self.downloads.artifacts_tar(job, request.kind)
        with f:
            yield from chunks(f, size, filename)

    @handled
    def UploadDataset(self, request_iterator, context):
        self._check_open()
        tenant = self.auth.tenant_of(context)
        self._check_storage(tenant)
        first = next(request_iterator, None)
        if first is not None and first.WhichOneof("part") == "header":
            return self._resumed_upload(first.header, request_iterator, tenant)
        if first is None or first.WhichOneof("part") != "name":
            raise InvalidArgument("name", "the first message must carry the dataset's name")
        if not _UPLOAD_NAME.match(first.name):
            raise InvalidArgument("name", "use letters, digits, '_', '.', '-' (at most 100)")
        # Each tenant's uploads in a folder of its own; its jobs may read only those.
        prefix = f"uploads/{tenant}" if tenant is not None else "uploads"
        folder = self.settings.data_dir / prefix
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"{first.name}.npz"
        partial = folder / f".{first.name}.{threading.get_ident()}.partial"
        digest, size, limit = hashlib.sha256(), 0, self.settings.max_upload_bytes
        key = f"{prefix}/{final.name}"
        try:
            with partial.open("wb") as out:
                for message in request_iterator:
                    size += len(message.chunk)
                    if size > limit:
                        raise ResourceExhausted(
                            f"upload is larger than the limit of {limit} bytes (max_upload_bytes)"
                        )
                    digest.update(message.chunk)
                    out.write(message.chunk)
            self._check_upload(partial, size)
            partial.replace(final)
            # Workers on other machines fetch it from the artifact store by this key.
            self.artifacts.put(final, key)
        finally:
            partial.unlink(missing_ok=True)
        return pb.Dataset(name=first.name, path=key, size_bytes=size, sha256=digest.hexdigest())

    @handled
    def GetUploadProgress(self, request, context):
        tenant = self.auth.tenant_of(context)
        h = request.header
        final, partial, key = self._upload_files(h, tenant)
        whole = final.is_file() and final.stat().st_size == h.size_bytes
        if whole and self.artifacts.exists(key) and _sha256(final) == h.sha256:
            dataset = pb.Dataset(name=h.name, path=key, size_bytes=h.size_bytes, sha256=h.sha256)
            return pb.UploadProgress(received_bytes=h.size_bytes, dataset=dataset)
        held = partial.stat().st_size if partial.is_file() else 0
        return pb.UploadProgress(received_bytes=min(held, h.size_bytes))

    def _upload_files(self, h, tenant: str | None) -> tuple[Path, Path, str]:
        """(the kept file, the part received so far, the key jobs name it by) of an upload."""
        if not _UPLOAD_NAME.match(h.name):
            raise InvalidArgument("header.name", "use letters, digits, '_', '.', '-' (at most 100)")
        if h.format not in uploads.FORMATS:
            raise InvalidArgument("header.format", f"one of {', '.join(sorted(uploads.FORMATS))}")
        if not re.fullmatch(r"[0-9a-f]{64}", h.sha256):
            raise InvalidArgument("header.sha256", "the file's sha256, 64 lowercase hex digits")
        limit = self.settings.max_upload_bytes
        if h.size_bytes > limit:
            raise ResourceExhausted(
                f"upload is larger than the limit of {limit} bytes (max_upload_bytes)"
            )
        if h.size_bytes <= 0:
            raise InvalidArgument("header.size_bytes", f"the upload is empty; expected {h.format}")
        prefix = f"uploads/{tenant}" if tenant is not None else "uploads"
        folder = self.settings.data_dir / prefix
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"{h.name}{uploads.FORMATS[h.format]}"
        # Kept across broken streams, under what identifies the file: a resume continues it.
        partial = folder / f".{final.name}.{h.sha256[:16]}.{h.size_bytes}.resumable"
        return final, partial, f"{prefix}/{final.name}"

    def _resumed_upload(self, h, request_iterator, tenant: str | None):
        """A resumable upload: chunks appended from h.offset to what is kept of it; checked
        whole (size, sha256, format) once the last byte is in."""
        final, partial, key = self._upload_files(h, tenant)
        with self._upload_lock:
            if partial in self._uploading:
                raise InvalidArgument("header", "this file is being uploaded by another stream")
            self._uploading.add(partial)
        try:
            held = partial.stat().st_size if partial.is_file() else 0
            if h.offset > held or h.offset < 0:
                raise InvalidArgument(
                    "header.offset", f"the server holds {held} bytes of this upload; resume there"
                )
            with partial.open("r+b" if partial.exists() else "wb") as out:
                out.truncate(h.offset)
                out.seek(h.offset)
                size = h.offset
                for message in request_iterator:
                    size += len(message.chunk)
                    if size > h.size_bytes:
                        raise InvalidArgument(
                            "chunk", f"more than header.size_bytes ({h.size_bytes})"
                        )
                    out.write(message.chunk)
            if size < h.size_bytes:
                raise InvalidArgument(
                    "chunk", f"received {size} of {h.size_bytes} bytes; resume from {size}"
                )
            digest = _sha256(partial)
            if digest != h.sha256:
                partial.unlink(missing_ok=True)
                raise InvalidArgument("header.sha256", f"the bytes received hash to {digest}")
            try:
                uploads.check(partial, h.format, self.settings.max_upload_expanded_bytes)
            except DatasetInvalid as exc:
                partial.unlink(missing_ok=True)
                raise InvalidArgument("chunk", f"the upload is refused: {exc}") from None
            partial.replace(final)
            self.artifacts.put(final, key)
            for stale in final.parent.glob(f".{final.name}.*.resumable"):
                stale.unlink(missing_ok=True)  # other versions of this name, never finished
        finally:
            with self._upload_lock:
                self._uploading.discard(partial)
        return pb.Dataset(name=h.name, path=key, size_bytes=h.size_bytes, sha256=h.sha256)

    @handled
    def ListCapabilities(self, request, context):
        self.auth.tenant_of(context)
        aliases = {
            f"{kind}/{alias}": target
            for kind, table in names.ALIASES.items()
            for alias, target in table.items()
        }
        c = names.CANONICAL
        return pb.Capabilities(
            architectures=c["architecture"],
            layers=c["layer"],
            activations=c["activation"],
            losses=c["loss"],
            optimizers=c["optimizer"],
            metrics=c["metric"],
            datasets=c["dataset"],
            schedules=c["schedule"],
            aliases=aliases,
            backbones=c["backbone"],
        )

    @handled
    def GetJobSpecSchema(self, request, context):
        self.auth.tenant_of(context)
        return pb.JobSpecSchema(json_schema=self.schema)

    # Experiments: api.experiments holds them, over the same auth, limits and checks.

    @handled
    def CreateExperiment(self, request, context):
        return self.experiments.create(request, context)

    @handled
    def GetExperiment(self, request, context):
        return self.experiments.get(request, context)

    @handled
    def ListExperiments(self, request, context):
        return self.experiments.list(request, context)

    @handled
    def CancelExperiment(self, request, context):
        return self.experiments.cancel(request, context)

    @handled
    def WatchExperiment(self, request, context) -> Iterator[pb.WatchExperimentResponse]:
        yield from self.experiments.watch(request, context)

    def _check_fits(self, spec: JobSpec) -> None:
        """Refuse a job that no live worker could ever hold: its estimated peak memory
        (engine.footprint, from the spec and an upload's headers) against each worker's
        registered memory; with none registered yet, against max_job_bytes."""
        local = None
        if spec.dataset.name in names.FILE_DATASETS:  # a file read whole is sized by its rows
            local = footprint.local_npz(self.settings.data_dir, spec.dataset.path)
        arrays = None
        if local is not None and spec.dataset.name == "npz":
            with contextlib.suppress(TrainerError):  # a bad file: its job fails saying why
                arrays = footprint.npz_arrays(local)
        config_footprint.check_job(spec, arrays, local)
        need = footprint.estimate(spec, arrays, local)
        hint = "use a smaller batch, model or dataset"
        within = 3 * self.settings.worker_seen_seconds
        workers = [w for w in self.store.live_workers(within) if w.memory_bytes]
        if spec.runtime.device == "gpu":
            workers = [w for w in workers if w.gpus]
        if not workers:
            limit = self.settings.max_job_bytes
            if need.total > limit:
                raise JobTooLarge(
                    f"the job needs {need.describe()}, over this server's limit of "
                    f"{footprint.size(limit)} (max_job_bytes); {hint}"
                )
            return

        def wanted(w: WorkerInfo) -> int:
            # On a GPU the model and its batch live in the device's memory, which it registers.
            return need.model if w.gpus and spec.runtime.device != "cpu" else need.total

        if not any(wanted(w) <= (w.memory_bytes or 0) for w in workers):
            largest = max(workers, key=lambda w: w.memory_bytes or 0)
            raise JobTooLarge(
                f"the job needs {need.describe()}; no worker could ever hold it: the largest "
                f"has {footprint.size(largest.memory_bytes or 0)} (worker memory); {hint}"
            )

    def _check_upload(self, partial: Path, size: int) -> None:
        """An upload is refused at once, nothing kept, unless the npz loader could read it:
        a zip of .npy arrays with its inputs and labels, expanding to at most
        max_upload_expanded_bytes (read from the headers, no array decompressed)."""
        if size == 0:
            expected = footprint.NPZ_EXPECTED
            raise InvalidArgument("chunk", f"the upload is empty; expected {expected}")
        try:
            arrays = footprint.npz_arrays(partial)
            footprint.check_npz(arrays, self.settings.max_upload_expanded_bytes)
        except DatasetInvalid as exc:
            raise InvalidArgument("chunk", f"the upload is refused: {exc}") from None

    def _check_weights(self, spec: JobSpec, tenant: str | None) -> None:
        """A backbone's weights file is one of its tenant's uploads, there now."""
        weights = getattr(spec.model, "weights", "none")
        if weights == "none":
            return
        folder = weights.rpartition("/")[0]
        if folder == quota.uploads_prefix(tenant) and self.artifacts.exists(weights):
            return
        raise InvalidArgument(
            "spec.model.weights",
            f"names none of your uploads; a weights file is one under "
            f"{quota.uploads_prefix(tenant)}/, by the path its upload returned",
        )

    def _check_dataset(self, spec: JobSpec, tenant: str | None) -> None:
        """A file dataset's paths (path, validation_path, test_path) name its tenant's uploads
        (a glob: at least one of them): one that names none is refused here, rather than found
        missing when the job runs. A server without tenants may also read URLs."""
        ds = spec.dataset
        if ds.name not in names.FILE_DATASETS:
            return
        prefix = quota.uploads_prefix(tenant)
        listing: dict[str, int] | None = None
        for field in ("path", "validation_path", "test_path"):
            path = getattr(ds, field) or ("" if field == "path" else None)
            if path is None or (tenant is None and "://" in path):
                continue
            folder, _, file = path.rpartition("/")
            if folder == prefix and file and not file.startswith("."):
                if set("*?[") & set(file):
                    if listing is None:
                        listing = self.artifacts.files(prefix)
                    if any(fnmatch.fnmatchcase(n, file) for n in listing):
                        continue
                elif self.artifacts.exists(path):
                    continue
            if listing is None:
                listing = self.artifacts.files(prefix)
            raise InvalidArgument(f"spec.dataset.{field}", _no_upload(prefix, ds.name, listing))

    def _check_storage(self, tenant: str | None) -> None:
        s = self.settings
        quota.check_quota(self.store, self.artifacts, tenant, s.tenant_storage_bytes, s.data_dir)


def _no_upload(prefix: str, dataset: str, listing: dict[str, int]) -> str:
    """Why a dataset path is refused, listing the tenant's uploads a job of its kind reads."""
    suffixes = _UPLOAD_SUFFIXES.get(dataset, ())
    sent = sorted(
        f"{prefix}/{name}"
        for name in listing
        if name.endswith(suffixes) and not name.startswith(".")
    )
    if sent:
        more = len(sent) - LISTED_UPLOADS
        listed = ", ".join(sent[:LISTED_UPLOADS]) + (f" and {more} more" if more > 0 else "")
        where = f"names none of your uploads ({listed})"
    else:
        where = "names no upload, and there is none yet"
    return (
        f"{where}; send the file with `trainer upload FILE` (UploadDataset) and use the path "
        "it returns"
    )


# The uploads a job of each file dataset reads (a folder of images comes as a .tar).
_UPLOAD_SUFFIXES = {
    "npz": (".npz",),
    "csv": (".csv",),
    "parquet": (".parquet",),
    "tfrecord": (".tfrecord",),
    "image_folder": (".tar",),
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
