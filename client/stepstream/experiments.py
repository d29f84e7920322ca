"""Experiments on the client's side, with no I/O in it: the request that creates one, what the
answers mean (`ExperimentInfo`, `TrialInfo`, `ExperimentUpdate`), and each operation as a
program of `stepstream.protocol` that either client runs.

client = TrainingClient("localhost:50051")
exp = client.submit_experiment("examples/experiments/sweep.yaml")
for update in client.watch_experiment(exp.id):
    for trial in update.trials:
        print(trial.number, trial.state, trial.params, trial.value)
best = client.wait_experiment(exp.id)
print(best.best_trial, best.best_value, best.best_job_id)
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from stepstream.kernel.experiment import ExperimentSpec, load_experiment
from stepstream.kernel.states import ExperimentState, TrialState
from stepstream.kernel.wire import experiment_state_from_proto, seconds, trial_state_from_proto
from stepstream.protocol import (
    END,
    MIN_CALL_SECONDS,
    Call,
    Emit,
    Next,
    Open,
    Operations,
    Program,
    Sleep,
    code_of,
)
from stepstream.v1 import trainer_pb2 as pb

# ---------------------------------------------------------------- answers


def _time(message: Any, name: str) -> float | None:
    return seconds(getattr(message, name)) if message.HasField(name) else None


@dataclass(frozen=True)
class TrialInfo:
    """One trial: its number, its job, the values it was given and how it did."""

    number: int
    job_id: str
    state: TrialState
    params: dict[str, Any]  # dotted job field -> value
    value: float | None  # the objective: the last reported, then the final one
    step: int  # of that value; for a pruned trial, where it was stopped
    reason: str
    seq: int
    create_time: float | None
    end_time: float | None

    @property
    def terminal(self) -> bool:
        return self.state.terminal

    @classmethod
    def from_proto(cls, t: pb.Trial) -> TrialInfo:
        return cls(
            number=t.number,
            job_id=t.job.removeprefix("jobs/"),
            state=trial_state_from_proto(t.state),
            params=json.loads(t.params_json) if t.params_json else {},
            value=t.value if t.HasField("value") else None,
            step=t.step,
            reason=t.reason,
            seq=t.seq,
            create_time=_time(t, "create_time"),
            end_time=_time(t, "end_time"),
        )


@dataclass(frozen=True)
class ExperimentInfo:
    """An experiment as the server last told it. `trials` is empty where the answer carries
    none (a listing, a watch update); `trial_counts` is always there."""

    name: str
    id: str
    display_name: str
    state: ExperimentState
    objective: str
    direction: str  # "minimize" or "maximize"
    max_trials: int
    best_trial: int | None
    best_value: float | None
    trial_counts: dict[str, int]
    cancel_requested: bool
    priority: int
    message: str
    study_storage: str
    last_seq: int
    create_time: float | None
    end_time: float | None
    trials: list[TrialInfo] = field(default_factory=list)
    request_id: str = ""
    spec: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.state.terminal

    @property
    def best(self) -> TrialInfo | None:
        """The best trial, when this answer carries it."""
        return next((t for t in self.trials if t.number == self.best_trial), None)

    @property
    def best_job_id(self) -> str | None:
        """The best trial's job (download its model with `client.job(id)`), when known."""
        best = self.best
        return best.job_id if best is not None else None

    @property
    def finished_trials(self) -> int:
        return sum(n for state, n in self.trial_counts.items() if state != "RUNNING")

    @classmethod
    def from_proto(cls, e: pb.Experiment) -> ExperimentInfo:
        return cls(
            name=e.name,
            id=e.name.removeprefix("experiments/"),
            display_name=e.display_name,
            state=experiment_state_from_proto(e.state),
            objective=e.objective,
            direction=e.direction,
            max_trials=e.max_trials,
            best_trial=e.best_trial if e.HasField("best_trial") else None,
            best_value=e.best_value if e.HasField("best_value") else None,
            trial_counts=dict(e.trial_counts),
            cancel_requested=e.cancel_requested,
            priority=e.priority,
            message=e.message,
            study_storage=e.study_storage,
            last_seq=e.last_seq,
            create_time=_time(e, "create_time"),
            end_time=_time(e, "end_time"),
            trials=[TrialInfo.from_proto(t) for t in e.trials],
            request_id=e.request_id,
            spec=json.loads(e.spec_json) if e.spec_json else {},
        )


@dataclass(frozen=True)
class ExperimentUpdate:
    """One WatchExperiment message: the experiment now (no trials in it), the trials changed
    since the last update, and the seq to resume after."""

    experiment: ExperimentInfo
    trials: list[TrialInfo]
    seq: int

    @classmethod
    def from_proto(cls, r: pb.WatchExperimentResponse) -> ExperimentUpdate:
        return cls(
            ExperimentInfo.from_proto(r.experiment),
            [TrialInfo.from_proto(t) for t in r.trials],
            r.seq,
        )


# ---------------------------------------------------------------- requests


def experiment_name(name: str) -> str:
    """ "experiments/exp-…" from either that or the bare id."""
    return name if name.startswith("experiments/") else f"experiments/{name}"


def experiment_request(
    spec: ExperimentSpec | Mapping[str, Any] | str | Path,
    request_id: str | None = None,
    priority: int = 0,
) -> pb.CreateExperimentRequest:
    """Validate `spec` here (an ExperimentSpec, mapping, or YAML/JSON path, whose `job:` may
    name a job file beside it) and build its request."""
    return pb.CreateExperimentRequest(
        spec_json=json.dumps(load_experiment(spec).to_dict()),
        request_id=request_id or uuid.uuid4().hex,
        priority=priority,
    )


# ---------------------------------------------------------------- the operations


def submit(ops: Operations, request: pb.CreateExperimentRequest) -> Program[ExperimentInfo]:
    """The new experiment. Retried as CreateJob is: the same request, so the same request_id."""
    attempt = 0
    while True:
        try:
            reply = yield Call("CreateExperiment", request, ops.timeout)
            return ExperimentInfo.from_proto(reply)
        except grpc.RpcError as exc:
            delay = ops.policy.submit_delay(code_of(exc), attempt)
            if delay is None:
                raise
        attempt += 1
        yield Sleep(delay)


def get(ops: Operations, name: str) -> Program[ExperimentInfo]:
    request = pb.GetExperimentRequest(name=experiment_name(name))
    return ExperimentInfo.from_proto((yield Call("GetExperiment", request, ops.timeout)))


def cancel(ops: Operations, name: str) -> Program[ExperimentInfo]:
    request = pb.CancelExperimentRequest(name=experiment_name(name))
    return ExperimentInfo.from_proto((yield Call("CancelExperiment", request, ops.timeout)))


def listing(ops: Operations, filter: str = "", page_size: int = 50) -> Program[None]:
    """Emits every experiment that matches, newest first, across pages (without trials)."""
    token = ""
    while True:
        request = pb.ListExperimentsRequest(filter=filter, page_size=page_size, page_token=token)
        page = yield Call("ListExperiments", request, ops.timeout)
        for e in page.experiments:
            yield Emit(ExperimentInfo.from_proto(e))
        token = page.next_page_token
        if not token:
            return


def watch(
    ops: Operations, name: str, after_seq: int = 0, retry_seconds: float = 60.0
) -> Program[None]:
    """Emits an ExperimentUpdate per message, up to the one showing the experiment ended. A
    dropped stream is resumed after the last seq received, for `retry_seconds` after its last
    message."""
    seq, down_since = after_seq, None
    while True:
        try:
            request = pb.WatchExperimentRequest(name=experiment_name(name), after_seq=seq)
            stream = yield Open("WatchExperiment", request, None)
            while (response := (yield Next(stream))) is not END:
                down_since = None
                update = ExperimentUpdate.from_proto(response)
                seq = max(seq, update.seq)
                yield Emit(update)
                if update.experiment.terminal:
                    return
            return  # the server closed the stream after the experiment ended
        except grpc.RpcError as exc:
            now = time.monotonic()
            down_since = now if down_since is None else down_since
            delay = ops.policy.stream_delay(code_of(exc), now - down_since, retry_seconds)
            if delay is None:
                raise
        yield Sleep(delay)


def wait(ops: Operations, name: str, timeout: float | None = None) -> Program[ExperimentInfo]:
    """The experiment once it has ended, with every trial. TimeoutError after `timeout`. It
    rides WatchExperiment from the seq GetExperiment reports; a server briefly unavailable is
    waited out, and one with no stream to spare is asked again every poll_pause."""
    end = None if timeout is None else time.monotonic() + timeout
    state: str = "unknown"

    def left() -> float | None:
        return None if end is None else max(end - time.monotonic(), 0.0)

    def limit() -> float:
        rest = left()
        return ops.timeout if rest is None else min(ops.timeout, max(rest, MIN_CALL_SECONDS))

    def timed_out() -> TimeoutError:
        return TimeoutError(f"{experiment_name(name)} still {state} after {timeout} s")

    while True:
        try:
            request = pb.GetExperimentRequest(name=experiment_name(name))
            info = ExperimentInfo.from_proto((yield Call("GetExperiment", request, limit())))
            state = info.state
            if info.terminal:
                return info
            if left() == 0:
                raise timed_out()
            watching = pb.WatchExperimentRequest(name=info.name, after_seq=info.last_seq)
            stream = yield Open("WatchExperiment", watching, left())
            while (response := (yield Next(stream))) is not END:
                state = experiment_state_from_proto(response.experiment.state)
                if state.terminal:
                    break
            continue  # ended, or the stream closed: GetExperiment has the final word
        except grpc.RpcError as exc:
            delay = ops.policy.wait_delay(code_of(exc))
            if delay is None:
                raise
            rest = left()
            if rest == 0:
                raise timed_out() from exc
        yield Sleep(delay if rest is None else min(delay, rest))


def list_filter(state: str | None = None, name: str | None = None) -> str:
    """ListExperiments' filter: "state=RUNNING name=seed-mlp-sweep"."""
    terms = [f"state={state}"] if state else []
    return " ".join(terms + ([f"name={name}"] if name else []))
