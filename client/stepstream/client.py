"""The Python client: submit jobs, stream their steps, wait, cancel, download models.

client = TrainingClient("localhost:50051")
job = client.submit("examples/mnist_mlp.yaml")
for event in job.stream():
    if event.kind == "step":
        print(event.step, event.loss, event.accuracy)
job.download_model("model.keras")
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from stepstream.connection import Credentials
from stepstream.kernel.events import EvalEvent, Event, StateEvent
from stepstream.kernel.failures import Failure
from stepstream.kernel.spec import JobSpec, load_spec
from stepstream.kernel.states import JobState
from stepstream.kernel.wire import events_of, failure_from_proto, seconds, state_from_proto
from stepstream.v1 import trainer_pb2 as pb
from stepstream.v1 import trainer_pb2_grpc

DEFAULT_ADDRESS = "localhost:50051"
SUBMIT_RETRIES = 3
# Codes worth retrying a stream on: the server restarting or a network blip.
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


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


class Job:
    """A handle on one job of the service."""

    def __init__(self, client: TrainingClient, name: str):
        self.client = client
        self.name = job_name(name)
        self.id = self.name.removeprefix("jobs/")

    def __repr__(self) -> str:
        return f"Job({self.name!r})"

    def info(self) -> JobInfo:
        return JobInfo.from_proto(self.client._call("GetJob", pb.GetJobRequest(name=self.name)))

    @property
    def state(self) -> str:
        return self.info().state

    def stream(self, after_seq: int = 0, *, retry_seconds: float = 60.0) -> Iterator[Event]:
        """Every event after `after_seq`, live, ending after the terminal state change. A dropped
        connection is resumed from the last seq seen, so there are no gaps and no repeats."""
        cursor, deadline = after_seq, None
        while True:
            try:
                responses = self.client._stub.WatchJob(
                    pb.WatchJobRequest(name=self.name, after_seq=cursor),
                    metadata=self.client._metadata,
                )
                for response in responses:
                    deadline = None
                    for event in events_of(response):
                        cursor = event.seq
                        yield event
                        if isinstance(event, StateEvent) and event.terminal:
                            return
                return  # the server closed the stream after the terminal event
            except grpc.RpcError as exc:
                if exc.code() not in _RETRYABLE:
                    raise
                deadline = deadline or time.monotonic() + retry_seconds
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def wait(self, timeout: float | None = None) -> JobInfo:
        """Block until the job ends; return its final state. TimeoutError after `timeout`.
        A server or database that is briefly unavailable is waited out like the job."""
        end = None if timeout is None else time.monotonic() + timeout
        state = "unknown"
        while True:
            try:
                info = self.info()
                if info.terminal:
                    return info
                state = info.state
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
            if end is not None and time.monotonic() >= end:
                raise TimeoutError(f"{self.name} still {state} after {timeout} s")
            time.sleep(0.1 if end is None else min(0.1, max(end - time.monotonic(), 0.01)))

    def cancel(self) -> JobInfo:
        return JobInfo.from_proto(
            self.client._call("CancelJob", pb.CancelJobRequest(name=self.name))
        )

    def metrics(self, max_points: int = 0) -> Metrics:
        request = pb.GetJobMetricsRequest(name=self.name, max_points=max_points)
        return metrics_from_proto(self.client._call("GetJobMetrics", request))

    def download_model(self, path: str | Path) -> Path:
        """Write the trained model (.keras) to `path` (a file, or a folder to put it in)."""
        path = Path(path)
        chunks = self.client._stub.DownloadModel(
            pb.DownloadModelRequest(name=self.name), metadata=self.client._metadata
        )
        tmp = None
        try:
            for chunk in chunks:
                if tmp is None:
                    target = path / chunk.filename if path.is_dir() else path
                    tmp = target.with_name(target.name + ".partial")
                    out = tmp.open("wb")
                out.write(chunk.data)
            if tmp is None:
                raise RuntimeError(f"{self.name}: the server sent an empty model")
            out.close()
            tmp.replace(target)
            return target
        finally:
            if tmp is not None and tmp.exists():
                out.close()
                tmp.unlink()


class TrainingClient:
    """A connection to the training service."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float = 30.0,
        channel: grpc.Channel | None = None,
        token: str | None = None,
        tls: bool = False,
        ca_cert: str | Path | None = None,
        client_cert: str | Path | None = None,
        client_key: str | Path | None = None,
    ):
        """`token` names your tenant on a server with authentication; `tls` (or any of the
        certificate files) makes the connection TLS, and a client certificate mutual TLS."""
        self.address, self.timeout = address, timeout
        creds = Credentials(token, tls, ca_cert, client_cert, client_key)
        self._channel = channel or creds.channel(address)
        self._stub = trainer_pb2_grpc.TrainerServiceStub(self._channel)
        self._metadata: list[tuple[str, str]] = creds.metadata()

    def __enter__(self) -> TrainingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: str, request: Any) -> Any:
        return getattr(self._stub, method)(request, timeout=self.timeout, metadata=self._metadata)

    def submit(
        self,
        spec: JobSpec | Mapping[str, Any] | str | Path,
        *,
        request_id: str | None = None,
        priority: int = 0,
        max_attempts: int = 0,
    ) -> Job:
        """Validate `spec` here (a JobSpec, dict, or YAML/JSON path), then create the job.
        Retrying with the same request_id never creates a second job, so a call that timed
        out or found the server unavailable is retried a few times with the same id."""
        request = spec_request(spec, request_id, priority, max_attempts)
        retriable = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        for attempt in range(SUBMIT_RETRIES + 1):
            try:
                return Job(self, self._call("CreateJob", request).name)
            except grpc.RpcError as exc:
                if exc.code() not in retriable or attempt == SUBMIT_RETRIES:
                    raise
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def job(self, name: str) -> Job:
        return Job(self, name)

    def jobs(
        self,
        *,
        state: str | None = None,
        labels: Mapping[str, str] | None = None,
        name: str | None = None,
        page_size: int = 50,
    ) -> Iterator[JobInfo]:
        """Newest first, across pages."""
        terms = [f"state={state}"] if state else []
        terms += [f"label.{k}={v}" for k, v in (labels or {}).items()]
        terms += [f"name={name}"] if name else []
        token = ""
        while True:
            page = self._call(
                "ListJobs",
                pb.ListJobsRequest(filter=" ".join(terms), page_size=page_size, page_token=token),
            )
            for job in page.jobs:
                yield JobInfo.from_proto(job)
            token = page.next_page_token
            if not token:
                return

    def capabilities(self) -> dict[str, list[str]]:
        c = self._call("ListCapabilities", pb.ListCapabilitiesRequest())
        kinds = (
            "architectures",
            "layers",
            "activations",
            "losses",
            "optimizers",
            "metrics",
            "datasets",
            "schedules",
        )
        return {k: list(getattr(c, k)) for k in kinds} | {"aliases": dict(c.aliases)}

    def upload_dataset(self, name: str, path: str | Path, chunk_size: int = 1 << 20) -> str:
        """Upload an .npz file; returns the path to use as dataset: {name: npz, path: ...}."""

        def parts() -> Iterator[pb.UploadDatasetRequest]:
            yield pb.UploadDatasetRequest(name=name)
            with Path(path).open("rb") as f:
                while chunk := f.read(chunk_size):
                    yield pb.UploadDatasetRequest(chunk=chunk)

        return self._stub.UploadDataset(parts(), timeout=None, metadata=self._metadata).path
