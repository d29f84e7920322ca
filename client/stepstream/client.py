"""The Python client: submit jobs, stream their steps, wait, cancel, download models.

client = TrainingClient("localhost:50051")
job = client.submit("examples/mnist_mlp.yaml")
for event in job.stream():
    if event.kind == "step":
        print(event.step, event.loss, event.accuracy)
job.download_model("model.keras")

A blocking shell over `stepstream.protocol`, which builds the requests, decodes the answers and
decides on retries; `stepstream.aio` is the asyncio shell over the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc

from stepstream import protocol
from stepstream.connection import DEFAULT_ADDRESS, Connection, Credentials
from stepstream.kernel.events import Event
from stepstream.kernel.states import JobState
from stepstream.protocol import (
    ClientSurface,
    JobHandle,
    JobInfo,
    Metrics,
    Program,
    Run,
    job_name,
    metrics_from_proto,
    spec_request,
)
from stepstream.v1 import trainer_pb2 as pb

# JobInfo, Metrics, job_name, metrics_from_proto and spec_request lived here once: still found here.
__all__ = [
    "DEFAULT_ADDRESS",
    "SUBMIT_RETRIES",
    "Job",
    "JobInfo",
    "Metrics",
    "TrainingClient",
    "job_name",
    "metrics_from_proto",
    "spec_request",
]

SUBMIT_RETRIES = protocol.POLICY.submit_retries
_RETRYABLE = protocol.RETRYABLE  # the name earlier versions exported

T = TypeVar("T")


class Job(JobHandle):
    """A handle on one job of the service."""

    client: TrainingClient

    def info(self) -> JobInfo:
        return self.client._run(self._ops.get(self.name))

    @property
    def state(self) -> JobState:
        return self.info().state

    def stream(self, after_seq: int = 0, *, retry_seconds: float = 60.0) -> Iterator[Event]:
        """Every event after `after_seq`, live, ending after the terminal state change. A dropped
        connection is resumed from the last seq seen, so there are no gaps and no repeats; it is
        given up `retry_seconds` after the last message."""
        return self.client._iterate(self._ops.watch(self.name, after_seq, retry_seconds))

    def wait(self, timeout: float | None = None) -> JobInfo:
        """Block until the job ends; return its final state. TimeoutError after `timeout`.
        It rides the job's event stream (no polling), and a server or database that is briefly
        unavailable is waited out like the job."""
        return self.client._run(self._ops.wait(self.name, timeout))

    def cancel(self) -> JobInfo:
        return self.client._run(self._ops.cancel(self.name))

    def metrics(self, max_points: int = 0) -> Metrics:
        return self.client._run(self._ops.metrics(self.name, max_points))

    def download_model(self, path: str | Path, format: str = "keras") -> Path:
        """Write the trained model to `path` (a file, or a folder to put it in): .keras, or
        exported as onnx, tflite or saved_model (a folder, as TF Serving loads it)."""
        return self.client._run(self._ops.download_model(self.name, path, format))

    def download_tensorboard(self, path: str | Path) -> Path:
        """Write the job's TensorBoard event files into the folder `path` (one run)."""
        return self.client._run(self._ops.download_artifacts(self.name, path, "tensorboard"))


class TrainingClient(Connection, ClientSurface[Job, Iterator[JobInfo]]):
    """A connection to the training service; `submit` and `jobs` come from ClientSurface."""

    def _connect(self, credentials: Credentials) -> grpc.Channel:
        return credentials.channel(self.address)

    def __enter__(self) -> TrainingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def job(self, name: str) -> Job:
        return Job(self, name)

    def capabilities(self) -> dict[str, Any]:
        """Every valid architecture, layer, activation, ... name, and "aliases"."""
        return self._run(self._ops.capabilities())

    def upload_dataset(self, name: str, path: str | Path, chunk_size: int = 1 << 20) -> str:
        """Upload an .npz file; returns the path to use as dataset: {name: npz, path: ...}."""
        return self._run(self._ops.upload_dataset(name, path, chunk_size))

    def upload(
        self,
        path: str | Path,
        name: str | None = None,
        chunk_size: int = 1 << 20,
        progress: Callable[[int, int], None] | None = None,
    ) -> pb.Dataset:
        """Upload a dataset file (.npz, .csv, .parquet, .tfrecord) or an image folder, resuming
        an earlier interrupted upload of the same file; its Dataset (`.path` goes in a spec)."""
        return self._run(self._ops.upload(path, name, chunk_size, progress))

    # The shell: perform what a program asks, blocking.

    def _submit(self, request: pb.CreateJobRequest) -> Job:
        return Job(self, self._run(self._ops.submit(request)))

    def _run(self, program: Program[T]) -> T:
        run = Run(program, self._explain)
        for _ in self._steps(run):
            raise TypeError("a program run for its result emitted a value")
        return run.result  # type: ignore[return-value]

    def _iterate(self, program: Program[None]) -> Iterator[Any]:
        return self._steps(Run(program, self._explain))

    def _steps(self, run: Run[Any]) -> Iterator[Any]:
        try:
            for op in run:
                if isinstance(op, protocol.Emit):
                    yield op.value
                else:
                    run.settle(self._perform, op)
        finally:
            run.close()

    def _perform(self, op: protocol.Op) -> Any:
        if isinstance(op, protocol.Sleep):
            time.sleep(op.seconds)
            return None
        if isinstance(op, protocol.Next):
            return next(op.stream, protocol.END)
        return op.invoke(self._stub, self._metadata)  # a Call's reply, an Open's stream
