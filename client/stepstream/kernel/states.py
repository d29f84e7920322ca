"""Job states: the one list of them, and which are final."""

from __future__ import annotations

from enum import Enum


class JobState(str, Enum):
    """A job's state. Compares equal to its name, so `info.state == "SUCCEEDED"` holds."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLING = "CANCELLING"
    CANCELLED = "CANCELLED"

    def __str__(self) -> str:
        return self.value

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @classmethod
    def parse(cls, text: str) -> JobState:
        """From a name in any case, with or without the wire's JOB_STATE_ prefix."""
        try:
            return cls(text.upper().removeprefix("JOB_STATE_"))
        except ValueError:
            valid = ", ".join(sorted(s.value for s in cls))
            raise ValueError(f"unknown job state {text!r}; valid: {valid}") from None


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
