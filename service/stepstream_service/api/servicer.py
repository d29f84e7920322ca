"""The gRPC servicer: each RPC as store calls between a validated request and a response.

Conversions live in api.convert, the error table in api.errors, the watch fan-out in api.watch.
"""

from __future__ import annotations

import base64
import contextlib
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
from stepstream.kernel.spec import JobSpec, SpecError, SpecLimits
from stepstream.kernel.states import TERMINAL
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
from stepstream_service.api.errors import (
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    handled,
    violations,
)
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
from stepstream_service.engine import footprint
from stepstream_service.errors import DatasetInvalid, JobTooLarge, TrainerError
from stepstream_service.runtime.metrics import Metrics
from stepstream_service.runtime.tail import EventTail
from stepstream_service.store import Job, JobFinished, NewJob, Store, WorkerInfo, quota
from stepstream_service.store.artifacts import ArtifactStore

log = logging.getLogger(__name__)

_UPLOAD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
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
        self.auth = auth or Auth(None)
        s = settings
        self.limits = SpecLimits(s.max_steps, s.max_epochs, s.max_layers, s.max_units)
        self.watching: dict[str | None, int] = {}
        self.watching_lock = threading.Lock()
        self.protos = ProtoCache()
        self.schema = schema_text()
        self.draining = False

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
        if spec is not None and tenant is not None and spec.dataset.name == "npz":
            mine = f"uploads/{tenant}/"
            path = spec.dataset.path or ""
            if not path.startswith(mine) or ".." in path:
                where = f"must be one of your uploads, {mine}NAME.npz as UploadDataset named it"
                bad.append(("spec.dataset.path", where))
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
        self._check_dataset(spec, tenant)
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
            tenant=tenant or "",
        )
        self._check_answer_fits(new)
        job, created = self.store.create_job(new, max_queued=self.settings.max_queued_per_tenant)
        if created:
            self.metrics.submissions.inc()
            log.info("job %s: created (%s)", job.id, spec.name)
        return job_to_proto(job)

    @handled
    def GetJob(self, request, context):
        tenant = self.auth.tenant_of(context)
        return job_to_proto(self.store.get_job(job_id_of(request.name), tenant))

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
        key = job.model_path
        if not key or not self.artifacts.exists(key):
            raise JobFinished(
                f"job {job.id} has no model to download (state {job.state.value}); "
                "a model exists once the job has SUCCEEDED"
            )
        size = self.artifacts.size(key)
        with self.artifacts.open(key) as f:
            offset = 0
            while chunk := f.read(CHUNK):
                yield pb.DataChunk(
                    data=chunk, offset=offset, total_size=size, filename=f"{job.name}.keras"
                )
                offset += len(chunk)

    @handled
    def UploadDataset(self, request_iterator, context):
        self._check_open()
        tenant = self.auth.tenant_of(context)
        self._check_storage(tenant)
        first = next(request_iterator, None)
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
        )

    @handled
    def GetJobSpecSchema(self, request, context):
        self.auth.tenant_of(context)
        return pb.JobSpecSchema(json_schema=self.schema)

    def _check_fits(self, spec: JobSpec) -> None:
        """Refuse a job that no live worker could ever hold: its estimated peak memory
        (engine.footprint, from the spec and an upload's headers) against each worker's
        registered memory; with none registered yet, against max_job_bytes."""
        local = None
        if spec.dataset.name == "npz":
            local = footprint.local_npz(self.settings.data_dir, spec.dataset.path)
        arrays = None
        if local is not None:
            with contextlib.suppress(TrainerError):  # a bad file: its job fails saying why
                arrays = footprint.npz_arrays(local)
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

    def _check_dataset(self, spec: JobSpec, tenant: str | None) -> None:
        """An npz job reads one of its tenant's uploads: a path that names none is refused
        here, rather than found missing when the job runs."""
        if spec.dataset.name != "npz":
            return
        prefix = quota.uploads_prefix(tenant)
        path = spec.dataset.path or ""
        folder, _, file = path.rpartition("/")
        named = folder == prefix and _UPLOAD_NAME.match(file.removesuffix(".npz"))
        if named and file.endswith(".npz") and self.artifacts.exists(path):
            return
        sent = sorted(
            f"{prefix}/{name}"
            for name in self.artifacts.files(prefix)
            if name.endswith(".npz") and not name.startswith(".")
        )
        if sent:
            more = len(sent) - LISTED_UPLOADS
            listed = ", ".join(sent[:LISTED_UPLOADS]) + (f" and {more} more" if more > 0 else "")
            where = f"names none of your uploads ({listed})"
        else:
            where = "names no upload, and there is none yet"
        raise InvalidArgument(
            "spec.dataset.path",
            f"{where}; send the file with UploadDataset (TrainingClient.upload_dataset(NAME, "
            "FILE)) and use the path it returns",
        )

    def _check_storage(self, tenant: str | None) -> None:
        quota.check_quota(self.store, self.artifacts, tenant, self.settings.tenant_storage_bytes)
