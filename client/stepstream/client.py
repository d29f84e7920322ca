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

import re
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import grpc

from stepstream import experiments, protocol
from stepstream.connection import DEFAULT_ADDRESS, Connection, Credentials
from stepstream.experiments import ExperimentInfo, ExperimentUpdate
from stepstream.kernel.events import Event
from stepstream.kernel.experiment import ExperimentSpec, apply
from stepstream.kernel.spec import JobSpec, Problem, SpecError, fork_conflicts
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
    "ExperimentInfo",
    "ExperimentUpdate",
    "Job",
    "JobInfo",
    "Metrics",
    "TrainingClient",
    "fork_spec",
    "job_name",
    "metrics_from_proto",
    "spec_request",
]

SUBMIT_RETRIES = protocol.POLICY.submit_retries
_RETRYABLE = protocol.RETRYABLE  # the name earlier versions exported

T = TypeVar("T")

# A fork's source's labels it does not take: it is no trial of the source's experiment.
_NOT_INHERITED = ("experiment", "trial")
_STEPS = re.compile(r"^\s*(\+?)\s*(\d+)\s*$")


def fork_spec(
    source: JobInfo,
    changes: Mapping[str, Any] | None = None,
    *,
    steps: int | str | None = None,
    name: str | None = None,
) -> JobSpec:
    """The spec of a fork of `source` (a job's info, spec included): its spec with each dotted
    path in `changes` set (`{"optimizer.learning_rate": 1e-4}`), starting from its newest
    checkpoint (`init_from`; `changes` may give `init_from.step`). `steps` sets
    training.steps: a number, or "+N" for N steps past where the fork starts (the source's
    step, or init_from.step). `name` is the source's name and "-fork" unless given. Raises
    SpecError naming each field that is wrong or that a fork cannot change (the model's
    shapes, the optimizer's kind)."""
    base = JobSpec.parse(source.spec)
    changes = dict(changes or {})
    start = changes.get("init_from.step")
    if not isinstance(start, int) or isinstance(start, bool):
        start = source.step
    params: dict[str, Any] = {
        "init_from": {"job": source.id},
        "labels": {k: v for k, v in base.labels.items() if k not in _NOT_INHERITED},
        "name": name or f"{base.name[:58]}-fork",
        **changes,
    }
    if steps is not None:
        found = _STEPS.match(str(steps)) if not isinstance(steps, bool) else None
        if found is None:
            raise SpecError(
                [Problem("training.steps", f"{steps!r}: give a number of steps, or +N for N more")]
            )
        params["training.steps"] = start + int(found[2]) if found[1] else int(found[2])
        params["training.epochs"] = None  # steps, not epochs, say how long it trains
    spec = apply(base, params)
    total = spec.training.steps
    if total is not None and total <= start:
        raise SpecError(
            [
                Problem(
                    "training.steps",
                    f"{total} is not past step {start} of {source.id}, where the fork "
                    "starts; give steps as +N to train N more (trainer fork --steps +N)",
                )
            ]
        )
    problems = fork_conflicts(base, spec, source.id)
    if problems:
        raise SpecError(problems)
    return spec


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

    def fork(
        self,
        job: str,
        changes: Mapping[str, Any] | None = None,
        *,
        steps: int | str | None = None,
        name: str | None = None,
        request_id: str | None = None,
        priority: int = 0,
        max_attempts: int = 0,
    ) -> Job:
        """A new job that starts from `job`'s newest checkpoint (weights, optimizer state,
        step) with `changes` to its spec, labelled forked_from=<job's id>; `steps` is
        training.steps, or "+N" for N more steps (see fork_spec)."""
        spec = fork_spec(self.job(job).info(), changes, steps=steps, name=name)
        return self.submit(
            spec, request_id=request_id, priority=priority, max_attempts=max_attempts
        )

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

    # Experiments: searches over a job's fields, each trial a job (stepstream.experiments).

    def submit_experiment(
        self,
        spec: ExperimentSpec | Mapping[str, Any] | str | Path,
        *,
        request_id: str | None = None,
        priority: int = 0,
    ) -> ExperimentInfo:
        """Validate `spec` here (an ExperimentSpec, dict, or YAML/JSON path), then create the
        experiment; retried with the same request_id as `submit` is. `priority` is each trial
        job's, unless the spec gives trial_priority."""
        request = experiments.experiment_request(spec, request_id, priority)
        return self._run(experiments.submit(self._ops, request))

    def get_experiment(self, name: str) -> ExperimentInfo:
        """An experiment (by id or "experiments/<id>") with every trial."""
        return self._run(experiments.get(self._ops, name))

    def experiments(
        self, *, state: str | None = None, name: str | None = None, page_size: int = 50
    ) -> Iterator[ExperimentInfo]:
        """Newest first, across pages, without their trials (trial_counts has how many)."""
        filter = experiments.list_filter(state, name)
        return self._iterate(experiments.listing(self._ops, filter, page_size))

    def cancel_experiment(self, name: str) -> ExperimentInfo:
        return self._run(experiments.cancel(self._ops, name))

    def watch_experiment(
        self, name: str, after_seq: int = 0, *, retry_seconds: float = 60.0
    ) -> Iterator[ExperimentUpdate]:
        """The experiment and the trials changed after `after_seq`, then every change, live,
        ending with the update that shows it ended; a dropped stream resumes after the last
        seq seen."""
        return self._iterate(experiments.watch(self._ops, name, after_seq, retry_seconds))

    def wait_experiment(self, name: str, timeout: float | None = None) -> ExperimentInfo:
        """Block until the experiment ends; it, with every trial. TimeoutError after `timeout`."""
        return self._run(experiments.wait(self._ops, name, timeout))

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
