"""The gRPC API: protobuf in, validated spec and store calls, protobuf out.

Protobuf stops here. Domain errors become status codes in one table; anything else is a bug and
reaches the client as INTERNAL.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import inspect
import json
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import sqlalchemy.exc
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from stepstream.kernel import names
from stepstream.kernel.spec import JobSpec, SpecError, SpecLimits
from stepstream.v1 import trainer_pb2 as pb
from stepstream.v1 import trainer_pb2_grpc
from stepstream_service.api.auth import Auth, Unauthenticated
from stepstream_service.config import Settings
from stepstream_service.errors import TrainerError
from stepstream_service.runtime.metrics import Metrics
from stepstream_service.runtime.tail import EventTail
from stepstream_service.store.artifacts import ArtifactStore
from stepstream_service.store.jobs import (
    TERMINAL,
    AlreadyExists,
    EventRow,
    Job,
    JobFinished,
    JobNotFound,
    JobState,
    QueueFull,
    Store,
)

log = logging.getLogger(__name__)


class InvalidArgument(TrainerError):
    reason = "invalid_argument"


class ResourceExhausted(TrainerError):
    reason = "resource_exhausted"


class Unavailable(TrainerError):
    reason = "unavailable"


ERRORS: list[tuple[type[Exception], grpc.StatusCode]] = [
    (SpecError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (JobNotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (JobFinished, grpc.StatusCode.FAILED_PRECONDITION),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (sqlalchemy.exc.OperationalError, grpc.StatusCode.UNAVAILABLE),
    (sqlalchemy.exc.InterfaceError, grpc.StatusCode.UNAVAILABLE),
]


def status_for(exc: Exception) -> grpc.StatusCode:
    for kind, code in ERRORS:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def _handled(method: Callable) -> Callable:
    """Map domain errors to their status; log and report anything else as INTERNAL."""

    @functools.wraps(method)
    def unary(self, request, context):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            # Waited for a thread past its deadline: its caller has given up (and may retry
            # with the same request_id), so doing the work now would only add load.
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed in the queue")
        try:
            return method(self, request, context)
        except Exception as exc:
            _abort(context, exc, method.__name__)

    @functools.wraps(method)
    def streaming(self, request, context):
        try:
            yield from method(self, request, context)
        except Exception as exc:
            _abort(context, exc, method.__name__)

    return streaming if inspect.isgeneratorfunction(method) else unary


def _abort(context: grpc.ServicerContext, exc: Exception, rpc: str) -> None:
    code = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("%s failed", rpc)
        context.abort(code, f"internal error ({type(exc).__name__}); see the server log")
    if code == grpc.StatusCode.UNAVAILABLE and not isinstance(exc, Unavailable):
        context.abort(code, "the job store is unavailable; retry shortly")
    context.abort(code, str(exc))


class _Undecodable:
    """Stands in for a request whose bytes are no message of its type."""


class DecodeGuard(grpc.ServerInterceptor):
    """Bytes that are no valid request: INVALID_ARGUMENT, where grpcio would answer INTERNAL
    from its own decoding before any code of ours runs. On the way out, a response that is
    already bytes is sent as it is: a watchers' message is serialized once, not per watcher."""

    def __init__(self):
        self.guarded: dict[str, grpc.RpcMethodHandler] = {}

    def intercept_service(self, continuation, details):
        # The servicer's handlers never change: each method is wrapped once, not per call
        # (unknown methods are not kept, so made-up names cannot grow the table).
        guarded = self.guarded.get(details.method)
        if guarded is None:
            guarded = self._guard(continuation(details), details.method)
            if guarded is not None:
                self.guarded[details.method] = guarded
        return guarded

    def _guard(self, handler, method: str):
        if handler is None or handler.request_deserializer is None:
            return handler
        decode = handler.request_deserializer
        message = f"the request is not a valid {method.rsplit('/', 1)[-1]} request message"

        def guarded(data: bytes):
            try:
                return decode(data)
            except Exception:
                return _Undecodable()

        def checked(behavior):
            def unary_request(request, context):
                if isinstance(request, _Undecodable):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
                return behavior(request, context)

            return unary_request

        def stream_request(behavior):
            def call(requests, context):
                def each():
                    for request in requests:
                        if isinstance(request, _Undecodable):
                            raise InvalidArgument(message)
                        yield request

                return behavior(each(), context)

            return call

        kinds = {
            (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler, checked),
            (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler, checked),
            (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler, stream_request),
            (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler, stream_request),
        }
        name, make, wrap = kinds[(handler.request_streaming, handler.response_streaming)]
        return make(
            wrap(getattr(handler, name)),
            request_deserializer=guarded,
            response_serializer=_sent_as_is(handler.response_serializer),
        )


def _sent_as_is(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    if serialize is None:
        return None

    def serialized(message: Any) -> bytes:
        return message if isinstance(message, bytes) else serialize(message)

    return serialized


# ---------------------------------------------------------------- conversions


def job_id_of(name: str) -> str:
    job_id = name.removeprefix("jobs/")
    if not re.fullmatch(r"job-[0-9a-f]{1,40}", job_id):
        raise JobNotFound(f"no job {name!r} (names look like jobs/job-1a2b...)")
    return job_id


def _ts(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _error(reason: str | None, message: str | None, step: int | None) -> pb.JobError | None:
    if not reason:
        return None
    return pb.JobError(reason=reason, message=message or "", step=step or 0)


def job_to_proto(job: Job) -> pb.Job:
    spec = struct_pb2.Struct()
    spec.update(job.spec)
    return pb.Job(
        name=f"jobs/{job.id}",
        display_name=job.name,
        state=pb.JobState.Value(job.state.value),
        spec=spec,
        labels=job.labels,
        priority=job.priority,
        create_time=_ts(job.created_at),
        start_time=_ts(job.started_at),
        end_time=_ts(job.finished_at),
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        error=_error(job.error_reason, job.error_message, job.error_step),
        step=job.step,
        total_steps=job.total_steps,
        loss=job.loss or 0.0,
        accuracy=job.accuracy or 0.0,
        test_metrics=job.test_metrics,
        model_available=bool(job.model_path),
        last_seq=job.last_seq,
        request_id=job.request_id or "",
        worker=job.worker or "",
    )


def _payload_error(payload: dict[str, Any]) -> pb.JobError | None:
    error = payload.get("error") or payload.get("failure")
    return _error(error["reason"], error["message"], error.get("step")) if error else None


def event_to_proto(row: EventRow) -> pb.JobEvent:
    p, out = row.payload, pb.JobEvent(seq=row.seq, time=_ts(row.time))
    if row.kind == "step":
        out.step.CopyFrom(
            pb.StepEvent(
                step=p["step"],
                loss=p["loss"],
                accuracy=p.get("accuracy"),
                mae=p.get("mae"),
                learning_rate=p["learning_rate"],
                steps_per_second=p["steps_per_second"],
                examples_per_second=p["examples_per_second"],
            )
        )
    elif row.kind == "eval":
        out.eval.CopyFrom(pb.EvalEvent(step=p["step"], split=p["split"], values=p["values"]))
    elif row.kind == "checkpoint":
        out.checkpoint.CopyFrom(pb.CheckpointEvent(step=p["step"]))
    elif row.kind == "log":
        out.log.CopyFrom(pb.LogEvent(message=p["message"], level=p.get("level", "info")))
    elif row.kind == "state":
        out.state_change.CopyFrom(
            pb.StateChange(
                state=pb.JobState.Value(p["state"]),
                attempt=p.get("attempt", 0),
                error=_payload_error(p),
            )
        )
    elif row.kind == "result":
        out.result.CopyFrom(
            pb.ResultEvent(
                outcome=p["outcome"],
                steps=p["steps"],
                stop_reason=p["stop_reason"],
                test_metrics=p.get("test_metrics") or {},
                final_eval=p.get("final_eval") or {},
                error=_payload_error(p),
                duration_seconds=p.get("duration_s", 0.0),
            )
        )
    return out


def is_terminal(row: EventRow) -> bool:
    return row.kind == "state" and JobState(row.payload["state"]) in TERMINAL


def next_run(rows: list[EventRow], cursor: int) -> tuple[list[EventRow], bool]:
    """(the rows that follow `cursor` without a hole, whether a hole was found: the store
    then fills it). The run ends at a terminal event, always a job's last. Rows arrive in seq
    order, so a run without holes is told by its ends, not row by row: a crowd of watchers
    each does this several times a second, with hundreds of rows."""
    if not rows or rows[-1].seq <= cursor:
        return [], False
    start = cursor + 1 - rows[0].seq
    if start >= 0 and rows[-1].seq - rows[0].seq == len(rows) - 1:
        return rows[start:], False
    run: list[EventRow] = []
    for row in rows:
        if row.seq <= cursor:
            continue
        if row.seq != cursor + 1:  # never expected; the store fills any hole
            return run, True
        run.append(row)
        cursor = row.seq
        if is_terminal(row):
            break
    return run, False


def spec_hash(spec: JobSpec, priority: int, max_attempts: int) -> str:
    body = json.dumps([spec.to_dict(), priority, max_attempts], sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def downsample(n: int, max_points: int) -> list[int]:
    """Indices of at most max_points evenly spread points, always keeping the last."""
    if max_points <= 0 or n <= max_points:
        return list(range(n))
    stride = n / max_points
    picked = sorted({min(int(i * stride), n - 1) for i in range(max_points)} | {n - 1})
    return picked[-max_points:]


_FILTER_TERM = re.compile(r"^(state|name|label\.[A-Za-z0-9_.-]+)=([^\s\x00]+)$")
_UPLOAD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
CHUNK = 1024 * 1024
RESERVED_THREADS = 32  # RPC threads kept for unary calls however many streams are open
# Seconds between one watcher's messages, per watcher of the job: a job's watchers together
# get about 50 messages a second however many they are. Each message costs the server a thread
# wakeup and a send, a few hundred microseconds, and the training pays for them on a busy CPU.
PACE_PER_WATCHER = 0.02
MAX_PACE = 1.0


def until_tick(now: float, pace: float) -> float:
    """Seconds from `now` to the next multiple of `pace`; never negative, whatever the
    rounding of the division."""
    return max(math.ceil(now / pace) * pace - now, 0.0)


def parse_filter(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {"states": [], "labels": {}, "name": None}
    for term in text.replace(" AND ", " ").split():
        match = _FILTER_TERM.match(term)
        if not match:
            raise InvalidArgument(
                f"filter: cannot read {term!r}; use state=RUNNING, name=NAME, label.KEY=VALUE"
            )
        key, value = match.groups()
        if key == "state":
            try:
                out["states"].append(JobState(value.upper()))
            except ValueError:
                valid = ", ".join(s.value for s in JobState)
                raise InvalidArgument(f"filter: unknown state {value!r}; valid: {valid}") from None
        elif key == "name":
            out["name"] = value
        else:
            out["labels"][key.removeprefix("label.")] = value
    return out


# ---------------------------------------------------------------- the service


class ProtoCache:
    """Watchers in step receive the same runs of events: each run becomes one response
    message, built and serialized once however many watchers send it (as bytes, which
    DecodeGuard lets through). Runs that differ (a watcher that has just caught up from the
    store) share the events themselves, each converted once."""

    def __init__(self, size: int = 2_000, events: int = 50_000):
        self.size, self.events_size = size, events
        self.items: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self.events: OrderedDict[int, pb.JobEvent] = OrderedDict()
        self.lock = threading.Lock()

    def response(self, rows: list[EventRow]) -> bytes:
        key = (rows[0].id, rows[-1].id)  # ids are global and consecutive within a job's run
        # Built under the lock: a tick's watchers wake together, and outside it they would all
        # miss and build the same message at once. The GIL runs the builds one at a time anyway.
        with self.lock:
            found = self.items.get(key)
            if found is None:
                batch = pb.EventBatch(events=[self._event(r) for r in rows])
                message = pb.WatchJobResponse(batch=batch).SerializeToString()
                found = self.items[key] = message
                while len(self.items) > self.size:
                    self.items.popitem(last=False)
                while len(self.events) > self.events_size:
                    self.events.popitem(last=False)
            return found

    def _event(self, row: EventRow) -> pb.JobEvent:
        found = self.events.get(row.id)
        if found is None:
            found = self.events[row.id] = event_to_proto(row)
        return found


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
        self.draining = False

    def _check_open(self) -> None:
        if self.draining:
            raise Unavailable("the server is shutting down; submit to another replica or retry")

    @_handled
    def CreateJob(self, request, context):
        self._check_open()
        tenant = self.auth.tenant_of(context)
        try:
            data = json_format.MessageToDict(request.spec)
        except ValueError as exc:  # NaN or Infinity, which JSON (and so a spec) cannot hold
            raise InvalidArgument(f"spec: every number must be finite ({exc})") from None
        spec = JobSpec.parse(data, limits=self.limits)
        if tenant is not None and spec.dataset.name == "npz":
            mine = f"uploads/{tenant}/"
            path = spec.dataset.path or ""
            if not path.startswith(mine) or ".." in path:
                raise InvalidArgument(
                    f"dataset.path: must be one of your uploads ({mine}NAME.npz), "
                    "as UploadDataset returned it"
                )
        if request.priority and not -1000 <= request.priority <= 1000:
            raise InvalidArgument("priority: must be between -1000 and 1000")
        if len(request.request_id) > 128 or "\x00" in request.request_id:
            raise InvalidArgument("request_id: at most 128 characters, and no NUL")
        if request.max_attempts < 0 or request.max_attempts > 100:
            raise InvalidArgument("max_attempts: must be between 0 and 100")
        max_attempts = request.max_attempts or self.settings.max_attempts
        job, created = self.store.create_job(
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
            max_queued=self.settings.max_queued_per_tenant,
        )
        if created:
            self.metrics.submissions.inc()
            log.info("job %s: created (%s)", job.id, spec.name)
        return job_to_proto(job)

    @_handled
    def GetJob(self, request, context):
        tenant = self.auth.tenant_of(context)
        return job_to_proto(self.store.get_job(job_id_of(request.name), tenant))

    @_handled
    def ListJobs(self, request, context):
        tenant = self.auth.tenant_of(context)
        where = parse_filter(request.filter)
        size = request.page_size or 50
        if not 0 < size <= 1000:
            raise InvalidArgument("page_size: must be between 1 and 1000")
        after = None
        if request.page_token:
            try:
                created, job_id = base64.urlsafe_b64decode(request.page_token).decode().split("|")
                if "\x00" in job_id:  # no id has one, and PostgreSQL refuses it in a query
                    raise ValueError(job_id)
                after = (float(created), job_id)
            except ValueError:
                raise InvalidArgument("page_token: not a token this server gave out") from None
        found = self.store.list_jobs(after=after, limit=size + 1, tenant=tenant, **where)
        token = ""
        if len(found) > size:
            found = found[:size]
            last = found[-1]
            token = base64.urlsafe_b64encode(f"{last.created_at!r}|{last.id}".encode()).decode()
        return pb.ListJobsResponse(jobs=[job_to_proto(j) for j in found], next_page_token=token)

    @_handled
    def CancelJob(self, request, context):
        tenant = self.auth.tenant_of(context)  # before the name: a stranger learns nothing
        job = self.store.cancel(job_id_of(request.name), tenant)
        log.info("job %s: cancel requested (%s)", job.id, job.state.value)
        return job_to_proto(job)

    @_handled
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

    @_handled
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

    @_handled
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

    @_handled
    def UploadDataset(self, request_iterator, context):
        self._check_open()
        tenant = self.auth.tenant_of(context)
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "name":
            raise InvalidArgument("name: the first message must carry the dataset's name")
        if not _UPLOAD_NAME.match(first.name):
            raise InvalidArgument("name: use letters, digits, '_', '.', '-' (at most 100)")
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

    @_handled
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
