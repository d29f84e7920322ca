"""The client's side of the API with no I/O in it: what to send, what the answers mean, and when
to try again. `TrainingClient` and `AsyncTrainingClient` are shells that run it.

Each operation is a *program*: a generator that yields what it needs done and is sent the
result back (or has the call's `grpc.RpcError` thrown in):

    Call(method, request, timeout)   a unary (or client-streaming) call; the reply comes back
    Open(method, request, timeout)   a server stream; the call object comes back
    Next(stream)                     its next message, or END
    Sleep(seconds)                   a pause before trying again
    Emit(value)                      a value for whoever iterates the operation (stream, jobs)

The sync shell performs these with blocking calls and `time.sleep`, the asyncio one with
awaits; `Run` steps a program for either. So requests, decoding, the retry policy, resuming a
stream from its cursor and riding a stream to wait for a job exist once, here, and so do the
methods whose signature and body are the same in both shells (`ClientSurface`, `JobHandle`).
"""

from __future__ import annotations

import json
import tarfile
import time
import uuid
from collections.abc import Awaitable, Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

import grpc

from stepstream import uploads
from stepstream.kernel.events import EvalEvent, Event, StateEvent
from stepstream.kernel.failures import Failure
from stepstream.kernel.spec import JobSpec, load_spec
from stepstream.kernel.states import JobState
from stepstream.kernel.wire import events_of, failure_from_proto, seconds, state_from_proto
from stepstream.v1 import trainer_pb2 as pb

T = TypeVar("T")
Submitted = TypeVar("Submitted")  # a Job, or an awaitable AsyncJob
Listing = TypeVar("Listing")  # an Iterator[JobInfo], or an AsyncIterator

# ---------------------------------------------------------------- what a program asks for


@dataclass(frozen=True)
class Call:
    """A call whose reply is one message; `timeout` None means no deadline."""

    method: str
    request: Any
    timeout: float | None

    def invoke(self, stub: Any, metadata: list[tuple[str, str]]) -> Any:
        """The stub's call: a reply (sync), an awaitable (asyncio), or a stream's call object."""
        return getattr(stub, self.method)(self.request, timeout=self.timeout, metadata=metadata)


class Open(Call):
    """A server-streaming call: the shell answers with the call object, read with `Next`."""


@dataclass(frozen=True)
class Next:
    stream: Any


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Emit:
    value: Any


Op = Call | Next | Sleep | Emit
Program = Generator[Op, Any, T]


class _End:
    def __repr__(self) -> str:
        return "END"


END = _End()  # what Next answers once a stream is exhausted


class Run(Generic[T]):
    """One program under way. Iterate it for the operations it asks for and answer each with
    `reply` or `fail` (`settle` and `settle_async` do either); `result` is what it returned.
    `close` stops it early, runs its cleanup and cancels every stream it opened. `explain`
    may add to a failed call's error what the connection likely got wrong."""

    def __init__(
        self,
        program: Program[T],
        explain: Callable[[grpc.RpcError], grpc.RpcError] | None = None,
    ):
        self._program = program
        self._explain = explain or (lambda error: error)
        self._op: Op | None = None
        self._reply: Any = None
        self._error: BaseException | None = None
        self._calls: list[Any] = []
        self.result: T | None = None

    def __iter__(self) -> Run[T]:
        return self

    def __next__(self) -> Op:
        reply, error = self._reply, self._error
        self._reply = self._error = None
        try:
            if error is not None:
                self._op = self._program.throw(error)
            else:
                self._op = self._program.send(reply)
        except StopIteration as done:
            self.result = done.value
            raise StopIteration from None
        return self._op

    def reply(self, value: Any) -> None:
        if isinstance(self._op, Open):
            self._calls.append(value)
        self._reply = value

    def fail(self, error: BaseException) -> None:
        self._error = error

    def settle(self, perform: Callable[[Op], Any], op: Op) -> None:
        try:
            self.reply(perform(op))
        except grpc.RpcError as exc:
            self.fail(self._explain(exc))

    async def settle_async(self, pending: Awaitable[Any]) -> None:
        try:
            self.reply(await pending)
        except grpc.RpcError as exc:
            self.fail(self._explain(exc))

    def close(self) -> None:
        self._program.close()
        for call in self._calls:
            call.cancel()
        self._calls.clear()


# ---------------------------------------------------------------- requests and answers


@dataclass(frozen=True)
class JobInfo:
    name: str
    id: str
    display_name: str
    state: JobState
    step: int
    total_steps: int
    loss: float
    accuracy: float | None  # classification jobs
    mae: float | None  # regression jobs
    attempts: int
    max_attempts: int
    priority: int
    labels: dict[str, str]
    test_metrics: dict[str, float]
    model_available: bool
    failure: Failure | None
    create_time: float | None
    start_time: float | None
    end_time: float | None
    last_seq: int
    worker: str = ""
    spec: dict[str, Any] = field(repr=False, default_factory=dict)
    # While QUEUED, from GetJob (0 and "" otherwise): its place in the queue and why it waits.
    queue_position: int = 0
    pending_reason: str = ""

    @property
    def terminal(self) -> bool:
        return self.state.terminal

    @classmethod
    def from_proto(cls, job: pb.Job) -> JobInfo:
        def ts(field_name: str) -> float | None:
            return seconds(getattr(job, field_name)) if job.HasField(field_name) else None

        def optional(field_name: str) -> float | None:
            return getattr(job, field_name) if job.HasField(field_name) else None

        return cls(
            name=job.name,
            id=job.name.removeprefix("jobs/"),
            display_name=job.display_name,
            state=state_from_proto(job.state),
            step=job.step,
            total_steps=job.total_steps,
            loss=job.loss,
            accuracy=optional("accuracy"),
            mae=optional("mae"),
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            priority=job.priority,
            labels=dict(job.labels),
            test_metrics=dict(job.test_metrics),
            model_available=job.model_available,
            failure=failure_from_proto(job),
            create_time=ts("create_time"),
            start_time=ts("start_time"),
            end_time=ts("end_time"),
            last_seq=job.last_seq,
            worker=job.worker,
            spec=json.loads(job.spec_json) if job.spec_json else {},
            queue_position=job.queue_position,
            pending_reason=job.pending_reason,
        )


@dataclass(frozen=True)
class Metrics:
    """A job's per-step history as columns, plus its evaluations."""

    steps: list[int]
    loss: list[float]
    accuracy: list[float]
    mae: list[float]
    learning_rate: list[float]
    evals: list[EvalEvent]
    total_points: int


def metrics_from_proto(m: pb.JobMetrics) -> Metrics:
    evals = [EvalEvent(e.step, e.split, dict(e.values), 0.0) for e in m.evals]  # type: ignore[arg-type]
    return Metrics(
        list(m.steps),
        list(m.loss),
        list(m.accuracy),
        list(m.mae),
        list(m.learning_rate),
        evals,
        m.total_points,
    )


CAPABILITY_KINDS = (
    "architectures",
    "layers",
    "activations",
    "losses",
    "optimizers",
    "metrics",
    "datasets",
    "schedules",
    "backbones",
)


def capabilities_from_proto(c: pb.Capabilities) -> dict[str, Any]:
    """Every valid name of each kind, and "aliases": alias -> canonical name."""
    return {k: list(getattr(c, k)) for k in CAPABILITY_KINDS} | {"aliases": dict(c.aliases)}


def job_name(name: str) -> str:
    """ "jobs/job-…" from either that or the bare id."""
    return name if name.startswith("jobs/") else f"jobs/{name}"


def spec_request(
    spec: JobSpec | Mapping[str, Any] | str | Path,
    request_id: str | None,
    priority: int,
    max_attempts: int,
) -> pb.CreateJobRequest:
    """Validate `spec` here (a JobSpec, dict, or YAML/JSON path) and build its request."""
    return pb.CreateJobRequest(
        spec_json=json.dumps(load_spec(spec).to_dict()),
        request_id=request_id or uuid.uuid4().hex,
        priority=priority,
        max_attempts=max_attempts,
    )


def list_filter(
    state: str | None = None, labels: Mapping[str, str] | None = None, name: str | None = None
) -> str:
    """ListJobs' filter, terms all of which must hold: "state=RUNNING label.team=vision"."""
    terms = [f"state={state}"] if state else []
    terms += [f"label.{k}={v}" for k, v in (labels or {}).items()]
    terms += [f"name={name}"] if name else []
    return " ".join(terms)


def dataset_parts(
    name: str, path: str | Path, chunk_size: int
) -> Iterator[pb.UploadDatasetRequest]:
    """UploadDataset's request stream: the name, then the file in chunks."""
    yield pb.UploadDatasetRequest(name=name)
    with Path(path).open("rb") as f:
        while chunk := f.read(chunk_size):
            yield pb.UploadDatasetRequest(chunk=chunk)


class ModelFile:
    """Where a downloaded model goes: `path`, or `path/<the server's file name>` when `path` is a
    folder. It is written to a .partial file beside it first, so a download that breaks off
    leaves nothing behind."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.target: Path | None = None
        self._partial: Path | None = None
        self._out: IO[bytes] | None = None

    def write(self, filename: str, data: bytes) -> None:
        if self._out is None:
            self.target = self.path / filename if self.path.is_dir() else self.path
            self._partial = self.target.with_name(self.target.name + ".partial")
            self._out = self._partial.open("wb")
        self._out.write(data)

    def keep(self, job: str) -> Path:
        if self._out is None or self._partial is None or self.target is None:
            raise RuntimeError(f"{job}: the server sent an empty model")
        self._out.close()
        self._partial.replace(self.target)
        return self.target

    def discard(self) -> None:
        """Remove what an unfinished download wrote (after `keep`, there is nothing)."""
        if self._out is not None:
            self._out.close()
        if self._partial is not None:
            self._partial.unlink(missing_ok=True)


class Unpacked(ModelFile):
    """A tar the server sends (a SavedModel, a TensorBoard folder), unpacked into `path`: a
    folder made for it, or, when `path` is a folder that already holds something, a new folder
    in it named after the file. Only plain files and folders inside the target are unpacked."""

    def write(self, filename: str, data: bytes) -> None:
        if self._out is None:
            stem = filename.removesuffix(".tar") or "download"
            busy = self.path.is_dir() and any(self.path.iterdir())
            self.target = self.path / stem if busy else self.path
            self._partial = self.target.with_name(self.target.name + ".partial.tar")
            self._partial.parent.mkdir(parents=True, exist_ok=True)
            self._out = self._partial.open("wb")
        self._out.write(data)

    def keep(self, job: str) -> Path:
        if self._out is None or self._partial is None or self.target is None:
            raise RuntimeError(f"{job}: the server sent nothing")
        self._out.close()
        with tarfile.open(self._partial) as tar:
            members = tar.getmembers()
            for member in members:
                parts = Path(member.name).parts
                unsafe = Path(member.name).is_absolute() or ".." in parts
                if unsafe or not (member.isfile() or member.isdir()):
                    raise RuntimeError(f"{job}: the server sent an unsafe entry {member.name!r}")
            self.target.mkdir(parents=True, exist_ok=True)
            # Python's own check too, where it has one (3.12, and backported to 3.10.12).
            checked = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            for member in members:
                member.mode = 0o755 if member.isdir() else 0o644
                tar.extract(member, self.target, **checked)
        self._partial.unlink()
        self._partial = None
        return self.target


# ---------------------------------------------------------------- when to try again

# Codes worth trying again on: the server restarting, draining, or a network blip.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def code_of(error: BaseException) -> grpc.StatusCode | None:
    code = getattr(error, "code", None)
    return code() if callable(code) else None


@dataclass(frozen=True)
class RetryPolicy:
    """Which failures each operation outlasts, and how long it pauses before trying again.

    submit: CreateJob is idempotent by its request_id, so a call that found the server
        unavailable or ran out of time is repeated with the same id, `submit_retries` times,
        `first_backoff` seconds apart at first and twice as long each time.
    stream: a dropped stream is resumed from its cursor every `stream_pause` seconds, for as
        long as `retry_seconds` of the caller's choosing after the last message.
    wait: rides out anything RETRYABLE until its own deadline; when the server has no stream to
        spare (RESOURCE_EXHAUSTED) it asks GetJob every `poll_pause` seconds instead.
    """

    submit_retries: int = 3
    first_backoff: float = 0.5
    stream_pause: float = 0.5
    poll_pause: float = 1.0

    def submit_delay(self, code: grpc.StatusCode | None, attempt: int) -> float | None:
        """The pause before retry number `attempt + 1`, or None to give up."""
        if code not in RETRYABLE or attempt >= self.submit_retries:
            return None
        return self.first_backoff * 2**attempt

    def stream_delay(
        self, code: grpc.StatusCode | None, down_for: float, retry_seconds: float
    ) -> float | None:
        """The pause before resuming a stream that has been down `down_for` seconds, or None."""
        if code not in RETRYABLE or down_for > retry_seconds:
            return None
        return self.stream_pause

    def wait_delay(self, code: grpc.StatusCode | None) -> float | None:
        """The pause before wait() tries again after an error with `code`, or None to raise."""
        if code in RETRYABLE:
            return self.stream_pause
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return self.poll_pause
        return None


POLICY = RetryPolicy()


@dataclass
class StreamCursor:
    """Where a watch of a job stands: the seq of the last event received (resuming asks for
    what comes after it, so there are no gaps and no repeats), and since when the stream has
    been down, if it is."""

    seq: int = 0
    down_since: float | None = None

    def request(self, name: str) -> pb.WatchJobRequest:
        return pb.WatchJobRequest(name=name, after_seq=self.seq)

    def take(self, response: pb.WatchJobResponse) -> list[Event]:
        """The events of a message received; the stream is up again."""
        self.down_since = None
        events = events_of(response)
        if events:
            self.seq = events[-1].seq
        return events

    def down_for(self, now: float) -> float:
        """Seconds since the stream went down, counting from `now` if it just did."""
        if self.down_since is None:
            self.down_since = now
        return now - self.down_since


def ends_job(event: Event) -> bool:
    return isinstance(event, StateEvent) and event.terminal


# ---------------------------------------------------------------- the operations


@dataclass(frozen=True)
class Operations:
    """Every operation of the service as a program; `timeout` bounds each unary call."""

    timeout: float = 30.0
    policy: RetryPolicy = POLICY

    def _unary(self, method: str, request: Any) -> Program[Any]:
        return (yield Call(method, request, self.timeout))

    def get(self, name: str) -> Program[JobInfo]:
        return JobInfo.from_proto((yield from self._unary("GetJob", pb.GetJobRequest(name=name))))

    def cancel(self, name: str) -> Program[JobInfo]:
        request = pb.CancelJobRequest(name=name)
        return JobInfo.from_proto((yield from self._unary("CancelJob", request)))

    def metrics(self, name: str, max_points: int = 0) -> Program[Metrics]:
        request = pb.GetJobMetricsRequest(name=name, max_points=max_points)
        return metrics_from_proto((yield from self._unary("GetJobMetrics", request)))

    def capabilities(self) -> Program[dict[str, Any]]:
        request = pb.ListCapabilitiesRequest()
        return capabilities_from_proto((yield from self._unary("ListCapabilities", request)))

    def submit(self, request: pb.CreateJobRequest) -> Program[str]:
        """The new job's name. Every attempt sends the same request, so the same request_id."""
        attempt = 0
        while True:
            try:
                return (yield from self._unary("CreateJob", request)).name
            except grpc.RpcError as exc:
                delay = self.policy.submit_delay(code_of(exc), attempt)
                if delay is None:
                    raise
            attempt += 1
            yield Sleep(delay)

    def jobs(self, filter: str = "", page_size: int = 50) -> Program[None]:
        """Emits every job that matches, newest first, across pages."""
        token = ""
        while True:
            request = pb.ListJobsRequest(filter=filter, page_size=page_size, page_token=token)
            page = yield from self._unary("ListJobs", request)
            for job in page.jobs:
                yield Emit(JobInfo.from_proto(job))
            token = page.next_page_token
            if not token:
                return

    def upload_dataset(self, name: str, path: str | Path, chunk_size: int) -> Program[str]:
        """The path the server keeps the upload at; no deadline, an upload takes what it takes."""
        reply = yield Call("UploadDataset", dataset_parts(name, path, chunk_size), None)
        return reply.path

    def upload(
        self,
        path: str | Path,
        name: str | None,
        chunk_size: int,
        progress: Callable[[int, int], None] | None = None,
    ) -> Program[Any]:
        """A file or folder uploaded, resuming from what the server already holds of it;
        the Dataset answer. `progress(done, total)` is told the bytes held first, then each
        chunk's."""
        file, fmt = uploads.prepared(path)
        h = uploads.header(file, fmt, name or uploads.default_name(path))
        held = yield Call("GetUploadProgress", pb.GetUploadProgressRequest(header=h), None)
        done = [held.received_bytes]
        if progress is not None:
            progress(done[0], h.size_bytes)
        if held.HasField("dataset"):
            return held.dataset
        h.offset = held.received_bytes

        def sent(n: int) -> None:
            done[0] += n
            if progress is not None:
                progress(done[0], h.size_bytes)

        return (yield Call("UploadDataset", uploads.parts(h, file, chunk_size, sent), None))

    def download_model(self, name: str, path: str | Path, format: str = "keras") -> Program[Path]:
        """The model, as .keras or exported; a SavedModel (a tar) is unpacked into a folder."""
        request = pb.DownloadModelRequest(name=name, format=format)
        stream = yield Open("DownloadModel", request, None)
        out = Unpacked(path) if format == "saved_model" else ModelFile(path)
        try:
            while (chunk := (yield Next(stream))) is not END:
                out.write(chunk.filename, chunk.data)
            return out.keep(name)
        finally:
            out.discard()

    def download_artifacts(
        self, name: str, path: str | Path, kind: str = "tensorboard"
    ) -> Program[Path]:
        """Files the job wrote besides its model (kind "tensorboard": its TensorBoard event
        files), unpacked into the folder `path`."""
        request = pb.DownloadArtifactsRequest(name=name, kind=kind)
        stream = yield Open("DownloadArtifacts", request, None)
        out = Unpacked(path)
        try:
            while (chunk := (yield Next(stream))) is not END:
                out.write(chunk.filename, chunk.data)
            return out.keep(name)
        finally:
            out.discard()

    def watch(self, name: str, after_seq: int = 0, retry_seconds: float = 60.0) -> Program[None]:
        """Emits every event after `after_seq`, live, up to the terminal state change. A dropped
        stream is resumed from the cursor for `retry_seconds` after its last message."""
        cursor = StreamCursor(after_seq)
        while True:
            try:
                stream = yield Open("WatchJob", cursor.request(name), None)
                while (response := (yield Next(stream))) is not END:
                    for event in cursor.take(response):
                        yield Emit(event)
                        if ends_job(event):
                            return
                return  # the server closed the stream after the terminal event
            except grpc.RpcError as exc:
                down_for = cursor.down_for(time.monotonic())
                delay = self.policy.stream_delay(code_of(exc), down_for, retry_seconds)
                if delay is None:
                    raise
            yield Sleep(delay)

    def wait(self, name: str, timeout: float | None = None) -> Program[JobInfo]:
        """The job's final state, once it has one. TimeoutError after `timeout` seconds."""
        return (yield from _Waiter(self, name, timeout).run())


# A unary call made while waiting gets at least this long, even with the deadline at hand.
MIN_CALL_SECONDS = 0.1


class _Waiter:
    """wait() rides the job's WatchJob stream from the seq GetJob reports (so no history is
    replayed) until the stream says the job ended, then asks GetJob once for the final job:
    two GetJob calls for a job of any length. A dropped stream is resumed from its cursor."""

    def __init__(self, ops: Operations, name: str, timeout: float | None):
        self.ops, self.name, self.timeout = ops, name, timeout
        self.end = None if timeout is None else time.monotonic() + timeout
        self.state: str = "unknown"  # the last one seen, for the TimeoutError
        self.cursor: StreamCursor | None = None  # None: GetJob is to say where to start

    def run(self) -> Program[JobInfo]:
        while True:
            try:
                if self.cursor is None:
                    request = pb.GetJobRequest(name=self.name)
                    info = JobInfo.from_proto((yield Call("GetJob", request, self._limit())))
                    self.state = info.state
                    if info.terminal:
                        return info
                    self.cursor = StreamCursor(info.last_seq)
                yield from self._ride(self.cursor)
                self.cursor = None  # the stream says it ended: GetJob has the final word
                continue
            except grpc.RpcError as exc:
                code = code_of(exc)
                delay = self.ops.policy.wait_delay(code)
                if delay is None:
                    raise
                left = self._left()
                if left == 0:
                    raise self._timed_out() from exc
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self.cursor = None  # no stream to be had: poll GetJob meanwhile
            yield Sleep(delay if left is None else min(delay, left))

    def _ride(self, cursor: StreamCursor) -> Program[None]:
        """Return once the stream shows the job ended (its snapshot or a state change) or the
        server closes it."""
        left = self._left()
        if left == 0:
            raise self._timed_out()
        stream = yield Open("WatchJob", cursor.request(self.name), left)
        while (response := (yield Next(stream))) is not END:
            if response.HasField("snapshot"):
                self.state = state_from_proto(response.snapshot.state)
                if self.state.terminal:
                    return
            for event in cursor.take(response):
                if isinstance(event, StateEvent):
                    self.state = event.state
                if ends_job(event):
                    return

    def _left(self) -> float | None:
        return None if self.end is None else max(self.end - time.monotonic(), 0.0)

    def _limit(self) -> float:
        """A unary call's deadline: the client's, or what is left of the wait's if sooner."""
        left = self._left()
        if left is None:
            return self.ops.timeout
        return min(self.ops.timeout, max(left, MIN_CALL_SECONDS))

    def _timed_out(self) -> TimeoutError:
        return TimeoutError(f"{self.name} still {self.state} after {self.timeout} s")


# ---------------------------------------------------------------- what both shells share


class JobHandle:
    """A handle on one job of the service, for either client."""

    def __init__(self, client: Any, name: str):
        self.client = client
        self.name = job_name(name)
        self.id = self.name.removeprefix("jobs/")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    @property
    def _ops(self) -> Operations:
        return self.client._ops


class ClientSurface(Generic[Submitted, Listing]):
    """The client methods that read the same in both shells: each builds a program and returns
    what the shell makes of it. The shells add `_submit` and `_iterate`."""

    timeout: float

    @property
    def _ops(self) -> Operations:
        return Operations(self.timeout)

    def _submit(self, request: pb.CreateJobRequest) -> Submitted:
        raise NotImplementedError

    def _iterate(self, program: Program[None]) -> Any:
        raise NotImplementedError

    def submit(
        self,
        spec: JobSpec | Mapping[str, Any] | str | Path,
        *,
        request_id: str | None = None,
        priority: int = 0,
        max_attempts: int = 0,
    ) -> Submitted:
        """Validate `spec` here (a JobSpec, dict, or YAML/JSON path), then create the job.
        Retrying with the same request_id never creates a second job, so a call that timed
        out or found the server unavailable is retried a few times with the same id."""
        return self._submit(spec_request(spec, request_id, priority, max_attempts))

    def jobs(
        self,
        *,
        state: str | None = None,
        labels: Mapping[str, str] | None = None,
        name: str | None = None,
        page_size: int = 50,
    ) -> Listing:
        """Newest first, across pages; only those in `state`, with all of `labels`, named `name`."""
        return self._iterate(self._ops.jobs(list_filter(state, labels, name), page_size))
