"""Typed training events: what `train()` emits, what the store keeps, what a watcher receives.

`to_payload` and `from_payload` are the store's codec (a JSON object per event);
`stepstream.kernel.wire` is the API's. Both follow the dataclass fields, whose names are the
protobuf fields', so a field added here travels everywhere or fails the round-trip test.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from stepstream.kernel.failures import Failure
from stepstream.kernel.states import JobState


@dataclass(frozen=True)
class StepEvent:
    """One optimizer step: the batch's own loss and accuracy (or mae for regression)."""

    step: int
    loss: float
    accuracy: float | None
    mae: float | None
    learning_rate: float
    steps_per_second: float
    examples_per_second: float
    time: float
    kind: Literal["step"] = "step"
    seq: int = 0


@dataclass(frozen=True)
class EvalEvent:
    """An evaluation on the validation split (or the test split when there is none)."""

    step: int
    split: Literal["validation", "test"]
    values: dict[str, float]
    time: float
    kind: Literal["eval"] = "eval"
    seq: int = 0


@dataclass(frozen=True)
class CheckpointEvent:
    step: int
    path: str
    time: float
    kind: Literal["checkpoint"] = "checkpoint"
    seq: int = 0


@dataclass(frozen=True)
class LogEvent:
    """Something a person watching the job wants to read (data loaded, model built, ...)."""

    message: str
    time: float
    level: Literal["info", "warning"] = "info"
    kind: Literal["log"] = "log"
    seq: int = 0


@dataclass(frozen=True)
class ResultEvent:
    """The last event of a run."""

    outcome: Literal["succeeded", "failed", "cancelled"]
    steps: int
    stop_reason: str
    test_metrics: dict[str, float] = field(default_factory=dict)
    final_eval: dict[str, float] = field(default_factory=dict)
    model_path: str | None = None
    failure: Failure | None = None
    duration_seconds: float = 0.0
    time: float = 0.0
    kind: Literal["result"] = "result"
    seq: int = 0


@dataclass(frozen=True)
class StateEvent:
    """The job changed state (a watcher's view; the engine itself never emits these)."""

    state: JobState
    attempt: int
    time: float
    failure: Failure | None = None
    kind: Literal["state"] = "state"
    seq: int = 0

    @property
    def terminal(self) -> bool:
        return self.state.terminal


Event = StepEvent | EvalEvent | CheckpointEvent | LogEvent | ResultEvent | StateEvent

KINDS: dict[str, type[Event]] = {
    cls.kind: cls  # type: ignore[misc]
    for cls in (StepEvent, EvalEvent, CheckpointEvent, LogEvent, ResultEvent, StateEvent)
}
# What each kind carries besides its kind, time and seq (which the store keeps in columns).
PAYLOAD_FIELDS: dict[str, tuple[str, ...]] = {
    kind: tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("kind", "time", "seq"))
    for kind, cls in KINDS.items()
}
# Keys that rows written by earlier versions use.
_LEGACY = {"error": "failure", "duration_s": "duration_seconds"}


def to_payload(event: Event) -> dict[str, Any]:
    """The event's fields as a JSON-ready mapping (dataclasses.asdict is slow on the hot path)."""
    payload = {name: getattr(event, name) for name in PAYLOAD_FIELDS[event.kind]}
    failure = payload.get("failure")
    if failure is not None:
        payload["failure"] = failure.to_dict()
    if "state" in payload:
        payload["state"] = payload["state"].value
    return payload


def from_payload(kind: str, payload: dict[str, Any], *, seq: int = 0, time: float = 0.0) -> Event:
    """The event a stored payload describes."""
    known = PAYLOAD_FIELDS[kind]
    values = {_LEGACY.get(k, k): v for k, v in payload.items()}
    values = {k: v for k, v in values.items() if k in known}
    if "failure" in values:
        values["failure"] = Failure.from_dict(values["failure"])
    if "state" in values:
        values["state"] = JobState(values["state"])
    return KINDS[kind](**values, seq=seq, time=time)  # type: ignore[arg-type]
