"""The gRPC servicer: each RPC as store calls between a validated request and a response.

Conversions live in api.convert, the error table in api.errors, the watch fan-out in api.watch.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator

from stepstream.kernel import names
from stepstream.kernel.schema import schema_text
from stepstream.kernel.spec import SpecError, SpecLimits
from stepstream.v1 import trainer_pb2 as pb
from stepstream.v1 import trainer_pb2_grpc
from stepstream_service.api.auth import Auth
from stepstream_service.api.convert import (
    downsample,
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
from stepstream_service.api.watch import (
    MAX_PACE,
    PACE_PER_WATCHER,
    ProtoCache,
    is_terminal,
    next_run,
    until_tick,
)
from stepstream_service.config import Settings
from stepstream_service.runtime.metrics import Metrics
from stepstream_service.runtime.tail import EventTail
from stepstream_service.store import Job, JobFinished, NewJob, Store
from stepstream_service.store.artifacts import ArtifactStore

log = logging.getLogger(__name__)

_UPLOAD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
CHUNK = 1024 * 1024
RESERVED_THREADS = 32  # RPC threads kept for unary calls however many streams are open


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
            spec = spec_of(request.spec_json, self.limits)
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
        if len(request.request_id) > 128 or "\x00" in request.request_id:
            bad.append(("request_id", "at most 128 characters, and no NUL"))
        if request.max_attempts < 0 or request.max_attempts > 100:
            bad.append(("max_attempts", "must be between 0 and 100"))
        if refused is not None:
            if not bad:
                raise refused  # the spec alone is wrong: its own error, every problem listed
            bad = violations(refused) + bad
        if bad:
            raise InvalidArgument.each(bad)
        assert spec is not None
        max_attempts = request.max_attempts or self.settings.max_attempts
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
        if request.page_token:
            try:
                created, job_id = base64.urlsafe_b64decode(request.page_token).decode().split("|")
                if "\x00" in job_id:  # no id has one, and PostgreSQL refuses it in a query
                    raise ValueError(job_id)
                after = (float(created), job_id)
            except ValueError:
                raise InvalidArgument("page_token", "not a token this server gave out") from None
        found = self.store.list_jobs(after=after, limit=size + 1, tenant=tenant, **where)
        token = ""
        if len(found) > size:
            found = found[:size]
            last = found[-1]
            token = base64.urlsafe_b64encode(f"{last.created_at!r}|{last.id}".encode()).decode()
        return pb.ListJobsResponse(jobs=[job_to_proto(j) for j in found], next_page_token=token)

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
        steps, evals, cursor = [], [], 0
        while True:
            rows = self.store.read_events(job_id, cursor, 10000)
            if not rows:
                break
            cursor = rows[-1].seq
            steps.extend(r.payload for r in rows if r.kind == "step")
            evals.extend(r.payload for r in rows if r.kind == "eval")
        keep = downsample(len(steps), request.max_points)
        picked = [steps[i] for i in keep]
        nan = float("nan")
        return pb.JobMetrics(
            steps=[p["step"] for p in picked],
            loss=[p["loss"] for p in picked],
            accuracy=[nan if p["accuracy"] is None else p["accuracy"] for p in picked],
            mae=[nan if p["mae"] is None else p["mae"] for p in picked],
            learning_rate=[p["learning_rate"] for p in picked],
            evals=[
                pb.EvalEvent(step=e["step"], split=e["split"], values=e["values"]) for e in evals
            ],
            total_points=len(steps),
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
