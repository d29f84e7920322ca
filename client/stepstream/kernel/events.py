"""Typed training events: what `train()` emits and what a watcher of a job receives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


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
class TrainingFailure:
    reason: str
    message: str
    step: int | None = None


@dataclass(frozen=True)
class ResultEvent:
    """The last event of a run."""

    outcome: Literal["succeeded", "failed", "cancelled"]
    steps: int
    stop_reason: str
    test_metrics: dict[str, float] = field(default_factory=dict)
    final_eval: dict[str, float] = field(default_factory=dict)
    model_path: str | None = None
    failure: TrainingFailure | None = None
    duration_s: float = 0.0
    time: float = 0.0
    kind: Literal["result"] = "result"
    seq: int = 0


@dataclass(frozen=True)
class StateEvent:
    """The job changed state (a watcher's view; the engine itself never emits these)."""

    state: str
    attempt: int
    time: float
    failure: TrainingFailure | None = None
    kind: Literal["state"] = "state"
    seq: int = 0

    @property
    def terminal(self) -> bool:
        return self.state in ("SUCCEEDED", "FAILED", "CANCELLED")


Event = StepEvent | EvalEvent | CheckpointEvent | LogEvent | ResultEvent | StateEvent
