"""States of jobs, experiments and trials: the one list of each, and which are final."""

from __future__ import annotations

from enum import Enum


class _State(str, Enum):
    """Compares equal to its name, so `info.state == "SUCCEEDED"` holds."""

    def __str__(self) -> str:
        return self.value

    @property
    def terminal(self) -> bool:
        return self.value not in ("QUEUED", "RUNNING", "CANCELLING")

    @classmethod
    def parse(cls, text: str):
        """From a name in any case, with or without the wire's prefix (JOB_STATE_, ...)."""
        prefix = {"JobState": "JOB_STATE_", "ExperimentState": "EXPERIMENT_STATE_",
                  "TrialState": "TRIAL_STATE_"}[cls.__name__]  # fmt: skip
        try:
            return cls(text.upper().removeprefix(prefix))
        except ValueError:
            noun = cls.__name__.removesuffix("State").lower()
            valid = ", ".join(sorted(s.value for s in cls))
            raise ValueError(f"unknown {noun} state {text!r}; valid: {valid}") from None


class JobState(_State):
    """A job's state."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLING = "CANCELLING"
    CANCELLED = "CANCELLED"


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class ExperimentState(_State):
    """An experiment's state: RUNNING until its last trial ends, then final."""

    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"  # every trial it was to run has ended (some may have been pruned)
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class TrialState(_State):
    """A trial's state. RUNNING covers its job's whole life, queued included; PRUNED is a
    trial the pruner stopped early, at the step it records."""

    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    PRUNED = "PRUNED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
