"""The Python client: submit jobs, stream their steps, wait, cancel, download models.

client = TrainingClient("localhost:50051")
job = client.submit("examples/mnist_mlp.yaml")
for event in job.stream():
    if event.kind == "step":
        print(event.step, event.loss, event.accuracy)
job.download_model("model.keras")
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from stepstream.connection import Credentials
from stepstream.kernel.events import (
    CheckpointEvent,
    EvalEvent,
    Event,
    LogEvent,
    ResultEvent,
    StateEvent,
    StepEvent,
    TrainingFailure,
)
from stepstream.kernel.spec import JobSpec, load_spec
from stepstream.v1 import trainer_pb2 as pb
from stepstream.v1 import trainer_pb2_grpc

DEFAULT_ADDRESS = "localhost:50051"
SUBMIT_RETRIES = 3
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
# Codes worth retrying a stream on: the server restarting or a network blip.
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass(frozen=True)
class JobInfo:
    name: str
    id: str
    display_name: str
    state: str
    step: int
    total_steps: int
    loss: float
    accuracy: float
    attempts: int
    max_attempts: int
    priority: int
    labels: dict[str, str]
    test_metrics: dict[str, float]
    model_available: bool
    failure: TrainingFailure | None
    create_time: float | None
    start_time: float | None
    end_time: float | None
    last_seq: int
    worker: str = ""
    spec: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @classmethod
    def from_proto(cls, job: pb.Job) -> JobInfo:
        def ts(field_name: str) -> float | None:
            return (
                getattr(job, field_name).ToNanoseconds() / 1e9 if job.HasField(field_name) else None
            )

        return cls(
            name=job.name,
            id=job.name.removeprefix("jobs/"),
            display_name=job.display_name,
            state=pb.JobState.Name(job.state),
            step=job.step,
            total_steps=job.total_steps,
            loss=job.loss,
            accuracy=job.accuracy,
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            priority=job.priority,
            labels=dict(job.labels),
            test_metrics=dict(job.test_metrics),
            model_available=job.model_available,
            failure=_failure(job.error) if job.HasField("error") else None,
            create_time=ts("create_time"),
            start_time=ts("start_time"),
            end_time=ts("end_time"),
            last_seq=job.last_seq,
            worker=job.worker,
            spec=json_format.MessageToDict(job.spec),
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


def _failure(error: pb.JobError) -> TrainingFailure:
    return TrainingFailure(error.reason, error.message, error.step or None)


def event_from_proto(ev: pb.JobEvent) -> Event:
    t, seq, which = ev.time.ToNanoseconds() / 1e9, ev.seq, ev.WhichOneof("payload")
    if which == "step":
        s = ev.step
        return StepEvent(
            step=s.step,
            loss=s.loss,
            accuracy=s.accuracy if s.HasField("accuracy") else None,
            mae=s.mae if s.HasField("mae") else None,
            learning_rate=s.learning_rate,
            steps_per_second=s.steps_per_second,
            examples_per_second=s.examples_per_second,
            time=t,
            seq=seq,
        )
    if which == "eval":
        return EvalEvent(ev.eval.step, ev.eval.split, dict(ev.eval.values), t, seq=seq)  # type: ignore[arg-type]
    if which == "checkpoint":
        return CheckpointEvent(ev.checkpoint.step, "", t, seq=seq)
    if which == "log":
        return LogEvent(ev.log.message, t, ev.log.level or "info", seq=seq)  # type: ignore[arg-type]
    if which == "state_change":
        sc = ev.state_change
        failure = _failure(sc.error) if sc.HasField("error") else None
        return StateEvent(pb.JobState.Name(sc.state), sc.attempt, t, failure, seq=seq)
    r = ev.result
    return ResultEvent(
        outcome=r.outcome,  # type: ignore[arg-type]
        steps=r.steps,
        stop_reason=r.stop_reason,
        test_metrics=dict(r.test_metrics),
        final_eval=dict(r.final_eval),
        failure=_failure(r.error) if r.HasField("error") else None,
        duration_s=r.duration_seconds,
        time=t,
        seq=seq,
    )


def events_of(response: pb.WatchJobResponse) -> list[Event]:
    """The events a WatchJob message carries (none for the snapshot)."""
    if response.WhichOneof("kind") != "batch":
        return []
    return [event_from_proto(proto) for proto in response.batch.events]


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


def _spec_struct(spec: JobSpec) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(spec.to_dict())
    return out


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
        parsed = load_spec(spec)
        request = pb.CreateJobRequest(
            spec=_spec_struct(parsed),
            request_id=request_id or uuid.uuid4().hex,
            priority=priority,
            max_attempts=max_attempts,
        )
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
